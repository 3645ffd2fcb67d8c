"""Stage sample_point_feats: CLIP grid features sampled at the uv index of every frame.

Reads the ``sample_point_feats`` section of params.yaml and writes the sharded folder ``<out>``
(one record per frame with ``pts_feat (N, C) float16``, key ``<scene>/frame_<idx>``; with
``layout: npz`` also the seed's ``<out>/<scene>/frame_<idx>.npz`` files; see
:mod:`featcache.stages.sample_point_feats`), ``<out>/failures.tsv`` and the stage metrics.
"""

from featcache.config import load_stage_params
from featcache.stages.sample_point_feats import STAGE, PointFeatsParams, sample_point_feats
from featcache.engine.cli import run_stage


def main() -> None:
    _, params = load_stage_params(STAGE, PointFeatsParams)
    sample_point_feats(params)


if __name__ == "__main__":
    run_stage(main)
