"""Fixtures for the registry tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from registry import Registry

# The machine running the suite is shared; one intra-op thread keeps these tiny tensor ops from oversubscribing it.
torch.set_num_threads(1)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "registry"


@pytest.fixture
def reg(root: Path) -> Registry:
    return Registry.from_path(root)
