"""The GPU path's switches (service/inference/acceleration.py), checked on the CPU: what each one does to the numbers.

CI has no GPU: pinned memory and nvjpeg are checked to stay off here, and bf16, channels-last and torch.compile are
checked for their effect on the features, which does not depend on the device.
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F

from model.backbone import SiteBackbone, build_backbone
from model.config import ModelConfig
from model.head import head_inputs
from service.inference.acceleration import Acceleration
from service.settings import Settings
from tests.unit.model.conftest import make_random_lineage

CPU = torch.device("cpu")


def lite0() -> SiteBackbone:
    """A fresh backbone: the switches change it in place."""
    return build_backbone(ModelConfig(backbone="efficientnet_lite0", image_size=64), "bundled")


def images(count: int = 4, size: int = 64) -> torch.Tensor:
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(0))


def test_cuda_only_switches_stay_off_on_the_cpu() -> None:
    settings = Settings(device="cpu", pin_memory=True, gpu_decode=True, precision="bf16", channels_last=True)
    acceleration = Acceleration.from_settings(settings)
    assert (acceleration.pin_memory, acceleration.gpu_decode, acceleration.decode_device) == (False, False, None)
    assert (acceleration.precision, acceleration.channels_last, acceleration.compile_trunk) == ("bf16", True, False)
    cuda = Acceleration.resolve(torch.device("cuda"), pin_memory=True, gpu_decode=True)
    assert (cuda.pin_memory, cuda.gpu_decode, cuda.decode_device) == (True, True, torch.device("cuda"))


def test_the_defaults_are_the_plain_path_on_the_cpu() -> None:
    acceleration = Acceleration.from_settings(Settings(device="cpu"))
    assert acceleration == Acceleration(CPU)
    batch = images()
    assert acceleration.inputs(batch) is batch  # no copy, no layout change
    assert not torch.is_autocast_enabled("cpu")
    with acceleration.autocast():
        assert not torch.is_autocast_enabled("cpu")


def test_channels_last_changes_the_layout_not_the_features() -> None:
    plain, nhwc = lite0(), lite0()
    acceleration = Acceleration(CPU, channels_last=True)
    acceleration.prepare(nhwc)
    batch = images()
    moved = acceleration.inputs(batch)
    assert moved.is_contiguous(memory_format=torch.channels_last) and torch.equal(moved, batch)
    with torch.inference_mode():
        expected, got = plain.forward_plain(batch), nhwc.forward_plain(moved)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_bf16_keeps_the_served_features_close_and_the_head_in_float32() -> None:
    backbone = lite0()
    config = ModelConfig(backbone="efficientnet_lite0", image_size=64, sites=tuple(backbone.site_names))
    lineage = make_random_lineage(config, backbone, num_tasks=3)
    network, routers = lineage.model, lineage.routers
    acceleration = Acceleration(CPU, precision="bf16")
    batch = images(8)
    with torch.inference_mode():
        exact = head_inputs(*network.features_and_site_vectors(backbone.embed(batch), routers))
        with acceleration.autocast():
            phi, vectors = network.features_and_site_vectors(backbone.embed(batch), routers)
            rounded = head_inputs(phi, vectors)
            scores = network.scores(phi)  # this random lineage has CaRE's cosine head, over phi
            probabilities = network.probabilities(phi)
    assert phi.dtype == torch.bfloat16  # autocast did run the backbone in bf16 ...
    assert scores.dtype == probabilities.dtype == torch.float32  # ... and the head did not
    similarity = F.cosine_similarity(rounded.float(), exact, dim=1)
    assert float(similarity.min()) > 0.99, similarity
    torch.testing.assert_close(probabilities.sum(dim=1), torch.ones(8))


def test_compiled_trunk_gives_the_eager_trunk_numbers() -> None:
    # test_vit: its trunk compiles in seconds (EfficientNet-Lite0's takes minutes on two cores).
    config = ModelConfig(backbone="test_vit", image_size=32)
    torch.manual_seed(0)
    eager = build_backbone(config, "random")
    compiled = build_backbone(config, "random")
    compiled.load_state_dict(eager.state_dict())
    Acceleration(CPU, compile_trunk=True).prepare(compiled)
    batch = images(2, 32)
    started = time.perf_counter()
    with torch.inference_mode():
        got = compiled.embed(batch)  # compiles here
        expected = eager.embed(batch)
        again = compiled.embed(images(3, 32))  # another batch size: dynamic shapes, no failure
    if time.perf_counter() - started > 120:
        pytest.fail("compiling test_vit's trunk took over 2 minutes")
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert again.shape[0] == 3
