"""deploy/ray/: the Serve config and the KubeRay manifest parse, agree with each other and with the code.

No Kubernetes or KubeRay operator runs here: these read the files. tests/e2e/test_ray_serve.py deploys config.yaml on
a real local Ray cluster.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
RAY_DIR = ROOT / "deploy" / "ray"
CARE_VARIABLE = re.compile(r"\bCARE_[A-Z0-9_]+\b")
SETTINGS_VARIABLES = {f"CARE_{name.upper()}" for name in Settings.model_fields}
INGRESS, WORKER = "CareIngress", "TrainingWorker"  # deploy/ray/app.py's names (importing it needs ray)


def serve_config() -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load((RAY_DIR / "config.yaml").read_text())
    return config


def rayservice() -> tuple[dict[str, Any], dict[str, Any]]:
    documents = [d for d in yaml.safe_load_all((RAY_DIR / "rayservice.yaml").read_text()) if d is not None]
    (service,) = [d for d in documents if d["kind"] == "RayService"]
    (monitor,) = [d for d in documents if d["kind"] == "PodMonitor"]
    return service, monitor


def embedded_serve_config() -> dict[str, Any]:
    text = rayservice()[0]["spec"]["serveConfigV2"]
    assert isinstance(text, str), "serveConfigV2 is a YAML string, not a mapping"
    config: dict[str, Any] = yaml.safe_load(text)
    return config


def the_app(config: dict[str, Any]) -> dict[str, Any]:
    (app,) = config["applications"]
    result: dict[str, Any] = app
    return result


def deployments(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {d["name"]: d for d in the_app(config)["deployments"]}


def test_the_manifest_parses_as_a_rayservice_and_a_podmonitor() -> None:
    service, monitor = rayservice()
    assert service["apiVersion"] == "ray.io/v1"
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    (group,) = cluster["workerGroupSpecs"]
    assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    labels = group["template"]["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_the_manifest_runs_the_application_of_config_yaml() -> None:
    local, embedded = serve_config(), embedded_serve_config()
    assert local["http_options"] == embedded["http_options"]
    assert local["proxy_location"] == embedded["proxy_location"]
    a, b = the_app(local), the_app(embedded)
    assert {k: a[k] for k in ("name", "route_prefix", "import_path", "args")} == {
        k: b[k] for k in ("name", "route_prefix", "import_path", "args")
    }
    assert deployments(local) == deployments(embedded)
    # The settings may differ only in where the data lives (a directory here, PostgreSQL and S3 there).
    where = {"CARE_DATA_DIR", "CARE_JOBS_URL", "CARE_REGISTRY_URL", "CARE_REGISTRY_ENDPOINT_URL"}
    local_env, embedded_env = (
        {k: v for k, v in app["runtime_env"]["env_vars"].items() if k not in where} for app in (a, b)
    )
    assert local_env == embedded_env


def test_one_worker_and_replica_cpus_match_the_thread_settings() -> None:
    for config in (serve_config(), embedded_serve_config()):
        env = the_app(config)["runtime_env"]["env_vars"]
        found = deployments(config)
        assert set(found) == {INGRESS, WORKER}
        source = (RAY_DIR / "app.py").read_text()
        assert f'INGRESS = "{INGRESS}"' in source and f'WORKER = "{WORKER}"' in source
        assert found[WORKER]["num_replicas"] == 1, "the lineage has one trainer"
        assert "autoscaling_config" not in found[WORKER]
        assert found[INGRESS]["ray_actor_options"]["num_cpus"] == int(env["CARE_SERVE_THREADS"])
        assert found[WORKER]["ray_actor_options"]["num_cpus"] == int(env["CARE_TRAIN_THREADS"])
        assert int(env["OMP_NUM_THREADS"]) <= int(env["CARE_SERVE_THREADS"])


def test_every_metrics_port_is_scraped() -> None:
    service, monitor = rayservice()
    base = the_app(embedded_serve_config())["args"]["metrics_port"]
    (group,) = service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    (container,) = group["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"] if p["name"].startswith("care-metrics-")}
    # Replicas a pod can hold = its CPUs / a replica's; local ranks 0.. take base + rank.
    cpus = int(container["resources"]["limits"]["cpu"])
    per_pod = cpus // deployments(embedded_serve_config())[INGRESS]["ray_actor_options"]["num_cpus"]
    assert sorted(ports.values()) == [base + rank for rank in range(per_pod)]
    assert {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]} == set(ports)


@pytest.mark.parametrize("name", ["config.yaml", "rayservice.yaml", "app.py"])
def test_every_care_variable_is_a_setting(name: str) -> None:
    unknown = set(CARE_VARIABLE.findall((RAY_DIR / name).read_text())) - SETTINGS_VARIABLES
    assert not unknown, f"deploy/ray/{name} names CARE_ variables that service/settings.py does not have: {unknown}"


@pytest.mark.parametrize("which", ["config.yaml", "rayservice.yaml"])
def test_the_replicas_environment_validates_as_settings(which: str, monkeypatch: pytest.MonkeyPatch) -> None:
    config = serve_config() if which == "config.yaml" else embedded_serve_config()
    for key in list(os.environ):
        if key.startswith("CARE_"):
            monkeypatch.delenv(key)
    for key, value in the_app(config)["runtime_env"]["env_vars"].items():
        monkeypatch.setenv(key, str(value))
    settings = Settings.model_validate(the_app(config)["args"]["settings"])
    assert settings.router_cache_bytes is not None, "an empty CARE_ROUTER_CACHE_BYTES would mean unbounded"


def test_ray_version_of_the_cluster_satisfies_the_extra() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    (requirement,) = pyproject["project"]["optional-dependencies"]["ray"]
    minimum = re.fullmatch(r"ray\[serve\]>=([\d.]+)", requirement)
    assert minimum is not None, requirement
    version = rayservice()[0]["spec"]["rayClusterConfig"]["rayVersion"]
    assert tuple(map(int, version.split("."))) >= tuple(map(int, minimum.group(1).split(".")))


def test_both_configs_validate_against_ray_serves_schema() -> None:
    schema = pytest.importorskip("ray.serve.schema", reason="ray is not installed: pip install -e '.[ray]'")
    for config in (serve_config(), embedded_serve_config()):
        parsed = schema.ServeDeploySchema.model_validate(config)
        assert [d.name for d in parsed.applications[0].deployments] == [INGRESS, WORKER]
