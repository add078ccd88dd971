"""`care-bench`: the benchmarks (model, registry, accuracy, serve, train, provisional, export); results go to
docs/benchmarks.md. Not part of the product: `pip install -e '.[bench]'` brings what they need."""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from service.cli import run_command

logger = logging.getLogger("care_bench")

BenchCommand = Callable[[argparse.Namespace], int]


def machine_description() -> dict[str, object]:
    """What a benchmark ran on, recorded next to its numbers."""
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"{len(os.sched_getaffinity(0))} CPUs available",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "command": "care-bench " + " ".join(sys.argv[1:]),
    }


def _int_list(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part]


def _bench_model(args: argparse.Namespace) -> int:
    from bench.model_bench import bench_backbone, markdown_table, methods_table, write_report

    torch.set_num_threads(args.threads)
    rows = []
    for name in args.backbones.split(","):
        size = args.image_size if args.image_size else 224
        batch = args.batch_vit if "vit" in name else args.batch
        methods = [m for m in args.methods.split(",") if m]
        rows += bench_backbone(
            name,
            args.tasks,
            batch,
            size,
            args.repeats,
            args.reference_max_tasks,
            logger.info,
            methods,
            torch.device(args.device),
        )
    path = write_report(rows, Path(args.out), machine_description())
    print(markdown_table(rows))  # noqa: T201 - the table is the command's output
    if any(r.method_s for r in rows):
        print(methods_table(rows))  # noqa: T201
    logger.info("raw numbers in %s, plot in %s", path, path.with_suffix(".png"))
    return 0


def _train_options(train: object, options: Sequence[str]) -> dict[str, Any]:
    """`name=value` pairs for TrainConfig fields, each value parsed as the type of the field's current value."""
    import dataclasses

    known = {field.name for field in dataclasses.fields(train)}  # type: ignore[arg-type]
    changes: dict[str, Any] = {}
    for option in options:
        name, _, text = option.partition("=")
        if name not in known or not text:
            raise SystemExit(f"--train-option {option!r}: use NAME=VALUE with NAME one of {', '.join(sorted(known))}")
        current = getattr(train, name)
        if isinstance(current, bool):
            changes[name] = text.lower() in ("1", "true", "yes", "on")
        elif current is None:  # optional numbers (ridge_ratio): None means "chosen", a value fixes it
            changes[name] = float(text)
        else:
            changes[name] = text if isinstance(current, str) else type(current)(text)
    return changes


def _bench_accuracy(args: argparse.Namespace) -> int:
    import dataclasses

    from tqdm import tqdm

    from bench.accuracy import PRESETS, markdown_table, run, write_report

    torch.set_num_threads(args.threads)
    if args.stream not in PRESETS:
        raise SystemExit(f"unknown stream {args.stream!r}; presets: {', '.join(PRESETS)}")
    preset = PRESETS[args.stream]
    changes: dict[str, object] = {
        key: value
        for key, value in {
            "image_size": args.image_size,
            "train_per_class": args.train_per_class,
            "test_per_class": args.test_per_class,
            "num_tasks": args.num_tasks,
            "seed": args.seed,
        }.items()
        if value is not None
    }
    train_changes = _train_options(preset.train_config(), args.train_option or [])
    if args.epochs is not None:
        train_changes["epochs"] = args.epochs
    if train_changes:
        changes["train"] = dataclasses.replace(preset.train_config(), **train_changes)
    preset = dataclasses.replace(preset, **changes)  # type: ignore[arg-type]
    bar = tqdm(desc=f"{args.stream}", unit="task")

    def progress(done: int, total: int, accuracy: dict[str, float]) -> None:
        bar.total = total
        bar.update(done - bar.n)
        bar.set_postfix({name: f"{value * 100:.1f}" for name, value in accuracy.items()})

    def checkpoint(partial: dict[str, Any]) -> None:
        # Same files as the final report, marked incomplete, so a stopped run leaves its curves so far.
        write_report(partial, Path(args.out), machine_description(), args.stream)

    result = run(preset, args.methods.split(","), progress, checkpoint, args.checkpoint_every)
    bar.close()
    path = write_report(result, Path(args.out), machine_description(), args.stream)
    print(markdown_table(result))  # noqa: T201 - the table is the command's output
    logger.info(
        "raw numbers in %s, plot in %s (%.0f s in all)", path, path.with_suffix(".png"), result["total_seconds"]
    )
    return 0


def _bench_registry(args: argparse.Namespace) -> int:
    from bench.registry_bench import markdown_tables, run, write_report

    torch.set_num_threads(args.threads)
    caps: list[float | None] = [None if c == "none" else float(c) for c in args.caps.split(",")]
    try:
        result = run(args.tasks, caps, args.batch, args.batches, args.image_size, logger.info)
    except ValueError as error:
        raise SystemExit(f"--caps: {error}") from None
    path = write_report(result, Path(args.out), machine_description())
    print(markdown_tables(result))  # noqa: T201 - the tables are the command's output
    logger.info("raw numbers in %s", path)
    return 0


def _bench_serve(args: argparse.Namespace) -> int:
    import dataclasses

    from bench.serve_bench import QUICK, ServeBenchConfig, markdown_tables, run, write_report

    torch.set_num_threads(args.threads)
    given = {
        "tasks": None if args.tasks is None else tuple(args.tasks),
        "batch": args.batch,
        "concurrency": None if args.concurrency is None else tuple(args.concurrency),
        "throughput_images": args.throughput_images,
        "caps": None if args.caps is None else tuple(float(c) for c in args.caps.split(",") if c.strip()),
        "duration_s": args.duration,
        "throughput_duration_s": args.throughput_duration,
        "warmup_s": args.warmup,
        "publishes": args.publishes,
        "hotload_clients": args.hotload_clients,
        "reference_repeats": args.reference_repeats,
        "threads": args.threads,
        "max_batch_size": args.max_batch_size,
        "max_batch_wait_ms": args.max_batch_wait_ms,
        "poll_interval_s": args.poll_interval,
        "image_format": args.image_format,
        "backbone": args.backbone,
        "backbone_weights": args.backbone_weights,
        "image_size": args.image_size,
        "seed": args.seed,
    }
    # Flags that were given win; then --quick's short settings; then the full run's defaults.
    changes = {**(QUICK if args.quick else {}), **{k: v for k, v in given.items() if v is not None}}
    config = dataclasses.replace(ServeBenchConfig(), **changes)
    result = run(config, logger.info)
    path = write_report(result, Path(args.out), machine_description())
    print(markdown_tables(result))  # noqa: T201 - the tables are the command's output
    logger.info("raw numbers in %s, plots in %s", path, path.parent / "serve_bench_*.png")
    return 0


def _bench_train(args: argparse.Namespace) -> int:
    from bench.train_bench import TrainBenchConfig, markdown_table, run, write_report

    config = TrainBenchConfig(
        stream=args.stream, tasks=args.tasks, train_per_class=args.train_per_class, test_per_class=args.test_per_class
    )
    result = run(config, logger.info)
    path = write_report(result, Path(args.out), machine_description())
    print(markdown_table(result))  # noqa: T201 - the table is the command's output
    logger.info("raw numbers in %s", path)
    return 0


def _bench_provisional(args: argparse.Namespace) -> int:
    from bench.provisional import ProvisionalConfig, run

    config = ProvisionalConfig(
        stream=args.stream,
        tasks=args.tasks,
        train_per_class=args.train_per_class,
        test_per_class=args.test_per_class,
        late=args.late,
        classes_per_task=args.classes_per_task,
        logs=args.logs,
    )
    text = json.dumps(run(config), indent=2)
    sys.stdout.write(text + "\n")  # the raw numbers are the command's output
    if args.out:
        args.out.write_text(text + "\n")
    return 0


def _bench_export(args: argparse.Namespace) -> int:
    """Write tasks of an offline stream as ImageFolder zips (to upload) and their test images (to predict)."""
    from bench.datasets import make_stream, write_imagefolder, write_imagefolder_zip

    stream = make_stream(args.stream, seed=args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for task in stream.tasks[: args.tasks]:
        write_imagefolder_zip(task, out / f"task-{task.index}.zip")
        write_imagefolder(task, out / "test", split="test")
        logger.info("task %d: %s -> %s", task.index, ", ".join(task.classes), out / f"task-{task.index}.zip")
    logger.info("test images of those classes under %s/<label>/", out / "test")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="care-bench", description=__doc__)
    parser.add_argument("--log-level", help="logging level (DEBUG, INFO, WARNING); default CARE_LOG_LEVEL or INFO")
    benches = parser.add_subparsers(dest="bench", required=True)

    model = benches.add_parser("model", help="forward time: fast path, reference path, backbone alone")
    model.add_argument("--backbones", default="efficientnet_lite0,vit_small_patch16_224")
    model.add_argument("--tasks", type=_int_list, default=[10, 100, 300], help="comma-separated task counts")
    model.add_argument("--batch", type=int, default=16, help="batch size for CNN backbones")
    model.add_argument("--batch-vit", type=int, default=8, help="batch size for ViT backbones")
    model.add_argument("--image-size", type=int, default=224)
    model.add_argument("--repeats", type=int, default=15)
    model.add_argument("--reference-max-tasks", type=int, default=300, help="skip the reference path above this")
    model.add_argument("--threads", type=int, default=2)
    model.add_argument("--device", default="cpu", help="where the model runs: cpu, cuda, cuda:1 (times include a sync)")
    model.add_argument(
        "--methods",
        default="",
        help="also time these methods' served call side by side: moram (faithful and bounded), seta",
    )
    model.add_argument("--out", default="docs/bench")
    model.set_defaults(handler=_bench_model)

    registry = benches.add_parser("registry", help="router load time; batch latency under router caps and task mixes")
    registry.add_argument("--tasks", type=int, default=300)
    registry.add_argument("--caps", default="none,1.0,0.25,0.1,0.05", help="fractions of router bytes; none = no cap")
    registry.add_argument("--batch", type=int, default=16)
    registry.add_argument("--batches", type=int, default=30, help="timed batches per cap and mix")
    registry.add_argument("--image-size", type=int, default=224)
    registry.add_argument("--threads", type=int, default=2)
    registry.add_argument("--out", default="docs/bench")
    registry.set_defaults(handler=_bench_registry)

    accuracy = benches.add_parser(
        "accuracy", help="the served classifier against CaRE, SimpleCIL and RanPAC on a class-incremental stream"
    )
    accuracy.add_argument(
        "--stream",
        default="fmnist5",
        help="preset: fmnist5, fmnist10x1, glyphs100, glyphs300, glyphs20x1, glyphs100x1, fmnist-joint, tiny",
    )
    accuracy.add_argument(
        "--methods",
        default="served,care-reference,head-frozen,simplecil,ranpac",
        help="comma-separated; also care-m1 (the served configuration with one router per site)",
    )
    accuracy.add_argument("--image-size", type=int, help="override the preset's input resolution")
    accuracy.add_argument("--train-per-class", type=int, help="override the preset's training images per class")
    accuracy.add_argument("--test-per-class", type=int, help="override the preset's test images per class")
    accuracy.add_argument("--num-tasks", type=int, help="only the first N tasks' worth of classes (quick runs)")
    accuracy.add_argument("--epochs", type=int, help="override CaRE's epochs per task")
    accuracy.add_argument(
        "--train-option",
        action="append",
        metavar="NAME=VALUE",
        help="override a field of CaRE's TrainConfig (repeatable), e.g. covariance=diagonal, align_epochs=10",
    )
    accuracy.add_argument("--seed", type=int)
    accuracy.add_argument(
        "--checkpoint-every", type=int, default=10, help="write the results so far every N tasks (marked incomplete)"
    )
    accuracy.add_argument("--threads", type=int, default=2)
    accuracy.add_argument("--out", default="docs/bench")
    accuracy.set_defaults(handler=_bench_accuracy)

    serve_bench = benches.add_parser(
        "serve", help="the real server under load: latency, throughput, router caps, hot-load, against the backbone"
    )
    serve_bench.add_argument("--tasks", type=_int_list, help="task counts served in turn (default 1,10,100,300)")
    serve_bench.add_argument("--batch", type=int, help="images per latency request (default: --max-batch-size)")
    serve_bench.add_argument("--concurrency", type=_int_list, help="client counts (default 1,2,4,8,16,32)")
    serve_bench.add_argument("--throughput-images", type=int, help="images per throughput request (default 1)")
    serve_bench.add_argument("--caps", help="router caps as fractions of router bytes (default 0.25,0.1,0.05)")
    serve_bench.add_argument("--duration", type=float, help="seconds per latency and cap window (default 30)")
    serve_bench.add_argument("--throughput-duration", type=float, help="seconds per throughput window (default 20)")
    serve_bench.add_argument("--warmup", type=float, help="unmeasured seconds before each window (default 3)")
    serve_bench.add_argument("--publishes", type=int, help="versions published under load (default 20)")
    serve_bench.add_argument("--hotload-clients", type=int, help="clients predicting while publishing (default 4)")
    serve_bench.add_argument("--reference-repeats", type=int, help="reference path passes per task count (default 3)")
    serve_bench.add_argument("--max-batch-size", type=int, help="CARE_MAX_BATCH_SIZE of the server (default 16)")
    serve_bench.add_argument("--max-batch-wait-ms", type=float, help="CARE_MAX_BATCH_WAIT_MS (default 5)")
    serve_bench.add_argument("--poll-interval", type=float, help="CARE_POLL_INTERVAL_S of the server (default 0.1)")
    serve_bench.add_argument("--image-format", choices=["png", "jpeg"], help="how clients encode images (png)")
    serve_bench.add_argument("--backbone", help="timm name (default CARE_BACKBONE or efficientnet_lite0)")
    serve_bench.add_argument(
        "--backbone-weights", help="bundled, hub, random or a file (default CARE_BACKBONE_WEIGHTS)"
    )
    serve_bench.add_argument("--image-size", type=int, help="input resolution (default: the backbone's pretrained)")
    serve_bench.add_argument("--seed", type=int)
    serve_bench.add_argument("--threads", type=int, default=2, help="torch threads of the server and of this process")
    serve_bench.add_argument("--quick", action="store_true", help="a short smoke run (tasks 1,10,30, 4 s windows)")
    serve_bench.add_argument("--out", default="docs/bench")
    serve_bench.set_defaults(handler=_bench_serve)

    train = benches.add_parser(
        "train", help="time the service (server + worker, default settings) to learn tasks uploaded over HTTP"
    )
    train.add_argument("--stream", default="fmnist5", help="offline stream whose first tasks are taught")
    train.add_argument("--tasks", type=int, default=2, help="how many tasks to teach, one after another")
    train.add_argument("--train-per-class", type=int, default=100)
    train.add_argument("--test-per-class", type=int, default=50)
    train.add_argument("--out", default="docs/bench")
    train.set_defaults(handler=_bench_train)

    provisional = benches.add_parser(
        "provisional", help="a real server's provisional classes: 202 -> first answer naming a new class, accuracy"
    )
    provisional.add_argument("--stream", default="fmnist5")
    provisional.add_argument(
        "--tasks", type=int, default=3, help="tasks in all: the first is trained, the rest measured"
    )
    provisional.add_argument("--train-per-class", type=int, default=100)
    provisional.add_argument("--test-per-class", type=int, default=50)
    provisional.add_argument(
        "--late", action="store_true", help="post the last task only once the first posted one is training"
    )
    provisional.add_argument("--classes-per-task", type=int, help="glyph streams only: classes in each task")
    provisional.add_argument("--logs", type=Path, help="keep the server's log here")
    provisional.add_argument("--out", type=Path, help="also write the JSON here")
    provisional.set_defaults(handler=_bench_provisional)

    export = benches.add_parser("export", help="write tasks of an offline stream as ImageFolder zips (demo data)")
    export.add_argument("--stream", default="digits5", help="digits5 (bundled), fmnist5, glyphs100, ...")
    export.add_argument("--tasks", type=int, default=2, help="how many tasks to write")
    export.add_argument("--seed", type=int, default=0)
    export.add_argument("--out", default="demo")
    export.set_defaults(handler=_bench_export)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser(), argv)


if __name__ == "__main__":
    raise SystemExit(main())
