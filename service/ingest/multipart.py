"""multipart/form-data bodies: parts collected as the bytes arrive, with per-part count and size limits checked on
the way (in memory, or spooled for the parts that hold images)."""

from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

from service.ingest.body import body_chunks
from service.ingest.labels import check_name
from service.ingest.limits import UploadLimits, bad_request, too_large
from service.ingest.spool import Spool

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

__all__ = ["Part", "PartCollector", "Rule", "read_multipart"]


@dataclass(frozen=True)
class Rule:
    """How many parts of one name a body may hold, and how big each may be."""

    max_count: int
    max_bytes: int
    hint: str  # what to do when there are too many
    spool: Literal["memory", "shared", "own"] = "memory"  # where the bytes go: a list, one spool for all, its own


@dataclass
class Part:
    name: str
    filename: str | None
    chunks: list[bytes] = field(default_factory=list)
    size: int = 0
    spool: Spool | None = None
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
            raise bad_request(f"form field {self.name!r} is not valid UTF-8 text") from exc


class PartCollector:
    """python-multipart callbacks that keep parts in memory and enforce the `Rule`s while the bytes arrive."""

    def __init__(self, rules: dict[str, Rule], spool_dir: Path | None = None) -> None:
        self.rules = rules
        self.spool_dir = spool_dir
        self.spools: list[Spool] = []  # every spool the parts went to; the caller closes them
        self.shared: Spool | None = None
        self.parts: list[Part] = []
        self.counts: Counter[str] = Counter()
        self.finished = False
        self._headers: dict[bytes, bytes] = {}
        self._field = self._value = b""
        self._part: Part | None = None

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
            raise bad_request("a multipart part has no Content-Disposition name; name every part")
        name = options[b"name"].decode("utf-8", "replace")
        rule = self.rules.get(name)
        if rule is None:
            raise bad_request(
                f"unexpected multipart part {name!r}; this endpoint accepts {', '.join(map(repr, self.rules))}"
            )
        self.counts[name] += 1
        if self.counts[name] > rule.max_count and rule.max_count == 1:
            raise bad_request(f"more than one {name!r} part; send exactly one")
        if self.counts[name] > rule.max_count:
            raise too_large(f"more than {rule.max_count} {name!r} parts; {rule.hint}", {"limit": rule.max_count})
        raw = options.get(b"filename")
        filename = None
        if raw is not None:
            decoded = raw.decode("utf-8", "surrogateescape")
            check_name(decoded, f"the file name of part {name!r} #{self.counts[name]}")
            # Never trust client paths: keep the last component only (names are for messages, never for the disk).
            filename = decoded.replace("\\", "/").rsplit("/", 1)[-1]
        self._part = Part(name, filename)
        if rule.spool == "own" or (rule.spool == "shared" and self.shared is None):
            self.spools.append(Spool(self.spool_dir))
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
            raise too_large(f"part {which} is over the limit of {rule.max_bytes} bytes; send it smaller", details)
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


async def read_multipart(
    request: Request,
    limits: UploadLimits,
    rules: dict[str, Rule],
    spools: list[Spool] | None = None,
    spool_dir: Path | None = None,
) -> list[Part]:
    """The parts of a multipart body; spooled parts go to spools that are appended to `spools` (close them)."""
    _, params = parse_options_header(request.headers.get("content-type"))
    boundary = params.get(b"boundary")
    if not boundary:
        raise bad_request(
            "multipart Content-Type without a boundary; let the HTTP client build it (curl -F images=@a.png)"
        )
    collector = PartCollector(rules, spool_dir)
    if spools is not None:
        collector.spools = spools  # shared with the caller, so that it closes them whatever happens here
    try:
        parser = MultipartParser(boundary, collector.callbacks())
        async with contextlib.aclosing(body_chunks(request, limits.max_body_bytes)) as chunks:
            async for chunk in chunks:
                parser.write(chunk)
        parser.finalize()
    except FormParserError as exc:
        raise bad_request(f"unparseable multipart body ({exc}); send well-formed multipart/form-data") from exc
    if not collector.finished:
        raise bad_request("the multipart body ended before its closing boundary; send the complete body")
    return collector.parts
