"""ImageFolder archives (zip, or tar plain/gzip/bz2/xz) read into spooled images and their labels. CPU-bound.

Archives are never extracted to disk as files, and their declared and actual unpacked sizes are both bounded.
They hold an ImageFolder tree `<label>/<file>`. One top-level folder wrapping all label folders (what
`zip -r x.zip folder/` produces) is tolerated and dropped. `__MACOSX/` and hidden entries (any path component
starting with ".") are skipped, a leading "./" (from `tar -cf x.tar .`) is dropped and "\\" counts as a
separator. Anything else (top-level files, deeper folders, links, devices, "..", absolute paths) is 400 naming
the entries.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import io
import lzma
import stat
import struct
import tarfile
import zipfile
import zlib
from typing import IO, Any, Protocol

from service.errors import ApiError
from service.ingest.labels import check_name, invalid_name
from service.ingest.limits import MiB, UploadLimits, bad_request, too_large
from service.ingest.spool import Spool, SpooledImages

__all__ = ["BoundedRaw", "Budget", "read_archive"]

_CHUNK = MiB
# Archive readers give up on corrupt or hostile data with any of these; all mean "unreadable archive" (400).
_CORRUPT = (zipfile.BadZipFile, zipfile.LargeZipFile, tarfile.TarError, EOFError, OSError, ValueError, RuntimeError)
_CORRUPT_TOO = (NotImplementedError, zlib.error, lzma.LZMAError, struct.error, IndexError, KeyError)


class _Readable(Protocol):
    def read(self, size: int = ..., /) -> bytes: ...


class Budget:
    """Running totals over one archive; each check fails as soon as its bound is crossed."""

    def __init__(self, limits: UploadLimits) -> None:
        self.limits = limits
        self.entries = self.declared = self.read = self.files = 0

    def too_many_entries(self) -> ApiError:
        limit = self.limits.max_archive_entries
        return too_large(f"the archive has more than {limit} entries; send fewer images", {"limit": limit})

    def unpacks_too_large(self, path: str, verb: str = "unpacks") -> ApiError:
        limit = self.limits.max_body_bytes
        return too_large(f"the archive {verb} more than {limit} bytes (at {path!r}); send less", {"entry": path})

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
            raise too_large(f"the archive holds more than {self.limits.max_images} images; send fewer per task")
        if declared_size > self.limits.max_image_bytes:
            raise self.image_too_large(path)

    def image_too_large(self, path: str) -> ApiError:
        limit = self.limits.max_image_bytes
        return too_large(f"archive entry {path!r} is over {limit} bytes per image", {"entry": path, "limit": limit})

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


class BoundedRaw(io.RawIOBase):
    """A decompressed stream that refuses (413) to yield more than `limit` bytes: guards tar.gz/bz2/xz bombs."""

    def __init__(self, inner: _Readable, limit: int) -> None:
        self.inner, self.limit, self.total = inner, limit, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self.inner.read(len(buffer))
        self.total += len(data)
        if self.total > self.limit:
            raise too_large(f"the compressed archive unpacks to more than {self.limit} bytes; send less")
        buffer[: len(data)] = data
        return len(data)


def _split_path(path: str) -> list[str]:
    """Path components of a member name; "." and empty ones dropped, unsafe names refused (400)."""
    normalized = path.replace("\\", "/")
    parts = [p for p in normalized.split("/") if p not in ("", ".")]
    if normalized.startswith("/") or ".." in parts:
        raise bad_request(
            f"archive entry {path!r} has an absolute or '..' path; use <label>/<file>", {"entries": [path]}
        )
    return parts


def _skipped(parts: list[str]) -> bool:
    return bool(parts) and (parts[0] == "__MACOSX" or any(p.startswith(".") for p in parts))


def _not_a_file(path: str, kind: str) -> ApiError:
    return bad_request(
        f"archive entry {path!r} is a {kind}; only regular files in <label>/ folders", {"entries": [path]}
    )


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


def _zip_files(source: IO[bytes], budget: Budget, sink: SpooledImages) -> list[str]:
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
            check_name(path)
            if info.flag_bits & 0x1:
                raise bad_request(f"archive entry {path!r} is encrypted; send an unencrypted zip", {"entries": [path]})
            budget.image(path, info.file_size)
            with archive.open(info) as member:
                sink.add(path, budget.read_member(path, member))
            files.append(path)
    return files


def _tar_files(source: IO[bytes], budget: Budget, sink: SpooledImages) -> list[str]:
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
        archive = stack.enter_context(tarfile.open(fileobj=io.BufferedReader(BoundedRaw(raw, bound)), mode="r|"))
        for member in archive:
            path = member.name
            budget.entry(path, member.size)
            if not (member.isreg() or member.isdir()):
                kind = "symbolic link" if member.issym() else "hard link" if member.islnk() else "special file"
                raise _not_a_file(path, kind)
            parts = _split_path(path)
            if member.isdir() or _skipped(parts):
                continue
            check_name(path)
            budget.image(path, member.size)
            reader = archive.extractfile(member)
            if reader is None:  # regular files always have one; None would mean tarfile changed underneath us
                raise _not_a_file(path, "entry without data")
            sink.add(path, budget.read_member(path, reader))
            files.append(path)
    return files


def read_archive(
    data: bytes | IO[bytes], limits: UploadLimits, sink: SpooledImages | None = None
) -> tuple[SpooledImages, list[str]]:
    """Reads an ImageFolder zip or (optionally compressed) tar into images and labels. CPU-bound.

    The images are copied into `sink` (default: a new spool in the system's temporary directory, closed on error);
    the archive itself is read from `data` (bytes, or a seekable file) without holding it in memory.
    """
    source = io.BytesIO(data) if isinstance(data, bytes) else data
    owned = sink is None
    images = SpooledImages(Spool(None)) if sink is None else sink
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
        files = (_zip_files if is_zip else _tar_files)(source, Budget(limits), sink)
    except ApiError:
        raise
    except UnicodeDecodeError as exc:  # a zip that flags its names as UTF-8 but holds other bytes
        raise invalid_name(exc.object.decode("utf-8", "surrogateescape"), "is not valid UTF-8") from exc
    except (*_CORRUPT, *_CORRUPT_TOO) as exc:
        kind = "a zip" if is_zip else "a zip or a tar (plain, gzip, bz2 or xz)"
        raise bad_request(
            f"the archive could not be read as {kind} file ({exc}); send a zip or tar of folders"
        ) from exc
    split = [(path, _split_path(path)) for path in files]
    if len({parts[0] for _, parts in split}) == 1 and all(len(parts) >= 3 for _, parts in split):
        split = [(path, parts[1:]) for path, parts in split]  # drop the one wrapping folder
    misplaced = [path for path, parts in split if len(parts) != 2]
    if misplaced:
        message = f"archive entries must be <label>/<file>, exactly one folder deep; {len(misplaced)} entries are not"
        raise bad_request(f"{message}, e.g. {misplaced[0]!r}", {"entries": misplaced})
    return [parts[0] for _, parts in split]
