"""One settings object for the server and the worker: `CARE_…` environment variables, CLI flags win.

Defaults are the embedded ones: the bundled EfficientNet-Lite0, everything under ./care-data, 127.0.0.1:8000.
Only `service/` reads settings; it turns them into constructor arguments for `model/` and `registry/`.

One source per default: a field that feeds `ModelConfig` or `TrainConfig` defaults to that class's own default
(model/config.py), and `UploadLimits` (service/ingest/limits.py) takes its defaults from the upload fields here.
tests/unit/service/test_defaults.py fails if the two sides ever differ.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Literal

import torch
from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from model.backbone import WEIGHTS_BUNDLED, WEIGHTS_HUB, bundled_weights_available
from model.config import CovarianceMode, HeadKind, MethodKind, ModelConfig, TrainConfig

MIB = 1 << 20


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class Settings(BaseSettings):
    """Every knob of care-serve. Environment variable = `CARE_` + the upper-case field name."""

    model_config = SettingsConfigDict(env_prefix="CARE_", extra="forbid", validate_default=True)

    # Network and storage
    host: str = Field("127.0.0.1", description="Address the HTTP server binds to.")
    port: int = Field(8000, ge=0, le=65535, description="HTTP port (0 picks a free one).")
    data_dir: Path = Field(Path("./care-data"), description="Registry, job database and uploads live here.")
    registry_url: str | None = Field(
        None,
        description="s3://bucket/prefix: the registry on S3-compatible object storage (the s3 extra), with a local "
        "read-through cache in <data_dir>/registry-cache; empty = the directory <data_dir>/registry.",
    )
    registry_endpoint_url: str | None = Field(
        None, description="URL of the S3 API for MinIO, Ceph RGW and others; empty = AWS (or AWS_ENDPOINT_URL_S3)."
    )
    jobs_url: str | None = Field(
        None,
        description="postgresql://user@host:port/dbname: the job store on PostgreSQL (the postgres extra), for "
        "servers and workers on several hosts; empty = the SQLite file <data_dir>/jobs.sqlite3.",
    )

    # Model config (shape-defining: a registry is tied to these; `model()` builds the `ModelConfig`)
    backbone: str = Field(ModelConfig.backbone, description="timm model name.")
    backbone_weights: str = Field(
        "",
        description="'bundled' (efficientnet_lite0 only), 'hub', 'random', or a local .safetensors/.pth/.bin file. "
        "Empty: bundled when available, else hub.",
    )
    sites: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="BR-MoE sites; empty = the backbone's default."
    )
    image_size: int | None = Field(None, description="Input resolution; empty = the backbone's pretrained one.")
    expert_dim: int = Field(ModelConfig.expert_dim, ge=1)
    shared_dim: int = Field(ModelConfig.shared_dim, ge=1)
    top_routers: int = Field(ModelConfig.top_routers, ge=1, description="M: routers selected per site.")
    top_experts: int = Field(ModelConfig.top_experts, ge=1, description="K: experts per selected router.")
    head: HeadKind = Field(
        ModelConfig.head,
        description="The served head: 'analytic' (closed-form LDA, the default) or 'cosine' (CaRE's, aligned).",
    )
    method: MethodKind = Field(
        ModelConfig.method,
        description="How tasks adapt the backbone: 'care' (BR-MoE, the default), 'moram' (rank-one atoms, no "
        "routers) or 'seta' (anchored shared experts and gated unique experts, inferred from SETA's abstract).",
    )
    moram_rank: int = Field(ModelConfig.moram_rank, ge=1, description="MoRAM: rank-one atoms per task and site.")
    moram_top_k: int = Field(ModelConfig.moram_top_k, ge=1, description="MoRAM: atoms each token activates.")
    moram_temperature: float = Field(ModelConfig.moram_temperature, gt=0, description="MoRAM: softmax temperature.")
    moram_threshold: float = Field(ModelConfig.moram_threshold, ge=0, description="MoRAM: evaluation score threshold.")
    moram_candidates: int = Field(
        ModelConfig.moram_candidates,
        ge=0,
        description="MoRAM: 0 = every token scores every atom (published); n = atoms preselected per sample (bounded).",
    )
    seta_top_k: int = Field(ModelConfig.seta_top_k, ge=1, description="SETA: unique experts each sample's gate mixes.")
    seta_gate_scale: float = Field(ModelConfig.seta_gate_scale, gt=0, description="SETA: scale of the gate's cosines.")
    seta_anchor: float = Field(
        ModelConfig.seta_anchor, ge=0, description="SETA: stiffness of the elastic anchor on the shared experts."
    )
    device: Literal["cpu", "cuda", "auto"] = Field("auto", description="Where the model runs.")
    # The GPU path (service/inference/acceleration.py): each switch measured alone before it becomes a default.
    pin_memory: bool = Field(True, description="CUDA only: batches go to the GPU from pinned host memory.")
    gpu_decode: bool = Field(False, description="CUDA only: JPEG files are decoded and resized on the GPU (nvjpeg).")
    precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="'bf16': the backbone and experts under bfloat16 autocast; the head stays float32."
    )
    channels_last: bool = Field(False, description="Channels-last weights and inputs (convolutional backbones).")
    compile: bool = Field(
        False, description="torch.compile the backbone's trunk below the first site (slower start-up, faster batches)."
    )

    # Router cache
    router_cache_bytes: int | None = Field(
        256 * MIB, ge=1, description="Cap of the device tier of the router cache in bytes; empty = unbounded."
    )
    router_host_cache_bytes: int = Field(0, ge=0, description="Cap of the host tier (0 = no host tier).")

    # Serving
    max_batch_size: int = Field(16, ge=1, description="Largest micro-batch of images.")
    max_batch_wait_ms: float = Field(5.0, ge=0, description="How long a batch waits to fill up.")
    max_queue_images: int = Field(256, ge=1, description="Images waiting for inference before 429 overloaded.")
    max_predict_images: int = Field(64, ge=1, description="Images in one /predict request.")
    serve_threads: int = Field(default_factory=lambda: max(1, _cpus() // 2), ge=1, description="Torch threads.")
    poll_interval_s: float = Field(
        0.25, gt=0, description="How often servers look for new registry versions (a read of one small file)."
    )

    # Learning
    run_worker: bool = Field(True, description="`care-serve serve` starts (and restarts) a training worker.")
    train_threads: int = Field(default_factory=lambda: max(1, _cpus() - max(1, _cpus() // 2)), ge=1)
    train_epochs: int = Field(TrainConfig.epochs, ge=1)
    train_batch_size: int = Field(TrainConfig.batch_size, ge=1)
    train_lr: float = Field(TrainConfig.lr, gt=0)
    align_epochs: int = Field(TrainConfig.align_epochs, ge=0)
    covariance: CovarianceMode = Field(TrainConfig.covariance, description="Class statistics: 'diagonal' or 'full'.")
    train_seed: int = TrainConfig.seed
    train_min_steps: int = Field(TrainConfig.min_steps, ge=0, description="Fewest optimiser steps a task trains.")
    worker_lease_ttl_s: float = Field(30.0, gt=0, description="A dead worker's lease expires after this.")
    worker_poll_s: float = Field(0.25, gt=0, description="How often an idle worker looks for queued tasks.")
    provisional: bool = Field(
        True,
        description="Serve a queued task's classes from a provisional version (closed-form head) before training.",
    )
    provisional_images_per_class: int = Field(
        32,
        ge=0,
        description="Images of each class a provisional version is computed from (0: all); training uses all.",
    )
    provisional_threads: int = Field(
        0,
        ge=0,
        description="Torch threads of the worker while it makes a task provisional (0: every CPU it may use).",
    )

    # Uploads
    max_upload_bytes: int = Field(256 * MIB, ge=1)
    max_images_per_task: int = Field(10_000, ge=1)
    max_image_bytes: int = Field(20 * MIB, ge=1)
    max_image_pixels: int = Field(40_000_000, ge=1)
    min_images_per_class: int = Field(2, ge=1)
    max_label_length: int = Field(64, ge=1)
    max_queued_tasks: int = Field(100, ge=1)

    # Slow and concurrent requests (service/ingest/guard.py)
    header_timeout_s: float = Field(
        10.0, gt=0, description="Request line and headers must arrive within this; else 408 and the connection closes."
    )
    body_timeout_s: float = Field(30.0, gt=0, description="Longest pause in a request body before 408.")
    body_min_rate: int = Field(
        16384, ge=0, description="Bytes/s a request body must average once body_timeout_s has passed (0 = no minimum)."
    )
    upload_inflight_bytes: int = Field(
        1024 * MIB, ge=1, description="Request-body bytes in flight across all requests; beyond it 429 uploads_busy."
    )

    # Housekeeping (service/housekeeping.py)
    keep_uploads: bool = Field(False, description="Keep a task's upload once it is ready (default: delete it).")
    sweep_interval_s: float = Field(
        300.0, ge=0, description="How often the server sweeps crash leftovers and ready uploads; 0 = at start-up only."
    )
    sweep_grace_s: float = Field(
        900.0, ge=0, description="Staging directories and registry temp files younger than this are never swept."
    )

    # Auth (off when empty)
    admin_token: SecretStr | None = Field(None, description="Bearer token required by /tasks.")
    api_key: SecretStr | None = Field(None, description="Key required by /predict (X-API-Key or Bearer).")

    log_level: str = Field("INFO")

    @field_validator("admin_token", "api_key", mode="before")
    @classmethod
    def _empty_means_off(cls, value: object) -> object:
        return None if value in ("", None) else value

    @field_validator("registry_url", "registry_endpoint_url", "jobs_url", mode="before")
    @classmethod
    def _empty_means_unset(cls, value: object) -> object:
        return None if value == "" else value

    @field_validator("registry_url")
    @classmethod
    def _s3_url(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[A-Za-z0-9._/-]*)?", value):
            raise ValueError(
                f"registry_url {value!r} is not s3://bucket/prefix (a bucket name, then an optional key prefix); "
                "leave it empty for the local directory <data_dir>/registry"
            )
        return value

    @field_validator("jobs_url")
    @classmethod
    def _postgres_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("postgresql://", "postgres://")):
            raise ValueError(
                "jobs_url must be a postgresql:// URL (postgresql://user@host:port/dbname); leave it empty for the "
                "SQLite file <data_dir>/jobs.sqlite3"
            )
        return value

    @field_validator("image_size", "router_cache_bytes", mode="before")
    @classmethod
    def _empty_means_default(cls, value: object) -> object:
        return None if value == "" else value

    @field_validator("sites", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @model_validator(mode="after")
    def _resolve(self) -> Settings:
        if not self.backbone_weights:
            self.backbone_weights = WEIGHTS_BUNDLED if bundled_weights_available(self.backbone) else WEIGHTS_HUB
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("CARE_DEVICE=cuda but no CUDA device is visible; use 'cpu' or 'auto'")
        return self

    # Derived values -------------------------------------------------------------------------------------------

    @property
    def registry_dir(self) -> Path:
        return self.data_dir / "registry"

    @property
    def registry_cache_dir(self) -> Path:
        """Where a server keeps its copies of an S3 registry's files (registry_url set)."""
        return self.data_dir / "registry-cache"

    @property
    def jobs_db(self) -> Path:
        return self.data_dir / "jobs.sqlite3"

    @property
    def jobs_database(self) -> Path | str:
        """The job database JobStore opens: the PostgreSQL URL when set, else the SQLite file."""
        return self.jobs_url if self.jobs_url is not None else self.jobs_db

    @property
    def uploads_dir(self) -> Path:
        return self.data_dir / "uploads"

    @property
    def spool_dir(self) -> Path:
        """Where request bodies are spooled while they are read (unnamed files: nothing is left after a crash)."""
        return self.data_dir / "tmp"

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def model(self) -> ModelConfig:
        """The model config these settings describe (sites and image size as given: empty = the backbone's)."""
        return ModelConfig(
            backbone=self.backbone,
            sites=tuple(self.sites),
            expert_dim=self.expert_dim,
            shared_dim=self.shared_dim,
            top_routers=self.top_routers,
            top_experts=self.top_experts,
            image_size=self.image_size,
            head=self.head,
            method=self.method,
            moram_rank=self.moram_rank,
            moram_top_k=self.moram_top_k,
            moram_temperature=self.moram_temperature,
            moram_threshold=self.moram_threshold,
            moram_candidates=self.moram_candidates,
            seta_top_k=self.seta_top_k,
            seta_gate_scale=self.seta_gate_scale,
            seta_anchor=self.seta_anchor,
        )

    def training(self) -> TrainConfig:
        """The train config these settings describe."""
        return TrainConfig(
            epochs=self.train_epochs,
            batch_size=self.train_batch_size,
            lr=self.train_lr,
            align_epochs=self.align_epochs,
            covariance=self.covariance,
            seed=self.train_seed,
            min_steps=self.train_min_steps,
        )

    def environment(self) -> dict[str, str]:
        """These settings as CARE_ environment variables (to start a worker process with the same settings)."""
        env: dict[str, str] = {}
        for name, value in self.model_dump().items():
            if value is None:
                text = ""
            elif isinstance(value, SecretStr):
                text = value.get_secret_value()
            elif isinstance(value, list):
                text = ",".join(str(v) for v in value)
            else:
                text = str(value)
            env[f"CARE_{name.upper()}"] = text
        return env
