"""Answering /predict: the backbone, preprocessing and its pool, the served version and its hot swap, the
micro-batcher onto one inference thread, and the allocator tuning that keeps that thread fast."""
