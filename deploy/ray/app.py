"""care-serve on Ray Serve: the FastAPI ingress as a replicated deployment, the training worker as a single one.

    serve run deploy/ray/config.yaml          # from the repository root, with `pip install -e '.[ray]'`

`build` is the application builder that config.yaml names (`import_path: deploy.ray.app:build`); its `args` are
`AppArgs`. Two deployments:

* `CareIngress`: `service.app.create_app(settings, start_worker=False)` behind Ray Serve's HTTP proxy. Every replica
  builds its own app state in the ASGI lifespan, exactly as `care-serve serve --no-worker` does: its own backbone,
  byte-capped router cache (`CARE_ROUTER_CACHE_BYTES`) and registry watcher polling `CURRENT`. Replicas are
  stateless readers of the registry; scale them with `num_replicas` or `autoscaling_config` in config.yaml.
  Each response carries `X-Care-Replica` (the Serve replica id). `/metrics` through the proxy is the answering
  replica's own; with `metrics_port` set, every replica also serves its metrics on `metrics_port + local_rank`
  (its rank among this deployment's replicas on its node) for Prometheus to scrape each replica.
* `TrainingWorker`: one replica running `service.training.worker.TrainingWorker.run` on a thread. The worker holds
  the `lineage` lease in the job store, so a second copy (a replica being replaced, an operator's mistake) stays
  idle; Serve's health check restarts a replica whose loop has stopped. Keep `num_replicas: 1`.

Settings are `CARE_*` variables, passed to both through the application's `runtime_env.env_vars` (so servers and
worker agree on the model's shape and the data's location); `args.settings` may override single fields. The data
directory (or `CARE_JOBS_URL` and `CARE_REGISTRY_URL`) must be reachable from every node that runs a replica:
docs/deploy.md, "Ray Serve". Nothing in `service/` imports ray: this module is the only place that does.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, cast

from fastapi import FastAPI, Request, Response
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import Metric
from prometheus_client.registry import Collector
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve import Application, Deployment
from ray.serve.handle import DeploymentHandle

from service.app import create_app
from service.settings import Settings
from service.training.worker import LEASE, TrainingWorker

logger = logging.getLogger("care_serve.ray")

INGRESS = "CareIngress"
WORKER = "TrainingWorker"
REPLICA_HEADER = "X-Care-Replica"
WORKER_STOP_TIMEOUT_S = 60.0


class AppArgs(BaseModel):
    """The `args` of the application in config.yaml."""

    model_config = ConfigDict(extra="forbid")

    settings: dict[str, Any] = Field(
        default_factory=dict, description="Settings fields (lower-case, no CARE_ prefix) that win over CARE_ variables."
    )
    worker: bool = Field(True, description="Deploy the training worker with the ingress (false: it runs elsewhere).")
    metrics_port: int | None = Field(
        None, ge=1, le=65535, description="Each ingress replica serves /metrics on this port + its local rank."
    )
    metrics_host: str = Field("0.0.0.0", description="Address of those per-replica metrics servers.")


def replica_settings(overrides: dict[str, Any]) -> Settings:
    """CARE_ variables of the replica's runtime env, then `overrides`; a server never supervises a worker here."""
    return Settings.model_validate({**overrides, "run_worker": False})


class _DeferredMetrics(Collector):
    """The app's metrics registry once its lifespan has built it (empty before)."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app

    def collect(self) -> Iterable[Metric]:
        state = getattr(self.app.state, "care", None)
        return state.metrics.registry.collect() if state is not None else ()


@serve.deployment(name=INGRESS, num_replicas=2, max_ongoing_requests=32, graceful_shutdown_timeout_s=20)
@serve.ingress()
class CareIngress:
    """One care-serve HTTP server (no worker) per replica, its app built on the replica (`__serve_build_asgi_app__`)."""

    def __init__(
        self,
        worker: DeploymentHandle[Any] | None = None,
        settings: dict[str, Any] | None = None,
        metrics_port: int | None = None,
        metrics_host: str = "0.0.0.0",
    ) -> None:
        self.worker = worker  # held so that the worker deployment belongs to this application
        self.settings = replica_settings(settings or {})
        context = serve.get_replica_context()
        self.replica = context.replica_id.unique_id
        self.local_rank = int(getattr(context.rank, "local_rank", 0) or 0)
        self.metrics_port = metrics_port
        self.metrics_host = metrics_host

    def __serve_build_asgi_app__(self) -> FastAPI:
        app = create_app(self.settings, start_worker=False)
        replica = self.replica

        @app.middleware("http")
        async def name_the_replica(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
            response = await call_next(request)
            response.headers[REPLICA_HEADER] = replica
            return response

        if self.metrics_port is not None:
            port = self.metrics_port + self.local_rank
            registry = CollectorRegistry(auto_describe=False)
            registry.register(_DeferredMetrics(app))
            start_http_server(port, addr=self.metrics_host, registry=registry)
            logger.info("replica %s: metrics on %s:%d", replica, self.metrics_host, port)
        logger.info("replica %s (local rank %d) of %s: pid %d", replica, self.local_rank, INGRESS, os.getpid())
        return app


@serve.deployment(name=WORKER, num_replicas=1, max_ongoing_requests=4, graceful_shutdown_timeout_s=60)
class TrainingWorkerDeployment:
    """`care-serve worker` as a Serve replica: the worker loop on a thread, stopped when the replica is."""

    def __init__(self, settings: dict[str, Any] | None = None) -> None:
        self.worker = TrainingWorker(replica_settings(settings or {}))
        self.thread = threading.Thread(target=self.worker.run, name="care-worker", daemon=True)
        self.thread.start()
        logger.info("training worker %s started in pid %d", self.worker.owner, os.getpid())

    def check_health(self) -> None:
        """Serve restarts the replica if its worker loop has stopped (it released the lease on the way out)."""
        if not self.thread.is_alive():
            raise RuntimeError(f"the training loop of worker {self.worker.owner} has stopped")

    def status(self) -> dict[str, Any]:
        """Who this worker is, and whether it holds the lineage lease now."""
        return {
            "owner": self.worker.owner,
            "pid": os.getpid(),
            "running": self.thread.is_alive(),
            "holds_lease": self.thread.is_alive()
            and not self.worker.lease_lost.is_set()
            and self.worker.jobs.lease_holder(LEASE) == self.worker.owner,
        }

    def __del__(self) -> None:
        # As on SIGTERM: stop after the current step, put an interrupted task back in the queue, release the lease.
        self.worker.stop_event.set()
        self.thread.join(WORKER_STOP_TIMEOUT_S)


def build(args: dict[str, Any]) -> Application:
    """The application builder of config.yaml: the ingress bound to the worker (when `args.worker`)."""
    parsed = AppArgs.model_validate(args)
    # serve.deployment turns the classes into Deployments; its annotations do not say so.
    worker = cast(Deployment, TrainingWorkerDeployment).bind(parsed.settings) if parsed.worker else None
    return cast(Deployment, CareIngress).bind(worker, parsed.settings, parsed.metrics_port, parsed.metrics_host)
