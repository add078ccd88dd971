"""The deployment files stay in step with the code: settings, CLI, metric names, ports, paths and pins.

No Docker engine runs here, so these read the files (the compose files through `docker-compose config`, which
`make check-deploy` also runs) and check them against the code they configure: every CARE_ variable is a real
setting and the values the stack passes validate, every command parses with the real CLI, every series the
dashboard and the alert rules query is one the server exports, and the image's healthcheck script works against a
real HTTP server.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.cli import build_parser
from service.metrics import JobSnapshot, Metrics
from service.routers.cache import TieredLRUCache
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
COMPOSE_FILES = {"cpu": ["docker-compose.yml"], "gpu": ["docker-compose.yml", "docker/compose.gpu.yml"]}
CARE_SERVICES = ("api", "worker")
CARE_VARIABLE = re.compile(r"\bCARE_[A-Z0-9_]+\b")
SETTINGS_VARIABLES = {f"CARE_{name.upper()}" for name in Settings.model_fields}


# ---- helpers ---------------------------------------------------------------------------------------------------


def compose_config(stack: str) -> dict[str, Any]:
    """The stack as docker-compose resolves it (anchors merged, variables interpolated with their defaults)."""
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose is not installed (`make apt-deps` installs the Debian package)")
    args = [binary]
    for name in COMPOSE_FILES[stack]:
        args += ["-f", name]
    # Only the defaults written in the files: no .env and no stack variable from the caller's environment.
    env = {key: value for key, value in _clean_env().items() if not _is_stack_variable(key)}
    done = subprocess.run([*args, "config"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    config: dict[str, Any] = yaml.safe_load(done.stdout)
    return config


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("CARE_")}


def _is_stack_variable(name: str) -> bool:
    stack_text = "".join((ROOT / f).read_text() for f in ("docker-compose.yml", "docker/compose.gpu.yml"))
    return f"${{{name}" in stack_text


def mounts(service: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    """target -> (source, read_only) of a resolved service (docker-compose 1.x prints strings, 2.x mappings)."""
    result: dict[str, tuple[str, bool]] = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            result[volume["target"]] = (volume["source"], bool(volume.get("read_only", False)))
        else:
            source, target, *mode = volume.split(":")
            result[target] = (source, mode == ["ro"])
    return result


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of docker/Dockerfile, continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in (DOCKER / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, rest = line.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
    return instructions


def dockerfile_values(keyword: str) -> list[str]:
    return [rest for kw, rest in dockerfile_instructions() if kw == keyword]


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for rest in dockerfile_values("ENV"):
        for item in shlex.split(rest):
            key, _, value = item.partition("=")
            env[key] = value
    return env


def exported_series() -> set[str]:
    """Every series name the server's /metrics can carry, from the real Metrics object."""
    cache: TieredLRUCache[str, bytes] = TieredLRUCache(size_of=len, device_capacity_bytes=1024)
    metrics = Metrics(cache.stats, lambda: JobSnapshot(dict.fromkeys(("queued", "training", "ready", "failed"), 0), []))
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created")}
    names: set[str] = set()
    for family in metrics.registry.collect():
        names.add(family.name)
        names.update(family.name + suffix for suffix in suffixes.get(family.type, ()))
    return names


def series_in(expr: str) -> set[str]:
    return set(re.findall(r"\b(care_[a-z_]+)\b", expr))


# ---- compose ---------------------------------------------------------------------------------------------------


def test_every_care_variable_in_the_deployment_files_is_a_setting() -> None:
    files = ["docker-compose.yml", "docker/compose.gpu.yml", "docker/Dockerfile", "docker/healthcheck.py"]
    files += ["docs/deploy.md"]
    for name in files:
        unknown = set(CARE_VARIABLE.findall((ROOT / name).read_text())) - SETTINGS_VARIABLES
        assert not unknown, f"{name} names CARE_ variables that service/settings.py does not have: {sorted(unknown)}"


@pytest.mark.parametrize("stack", sorted(COMPOSE_FILES))
def test_the_stack_environment_validates_as_settings(stack: str, monkeypatch: pytest.MonkeyPatch) -> None:
    config = compose_config(stack)
    for service in CARE_SERVICES:
        environment = {k: str(v) for k, v in config["services"][service]["environment"].items()}
        assert set(environment) <= SETTINGS_VARIABLES, service
        if environment.get("CARE_DEVICE") == "cuda":  # validated without a GPU; the rest must still validate
            environment["CARE_DEVICE"] = "cpu"
        for key in list(os.environ):
            if key.startswith("CARE_"):
                monkeypatch.delenv(key)
        for key, value in environment.items():
            monkeypatch.setenv(key, value)
        settings = Settings()
        assert settings.data_dir == Path("/data")
        assert settings.router_cache_bytes is not None, "an empty CARE_ROUTER_CACHE_BYTES would mean unbounded"
        if service == "api":
            assert settings.run_worker is False


def test_servers_and_worker_agree_on_every_shared_setting() -> None:
    for stack in COMPOSE_FILES:
        services = compose_config(stack)["services"]
        api, worker = (services[name]["environment"] for name in CARE_SERVICES)
        shared = set(api) & set(worker)
        assert {"CARE_BACKBONE", "CARE_SITES", "CARE_IMAGE_SIZE", "CARE_DATA_DIR", "CARE_DEVICE"} <= shared
        assert {key: api[key] for key in shared} == {key: worker[key] for key in shared}, stack


def test_commands_parse_with_the_real_cli() -> None:
    services = compose_config("cpu")["services"]
    api = build_parser().parse_args(services["api"]["command"])
    assert (api.command, api.host, api.port, api.no_worker) == ("serve", "0.0.0.0", 8000, True)
    assert build_parser().parse_args(services["worker"]["command"]).command == "worker"
    healthcheck = services["worker"]["healthcheck"]
    assert healthcheck.get("test") == ["NONE"] or healthcheck.get("disable") is True, "a worker serves no /readyz"

    entrypoint = json.loads(dockerfile_values("ENTRYPOINT")[-1])
    command = json.loads(dockerfile_values("CMD")[-1])
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert entrypoint == ["care-serve"] and "care-serve" in scripts
    image_default = build_parser().parse_args(command)
    assert (image_default.command, image_default.host) == ("serve", "0.0.0.0")


def test_servers_and_worker_share_the_data_volumes() -> None:
    services = compose_config("cpu")["services"]
    api, worker = (mounts(services[name]) for name in CARE_SERVICES)
    data_dir = dockerfile_env()["CARE_DATA_DIR"]
    registry_dir = f"{data_dir}/registry"
    assert set(api) == set(worker) == {data_dir, registry_dir}
    for path in (data_dir, registry_dir):
        assert api[path][0] == worker[path][0], path
    assert api[registry_dir][1] and not api[data_dir][1], "servers only read the registry but submit tasks"
    assert not worker[registry_dir][1] and not worker[data_dir][1], "the worker publishes and updates tasks"


def test_prometheus_and_gateway_reach_the_api_port() -> None:
    services = compose_config("cpu")["services"]
    port = build_parser().parse_args(services["api"]["command"]).port
    assert dockerfile_env()["CARE_PORT"] == str(port) and dockerfile_values("EXPOSE") == [str(port)]
    assert [str(p) for p in services["api"]["expose"]] == [str(port)]

    prometheus = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    (job,) = [j for j in prometheus["scrape_configs"] if j["job_name"] == "care-api"]
    assert job["dns_sd_configs"] == [{"names": ["api"], "type": "A", "port": port, "refresh_interval": "10s"}]
    prometheus_mounts = mounts(services["prometheus"])
    assert prometheus_mounts["/etc/prometheus/prometheus.yml"][0] == str(DOCKER / "prometheus.yml")
    for rule_file in prometheus["rule_files"]:
        assert prometheus_mounts[f"/etc/prometheus/{rule_file}"][0] == str(DOCKER / rule_file), rule_file

    nginx = (DOCKER / "nginx.conf").read_text()
    assert f"http://api:{port};" in nginx
    listen = re.search(r"listen (\d+);", nginx)
    assert listen is not None
    # docker-compose 1.x prints ports as "host_ip:published:target/proto", 2.x as mappings.
    targets = [
        p["target"] if isinstance(p, dict) else p.split(":")[-1].split("/")[0] for p in services["gateway"]["ports"]
    ]
    assert [int(t) for t in targets] == [int(listen.group(1))]


@pytest.mark.parametrize("count", ["1", "5"])
def test_replica_count_comes_from_the_environment(count: str, monkeypatch: pytest.MonkeyPatch) -> None:
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose is not installed (`make apt-deps` installs the Debian package)")
    env = {**_clean_env(), "API_REPLICAS": count}
    done = subprocess.run([binary, "config"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert yaml.safe_load(done.stdout)["services"]["api"]["deploy"]["replicas"] == int(count)


# ---- Prometheus rules and the Grafana dashboard ----------------------------------------------------------------


def test_alert_rules_and_dashboard_query_only_exported_series() -> None:
    exported = exported_series()
    rules = yaml.safe_load((DOCKER / "alerts.yml").read_text())
    expressions = {f"alert {r['alert']}": r["expr"] for g in rules["groups"] for r in g["rules"]}
    dashboard = json.loads((DOCKER / "grafana" / "dashboards" / "care-serve.json").read_text())
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expressions[f"panel {panel['title']!r} {target['refId']}"] = target["expr"]
    assert len(expressions) > 20
    for where, expr in expressions.items():
        used = series_in(expr)
        assert used or 'up{job="care-api"}' in expr, f"{where} queries no care-serve series: {expr}"
        assert used <= exported, f"{where} queries series the server does not export: {sorted(used - exported)}"
    # The panels the issue asks for.
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in ("router memory", "hit ratio", "latency", "training"):
        assert topic in titles, topic


def test_grafana_provisioning_points_at_the_dashboard_and_datasource() -> None:
    provisioning = DOCKER / "grafana" / "provisioning"
    (datasource,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "care-serve.yml").read_text())["providers"]
    assert datasource["url"] == "http://prometheus:9090"
    services = compose_config("cpu")["services"]
    grafana_mounts = mounts(services["grafana"])
    assert Path(grafana_mounts[provider["options"]["path"]][0]) == DOCKER / "grafana" / "dashboards"
    assert Path(grafana_mounts["/etc/grafana/provisioning"][0]) == provisioning
    dashboard = json.loads((DOCKER / "grafana" / "dashboards" / "care-serve.json").read_text())
    uids = {t["datasource"]["uid"] for p in dashboard["panels"] for t in p.get("targets", [])}
    assert uids == {datasource["uid"]}


# ---- the image -------------------------------------------------------------------------------------------------


def test_dockerfile_pins_torch_like_the_makefile_and_runs_as_non_root() -> None:
    pins = re.search(r"^TORCH_PINS := (.+)$", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert pins is not None
    wanted = dict(pin.split("==") for pin in pins.group(1).split())
    args = dict(a.split("=", 1) for a in dockerfile_values("ARG") if "=" in a)
    assert {"torch": args["TORCH_VERSION"], "torchvision": args["TORCHVISION_VERSION"]} == wanted
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    assert "python:3.11" in args["PYTHON_IMAGE"]
    assert len(dockerfile_values("FROM")) == 2, "multi-stage: build and runtime"
    users = dockerfile_values("USER")
    assert users and users[-1] not in ("root", "0")
    assert any("pip install ." in run for run in dockerfile_values("RUN"))
    (healthcheck,) = dockerfile_values("HEALTHCHECK")
    assert "/opt/care/healthcheck.py" in healthcheck
    assert "docker/healthcheck.py /opt/care/healthcheck.py" in dockerfile_values("COPY")


def _dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent directories decides."""

    def to_regex(pattern: str) -> re.Pattern[str]:
        parts = re.split(r"(\*\*/|\*\*|\*|\?)", pattern.strip("/"))
        table = {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}
        return re.compile("".join(table.get(p, re.escape(p)) for p in parts))

    candidates = [str(Path(*Path(path).parts[: i + 1])) for i in range(len(Path(path).parts))]
    ignored = False
    for line in patterns:
        negate = line.startswith("!")
        regex = to_regex(line[1:] if negate else line)
        if any(regex.fullmatch(c) for c in candidates):
            ignored = not negate
    return ignored


def test_dockerignore_sends_what_the_build_copies_and_nothing_else() -> None:
    patterns = [
        line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines() if line.strip()[:1] not in ("", "#")
    ]
    needed = ["pyproject.toml", "docker/healthcheck.py"]
    needed += [str(p.relative_to(ROOT)) for pkg in ("model", "registry", "service") for p in (ROOT / pkg).rglob("*.py")]
    for path in needed:
        assert not _dockerignored(path, patterns), f"{path} is needed by docker/Dockerfile but .dockerignore drops it"
    for path in [".git/HEAD", ".venv/bin/python", "tests/conftest.py", "care-data/jobs.sqlite3", "docs/deploy.md"]:
        assert _dockerignored(path, patterns), f"{path} should stay out of the build context"
    assert _dockerignored("service/__pycache__/app.cpython-311.pyc", patterns)


class _Readyz(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status if self.path == "/readyz" else 404)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def readyz_server() -> Iterator[http.server.HTTPServer]:
    server = http.server.HTTPServer(("127.0.0.1", 0), _Readyz)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def _healthcheck(port: int) -> int:
    env = {**_clean_env(), "CARE_PORT": str(port)}
    done = subprocess.run([sys.executable, str(DOCKER / "healthcheck.py")], env=env, capture_output=True, timeout=30)
    return done.returncode


def test_image_healthcheck_passes_only_on_ready(readyz_server: http.server.HTTPServer) -> None:
    port = readyz_server.server_address[1]
    _Readyz.status = 200
    assert _healthcheck(port) == 0
    _Readyz.status = 503
    assert _healthcheck(port) == 1
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    assert _healthcheck(closed) == 1
