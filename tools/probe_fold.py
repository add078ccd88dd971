"""Folded batch norms against timm's backbone as built (issue 17): EfficientNet-Lite0's `forward_plain` at batch 16,
the two interleaved in one process, 20 pairs after 3 warm-ups; medians and the paired ratio.

    PYTHONPATH=. python tools/probe_fold.py 2      # torch threads
"""

from __future__ import annotations

import statistics
import sys

import torch

from bench.model_bench import time_call
from model.backbone import build_backbone
from model.config import ModelConfig


def main() -> None:
    torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
    timm_backbone = build_backbone(ModelConfig(backbone="efficientnet_lite0"), "bundled")
    folded = timm_backbone.with_folded_batch_norms(224)
    images = torch.randn(16, 3, 224, 224)
    unfolded_s, folded_s = [], []
    with torch.inference_mode():
        for _ in range(3):
            timm_backbone.forward_plain(images)
            folded.forward_plain(images)
        for _ in range(20):
            unfolded_s.append(time_call(lambda: timm_backbone.forward_plain(images)))
            folded_s.append(time_call(lambda: folded.forward_plain(images)))
    ratios = [f / u for f, u in zip(folded_s, unfolded_s, strict=True)]
    unfolded_median, folded_median = statistics.median(unfolded_s), statistics.median(folded_s)
    print(  # noqa: T201 - the probe's output
        f"threads {torch.get_num_threads()}: timm's {1e3 * unfolded_median:.1f} ms, folded "
        f"{1e3 * folded_median:.1f} ms, medians {folded_median / unfolded_median:.3f}, "
        f"paired {statistics.median(ratios):.3f} (min {min(ratios):.3f}, max {max(ratios):.3f})"
    )


if __name__ == "__main__":
    main()
