"""Text the client chose: labels (422 `invalid_label`), and the names of files, archive entries and tasks
(422 `invalid_name`): proper Unicode, no control or invisible characters, no paths."""

from __future__ import annotations

import json
import unicodedata

from service.errors import ApiError, api_error
from service.ingest.limits import UploadLimits, bad_request

__all__ = ["MESSAGE_ITEMS", "check_labels", "check_name", "invalid_name", "is_noncharacter", "parse_labels"]

MESSAGE_ITEMS = 5  # problems spelled out in a message; `details` lists all of them


def is_noncharacter(char: str) -> bool:
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
        if is_noncharacter(char):
            return f"contains the Unicode non-character U+{code:04X}"
    return None


def invalid_name(name: str, problem: str, what: str = "archive entry") -> ApiError:
    """422 `invalid_name` for a client-supplied name (service/errors.py shows it in ASCII)."""
    return api_error("invalid_name", name=name, problem=problem, what=what)


def check_name(name: str, what: str = "archive entry") -> None:
    """Refuse (422) a file or archive entry name that is not proper Unicode text."""
    if (problem := _name_problem(name)) is not None:
        raise invalid_name(name, problem, what)


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
        if is_noncharacter(char):
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


def check_labels(labels: list[str], limits: UploadLimits) -> None:
    problems = [
        {"label": label if len(label) <= 100 else label[:100] + "…", "reason": reason}
        for label in dict.fromkeys(labels)
        if (reason := _label_problem(label, limits.max_label_length)) is not None
    ]
    if problems:
        shown = "; ".join(f"{p['label']!r} {p['reason']}" for p in problems[:MESSAGE_ITEMS])
        raise api_error("invalid_label", labels=problems, shown=shown, max_length=limits.max_label_length)


def parse_labels(values: list[str]) -> list[str]:
    """One label per field, or a single field holding a JSON list (recognised by its leading '[')."""
    if len(values) != 1 or not values[0].lstrip().startswith("["):
        return values
    hint = 'send a JSON list of strings such as ["cat", "dog"], or one labels field per image'
    try:
        parsed = json.loads(values[0])
    except json.JSONDecodeError as exc:
        raise bad_request(f"the labels field starts with '[' but is not valid JSON ({exc}); {hint}") from exc
    if not isinstance(parsed, list) or not all(isinstance(item, str) for item in parsed):
        raise bad_request(f"the JSON labels field is not a list of strings; {hint}")
    return parsed
