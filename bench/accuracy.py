"""`care-bench accuracy`: the served classifier against CaRE, SimpleCIL and RanPAC on class-incremental streams.

Every method sees the same frozen backbone and the same images. Each image goes through the backbone below the
first BR-MoE site once (the expensive part); the CaRE methods train and predict from that embedding with the very
trainer the service uses (`learn_task_embedded`), and the feature methods use the unadapted backbone's pooled
feature (and site vectors) computed from the same embedding. After every task each method is tested on the test
images of every task seen so far.

Methods:

* ``served``: exactly what the worker learns with default settings (`Settings().model()` and `.training()`, the
  backbone's own input size): experts plus the analytic head. Its name is the JSON's ``served_method``.
* ``care-reference``: CaRE as published: the cosine head aligned on Gaussian replay with the reference code's budget
  (5 * batch samples per class and epoch, batches of 5 * batch, so C steps an epoch), no old-class negatives and
  no minimum step count.
* ``head-frozen``: the served analytic head on the frozen backbone's features, no experts (what the experts add).
* ``simplecil``, ``ranpac``: the closed-form baselines on the frozen pooled feature.
* ``care-m1``: the served configuration with a single router per site (M = 1), an ablation.
* ``moram``: MoRAM (model/moram.py, `CARE_METHOD=moram` with its default settings) through its trainer
  (`learn_moram_task_embedded`) and the served analytic head, on the served backbone and training budget; no routers.
* ``seta``: SETA as inferred from its abstract (model/seta.py, `CARE_METHOD=seta` with its default settings):
  anchored shared experts, gated unique experts, the served analytic head, same backbone and budget.
* ``seta-unanchored``: the same with the anchor off (lambda 0), an ablation: what the elastic anchor holds.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from bench.accuracy_methods import (
    CHUNK,
    CareMethod,
    FeatureMethod,
    FirstSessionMethod,
    FrozenHeadMethod,
    Method,
    MoramMethod,
    SetaMethod,
    TaskData,
    no_adapter,
)
from bench.baselines import RanPAC, SimpleCIL
from bench.datasets import Task, make_stream
from bench.metrics import AccuracyMatrix, evaluate_stage
from bench.report import write_json
from model.backbone import WEIGHTS_BUNDLED, SiteBackbone, build_backbone, bundled_weights_available, make_transform
from model.config import ModelConfig, TrainConfig
from model.head import head_inputs
from model.network import run_sites
from model.trainer import embed_images, head_block_dims
from service.settings import Settings

logger = logging.getLogger(__name__)

SERVED = "served"


def served_model_config() -> ModelConfig:
    """The model configuration a server and worker run with default settings."""
    return Settings().model()


def served_train_config() -> TrainConfig:
    """The training configuration the worker uses with default settings."""
    return Settings().training()


def reference_train_config(served: TrainConfig, num_classes: int) -> TrainConfig:
    """CaRE as its code runs: alignment with 5 * batch samples per class in batches of 5 * batch (C steps an epoch),
    full covariances where they fit (they take D * D floats a class), no old-class negatives, bare epochs."""
    replay = 5 * served.batch_size
    return dataclasses.replace(
        served,
        align_epochs=max(served.align_epochs, 5),
        align_samples_per_class=replay,
        align_batch_size=replay,
        covariance="full" if num_classes <= 100 else "diagonal",
        old_class_negatives=False,
        min_steps=0,
    )


@dataclass(frozen=True)
class Preset:
    """A stream and its size. The model and training configuration are the served defaults unless overridden.

    Streams are sized so that the served configuration (224 px for EfficientNet-Lite0) finishes in tens of minutes
    on a 2-core machine; see docs/benchmarks.md for what each one costs.
    """

    stream: str
    backbone: str | None = None  # None: the served backbone
    image_size: int | None = None  # None: the served input size
    train_per_class: int | None = None
    test_per_class: int | None = None
    num_tasks: int | None = None
    classes_per_task: int | None = None
    train: TrainConfig | None = None  # None: the served training configuration
    ranpac_dim: int = 2048
    seed: int = 0

    def model_config(self) -> ModelConfig:
        config = served_model_config()
        if self.backbone is not None:
            config = dataclasses.replace(config, backbone=self.backbone, sites=())
        return config if self.image_size is None else dataclasses.replace(config, image_size=self.image_size)

    def train_config(self) -> TrainConfig:
        return self.train if self.train is not None else served_train_config()


PRESETS: dict[str, Preset] = {
    "fmnist5": Preset("fmnist5", train_per_class=100, test_per_class=100),
    # One class per task: the common case of a user adding one class per upload.
    "fmnist10x1": Preset("fmnist5", train_per_class=60, test_per_class=60, num_tasks=10, classes_per_task=1),
    # At 224 px the full glyph streams (1000 classes) do not fit a session here: their first tasks, fewer images.
    "glyphs100": Preset("glyphs100", train_per_class=6, test_per_class=3, num_tasks=15),
    "glyphs300": Preset("glyphs300", train_per_class=6, test_per_class=3, num_tasks=30),
    "glyphs20x1": Preset("glyphs300", train_per_class=6, test_per_class=3, num_tasks=20, classes_per_task=1),
    # One class a task for 100 tasks: level-1 routing and the head over a long stream of one-class uploads.
    "glyphs100x1": Preset("glyphs300", train_per_class=6, test_per_class=3, num_tasks=100, classes_per_task=1),
    # All ten classes as one task: the joint (non-incremental) ceiling of fmnist5's data, not a continual stream.
    "fmnist-joint": Preset("fmnist5", train_per_class=100, test_per_class=100, num_tasks=1, classes_per_task=10),
    "tiny": Preset("glyphs-tiny", image_size=64),
}


class PeakRss:
    """Samples this process's resident memory every 50 ms while running (the peak of a method's calls)."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    @staticmethod
    def current() -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self.current())

    def __enter__(self) -> PeakRss:
        self.peak = self.current()
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.current())


@dataclass
class MethodResult:
    name: str
    matrix: AccuracyMatrix = field(default_factory=AccuracyMatrix)
    learn_seconds: float = 0.0
    eval_seconds: float = 0.0
    peak_rss_bytes: int = 0
    state_bytes: int = 0
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "accuracy": self.matrix.to_dict(),
            "learn_seconds": round(self.learn_seconds, 2),
            "eval_seconds": round(self.eval_seconds, 2),
            "peak_rss_bytes": self.peak_rss_bytes,
            "state_bytes": self.state_bytes,
            **self.details,
        }


class _Encoder:
    """Preprocess, embed below the first site once, and derive the unadapted pooled feature from that embedding."""

    def __init__(self, backbone: SiteBackbone, image_size: int | None) -> None:
        self.backbone = backbone
        self.transform = make_transform(backbone, image_size)

    def __call__(self, images: Sequence[Any], labels: Tensor) -> TaskData:
        embedded, features, inputs = [], [], []
        # no_grad, not inference_mode: CaRE trains on these embeddings, and autograd refuses inference tensors.
        with torch.no_grad():
            for start in range(0, len(images), CHUNK):
                batch = torch.stack([self.transform(image) for image in images[start : start + CHUNK]])
                hidden = embed_images(self.backbone, batch)
                embedded.append(hidden)
                vectors: list[Tensor] = []
                features.append(run_sites(self.backbone, hidden, no_adapter, vectors))
                inputs.append(head_inputs(features[-1], vectors))
        return TaskData(torch.cat(embedded), torch.cat(features), torch.cat(inputs), labels)


METHOD_NAMES = (
    SERVED,
    "care-reference",
    "head-frozen",
    "simplecil",
    "ranpac",
    "care-m1",
    "moram",
    "seta",
    "seta-unanchored",
    "first-session",
    "first-session+frozen",
)


def build_methods(
    names: Sequence[str], preset: Preset, backbone: SiteBackbone, config: ModelConfig, num_classes: int
) -> list[Method]:
    train = preset.train_config()
    methods: list[Method] = []
    for name in names:
        if name == "simplecil":
            methods.append(FeatureMethod(name, SimpleCIL()))
        elif name == "ranpac":
            methods.append(FeatureMethod(name, RanPAC(preset.ranpac_dim, seed=preset.seed)))
        elif name == SERVED:
            methods.append(CareMethod(name, backbone, config, train))
        elif name == "care-reference":
            reference = dataclasses.replace(config, head="cosine")
            methods.append(CareMethod(name, backbone, reference, reference_train_config(train, num_classes)))
        elif name == "head-frozen":
            methods.append(FrozenHeadMethod(name, head_block_dims(backbone), train))
        elif name == "care-m1":
            # Ablation: a single router per site (M = 1) instead of CaRE's two.
            methods.append(CareMethod(name, backbone, dataclasses.replace(config, top_routers=1), train))
        elif name in ("first-session", "first-session+frozen"):
            scale = train.expert_scale_init or 1.0
            methods.append(FirstSessionMethod(name, backbone, config, train, scale, name.endswith("+frozen")))
        elif name == "moram":
            methods.append(MoramMethod(name, backbone, dataclasses.replace(config, method="moram"), train))
        elif name in ("seta", "seta-unanchored"):
            seta = dataclasses.replace(config, method="seta")
            if name == "seta-unanchored":
                seta = dataclasses.replace(seta, seta_anchor=0.0)
            methods.append(SetaMethod(name, backbone, seta, train))
        else:
            raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHOD_NAMES)}")
    return methods


def run(
    preset: Preset,
    method_names: Sequence[str],
    progress: Callable[[int, int, dict[str, float]], None] | None = None,
    checkpoint: Callable[[dict[str, Any]], None] | None = None,
    checkpoint_every: int = 10,
) -> dict[str, Any]:
    """Run every method over the preset's stream; returns the JSON-ready results.

    ``checkpoint`` receives the results so far (``complete`` false) every ``checkpoint_every`` tasks, so that a
    long stream (glyphs300 is an hour here) that is stopped part-way still leaves its curves behind.
    """
    started = time.perf_counter()
    options = {"num_tasks": preset.num_tasks, "classes_per_task": preset.classes_per_task}
    stream = make_stream(
        preset.stream,
        seed=preset.seed,
        train_per_class=preset.train_per_class,
        test_per_class=preset.test_per_class,
        **{key: value for key, value in options.items() if value},
    )
    config = preset.model_config()
    weights = WEIGHTS_BUNDLED if bundled_weights_available(config.backbone) else "random"
    # As the worker and the server load it (service.inference.backbone.load_backbone): batch norms folded.
    backbone = build_backbone(config, weights).with_folded_batch_norms(config.image_size or 224)
    encode = _Encoder(backbone, config.image_size)
    methods = build_methods(method_names, preset, backbone, config, len(stream.classes))
    results = {m.name: MethodResult(m.name) for m in methods}
    tests: list[TaskData] = []
    encode_seconds = 0.0
    offset = 0

    def report(done: int) -> dict[str, Any]:
        for method in methods:
            results[method.name].state_bytes = method.state_bytes()
            results[method.name].details = method.details()
        return {
            "served_method": SERVED,
            "preset": {**dataclasses.asdict(preset), "train": dataclasses.asdict(preset.train_config())},
            "model_config": config.to_dict(),
            "stream": {"name": preset.stream, "tasks": len(stream.tasks), "classes": len(stream.classes)},
            "complete": done == len(stream.tasks),
            "tasks_done": done,
            "encode_seconds": round(encode_seconds, 2),
            "total_seconds": round(time.perf_counter() - started, 2),
            "methods": {name: result.to_dict() for name, result in results.items()},
        }

    for task in stream.tasks:
        encoded_at = time.perf_counter()
        train, test = _encode_task(encode, task, offset)
        tests.append(test)
        encode_seconds += time.perf_counter() - encoded_at
        for method in methods:
            result = results[method.name]
            with PeakRss() as rss:
                learn_started = time.perf_counter()
                method.learn(train, len(task.classes))
                result.learn_seconds += time.perf_counter() - learn_started
            result.peak_rss_bytes = max(result.peak_rss_bytes, rss.peak)
            eval_started = time.perf_counter()
            predictions = [method.predict(test) for test in tests]
            stage = evaluate_stage(lambda predicted: predicted, predictions, [t.labels for t in tests])
            result.eval_seconds += time.perf_counter() - eval_started
            result.matrix.append(stage)
        offset += len(task.classes)
        task.release()
        done = task.index + 1
        if progress is not None:
            progress(done, len(stream.tasks), {n: r.matrix.overall[-1] for n, r in results.items()})
        if checkpoint is not None and done % checkpoint_every == 0 and done < len(stream.tasks):
            checkpoint(report(done))
    return report(len(stream.tasks))


def _encode_task(encode: _Encoder, task: Task, offset: int) -> tuple[TaskData, TaskData]:
    classes = {label: offset + i for i, label in enumerate(task.classes)}
    train_labels = torch.tensor([classes[label] for label in task.train.labels])
    test_labels = torch.tensor([classes[label] for label in task.test.labels])
    return encode(task.train.images, train_labels), encode(task.test.images, test_labels)


def write_report(result: dict[str, Any], out_dir: Path, meta: dict[str, object], name: str | None = None) -> Path:
    """JSON with every number, and a PNG of accuracy on all seen classes after each task (`accuracy_<name>.*`,
    the stream's name by default)."""
    stream = name or result["stream"]["name"]
    path = write_json(out_dir, f"accuracy_{stream}.json", meta, result)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.5, 4))
    for name, method in result["methods"].items():
        overall = [stage["overall"] * 100 for stage in method["accuracy"]["stages"]]
        axis.plot(range(1, len(overall) + 1), overall, label=name, marker="o" if len(overall) <= 20 else None)
    axis.set_xlabel("tasks learned")
    axis.set_ylabel("accuracy on all seen classes (%)")
    title = f"{stream}: {result['stream']['tasks']} tasks, {result['stream']['classes']} classes"
    if not result.get("complete", True):
        title += f" (after {result['tasks_done']})"
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(out_dir / f"accuracy_{stream}.png", dpi=110)
    plt.close(figure)
    return path


def markdown_table(result: dict[str, Any]) -> str:
    lines = [
        "| method | last accuracy A_B | average accuracy A-bar | forgetting | learn s | eval s | peak RSS MiB "
        "| state MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, method in result["methods"].items():
        summary = method["accuracy"]["summary"]
        lines.append(
            f"| {name} | {summary['last_accuracy'] * 100:.2f} | {summary['average_incremental_accuracy'] * 100:.2f} | "
            f"{summary['forgetting'] * 100:.2f} | {method['learn_seconds']:.0f} | {method['eval_seconds']:.0f} | "
            f"{method['peak_rss_bytes'] / 2**20:.0f} | {method['state_bytes'] / 2**20:.1f} |"
        )
    return "\n".join(lines)
