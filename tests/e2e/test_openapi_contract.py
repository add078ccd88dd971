"""The published OpenAPI document is the contract: schemathesis (every check) against a real server on loopback.

Two bounded runs of `st run --checks all`, each against a fresh `care-serve serve` on 127.0.0.1 with the tiny
`test_vit` backbone: one with nothing learned and auth off; one serving a learned task (published with random
weights as the integration tests do, so no training time) plus a queued one, with the admin token and API key on.
Each must report 0 failures. Bounds: `--max-examples` per operation, a fixed seed (reproducible), and a hard
wall-clock timeout on the whole run.

What the schema cannot say is configured, not hidden: a schema-valid upload may still be refused because an image
does not decode or the labels do not match the images (400/422; the schema can type a part as binary, not as a
decodable PNG), and before anything is learned a valid /predict is the documented 503 `no_classes` with
Retry-After.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from bench.harness import base_env, free_port, start_server, wait_until
from bench.synthetic import populate
from registry import Registry
from service.inference.backbone import load_backbone
from service.modelstore import ModelStore
from service.settings import Settings
from tests.integration.conftest import task_files

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(240)]

ST = str(Path(sys.executable).with_name("st"))
MAX_EXAMPLES = 25  # per operation and phase
SEED = 1
ST_TIMEOUT_S = 100  # the whole schemathesis run; a healthy one takes ~10-20 s on 2 cores
SECRET = "st-secret-token"

ENV = {
    "backbone": "test_vit",
    "backbone_weights": "random",
    "image_size": "32",
    "device": "cpu",
    "serve_threads": "1",
    "train_threads": "1",
    "train_epochs": "1",
    "align_epochs": "1",
    "train_batch_size": "8",
    "poll_interval_s": "0.2",
    "worker_poll_s": "0.2",
    "max_batch_wait_ms": "1",
}

# Uploads whose parts are schema-valid (binary, strings) may still not decode as images or not pair labels with
# images: that is 400/422 by contract, not a rejected valid request.
UPLOAD_STATUSES = '["2xx", "400", "401", "403", "404", "409", "422", "429"]'
CONFIG = f"""
[[operations]]
include-name = ["POST /tasks", "POST /predict"]
checks.positive_data_acceptance.expected-statuses = {UPLOAD_STATUSES}
"""
# Credentials per security scheme of the document, so `ignored_auth` knows which header carries which.
AUTH_CONFIG = f"""
[auth.openapi.AdminToken]
bearer = "{SECRET}"

[auth.openapi.ApiKey]
api_key = "{SECRET}"

[auth.openapi.ApiKeyBearer]
bearer = "{SECRET}"
"""
# Nothing learned yet: a valid /predict is 503 no_classes with Retry-After (docs/api.md), the one 5xx allowed.
NOTHING_LEARNED_CONFIG = f"""
[[operations]]
include-name = "POST /tasks"
checks.positive_data_acceptance.expected-statuses = {UPLOAD_STATUSES}

[[operations]]
include-name = "POST /predict"
checks.positive_data_acceptance.expected-statuses = {UPLOAD_STATUSES[:-1]}, "503"]
checks.not_a_server_error.expected-statuses = ["2xx", "3xx", "4xx", "503"]
"""


def run_schemathesis(url: str, config: str, workdir: Path, *extra: str) -> dict[str, Any]:
    """`st run` with every check; returns its counts. Fails the test with the report if anything failed."""
    config_file = workdir / "schemathesis.toml"
    config_file.write_text(config)
    argv = [ST, "--config-file", str(config_file), "run", f"{url}/openapi.json", "--checks", "all"]
    argv += ["--max-examples", str(MAX_EXAMPLES), "--seed", str(SEED), "--workers", "1"]
    argv += ["--generation-database", "none", "--no-color", "--request-timeout", "30", *extra]
    result = subprocess.run(argv, cwd=workdir, capture_output=True, text=True, timeout=ST_TIMEOUT_S, check=False)
    output = result.stdout + result.stderr
    (workdir / "schemathesis-output.txt").write_text(output)  # kept under pytest's basetemp for the record
    generated = re.search(r"(\d+) generated", output)
    operations = re.search(r"Tested: (\d+)", output)
    assert result.returncode == 0, f"schemathesis found failures (exit {result.returncode}):\n{output[-12000:]}"
    assert generated is not None and operations is not None, output[-4000:]
    return {"generated": int(generated.group(1)), "operations": int(operations.group(1)), "output": output}


def test_schemathesis_with_nothing_learned_and_auth_off(tmp_path: Path) -> None:
    port = free_port()
    env = base_env(data_dir=str(tmp_path / "data"), **ENV)
    server = start_server("server", port, env, tmp_path, "--no-worker")
    try:
        counts = run_schemathesis(f"http://127.0.0.1:{port}", NOTHING_LEARNED_CONFIG, tmp_path)
    finally:
        server.stop()
    assert counts["operations"] == 8
    assert counts["generated"] >= 8 * MAX_EXAMPLES // 2, counts["output"][-3000:]
    assert "Traceback" not in server.log.read_text()


def publish_synthetic_task(data_dir: Path) -> None:
    """Publish one task with random weights to the server's registry, as tests/integration do (no training)."""
    settings = Settings(data_dir=data_dir, **ENV)  # type: ignore[arg-type]
    config, backbone = load_backbone(settings)  # the same resolved configuration as the server's
    store = ModelStore(Registry.from_path(settings.registry_dir), config, backbone, torch.device("cpu"))
    populate(store, 1, classes_per_task=2, seed=SEED)


def test_schemathesis_after_a_learned_task_with_auth_on(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    data_dir = tmp_path / "data"
    env = base_env(data_dir=str(data_dir), admin_token=SECRET, api_key=SECRET, **ENV)
    server = start_server("server", port, env, tmp_path, "--no-worker")
    auth = {"Authorization": f"Bearer {SECRET}"}
    try:
        publish_synthetic_task(data_dir)
        wait_until(
            "version 1 served", lambda: httpx.get(f"{url}/model").json()["num_tasks"] == 1 or None, 60, server.tail
        )
        # A task of our own waits in the queue (no worker here), so /tasks and /tasks/{id} have a real record.
        files, labels = task_files(["red", "green"])
        response = httpx.post(f"{url}/tasks", files=files, data={"labels": labels}, headers=auth, timeout=30)
        assert response.status_code == 202, response.text
        task_id = response.json()["task_id"]
        # GET /tasks/{task_id} gets the real id, so its 200 body is checked against the schema too.
        pinned = f'[[operations]]\ninclude-name = "GET /tasks/{{task_id}}"\nparameters = {{ task_id = "{task_id}" }}\n'
        counts = run_schemathesis(url, AUTH_CONFIG + CONFIG + pinned, tmp_path)
        assert httpx.get(f"{url}/model", timeout=10).json()["num_tasks"] == 1
    finally:
        server.stop()
    assert counts["operations"] == 8
    assert counts["generated"] >= 8 * MAX_EXAMPLES // 2, counts["output"][-3000:]
    assert "Traceback" not in server.log.read_text()
