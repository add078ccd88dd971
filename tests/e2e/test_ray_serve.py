"""deploy/ray/config.yaml on a real local Ray cluster, on loopback (issue 16, part 3).

`ray.init` with 2 CPUs and no dashboard; the application of deploy/ray/config.yaml deployed as `serve run` deploys it
(`serve_start` + `deploy_apps`), with a tiny model (timm's `test_vit`, random weights, 32 px), a SQLite job store and
a registry directory in a temporary data directory, two fixed ingress replicas instead of the autoscaling range, and
half a CPU per replica. Checked, all through Serve's HTTP proxy: a task taught with POST /tasks is trained by the
TrainingWorker deployment (which holds the lineage lease) and served; both ingress replicas answer (by their
X-Care-Replica header) with the new version, and each replica's own metrics port reports it; /predict answers it.

Skipped when ray is not installed (`pip install -e '.[ray]'`; the dev extra brings it).
"""

from __future__ import annotations

import copy
import glob
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from bench.datasets import Task, make_stream, png_bytes
from bench.harness import free_port, wait_task, wait_until
from service.jobs import JobStore

ray = pytest.importorskip("ray", reason="ray is not installed: pip install -e '.[ray]' (the dev extra brings it)")
serve = pytest.importorskip("ray.serve", reason="ray[serve] is not installed: pip install -e '.[ray]'")

from ray.serve._private import api as serve_api  # noqa: E402 - only once ray is known to be there
from ray.serve.schema import ServeDeploySchema  # noqa: E402

from deploy.ray.app import INGRESS, REPLICA_HEADER, WORKER  # noqa: E402

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "deploy" / "ray" / "config.yaml"
APP = "care"

DEPLOY_TIMEOUT_S = 240.0  # Ray's start-up (20-60 s on a loaded 2-core box) is before this
TRAIN_TIMEOUT_S = 240.0
SERVED_TIMEOUT_S = 60.0

TINY = {
    "CARE_BACKBONE": "test_vit",
    "CARE_BACKBONE_WEIGHTS": "random",
    "CARE_IMAGE_SIZE": "32",
    "CARE_TRAIN_EPOCHS": "1",
    "CARE_ALIGN_EPOCHS": "1",
    "CARE_TRAIN_BATCH_SIZE": "8",
    "CARE_POLL_INTERVAL_S": "0.2",
    "CARE_WORKER_POLL_S": "0.2",
    "CARE_SERVE_THREADS": "1",
    "CARE_TRAIN_THREADS": "1",
    "CARE_MAX_BATCH_WAIT_MS": "1",
    "CARE_PROVISIONAL": "false",  # one version: the trained one
    "CARE_DEVICE": "cpu",
    "CARE_ROUTER_CACHE_BYTES": str(16 << 20),
    "CARE_WORKER_LEASE_TTL_S": "30",
    "CARE_LOG_LEVEL": "INFO",
    "HF_HUB_OFFLINE": "1",
    "OMP_NUM_THREADS": "1",
}


def free_port_pair() -> int:
    """A port p such that p and p + 1 are both free (the two replicas' metrics ports)."""
    for _ in range(50):
        port = free_port()
        if port < 65535:
            try:
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", port + 1))
                return port
            except OSError:
                continue
    raise AssertionError("no two consecutive free ports")


def deployed_config(data_dir: Path, http_port: int, metrics_port: int) -> dict[str, Any]:
    """deploy/ray/config.yaml with the test's data directory, tiny model, ports and CPU shares."""
    config: dict[str, Any] = copy.deepcopy(yaml.safe_load(CONFIG.read_text()))
    config["http_options"].update(host="127.0.0.1", port=http_port)
    (app,) = config["applications"]
    assert app["name"] == APP
    app["args"]["metrics_port"] = metrics_port
    app["args"]["metrics_host"] = "127.0.0.1"
    env = {**app["runtime_env"]["env_vars"], **TINY, "CARE_DATA_DIR": str(data_dir)}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    app["runtime_env"] = {"env_vars": env}
    deployments = {d["name"]: d for d in app["deployments"]}
    ingress, worker = deployments[INGRESS], deployments[WORKER]
    del ingress["autoscaling_config"]
    ingress["num_replicas"] = 2
    ingress["ray_actor_options"] = {"num_cpus": 0.5}
    worker["ray_actor_options"] = {"num_cpus": 0.5}
    return config


class Logs:
    """The tails of the Ray session's serve and worker logs, for failure messages."""

    def __init__(self, temp_dir: str) -> None:
        self.temp_dir = temp_dir

    def __call__(self) -> str:
        patterns = ("serve/replica_*.log", "serve/controller_*.log", "worker-*.err")
        parts = []
        for pattern in patterns:
            for path in sorted(glob.glob(os.path.join(self.temp_dir, "session_latest", "logs", pattern))):
                lines = Path(path).read_text(errors="replace").splitlines()[-25:]
                if lines:
                    parts.append(f"--- {os.path.basename(path)}\n" + "\n".join(lines))
        return "\n".join(parts)[-20000:]


@pytest.fixture
def ray_temp_dir() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's unix socket paths live under it
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def task() -> Task:
    return make_stream("digits5", train_per_class=8, test_per_class=3).tasks[0]


def app_running(logs: Logs) -> bool | None:
    status = serve.status().applications.get(APP)
    if status is None:
        return None
    if status.status == "DEPLOY_FAILED":
        raise AssertionError(f"deploy failed: {status.message}\n{logs()}")
    return True if status.status == "RUNNING" else None


def test_two_ingress_replicas_and_the_worker_on_ray_serve(tmp_path: Path, ray_temp_dir: str, task: Task) -> None:
    started = time.monotonic()
    yaml_config = ServeDeploySchema.model_validate(yaml.safe_load(CONFIG.read_text()))  # the file as shipped
    assert {d.name for d in yaml_config.applications[0].deployments} == {INGRESS, WORKER}

    data_dir = tmp_path / "data"
    data_dir.mkdir()
    http_port, metrics_port = free_port(), free_port_pair()
    url = f"http://127.0.0.1:{http_port}"
    config = ServeDeploySchema.model_validate(deployed_config(data_dir, http_port, metrics_port))
    logs = Logs(ray_temp_dir)
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        namespace="serve",
        _temp_dir=ray_temp_dir,
        log_to_driver=False,
    )
    try:
        client = serve_api.serve_start(
            http_options=config.http_options.model_dump(), proxy_location=config.proxy_location
        )
        client.deploy_apps(config, _blocking=False)
        wait_until("the application to be RUNNING", lambda: app_running(logs), DEPLOY_TIMEOUT_S, logs, 1.0)
        deployed = time.monotonic()

        def ready() -> bool | None:
            return True if httpx.get(f"{url}/readyz", timeout=10).status_code == 200 else None

        wait_until("/readyz through the proxy", ready, 60, logs)

        # Teach a task through the proxy; the worker deployment trains it.
        files = [("images", (f"{i}.png", png_bytes(im), "image/png")) for i, im in enumerate(task.train.images)]
        response = httpx.post(f"{url}/tasks", files=files, data={"labels": task.train.labels}, timeout=120)
        assert response.status_code == 202, response.text
        task_id = response.json()["task_id"]
        record = wait_task(url, task_id, logs, TRAIN_TIMEOUT_S, interval_s=0.5)
        assert record["status"] == "ready", f"{record}\n{logs()}"
        version = record["model_version"]
        trained = time.monotonic()

        # Both replicas serve it: the proxy spreads GET /model over them, each names itself.
        served: dict[str, int | None] = {}

        def both_serve() -> dict[str, int | None] | None:
            response = httpx.get(f"{url}/model", timeout=10)
            served[response.headers[REPLICA_HEADER]] = response.json()["model_version"]
            return dict(served) if len(served) == 2 and all(v == version for v in served.values()) else None

        replicas = wait_until(f"two replicas to serve version {version}", both_serve, SERVED_TIMEOUT_S, logs)
        assert len(served) == 2, served

        # /metrics per replica: each replica's own port reports its own served version and router cache.
        for port in (metrics_port, metrics_port + 1):
            text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
            assert f"care_model_version {float(version)}" in text, text[:2000]
            assert "care_router_cache_capacity_bytes" in text

        # Predict through the proxy.
        files = [("images", (f"{i}.png", png_bytes(im), "image/png")) for i, im in enumerate(task.test.images)]
        response = httpx.post(f"{url}/predict", files=files, params={"top_k": 1}, timeout=60)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["model_version"] == version
        assert response.headers[REPLICA_HEADER] in replicas
        tops = [p["top"][0] for p in body["predictions"]]
        assert len(tops) == len(task.test.images)
        assert {t["label"] for t in tops} <= set(task.classes)
        assert all(t["task_id"] == task_id for t in tops)

        # The worker deployment trained it and holds the lineage lease in the shared job store.
        status = serve.get_deployment_handle(WORKER, app_name=APP).status.remote().result(timeout_s=30)
        assert status["running"] and status["holds_lease"], status
        jobs = JobStore(data_dir / "jobs.sqlite3", data_dir / "uploads")
        try:
            assert jobs.lease_holder("lineage") == status["owner"]
            assert jobs.get(task_id).owner == status["owner"]
        finally:
            jobs.close()
        print(  # noqa: T201 - the timings are what a reader of -s wants
            f"ray serve: deployed in {deployed - started:.1f}s, trained in {trained - deployed:.1f}s, "
            f"served by both replicas {time.monotonic() - trained:.1f}s later"
        )
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
