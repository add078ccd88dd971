"""`care-bench serve`: the real server under load, against the frozen backbone alone in the same run.

One `care-serve serve --no-worker` process runs on loopback over a temporary registry of keyed random-weight tasks
(`bench.synthetic.keyed_learned_tasks`: image t is routed to task t, as trained tasks route their own
classes). The tasks are built once, then published as versions of 1, 10, 100 and 300 tasks; the server hot-loads
each one and is measured on it before the next is published. Clients are asyncio coroutines in this process that
send pre-built multipart bodies of pre-encoded images, so a request costs the client almost nothing. Beside it runs
the minimal baseline server (`baseline`: a plain FastAPI endpoint with the same decode and backbone and a linear
head, as a user would write it), measured on the same requests.

Phases:

* latency (per task count T): one client sends requests of B images (B = the server's largest batch, so every
  request is one batch) drawn uniformly from the T tasks' images. Between two requests, while the server is idle,
  this process times the backbone alone (`forward_plain`) and the fast path on the same B preprocessed images,
  alternately, so that the machine's drifts hit all three alike; the reference path is timed after the phase. Each
  request body also goes to the baseline server, back to back with the server's request.
* throughput (largest T): C closed-loop clients (C = 1, 2, 4, ...) send single-image requests; images per second
  against the offline backbone's throughput at the server's largest batch size, and against the baseline server's
  images per second with the same clients, measured right after.
* cap (largest T): a second server with the router cache capped at a fraction of all router bytes; one client
  alternates the same skewed-mix requests (Zipf 1.1 task popularity) between it and the uncapped server.
* hot-load (largest T): clients keep predicting while tasks are published one at a time; the time from each
  publish to the first response served by the new version, and every failed request.

Batch sizes, router cache hit ratios and resident bytes come from the servers' /metrics, as deltas over each
measured window; resident set sizes from /proc.

Modules: `config` (what is measured, the targets, the servers' settings), `clients` (images, request bodies, the
task mix, timed asyncio clients and window statistics), `server` (server processes and their /metrics), `workload`
(the keyed tasks published as versions; the offline timings), `phases` (the four phases and `run`), `report`
(targets, serve_bench.json, plots, markdown), `rows` (the typed rows of serve_bench.json), `baseline` (the baseline
server's app, `python -m bench.serve_bench.baseline`).
"""

from bench.serve_bench.clients import Record, Traffic, percentile, summarize
from bench.serve_bench.config import QUICK, ServeBenchConfig, bench_settings
from bench.serve_bench.phases import run
from bench.serve_bench.report import markdown_tables, targets, write_report
from bench.serve_bench.rows import ServeBenchResult
from bench.serve_bench.server import MetricsSnapshot, ServerProcess, window_stats

__all__ = [
    "QUICK",
    "MetricsSnapshot",
    "Record",
    "ServeBenchConfig",
    "ServeBenchResult",
    "ServerProcess",
    "Traffic",
    "bench_settings",
    "markdown_tables",
    "percentile",
    "run",
    "summarize",
    "targets",
    "window_stats",
    "write_report",
]
