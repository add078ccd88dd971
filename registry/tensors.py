"""Reading and writing safetensors files: private copies on write, lazy memory-mapped reads."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import NamedTuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from registry.errors import TensorNotFound

__all__ = [
    "KeySelection",
    "TensorFile",
    "private_cpu_copy",
    "read_header_metadata",
    "read_tensors",
    "write_tensor_file",
]

KeySelection = str | Iterable[str] | None
"""None: every tensor; a str: every tensor whose key starts with it; an iterable: exactly those keys."""

_NO_METADATA: Mapping[str, str] = MappingProxyType({})


class TensorFile(NamedTuple):
    """The content of one safetensors file: named tensors and the string metadata of its header."""

    tensors: Mapping[str, torch.Tensor]
    metadata: Mapping[str, str] = _NO_METADATA


def private_cpu_copy(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copy tensors to fresh, contiguous CPU memory that nobody else references.

    ``safetensors.torch.save_file`` warns that a caller mutating tensors during a save may corrupt the file; saving
    a private copy makes the file reflect the tensors as they were when the copy was taken.

    Raises:
        ValueError: A key is not a non-empty string or a value is not a dense tensor.
    """
    copies: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"tensor names must be non-empty strings, got {key!r}")
        if not isinstance(tensor, torch.Tensor) or tensor.layout != torch.strided:
            raise ValueError(f"tensor {key!r} must be a dense torch.Tensor, got {type(tensor).__name__}")
        copies[key] = tensor.detach().to(device="cpu", copy=True, memory_format=torch.contiguous_format)
    return copies


def _check_metadata(metadata: Mapping[str, str]) -> dict[str, str]:
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise ValueError(f"safetensors metadata must map str to str, got {key!r}: {type(value).__name__}")
    return dict(metadata)


def write_tensor_file(path: Path, content: TensorFile) -> None:
    """Write ``content`` to ``path`` (a temporary file; publishing renames it) from a private CPU copy."""
    metadata = _check_metadata(content.metadata)
    save_file(private_cpu_copy(content.tensors), str(path), metadata=metadata or None)


def _select(available: list[str], keys: KeySelection, source: str) -> list[str]:
    if keys is None:
        return available
    if isinstance(keys, str):
        return [key for key in available if key.startswith(keys)]
    wanted = list(keys)
    present = set(available)
    missing = [key for key in wanted if key not in present]
    if missing:
        raise TensorNotFound(
            f"{source} has no tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''} "
            f"(it has {len(available)}, e.g. {available[:5]}); ask for keys the file was published with"
        )
    return wanted


def read_tensors(path: Path, keys: KeySelection, *, device: str, source: str) -> dict[str, torch.Tensor]:
    """Read the selected tensors of a safetensors file through a memory map.

    Args:
        path: The local file.
        keys: Which tensors (see :data:`KeySelection`).
        device: Where to put them (``"cpu"``, ``"cuda:0"``...).
        source: The file's registry-relative path, for messages.

    Raises:
        TensorNotFound: An exact key is missing.
        safetensors.SafetensorError, OSError: The file cannot be read as safetensors.
    """
    with safe_open(str(path), framework="pt", device=device) as handle:
        selected = _select(list(handle.keys()), keys, source)
        return {key: handle.get_tensor(key) for key in selected}


def read_header_metadata(path: Path) -> dict[str, str]:
    """Return the string metadata of a safetensors header (empty when there is none)."""
    with safe_open(str(path), framework="pt", device="cpu") as handle:
        metadata = handle.metadata()
    return dict(metadata) if metadata else {}
