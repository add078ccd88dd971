"""Safe decoding of uploaded images: bounded pixel count, full decode, RGB output, EXIF orientation applied.

Everything here is CPU-bound (a 40-megapixel JPEG takes a good fraction of a second): callers on the event loop
must run it in a worker thread, e.g. `await anyio.to_thread.run_sync(validate_images, upload.images, limits)`.

Bad data never escapes as a 500: undecodable, truncated or empty files become 422 `invalid_image`, images over
`UploadLimits.max_image_pixels` (or over Pillow's own decompression-bomb limit) become 413 `too_large`.
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Sequence
from typing import Any, cast

import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.io import decode_image as decode_with_torchvision
from torchvision.transforms.v2.functional import pil_to_tensor

from service.errors import ApiError, api_error
from service.ingest.limits import UploadLimits

logger = logging.getLogger(__name__)

__all__ = ["SUPPORTED_FORMATS", "decode_image", "decode_image_tensor", "validate_images"]

# NOTE: an explicit allow-list keeps exotic plugins out of the attack surface (EPS would even start Ghostscript).
SUPPORTED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF")
# torchvision 0.29 marks its decoders deprecated in favour of TorchCodec; they are what it ships and tests today, and
# every file they do not take goes through Pillow (see `decode_image_tensor`). Said once here, not on every request.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision are deprecated")
# Decoded by libjpeg-turbo / libpng straight into a tensor when nothing Pillow does on top would change the pixels.
_TENSOR_FORMATS = ("JPEG", "PNG")
_TENSOR_MODES = ("RGB", "L")
_EXIF_ORIENTATION = 0x0112
# How many problems a message spells out; `details` always lists all of them.
_MESSAGE_ITEMS = 5


class _ImageProblem(Exception):
    """One image is unusable; `too_large` tells a pixel-limit violation (413) from bad data (422)."""

    def __init__(self, reason: str, *, too_large: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.too_large = too_large


def _available_formats() -> list[str]:
    # Pillow raises KeyError (not "unidentified") for a format whose plugin is missing, e.g. AVIF on old builds.
    Image.init()
    return [name for name in SUPPORTED_FORMATS if name in Image.OPEN]


def _check_pixels(size: tuple[int, int], limits: UploadLimits) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise _ImageProblem(f"has an empty size ({width}x{height})")
    if width * height > limits.max_image_pixels:
        raise _ImageProblem(
            f"is {width}x{height} = {width * height} pixels, over the limit of {limits.max_image_pixels}; downscale it",
            too_large=True,
        )


def _to_rgb(image: Image.Image) -> Image.Image:
    """Converts any decoded mode to 8-bit RGB; transparent areas are composited onto white."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I;16") or mode == "I":
        # 16-bit greyscale: convert("L") would clip everything above 255 to white, so rescale 0..65535 to 0..255.
        return image.convert("I").point(lambda v: v * (1 / 256)).convert("L").convert("RGB")
    if mode == "F":
        low, high = cast("tuple[float, float]", image.getextrema())
        scale = 255 / (high - low) if high > low else 0.0
        return image.point(lambda v: (v - low) * scale).convert("L").convert("RGB")
    if mode in ("P", "PA") and (mode == "PA" or "transparency" in image.info):
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def _apply_orientation(image: Image.Image, name: str) -> Image.Image:
    try:
        return ImageOps.exif_transpose(image)
    except Exception as exc:  # malformed EXIF must not cost the client a usable image
        logger.warning("ignoring unreadable EXIF orientation of %s: %s", name, exc)
        return image.copy()  # a new object, like exif_transpose's result: the caller closes the original


def _open(data: bytes, limits: UploadLimits) -> Image.Image:
    """The image's header, read and checked against the limits; no pixel is decoded yet."""
    if not data:
        raise _ImageProblem("is empty (0 bytes)")
    if len(data) > limits.max_image_bytes:
        raise _ImageProblem(f"is {len(data)} bytes, over the limit of {limits.max_image_bytes}", too_large=True)
    try:
        image = Image.open(io.BytesIO(data), formats=_available_formats())
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # The warning only arrives here when the process turned warnings into errors; both mean "too many pixels".
        raise _ImageProblem(f"exceeds Pillow's decompression-bomb limit ({exc})", too_large=True) from exc
    except UnidentifiedImageError as exc:
        raise _ImageProblem("is not an image in a supported format") from exc
    except Exception as exc:  # Pillow raises many types on hostile headers; all mean "bad file"
        raise _ImageProblem(f"has an unreadable header ({type(exc).__name__}: {exc})") from exc
    try:
        _check_pixels(image.size, limits)  # the header gave the size: refuse before any pixel buffer is allocated
    except _ImageProblem:
        image.close()
        raise
    return image


def _decode(name: str, data: bytes, limits: UploadLimits) -> Image.Image:
    return _decode_opened(name, _open(data, limits), limits)


def _decode_opened(name: str, image: Image.Image, limits: UploadLimits) -> Image.Image:
    with image:
        try:
            image.load()  # a full decode: verify() alone misses truncated pixel data
            _check_pixels(image.size, limits)  # a few plugins (ICO-like, JPEG draft) settle the size only on load
            decoded = _to_rgb(_apply_orientation(image, name))
        except _ImageProblem:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise _ImageProblem(f"exceeds Pillow's decompression-bomb limit ({exc})", too_large=True) from exc
        except MemoryError as exc:
            raise _ImageProblem("needs too much memory to decode", too_large=True) from exc
        except Exception as exc:  # truncated/corrupt data: OSError, SyntaxError, ...
            raise _ImageProblem(f"could not be decoded ({type(exc).__name__}: {exc})") from exc
    if decoded.mode != "RGB":  # an internal invariant of _to_rgb, checked for real because -O strips asserts
        raise RuntimeError(f"conversion of {name!r} produced mode {decoded.mode}, expected RGB")
    return decoded


def _tensor_decodable(image: Image.Image, data: bytes) -> bool:
    """Whether libjpeg/libpng's RGB output is what the Pillow path would give: 8-bit RGB or grey, no alpha or
    transparency to composite, no EXIF rotation, and (JPEG) not cut short, which Pillow refuses and libjpeg pads."""
    if image.format not in _TENSOR_FORMATS or image.mode not in _TENSOR_MODES or "transparency" in image.info:
        return False
    if image.format == "JPEG" and not data.endswith(b"\xff\xd9"):
        return False
    if image.format == "PNG":
        # Pillow's PNG getexif() decodes the whole image to find a late eXIf chunk: any EXIF at all takes the
        # Pillow path instead, and one that comes after the pixels (rare) is not looked for.
        return "exif" not in image.info
    try:
        orientation: object = image.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # unreadable EXIF: the Pillow path decides what to do with it
        return False
    return orientation == 1


def _decode_tensor(name: str, data: bytes, limits: UploadLimits, device: torch.device | None = None) -> Tensor:
    image = _open(data, limits)
    if _tensor_decodable(image, data):
        pixels: Tensor | None
        encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        try:
            if device is not None and image.format == "JPEG":
                pixels = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)  # nvjpeg
            else:
                pixels = decode_with_torchvision(encoded, ImageReadMode.RGB)
        except Exception:  # corrupt data: Pillow's full decode below gives the reason
            pixels = None
        if pixels is not None and pixels.dtype == torch.uint8 and tuple(pixels.shape) == (3, image.height, image.width):
            image.close()
            return pixels
    rgb: Tensor = pil_to_tensor(_decode_opened(name, image, limits))
    return rgb


def _api_error(name: str, problem: _ImageProblem) -> ApiError:
    code = "too_large" if problem.too_large else "invalid_image"
    advice = "downscale it" if problem.too_large else f"send a complete {'/'.join(_available_formats())} file"
    message = f"image {name!r} {problem.reason}; {advice}"
    return api_error(code, message=message, details={"images": [{"name": name, "reason": problem.reason}]})


def _summary(problems: Sequence[dict[str, Any]]) -> str:
    shown = "; ".join(f"#{p['index']} {p['name']!r} {p['reason']}" for p in problems[:_MESSAGE_ITEMS])
    more = len(problems) - _MESSAGE_ITEMS
    return shown + (f"; and {more} more (see details.images)" if more > 0 else "")


def decode_image(name: str, data: bytes, limits: UploadLimits) -> Image.Image:
    """Decodes one uploaded image fully into an 8-bit RGB image with its EXIF orientation applied.

    The pixel count is checked against `limits.max_image_pixels` from the header, before any pixel data is
    decoded. Pillow's global `Image.MAX_IMAGE_PIXELS` is left untouched (it is process-wide); its
    `DecompressionBombError` still maps to 413. CPU-bound: call it from a worker thread.

    Args:
        name: File name, used in error messages only.
        data: The raw file bytes.
        limits: Upload limits; `max_image_pixels` and `max_image_bytes` apply.

    Returns:
        The decoded image in mode "RGB" (alpha composited onto white, 16-bit greyscale rescaled to 8 bits).

    Raises:
        ApiError: 413 `too_large` when the image has too many pixels or bytes; 422 `invalid_image` when the data is
            empty, truncated, corrupt or not an image in a supported format.
    """
    try:
        return _decode(name, data, limits)
    except _ImageProblem as problem:
        raise _api_error(name, problem) from problem


def decode_image_tensor(name: str, data: bytes, limits: UploadLimits, device: torch.device | None = None) -> Tensor:
    """`decode_image`'s pixels as a (3, H, W) uint8 tensor, with the same checks and errors.

    Plain 8-bit RGB or grey JPEG and PNG files (what clients send) are decoded by libjpeg-turbo / libpng through
    torchvision without a PIL image (the same pixels as Pillow's decoders). Everything else (alpha, palettes,
    16-bit, EXIF rotation, truncated or corrupt data, other formats) takes the Pillow path of `decode_image`.
    With a CUDA `device`, plain JPEG files are decoded there by nvjpeg (the tensor is on that device); the checks
    and the fallback stay on the CPU.
    """
    try:
        return _decode_tensor(name, data, limits, device)
    except _ImageProblem as problem:
        raise _api_error(name, problem) from problem


def validate_images(images: Sequence[tuple[str, bytes]], limits: UploadLimits) -> None:
    """Decodes every image and reports all bad ones at once, so a client can fix them in one go.

    CPU-bound and slow for large uploads: run it off the event loop (`anyio.to_thread.run_sync`).

    Args:
        images: (file name, raw bytes) pairs, in upload order.
        limits: Upload limits.

    Raises:
        ApiError: 413 `too_large` if any image is over the pixel (or byte) limit, with `details.images` listing
            those and `details.invalid_images` any others that are broken; otherwise 422 `invalid_image` with
            `details.images` listing every bad image as {index, name, reason}.
    """
    oversized: list[dict[str, Any]] = []
    invalid: list[dict[str, Any]] = []
    for index, (name, data) in enumerate(images):
        try:
            _decode(name, data, limits).close()
        except _ImageProblem as problem:
            entry = {"index": index, "name": name, "reason": problem.reason}
            (oversized if problem.too_large else invalid).append(entry)
    if oversized:
        logger.info("rejecting upload: %d of %d images over the size limits", len(oversized), len(images))
        also = f" ({len(invalid)} other images are not decodable either, see details.invalid_images)" if invalid else ""
        raise api_error(
            "too_large",
            message=f"{len(oversized)} image(s) are too large: {_summary(oversized)}{also}. "
            f"Each image may have at most {limits.max_image_pixels} pixels and {limits.max_image_bytes} bytes.",
            details={"images": oversized, "invalid_images": invalid},
        )
    if invalid:
        logger.info("rejecting upload: %d of %d images not decodable", len(invalid), len(images))
        raise api_error(
            "invalid_image",
            message=f"{len(invalid)} of {len(images)} image(s) cannot be used: {_summary(invalid)}. "
            f"Send complete, uncorrupted files in one of: {', '.join(_available_formats())}.",
            details={"images": invalid},
        )
