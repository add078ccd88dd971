"""Shared test set-up: few torch threads, no network, tiny real models."""

from __future__ import annotations

import os

# No test may reach a model hub; timm and huggingface_hub honour these before they are imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import torch

torch.set_num_threads(2)
