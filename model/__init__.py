"""care-serve model package: CaRE (bi-level routing mixture-of-experts) on a frozen timm backbone.

Knows nothing of HTTP, metrics or the registry. ``__all__`` is its public API: what the service uses (configs, the
backbone and its preprocessing, learning a task, the served network, the head and its statistics, router sources)
and the synthetic task weights that tests and benchmarks build models from. Tests of one module's internals import
from that module.
"""

from model import artifacts
from model.alignment import ClassStatistics
from model.backbone import (
    WEIGHTS_BUNDLED,
    WEIGHTS_HUB,
    SiteBackbone,
    build_backbone,
    bundled_weights_available,
    make_transform,
)
from model.bank import ExpertBank
from model.config import DEFAULT_BACKBONE, CovarianceMode, HeadKind, ModelConfig, TrainConfig
from model.head import RIDGE_GRID, AnalyticHead, HeadStatistics
from model.network import CareModel
from model.routers import ResidentRouters, RouterSource, TaskRouters
from model.synthetic import random_shared, random_task, synthetic_head
from model.tensor_transform import TensorTransform, tensor_transform
from model.trainer import LearnedTask, Lineage, TrainProgress, advance, embed_images, learn_task, served_features

__all__ = [
    "DEFAULT_BACKBONE",
    "RIDGE_GRID",
    "WEIGHTS_BUNDLED",
    "WEIGHTS_HUB",
    "AnalyticHead",
    "CareModel",
    "ClassStatistics",
    "CovarianceMode",
    "ExpertBank",
    "HeadKind",
    "HeadStatistics",
    "LearnedTask",
    "Lineage",
    "ModelConfig",
    "ResidentRouters",
    "RouterSource",
    "SiteBackbone",
    "TaskRouters",
    "TensorTransform",
    "TrainConfig",
    "TrainProgress",
    "advance",
    "artifacts",
    "build_backbone",
    "bundled_weights_available",
    "embed_images",
    "learn_task",
    "make_transform",
    "random_shared",
    "random_task",
    "served_features",
    "synthetic_head",
    "tensor_transform",
]
