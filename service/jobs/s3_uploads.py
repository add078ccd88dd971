"""Task uploads in the registry's bucket, for workers on other hosts: ``s3://bucket/<prefix>/uploads/<task_id>/…``.

The objects are the files of the task's upload directory (uploads.py) under the same relative paths
(``images/000000.bin`` …, then ``upload.json`` last), each with the sha256 of its content in its metadata
(``x-amz-meta-sha256``, as the registry's objects). The registry itself never lists ``uploads/``. The client is
made as the registry's (``registry.s3.make_client``): the same credentials, endpoint and retries.
"""

from __future__ import annotations

import hashlib
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from registry.s3 import SHA256_METADATA, make_client, parse_s3_url
from service.jobs.errors import UploadCorrupt
from service.jobs.shared_uploads import UploadStore
from service.jobs.uploads import IMAGES_DIR, MANIFEST_NAME

__all__ = ["UPLOADS_PREFIX", "S3Uploads"]

logger = logging.getLogger(__name__)

UPLOADS_PREFIX = "uploads"
_DELETE_BATCH = 1000  # DeleteObjects takes at most this many keys
_CONCURRENCY = 16  # requests in flight for one upload's files (a task may have 10,000 images; boto3 is thread-safe)


class S3Uploads(UploadStore):
    """Uploads stored under ``<prefix>/uploads/`` in a bucket.

    Args:
        client: A boto3 S3 client.
        bucket: The bucket (it must exist).
        prefix: The registry's key prefix ("" for the bucket's root); uploads go under ``<prefix>/uploads/``.
    """

    shared = True

    def __init__(self, client: Any, bucket: str, prefix: str) -> None:
        self.client = client
        self.bucket = bucket
        prefix = prefix.strip("/")
        self.root = f"{prefix}/{UPLOADS_PREFIX}/" if prefix else f"{UPLOADS_PREFIX}/"

    @classmethod
    def from_url(cls, url: str, *, endpoint_url: str | None = None, client: Any = None) -> S3Uploads:
        """The uploads of the registry ``s3://bucket/prefix``."""
        bucket, prefix = parse_s3_url(url)
        return cls(client if client is not None else make_client(endpoint_url), bucket, prefix)

    def __repr__(self) -> str:
        return f"S3Uploads('s3://{self.bucket}/{self.root}')"

    def _keys(self, task_id: str) -> list[tuple[str, Any]]:
        """(key, LastModified) of every object of ``task_id``."""
        found = []
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=f"{self.root}{task_id}/"):
            found += [(str(item["Key"]), item["LastModified"]) for item in page.get("Contents", [])]
        return found

    def _put_file(self, task_id: str, task_dir: Path, path: Path) -> None:
        data = path.read_bytes()
        self.client.put_object(
            Bucket=self.bucket,
            Key=f"{self.root}{task_id}/{path.relative_to(task_dir).as_posix()}",
            Body=data,
            Metadata={SHA256_METADATA: hashlib.sha256(data).hexdigest()},
        )

    def put(self, task_id: str, task_dir: Path) -> None:
        images = sorted((task_dir / IMAGES_DIR).iterdir())
        with ThreadPoolExecutor(min(_CONCURRENCY, max(1, len(images))), thread_name_prefix="care-upload") as pool:
            for done in [pool.submit(self._put_file, task_id, task_dir, path) for path in images]:
                done.result()  # the first failure is raised (after the others ended)
        self._put_file(task_id, task_dir, task_dir / MANIFEST_NAME)  # last: it marks the upload complete

    def fetch(self, task_id: str, destination: Path) -> bool:
        prefix = f"{self.root}{task_id}/"
        keys = [key for key, _ in self._keys(task_id)]
        if f"{prefix}{MANIFEST_NAME}" not in keys:
            return False
        relpaths = [key[len(prefix) :] for key in keys]
        # Nothing but the files an upload has becomes a path.
        wanted = [
            r
            for r in relpaths
            if r == MANIFEST_NAME
            or (r.startswith(f"{IMAGES_DIR}/") and r.count("/") == 1 and r.rpartition("/")[2] not in ("", ".", ".."))
        ]
        (destination / IMAGES_DIR).mkdir(exist_ok=True)
        with ThreadPoolExecutor(min(_CONCURRENCY, len(wanted)), thread_name_prefix="care-upload") as pool:
            for done in [pool.submit(self._get_file, task_id, prefix, relpath, destination) for relpath in wanted]:
                done.result()
        logger.info("upload of %s fetched from s3://%s/%s (%d files)", task_id, self.bucket, prefix, len(keys))
        return True

    def _get_file(self, task_id: str, prefix: str, relpath: str, destination: Path) -> None:
        key = f"{prefix}{relpath}"
        response = self.client.get_object(Bucket=self.bucket, Key=key)
        data = response["Body"].read()
        recorded = response.get("Metadata", {}).get(SHA256_METADATA)
        if recorded != hashlib.sha256(data).hexdigest():
            raise UploadCorrupt(task_id, relpath, f"s3://{self.bucket}/{key} does not match its recorded sha256")
        with open(destination / relpath, "xb") as f:
            f.write(data)

    def delete(self, task_id: str) -> None:
        keys = [key for key, _ in self._keys(task_id)]
        for start in range(0, len(keys), _DELETE_BATCH):
            batch = [{"Key": key} for key in keys[start : start + _DELETE_BATCH]]
            response = self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
            if errors := response.get("Errors"):
                raise OSError(f"could not delete {len(errors)} object(s) of {task_id}'s upload: {errors[:3]}")

    def stored(self) -> dict[str, float]:
        newest: dict[str, float] = {}
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self.root):
            for item in page.get("Contents", []):
                task_id = str(item["Key"])[len(self.root) :].partition("/")[0]
                mtime = float(item["LastModified"].timestamp())
                newest[task_id] = max(mtime, newest.get(task_id, mtime))
        return newest
