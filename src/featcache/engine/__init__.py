"""The shared extraction engine: see docs/DEVELOPING.md."""

from featcache.engine.metrics import (
                                      TooManyFailures,
                                      check_failures,
                                      finish_stage,
                                      write_failures,
                                      write_metrics,
)
from featcache.engine.runner import make_batch, run_job
from featcache.engine.scratch import fingerprint_of
from featcache.engine.signatures import file_signature
from featcache.engine.types import Batch, EngineParams, Failure, Job, ModelParams, Piece, RunResult
from featcache.engine.views import VIEWS, get_view
from featcache.engine.writers import WriterOptions

__all__ = ["Batch", "EngineParams", "Failure", "Job", "ModelParams", "Piece", "RunResult",
           "TooManyFailures", "VIEWS", "WriterOptions", "check_failures", "file_signature",
           "finish_stage", "fingerprint_of", "get_view", "make_batch", "run_job",
           "write_failures", "write_metrics"]
