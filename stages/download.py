"""Stage download: write the embedded sample, or fetch COCO / SA-1B / link ScanNet, and weights.

Reads the shared keys and the ``download`` section of params.yaml (see
:mod:`featcache.stages.download`). Exit code 2 for a bad parameter, 1 for a failed transfer, a checksum
mismatch or an unsafe archive. Free of torch, so it starts instantly.
"""

from featcache.config import load_stage_params
from featcache.stages.download import DownloadParams, run_download
from featcache.engine.cli import run_stage


def main() -> None:
    shared, params = load_stage_params("download", DownloadParams)
    run_download(shared, params)


if __name__ == "__main__":
    run_stage(main)
