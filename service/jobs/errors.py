"""Exceptions of the job store (see service.jobs, which re-exports them).

Every message says what was wrong and what to do next; structured attributes carry what the HTTP layer needs
(``LabelConflict.labels`` for the 409 details, ``QueueFull.retry_after_s`` for the Retry-After header). An error a
client can cause names its API error code (docs/api.md) in ``code``; service/errors.py's table says how it is
answered. The job store knows nothing of HTTP: a code is only a name.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar


class JobStoreError(Exception):
    """Base class of every error raised by the job store.

    Attributes:
        code: The API error code of the condition (a key of service.errors.ERRORS), or None for an error that is
            not the client's doing (a bug or damage; answered 500).
    """

    code: ClassVar[str | None] = None


class TaskNotFound(JobStoreError):
    """No task has this id.

    Args:
        task_id: The id that was asked for.
    """

    code = "task_not_found"

    def __init__(self, task_id: str) -> None:
        super().__init__(f"no task with id {task_id!r}; GET /tasks lists the known tasks")
        self.task_id = task_id


class LabelConflict(JobStoreError):
    """Some labels of a new task are already used by a queued, training or ready task.

    Args:
        labels: The conflicting labels; stored sorted and without duplicates.
    """

    code = "label_exists"

    def __init__(self, labels: Iterable[str]) -> None:
        self.labels = sorted(set(labels))
        super().__init__(
            f"labels already known or queued: {self.labels}; every class of a new task must be new, so rename "
            "them (labels of failed tasks may be reused)"
        )


class IdempotencyKeyReused(JobStoreError):
    """An idempotency key came back with another request (other images, labels or name) than its first use.

    Args:
        key: The reused key.
        task_id: The task the key's first request created.
    """

    code = "idempotency_key_reused"

    def __init__(self, key: str, task_id: str) -> None:
        super().__init__(
            f"the idempotency key was first used for task {task_id} with a different request; retry with the same "
            "request, or use a new key for a new task"
        )
        self.key = key
        self.task_id = task_id


class QueueFull(JobStoreError):
    """The training queue holds as many tasks as allowed.

    Args:
        pending: Tasks queued or training now.
        max_queued: The configured bound.
        retry_after_s: Estimated seconds until a slot frees up.
    """

    code = "queue_full"

    def __init__(self, pending: int, max_queued: int, retry_after_s: float) -> None:
        super().__init__(
            f"the training queue is full ({pending} of {max_queued} tasks queued or training); retry in about "
            f"{retry_after_s:.0f} s"
        )
        self.pending = pending
        self.max_queued = max_queued
        self.retry_after_s = retry_after_s


class UploadCorrupt(JobStoreError):
    """A stored upload is missing, unreadable or does not match its recorded sha256.

    Args:
        task_id: The task whose upload is damaged.
        file: The file (relative to the task's upload directory) that is wrong.
        reason: What is wrong with it.
    """

    def __init__(self, task_id: str, file: str, reason: str) -> None:
        super().__init__(
            f"upload of task {task_id} is corrupt: {file}: {reason}; the task cannot be trained, mark it failed and "
            "ask the client to submit the images again"
        )
        self.task_id = task_id
        self.file = file


class InvalidTransition(JobStoreError):
    """A state change that the task's current status (or owner) does not allow.

    Args:
        task_id: The task.
        action: What was attempted (e.g. "mark_ready").
        reason: Why it is not allowed now.
    """

    def __init__(self, task_id: str, action: str, reason: str) -> None:
        super().__init__(f"cannot {action} task {task_id}: {reason}")
        self.task_id = task_id
        self.action = action
