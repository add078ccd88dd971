"""One source per default: the settings' defaults are the model's and the upload limits' own.

`Settings` fields that feed `ModelConfig`, `TrainConfig` or `UploadLimits` must not carry a literal of their own
that could drift: built from default settings, each of them equals the class built with no arguments.
"""

from __future__ import annotations

import os
from dataclasses import fields

import pytest

from model.config import ModelConfig, TrainConfig
from service.ingest.limits import UploadLimits, upload_limits
from service.settings import Settings


@pytest.fixture
def defaults(monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Settings with nothing from the environment: every field at its default."""
    for name in list(os.environ):
        if name.upper().startswith("CARE_"):
            monkeypatch.delenv(name)
    return Settings()


def test_model_defaults_are_model_configs(defaults: Settings) -> None:
    assert defaults.model() == ModelConfig()


def test_training_defaults_are_train_configs(defaults: Settings) -> None:
    assert defaults.training() == TrainConfig()


def test_upload_defaults_are_upload_limits(defaults: Settings) -> None:
    assert upload_limits(defaults) == UploadLimits()


@pytest.mark.parametrize(
    ("setting", "source", "field"),
    [
        ("backbone", ModelConfig, "backbone"),
        ("expert_dim", ModelConfig, "expert_dim"),
        ("shared_dim", ModelConfig, "shared_dim"),
        ("top_routers", ModelConfig, "top_routers"),
        ("top_experts", ModelConfig, "top_experts"),
        ("head", ModelConfig, "head"),
        ("method", ModelConfig, "method"),
        ("moram_rank", ModelConfig, "moram_rank"),
        ("moram_top_k", ModelConfig, "moram_top_k"),
        ("moram_temperature", ModelConfig, "moram_temperature"),
        ("moram_threshold", ModelConfig, "moram_threshold"),
        ("moram_candidates", ModelConfig, "moram_candidates"),
        ("train_epochs", TrainConfig, "epochs"),
        ("train_batch_size", TrainConfig, "batch_size"),
        ("train_lr", TrainConfig, "lr"),
        ("align_epochs", TrainConfig, "align_epochs"),
        ("covariance", TrainConfig, "covariance"),
        ("train_seed", TrainConfig, "seed"),
        ("train_min_steps", TrainConfig, "min_steps"),
        ("max_upload_bytes", UploadLimits, "max_body_bytes"),
        ("max_images_per_task", UploadLimits, "max_images"),
        ("max_image_bytes", UploadLimits, "max_image_bytes"),
        ("max_image_pixels", UploadLimits, "max_image_pixels"),
        ("max_label_length", UploadLimits, "max_label_length"),
        ("min_images_per_class", UploadLimits, "min_images_per_class"),
        ("max_predict_images", UploadLimits, "max_predict_images"),
    ],
)
def test_each_mapped_default_is_written_once(setting: str, source: type, field: str) -> None:
    """Field by field, so a failure names the setting that drifted."""
    default = {f.name: f.default for f in fields(source)}[field]
    assert Settings.model_fields[setting].default == default
