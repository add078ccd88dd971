"""POST /tasks (learn new classes), GET /tasks and GET /tasks/{task_id}."""

from __future__ import annotations

from typing import Annotated

import anyio
from fastapi import APIRouter, Depends, Header, Request, Response

from service.api import openapi
from service.api.deps import StateDep, require_admin
from service.api.schemas import TaskAccepted, TaskPublic
from service.ingest.images import validate_images
from service.ingest.uploads import TaskUpload, read_task_upload
from service.jobs import JobRecord, LabelConflict
from service.state import AppState

# The job store's errors (LabelConflict, IdempotencyKeyReused, QueueFull, TaskNotFound) are answered by the handler
# of service/errors.py, from its table: no route maps them.
router = APIRouter(dependencies=[Depends(require_admin)])


@router.post(
    "/tasks",
    status_code=202,
    response_model=TaskAccepted,
    summary="Learn a set of new classes",
    responses=openapi.SUBMIT_TASK_RESPONSES,
    openapi_extra=openapi.TASKS_BODY,
)
async def submit_task(
    request: Request,
    response: Response,
    state: StateDep,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> TaskAccepted:
    """Multipart `images` + `labels` (or a zip/tar ImageFolder). The upload is durable before the 202."""
    upload = await read_task_upload(request, state.limits, state.settings.spool_dir)
    try:
        return await _store(upload, response, state, idempotency_key)
    finally:
        upload.close()  # the spooled body and images: stored by now, or refused


async def _store(upload: TaskUpload, response: Response, state: AppState, idempotency_key: str | None) -> TaskAccepted:
    if idempotency_key is None:
        # Cheap early answer; the job store checks again atomically when it stores the task.
        known = set(upload.classes) & state.jobs.known_labels()
        if known:
            raise LabelConflict(known)
    await anyio.to_thread.run_sync(validate_images, upload.images, state.limits)
    result = await anyio.to_thread.run_sync(
        lambda: state.jobs.submit(
            upload.images,
            upload.labels,
            name=upload.name,
            idempotency_key=idempotency_key,
            max_queued=state.settings.max_queued_tasks,
        )
    )
    record = result.record
    response.headers["Location"] = f"/tasks/{record.task_id}"
    return TaskAccepted(
        task_id=record.task_id,
        status=record.status,
        classes=list(record.classes),
        num_images=record.num_images,
        position=result.position,
    )


def _public(record: JobRecord, served_version: int | None, provisional_ids: frozenset[str] = frozenset()) -> TaskPublic:
    # Versions only grow along the lineage, so a server that loaded version v serves every task published up to v.
    published = record.model_version if record.status == "ready" else None
    served_here = published is not None and served_version is not None and served_version >= published
    provisional = record.status in ("queued", "training") and record.task_id in provisional_ids
    return TaskPublic.model_validate({**record.to_public(), "served_here": served_here, "provisional": provisional})


@router.get(
    "/tasks/{task_id}",
    response_model=TaskPublic,
    summary="One task's status and progress",
    responses=openapi.GET_TASK_RESPONSES,
)
async def get_task(task_id: str, state: StateDep) -> TaskPublic:
    record = await anyio.to_thread.run_sync(state.jobs.get, task_id)
    served = state.served()
    return _public(record, served.version, served.provisional_ids)


@router.get(
    "/tasks",
    response_model=list[TaskPublic],
    summary="All tasks in submission order",
    responses=openapi.LIST_TASKS_RESPONSES,
)
async def list_tasks(state: StateDep) -> list[TaskPublic]:
    records = await anyio.to_thread.run_sync(state.jobs.list_tasks)
    served = state.served()
    return [_public(r, served.version, served.provisional_ids) for r in records]
