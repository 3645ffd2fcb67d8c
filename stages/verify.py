"""Stage verify: open every output, check it, write reports/verify.json and pictures.

Reads the shared keys and the ``verify`` section of params.yaml (see :mod:`featcache.stages.verify`);
exits non-zero, after writing the report, when a check fails.
"""

from featcache.config import load_stage_params
from featcache.engine.cli import run_stage
from featcache.stages.verify import STAGE, VerifyParams, verify


def main() -> None:
    shared, params = load_stage_params(STAGE, VerifyParams)
    verify(shared, params)


if __name__ == "__main__":
    run_stage(main)
