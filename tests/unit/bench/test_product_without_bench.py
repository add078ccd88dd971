"""The product runs without the `bench` extra: the server's entry points load and serve with bench/ and the extra's
packages unimportable, and none of them ends up in sys.modules."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

# bench/ and the extra's packages (tqdm aside: timm's huggingface_hub imports it, so it is installed and loaded with
# the product anyway; the import-linter contract forbids the product to import it itself).
BENCH_ONLY = ("bench", "matplotlib", "sklearn", "fontTools")

SCRIPT = textwrap.dedent(
    """
    import json, sys

    BENCH_ONLY = set(sys.argv[2].split(","))
    for name in sys.argv[3].split(",") if sys.argv[3] else ():
        sys.modules[name] = None  # import raises ModuleNotFoundError, importlib.util.find_spec answers None

    from fastapi.testclient import TestClient

    import service.app
    import service.cli
    from service.settings import Settings

    service.cli.build_parser().parse_args(["serve", "--no-worker"])
    settings = Settings(
        data_dir=sys.argv[1], backbone="test_vit", backbone_weights="random", image_size=32, run_worker=False,
        serve_threads=1, train_threads=1,
    )
    with TestClient(service.app.create_app(settings)) as client:
        ready = client.get("/readyz").status_code
    loaded = sorted({name.split(".")[0] for name, module in sys.modules.items() if module is not None} & BENCH_ONLY)
    print(json.dumps({"ready": ready, "loaded": loaded}))
    """
)


@pytest.mark.parametrize("installed", [False, True], ids=["extra-not-installed", "extra-installed"])
def test_the_server_starts_without_loading_the_benchmarks(tmp_path: Path, installed: bool) -> None:
    """Not installed: blocked as if `pip install .` without `[bench]`. Installed: present but never imported."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CARE_")}
    env.update({"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    blocked = "" if installed else ",".join(BENCH_ONLY)
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "data"), ",".join(BENCH_ONLY), blocked],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    assert answer == {"ready": 200, "loaded": []}, answer


def test_care_serve_has_no_bench_command() -> None:
    from service.cli import build_parser

    commands = build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    assert set(commands) == {"serve", "worker", "registry"}
