"""bench/harness.py, the process harness the benchmarks and the end-to-end tests share."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.harness import alive, base_env, free_port, start, wait_until


def test_importing_the_harness_loads_none_of_the_bench_extra() -> None:
    script = (
        "import json, sys, bench.harness; "
        "print(json.dumps(sorted({'matplotlib', 'sklearn', 'tqdm', 'fontTools'} & set(sys.modules))))"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    assert json.loads(done.stdout) == []


def test_base_env_drops_care_variables_and_adds_the_given_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CARE_API_KEY", "leaked")
    env = base_env(data_dir="/tmp/x", max_batch_size="4")
    assert "CARE_API_KEY" not in env
    assert env["CARE_DATA_DIR"] == "/tmp/x" and env["CARE_MAX_BATCH_SIZE"] == "4"
    assert env["HF_HUB_OFFLINE"] == "1" and env["OMP_NUM_THREADS"] == "1"


def test_wait_until_returns_the_first_value_and_names_what_timed_out() -> None:
    answers = iter([None, KeyError("not yet"), 7])

    def probe() -> int | None:
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    assert wait_until("seven", probe, 5, lambda: "", interval_s=0.01) == 7
    with pytest.raises(AssertionError, match=r"waiting for nothing \(last error: None\)\nthe logs"):
        wait_until("nothing", lambda: None, 0.05, lambda: "the logs", interval_s=0.01)


def test_a_process_that_exits_fails_its_wait_and_stop_ends_one_that_runs(tmp_path: Path) -> None:
    assert 0 < free_port() < 65536
    quitter = start("quitter", [sys.executable, "-c", "print('bye')"], base_env(), tmp_path)
    with pytest.raises(AssertionError, match="quitter exited early"):
        quitter.wait("something", lambda: None, 30, interval_s=0.01)
    assert "bye" in quitter.tail()

    sleeper = start("sleeper", [sys.executable, "-c", "import time; time.sleep(60)"], base_env(), tmp_path)
    assert alive(sleeper.pid)
    sleeper.stop(timeout_s=5)
    assert sleeper.popen.returncode is not None and not alive(sleeper.pid)
