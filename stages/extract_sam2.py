"""Stage extract_sam2: SAM2 image-encoder features (P4/P5) per image.

Reads the ``extract_sam2`` section of params.yaml plus the shared ``weights``, ``seed`` and
``device``, and writes the sharded folder ``<out>/`` (``P4_S16``, ``P5_S32``, ``feature_flag``
per image stem; ``layout: npz`` adds the seed's ``<stem>_features.npz``; see
:mod:`featcache.stages.extract_sam2`).
"""

from featcache.config import load_stage_params
from featcache.stages.extract_sam2 import STAGE, Sam2Params, extract_sam2
from featcache.engine.cli import run_stage


def main() -> None:
    shared, params = load_stage_params(STAGE, Sam2Params)
    extract_sam2(shared, params)


if __name__ == "__main__":
    run_stage(main)
