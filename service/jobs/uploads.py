"""Files of task uploads for service.jobs: durable staging, publication by rename, verified reading, removal.

Layout under the uploads directory::

    .staging-<random>/          being written, or left behind by a crash: never a task
    t-<12 hex>/upload.json      labels, classes, and per image its original name, size and sha256
    t-<12 hex>/images/000000.bin ...

Image files are named by position, never by the client's file name, so nothing the client sends becomes a path.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import shutil
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from registry.owner import is_owner_tag, owner_tag, written_by_dead_local_process
from service.jobs.errors import UploadCorrupt

logger = logging.getLogger(__name__)

MANIFEST_NAME = "upload.json"
IMAGES_DIR = "images"
STAGING_PREFIX = ".staging-"
UPLOAD_FORMAT = 1


def fsync_dir(directory: Path) -> None:
    """Make the entries of ``directory`` (created, renamed or removed names) durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durably(path: Path, data: bytes) -> None:
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def stage_upload(
    uploads_dir: Path, images: Sequence[tuple[str, bytes]], labels: Sequence[str], classes: Sequence[str]
) -> Path:
    """Write an upload to a fresh staging directory, fsyncing every file and directory.

    Args:
        uploads_dir: The uploads directory (must exist).
        images: (original file name, raw bytes) per image.
        labels: One label per image.
        classes: The distinct labels in order of first appearance.

    Returns:
        The staging directory; the caller publishes it with ``publish_staged`` or removes it with ``remove_tree``.
    """
    staging = uploads_dir / f"{STAGING_PREFIX}{owner_tag()}-{secrets.token_hex(8)}"
    staging.mkdir()
    try:
        image_dir = staging / IMAGES_DIR
        image_dir.mkdir()
        entries = []
        for i, (original_name, data) in enumerate(images):
            relpath = f"{IMAGES_DIR}/{i:06d}.bin"
            _write_durably(staging / relpath, data)
            entries.append(
                {"file": relpath, "name": original_name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            )
        fsync_dir(image_dir)
        manifest = {"format": UPLOAD_FORMAT, "labels": list(labels), "classes": list(classes), "images": entries}
        # ASCII JSON: names and labels are escaped, so no string (not even a lone surrogate) can fail to encode.
        _write_durably(staging / MANIFEST_NAME, json.dumps(manifest, ensure_ascii=True).encode("ascii"))
        fsync_dir(staging)
    except BaseException:
        remove_tree(staging)
        raise
    return staging


def publish_staged(staging: Path, final: Path) -> None:
    """Rename a complete staging directory to its final name and make the rename durable.

    The caller guarantees that ``final`` does not exist: on POSIX, renaming a directory onto an *empty* directory
    silently replaces it.
    """
    os.rename(staging, final)
    fsync_dir(final.parent)


def read_upload(task_dir: Path, task_id: str) -> tuple[list[bytes], list[str]]:
    """Read an upload back, verifying each image's size and sha256.

    Returns:
        The images in upload order and their labels.

    Raises:
        UploadCorrupt: naming the first file that is missing, unreadable or altered.
    """
    try:
        manifest: dict[str, Any] = json.loads((task_dir / MANIFEST_NAME).read_bytes())
        entries: list[dict[str, Any]] = manifest["images"]
        labels: list[str] = manifest["labels"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UploadCorrupt(task_id, MANIFEST_NAME, f"missing or unreadable ({e})") from e
    if len(labels) != len(entries):
        raise UploadCorrupt(task_id, MANIFEST_NAME, f"{len(labels)} labels for {len(entries)} images")
    images = []
    for entry in entries:
        relpath = str(entry["file"])
        try:
            data = (task_dir / relpath).read_bytes()
        except OSError as e:
            raise UploadCorrupt(task_id, relpath, f"cannot be read ({e})") from e
        if len(data) != entry["size"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise UploadCorrupt(task_id, relpath, "content does not match the sha256 recorded at upload")
        images.append(data)
    return images, labels


def remove_tree(path: Path) -> None:
    """Remove a directory tree; a failure is logged, not raised (a sweep retries later)."""
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        pass
    except OSError:
        logger.warning("could not remove %s; sweep_staging will retry", path, exc_info=True)


def retire(path: Path) -> None:
    """Make a task directory disappear atomically (rename to a staging name), then delete it.

    A crash during the deletion leaves only a staging directory, which ``sweep_staging`` removes, never a
    half-deleted directory under a task's name.
    """
    trash = path.parent / f"{STAGING_PREFIX}{secrets.token_hex(8)}"
    try:
        os.rename(path, trash)
    except FileNotFoundError:
        return
    remove_tree(trash)


def staging_owner(name: str) -> str | None:
    """The owner tag in a staging directory's name (``.staging-<tag>-<hex>``); None for names without one."""
    tag = name.removeprefix(STAGING_PREFIX).rpartition("-")[0]
    return tag if name.startswith(STAGING_PREFIX) and is_owner_tag(tag) else None


def stale_staging_dirs(uploads_dir: Path, older_than_s: float) -> Iterator[Path]:
    """Staging directories whose writer died: at once when it was a process of this host and pid namespace that no
    longer runs (the name says which), otherwise once their last change (own or of their images/ folder) is older
    than ``older_than_s``."""
    now = time.time()  # file times are host wall-clock time, whatever clock the store uses
    for entry in uploads_dir.iterdir():
        if not entry.name.startswith(STAGING_PREFIX):
            continue
        if written_by_dead_local_process(staging_owner(entry.name)):
            yield entry
            continue
        try:
            # A submit in progress adds files to images/ (changing its mtime) long before it touches the top level.
            mtimes = [p.stat().st_mtime for p in (entry, entry / IMAGES_DIR) if p.exists()]
        except OSError:
            continue
        if mtimes and now - max(mtimes) >= older_than_s:
            yield entry
