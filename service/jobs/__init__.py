"""The durable job store behind `POST /tasks` and the training worker.

`store` (`JobStore`: submission, reads, leases, task states) builds on `db` (SQLite schema, rows, transactions),
`uploads` (fsynced upload directories) and `errors` (what the store raises). The public names are re-exported here.
"""

from service.jobs.db import JobRecord, SubmitResult, TaskStatus, make_owner_id
from service.jobs.errors import (
    IdempotencyKeyReused,
    InvalidTransition,
    JobStoreError,
    LabelConflict,
    QueueFull,
    TaskNotFound,
    UploadCorrupt,
)
from service.jobs.store import JobStore, request_fingerprint

__all__ = [
    "IdempotencyKeyReused",
    "InvalidTransition",
    "JobRecord",
    "JobStore",
    "JobStoreError",
    "LabelConflict",
    "QueueFull",
    "SubmitResult",
    "TaskNotFound",
    "TaskStatus",
    "UploadCorrupt",
    "make_owner_id",
    "request_fingerprint",
]
