"""The public APIs of model/ and registry/: every name their `__all__` lists is there, once."""

from __future__ import annotations

import importlib

import pytest


@pytest.mark.parametrize("package", ["model", "registry"])
def test_every_public_name_resolves(package: str) -> None:
    module = importlib.import_module(package)
    missing = [name for name in module.__all__ if not hasattr(module, name)]
    assert missing == []
    assert len(set(module.__all__)) == len(module.__all__)
