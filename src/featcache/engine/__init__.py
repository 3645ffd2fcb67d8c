"""The shared extraction engine: see docs/DEVELOPING.md."""

from featcache.engine.metrics import (TooManyFailures, check_failures, finish_stage,
                                      write_failures, write_metrics)
from featcache.engine.runner import CHUNK_ITEMS, make_batch, run_job
from featcache.engine.scratch import file_signature, fingerprint_of
from featcache.engine.types import (Batch, EngineParams, Failure, Job, ModelParams, Piece,
                                    RunResult)
from featcache.engine.writers import WRITERS, WriterOptions, get_writer

__all__ = ["Batch", "CHUNK_ITEMS", "EngineParams", "Failure", "Job", "ModelParams", "Piece",
           "RunResult",
           "TooManyFailures", "WRITERS", "WriterOptions", "check_failures", "file_signature",
           "finish_stage", "fingerprint_of", "get_writer", "make_batch", "run_job",
           "write_failures", "write_metrics"]
