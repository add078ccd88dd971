"""Settings: `environment()` is how `care-serve serve` hands its settings to the worker process it starts, so the
environment it writes must rebuild exactly the same settings, for the defaults and for every field changed."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import SecretStr

from service.settings import Settings


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No CARE_ variable of the machine running the tests may leak into the settings built here."""
    import os

    for key in list(os.environ):
        if key.startswith("CARE_"):
            monkeypatch.delenv(key)


def from_environment(environment: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Settings as a worker process started with `environment` builds them (from CARE_ variables alone)."""
    for key, value in environment.items():
        monkeypatch.setenv(key, value)
    return Settings()


# A value other than the default for every field (the test below checks that none is left out).
CHANGED: dict[str, object] = {
    "host": "0.0.0.0",
    "port": 9123,
    "data_dir": Path("/srv/care data"),
    "registry_url": "s3://care-models/lineage-a",
    "registry_endpoint_url": "http://127.0.0.1:9000",
    "jobs_url": "postgresql://care@db.internal:5432/care",
    "backbone": "test_vit",
    "backbone_weights": "random",
    "sites": ["0", "1"],
    "image_size": 32,
    "expert_dim": 8,
    "shared_dim": 32,
    "top_routers": 3,
    "top_experts": 2,
    "head": "cosine",
    "method": "moram",
    "moram_rank": 8,
    "moram_top_k": 4,
    "moram_temperature": 0.05,
    "moram_threshold": 0.5,
    "moram_candidates": 64,
    "seta_top_k": 3,
    "seta_gate_scale": 5.0,
    "seta_anchor": 1.5,
    "device": "cpu",
    "pin_memory": False,
    "gpu_decode": True,
    "precision": "bf16",
    "channels_last": True,
    "compile": True,
    "router_cache_bytes": None,  # unbounded: written as an empty variable
    "router_host_cache_bytes": 12345,
    "max_batch_size": 7,
    "max_batch_wait_ms": 2.5,
    "max_queue_images": 99,
    "max_predict_images": 5,
    "serve_threads": 3,
    "poll_interval_s": 0.125,
    "run_worker": False,
    "train_threads": 5,
    "train_epochs": 3,
    "train_batch_size": 4,
    "train_lr": 0.001,
    "align_epochs": 0,
    "covariance": "full",
    "train_seed": 7,
    "train_min_steps": 0,
    "worker_lease_ttl_s": 12.5,
    "worker_poll_s": 0.5,
    "provisional": False,
    "provisional_images_per_class": 0,
    "provisional_threads": 2,
    "max_upload_bytes": 1000,
    "max_images_per_task": 11,
    "max_image_bytes": 2000,
    "max_image_pixels": 3000,
    "min_images_per_class": 3,
    "max_label_length": 12,
    "max_queued_tasks": 4,
    "header_timeout_s": 1.5,
    "body_timeout_s": 2.5,
    "body_min_rate": 0,
    "upload_inflight_bytes": 4096,
    "keep_uploads": True,
    "sweep_interval_s": 0.0,
    "sweep_grace_s": 60.0,
    "admin_token": "s3cret, with a comma",
    "api_key": "k=y",
    "log_level": "DEBUG",
}


def test_the_default_settings_survive_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    original = Settings()
    rebuilt = from_environment(original.environment(), monkeypatch)
    assert rebuilt == original
    assert rebuilt.model_dump() == original.model_dump()


def test_every_changed_field_survives_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert set(CHANGED) == set(Settings.model_fields), "a new setting needs a changed value here"
    original = Settings(**CHANGED)  # type: ignore[arg-type]
    defaults = Settings()
    unchanged = [name for name in CHANGED if getattr(original, name) == getattr(defaults, name)]
    assert not unchanged, f"these values are the defaults, so the round trip would not test them: {unchanged}"
    environment = original.environment()
    assert set(environment) == {f"CARE_{name.upper()}" for name in Settings.model_fields}
    rebuilt = from_environment(environment, monkeypatch)
    assert rebuilt == original
    for name in Settings.model_fields:
        assert getattr(rebuilt, name) == getattr(original, name), name
    assert isinstance(rebuilt.admin_token, SecretStr)
    assert rebuilt.admin_token.get_secret_value() == "s3cret, with a comma"


def test_the_environment_carries_secrets_and_empties_as_the_settings_read_them() -> None:
    settings = Settings(admin_token="t", api_key=None, image_size=None, router_cache_bytes=None, sites=[])
    environment = settings.environment()
    assert environment["CARE_ADMIN_TOKEN"] == "t"  # the value, not pydantic's '**********'
    assert environment["CARE_API_KEY"] == environment["CARE_IMAGE_SIZE"] == ""
    assert environment["CARE_ROUTER_CACHE_BYTES"] == environment["CARE_SITES"] == ""
