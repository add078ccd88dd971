"""What one request may carry (`UploadLimits`, from the settings) and the two refusals every reader shares."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from service.errors import ApiError, api_error
from service.settings import MIB as MiB
from service.settings import Settings

__all__ = ["MiB", "UploadLimits", "bad_request", "too_large", "upload_limits"]


def _default(setting: str) -> int:
    """The default of the `Settings` field `setting`: each limit's default is written once, in settings.py."""
    value = Settings.model_fields[setting].default
    assert isinstance(value, int), setting
    return value


@dataclass(frozen=True)
class UploadLimits:
    """Bounds on what one request may carry; each breach is answered 413 `too_large` unless noted.

    Attributes:
        max_body_bytes: Request body size; also bounds the bytes unpacked from an archive.
        max_images: Images in one task upload.
        max_image_bytes: Bytes of one image (file part, raw body or archive member).
        max_image_pixels: Width x height of one image, checked from its header (decompression bombs).
        max_label_length: Characters in one label (422 `invalid_label` beyond).
        min_images_per_class: Images each class needs (422 `too_few_images` below).
        max_predict_images: Images in one predict request.
    """

    max_body_bytes: int = _default("max_upload_bytes")
    max_images: int = _default("max_images_per_task")
    max_image_bytes: int = _default("max_image_bytes")
    max_image_pixels: int = _default("max_image_pixels")
    max_label_length: int = _default("max_label_length")
    min_images_per_class: int = _default("min_images_per_class")
    max_predict_images: int = _default("max_predict_images")

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"UploadLimits.{name} must be a positive int, got {value!r}")

    @property
    def max_archive_entries(self) -> int:
        """Entries one archive may list, folders and skipped `__MACOSX` twins included (room for ~3 per image)."""
        return 3 * self.max_images + 1024


def upload_limits(settings: Settings) -> UploadLimits:
    """The limits `settings` configure."""
    return UploadLimits(
        max_body_bytes=settings.max_upload_bytes,
        max_images=settings.max_images_per_task,
        max_image_bytes=settings.max_image_bytes,
        max_image_pixels=settings.max_image_pixels,
        max_label_length=settings.max_label_length,
        min_images_per_class=settings.min_images_per_class,
        max_predict_images=settings.max_predict_images,
    )


def bad_request(message: str, details: dict[str, Any] | None = None) -> ApiError:
    """`bad_request` (service/errors.py): the body is malformed (not a matter of size); `message` says how."""
    return api_error("bad_request", message=message, details=details)


def too_large(message: str, details: dict[str, Any] | None = None) -> ApiError:
    """`too_large` (service/errors.py): a limit of `UploadLimits` is passed; `message` says which."""
    return api_error("too_large", message=message, details=details)
