"""The minimal baseline server of `care-bench serve` (bench/serve_bench/baseline.py) answers a real multipart request,
as the benchmark's clients send it, on a loopback port."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from bench.harness import alive
from bench.serve_bench.clients import Traffic, encode_images
from bench.serve_bench.server import BaselineProcess
from service.settings import Settings


@pytest.mark.timeout(180)
def test_baseline_server_answers_multipart_predictions(tmp_path: Path) -> None:
    settings = Settings(
        data_dir=tmp_path / "data", backbone="test_vit", backbone_weights="random", image_size=32, serve_threads=1
    )
    baseline = BaselineProcess(settings, tmp_path)
    try:
        baseline.wait_ready(timeout_s=120)
        traffic = Traffic(encode_images(3, 48, "png", seed=0), "png")
        response = httpx.post(
            f"{baseline.url}/predict",
            params={"top_k": 4},
            content=traffic.body([0, 1, 2, 1]),
            headers={"Content-Type": Traffic.content_type},
            timeout=60,
            trust_env=False,
        )
        assert response.status_code == 200, response.text
        predictions = response.json()["predictions"]
        assert len(predictions) == 4 and all(len(top) == 4 for top in predictions)
        for top in predictions:
            scores = [entry["score"] for entry in top]
            assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1.0 + 1e-6
            assert all(entry["label"].startswith("class-") for entry in top)
        assert predictions[1] == predictions[3]  # the same image, the same answer: no state between images

        bad = httpx.post(
            f"{baseline.url}/predict",
            files=[("images", ("bad.png", b"not an image", "image/png"))],
            timeout=60,
            trust_env=False,
        )
        assert bad.status_code == 422 and bad.json()["error"] == "invalid_image"
        assert baseline.rss_bytes() > 0
    finally:
        baseline.stop()
    assert not alive(baseline.pid)
