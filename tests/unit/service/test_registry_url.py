"""CARE_REGISTRY_URL picks the registry's storage: the local directory by default, S3 when it names a bucket."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from registry import LocalDirectoryBackend
from service.modelstore import open_registry
from service.settings import Settings


def test_unset_or_empty_is_the_local_directory(tmp_path: Path) -> None:
    for settings in (Settings(data_dir=tmp_path), Settings(data_dir=tmp_path, registry_url="")):
        assert settings.registry_url is None
        backend = open_registry(settings).backend
        assert isinstance(backend, LocalDirectoryBackend) and backend.root == (tmp_path / "registry").resolve()


@pytest.mark.parametrize("url", ["http://bucket/prefix", "s3://", "s3://Bad_Bucket/x", "s3://bucket/a b", "bucket"])
def test_anything_but_an_s3_url_is_refused(url: str) -> None:
    with pytest.raises(ValidationError, match="s3://bucket/prefix"):
        Settings(registry_url=url)


def test_an_s3_url_opens_the_s3_backend_with_a_cache_in_the_data_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("boto3")
    from registry.s3 import S3Backend

    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    settings = Settings(
        data_dir=tmp_path, registry_url="s3://care-models/a/b", registry_endpoint_url="http://minio:9000"
    )
    backend = open_registry(settings).backend  # no request is sent before the first read
    assert isinstance(backend, S3Backend)
    assert (backend.bucket, backend.prefix, backend.endpoint_url) == ("care-models", "a/b", "http://minio:9000")
    assert backend.cache_root == (tmp_path / "registry-cache" / "care-models" / "a/b").resolve()
    assert not (tmp_path / "registry").exists()
