"""The FastAPI application factory and its lifespan."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from fastapi import FastAPI

from service.api import ops, predict, tasks
from service.api.openapi import install_openapi
from service.errors import install_error_handlers
from service.housekeeping import Housekeeper
from service.jobs import JobStoreError
from service.settings import Settings
from service.state import AppState, build_state
from service.training.supervisor import WorkerSupervisor

logger = logging.getLogger(__name__)

DESCRIPTION = """
A continually growing image classifier (CaRE bi-level routing mixture-of-experts on a frozen backbone).
POST labelled images of new classes to `/tasks`; a background worker learns them and the server hot-loads the
new version. POST images to `/predict` to classify them over every class learned so far.
Errors always use the envelope `{"error": {"code", "message", "details"}}`.
"""


def create_app(settings: Settings | None = None, *, start_worker: bool | None = None) -> FastAPI:
    """Build the app. The model is loaded in the lifespan, not here, so creating an app is cheap.

    Args:
        settings: All settings; default: from CARE_ environment variables.
        start_worker: Start (and supervise) a training worker process; default `settings.run_worker`.
    """
    settings = settings or Settings()
    with_worker = settings.run_worker if start_worker is None else start_worker

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state: AppState = await anyio.to_thread.run_sync(build_state, settings)
        app.state.care = state
        housekeeper = Housekeeper(settings, state.jobs)
        app.state.housekeeper = housekeeper
        logger.info("start-up sweep: %s", await anyio.to_thread.run_sync(housekeeper.sweep))
        state.metrics.watch_data_dir(housekeeper.usage)
        housekeeper.start()
        supervisor = WorkerSupervisor(settings) if with_worker else None
        state.batcher.start()
        state.watcher.start()
        if supervisor is not None:
            supervisor.start()
        state.ready.set()
        logger.info("ready on http://%s:%d (docs at /docs)", settings.host, settings.port)
        try:
            yield
        finally:
            state.ready.clear()
            if supervisor is not None:
                await anyio.to_thread.run_sync(supervisor.stop)
            await anyio.to_thread.run_sync(state.watcher.stop)
            await anyio.to_thread.run_sync(housekeeper.stop)
            await state.batcher.stop()
            await anyio.to_thread.run_sync(state.decoders.close)
            state.jobs.close()

    app = FastAPI(title="care-serve", version="1", description=DESCRIPTION, lifespan=lifespan)
    install_error_handlers(app, domain_errors=(JobStoreError,))
    app.middleware("http")(predict.record_predict_metrics)
    app.include_router(predict.router)
    app.include_router(tasks.router)
    app.include_router(ops.router)
    install_openapi(app, settings)
    return app
