"""Stage download: write the embedded sample, or fetch COCO / SA-1B / link ScanNet, and weights.

Reads the shared keys and the ``download`` section of params.yaml (see
:mod:`featcache.download`). Exit code 2 for a bad parameter, 1 for a failed transfer, a checksum
mismatch or an unsafe archive. Kept free of torch so that it starts instantly.
"""

import logging
import sys

from featcache.archives import ArchiveError, DownloadError
from featcache.config import ParamError, load_stage_params
from featcache.download import DownloadParams, run_download

log = logging.getLogger("featcache.download")


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        shared, params = load_stage_params("download", DownloadParams)
        run_download(shared, params)
    except ParamError as e:
        log.error("bad parameter in params.yaml: %s", e)
        return 2
    except (DownloadError, ArchiveError, FileExistsError) as e:
        log.error("%s", e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
