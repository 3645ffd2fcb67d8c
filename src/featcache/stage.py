"""Running a stage script: logging set up once, known errors reported without a traceback."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from featcache.config import ParamError

EXIT_BAD_PARAMS = 2
EXIT_FAILED = 1


def run_stage(main: Callable[[], None]) -> None:
    """Call ``main``; a bad parameter, missing weights or too many failures end the process
    with a one-line error (exit 2 for bad parameters, 1 otherwise)."""
    from featcache.engine.metrics import TooManyFailures

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    known: tuple[type[BaseException], ...] = (TooManyFailures, FileNotFoundError)
    try:
        from featcache.encoders.weights import WeightsNotFoundError
        known += (WeightsNotFoundError,)
    except ImportError:  # the encoders package is optional for model-free stages
        pass
    try:
        main()
    except ParamError as e:
        logging.getLogger("featcache").error("bad parameter in params.yaml: %s", e)
        sys.exit(EXIT_BAD_PARAMS)
    except known as e:
        logging.getLogger("featcache").error("%s", e)
        sys.exit(EXIT_FAILED)
