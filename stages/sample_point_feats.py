"""Stage sample_point_feats: CLIP grid features sampled at the uv index of every frame.

Reads the ``sample_point_feats`` section of params.yaml and writes
``<out>/<scene>/frame_<idx>.npz`` per frame with ``pts_feat (N, C) float16`` (see
:mod:`featcache.point_feats`), ``<out>/failures.tsv`` and ``metrics/sample_point_feats.json``.
"""

from featcache.config import load_stage_params
from featcache.point_feats import STAGE, PointFeatsParams, sample_point_feats
from featcache.stage import run_stage


def main() -> None:
    _, params = load_stage_params(STAGE, PointFeatsParams)
    sample_point_feats(params)


if __name__ == "__main__":
    run_stage(main)
