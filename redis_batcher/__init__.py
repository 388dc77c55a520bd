"""redis-batcher: accumulate items into batches inside Redis and hand each batch to a handler.

Quick use::

    import redis_batcher

    batcher = redis_batcher.Batcher("redis://127.0.0.1:6379/0", prefix="rb")

    @batcher.processor(name="events", max_batch_size=100, flush_interval=5.0)
    def send_events(flush: redis_batcher.Flush) -> None:
        ...

    send_events.add("user:42", {"type": "click"})
    redis_batcher.Worker(batcher).run()
"""

from .batcher import Batcher
from .codec import Codec, JsonCodec, MsgpackCodec
from .errors import (
    BatcherError,
    BatchFull,
    BatchNotAccumulating,
    BatchNotFound,
    ConfigError,
    CorruptData,
    DeadLetterNotFound,
    DecodeError,
    DuplicateProcessor,
    EvictionPolicyError,
    InvalidBatchId,
    InvalidJob,
    ItemEncodeError,
    ItemError,
    ItemTooLarge,
    JobExists,
    JobNotFound,
    JobStateError,
    LayoutMismatch,
    LayoutUpgradeRefused,
    NotReplicated,
    NotSentClusterError,
    NotSentConnectionError,
    NotSentError,
    NotSentTimeoutError,
    OutcomeUnknownConnectionError,
    OutcomeUnknownError,
    OutcomeUnknownTimeoutError,
    PartialFailure,
    UnknownIterator,
    UnknownProcessor,
)
from .job_model import IteratorConfig, JobContext, JobStatus, Page
from .jobs import JobIterator
from .models import (
    AddResult,
    BatchInfo,
    BatchStatus,
    DeadLetter,
    DeleteResult,
    Flush,
    FlushRecord,
    FlushResult,
    ProcessorConfig,
)
from .processor import Processor
from .worker import Worker, WorkerStats
from .worker_registry import WorkerInfo

__version__ = "0.1.0"

__all__ = [
    "AddResult",
    "BatchFull",
    "BatchInfo",
    "BatchNotAccumulating",
    "BatchNotFound",
    "BatchStatus",
    "Batcher",
    "BatcherError",
    "Codec",
    "ConfigError",
    "CorruptData",
    "DeadLetter",
    "DeadLetterNotFound",
    "DecodeError",
    "DeleteResult",
    "DuplicateProcessor",
    "EvictionPolicyError",
    "LayoutMismatch",
    "LayoutUpgradeRefused",
    "Flush",
    "FlushRecord",
    "FlushResult",
    "InvalidBatchId",
    "InvalidJob",
    "IteratorConfig",
    "ItemEncodeError",
    "ItemError",
    "ItemTooLarge",
    "JobContext",
    "JobExists",
    "JobIterator",
    "JobNotFound",
    "JobStateError",
    "JobStatus",
    "JsonCodec",
    "MsgpackCodec",
    "NotReplicated",
    "NotSentConnectionError",
    "NotSentClusterError",
    "NotSentError",
    "NotSentTimeoutError",
    "OutcomeUnknownConnectionError",
    "OutcomeUnknownError",
    "OutcomeUnknownTimeoutError",
    "Page",
    "PartialFailure",
    "Processor",
    "ProcessorConfig",
    "UnknownIterator",
    "UnknownProcessor",
    "Worker",
    "WorkerInfo",
    "WorkerStats",
    "__version__",
]
