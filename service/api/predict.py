"""POST /predict: classify images over every class learned so far."""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends, Query, Request

from service.api import openapi
from service.api.deps import StateDep, require_api_key
from service.api.schemas import ImagePrediction, PredictResponse, ScoredLabel
from service.errors import api_error
from service.ingest.uploads import read_predict_images

router = APIRouter()


@router.post(
    "/predict",
    response_model=PredictResponse,
    dependencies=[Depends(require_api_key)],
    summary="Classify images over all learned classes",
    responses=openapi.PREDICT_RESPONSES,
    openapi_extra=openapi.PREDICT_BODY,
)
async def predict(
    request: Request, state: StateDep, top_k: int = Query(5, ge=1, le=100, description="Classes per image.")
) -> PredictResponse:
    """Multipart `images` parts, or one raw `image/*` body. Scores are probabilities over every learned class."""
    # The request is checked (body, content type, images) before the no-classes answer: a broken request gets its
    # 4xx whether or not anything has been learned yet.
    files = await read_predict_images(request, state.limits)
    images = await state.decoders.run(files)
    if state.served().network is None:
        raise api_error("no_classes")
    result = await state.batcher.submit(images)
    assert result.served.version is not None
    return PredictResponse(
        model_version=result.served.version,
        predictions=[
            ImagePrediction(
                top=[
                    ScoredLabel(label=p.label, score=p.score, task_id=p.task_id, provisional=p.provisional) for p in row
                ]
            )
            for row in result.served.top(result.probabilities, top_k)
        ],
    )


async def record_predict_metrics(request: Request, call_next):  # type: ignore[no-untyped-def]
    """Middleware: count /predict answers by status and time them (errors included)."""
    if request.url.path != "/predict":
        return await call_next(request)
    started = time.perf_counter()
    response = await call_next(request)
    metrics = request.app.state.care.metrics
    metrics.predict_requests.labels(str(response.status_code)).inc()
    metrics.predict_latency.observe(time.perf_counter() - started)
    return response
