"""Where every benchmark's raw numbers go: one JSON file per bench, the machine description first."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_json(out_dir: Path, name: str, meta: dict[str, object], result: dict[str, Any]) -> Path:
    """Write ``{"meta": meta, **result}`` to ``out_dir/name`` (creating ``out_dir``); returns the path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / name
    path.write_text(json.dumps({"meta": meta, **result}, indent=2))
    return path
