"""POST /tasks (learn new classes), GET /tasks and GET /tasks/{task_id}."""

from __future__ import annotations

from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Depends, Header, Request, Response

from service.api.deps import StateDep, require_admin
from service.errors import ApiError
from service.images import validate_images
from service.jobs import LabelConflict, QueueFull, TaskNotFound
from service.schemas import TaskAccepted, TaskPublic
from service.uploads import read_task_upload

router = APIRouter(dependencies=[Depends(require_admin)])


def _conflict(labels: list[str]) -> ApiError:
    return ApiError(
        409,
        "label_exists",
        f"{len(labels)} label(s) are already learned or queued: {', '.join(labels[:10])}; class-incremental learning "
        "needs new labels (rename them, e.g. 'cat-2')",
        {"labels": labels},
    )


@router.post("/tasks", status_code=202, response_model=TaskAccepted, summary="Learn a set of new classes")
async def submit_task(
    request: Request,
    response: Response,
    state: StateDep,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> TaskAccepted:
    """Multipart `images` + `labels` (or a zip/tar ImageFolder). The upload is durable before the 202."""
    upload = await read_task_upload(request, state.limits)
    if idempotency_key is None:
        # Cheap early answer; the job store checks again atomically when it stores the task.
        known = sorted(set(upload.classes) & state.jobs.known_labels())
        if known:
            raise _conflict(known)
    await anyio.to_thread.run_sync(validate_images, upload.images, state.limits)
    try:
        result = await anyio.to_thread.run_sync(
            lambda: state.jobs.submit(
                upload.images,
                upload.labels,
                name=upload.name,
                idempotency_key=idempotency_key,
                max_queued=state.settings.max_queued_tasks,
            )
        )
    except LabelConflict as conflict:
        raise _conflict(sorted(conflict.labels)) from conflict
    except QueueFull as full:
        raise ApiError(
            429,
            "queue_full",
            f"{state.settings.max_queued_tasks} tasks are already waiting to be trained; retry later",
            headers={"Retry-After": str(max(1, round(full.retry_after_s)))},
        ) from full
    record = result.record
    response.headers["Location"] = f"/tasks/{record.task_id}"
    return TaskAccepted(
        task_id=record.task_id,
        status=record.status,
        classes=list(record.classes),
        num_images=record.num_images,
        position=result.position,
    )


def _public(record: Any) -> TaskPublic:
    return TaskPublic.model_validate(record.to_public())


@router.get("/tasks/{task_id}", response_model=TaskPublic, summary="One task's status and progress")
async def get_task(task_id: str, state: StateDep) -> TaskPublic:
    try:
        record = await anyio.to_thread.run_sync(state.jobs.get, task_id)
    except TaskNotFound as missing:
        raise ApiError(
            404, "task_not_found", f"no task {task_id!r}; GET /tasks lists the known tasks", {"task_id": task_id}
        ) from missing
    return _public(record)


@router.get("/tasks", response_model=list[TaskPublic], summary="All tasks in submission order")
async def list_tasks(state: StateDep) -> list[TaskPublic]:
    records = await anyio.to_thread.run_sync(state.jobs.list_tasks)
    return [_public(r) for r in records]
