"""The registry on S3-compatible object storage (AWS S3, MinIO, Ceph RGW): ``CARE_REGISTRY_URL=s3://bucket/prefix``.

Objects: the registry's relative paths under ``<prefix>/``, as in a local directory (``CURRENT``,
``manifests/000007.json``, ``tasks/...``, ``versions/...``, ``trainer/...``), plus files staged by publishes in
progress under ``<prefix>/.staging/<sha256>/<owner tag>-<uuid>``. Every object the registry writes carries the
sha256 of its content in its metadata (``x-amz-meta-sha256``), the same digest its manifest records.

Publishing needs no lock; a conditional write decides between publishers:

1. ``stage``: each new file is written to a local temp file, hashed and uploaded to a staging key (the slow part);
2. ``prepare()`` (see :meth:`registry.backend.StorageBackend.commit_version`): the parent is still current and no
   published file would change;
3. the claim: ``PUT manifests/<version>.json`` with ``If-None-Match: *``. The version is ``parent + 1``, so of two
   publishers of the same parent exactly one creates the key; the other gets 412 and raises PublishConflict;
4. the winner copies its staged files to their final keys (server-side copies; nobody else writes them: a loser
   never gets here);
5. ``CURRENT`` moves last: ``PUT CURRENT`` with ``If-Match: <ETag of CURRENT naming the parent>`` (``If-None-Match:
   *`` for version 1). Readers see a version only once ``CURRENT`` names it.

A claimed manifest fixes the size and sha256 of every file of its version, so anyone can finish a claimed version by
copying the same bytes from staging and moving ``CURRENT`` (roll forward). A publisher that loses a claim does so
before raising PublishConflict: a publisher that dies between its claim and ``CURRENT`` delays the registry until
the next publish attempt, it never wedges it, and the version it claimed is published as it was claimed.

Reads: ``CURRENT`` is read from the store every time (servers poll it). Every other key is immutable once written,
so it is downloaded once into a local cache directory (``local_path`` must be a real file: safetensors are
memory-mapped) and served from there. A download enters the cache only when its sha256 equals the one the registry
recorded in the object's metadata, otherwise CorruptArtifact; ``RegistryReader.verify`` then compares the cached
files with the manifest, as for a local directory.

Conditional writes need a store that honours ``If-None-Match: *`` and ``If-Match`` on PutObject (AWS S3 since
2024, MinIO; check your Ceph RGW release). boto3 is an optional dependency: ``pip install 'care-serve[s3]'``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

try:
    import boto3
    from botocore.config import Config
    from botocore.exceptions import ClientError
except ImportError as exc:  # pragma: no cover - depends on the installation
    raise ImportError(
        "the S3 registry needs boto3: install care-serve with the s3 extra (pip install 'care-serve[s3]')"
    ) from exc

from registry.backend import FileStat, PrepareCommit, StagedFile
from registry.errors import CorruptArtifact, LockTimeout, PublishConflict
from registry.hashing import sha256_file
from registry.manifest import FileRecord, parse_manifest
from registry.owner import owner_tag
from registry.paths import CURRENT_FILE, MANIFEST_DIR, manifest_path, validate_relpath

__all__ = ["S3Backend", "make_client", "parse_s3_url"]

logger = logging.getLogger(__name__)

STAGING_DIR = ".staging"
SHA256_METADATA = "sha256"  # x-amz-meta-sha256: hex sha256 of the object's content
CLAIM_METADATA = "claim"  # x-amz-meta-claim on a manifest: which publish created it
_CHUNK_BYTES = 1 << 20
_RETRY_SLEEP_S = 0.05


def parse_s3_url(url: str) -> tuple[str, str]:
    """Split ``s3://bucket/prefix`` into the bucket and the prefix (without slashes at either end; may be empty).

    Raises:
        ValueError: Not an ``s3://`` URL with a bucket.
    """
    parsed = urlparse(url)
    if parsed.scheme != "s3" or not parsed.netloc or parsed.query or parsed.fragment:
        raise ValueError(f"registry URL {url!r} is not of the form s3://bucket/prefix; give e.g. s3://care/registry")
    return parsed.netloc, parsed.path.strip("/")


@dataclass(frozen=True)
class _Upload:
    key: str
    sha256: str
    size: int


def _status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _not_found(exc: ClientError) -> bool:
    return _status(exc) == 404 or _code(exc) in ("NoSuchKey", "404", "NotFound")


def _precondition_failed(exc: ClientError) -> bool:
    return _status(exc) == 412 or _code(exc) == "PreconditionFailed"


def _write_conflict(exc: ClientError) -> bool:
    # S3 answers 409 ConditionalRequestConflict when another conditional write to the key is in flight: retry.
    return _status(exc) == 409 or _code(exc) == "ConditionalRequestConflict"


def _version_of(data: bytes) -> int | None:
    text = data.decode("ascii", errors="replace").strip()
    return int(text) if text.isdigit() and not text.startswith("0") else None


class S3Backend:
    """A registry stored in an S3 bucket under a prefix, with a local read-through cache of its immutable files.

    Args:
        bucket: The bucket (it must exist).
        prefix: Key prefix of the registry inside the bucket ("" for the bucket's root).
        cache_dir: Local directory of the read-through cache; the files of this registry go under
            ``<cache_dir>/<bucket>/<prefix>``. Several processes of one host may share it.
        client: A boto3 S3 client; when None one is made with ``endpoint_url`` and the usual AWS configuration
            (environment, ``~/.aws``, instance role).
        endpoint_url: The S3 API's URL for MinIO, Ceph RGW and others (path-style addressing); None for AWS.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str,
        *,
        cache_dir: str | os.PathLike[str],
        client: Any = None,
        endpoint_url: str | None = None,
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint_url = endpoint_url
        self.client = client if client is not None else make_client(endpoint_url)
        self.cache_root = Path(cache_dir).resolve() / bucket / (self.prefix or "_root")
        self._temp_dir = self.cache_root / ".tmp"
        self._temp_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._uploads: dict[Path, _Upload] = {}  # staged temp file -> its staging object
        self._claimed: set[str] = set()  # staging keys a claimed version needs until CURRENT names it
        self.downloads = 0  # objects fetched into the cache (GETs of CURRENT excluded)

    @classmethod
    def from_url(
        cls, url: str, *, cache_dir: str | os.PathLike[str], endpoint_url: str | None = None, client: Any = None
    ) -> S3Backend:
        """The backend of ``s3://bucket/prefix``, with the constructor's options."""
        bucket, prefix = parse_s3_url(url)
        return cls(bucket, prefix, cache_dir=cache_dir, client=client, endpoint_url=endpoint_url)

    def __repr__(self) -> str:
        where = f", endpoint {self.endpoint_url!r}" if self.endpoint_url else ""
        return f"S3Backend('s3://{self.bucket}/{self.prefix}'{where})"

    # ---- keys and cache -------------------------------------------------------------------------------------

    def _key(self, relpath: str) -> str:
        return f"{self.prefix}/{relpath}" if self.prefix else relpath

    def _staging_key(self, sha256: str) -> str:
        return self._key(f"{STAGING_DIR}/{sha256}/{owner_tag()}-{uuid.uuid4().hex}")

    def _cache_path(self, relpath: str) -> Path:
        return self.cache_root / validate_relpath(relpath, allow_reserved=True)

    def _fetch(self, relpath: str) -> Path:
        """The cached copy of an immutable object, downloaded and checked against its recorded sha256 if missing.

        Raises:
            FileNotFoundError: No such object.
            CorruptArtifact: The object's content does not match the sha256 recorded when it was written.
        """
        path = self._cache_path(relpath)
        if path.is_file():
            return path
        key = self._key(relpath)
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if _not_found(exc):
                raise FileNotFoundError(f"s3://{self.bucket}/{key}") from exc
            raise
        expected = response.get("Metadata", {}).get(SHA256_METADATA)
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
        digest = hashlib.sha256()
        try:
            with open(temp, "wb") as handle:
                for chunk in response["Body"].iter_chunks(_CHUNK_BYTES):
                    digest.update(chunk)
                    handle.write(chunk)
            actual = digest.hexdigest()
            if expected != actual:
                recorded = f"records sha256 {expected}" if expected else "records no sha256 (not written by care-serve)"
                raise CorruptArtifact(
                    f"{relpath} (s3://{self.bucket}/{key}) has sha256 {actual} but the object {recorded}; the object "
                    "was altered or damaged in the store: restore it from backup or republish the task",
                    relpath=relpath,
                )
            os.replace(temp, path)
        finally:
            temp.unlink(missing_ok=True)
        with self._lock:
            self.downloads += 1
        return path

    def _get_current(self) -> tuple[bytes, str] | None:
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self._key(CURRENT_FILE))
        except ClientError as exc:
            if _not_found(exc):
                return None
            raise
        return response["Body"].read(), str(response["ETag"])

    def _current_version(self) -> int | None:
        current = self._get_current()
        return None if current is None else _version_of(current[0])

    # ---- StorageBackend: reads ------------------------------------------------------------------------------

    def read_bytes(self, relpath: str) -> bytes:
        """Return an object's content (``CURRENT`` from the store, anything else through the cache).

        Raises:
            FileNotFoundError: No such object.
            CorruptArtifact: The object does not match its recorded sha256.
        """
        if validate_relpath(relpath, allow_reserved=True) == CURRENT_FILE:
            current = self._get_current()
            if current is None:
                raise FileNotFoundError(f"s3://{self.bucket}/{self._key(CURRENT_FILE)}")
            return current[0]
        return self._fetch(relpath).read_bytes()

    def stat(self, relpath: str) -> FileStat | None:
        """Size and mtime of the cached copy (fetched if missing), or of ``CURRENT`` in the store; None if absent."""
        if validate_relpath(relpath, allow_reserved=True) == CURRENT_FILE:
            try:
                head = self.client.head_object(Bucket=self.bucket, Key=self._key(CURRENT_FILE))
            except ClientError as exc:
                if _not_found(exc):
                    return None
                raise
            modified: datetime = head["LastModified"]
            return FileStat(size=int(head["ContentLength"]), mtime_ns=int(modified.timestamp() * 1e9))
        try:
            st = os.stat(self._fetch(relpath))
        except FileNotFoundError:
            return None
        return FileStat(size=st.st_size, mtime_ns=st.st_mtime_ns)

    def local_path(self, relpath: str) -> Path:
        """The cached copy of an immutable object, fetched (and checked) if missing; where it would be if absent."""
        if validate_relpath(relpath, allow_reserved=True) == CURRENT_FILE:
            raise ValueError(f"{CURRENT_FILE} changes in place and has no cached copy; read it with read_bytes()")
        with contextlib.suppress(FileNotFoundError):
            return self._fetch(relpath)
        return self._cache_path(relpath)

    def list_dir(self, directory: str) -> list[str]:
        """Relative paths of the published (non-hidden) objects directly inside ``directory``, sorted."""
        prefix = self._key(validate_relpath(directory, allow_reserved=True)) + "/"
        found = []
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix, Delimiter="/"):
            for item in page.get("Contents", []):
                name = str(item["Key"])[len(prefix) :]
                if name and not name.startswith("."):
                    found.append(f"{directory}/{name}")
        return sorted(found)

    # ---- StorageBackend: publishing -------------------------------------------------------------------------

    def stage(self, relpath: str, write: Callable[[Path], object]) -> StagedFile:
        """Have ``write`` fill a local temp file, hash it and upload it to a staging key; return it unpublished.

        Manifests are not uploaded here: :meth:`commit_version` writes the manifest itself, as the claim.
        """
        validate_relpath(relpath, allow_reserved=True)
        temp = self._temp_dir / f".{relpath.rsplit('/', 1)[-1]}.{owner_tag()}.{uuid.uuid4().hex}.tmp"
        try:
            write(temp)
            if not relpath.startswith(f"{MANIFEST_DIR}/"):
                digest = sha256_file(temp)
                key = self._staging_key(digest)
                with open(temp, "rb") as body:
                    self.client.put_object(Bucket=self.bucket, Key=key, Body=body, Metadata={SHA256_METADATA: digest})
                with self._lock:
                    self._uploads[temp] = _Upload(key=key, sha256=digest, size=temp.stat().st_size)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        return StagedFile(relpath=relpath, temp_path=temp)

    def discard(self, staged: StagedFile) -> None:
        """Remove a staged file and its staging object, unless a claimed version still needs the object."""
        staged.temp_path.unlink(missing_ok=True)
        with self._lock:
            upload = self._uploads.pop(staged.temp_path, None)
            keep = upload is not None and upload.key in self._claimed
        if upload is not None and not keep:
            self._delete_quietly(upload.key)

    def _delete_quietly(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=key)
        except ClientError:
            logger.warning("could not delete s3://%s/%s; sweep_staging() removes it later", self.bucket, key)

    def commit_version(self, version: int, *, prepare: PrepareCommit, manifest: StagedFile, timeout_s: float) -> None:
        """Run ``prepare``, claim ``version`` by creating its manifest with ``If-None-Match: *``, copy the staged
        files to their final keys, and move ``CURRENT`` with ``If-Match`` on the parent's ETag.

        Raises:
            PublishConflict: Another publisher claimed ``version`` first (its version is finished first if it was
                left half-done).
            LockTimeout: ``CURRENT`` could not be moved within ``timeout_s`` (the store kept answering conflicts).
        """
        deadline = time.monotonic() + timeout_s
        files = list(prepare())
        with self._lock:
            uploads = [(item, self._uploads[item.temp_path]) for item in files]
        body = manifest.temp_path.read_bytes()
        if not self._claim(manifest.relpath, body, deadline):
            self.finish_claimed(version, timeout_s=max(0.0, deadline - time.monotonic()))
            current = self._current_version()
            raise PublishConflict(
                f"cannot publish version {version}: another publisher claimed it first (the current version is "
                f"{current}); load the latest manifest, rebuild the new version on it and publish again",
                expected=version - 1 if version > 1 else None,
                current=current,
            )
        with self._lock:
            self._claimed.update(upload.key for _, upload in uploads)
        for item, upload in uploads:
            self._copy(upload.key, item.relpath)
        self._keep_as_cached(manifest.temp_path, manifest.relpath)
        for item, _ in uploads:
            self._keep_as_cached(item.temp_path, item.relpath)
        self._advance_current(version, deadline)
        with self._lock:
            for item, upload in uploads:
                self._claimed.discard(upload.key)
                self._uploads.pop(item.temp_path, None)
        for _, upload in uploads:
            self._delete_quietly(upload.key)

    def _claim(self, relpath: str, body: bytes, deadline: float) -> bool:
        """Create the manifest object if it does not exist; whether this call created it."""
        claim = uuid.uuid4().hex
        key = self._key(relpath)
        metadata = {SHA256_METADATA: hashlib.sha256(body).hexdigest(), CLAIM_METADATA: claim}
        while True:
            try:
                self.client.put_object(Bucket=self.bucket, Key=key, Body=body, Metadata=metadata, IfNoneMatch="*")
                return True
            except ClientError as exc:
                if _precondition_failed(exc):
                    return False
                if not _write_conflict(exc):
                    raise
            try:  # 409: did our write land?
                head = self.client.head_object(Bucket=self.bucket, Key=key)
                return bool(head.get("Metadata", {}).get(CLAIM_METADATA) == claim)
            except ClientError as exc:
                if not _not_found(exc):
                    raise
            if time.monotonic() >= deadline:
                raise LockTimeout(f"could not create s3://{self.bucket}/{key}: the store kept answering 409")
            time.sleep(_RETRY_SLEEP_S)

    def _copy(self, source_key: str, relpath: str) -> None:
        self.client.copy_object(
            Bucket=self.bucket,
            Key=self._key(relpath),
            CopySource={"Bucket": self.bucket, "Key": source_key},
            MetadataDirective="COPY",
        )

    def _keep_as_cached(self, temp: Path, relpath: str) -> None:
        # The publisher's own bytes are what it hashed into the manifest: keep them as the cached copy.
        path = self._cache_path(relpath)
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.replace(temp, path)

    def _advance_current(self, version: int, deadline: float) -> None:
        """Point ``CURRENT`` at ``version`` if it names ``version - 1``; done when it already names ``version``."""
        parent = version - 1 if version > 1 else None
        key = self._key(CURRENT_FILE)
        while True:
            current = self._get_current()
            seen = None if current is None else _version_of(current[0])
            if seen == version:
                return  # another publisher finished this version
            if seen != parent:
                raise PublishConflict(
                    f"{CURRENT_FILE} names version {seen} while version {version} was being published on {parent}; "
                    "it was changed by hand or by another tool: check it with `care-serve registry verify`",
                    expected=parent,
                    current=seen,
                )
            condition = {"IfNoneMatch": "*"} if current is None else {"IfMatch": current[1]}
            try:
                self.client.put_object(Bucket=self.bucket, Key=key, Body=f"{version}\n".encode("ascii"), **condition)
                return
            except ClientError as exc:
                if not (_precondition_failed(exc) or _write_conflict(exc)):
                    raise
            if time.monotonic() >= deadline:
                raise LockTimeout(f"could not move s3://{self.bucket}/{key} to version {version} in time")
            time.sleep(_RETRY_SLEEP_S)

    # ---- recovery -------------------------------------------------------------------------------------------

    def finish_claimed(self, version: int, *, timeout_s: float = 60.0) -> bool:
        """Finish ``version`` if its manifest exists but ``CURRENT`` still names its parent (a publisher stopped,
        or is still working, between its claim and ``CURRENT``): copy its files from staging, then move ``CURRENT``.

        Every file's content is fixed by the claimed manifest, so this writes the very bytes the publisher would.

        Returns:
            Whether this call moved ``CURRENT`` (False when there was nothing to finish).

        Raises:
            CorruptArtifact: A file of the claimed version has no staged copy left and is not at its final key.
        """
        deadline = time.monotonic() + timeout_s
        parent = version - 1 if version > 1 else None
        if self._current_version() != parent:
            return False
        try:
            manifest = parse_manifest(self.read_bytes(manifest_path(version)), source=manifest_path(version))
        except FileNotFoundError:
            return False
        needed: dict[str, FileRecord] = dict(manifest.files)
        if manifest.trainer_state is not None:
            state = manifest.trainer_state
            needed[state.path] = FileRecord(size=state.size, sha256=state.sha256)
        if parent is not None:
            previous = parse_manifest(self.read_bytes(manifest_path(parent)), source=manifest_path(parent))
            needed = {path: record for path, record in needed.items() if previous.files.get(path) != record}
        for relpath, record in sorted(needed.items()):
            if self._object_sha256(self._key(relpath)) == record.sha256:
                continue
            source = self._find_staged(record.sha256)
            if source is None:
                if self._current_version() == version:
                    return False  # its publisher finished it meanwhile (and removed its staging objects)
                raise CorruptArtifact(
                    f"version {version} was claimed (its manifest {manifest_path(version)} exists) but its publisher "
                    f"stopped before publishing {relpath}, and no staged copy (sha256 {record.sha256}) is left; "
                    f"with no publisher running, delete {manifest_path(version)} from the bucket and publish again",
                    relpath=relpath,
                )
            self._copy(source, relpath)
        self._advance_current(version, deadline)
        logger.warning("finished version %d, claimed by a publisher that had not moved %s", version, CURRENT_FILE)
        return True

    def _object_sha256(self, key: str) -> str | None:
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if _not_found(exc):
                return None
            raise
        value = head.get("Metadata", {}).get(SHA256_METADATA)
        return None if value is None else str(value)

    def _find_staged(self, sha256: str) -> str | None:
        response = self.client.list_objects_v2(Bucket=self.bucket, Prefix=self._key(f"{STAGING_DIR}/{sha256}/"))
        for item in response.get("Contents", []):
            if self._object_sha256(str(item["Key"])) == sha256:
                return str(item["Key"])
        return None

    def sweep_staging(self, older_than_s: float) -> list[str]:
        """Delete staging objects older than ``older_than_s`` (left by publishers that died before their claim).

        Nothing is deleted while a claimed version is unfinished (a manifest above ``CURRENT``): it may need them.
        Keep ``older_than_s`` well above the longest publish (minutes).

        Returns:
            The deleted keys.
        """
        current = self._current_version() or 0
        claimed = [path for path in self.list_dir(MANIFEST_DIR) if path > manifest_path(current)]
        if claimed:
            logger.warning("not sweeping staged files: %s claimed but not finished", ", ".join(claimed))
            return []
        cutoff = time.time() - older_than_s
        removed = []
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self._key(f"{STAGING_DIR}/")):
            for item in page.get("Contents", []):
                if item["LastModified"].timestamp() < cutoff:
                    self._delete_quietly(str(item["Key"]))
                    removed.append(str(item["Key"]))
        return removed


def make_client(endpoint_url: str | None) -> Any:
    """A boto3 S3 client: standard retries, path-style addressing when ``endpoint_url`` names a non-AWS store."""
    options: dict[str, Any] = {"retries": {"max_attempts": 5, "mode": "standard"}}
    if endpoint_url:
        options["s3"] = {"addressing_style": "path"}  # MinIO and Ceph serve buckets by path
    return boto3.client("s3", endpoint_url=endpoint_url or None, config=Config(**options))
