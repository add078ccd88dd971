"""Reading and checking the request bodies of `POST /tasks` and `POST /predict` (docs/api.md).

Every bad input raises `api_error` by its api.md code with a message that says what to change; nothing here
answers 500 or reads past the limits. The parts, one job each: `body` streams the body with a running byte count
(413 past `max_body_bytes`), `multipart` collects parts with per-part count and size limits as the bytes arrive,
`archives` reads zip and tar uploads without extracting them, `labels` checks labels and names, `spool` keeps task
images in unnamed temporary files, and `limits` holds `UploadLimits`. This module puts them together.

Route recipe for `POST /tasks`: `upload = await read_task_upload(request, limits)`, check the labels against
known classes (409), then `await anyio.to_thread.run_sync(validate_images, upload.images, limits)`
(service.ingest.images): decoding is CPU-bound and must stay off the event loop.
"""

from __future__ import annotations

import logging
import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import anyio.to_thread
from python_multipart.multipart import parse_options_header
from starlette.requests import Request

from service.errors import ApiError, api_error
from service.ingest.archives import read_archive
from service.ingest.body import read_body, spool_body
from service.ingest.labels import MESSAGE_ITEMS, check_labels, is_noncharacter, parse_labels
from service.ingest.limits import MiB, UploadLimits, bad_request, too_large
from service.ingest.multipart import Rule, read_multipart
from service.ingest.spool import Spool, SpooledImages

logger = logging.getLogger(__name__)

__all__ = [
    "MAX_NAME_CHARS",
    "MULTIPART",
    "TAR_TYPES",
    "ZIP_TYPES",
    "TaskUpload",
    "read_predict_images",
    "read_task_upload",
]

MULTIPART = "multipart/form-data"
ZIP_TYPES = ("application/zip", "application/x-zip-compressed", "application/x-zip")
TAR_TYPES = ("application/x-tar", "application/tar", "application/gzip", "application/x-gzip", "application/x-gtar")
MAX_NAME_CHARS = 256  # characters of a task name (the OpenAPI document states it too)


@dataclass(frozen=True)
class TaskUpload:
    """A parsed task upload: images with one label each, not yet decoded (see service.ingest.images.validate_images).

    Attributes:
        images: (file name, raw bytes) pairs in upload order; archive images are named by their member path.
            Usually a `SpooledImages`: each image is read from the spool when it is indexed.
        labels: One label per image, same order.
        classes: The distinct labels in order of first appearance.
        name: The optional task name.
        spools: The temporary files behind `images`; `close` releases them.
    """

    images: Sequence[tuple[str, bytes]]
    labels: list[str]
    classes: list[str]
    name: str | None
    spools: tuple[Spool, ...] = ()

    def close(self) -> None:
        """Release the spooled bytes (the images cannot be read afterwards)."""
        for spool in self.spools:
            spool.close()


def _finish_task(
    images: Sequence[tuple[str, bytes]],
    labels: list[str],
    name: str | None,
    limits: UploadLimits,
    spools: tuple[Spool, ...] = (),
) -> TaskUpload:
    if not images:
        raise bad_request("the upload holds no images; send 'images' file parts with labels, or an archive of folders")
    if len(images) > limits.max_images:
        raise too_large(f"{len(images)} images, the limit is {limits.max_images} per task")
    if len(labels) != len(images):
        message = f"{len(images)} images but {len(labels)} labels; send one label per image, in the same order"
        raise bad_request(message, {"images": len(images), "labels": len(labels)})
    # One spelling per class: "café" precomposed and decomposed must be one label (and clash with each other).
    labels = [unicodedata.normalize("NFC", label) for label in labels]
    check_labels(labels, limits)
    counts = Counter(labels)
    least = limits.min_images_per_class
    if short := [label for label, count in counts.items() if count < least]:
        shown = ", ".join(f"{label!r} has {counts[label]}" for label in short[:MESSAGE_ITEMS])
        raise api_error("too_few_images", min_images_per_class=least, counts=dict(counts), classes=short, shown=shown)
    return TaskUpload(images=images, labels=labels, classes=list(counts), name=name, spools=spools)


def _unsupported(content_type: str, accepted: list[str]) -> ApiError:
    return api_error("unsupported_media_type", content_type=content_type, accepted=accepted)


async def _task_from_multipart(
    request: Request, limits: UploadLimits, spools: list[Spool], spool_dir: Path | None
) -> tuple[Sequence[tuple[str, bytes]], list[str], str | None]:
    label_bytes = max(MiB, limits.max_images * (6 * limits.max_label_length + 4))  # room for an escaped JSON list
    rules = {
        "images": Rule(
            limits.max_images, limits.max_image_bytes, f"a task has at most {limits.max_images} images", "shared"
        ),
        "labels": Rule(
            limits.max_images, label_bytes, f"a task has at most {limits.max_images} images, one label each"
        ),
        "name": Rule(1, 4 * MAX_NAME_CHARS, f"a task name has at most {MAX_NAME_CHARS} characters"),
        "archive": Rule(1, limits.max_body_bytes, "send fewer or smaller images", "own"),
    }
    parts = await read_multipart(request, limits, rules, spools, spool_dir)
    archive = [p for p in parts if p.name == "archive"]
    image_parts = [p for p in parts if p.name == "images"]
    labels = parse_labels([p.text() for p in parts if p.name == "labels"])
    name = next((p.text() for p in parts if p.name == "name"), None) or None
    if name is not None and (
        len(name) > MAX_NAME_CHARS or any(unicodedata.category(c) == "Cc" or is_noncharacter(c) for c in name)
    ):
        message = f"the task name must be at most {MAX_NAME_CHARS} characters, without control or non-characters"
        raise bad_request(message)
    if archive and (image_parts or labels):
        raise bad_request("send an 'archive' part or 'images' and 'labels' parts, not both (archives label by folder)")
    if archive:
        assert archive[0].spool is not None  # the "own" rule
        images, labels = await _spooled_archive(archive[0].spool, limits, spools, spool_dir)
        return images, labels, name
    if not image_parts or image_parts[0].spool is None:
        return [], labels, name
    spooled = SpooledImages(image_parts[0].spool)  # the "shared" rule: every image part is in this one spool
    for i, part in enumerate(image_parts):
        spooled.add_region(part.filename or f"image-{i}", part.offset, part.size)
    return spooled, labels, name


async def _spooled_archive(
    body: Spool, limits: UploadLimits, spools: list[Spool], spool_dir: Path | None
) -> tuple[SpooledImages, list[str]]:
    """Reads the archive in `body` into a new spool (added to `spools`), then releases `body`."""
    images = SpooledImages(Spool(spool_dir))
    spools.append(images.spool)
    try:
        return await anyio.to_thread.run_sync(read_archive, body.file, limits, images)
    finally:
        body.close()


async def read_task_upload(request: Request, limits: UploadLimits, spool_dir: Path | None = None) -> TaskUpload:
    """Reads and checks the body of `POST /tasks` (multipart images+labels, multipart archive, or a raw archive).

    Images are not decoded here; run `service.ingest.images.validate_images` in a worker thread afterwards. Labels
    are not compared with known classes (409 `label_exists` is the caller's check).

    Args:
        request: The incoming request; its body is consumed.
        limits: Upload limits.
        spool_dir: Where the body and the images are spooled (unnamed files); default the system's temp dir.

    Returns:
        The images, one label per image, the classes in order of first appearance, and the optional name; the
        images are spooled: `close()` the upload once it is stored or refused.

    Raises:
        ApiError: 400 `bad_request` (malformed body or archive, label/image count mismatch, empty upload, labels
            JSON not a list of strings), 413 `too_large`, 415 `unsupported_media_type`, 422 `invalid_label` or
            `too_few_images`.
    """
    content_type = parse_options_header(request.headers.get("content-type"))[0].decode("latin-1")
    spools: list[Spool] = []
    try:
        images: Sequence[tuple[str, bytes]]
        if content_type == MULTIPART:
            images, labels, name = await _task_from_multipart(request, limits, spools, spool_dir)
        elif content_type in ZIP_TYPES or content_type in TAR_TYPES:
            body = Spool(spool_dir)
            spools.append(body)
            await spool_body(request, limits.max_body_bytes, body)
            images, labels = await _spooled_archive(body, limits, spools, spool_dir)
            name = None
        else:
            raise _unsupported(content_type, [MULTIPART, *ZIP_TYPES, *TAR_TYPES])
        upload = _finish_task(images, labels, name, limits, tuple(spools))
    except BaseException:
        for spool in spools:
            spool.close()
        raise
    logger.info("task upload read: %d images, %d classes (%s)", len(upload.images), len(upload.classes), content_type)
    return upload


async def read_predict_images(request: Request, limits: UploadLimits) -> list[tuple[str, bytes]]:
    """Reads the images of `POST /predict`: multipart `images` parts, or one raw `image/*` body.

    Args:
        request: The incoming request; its body is consumed.
        limits: Upload limits (`max_predict_images`, `max_image_bytes` and `max_body_bytes` apply).

    Returns:
        (file name, raw bytes) pairs in request order, not decoded (decode them off the loop:
        service.ingest.images.decode_image).

    Raises:
        ApiError: 400 `bad_request` (malformed multipart, no images), 413 `too_large`, 415 `unsupported_media_type`.
    """
    content_type = parse_options_header(request.headers.get("content-type"))[0].decode("latin-1")
    if content_type == MULTIPART:
        hint = f"send at most {limits.max_predict_images} images of at most {limits.max_image_bytes} bytes each"
        parts = await read_multipart(
            request, limits, {"images": Rule(limits.max_predict_images, limits.max_image_bytes, hint)}
        )
        if not parts:
            raise bad_request("no images; send one or more file parts named 'images'")
        return [(p.filename or f"image-{i}", p.data()) for i, p in enumerate(parts)]
    if content_type.startswith("image/"):
        return [("image", await read_body(request, min(limits.max_body_bytes, limits.max_image_bytes)))]
    raise _unsupported(content_type, [MULTIPART, "image/* (one image as the raw body)"])
