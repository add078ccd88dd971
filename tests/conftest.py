"""Shared test set-up: few torch threads, no network, tiny real models."""

from __future__ import annotations

import os
from collections.abc import Iterator

# No test may reach a model hub; timm and huggingface_hub honour these before they are imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import pytest
import torch

from tests.moto_s3 import CREDENTIALS, moto_s3_server
from tests.postgres import PostgresServer, missing_reason, postgres_server

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL server on loopback for the whole session (tests/postgres.py); skipped where it cannot run."""
    if (reason := missing_reason()) is not None:
        pytest.skip(reason)
    with postgres_server() as server:
        yield server


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 server on loopback (tests/moto_s3.py) for one test module, with fake credentials in the
    environment for boto3 while it runs."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in CREDENTIALS.items():
            patch.setenv(name, value)
        with moto_s3_server() as url:
            yield url
