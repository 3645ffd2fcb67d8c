"""Stage extract_siglip: one open_clip (SigLIP) embedding per COCO panoptic segment.

Reads the shared keys and the ``extract_siglip`` section of params.yaml and writes
``<out>/embeddings.h5`` (or per-segment ``.npy`` files), ``<out>/inst2feat.tsv`` and
``<out>/failures.tsv`` (see :mod:`featcache.stages.extract_siglip`).
"""

from featcache.config import load_stage_params
from featcache.stages.extract_siglip import STAGE, SiglipParams, extract_siglip
from featcache.engine.cli import run_stage


def main() -> None:
    shared, params = load_stage_params(STAGE, SiglipParams)
    extract_siglip(shared, params)


if __name__ == "__main__":
    run_stage(main)
