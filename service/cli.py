"""`care-serve`: the command line (serve, worker, registry verify). The benchmarks are `care-bench` (bench/)."""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from service.inference.allocator import tune_allocator
from service.settings import Settings

if TYPE_CHECKING:
    from registry.verify import VerifyReport

logger = logging.getLogger("care_serve")

Command = Callable[[argparse.Namespace], int]


def _settings(args: argparse.Namespace) -> Settings:
    """Settings from CARE_ variables, with the flags that were given on the command line winning."""
    overrides = {name: getattr(args, name) for name in ("host", "port", "data_dir") if getattr(args, name, None)}
    return Settings(**overrides)


def _serve(args: argparse.Namespace) -> int:
    from service.app import create_app
    from service.ingest.guard import serve

    settings = _settings(args)
    if args.no_worker:
        settings = settings.model_copy(update={"run_worker": False})
    serve(create_app(settings), settings)  # uvicorn behind the header/body timeouts and the in-flight cap
    return 0


def _worker(args: argparse.Namespace) -> int:
    from service.training.worker import run_worker

    return run_worker(_settings(args))


def _registry_verify(args: argparse.Namespace) -> int:
    """Check CURRENT, every manifest and every file's size and sha256; exit 1 naming each mismatch."""
    from registry import LocalDirectoryBackend
    from registry.verify import verify_registry

    settings = _settings(args)
    if not args.registry and settings.registry_url is not None:
        return _verify_s3(settings)
    root = Path(args.registry) if args.registry else settings.registry_dir
    if not root.is_dir():
        print(f"registry verify: {root} is not a directory; pass --data-dir or --registry")  # noqa: T201
        return 2
    report = verify_registry(LocalDirectoryBackend(root))
    return _print_report(report, str(root))


def _verify_s3(settings: Settings) -> int:
    """Verify an S3 registry through a fresh, temporary cache: every object is downloaded and checked."""
    import tempfile

    from registry.s3 import S3Backend
    from registry.verify import verify_registry

    assert settings.registry_url is not None
    with tempfile.TemporaryDirectory(prefix="care-verify-") as cache:
        backend = S3Backend.from_url(
            settings.registry_url, cache_dir=cache, endpoint_url=settings.registry_endpoint_url
        )
        return _print_report(verify_registry(backend), settings.registry_url)


def _print_report(report: VerifyReport, root: str) -> int:
    for problem in report.problems:
        print(f"FAIL {problem.relpath}: {problem.message}")  # noqa: T201 - the report is the command's output
    for note in report.notes:
        print(f"note: {note}")  # noqa: T201
    verdict = "OK" if report.ok else f"{len(report.problems)} problem(s)"
    print(  # noqa: T201
        f"{verdict}: {root}: CURRENT={report.current}, {report.versions} manifest(s), {report.files} file(s), "
        f"{report.bytes} bytes checked"
    )
    return 0 if report.ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="care-serve", description=__doc__)
    parser.add_argument("--log-level", help="logging level (DEBUG, INFO, WARNING); default CARE_LOG_LEVEL or INFO")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the HTTP server and its training worker")
    serve.add_argument("--host", help="bind address (CARE_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (CARE_PORT, default 8000)")
    serve.add_argument("--data-dir", type=Path, help="registry, job database, uploads (CARE_DATA_DIR)")
    serve.add_argument("--no-worker", action="store_true", help="do not start a training worker (CARE_RUN_WORKER)")
    serve.set_defaults(handler=_serve)

    worker = commands.add_parser("worker", help="run a training worker on its own")
    worker.add_argument("--data-dir", type=Path, help="registry, job database, uploads (CARE_DATA_DIR)")
    worker.set_defaults(handler=_worker)

    registry_cmd = commands.add_parser("registry", help="inspect the model registry")
    registry_cmds = registry_cmd.add_subparsers(dest="registry_command", required=True)
    verify = registry_cmds.add_parser(
        "verify", help="check CURRENT, every manifest and every file's size and sha256; exit 1 on any mismatch"
    )
    verify.add_argument("--data-dir", type=Path, help="data directory whose registry/ to check (CARE_DATA_DIR)")
    verify.add_argument("--registry", type=Path, help="a registry directory (instead of <data dir>/registry)")
    verify.set_defaults(handler=_registry_verify)

    return parser


def run_command(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> int:
    """Parse `argv` with `parser`, tune malloc, set up logging (`--log-level`, CARE_LOG_LEVEL) and run the handler
    the chosen subcommand set (`care-serve` here, `care-bench` in bench/cli.py)."""
    args = parser.parse_args(argv)
    tune_allocator()
    level = args.log_level or os.environ.get("CARE_LOG_LEVEL") or "INFO"
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    handler: Command = args.handler
    return handler(args)


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser(), argv)


if __name__ == "__main__":
    raise SystemExit(main())
