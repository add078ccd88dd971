"""The allocator tuning keeps a forward pass's freed activations mapped instead of page-faulting them in again."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROGRAM = """
import resource, sys
import timm, torch
torch.set_num_threads(2)
if sys.argv[1] == "tuned":
    from service.inference.allocator import tune_allocator
    assert tune_allocator()
model = timm.create_model("efficientnet_lite0").eval()
images = torch.randn(int(sys.argv[3]), 3, int(sys.argv[4]), int(sys.argv[4]))


def faults():
    with torch.inference_mode():
        model(images)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(5):
            model(images)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


if sys.argv[2] == "thread":  # as the server runs inference: on a thread of its own
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        print(pool.submit(faults).result())
else:
    print(faults())
"""


def page_faults(mode: str, where: str = "main", batch: int = 8, size: int = 160) -> int:
    argv = [sys.executable, "-c", PROGRAM, mode, where, str(batch), str(size)]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    return int(result.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_tuning_stops_page_faulting_activations_again() -> None:
    untuned, tuned = page_faults("plain"), page_faults("tuned")
    # Measured: about 77,000 minor faults in 5 forward passes untuned, about 3,000 tuned.
    assert tuned * 5 < untuned, (tuned, untuned)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_tuning_holds_for_inference_on_another_thread() -> None:
    # The server's batch size and resolution: activations beyond what one 64 MiB per-thread heap holds.
    untuned, tuned = page_faults("plain", "thread", 16, 224), page_faults("tuned", "thread", 16, 224)
    # Measured: about 575,000 faults untuned, 219,000 tuned; 408,000 with per-thread arenas (no M_ARENA_MAX). What
    # remains are blocks over glibc's largest mmap threshold (32 MiB), which it always maps afresh.
    assert tuned * 2 < untuned, (tuned, untuned)
