"""`care-bench model`: forward time per batch of the fast path, the reference path and the backbone alone.

Random task weights (routers resident in memory) at several task counts; the paths are timed side by side,
interleaved within each repeat so that machine noise hits them alike, and medians are reported. "served" is what a
request costs with the default analytic head (the fast path, the site vectors and the head over 3 classes a task);
"head" is the head alone on its inputs.

With `methods` (`care-bench model --methods moram,seta`), each other method's served call (`predict_proba`, head
included) is timed in the same interleaved repeats, on random weights of the same task count: MoRAM faithful
(r = k = 16, every token scores every atom), MoRAM bounded (`moram_candidates` = 64 per image) and SETA (one unique
expert and gate row per task, top-2). Side by side with CaRE's "served" column, in `method_s`.
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from bench.report import write_json
from model import artifacts
from model.backbone import SiteBackbone, build_backbone, bundled_weights_available
from model.config import ModelConfig
from model.head import AnalyticHead
from model.network import CareModel
from model.routers import ResidentRouters
from model.synthetic import random_shared, random_task
from model.trainer import head_block_dims

logger = logging.getLogger(__name__)
CPU = torch.device("cpu")


@dataclass(frozen=True)
class ModelBenchRow:
    backbone: str
    tasks: int
    batch: int
    image_size: int
    backbone_s: float
    fast_s: float
    reference_s: float | None
    paired_ratio: float  # median over repeats of fast / backbone timed back to back
    served_s: float = 0.0  # fast path + the analytic head, as /predict runs it
    head_s: float = 0.0  # the analytic head alone on its inputs
    classes: int = 0
    method_s: dict[str, float] = field(default_factory=dict)  # other methods' served call, same repeats
    unfolded_backbone_s: float = 0.0  # timm's backbone as built (batch norms not folded), same repeats

    @property
    def fast_over_backbone(self) -> float:
        return self.paired_ratio


def random_model(
    config: ModelConfig, backbone: SiteBackbone, num_tasks: int, seed: int = 0, device: torch.device = CPU
) -> tuple[CareModel, ResidentRouters]:
    """A CareModel of `num_tasks` random tasks (3 classes each) with its routers in memory, on `device` (the
    backbone is moved there in place). The weights are drawn on the CPU, so every device gets the same model."""
    generator = torch.Generator().manual_seed(seed)
    dims = backbone.site_dims
    shared = artifacts.shared_tensors(random_shared(config, dims, generator))
    experts, routers = [], []
    for index in range(num_tasks):
        task = random_task(config, dims, index, 3, generator)
        experts.append((artifacts.task_expert_tensors(task), 3))
        routers.append(artifacts.routers_from_tensors(artifacts.task_router_tensors(task), index, dims, "random"))
    bank = artifacts.stack_tasks(shared, experts, config, dims)
    classes = 3 * num_tasks
    classifier = torch.randn(classes, backbone.feature_dim, generator=generator)
    width = sum(head_block_dims(backbone))
    head = AnalyticHead(
        torch.ones(width), torch.randn(width, classes, generator=generator) / width**0.5, torch.zeros(classes), 1.0
    )
    model = CareModel(config, backbone, bank, classifier, head)
    return model.to(device), ResidentRouters(routers).to(device)


METHOD_COLUMNS = {"moram": ("moram", "moram-bounded"), "seta": ("seta",)}
BOUNDED_CANDIDATES = 64


def method_models(
    names: Sequence[str], care: CareModel, num_tasks: int, seed: int = 0
) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """The served call (images -> probabilities) of each other method at `num_tasks` random tasks, sharing CaRE's
    backbone, classifier and random head (all methods feed the head the same inputs: phi and the site vectors)."""
    from model.moram import AtomBank, AtomStack, MoramModel
    from model.seta import SetaModel
    from model.synthetic import random_seta_bank

    generator = torch.Generator().manual_seed(seed + 1)
    backbone, classifier, head = care.backbone, care.classifier, care.head
    calls: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
    for name in names:
        if name == "moram":
            config = dataclasses.replace(care.config, method="moram")
            rank = config.moram_rank
            sites = [
                AtomStack(
                    torch.randn(rank * num_tasks, d, generator=generator) / d**0.5,
                    torch.randn(rank * num_tasks, d, generator=generator) * 0.01,
                )
                for d in backbone.site_dims
            ]
            bank = AtomBank(sites, rank).to(classifier.device)
            bank.prepare_fast_path()
            faithful = MoramModel(config, backbone, bank, classifier, head)
            bounded_config = dataclasses.replace(config, moram_candidates=BOUNDED_CANDIDATES)
            bounded = MoramModel(bounded_config, backbone, bank, classifier, head)
            calls["moram"] = faithful.predict_proba
            calls["moram-bounded"] = bounded.predict_proba
        elif name == "seta":
            config = dataclasses.replace(care.config, method="seta")
            seta_bank = random_seta_bank(config, backbone.site_dims, num_tasks, generator).to(classifier.device)
            seta_bank.prepare_fast_path()
            calls["seta"] = SetaModel(config, backbone, seta_bank, classifier, head).predict_proba
        else:
            raise ValueError(f"unknown method {name!r}: choose from {', '.join(METHOD_COLUMNS)}")
    return calls


def synchronize() -> None:
    """Wait for queued CUDA work, so that a wall-clock interval covers the kernels it launched (a no-op on a CPU)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def time_call(fn: Callable[[], object]) -> float:
    """Wall seconds of one call, its CUDA kernels included."""
    synchronize()
    started = time.perf_counter()
    fn()
    synchronize()
    return time.perf_counter() - started


def bench_backbone(
    name: str,
    task_counts: Sequence[int],
    batch: int,
    image_size: int,
    repeats: int,
    reference_max_tasks: int,
    progress: Callable[[str], None],
    methods: Sequence[str] = (),
    device: torch.device = CPU,
) -> list[ModelBenchRow]:
    """Median forward seconds per batch for each task count (and of each other method in `methods`), on `device`."""
    config = ModelConfig(backbone=name, image_size=image_size)
    unfolded = build_backbone(config, "bundled" if bundled_weights_available(name) else "random").to(device)
    images = torch.randn(batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(0)).to(device)
    # As served (service.inference.backbone.load_backbone): a CNN's batch norms folded into its convolutions.
    backbone = unfolded.with_folded_batch_norms(image_size)
    rows = []
    for count in task_counts:
        model, routers = random_model(config, backbone, count, device=device)
        others = method_models(methods, model, count)
        run_reference = count <= reference_max_tasks
        with torch.inference_mode():
            for _ in range(3):  # warm-up: allocator, kernels, caches
                backbone.forward_plain(images)
                model.forward_features(images, routers, "fast")
            for call in others.values():
                call(images)
            times: dict[str, list[float]] = {
                "backbone": [],
                "fast": [],
                "reference": [],
                "served": [],
                "head": [],
                "unfolded": [],
            }
            times.update({name: [] for name in others})
            inputs = model.head_inputs_from_embedding(backbone.embed(images), routers)
            assert model.head is not None
            head = model.head
            # Backbone and fast path alternate, so that drifts of the machine (frequency, other load) hit both alike;
            # the reference path runs afterwards because its large temporaries disturb the caches of the others.
            for _ in range(repeats):
                times["backbone"].append(time_call(lambda: backbone.forward_plain(images)))
                times["unfolded"].append(time_call(lambda: unfolded.forward_plain(images)))
                times["fast"].append(time_call(lambda m=model, r=routers: m.forward_features(images, r, "fast")))  # type: ignore[misc]
                times["served"].append(time_call(lambda m=model, r=routers: m.predict_proba(images, r)))  # type: ignore[misc]
                times["head"].append(time_call(lambda h=head, z=inputs: h.probabilities(z)))  # type: ignore[misc]
                for other, call in others.items():
                    times[other].append(time_call(lambda c=call: c(images)))  # type: ignore[misc]
            if run_reference:
                for _ in range(max(1, repeats // 3)):
                    times["reference"].append(
                        time_call(lambda m=model, r=routers: m.forward_features(images, r, "reference"))  # type: ignore[misc]
                    )
        ratios = [f / b for f, b in zip(times["fast"], times["backbone"], strict=True)]
        row = ModelBenchRow(
            backbone=name,
            tasks=count,
            batch=batch,
            image_size=image_size,
            backbone_s=statistics.median(times["backbone"]),
            fast_s=statistics.median(times["fast"]),
            reference_s=statistics.median(times["reference"]) if run_reference else None,
            paired_ratio=statistics.median(ratios),
            served_s=statistics.median(times["served"]),
            head_s=statistics.median(times["head"]),
            classes=model.num_classes,
            method_s={name: statistics.median(times[name]) for name in others},
            unfolded_backbone_s=statistics.median(times["unfolded"]),
        )
        progress(
            f"{name} T={count}: backbone {row.backbone_s * 1e3:.1f} ms (timm's, unfolded: "
            f"{row.unfolded_backbone_s * 1e3:.1f} ms), fast {row.fast_s * 1e3:.1f} ms "
            f"(paired {row.fast_over_backbone:.2f}x), served {row.served_s * 1e3:.1f} ms, "
            f"head {row.head_s * 1e3:.2f} ms over {row.classes} classes, reference "
            + (f"{row.reference_s * 1e3:.1f} ms" if row.reference_s is not None else "skipped")
            + "".join(f", {name} {seconds * 1e3:.1f} ms" for name, seconds in row.method_s.items())
        )
        rows.append(row)
        del model, routers, others
    return rows


def write_report(rows: list[ModelBenchRow], out_dir: Path, meta: dict[str, object]) -> Path:
    """JSON of the raw numbers plus a PNG of latency against the number of tasks; returns the JSON path."""
    path = write_json(out_dir, "model_bench.json", meta, {"rows": [asdict(r) for r in rows]})
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({r.backbone for r in rows})
    figure, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 4), squeeze=False)
    for axis, name in zip(axes[0], names, strict=True):
        mine = [r for r in rows if r.backbone == name]
        tasks = [r.tasks for r in mine]
        axis.plot(tasks, [r.backbone_s * 1e3 for r in mine], "k--", label="backbone alone")
        axis.plot(tasks, [r.fast_s * 1e3 for r in mine], "o-", label="fast path")
        for method in dict.fromkeys(n for r in mine for n in r.method_s):
            points = [(r.tasks, r.method_s[method] * 1e3) for r in mine if method in r.method_s]
            axis.plot(*zip(*points, strict=True), "^:", label=f"{method} (served)")
        ref = [(r.tasks, r.reference_s * 1e3) for r in mine if r.reference_s is not None]
        if ref:
            axis.plot(*zip(*ref, strict=True), "s-", label="reference path")
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel("tasks learned")
        axis.set_ylabel(f"ms per batch of {mine[0].batch}")
        axis.set_title(f"{name} ({mine[0].image_size}px)")
        axis.legend()
    figure.tight_layout()
    figure.savefig(out_dir / "model_bench.png", dpi=110)
    plt.close(figure)
    if any(r.method_s for r in rows):
        _plot_method_ratios(rows, names, out_dir / "model_bench_methods.png")
    return path


def _plot_method_ratios(rows: list[ModelBenchRow], names: list[str], path: Path) -> None:
    """Each method's served call as a multiple of the backbone alone in the same repeats: what grows with tasks,
    whatever the machine's load did to the absolute times between task counts."""
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 4), squeeze=False)
    for axis, name in zip(axes[0], names, strict=True):
        mine = [r for r in rows if r.backbone == name]
        tasks = [r.tasks for r in mine]
        axis.plot(tasks, [r.served_s / r.backbone_s for r in mine], "o-", label="care (served)")
        for method in dict.fromkeys(n for r in mine for n in r.method_s):
            points = [(r.tasks, r.method_s[method] / r.backbone_s) for r in mine if method in r.method_s]
            axis.plot(*zip(*points, strict=True), "^:", label=f"{method} (served)")
        axis.axhline(1.0, color="k", linestyle="--", label="backbone alone")
        axis.set_xscale("log")
        axis.set_xlabel("tasks learned")
        axis.set_ylabel("x the backbone alone (medians, same repeats)")
        axis.set_title(f"{name} ({mine[0].image_size}px, batch {mine[0].batch})")
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def markdown_table(rows: list[ModelBenchRow]) -> str:
    lines = [
        "| backbone | tasks | classes | batch | backbone alone (ms) | fast (ms) | fast / backbone (paired) "
        "| served with head (ms) | head alone (ms) | head / fast | reference (ms) | reference / fast |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        reference = f"{r.reference_s * 1e3:.1f}" if r.reference_s is not None else "-"
        ratio = f"{r.reference_s / r.fast_s:.1f}x" if r.reference_s is not None else "-"
        lines.append(
            f"| {r.backbone} | {r.tasks} | {r.classes} | {r.batch} | {r.backbone_s * 1e3:.1f} | {r.fast_s * 1e3:.1f} | "
            f"{r.fast_over_backbone:.2f}x | {r.served_s * 1e3:.1f} | {r.head_s * 1e3:.2f} | "
            f"{r.head_s / r.fast_s * 100:.1f} % | {reference} | {ratio} |"
        )
    return "\n".join(lines)


def methods_table(rows: list[ModelBenchRow]) -> str:
    """The methods side by side: each served call in ms and as a multiple of the backbone alone."""
    names = [name for r in rows for name in r.method_s]
    columns = list(dict.fromkeys(names))
    if not columns:
        return ""
    header = " | ".join(f"{name} (ms, x backbone)" for name in ["care", *columns])
    lines = [f"| backbone | tasks | backbone alone (ms) | {header} |", "|---|---|---|" + "---|" * (len(columns) + 1)]
    for r in rows:
        cells = [f"{r.served_s * 1e3:.1f} ({r.served_s / r.backbone_s:.2f}x)"]
        cells += [
            f"{r.method_s[n] * 1e3:.1f} ({r.method_s[n] / r.backbone_s:.2f}x)" if n in r.method_s else "-"
            for n in columns
        ]
        lines.append(f"| {r.backbone} | {r.tasks} | {r.backbone_s * 1e3:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
