"""Where the uploads of queued tasks are kept for workers on other hosts: nowhere but this host's directory, or an
object store.

The uploads directory (uploads.py) is always written: a submit stages and publishes the upload there as before.
An ``UploadStore`` is the copy beyond it:

* ``LocalUploads`` (the default): none. The uploads directory is the only copy, so the servers that accept uploads
  and the worker must share it (one host, or a shared filesystem). Every method does nothing: with it the job store
  behaves exactly as it did without this module.
* ``S3Uploads`` (s3_uploads.py; ``store.open_upload_store`` picks it when the registry is on S3,
  ``CARE_REGISTRY_URL``): the files of each upload are also put to ``s3://bucket/<prefix>/uploads/<task_id>/…``
  before the task's row is committed, and a worker whose uploads directory lacks a task's files downloads them from
  there. They are deleted from the bucket when the task's local upload is (ready, ``delete_upload``), and the sweep
  removes objects of tasks that have no row.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar

__all__ = ["LocalUploads", "UploadStore"]


class UploadStore(ABC):
    """The copy of task uploads that workers on other hosts read (see the module docstring).

    Attributes:
        shared: Whether this store holds copies at all (False: the uploads directory is the only one).
    """

    shared: ClassVar[bool]

    @abstractmethod
    def put(self, task_id: str, task_dir: Path) -> None:
        """Store durably the files of a complete upload directory as the upload of ``task_id``.

        The manifest (``upload.json``) is stored last: an upload without it is incomplete, never read.
        """

    @abstractmethod
    def fetch(self, task_id: str, destination: Path) -> bool:
        """Write the stored files of ``task_id`` into the empty directory ``destination``; False if none are stored.

        Raises:
            UploadCorrupt: A stored file does not match the sha256 recorded when it was stored.
        """

    @abstractmethod
    def delete(self, task_id: str) -> None:
        """Delete the stored upload of ``task_id`` (nothing if there is none)."""

    @abstractmethod
    def stored(self) -> dict[str, float]:
        """The task ids with stored files, each with the time (seconds since the epoch) of its newest file."""


class LocalUploads(UploadStore):
    """No copy beyond the uploads directory (the default): every method does nothing."""

    shared = False

    def put(self, task_id: str, task_dir: Path) -> None:
        pass

    def fetch(self, task_id: str, destination: Path) -> bool:  # noqa: ARG002 - nothing is ever stored
        return False

    def delete(self, task_id: str) -> None:
        pass

    def stored(self) -> dict[str, float]:
        return {}

    def __repr__(self) -> str:
        return "LocalUploads()"
