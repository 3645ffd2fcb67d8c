"""Running a stage script: logging set up once, expected errors reported without a traceback."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from featcache.config import ParamError, StageError

EXIT_BAD_PARAMS = 2
EXIT_FAILED = 1


def run_stage(main: Callable[[], object]) -> None:
    """Call ``main``. A bad parameter ends the process with exit code 2; missing weights or
    inputs, a failed download or too many failed items (:class:`StageError`,
    ``FileNotFoundError``, ``FileExistsError``) with exit code 1; each as one line naming what
    is wrong. Anything else is a bug and keeps its traceback."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("featcache")
    try:
        main()
    except ParamError as e:
        log.error("bad parameter in params.yaml: %s", e)
        sys.exit(EXIT_BAD_PARAMS)
    except (StageError, FileNotFoundError, FileExistsError) as e:
        log.error("%s", e)
        sys.exit(EXIT_FAILED)
