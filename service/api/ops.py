"""Operating endpoints: /healthz, /readyz, /model, /metrics."""

from __future__ import annotations

import anyio
from fastapi import APIRouter, Response
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.api import openapi
from service.api.deps import StateDep
from service.api.schemas import ModelPublic, RouterCachePublic
from service.errors import api_error

router = APIRouter()


@router.get("/healthz", summary="Liveness: 200 while the process is alive")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="Readiness: backbone loaded and warmed up, registry readable",
    responses=openapi.READYZ_RESPONSES,
)
async def readyz(state: StateDep) -> dict[str, object]:
    if not state.ready.is_set():
        raise api_error("not_ready")
    try:
        await anyio.to_thread.run_sync(state.registry.current_version)
    except Exception as exc:
        raise api_error("registry_unreadable", reason=exc) from exc
    return {"status": "ready", "model_version": state.served().version}


@router.get("/model", response_model=ModelPublic, summary="The served version and the router cache")
async def model(state: StateDep) -> ModelPublic:
    served = state.served()
    stats = state.cache.stats()
    return ModelPublic(
        model_version=served.version,
        backbone=state.config.backbone,
        num_tasks=served.num_tasks,
        num_classes=served.num_classes,
        provisional_tasks=sorted(served.provisional_ids),
        num_provisional_classes=served.num_provisional_classes,
        router_cache=RouterCachePublic(
            capacity_bytes=stats.device.capacity_bytes,
            resident_bytes=stats.device.resident_bytes,
            resident_routers=stats.device.entries,
            hits=stats.hits,
            misses=stats.misses,
            evictions=stats.device.evictions,
            host={
                "capacity_bytes": stats.host.capacity_bytes,
                "resident_bytes": stats.host.resident_bytes,
                "resident_routers": stats.host.entries,
            },
        ),
    )


@router.get(
    "/metrics",
    summary="Prometheus text exposition",
    response_class=PlainTextResponse,
    responses=openapi.METRICS_RESPONSES,
)
async def metrics(state: StateDep) -> Response:
    body = await anyio.to_thread.run_sync(generate_latest, state.metrics.registry)
    return Response(content=body, media_type=CONTENT_TYPE_LATEST)
