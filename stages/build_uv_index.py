"""Stage build_uv_index: where each ScanNet point lands in each selected colour frame.

Reads the ``build_uv_index`` section of params.yaml and writes the sharded folder ``<out>``
(one record per frame, key ``<scene>/frame_<idx>``; with ``layout: npz`` also the seed's
``<out>/<scene>/frame_<idx>.npz`` files; see :mod:`featcache.stages.build_uv_index`), ``<out>/failures.tsv``
and the stage metrics (with ``reprojection_max_px``).
"""

from featcache.config import load_stage_params
from featcache.engine.cli import run_stage
from featcache.stages.build_uv_index import STAGE, UvIndexParams, build_uv_index


def main() -> None:
    _, params = load_stage_params(STAGE, UvIndexParams)
    build_uv_index(params)


if __name__ == "__main__":
    run_stage(main)
