"""Parsing and validating the request bodies of `POST /tasks` and `POST /predict` (docs/api.md).

Every bad input becomes an `ApiError` with the api.md code and a message that says what to change; nothing here
answers 500 or reads past the limits. The body is streamed with a running byte count and refused (413) the
moment it passes `max_body_bytes` (or at once when Content-Length says so); multipart parts are collected in
memory with per-part count and size limits checked as the bytes arrive; archives are never extracted to disk as
files, and their declared and actual unpacked sizes are both bounded.

Task uploads are spooled, not held in memory: a raw archive body, a multipart `archive` part and the images
(multipart `images` parts, or the members read out of an archive) go to unnamed temporary files
(`tempfile.SpooledTemporaryFile`, in memory only up to `SPOOL_MEMORY_BYTES`) in the spool directory, and
`TaskUpload.images` reads each image back only when it is asked for. Unnamed files vanish when closed or when the
process dies, so a crash leaves nothing behind; close the upload (`TaskUpload.close`) once it is stored.

Archives hold an ImageFolder tree `<label>/<file>`. One top-level folder wrapping all label folders (what
`zip -r x.zip folder/` produces) is tolerated and dropped. `__MACOSX/` and hidden entries (any path component
starting with ".") are skipped, a leading "./" (from `tar -cf x.tar .`) is dropped and "\\" counts as a
separator. Anything else (top-level files, deeper folders, links, devices, "..", absolute paths) is 400 naming
the entries.

Route recipe for `POST /tasks`: `upload = await read_task_upload(request, limits)`, check the labels against
known classes (409), then `await anyio.to_thread.run_sync(validate_images, upload.images, limits)`
(service.ingest.images): decoding is CPU-bound and must stay off the event loop.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import io
import json
import logging
import lzma
import stat
import struct
import tarfile
import tempfile
import threading
import unicodedata
import zipfile
import zlib
from collections import Counter
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal, Protocol, overload

import anyio.to_thread
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request

from service.errors import ApiError
from service.settings import Settings

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

logger = logging.getLogger(__name__)

__all__ = [
    "MULTIPART",
    "TAR_TYPES",
    "ZIP_TYPES",
    "TaskUpload",
    "UploadLimits",
    "read_predict_images",
    "read_task_upload",
    "upload_limits",
]

_MiB = 1024 * 1024
MULTIPART = "multipart/form-data"
ZIP_TYPES = ("application/zip", "application/x-zip-compressed", "application/x-zip")
TAR_TYPES = ("application/x-tar", "application/tar", "application/gzip", "application/x-gzip", "application/x-gtar")
_MAX_NAME_CHARS = 256
_MESSAGE_ITEMS = 5  # problems spelled out in a message; `details` lists all of them
_CHUNK = _MiB
SPOOL_MEMORY_BYTES = _MiB  # a spool moves to disk beyond this
# Archive readers give up on corrupt or hostile data with any of these; all mean "unreadable archive" (400).
_CORRUPT = (zipfile.BadZipFile, zipfile.LargeZipFile, tarfile.TarError, EOFError, OSError, ValueError, RuntimeError)
_CORRUPT_TOO = (NotImplementedError, zlib.error, lzma.LZMAError, struct.error, IndexError, KeyError)


@dataclass(frozen=True)
class UploadLimits:
    """Bounds on what one request may carry; each breach is answered 413 `too_large` unless noted.

    Attributes:
        max_body_bytes: Request body size; also bounds the bytes unpacked from an archive.
        max_images: Images in one task upload.
        max_image_bytes: Bytes of one image (file part, raw body or archive member).
        max_image_pixels: Width x height of one image, checked from its header (decompression bombs).
        max_label_length: Characters in one label (422 `invalid_label` beyond).
        min_images_per_class: Images each class needs (422 `too_few_images` below).
        max_predict_images: Images in one predict request.
    """

    max_body_bytes: int = 256 * _MiB
    max_images: int = 10_000
    max_image_bytes: int = 20 * _MiB
    max_image_pixels: int = 40_000_000
    max_label_length: int = 64
    min_images_per_class: int = 2
    max_predict_images: int = 64

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"UploadLimits.{name} must be a positive int, got {value!r}")

    @property
    def max_archive_entries(self) -> int:
        """Entries one archive may list, folders and skipped `__MACOSX` twins included (room for ~3 per image)."""
        return 3 * self.max_images + 1024


def upload_limits(settings: Settings) -> UploadLimits:
    """The limits `settings` configure."""
    return UploadLimits(
        max_body_bytes=settings.max_upload_bytes,
        max_images=settings.max_images_per_task,
        max_image_bytes=settings.max_image_bytes,
        max_image_pixels=settings.max_image_pixels,
        max_label_length=settings.max_label_length,
        min_images_per_class=settings.min_images_per_class,
        max_predict_images=settings.max_predict_images,
    )


class _Spool:
    """Bytes of one request in an unnamed temporary file: in memory up to SPOOL_MEMORY_BYTES, then on disk."""

    def __init__(self, directory: Path | None) -> None:
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)
        where = None if directory is None else str(directory)
        self.file: IO[bytes] = tempfile.SpooledTemporaryFile(max_size=SPOOL_MEMORY_BYTES, dir=where)  # noqa: SIM115
        self.size = 0
        self._lock = threading.Lock()  # images are read back from worker threads

    def append(self, data: bytes) -> int:
        """Writes `data` at the end; returns its offset."""
        with self._lock:
            offset = self.size
            self.file.seek(offset)
            self.file.write(data)
            self.size += len(data)
            return offset

    def read(self, offset: int, size: int) -> bytes:
        with self._lock:
            self.file.seek(offset)
            return self.file.read(size)

    def close(self) -> None:
        self.file.close()


class SpooledImages(Sequence[tuple[str, bytes]]):
    """(name, bytes) pairs kept in a spool; each image is read back only when it is indexed."""

    def __init__(self, spool: _Spool) -> None:
        self.spool = spool
        self._entries: list[tuple[str, int, int]] = []

    def add(self, name: str, data: bytes) -> None:
        self._entries.append((name, self.spool.append(data), len(data)))

    def add_region(self, name: str, offset: int, size: int) -> None:
        self._entries.append((name, offset, size))

    def names(self) -> list[str]:
        return [name for name, _, _ in self._entries]

    def __len__(self) -> int:
        return len(self._entries)

    @overload
    def __getitem__(self, index: int) -> tuple[str, bytes]: ...

    @overload
    def __getitem__(self, index: slice) -> list[tuple[str, bytes]]: ...

    def __getitem__(self, index: int | slice) -> tuple[str, bytes] | list[tuple[str, bytes]]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        name, offset, size = self._entries[index]
        return name, self.spool.read(offset, size)


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
    spools: tuple[_Spool, ...] = ()

    def close(self) -> None:
        """Release the spooled bytes (the images cannot be read afterwards)."""
        for spool in self.spools:
            spool.close()


def _bad(message: str, details: dict[str, Any] | None = None) -> ApiError:
    return ApiError(400, "bad_request", message, details)


def _too_large(message: str, details: dict[str, Any] | None = None) -> ApiError:
    return ApiError(413, "too_large", message, details)


# ---------------------------------------------------------------------------------------------------- the body


async def _body_chunks(request: Request, limit: int) -> AsyncGenerator[bytes, None]:
    """Yields the body; 413 early on Content-Length and as soon as the running count passes `limit`."""
    declared = request.headers.get("content-length")
    if declared is not None and not declared.strip().isdigit():
        raise _bad(f"Content-Length {declared!r} is not a byte count")
    hint = "send fewer or smaller images"
    if declared is not None and int(declared) > limit:
        raise _too_large(f"request body of {int(declared)} bytes, the limit is {limit}; {hint}", {"limit": limit})
    total = 0
    try:
        async with contextlib.aclosing(request.stream()) as stream:
            async for chunk in stream:
                total += len(chunk)
                if total > limit:
                    raise _too_large(f"request body over the limit of {limit} bytes; {hint}", {"limit": limit})
                if chunk:
                    yield chunk
    except ClientDisconnect as exc:
        raise _bad("the client disconnected before the request body was complete") from exc


async def _read_body(request: Request, limit: int) -> bytes:
    async with contextlib.aclosing(_body_chunks(request, limit)) as chunks:
        return b"".join([chunk async for chunk in chunks])


async def _spool_body(request: Request, limit: int, spool: _Spool) -> None:
    async with contextlib.aclosing(_body_chunks(request, limit)) as chunks:
        async for chunk in chunks:
            spool.append(chunk)


# ---------------------------------------------------------------------------------------------------- multipart


@dataclass(frozen=True)
class _Rule:
    """How many parts of one name a body may hold, and how big each may be."""

    max_count: int
    max_bytes: int
    hint: str  # what to do when there are too many
    spool: Literal["memory", "shared", "own"] = "memory"  # where the bytes go: a list, one spool for all, its own


@dataclass
class _Part:
    name: str
    filename: str | None
    chunks: list[bytes] = field(default_factory=list)
    size: int = 0
    spool: _Spool | None = None
    offset: int = 0  # where the part starts in its spool

    def write(self, data: bytes) -> None:
        if self.spool is not None:
            self.spool.append(data)
        else:
            self.chunks.append(data)

    def data(self) -> bytes:
        return b"".join(self.chunks) if self.spool is None else self.spool.read(self.offset, self.size)

    def text(self) -> str:
        try:
            return self.data().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _bad(f"form field {self.name!r} is not valid UTF-8 text") from exc


class _PartCollector:
    """python-multipart callbacks that keep parts in memory and enforce the `_Rule`s while the bytes arrive."""

    def __init__(self, rules: dict[str, _Rule], spool_dir: Path | None = None) -> None:
        self.rules = rules
        self.spool_dir = spool_dir
        self.spools: list[_Spool] = []  # every spool the parts went to; the caller closes them
        self.shared: _Spool | None = None
        self.parts: list[_Part] = []
        self.counts: Counter[str] = Counter()
        self.finished = False
        self._headers: dict[bytes, bytes] = {}
        self._field = self._value = b""
        self._part: _Part | None = None

    def on_part_begin(self) -> None:
        self._headers, self._part = {}, None

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def on_header_end(self) -> None:
        self._headers[self._field.lower()] = self._value
        self._field = self._value = b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition"))
        if b"name" not in options:
            raise _bad("a multipart part has no Content-Disposition name; name every part")
        name = options[b"name"].decode("utf-8", "replace")
        rule = self.rules.get(name)
        if rule is None:
            raise _bad(f"unexpected multipart part {name!r}; this endpoint accepts {', '.join(map(repr, self.rules))}")
        self.counts[name] += 1
        if self.counts[name] > rule.max_count and rule.max_count == 1:
            raise _bad(f"more than one {name!r} part; send exactly one")
        if self.counts[name] > rule.max_count:
            raise _too_large(f"more than {rule.max_count} {name!r} parts; {rule.hint}", {"limit": rule.max_count})
        raw = options.get(b"filename")
        filename = None
        if raw is not None:
            decoded = raw.decode("utf-8", "surrogateescape")
            _check_name(decoded, f"the file name of part {name!r} #{self.counts[name]}")
            # Never trust client paths: keep the last component only (names are for messages, never for the disk).
            filename = decoded.replace("\\", "/").rsplit("/", 1)[-1]
        self._part = _Part(name, filename)
        if rule.spool == "own" or (rule.spool == "shared" and self.shared is None):
            self.spools.append(_Spool(self.spool_dir))
            if rule.spool == "shared":
                self.shared = self.spools[-1]
        if rule.spool != "memory":
            self._part.spool = self.shared if rule.spool == "shared" else self.spools[-1]
            self._part.offset = self._part.spool.size if self._part.spool is not None else 0

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        part = self._part
        if part is None:  # data without headers: the parser itself reports that
            return
        rule = self.rules[part.name]
        part.size += end - start
        if part.size > rule.max_bytes:
            which = f"{part.name!r} #{self.counts[part.name]}" + (f" ({part.filename!r})" if part.filename else "")
            details = {"part": part.name, "file": part.filename, "limit": rule.max_bytes}
            raise _too_large(f"part {which} is over the limit of {rule.max_bytes} bytes; send it smaller", details)
        part.write(data[start:end])

    def on_part_end(self) -> None:
        if self._part is not None:
            self.parts.append(self._part)

    def on_end(self) -> None:
        self.finished = True

    def callbacks(self) -> MultipartCallbacks:
        return {
            "on_part_begin": self.on_part_begin,
            "on_part_data": self.on_part_data,
            "on_part_end": self.on_part_end,
            "on_header_field": self.on_header_field,
            "on_header_value": self.on_header_value,
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
            "on_end": self.on_end,
        }


async def _read_multipart(
    request: Request,
    limits: UploadLimits,
    rules: dict[str, _Rule],
    spools: list[_Spool] | None = None,
    spool_dir: Path | None = None,
) -> list[_Part]:
    """The parts of a multipart body; spooled parts go to spools that are appended to `spools` (close them)."""
    _, params = parse_options_header(request.headers.get("content-type"))
    boundary = params.get(b"boundary")
    if not boundary:
        raise _bad("multipart Content-Type without a boundary; let the HTTP client build it (curl -F images=@a.png)")
    collector = _PartCollector(rules, spool_dir)
    if spools is not None:
        collector.spools = spools  # shared with the caller, so that it closes them whatever happens here
    try:
        parser = MultipartParser(boundary, collector.callbacks())
        async with contextlib.aclosing(_body_chunks(request, limits.max_body_bytes)) as chunks:
            async for chunk in chunks:
                parser.write(chunk)
        parser.finalize()
    except FormParserError as exc:
        raise _bad(f"unparseable multipart body ({exc}); send well-formed multipart/form-data") from exc
    if not collector.finished:
        raise _bad("the multipart body ended before its closing boundary; send the complete body")
    return collector.parts


# ---------------------------------------------------------------------------------------------------- archives


class _Readable(Protocol):
    def read(self, size: int = ..., /) -> bytes: ...


class _Budget:
    """Running totals over one archive; each check fails as soon as its bound is crossed."""

    def __init__(self, limits: UploadLimits) -> None:
        self.limits = limits
        self.entries = self.declared = self.read = self.files = 0

    def too_many_entries(self) -> ApiError:
        limit = self.limits.max_archive_entries
        return _too_large(f"the archive has more than {limit} entries; send fewer images", {"limit": limit})

    def unpacks_too_large(self, path: str, verb: str = "unpacks") -> ApiError:
        limit = self.limits.max_body_bytes
        return _too_large(f"the archive {verb} more than {limit} bytes (at {path!r}); send less", {"entry": path})

    def entry(self, path: str, declared_size: int) -> None:
        self.entries += 1
        self.declared += declared_size
        if self.entries > self.limits.max_archive_entries:
            raise self.too_many_entries()
        if self.declared > self.limits.max_body_bytes:  # refused before a single byte is inflated
            raise self.unpacks_too_large(path, "declares")

    def image(self, path: str, declared_size: int) -> None:
        self.files += 1
        if self.files > self.limits.max_images:
            raise _too_large(f"the archive holds more than {self.limits.max_images} images; send fewer per task")
        if declared_size > self.limits.max_image_bytes:
            raise self.image_too_large(path)

    def image_too_large(self, path: str) -> ApiError:
        limit = self.limits.max_image_bytes
        return _too_large(f"archive entry {path!r} is over {limit} bytes per image", {"entry": path, "limit": limit})

    def read_member(self, path: str, member: _Readable) -> bytes:
        """Reads one member, never asking for more than one byte past the per-image bound."""
        chunks: list[bytes] = []
        size = 0
        while chunk := member.read(min(_CHUNK, self.limits.max_image_bytes + 1 - size)):
            size += len(chunk)
            self.read += len(chunk)
            if size > self.limits.max_image_bytes:
                raise self.image_too_large(path)
            if self.read > self.limits.max_body_bytes:
                raise self.unpacks_too_large(path, "unpacks to")
            chunks.append(chunk)
        return b"".join(chunks)


class _BoundedRaw(io.RawIOBase):
    """A decompressed stream that refuses (413) to yield more than `limit` bytes: guards tar.gz/bz2/xz bombs."""

    def __init__(self, inner: _Readable, limit: int) -> None:
        self.inner, self.limit, self.total = inner, limit, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self.inner.read(len(buffer))
        self.total += len(data)
        if self.total > self.limit:
            raise _too_large(f"the compressed archive unpacks to more than {self.limit} bytes; send less")
        buffer[: len(data)] = data
        return len(data)


def _split_path(path: str) -> list[str]:
    """Path components of a member name; "." and empty ones dropped, unsafe names refused (400)."""
    normalized = path.replace("\\", "/")
    parts = [p for p in normalized.split("/") if p not in ("", ".")]
    if normalized.startswith("/") or ".." in parts:
        raise _bad(f"archive entry {path!r} has an absolute or '..' path; use <label>/<file>", {"entries": [path]})
    return parts


def _skipped(parts: list[str]) -> bool:
    return bool(parts) and (parts[0] == "__MACOSX" or any(p.startswith(".") for p in parts))


def _not_a_file(path: str, kind: str) -> ApiError:
    return _bad(f"archive entry {path!r} is a {kind}; only regular files in <label>/ folders", {"entries": [path]})


def _is_noncharacter(char: str) -> bool:
    """U+FDD0..U+FDEF and the last two code points of every plane: reserved, never meant to be exchanged."""
    code = ord(char)
    return 0xFDD0 <= code <= 0xFDEF or code & 0xFFFE == 0xFFFE


def _name_problem(name: str) -> str | None:
    """Why a client-supplied name (archive entry, file name) is refused, or None if it is proper Unicode text."""
    for char in name:
        code = ord(char)
        if 0xDC80 <= code <= 0xDCFF:  # how a byte that is not UTF-8 arrives (tarfile decodes with surrogateescape)
            return f"is not valid UTF-8 (byte 0x{code - 0xDC00:02X})"
        if unicodedata.category(char) == "Cs":
            return f"contains the lone surrogate U+{code:04X}"
        if _is_noncharacter(char):
            return f"contains the Unicode non-character U+{code:04X}"
    return None


def _invalid_name(name: str, problem: str, what: str = "archive entry") -> ApiError:
    shown = ascii(name)  # pure ASCII whatever the name holds: rendering the error can never fail
    return ApiError(
        422,
        "invalid_name",
        f"{what} {shown} {problem}; name files and folders in UTF-8 without non-characters",
        {"entries": [shown[1:-1]], "reason": problem},
    )


def _check_name(name: str, what: str = "archive entry") -> None:
    if (problem := _name_problem(name)) is not None:
        raise _invalid_name(name, problem, what)


def _count(source: IO[bytes], needle: bytes) -> int:
    """Occurrences of `needle` in the whole of `source`, read in chunks."""
    source.seek(0)
    count, tail = 0, b""
    while chunk := source.read(_CHUNK):
        window = tail + chunk
        count += window.count(needle)
        tail = window[-(len(needle) - 1) :]  # too short to hold a whole needle: nothing is counted twice
    source.seek(0)
    return count


def _zip_files(source: IO[bytes], budget: _Budget, sink: SpooledImages) -> list[str]:
    # Every central-directory record starts with this signature, so counting it bounds (from above) how many
    # ZipInfo objects ZipFile would build before we could look at a single one.
    if _count(source, b"PK\x01\x02") > budget.limits.max_archive_entries:
        raise budget.too_many_entries()
    files: list[str] = []
    with zipfile.ZipFile(source) as archive:
        for info in archive.infolist():
            path = info.filename
            budget.entry(path, info.file_size)
            mode = info.external_attr >> 16 if info.create_system == 3 else 0  # Unix mode bits, when recorded
            if stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):
                raise _not_a_file(path, "symbolic link" if stat.S_ISLNK(mode) else "special file")
            parts = _split_path(path)
            if info.is_dir() or _skipped(parts):
                continue
            _check_name(path)
            if info.flag_bits & 0x1:
                raise _bad(f"archive entry {path!r} is encrypted; send an unencrypted zip", {"entries": [path]})
            budget.image(path, info.file_size)
            with archive.open(info) as member:
                sink.add(path, budget.read_member(path, member))
            files.append(path)
    return files


def _tar_files(source: IO[bytes], budget: _Budget, sink: SpooledImages) -> list[str]:
    # Tar framing costs up to ~2 KiB per entry (header, padding, long-name records) on top of the file bytes.
    bound = budget.limits.max_body_bytes + 2048 * budget.limits.max_archive_entries
    files: list[str] = []
    source.seek(0)
    magic = source.read(6)
    source.seek(0)
    with contextlib.ExitStack() as stack:
        raw: _Readable = source
        if magic.startswith(b"\x1f\x8b"):
            raw = stack.enter_context(gzip.GzipFile(fileobj=source, mode="rb"))
        elif magic.startswith(b"BZh"):
            raw = stack.enter_context(bz2.BZ2File(source))
        elif magic.startswith(b"\xfd7zXZ\x00"):
            raw = stack.enter_context(lzma.LZMAFile(source))
        # Stream mode ("r|") reads strictly forward through the bounded stream, so nothing is unpacked twice and
        # skipping an entry costs at most its (already budgeted) declared size.
        archive = stack.enter_context(tarfile.open(fileobj=io.BufferedReader(_BoundedRaw(raw, bound)), mode="r|"))
        for member in archive:
            path = member.name
            budget.entry(path, member.size)
            if not (member.isreg() or member.isdir()):
                kind = "symbolic link" if member.issym() else "hard link" if member.islnk() else "special file"
                raise _not_a_file(path, kind)
            parts = _split_path(path)
            if member.isdir() or _skipped(parts):
                continue
            _check_name(path)
            budget.image(path, member.size)
            reader = archive.extractfile(member)
            if reader is None:  # regular files always have one; None would mean tarfile changed underneath us
                raise _not_a_file(path, "entry without data")
            sink.add(path, budget.read_member(path, reader))
            files.append(path)
    return files


def _read_archive(
    data: bytes | IO[bytes], limits: UploadLimits, sink: SpooledImages | None = None
) -> tuple[SpooledImages, list[str]]:
    """Reads an ImageFolder zip or (optionally compressed) tar into images and labels. CPU-bound.

    The images are copied into `sink` (default: a new spool in the system's temporary directory, closed on error);
    the archive itself is read from `data` (bytes, or a seekable file) without holding it in memory.
    """
    source = io.BytesIO(data) if isinstance(data, bytes) else data
    owned = sink is None
    images = SpooledImages(_Spool(None)) if sink is None else sink
    try:
        return images, _archive_labels(source, limits, images)
    except BaseException:
        if owned:
            images.spool.close()
        raise


def _archive_labels(source: IO[bytes], limits: UploadLimits, sink: SpooledImages) -> list[str]:
    source.seek(0)
    is_zip = source.read(4) in (b"PK\x03\x04", b"PK\x05\x06")  # sniffed: the declared Content-Type only gates entry
    source.seek(0)
    try:
        files = (_zip_files if is_zip else _tar_files)(source, _Budget(limits), sink)
    except ApiError:
        raise
    except UnicodeDecodeError as exc:  # a zip that flags its names as UTF-8 but holds other bytes
        raise _invalid_name(exc.object.decode("utf-8", "surrogateescape"), "is not valid UTF-8") from exc
    except (*_CORRUPT, *_CORRUPT_TOO) as exc:
        kind = "a zip" if is_zip else "a zip or a tar (plain, gzip, bz2 or xz)"
        raise _bad(f"the archive could not be read as {kind} file ({exc}); send a zip or tar of folders") from exc
    split = [(path, _split_path(path)) for path in files]
    if len({parts[0] for _, parts in split}) == 1 and all(len(parts) >= 3 for _, parts in split):
        split = [(path, parts[1:]) for path, parts in split]  # drop the one wrapping folder
    misplaced = [path for path, parts in split if len(parts) != 2]
    if misplaced:
        message = f"archive entries must be <label>/<file>, exactly one folder deep; {len(misplaced)} entries are not"
        raise _bad(f"{message}, e.g. {misplaced[0]!r}", {"entries": misplaced})
    return [parts[0] for _, parts in split]


# ---------------------------------------------------------------------------------------------------- labels


def _label_problem(label: str, max_length: int) -> str | None:
    if not label:
        return "is empty"
    for char in label:
        category = unicodedata.category(char)
        # Cc control, Cs lone surrogate (JSON lets them through), Zl/Zp line breaks, Cf invisible formatting
        # (except the zero-width joiner that emoji sequences need).
        if category == "Cs":  # a lone surrogate: JSON lets "\ud800" through, UTF-8 cannot encode it
            return f"is not valid Unicode text (lone surrogate U+{ord(char):04X})"
        if category in ("Cc", "Zl", "Zp") or (category == "Cf" and char != "\u200d"):
            return f"contains the control or invisible character U+{ord(char):04X}"
        if _is_noncharacter(char):
            return f"contains the Unicode non-character U+{ord(char):04X}"
    if "/" in label or "\\" in label:
        return "contains a path separator ('/' or '\\')"
    if label in (".", ".."):
        return "is '.' or '..'"
    if label != label.strip():
        return "has leading or trailing whitespace; remove it"
    if len(label) > max_length:
        return f"is {len(label)} characters long, the maximum is {max_length}"
    return None


def _check_labels(labels: list[str], limits: UploadLimits) -> None:
    problems = [
        {"label": label if len(label) <= 100 else label[:100] + "…", "reason": reason}
        for label in dict.fromkeys(labels)
        if (reason := _label_problem(label, limits.max_label_length)) is not None
    ]
    if problems:
        shown = "; ".join(f"{p['label']!r} {p['reason']}" for p in problems[:_MESSAGE_ITEMS])
        rule = f"labels are 1 to {limits.max_label_length} characters, without control characters, '/', '\\' or"
        message = f"{len(problems)} invalid label(s): {shown}. Fix them: {rule} surrounding spaces, not '.' or '..'"
        raise ApiError(422, "invalid_label", message, {"labels": problems})


def _parse_labels(values: list[str]) -> list[str]:
    """One label per field, or a single field holding a JSON list (recognised by its leading '[')."""
    if len(values) != 1 or not values[0].lstrip().startswith("["):
        return values
    hint = 'send a JSON list of strings such as ["cat", "dog"], or one labels field per image'
    try:
        parsed = json.loads(values[0])
    except json.JSONDecodeError as exc:
        raise _bad(f"the labels field starts with '[' but is not valid JSON ({exc}); {hint}") from exc
    if not isinstance(parsed, list) or not all(isinstance(item, str) for item in parsed):
        raise _bad(f"the JSON labels field is not a list of strings; {hint}")
    return parsed


def _finish_task(
    images: Sequence[tuple[str, bytes]],
    labels: list[str],
    name: str | None,
    limits: UploadLimits,
    spools: tuple[_Spool, ...] = (),
) -> TaskUpload:
    if not images:
        raise _bad("the upload holds no images; send 'images' file parts with labels, or an archive of folders")
    if len(images) > limits.max_images:
        raise _too_large(f"{len(images)} images, the limit is {limits.max_images} per task")
    if len(labels) != len(images):
        message = f"{len(images)} images but {len(labels)} labels; send one label per image, in the same order"
        raise _bad(message, {"images": len(images), "labels": len(labels)})
    # One spelling per class: "café" precomposed and decomposed must be one label (and clash with each other).
    labels = [unicodedata.normalize("NFC", label) for label in labels]
    _check_labels(labels, limits)
    counts = Counter(labels)
    least = limits.min_images_per_class
    if short := [label for label, count in counts.items() if count < least]:
        shown = ", ".join(f"{label!r} has {counts[label]}" for label in short[:_MESSAGE_ITEMS])
        message = f"every class needs at least {least} images, {len(short)} have fewer: {shown}; add images"
        details = {"min_images_per_class": least, "counts": dict(counts), "classes": short}
        raise ApiError(422, "too_few_images", message, details)
    return TaskUpload(images=images, labels=labels, classes=list(counts), name=name, spools=spools)


# ---------------------------------------------------------------------------------------------------- entry points


def _unsupported(content_type: str, accepted: list[str]) -> ApiError:
    message = f"Content-Type {content_type or '(none)'!r} is not accepted here; send one of: {', '.join(accepted)}"
    return ApiError(415, "unsupported_media_type", message, {"content_type": content_type, "accepted": accepted})


async def _task_from_multipart(
    request: Request, limits: UploadLimits, spools: list[_Spool], spool_dir: Path | None
) -> tuple[Sequence[tuple[str, bytes]], list[str], str | None]:
    label_bytes = max(_MiB, limits.max_images * (6 * limits.max_label_length + 4))  # room for an escaped JSON list
    rules = {
        "images": _Rule(
            limits.max_images, limits.max_image_bytes, f"a task has at most {limits.max_images} images", "shared"
        ),
        "labels": _Rule(
            limits.max_images, label_bytes, f"a task has at most {limits.max_images} images, one label each"
        ),
        "name": _Rule(1, 4 * _MAX_NAME_CHARS, f"a task name has at most {_MAX_NAME_CHARS} characters"),
        "archive": _Rule(1, limits.max_body_bytes, "send fewer or smaller images", "own"),
    }
    parts = await _read_multipart(request, limits, rules, spools, spool_dir)
    archive = [p for p in parts if p.name == "archive"]
    image_parts = [p for p in parts if p.name == "images"]
    labels = _parse_labels([p.text() for p in parts if p.name == "labels"])
    name = next((p.text() for p in parts if p.name == "name"), None) or None
    if name is not None and (
        len(name) > _MAX_NAME_CHARS or any(unicodedata.category(c) == "Cc" or _is_noncharacter(c) for c in name)
    ):
        message = f"the task name must be at most {_MAX_NAME_CHARS} characters, without control or non-characters"
        raise _bad(message)
    if archive and (image_parts or labels):
        raise _bad("send an 'archive' part or 'images' and 'labels' parts, not both (archives label by folder)")
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
    body: _Spool, limits: UploadLimits, spools: list[_Spool], spool_dir: Path | None
) -> tuple[SpooledImages, list[str]]:
    """Reads the archive in `body` into a new spool (added to `spools`), then releases `body`."""
    images = SpooledImages(_Spool(spool_dir))
    spools.append(images.spool)
    try:
        return await anyio.to_thread.run_sync(_read_archive, body.file, limits, images)
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
    spools: list[_Spool] = []
    try:
        images: Sequence[tuple[str, bytes]]
        if content_type == MULTIPART:
            images, labels, name = await _task_from_multipart(request, limits, spools, spool_dir)
        elif content_type in ZIP_TYPES or content_type in TAR_TYPES:
            body = _Spool(spool_dir)
            spools.append(body)
            await _spool_body(request, limits.max_body_bytes, body)
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
        parts = await _read_multipart(
            request, limits, {"images": _Rule(limits.max_predict_images, limits.max_image_bytes, hint)}
        )
        if not parts:
            raise _bad("no images; send one or more file parts named 'images'")
        return [(p.filename or f"image-{i}", p.data()) for i, p in enumerate(parts)]
    if content_type.startswith("image/"):
        return [("image", await _read_body(request, min(limits.max_body_bytes, limits.max_image_bytes)))]
    raise _unsupported(content_type, [MULTIPART, "image/* (one image as the raw body)"])
