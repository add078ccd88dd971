"""Benchmark support: offline datasets and class-incremental task streams (see :mod:`bench.datasets`)."""
