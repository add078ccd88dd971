"""Measure care-serve's disk housekeeping (docs/reliability.md); not a test, a probe.

With the tiny `test_vit` backbone on a loopback port and a temporary data dir:

1. uploads of ready tasks: teach T tasks through a real `care-serve serve` (with its worker); the bytes under
   uploads/ while they are queued and once they are ready (care_data_dir_bytes, and a walk of the directory);
2. crash leftovers: SIGKILL the server's whole process group while big uploads are being staged, and SIGKILL a
   publisher while it stages registry files; count the `.staging-*` directories and `*.tmp` files left behind;
3. restart: start the server again with the default grace (leftovers younger than CARE_SWEEP_GRACE_S stay), then
   with CARE_SWEEP_GRACE_S=0 (the whole group was down, so nothing is in flight); count again, and run
   `care-serve registry verify`.

    PYTHONPATH=. OMP_NUM_THREADS=1 .venv/bin/python tools/probe_housekeeping.py
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from bench.harness import CARE_SERVE, base_env, free_port, start_server, wait_until

ENV = {
    "backbone": "test_vit",
    "backbone_weights": "random",
    "image_size": "32",
    "device": "cpu",
    "serve_threads": "1",
    "train_threads": "1",
    "train_epochs": "1",
    "align_epochs": "1",
    "poll_interval_s": "0.2",
    "worker_poll_s": "0.2",
}

PUBLISHER = """
import sys, torch
from pathlib import Path
from registry import Registry
from bench.synthetic import populate
from service.modelstore import ModelStore
from service.settings import Settings
from service.inference.backbone import load_backbone
settings = Settings(data_dir=Path(sys.argv[1]), **{k: v for k, v in (a.split("=", 1) for a in sys.argv[2:])})
config, backbone = load_backbone(settings)
store = ModelStore(Registry.from_path(settings.registry_dir), config, backbone, torch.device("cpu"))
print("publishing", flush=True)
populate(store, 400, classes_per_task=2, seed=7, parent=store.registry.latest_manifest())
"""


def png(seed: int, size: int = 48) -> bytes:
    image = Image.new("RGB", (size, size), (seed * 37 % 256, seed * 91 % 256, seed * 13 % 256))
    image.putpixel((seed % size, seed * 7 % size), (255, 255, 255))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def task_body(labels: list[str], per_class: int, offset: int = 0) -> tuple[list[Any], list[str]]:
    files, sent = [], []
    for c, label in enumerate(labels):
        for k in range(per_class):
            files.append(("images", (f"{label}-{k}.png", png(offset + c * 1000 + k), "image/png")))
            sent.append(label)
    return files, sent


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def leftovers(data: Path) -> dict[str, int]:
    uploads, registry = data / "uploads", data / "registry"
    staging = list(uploads.glob(".staging-*")) if uploads.exists() else []
    temps = list(registry.rglob("*.tmp")) if registry.exists() else []
    return {
        "staging_dirs": len(staging),
        "staging_bytes": sum(tree_bytes(p) for p in staging),
        "registry_tmp_files": len(temps),
        "registry_tmp_bytes": sum(p.stat().st_size for p in temps),
    }


def gauge(url: str) -> dict[str, float]:
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text)}
    return {s.labels["kind"]: s.value for s in families["care_data_dir_bytes"].samples}


def measure_ready_uploads(data: Path, tasks: int, logs: Path) -> dict[str, Any]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_server("ready", port, base_env(data_dir=str(data), **ENV), logs)
    try:
        ids, queued_bytes = [], 0
        for t in range(tasks):
            files, labels = task_body([f"t{t}-a", f"t{t}-b"], 20, offset=t * 10_000)
            response = httpx.post(f"{url}/tasks", files=files, data={"labels": labels}, timeout=60)
            assert response.status_code == 202, response.text
            ids.append(response.json()["task_id"])
            queued_bytes = max(queued_bytes, tree_bytes(data / "uploads"))
        for task_id in ids:
            wait_until(
                task_id,
                lambda tid=task_id: httpx.get(f"{url}/tasks/{tid}").json()["status"] == "ready" or None,  # type: ignore[misc]
                300,
                server.tail,
            )
        time.sleep(11)  # the gauge re-measures at most every 10 s
        return {
            "tasks": tasks,
            "uploads_bytes_peak_while_queued": queued_bytes,
            "uploads_bytes_after_ready": tree_bytes(data / "uploads"),
            "upload_dirs_after_ready": len(list((data / "uploads").iterdir())),
            "care_data_dir_bytes_after_ready": gauge(url),
        }
    finally:
        server.stop()


def crash_mid_upload(data: Path, logs: Path) -> dict[str, Any]:
    """SIGKILL the server group as soon as big uploads are being staged (fsync per image: a window of seconds)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_server("crash", port, base_env(data_dir=str(data), **ENV), logs)
    results: list[str] = []

    def upload(n: int) -> None:
        files, labels = task_body([f"big{n}-a", f"big{n}-b"], 1500, offset=100_000 * (n + 1))
        try:
            results.append(str(httpx.post(f"{url}/tasks", files=files, data={"labels": labels}, timeout=120)))
        except httpx.HTTPError as error:
            results.append(type(error).__name__)

    threads = [threading.Thread(target=upload, args=(n,)) for n in range(3)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list((data / "uploads").glob(".staging-*/images/*"))) < 200:
        time.sleep(0.005)
    os.killpg(server.pid, signal.SIGKILL)
    server.popen.wait(10)
    for thread in threads:
        thread.join(130)
    return {"client_results": results, **leftovers(data)}


def crash_mid_publish(data: Path) -> dict[str, Any]:
    """SIGKILL a publisher (400 tasks in one version) as soon as its temp files appear."""
    args = [f"{k}={v}" for k, v in ENV.items() if k in ("backbone", "backbone_weights", "image_size", "device")]
    env = base_env()
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    proc = subprocess.Popen([sys.executable, "-c", PUBLISHER, str(data), *args], env=env, stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline().strip() == b"publishing"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list((data / "registry").rglob("*.tmp"))) < 3:
        time.sleep(0.001)
    proc.kill()
    proc.wait(10)
    return leftovers(data)


def restart(data: Path, logs: Path, name: str, **care: str) -> dict[str, Any]:
    port = free_port()
    server = start_server(name, port, base_env(data_dir=str(data), **{**ENV, **care}), logs)
    try:
        return {**leftovers(data), "care_data_dir_bytes": gauge(f"http://127.0.0.1:{port}")}
    finally:
        server.stop()


def verify(data: Path) -> dict[str, Any]:
    result = subprocess.run(
        [CARE_SERVE, "registry", "verify", "--data-dir", str(data)], capture_output=True, text=True, check=False
    )
    return {"exit": result.returncode, "last_line": result.stdout.strip().splitlines()[-1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="care-probe-") as tmp:
        root = Path(tmp)
        data = root / "data"
        report: dict[str, Any] = {"ready_uploads": measure_ready_uploads(data, args.tasks, root)}
        report["after_kill9_mid_upload"] = crash_mid_upload(data, root)
        report["after_kill9_mid_publish"] = crash_mid_publish(data)
        report["verify_after_crashes"] = verify(data)
        report["restart_default_grace"] = restart(data, root, "restart1")
        report["restart_grace_0"] = restart(data, root, "restart2", sweep_grace_s="0")
        report["verify_after_sweep"] = verify(data)
        print(json.dumps(report, indent=2))  # noqa: T201 - the report is the probe's output


if __name__ == "__main__":
    main()
