"""Response bodies of the HTTP API (docs/api.md), as pydantic models so /docs shows them."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class ScoredLabel(BaseModel):
    label: str
    score: float = Field(description="Probability over all learned classes.")
    task_id: str
    provisional: bool = Field(
        False,
        description="The label's task is not trained yet: it is served by the closed-form head from a provisional "
        "version (its answers change once the trained version replaces it).",
    )


class ImagePrediction(BaseModel):
    top: list[ScoredLabel]


class PredictResponse(BaseModel):
    model_version: int = Field(description="The version that answered (provisional or trained).")
    predictions: list[ImagePrediction] = Field(description="One per image, in request order.")


class TaskAccepted(BaseModel):
    task_id: str
    status: str
    classes: list[str]
    num_images: int
    position: int = Field(description="Tasks ahead of this one in the training queue.")


class TaskProgress(BaseModel):
    model_config = {"extra": "allow"}

    epoch: int | None = None
    epochs: int | None = None
    step: int | None = None
    steps: int | None = None
    loss: float | None = None


class TaskPublic(BaseModel):
    task_id: str
    name: str | None
    status: str
    classes: list[str]
    num_images: int
    index: int | None = Field(description="Position in the learned sequence once ready.")
    created_at: str
    started_at: str | None
    finished_at: str | None
    progress: TaskProgress | None
    model_version: int | None
    metrics: dict[str, Any] | None
    error: str | None
    served_here: bool = Field(
        False,
        description="The server that answered already serves this task: it is ready and the server's loaded model "
        "version is at least the task's model_version. `ready` alone only says a version with it was published.",
    )
    provisional: bool = Field(
        False,
        description="The server that answered serves this task's classes from a provisional version (closed-form "
        "head, before training): /predict can already answer them. The status stays queued or training.",
    )


class RouterCachePublic(BaseModel):
    capacity_bytes: int | None
    resident_bytes: int
    resident_routers: int
    hits: int
    misses: int
    evictions: int
    host: dict[str, int | None] = Field(description="The host tier: capacity_bytes, resident_bytes, resident_routers.")


class ModelPublic(BaseModel):
    model_version: int | None
    backbone: str
    num_tasks: int
    num_classes: int
    provisional_tasks: list[str] = Field(
        default_factory=list, description="Tasks whose classes are served by the head alone, not trained yet."
    )
    num_provisional_classes: int = Field(0, description="Classes of those tasks (counted in num_classes).")
    router_cache: RouterCachePublic
