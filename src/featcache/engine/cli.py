"""Running a stage script: logging set up once, expected errors reported without a traceback."""

from __future__ import annotations

import errno
import logging
import pickle
import re
import sys
from collections.abc import Callable

from featcache.config import ParamError, StageError

EXIT_BAD_PARAMS = 2
EXIT_FAILED = 1

_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_CONVERT_HINT = ("if you trust its source, re-save its tensors from the program that made it "
                 "(torch.save(model.state_dict(), 'plain.pt') or "
                 "safetensors.torch.save_file(model.state_dict(), 'plain.safetensors')) "
                 "and point weights at that file")


def checkpoint_refusal(error: BaseException, path: object = None) -> str:
    """One line for a checkpoint that ``torch.load(weights_only=True)`` refused: it holds
    Python objects or code, which featcache never unpickles (torch's own message suggests an
    unsafe option; this one says how to convert a trusted file instead)."""
    found = re.search(r"GLOBAL ([\w.]+)", str(error))
    what = f" (it references {found.group(1)})" if found else ""
    where = f"{path}: " if path is not None else ""
    return (f"{where}refused: not a plain tensor checkpoint{what}; featcache loads only "
            f"tensors, never pickled code; {_CONVERT_HINT}")


def os_error_line(error: OSError) -> str | None:
    """One line for a disk-full or name-too-long error naming the path, else None."""
    text = str(error)
    path = error.filename if error.filename is not None else "(path not reported)"
    if error.errno in _DISK_FULL or "No space left on device" in text or "errno = 28" in text:
        return (f"disk full (or quota exceeded) while writing {path}: free space there and run "
                "again; finished shards are kept in .featcache/scratch and reused")
    if error.errno == errno.ENAMETOOLONG or "File name too long" in text:
        name = str(path).rsplit("/", 1)[-1]
        return (f"file name too long: {path} (a name of {len(name.encode(errors='replace'))} "
                "bytes; filesystems allow 255): shorten the input or output name")
    return None


def run_stage(main: Callable[[], object]) -> None:
    """Call ``main``. A bad parameter (including a ``weights`` path that does not exist) ends
    the process with exit code 2; weights not found by tag, missing inputs, a failed download,
    a refused checkpoint, a full disk, a name too long or too many failed items
    (:class:`StageError`, ``FileNotFoundError``, ``FileExistsError``, ...) with exit code 1;
    each as one line naming what is wrong. Anything else is a bug and keeps its traceback."""
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
    except pickle.UnpicklingError as e:
        log.error("%s", checkpoint_refusal(e))
        sys.exit(EXIT_FAILED)
    except OSError as e:
        line = os_error_line(e)
        if line is None:
            raise
        log.error("%s", line)
        sys.exit(EXIT_FAILED)
