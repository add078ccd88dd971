"""The deployment topology of docker-compose.yml, without containers, on loopback.

Two `care-serve serve --no-worker` processes and two `care-serve worker` processes share one registry directory and
one job database (CARE_DATA_DIR); a real Prometheus scrapes both servers with the scrape job and the alert rules of
docker/prometheus.yml and docker/alerts.yml. Where the machine allows a private mount namespace (root), server 2
sees the registry through a read-only bind mount, as the compose api containers do.

Checked:
* a task taught through server 1 is served by server 2 within the poll interval (plus the time to load it), and
  both servers answer the same images identically;
* Prometheus's query API returns care_router_cache_resident_bytes for both targets, equal to what each server's
  /model says; every alert rule evaluates and every dashboard query parses;
* of two workers only the lease holder ever trains: trainings never overlap and each version adds exactly one task;
  after the holder is killed with SIGKILL the other worker takes the lineage over and trains the next task.

The whole topology runs three times: with the job database in the data directory (SQLite, the default), on a
PostgreSQL server on loopback (CARE_JOBS_URL, tests/postgres.py; skipped where it is not installed), and on
PostgreSQL with the registry in a bucket of moto's S3 server on loopback (CARE_REGISTRY_URL, tests/moto_s3.py) and a
data directory of its own for every process: the only state they share is the database and the bucket, so every
task a worker trains was read from the bucket (uploads included). That variant also kills the lease holder with
SIGKILL while it trains, as seen from a worker on "another host" (its host name differs, so it cannot see that the
holder's pid is gone): the task is taken over once the holder's lease expires and trained again, nothing lost.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from bench.datasets import Task, make_stream, png_bytes
from bench.harness import CARE_SERVE, Process, free_port, start, wait_task, wait_until
from registry import Registry
from service.jobs import JobRecord, JobStore
from service.jobs.store import open_upload_store
from tests.moto_s3 import CREDENTIALS, moto_s3_server

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(420)]

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"

POLL_INTERVAL_S = 0.5
# Reading a new version's files, verifying their hashes and swapping it in, on a loaded 2-core machine.
LOAD_MARGIN_S = 3.0
LEASE_TTL_S = 60.0
S3_LEASE_TTL_S = 30.0  # the S3 variant waits for one lease expiry (the holder killed mid-task)
STARTUP_TIMEOUT_S = 150.0
TRAIN_TIMEOUT_S = 180.0
SCRAPE_TIMEOUT_S = 60.0

# A small, fast configuration of the bundled backbone (offline weights): tasks train in seconds on a CPU.
COMMON_ENV = {
    "CARE_BACKBONE": "efficientnet_lite0",
    "CARE_IMAGE_SIZE": "64",
    "CARE_TRAIN_EPOCHS": "2",
    "CARE_ALIGN_EPOCHS": "1",
    "CARE_POLL_INTERVAL_S": str(POLL_INTERVAL_S),
    "CARE_SERVE_THREADS": "1",
    "CARE_TRAIN_THREADS": "1",
    "CARE_WORKER_POLL_S": "0.2",
    "CARE_PROVISIONAL": "false",  # one version per task, as the checks below count (tests/e2e/test_provisional.py)
    "CARE_WORKER_LEASE_TTL_S": str(LEASE_TTL_S),
    "CARE_DEVICE": "cpu",
    "HF_HUB_OFFLINE": "1",
    "OMP_NUM_THREADS": "1",
}

if not Path(PROMETHEUS).is_file():
    pytest.skip(
        f"{PROMETHEUS} is missing: install the Debian package `prometheus` (`make apt-deps` does)",
        allow_module_level=True,
    )


# ---- processes -------------------------------------------------------------------------------------------------


@dataclass
class Server:
    process: Process
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"


@dataclass(frozen=True)
class Backends:
    """Where the stack keeps its state: the job database and the registry (None: in the shared data directory)."""

    jobs_url: str | None = None
    registry_url: str | None = None  # s3://bucket/prefix: then every process has a data directory of its own
    endpoint_url: str | None = None

    def env(self) -> dict[str, str]:
        env = {} if self.jobs_url is None else {"CARE_JOBS_URL": self.jobs_url}
        if self.registry_url is not None and self.endpoint_url is not None:
            env.update(CREDENTIALS, CARE_REGISTRY_URL=self.registry_url, CARE_REGISTRY_ENDPOINT_URL=self.endpoint_url)
        return env


@dataclass
class Stack:
    data_dir: Path  # the shared data directory; with S3, that of this test process alone
    jobs_db: Path | str  # the SQLite file, or the postgresql:// URL
    servers: list[Server]
    workers: list[Process]
    prometheus: Process
    prometheus_url: str
    readonly_registry: bool
    backends: Backends = field(default_factory=Backends)
    env: dict[str, str] = field(default_factory=dict)
    logs_dir: Path = Path()
    lease_ttl_s: float = LEASE_TTL_S
    processes: list[Process] = field(default_factory=list)

    def logs(self) -> str:
        return "\n".join(p.tail() for p in self.processes)

    def jobs(self) -> JobStore:
        shared = open_upload_store(self.backends.registry_url, self.backends.endpoint_url)
        return JobStore(self.jobs_db, self.data_dir / "uploads", shared_uploads=shared)

    def registry(self) -> Registry:
        if self.backends.registry_url is None:
            return Registry.from_path(self.data_dir / "registry")
        from registry.s3 import S3Backend

        url, endpoint = self.backends.registry_url, self.backends.endpoint_url
        return Registry(S3Backend.from_url(url, cache_dir=self.data_dir / "registry-cache", endpoint_url=endpoint))

    def process_env(self, name: str) -> dict[str, str]:
        return process_env(self.env, self.backends, name)


def process_env(env: dict[str, str], backends: Backends, name: str) -> dict[str, str]:
    """The environment of process ``name``: with the registry on S3, a data directory of its own."""
    if backends.registry_url is None:
        return env
    return {**env, "CARE_DATA_DIR": str(Path(env["CARE_DATA_DIR"]).parent / f"data-{name}")}


def readonly_mount_prefix(directory: Path) -> list[str] | None:
    """A command prefix that runs a program with `directory` bind-mounted read-only, or None where not allowed."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return None
    mount = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0"'
    probe = [unshare, "-m", "sh", "-c", f'{mount} && ! touch "$0/.probe" 2>/dev/null', str(directory)]
    try:
        if subprocess.run(probe, capture_output=True, timeout=30).returncode != 0:
            return None
    except (OSError, subprocess.TimeoutExpired):
        return None
    return [unshare, "-m", "sh", "-c", f'{mount} && exec "$@"', str(directory)]


def prometheus_config(targets: list[str], path: Path) -> None:
    """docker/prometheus.yml with the api replicas' DNS discovery replaced by the loopback servers."""
    config = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "care-api"]
    del job["dns_sd_configs"]
    job["static_configs"] = [{"targets": targets}]
    job["scrape_interval"] = "1s"
    config["scrape_configs"] = [job]
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(DOCKER / name) for name in config["rule_files"]]
    path.write_text(yaml.safe_dump(config))


@pytest.fixture(
    scope="module",
    params=["sqlite", "postgresql", "postgresql-s3"],
    ids=["jobs-sqlite", "jobs-postgresql", "jobs-postgresql-registry-s3"],
)
def backends(request: pytest.FixtureRequest) -> Iterator[Backends]:
    """The stack's CARE_JOBS_URL (None: the data directory's SQLite file) and, last, CARE_REGISTRY_URL in moto."""
    if request.param == "sqlite":
        yield Backends()
        return
    if request.param == "postgresql-s3":
        pytest.importorskip("boto3")
        pytest.importorskip("moto")
    with request.getfixturevalue("postgres").database() as url:
        if request.param == "postgresql":
            yield Backends(url)
            return
        with pytest.MonkeyPatch.context() as patch:
            for name, value in CREDENTIALS.items():
                patch.setenv(name, value)
            with moto_s3_server() as endpoint:
                import boto3

                boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="care-topology")
                yield Backends(url, "s3://care-topology/registry", endpoint)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, backends: Backends) -> Iterator[Stack]:
    base = tmp_path_factory.mktemp("topology")
    data_dir, logs = base / "data", base / "logs"
    s3 = backends.registry_url is not None
    (data_dir / "registry").mkdir(parents=True)
    logs.mkdir()
    lease_ttl_s = S3_LEASE_TTL_S if s3 else LEASE_TTL_S
    env = {k: v for k, v in os.environ.items() if not k.startswith("CARE_")}
    env.update(COMMON_ENV, CARE_DATA_DIR=str(data_dir), CARE_WORKER_LEASE_TTL_S=str(lease_ttl_s), **backends.env())
    jobs_db = backends.jobs_url if backends.jobs_url is not None else data_dir / "jobs.sqlite3"
    readonly = None if s3 else readonly_mount_prefix(data_dir / "registry")

    processes: list[Process] = []
    try:
        servers = []
        for index, prefix in ((1, []), (2, readonly or [])):
            port = free_port()
            argv = [*prefix, CARE_SERVE, "serve", "--host", "127.0.0.1", "--port", str(port), "--no-worker"]
            server_env = {**process_env(env, backends, f"server{index}"), "CARE_RUN_WORKER": "false"}
            process = start(f"server{index}", argv, server_env, logs)
            processes.append(process)
            servers.append(Server(process, port))
        workers = [
            start(f"worker{i}", [CARE_SERVE, "worker"], process_env(env, backends, f"worker{i}"), logs) for i in (1, 2)
        ]
        processes += workers
        prometheus_port = free_port()
        prometheus_config([s.target for s in servers], base / "prometheus.yml")
        prometheus = start(
            "prometheus",
            [
                PROMETHEUS,
                f"--config.file={base / 'prometheus.yml'}",
                f"--storage.tsdb.path={base / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{prometheus_port}",
                "--log.level=warn",
            ],
            env,
            logs,
        )
        processes.append(prometheus)
        stack = Stack(
            data_dir,
            jobs_db,
            servers,
            workers,
            prometheus,
            f"http://127.0.0.1:{prometheus_port}",
            readonly is not None,
            backends,
            env,
            logs,
            lease_ttl_s,
        )
        stack.processes = processes
        for server in servers:
            ready = functools.partial(_ready, server, processes)
            wait_until(f"{server.process.name} to be ready", ready, STARTUP_TIMEOUT_S, stack.logs)
        yield stack
    finally:
        for process in processes:  # SIGTERM to all first, so that they wind down in parallel
            if process.popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    process.popen.terminate()
        for process in processes:
            process.stop()


def _ready(server: Server, processes: list[Process]) -> bool | None:
    for process in processes:
        if process.popen.poll() is not None:
            raise AssertionError(f"{process.name} exited early\n{process.tail(60)}")
    return True if httpx.get(f"{server.url}/readyz", timeout=5).status_code == 200 else None


# ---- helpers ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tasks() -> list[Task]:
    return list(make_stream("digits5", train_per_class=10, test_per_class=4).tasks)


def teach(server: Server, task: Task) -> str:
    files = [("images", (f"{i}.png", png_bytes(image), "image/png")) for i, image in enumerate(task.train.images)]
    response = httpx.post(f"{server.url}/tasks", files=files, data={"labels": task.train.labels}, timeout=60)
    assert response.status_code == 202, response.text
    task_id: str = response.json()["task_id"]
    return task_id


def wait_learned(stack: Stack, server: Server, task_id: str) -> dict[str, Any]:
    record = wait_task(server.url, task_id, stack.logs, TRAIN_TIMEOUT_S)
    assert record["status"] == "ready", f"{record}\n{stack.logs()}"
    return record


def predict(server: Server, task: Task) -> dict[str, Any]:
    files = [("images", (f"{i}.png", png_bytes(image), "image/png")) for i, image in enumerate(task.test.images)]
    response = httpx.post(f"{server.url}/predict", files=files, params={"top_k": 3}, timeout=60)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def prom_query(stack: Stack, query: str) -> list[dict[str, Any]]:
    response = httpx.get(f"{stack.prometheus_url}/api/v1/query", params={"query": query}, timeout=10)
    body = response.json()
    assert body["status"] == "success", f"{query}: {body}"
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def timestamp(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def owner_pid(owner: str | None) -> int:
    assert owner is not None
    return int(owner.split(":")[1])  # <host>:<pid>:<random>, service.jobs.db.make_owner_id


# ---- tests -----------------------------------------------------------------------------------------------------


def test_a_task_taught_through_server_1_is_served_by_server_2(stack: Stack, tasks: list[Task]) -> None:
    server1, server2 = stack.servers
    task = tasks[0]
    task_id = teach(server1, task)
    record = wait_learned(stack, server1, task_id)
    version = record["model_version"]
    seen_ready = time.monotonic()

    def serving(server: Server) -> Callable[[], int | None]:
        def version_served() -> int | None:
            served = httpx.get(f"{server.url}/model", timeout=10).json()["model_version"]
            return served if served is not None and served >= version else None

        return version_served

    # Both servers poll the registry; neither is told (the one that took the upload included).
    for server in (server2, server1):
        wait_until(f"{server.process.name} to serve version {version}", serving(server), 60, stack.logs)
        lag = time.monotonic() - seen_ready
        assert lag <= POLL_INTERVAL_S + LOAD_MARGIN_S, f"{server.process.name} took {lag:.2f}s to serve {version}"

    answers = [predict(server, task) for server in (server1, server2)]
    assert [a["model_version"] for a in answers] == [version, version]
    tops = [[p["top"][0] for p in a["predictions"]] for a in answers]
    assert len(tops[1]) == len(task.test.images)
    for top in tops[1]:
        if top["label"] in task.classes:
            assert top["task_id"] == task_id
    learned = {p["label"] for p in tops[1]}
    assert learned & set(task.classes), f"server 2 predicts none of the new labels {task.classes}: {tops[1]}"
    # One version, one model: both servers answer every image alike.
    assert [t["label"] for t in tops[0]] == [t["label"] for t in tops[1]]
    for a, b in zip(tops[0], tops[1], strict=True):
        assert abs(a["score"] - b["score"]) < 1e-4

    if stack.readonly_registry:  # as in docker-compose.yml, server 2 reads the registry through a read-only mount
        mountinfo = Path(f"/proc/{server2.process.pid}/mountinfo").read_text().splitlines()
        registry = str(stack.data_dir / "registry")
        options = [line.split()[5].split(",") for line in mountinfo if line.split()[4] == registry]
        assert options and "ro" in options[-1], mountinfo


def test_image_healthcheck_reports_a_real_server_ready(stack: Stack) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CARE_")}
    script = [sys.executable, str(DOCKER / "healthcheck.py")]
    ready = subprocess.run(script, env={**env, "CARE_PORT": str(stack.servers[0].port)}, timeout=30)
    assert ready.returncode == 0
    down = subprocess.run(script, env={**env, "CARE_PORT": str(free_port())}, capture_output=True, timeout=30)
    assert down.returncode == 1


def test_prometheus_scrapes_both_servers(stack: Stack) -> None:
    targets = {s.target: s for s in stack.servers}

    def resident_matches_model() -> bool | None:
        rows = prom_query(stack, 'care_router_cache_resident_bytes{job="care-api", tier="device"}')
        scraped = {row["metric"]["instance"]: float(row["value"][1]) for row in rows}
        if set(scraped) != set(targets):
            return None
        model = {t: httpx.get(f"{s.url}/model", timeout=10).json()["router_cache"] for t, s in targets.items()}
        return True if all(scraped[t] == model[t]["resident_bytes"] for t in targets) else None

    wait_until("Prometheus to scrape both servers", resident_matches_model, SCRAPE_TIMEOUT_S, stack.logs)
    both = prom_query(stack, "care_router_cache_resident_bytes")
    assert {row["metric"]["instance"] for row in both} == set(targets)
    assert {row["metric"]["tier"] for row in both} == {"device", "host"}
    up = prom_query(stack, 'up{job="care-api"}')
    assert {(row["metric"]["instance"], row["value"][1]) for row in up} == {(t, "1") for t in targets}

    # docker/alerts.yml: every rule loaded and evaluated without error against the real series.
    def rules_evaluated() -> list[dict[str, Any]] | None:
        groups = httpx.get(f"{stack.prometheus_url}/api/v1/rules", timeout=10).json()["data"]["groups"]
        rules: list[dict[str, Any]] = [rule for group in groups for rule in group["rules"]]
        return rules if rules and all(r["health"] != "unknown" for r in rules) else None

    rules = wait_until("the alert rules to be evaluated", rules_evaluated, SCRAPE_TIMEOUT_S, stack.logs)
    expected = yaml.safe_load((DOCKER / "alerts.yml").read_text())
    assert len(rules) == sum(len(g["rules"]) for g in expected["groups"])
    assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError")) for r in rules]
    assert not [r["name"] for r in rules if r["state"] == "firing"]

    # docker/grafana/dashboards: every panel query runs (Grafana's variables replaced by what they stand for).
    dashboard = json.loads((DOCKER / "grafana" / "dashboards" / "care-serve.json").read_text())
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            prom_query(stack, target["expr"].replace("$__rate_interval", "1m").replace("$instance", ".*"))


def test_only_the_lease_holder_trains_and_a_survivor_takes_over(stack: Stack, tasks: list[Task]) -> None:
    server1, server2 = stack.servers
    jobs = stack.jobs()
    registry = stack.registry()
    try:
        holder = wait_until("a worker to hold the lineage lease", lambda: jobs.lease_holder("lineage"), 60, stack.logs)
        by_pid = {w.pid: w for w in stack.workers}
        assert owner_pid(holder) in by_pid, f"lease held by {holder}, not by one of our workers {list(by_pid)}"
        first = by_pid[owner_pid(holder)]
        (second,) = [w for w in stack.workers if w is not first]

        # Two workers are running; only the holder trains.
        ids = [teach(server2, tasks[1]), teach(server2, tasks[2])]
        for task_id in ids:
            wait_learned(stack, server1, task_id)
        records = {r.task_id: r for r in jobs.list_tasks()}
        assert all(records[i].owner == holder for i in ids), [(i, records[i].owner) for i in ids]
        assert not [r for r in records.values() if r.owner is not None and owner_pid(r.owner) == second.pid]
        check_one_trainer_at_a_time(jobs.list_tasks(), registry)

        # Kill the holder while it is idle: the other worker takes the lineage over and trains the next task.
        def idle() -> bool | None:
            return True if jobs.counts_by_status()["training"] == 0 else None

        wait_until("the holder to be idle", idle, 60, stack.logs)
        os.kill(first.pid, signal.SIGKILL)
        first.popen.wait(30)
        submitted = time.monotonic()
        task_id = teach(server1, tasks[3])
        record = wait_learned(stack, server2, task_id)
        took = time.monotonic() - submitted
        stored = jobs.get(task_id)
        assert owner_pid(stored.owner) == second.pid, stored.owner
        new_holder = jobs.lease_holder("lineage")
        assert new_holder is not None and owner_pid(new_holder) == second.pid
        # The survivor saw that the holder's process is gone and did not wait for its lease to expire.
        assert took < stack.lease_ttl_s * 0.75, f"took {took:.1f}s: the takeover waited for the lease TTL"
        assert record["index"] == len(registry.latest_manifest().tasks) - 1  # type: ignore[union-attr]
        check_one_trainer_at_a_time(jobs.list_tasks(), registry)
    finally:
        jobs.close()


# `care-serve worker` whose host name reads as another host's: the pids of this host's workers mean nothing to it,
# so it takes a lineage over only once the holder's lease has expired.
ANOTHER_HOST = (
    "import socket, sys; socket.gethostname = lambda: 'care-topology-other-host'; "
    "from service.cli import main; raise SystemExit(main(sys.argv[1:]))"
)


def test_with_s3_a_holder_killed_mid_task_is_taken_over_when_its_lease_expires(stack: Stack) -> None:
    if stack.backends.registry_url is None:
        pytest.skip("the S3 variant only (workers with data directories of their own, one on another host)")
    server1, server2 = stack.servers
    # More images than the other tasks, so that training lasts long enough to be caught; classes nobody else uses.
    task = make_stream("digits5", train_per_class=40, test_per_class=4).tasks[4]
    jobs = stack.jobs()
    registry = stack.registry()
    try:
        holder = wait_until("a worker to hold the lineage lease", lambda: jobs.lease_holder("lineage"), 60, stack.logs)
        (trainer,) = [w for w in stack.workers if w.pid == owner_pid(holder)]
        for worker in stack.workers:  # a survivor on this host would take over at once, seeing the pid gone
            if worker is not trainer and worker.popen.poll() is None:
                os.kill(worker.pid, signal.SIGKILL)
                worker.popen.wait(30)
        other = start(
            "worker3", [sys.executable, "-c", ANOTHER_HOST, "worker"], stack.process_env("worker3"), stack.logs_dir
        )
        stack.processes.append(other)
        other.wait(
            "worker3 to start", lambda: True if " started (" in other.log.read_text() else None, STARTUP_TIMEOUT_S
        )

        task_id = teach(server2, task)

        def training() -> JobRecord | None:
            record = jobs.get(task_id)
            return record if record.status == "training" and record.progress is not None else None

        record = wait_until(f"{trainer.name} to train {task_id}", training, TRAIN_TIMEOUT_S, stack.logs, 0.02)
        assert record.owner == holder
        os.kill(trainer.pid, signal.SIGKILL)
        killed_at = time.time()
        trainer.popen.wait(30)

        learned = wait_learned(stack, server1, task_id)
        stored = jobs.get(task_id)
        assert owner_pid(stored.owner) == other.pid and stored.attempts == 2, stored
        assert stored.started_at is not None
        # The holder renewed its lease at most a third of the TTL before it died: the takeover waited for the rest.
        waited = timestamp(stored.started_at).timestamp() - killed_at
        assert waited >= stack.lease_ttl_s / 2, f"retrained {waited:.1f}s after the kill, before the lease expired"
        assert learned["index"] == len(registry.latest_manifest().tasks) - 1  # type: ignore[union-attr]
        check_one_trainer_at_a_time(jobs.list_tasks(), registry)

        version = learned["model_version"]

        def serves(server: Server) -> bool | None:
            return True if httpx.get(f"{server.url}/model", timeout=10).json()["model_version"] == version else None

        for server in (server1, server2):
            wait_until(f"{server.process.name} to serve {version}", functools.partial(serves, server), 60, stack.logs)
        answer = predict(server2, task)
        assert answer["model_version"] == version
        assert {p["top"][0]["label"] for p in answer["predictions"]} & set(task.classes)

        # The uploads lived in the bucket: worker3 read this one from there, and every copy went once it was learned.
        assert jobs.shared_uploads.stored() == {}
        assert not list((Path(stack.process_env("worker3")["CARE_DATA_DIR"]) / "uploads").glob("t-*"))
    finally:
        jobs.close()


def check_one_trainer_at_a_time(records: list[JobRecord], registry: Registry) -> None:
    """Trainings never overlapped, and each published version adds exactly one task to its parent."""
    ready = sorted((r for r in records if r.status == "ready"), key=lambda r: r.index if r.index is not None else -1)
    assert [r.index for r in ready] == list(range(len(ready)))
    for earlier, later in itertools.pairwise(ready):
        assert earlier.finished_at is not None and later.started_at is not None
        assert timestamp(later.started_at) >= timestamp(earlier.finished_at), (earlier, later)
    current = registry.current_version()
    assert current == len(ready)
    previous: list[str] = []
    for version in range(1, current + 1):
        ids = [t.task_id for t in registry.load_manifest(version).tasks]
        assert ids[:-1] == previous and len(ids) == version, (version, ids)
        previous = ids
    assert previous == [r.task_id for r in ready]
    assert all(r.model_version == r.index + 1 for r in ready if r.index is not None)
