"""Tests for service.ingest (uploads and images) through a tiny FastAPI app, as the real routes will call them.

Every bad body must come back as its api.md status and code with a message, never a 500 and never a hang; every
accepted body form must parse. Images are real PNG/JPEG bytes made with Pillow; limits are shrunk per case so that
"too large" bodies stay a few KiB.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import random
import struct
import tarfile
import tracemalloc
import zipfile
import zlib
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal

import anyio.to_thread
import httpx
import pytest
from fastapi import FastAPI, Request
from PIL import Image

from service.errors import ApiError, error_response, install_error_handlers
from service.ingest.archives import BoundedRaw, Budget, read_archive
from service.ingest.images import decode_image, validate_images
from service.ingest.limits import UploadLimits
from service.ingest.uploads import read_predict_images, read_task_upload

pytestmark = pytest.mark.anyio

LIMITS = UploadLimits(max_body_bytes=512 * 1024, max_images=12, max_image_bytes=64 * 1024, max_predict_images=4)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# ---------------------------------------------------------------------------------------------------- helpers


def png(size: tuple[int, int] = (8, 6), color: Any = (200, 30, 30), mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, "PNG")
    return buffer.getvalue()


def noisy_png(size: tuple[int, int] = (64, 64)) -> bytes:
    """An incompressible PNG (random pixels): its byte size is predictable, about 3 bytes per pixel."""
    buffer = io.BytesIO()
    Image.frombytes("RGB", size, random.Random(size[0]).randbytes(3 * size[0] * size[1])).save(buffer, "PNG")
    return buffer.getvalue()


def jpeg(size: tuple[int, int] = (8, 6), color: Any = (30, 200, 30), mode: str = "RGB", **save: Any) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, "JPEG", **save)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height but that carries almost no pixel data (a bomb's shape)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))


def make_zip(entries: dict[str, bytes], symlinks: tuple[str, ...] = ()) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path, data in entries.items():
            archive.writestr(path, data)
        for path in symlinks:
            info = zipfile.ZipInfo(path)
            info.create_system = 3
            info.external_attr = (0o120777 << 16) & 0xFFFF0000  # S_IFLNK | 0777
            archive.writestr(info, b"../../etc/passwd")
    return buffer.getvalue()


def make_tar(
    entries: dict[str, bytes], symlinks: tuple[str, ...] = (), mode: Literal["w", "w:gz", "w:xz"] = "w"
) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as archive:
        for path, data in entries.items():
            info = tarfile.TarInfo(path)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        for path in symlinks:
            info = tarfile.TarInfo(path)
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            archive.addfile(info)
    return buffer.getvalue()


def folder(classes: dict[str, int], prefix: str = "") -> dict[str, bytes]:
    """An ImageFolder tree: {prefix + label/i.png: bytes}."""
    return {f"{prefix}{label}/{i}.png": png(color=(i, 0, 0)) for label, n in classes.items() for i in range(n)}


def images_form(labels: list[str], images: list[bytes] | None = None) -> dict[str, Any]:
    files = [("images", (f"img{i}.png", data, "image/png")) for i, data in enumerate(images or [png()] * len(labels))]
    return {"files": files, "data": {"labels": labels}}


def raw(data: bytes, content_type: str) -> dict[str, Any]:
    return {"content": data, "headers": {"content-type": content_type}}


def make_app(limits: UploadLimits) -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/tasks")
    async def tasks(request: Request) -> dict[str, Any]:
        upload = await read_task_upload(request, limits)
        await anyio.to_thread.run_sync(validate_images, upload.images, limits)
        names = [name for name, _ in upload.images]
        return {"names": names, "labels": upload.labels, "classes": upload.classes, "name": upload.name}

    @app.post("/predict")
    async def predict(request: Request) -> dict[str, Any]:
        images = await read_predict_images(request, limits)
        decoded = [await anyio.to_thread.run_sync(decode_image, name, data, limits) for name, data in images]
        return {"names": [name for name, _ in images], "sizes": [list(image.size) for image in decoded]}

    return app


async def post(path: str, limits: UploadLimits = LIMITS, **kwargs: Any) -> httpx.Response:
    transport = httpx.ASGITransport(app=make_app(limits), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        return await client.post(path, **kwargs)


def error_of(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"}, body
    error: dict[str, Any] = body["error"]
    assert error["message"], "every error must say what was wrong"
    return error


# ---------------------------------------------------------------------------------------------------- bad inputs

MULTIPART_GARBAGE = raw(b"this is not multipart at all", "multipart/form-data; boundary=XyZ")
MULTIPART_CUT = raw(
    b'--XyZ\r\nContent-Disposition: form-data; name="images"; filename="a.png"\r\n\r\n' + png()[:20],
    "multipart/form-data; boundary=XyZ",
)
NESTED = {**folder({"cat": 2}), "dog/sub/0.png": png(), "dog/sub/1.png": png()}
ZIP_BOMB = make_zip({"cat/0.png": b"\0" * (4 * 1024 * 1024), "cat/1.png": png()})
BOMB_LIMITS = dataclasses.replace(LIMITS, max_image_bytes=8 * 1024 * 1024)  # only the unpacked total can stop it

# fmt: off
BAD_TASKS: list[tuple[str, dict[str, Any], UploadLimits, int, str, str]] = [
    # (id, request, limits, status, code, a fragment the message must contain)
    ("truncated image", images_form(["a", "a"], [png(), noisy_png()[:6000]]), LIMITS, 422, "invalid_image", "img1"),
    ("non-image bytes", images_form(["a", "a"], [png(), b"GIF? no, text"]), LIMITS, 422, "invalid_image",
     "supported format"),
    ("zero-byte file", images_form(["a", "a"], [b"", png()]), LIMITS, 422, "invalid_image", "empty"),
    ("labels != images", {**images_form(["a", "a"]), "data": {"labels": ["a"]}}, LIMITS, 400, "bad_request",
     "2 images but 1 labels"),
    ("label with slash", images_form(["a/b", "a/b"]), LIMITS, 422, "invalid_label", "separator"),
    ("empty label", images_form(["", ""]), LIMITS, 422, "invalid_label", "empty"),
    ("control char label", images_form(["ca\tt", "ca\tt"]), LIMITS, 422, "invalid_label", "U+0009"),
    ("too long label", images_form(["x" * 65] * 2), LIMITS, 422, "invalid_label", "65 characters"),
    ("padded label", images_form([" cat", " cat"]), LIMITS, 422, "invalid_label", "whitespace"),
    ("dot label", images_form(["..", ".."]), LIMITS, 422, "invalid_label", "'..'"),
    ("labels json not strings", {**images_form(["a"]), "data": {"labels": "[1, 2]"}}, LIMITS, 400, "bad_request",
     "list of strings"),
    ("labels json broken", {**images_form(["a"]), "data": {"labels": '["a",'}}, LIMITS, 400, "bad_request", "JSON"),
    ("pixels over the cap", images_form(["a", "a"], [png(), png_header_only(9_000, 9_000)]), LIMITS, 413,
     "too_large", "81000000 pixels"),
    ("pillow bomb error", images_form(["a", "a"], [png(), png_header_only(20_000, 20_000)]),
     dataclasses.replace(LIMITS, max_image_pixels=10**12), 413, "too_large", "decompression"),
    ("body over limit", images_form(["a", "a"], [noisy_png()] * 2), dataclasses.replace(LIMITS, max_body_bytes=4096),
     413, "too_large", "4096"),
    ("image over bytes", images_form(["a", "a"], [png(), noisy_png()]),
     dataclasses.replace(LIMITS, max_image_bytes=1024), 413, "too_large", "part 'images' #2 ('img1.png')"),
    ("too many images", images_form(["a"] * 13), LIMITS, 413, "too_large", "at most 12 images"),
    ("too many images, json labels", {**images_form(["a"] * 13), "data": {"labels": json.dumps(["a"] * 13)}}, LIMITS,
     413, "too_large", "more than 12 'images'"),
    ("too many archive images", raw(make_zip(folder({"a": 7, "b": 6})), "application/zip"), LIMITS, 413,
     "too_large", "more than 12 images"),
    ("wrong content type", raw(b'{"labels": []}', "application/json"), LIMITS, 415, "unsupported_media_type",
     "multipart/form-data"),
    ("no content type", {"content": b"x"}, LIMITS, 415, "unsupported_media_type", "application/zip"),
    ("empty upload", {"files": [("name", (None, "my task"))]}, LIMITS, 400, "bad_request", "no images"),
    ("unknown part", {"files": [("image", ("a.png", png(), "image/png"))]}, LIMITS, 400, "bad_request", "'image'"),
    ("unparseable multipart", MULTIPART_GARBAGE, LIMITS, 400, "bad_request", "multipart"),
    ("multipart cut off", MULTIPART_CUT, LIMITS, 400, "bad_request", "closing boundary"),
    ("no boundary", raw(b"--x\r\n", "multipart/form-data"), LIMITS, 400, "bad_request", "boundary"),
    ("zip nested folders", raw(make_zip(NESTED), "application/zip"), LIMITS, 400, "bad_request", "dog/sub/0.png"),
    ("zip top-level file", raw(make_zip({**folder({"cat": 2}), "x.png": png()}), "application/zip"), LIMITS, 400,
     "bad_request", "'x.png'"),
    ("zip parent path", raw(make_zip({**folder({"cat": 2}), "../cat/x.png": png()}), "application/zip"), LIMITS,
     400, "bad_request", "'..'"),
    ("zip bomb", raw(ZIP_BOMB, "application/zip"), BOMB_LIMITS, 413, "too_large", "declares more than 524288"),
    ("zip bomb per image", raw(ZIP_BOMB, "application/zip"), dataclasses.replace(LIMITS, max_body_bytes=8 * 1024**2),
     413, "too_large", "'cat/0.png' is over 65536 bytes per image"),
    ("zip corrupt", raw(b"PK\x03\x04" + b"\0" * 100, "application/zip"), LIMITS, 400, "bad_request", "zip"),
    ("tar symlink", raw(make_tar(folder({"cat": 2}), symlinks=("cat/evil.png",)), "application/x-tar"), LIMITS,
     400, "bad_request", "cat/evil.png"),
    ("zip symlink", raw(make_zip(folder({"cat": 2}), symlinks=("cat/evil.png",)), "application/zip"), LIMITS, 400,
     "bad_request", "symbolic link"),
    ("tar.gz bomb", raw(make_tar({"cat/0.png": b"\0" * (4 * 1024 * 1024)}, mode="w:gz"), "application/gzip"),
     BOMB_LIMITS, 413, "too_large", "declares more than 524288"),
    ("not an archive", raw(b"hello, I am text" * 64, "application/x-tar"), LIMITS, 400, "bad_request", "tar"),
    ("archive and labels", {"files": [("archive", ("a.zip", make_zip(folder({"c": 2})), "application/zip"))],
                            "data": {"labels": "c"}}, LIMITS, 400, "bad_request", "not both"),
    ("too few per class", images_form(["cat", "cat", "dog"]), LIMITS, 422, "too_few_images", "'dog' has 1"),
    ("empty archive", raw(make_zip({"__MACOSX/._x": b"junk"}), "application/zip"), LIMITS, 400, "bad_request",
     "no images"),
]
# fmt: on


@pytest.mark.parametrize(
    ("request_kwargs", "limits", "status", "code", "fragment"),
    [case[1:] for case in BAD_TASKS],
    ids=[case[0] for case in BAD_TASKS],
)
async def test_bad_task_upload_gets_its_documented_error(
    request_kwargs: dict[str, Any], limits: UploadLimits, status: int, code: str, fragment: str
) -> None:
    response = await post("/tasks", limits, **request_kwargs)
    assert response.status_code == status, response.text
    error = error_of(response)
    assert error["code"] == code
    assert fragment in error["message"], error["message"]


# fmt: off
BAD_PREDICTS: list[tuple[str, dict[str, Any], int, str, str]] = [
    ("too many images", {"files": [("images", (f"{i}.png", png(), "image/png")) for i in range(5)]}, 413,
     "too_large", "more than 4 'images'"),
    ("wrong content type", raw(png(), "application/octet-stream"), 415, "unsupported_media_type", "image/*"),
    ("raw garbage", raw(b"\x89PNG but not really", "image/png"), 422, "invalid_image", "supported format"),
    ("raw empty", raw(b"", "image/jpeg"), 422, "invalid_image", "empty"),
    ("raw too large", raw(noisy_png((160, 160)), "image/png"), 413, "too_large", "65536"),
    ("no images", raw(b"--XyZ--\r\n", "multipart/form-data; boundary=XyZ"), 400, "bad_request", "no images"),
    ("labels not allowed", images_form(["a"]), 400, "bad_request", "'labels'"),
]
# fmt: on


@pytest.mark.parametrize(
    ("request_kwargs", "status", "code", "fragment"), [c[1:] for c in BAD_PREDICTS], ids=[c[0] for c in BAD_PREDICTS]
)
async def test_bad_predict_body_gets_its_documented_error(
    request_kwargs: dict[str, Any], status: int, code: str, fragment: str
) -> None:
    response = await post("/predict", **request_kwargs)
    assert response.status_code == status, response.text
    error = error_of(response)
    assert (error["code"], fragment in error["message"]) == (code, True), error


async def test_invalid_images_are_all_listed_in_one_error() -> None:
    images = [png(), b"", png(), b"not an image", noisy_png()[:6000]]
    response = await post("/tasks", **images_form(["a", "a", "b", "b", "b"], images))
    assert response.status_code == 422
    listed = error_of(response)["details"]["images"]
    assert [(item["index"], item["name"]) for item in listed] == [(1, "img1.png"), (3, "img3.png"), (4, "img4.png")]
    assert all(item["reason"] for item in listed)


async def test_invalid_labels_are_all_listed_once() -> None:
    response = await post("/tasks", **images_form(["ok", "ok", "a/b", "a/b", "", "", "x\n", "x\n"]))
    assert response.status_code == 422
    listed = error_of(response)["details"]["labels"]
    assert [item["label"] for item in listed] == ["a/b", "", "x\n"]


async def test_too_few_images_reports_every_class_count() -> None:
    response = await post("/tasks", **images_form(["cat", "cat", "dog", "emu"]))
    details = error_of(response)["details"]
    assert details == {"min_images_per_class": 2, "counts": {"cat": 2, "dog": 1, "emu": 1}, "classes": ["dog", "emu"]}


async def test_endless_body_is_cut_off_at_the_limit() -> None:
    sent = 0

    async def endless() -> AsyncIterator[bytes]:
        nonlocal sent
        while sent < 100 * LIMITS.max_body_bytes:  # the bound only keeps a broken reader from looping forever
            sent += 4096
            yield b"\0" * 4096

    response = await post("/tasks", content=endless(), headers={"content-type": "application/zip"})
    assert response.status_code == 413, response.text
    assert error_of(response)["code"] == "too_large"
    assert sent <= LIMITS.max_body_bytes + 2 * 4096  # stopped as soon as the limit was passed


async def test_content_length_over_the_limit_is_refused_before_reading() -> None:
    async def receive() -> dict[str, Any]:
        raise AssertionError("the body must not be read")

    headers = [(b"content-type", b"application/zip"), (b"content-length", str(LIMITS.max_body_bytes + 1).encode())]
    request = Request({"type": "http", "method": "POST", "path": "/tasks", "headers": headers}, receive)
    with pytest.raises(ApiError) as caught:
        await read_task_upload(request, LIMITS)
    assert (caught.value.status, caught.value.code) == (413, "too_large")


async def test_client_disconnect_is_a_400_not_a_500() -> None:
    async def receive() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    headers = [(b"content-type", b"image/png")]
    request = Request({"type": "http", "method": "POST", "path": "/predict", "headers": headers}, receive)
    with pytest.raises(ApiError) as caught:
        await read_predict_images(request, LIMITS)
    assert (caught.value.status, caught.value.code) == (400, "bad_request")


def test_zip_with_too_many_entries_is_refused_before_its_directory_is_parsed(monkeypatch: pytest.MonkeyPatch) -> None:
    data = make_zip({f"d{i}/": b"" for i in range(LIMITS.max_archive_entries + 1)})

    def no_parsing(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("ZipFile must not be built for an archive with too many entries")

    monkeypatch.setattr(zipfile, "ZipFile", no_parsing)
    with pytest.raises(ApiError, match="more than 1060 entries") as caught:
        read_archive(data, LIMITS)
    assert caught.value.status == 413


class Endless:
    """A member that lies about its size: it never runs dry. Records how much was asked of it."""

    def __init__(self) -> None:
        self.given = 0

    def read(self, size: int = -1, /) -> bytes:
        size = 4096 if size < 0 else size
        self.given += size
        return b"\0" * size


def test_archive_members_are_read_one_byte_past_the_image_limit_at_most() -> None:
    member = Endless()
    with pytest.raises(ApiError, match="over 65536 bytes per image") as caught:
        Budget(LIMITS).read_member("cat/0.png", member)
    assert caught.value.status == 413
    assert member.given == LIMITS.max_image_bytes + 1


def test_archive_total_actually_read_is_bounded_even_when_sizes_lie() -> None:
    budget = Budget(dataclasses.replace(LIMITS, max_image_bytes=200 * 1024))  # 3 members pass, the total does not
    with pytest.raises(ApiError, match="unpacks to more than 524288") as caught:
        for i in range(3):
            budget.read_member(f"cat/{i}.png", io.BytesIO(b"\0" * 200 * 1024))
    assert caught.value.status == 413


def test_decompressed_tar_stream_is_bounded() -> None:
    stream = io.BufferedReader(BoundedRaw(Endless(), 10_000))
    with pytest.raises(ApiError, match="unpacks to more than 10000") as caught:
        while stream.read(4096):
            pass
    assert caught.value.status == 413


# ---------------------------------------------------------------------------------------------------- happy paths

MIXED = [png(), jpeg(), png((5, 5), 7, "L"), jpeg(mode="CMYK", color=(0, 0, 0, 0))]


async def test_multipart_with_one_labels_field_per_image() -> None:
    response = await post("/tasks", **images_form(["dog", "cat", "dog", "cat"], MIXED))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body == {
        "names": ["img0.png", "img1.png", "img2.png", "img3.png"],
        "labels": ["dog", "cat", "dog", "cat"],
        "classes": ["dog", "cat"],
        "name": None,
    }


async def test_multipart_with_a_json_labels_list_and_a_name() -> None:
    form = images_form([], MIXED)
    form["data"] = {"labels": json.dumps(["sneaker", "boot", "boot", "sneaker"]), "name": "shoes v1"}
    response = await post("/tasks", **form)
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["labels"], body["classes"], body["name"]) == (
        ["sneaker", "boot", "boot", "sneaker"],
        ["sneaker", "boot"],
        "shoes v1",
    )


# fmt: off
ARCHIVES: list[tuple[str, dict[str, Any]]] = [
    ("zip", raw(make_zip({**folder({"cat": 2, "dog": 3}), "__MACOSX/cat/._0.png": b"x", "cat/.DS_Store": b"x"}),
                "application/zip")),
    ("zip in a wrapping folder", raw(make_zip(folder({"cat": 2, "dog": 3}, prefix="pets/")), "application/zip")),
    ("zip, windows type", raw(make_zip(folder({"cat": 2, "dog": 3})), "application/x-zip-compressed")),
    ("tar", raw(make_tar(folder({"cat": 2, "dog": 3})), "application/x-tar")),
    ("tar with ./ prefix", raw(make_tar(folder({"cat": 2, "dog": 3}, prefix="./")), "application/x-tar")),
    ("tar.gz", raw(make_tar(folder({"cat": 2, "dog": 3}), mode="w:gz"), "application/gzip")),
    ("tar.xz", raw(make_tar(folder({"cat": 2, "dog": 3}), mode="w:xz"), "application/x-tar")),
    ("multipart archive", {"files": [("archive", ("pets.zip", make_zip(folder({"cat": 2, "dog": 3})), "x/y"))],
                           "data": {"name": "pets"}}),
]
# fmt: on


@pytest.mark.parametrize("request_kwargs", [a[1] for a in ARCHIVES], ids=[a[0] for a in ARCHIVES])
async def test_archive_image_folder(request_kwargs: dict[str, Any]) -> None:
    response = await post("/tasks", **request_kwargs)
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["labels"], body["classes"]) == (["cat", "cat", "dog", "dog", "dog"], ["cat", "dog"])
    assert all(name.endswith(".png") and "/" in name for name in body["names"])


async def test_predict_multipart_with_several_images() -> None:
    files = [("images", (f"{i}.img", data, "application/octet-stream")) for i, data in enumerate(MIXED[:3])]
    response = await post("/predict", files=files)
    assert response.status_code == 200, response.text
    assert response.json() == {"names": ["0.img", "1.img", "2.img"], "sizes": [[8, 6], [8, 6], [5, 5]]}


async def test_predict_raw_png_body() -> None:
    response = await post("/predict", **raw(png((3, 4)), "image/png"))
    assert response.status_code == 200, response.text
    assert response.json()["sizes"] == [[3, 4]]


async def test_client_file_paths_are_reduced_to_their_last_component() -> None:
    response = await post("/predict", files=[("images", ("C:\\Users\\me\\..\\cat.png", png(), "image/png"))])
    assert response.json()["names"] == ["cat.png"]


# ---------------------------------------------------------------------------------------------------- decoding


def saved(image: Image.Image, fmt: str, **save: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save)
    return buffer.getvalue()


def palette_with_transparency() -> Image.Image:
    image = Image.new("P", (4, 4), 1)
    image.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    image.info["transparency"] = 0
    image.putpixel((0, 0), 0)
    return image


def sixteen_bit() -> Image.Image:
    image = Image.new("I;16", (4, 4), 0)
    image.putpixel((0, 0), 65535)
    image.putpixel((1, 0), 32768)
    return image


MODES: list[tuple[str, Callable[[], bytes], dict[tuple[int, int], tuple[int, int, int]]]] = [
    ("RGBA", lambda: saved(Image.new("RGBA", (4, 4), (0, 0, 255, 0)), "PNG"), {(0, 0): (255, 255, 255)}),
    ("P", lambda: saved(palette_with_transparency(), "PNG"), {(0, 0): (255, 255, 255), (1, 1): (10, 20, 30)}),
    ("L", lambda: saved(Image.new("L", (4, 4), 77), "PNG"), {(0, 0): (77, 77, 77)}),
    ("1", lambda: saved(Image.new("1", (4, 4), 1), "PNG"), {(0, 0): (255, 255, 255)}),
    (
        "CMYK JPEG",
        lambda: saved(Image.new("CMYK", (8, 8), (0, 0, 0, 0)), "JPEG", quality=100),
        {(4, 4): (255, 255, 255)},
    ),
    ("16-bit PNG", lambda: saved(sixteen_bit(), "PNG"), {(0, 0): (255, 255, 255), (1, 0): (128, 128, 128)}),
    ("LA", lambda: saved(Image.new("LA", (4, 4), (0, 0)), "PNG"), {(0, 0): (255, 255, 255)}),
]


@pytest.mark.parametrize(("make", "pixels"), [m[1:] for m in MODES], ids=[m[0] for m in MODES])
def test_every_mode_decodes_to_rgb(
    make: Callable[[], bytes], pixels: dict[tuple[int, int], tuple[int, int, int]]
) -> None:
    image = decode_image("x", make(), LIMITS)
    assert image.mode == "RGB"
    for xy, expected in pixels.items():
        assert image.getpixel(xy) == expected


def test_cmyk_jpeg_keeps_its_colour() -> None:
    data = saved(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG", quality=95)  # no cyan, full magenta+yellow
    pixel = decode_image("x.jpg", data, LIMITS).getpixel((4, 4))
    assert isinstance(pixel, tuple) and pixel[0] > 200 and pixel[1] < 60 and pixel[2] < 60  # red, not inverted


def test_exif_orientation_is_applied() -> None:
    image = Image.new("RGB", (20, 10), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 10, 10))  # left half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    decoded = decode_image("x.jpg", saved(image, "JPEG", exif=exif, quality=95), LIMITS)
    assert decoded.size == (10, 20)
    top = decoded.getpixel((5, 2))
    assert isinstance(top, tuple) and top[2] > 200 and top[0] < 60  # the blue left half is now on top


def test_validate_images_reports_pixel_violations_as_413_with_names() -> None:
    bomb = png_header_only(5000, 5000)
    with pytest.raises(ApiError) as caught:
        validate_images(
            [("ok.png", png()), ("big.png", bomb), ("bad.png", b"??")],
            dataclasses.replace(LIMITS, max_image_pixels=1_000_000),
        )
    error = caught.value
    assert (error.status, error.code) == (413, "too_large")
    assert [item["name"] for item in error.details["images"]] == ["big.png"]
    assert [item["name"] for item in error.details["invalid_images"]] == ["bad.png"]
    assert "big.png" in error.message


def test_a_real_huge_one_bit_png_is_refused_before_decoding() -> None:
    data = saved(Image.new("1", (10_000, 10_000)), "PNG")  # ~12 KB for 100 megapixels
    with pytest.warns(Image.DecompressionBombWarning), pytest.raises(ApiError) as caught:
        decode_image("huge.png", data, UploadLimits())
    assert (caught.value.status, caught.value.code) == (413, "too_large")


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_images"):
        UploadLimits(max_images=0)


# ---------------------------------------------------------------------------------------------------- hostile names


def gnu_tar(entries: dict[str, bytes]) -> bytes:
    """A GNU-format tar whose names go to the header as raw bytes: a lone surrogate "\\udcXX" becomes byte 0xXX."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT, errors="surrogateescape") as archive:
        for path, data in entries.items():
            info = tarfile.TarInfo(path)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def zip_with_raw_name(good: str, bad: bytes) -> bytes:
    """A zip flagged as UTF-8 (bit 11) in which the name `good` was replaced by the bytes `bad` (same length)."""
    data = make_zip({**folder({"cat": 2}), good: png()})
    assert len(good.encode()) == len(bad) and data.count(good.encode()) == 2  # local header + central directory
    return data.replace(good.encode(), bad)


def assert_renders(response: httpx.Response) -> dict[str, Any]:
    """The error came back as a JSON envelope that is valid UTF-8 end to end."""
    response.content.decode("utf-8")  # strict: raises if the server wrote anything that is not UTF-8
    return error_of(response)


# fmt: off
HOSTILE_NAMES: list[tuple[str, dict[str, Any], str, str]] = [
    # (id, request, code, fragment of the message)
    ("lone surrogate in a JSON label list", {**images_form(["a"] * 2), "data": {"labels": '["a\\ud800", "a\\ud800"]'}},
     "invalid_label", "lone surrogate U+D800"),
    ("latin-1 label folder in a tar", raw(gnu_tar(folder({"caf\udce9": 2, "dog": 2})), "application/x-tar"),
     "invalid_name", "byte 0xE9"),
    ("file name byte 0xff in a valid label folder",
     raw(gnu_tar({**folder({"cat": 2}), "cat/\udcff.png": png()}), "application/x-tar"), "invalid_name", "0xFF"),
    ("zip flagged UTF-8 with other bytes", raw(zip_with_raw_name("cat/\u00e9.png", b"cat/\xff\xfe.png"),
                                             "application/zip"), "invalid_name", "not valid UTF-8"),
    ("non-character in a label", images_form(["cat\ufdd0"] * 2), "invalid_label", "non-character U+FDD0"),
    ("non-character in an archive entry", raw(make_zip({**folder({"cat": 2}), "cat/x\uffff.png": png()}),
                                               "application/zip"), "invalid_name", "non-character U+FFFF"),
    ("non-character in a plane-16 label", images_form(["\U0010fffe"] * 2), "invalid_label", "U+10FFFE"),
    ("latin-1 multipart file name",
     raw(b'--XyZ\r\nContent-Disposition: form-data; name="images"; filename="caf\xe9.png"\r\n\r\n' + png()
         + b"\r\n--XyZ--\r\n", "multipart/form-data; boundary=XyZ"), "invalid_name", "0xE9"),
]
# fmt: on


@pytest.mark.parametrize(
    ("request_kwargs", "code", "fragment"), [c[1:] for c in HOSTILE_NAMES], ids=[c[0] for c in HOSTILE_NAMES]
)
async def test_hostile_names_get_a_422_that_renders(request_kwargs: dict[str, Any], code: str, fragment: str) -> None:
    response = await post("/tasks", **request_kwargs)
    assert response.status_code == 422, response.text
    error = assert_renders(response)
    assert error["code"] == code
    assert fragment in error["message"], error["message"]


async def test_the_refused_entry_is_named_in_ascii() -> None:
    response = await post(
        "/tasks", **raw(gnu_tar({**folder({"cat": 2}), "cat/\udcff.png": png()}), "application/x-tar")
    )
    assert assert_renders(response)["details"]["entries"] == ["cat/\\udcff.png"]
    assert response.content.isascii()


async def test_labels_are_nfc_normalised_into_one_class() -> None:
    composed, decomposed = "caf\u00e9", "cafe\u0301"
    response = await post("/tasks", **images_form([composed, decomposed, decomposed, composed]))
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["labels"], body["classes"]) == ([composed] * 4, [composed])


def test_an_error_with_unencodable_text_still_renders() -> None:
    response = error_response(ApiError(422, "x", "bad \ud800 label", {"labels": [{"label\udcff": "a\ud800"}]}))
    body = json.loads(bytes(response.body).decode("utf-8"))
    assert body["error"]["message"] == "bad \\ud800 label"
    assert body["error"]["details"] == {"labels": [{"label\\udcff": "a\\ud800"}]}


# ---------------------------------------------------------------------------------------------------- spooling


def file_request(path: Any, content_type: str) -> Request:
    """A request whose body is read from a file 256 KiB at a time, so the test itself holds none of it."""
    handle = open(path, "rb")  # noqa: SIM115 - closed when the body ends

    async def receive() -> dict[str, Any]:
        chunk = handle.read(256 * 1024)
        if not chunk:
            handle.close()
        return {"type": "http.request", "body": chunk, "more_body": bool(chunk)}

    headers = [(b"content-type", content_type.encode())]
    return Request({"type": "http", "method": "POST", "path": "/tasks", "headers": headers}, receive)


def fds_under(directory: Any) -> int:
    """Open file descriptors of this process on files in `directory` (unnamed temp files included)."""
    found = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            found += os.readlink(f"/proc/self/fd/{fd}").startswith(str(directory))
        except OSError:
            continue
    return found


@pytest.mark.parametrize("kind", ["zip", "tar", "multipart"])
async def test_a_big_upload_is_spooled_to_disk_not_held_in_memory(tmp_path: Any, kind: str) -> None:
    limits = UploadLimits(max_body_bytes=64 * 1024**2, max_images=100, max_image_bytes=2 * 1024**2)
    members = {f"{'ab'[i % 2]}/{i}.bin": random.Random(i).randbytes(1024**2) for i in range(24)}  # 24 MiB, stored
    body = tmp_path / "body"
    if kind == "zip":
        with zipfile.ZipFile(body, "w", zipfile.ZIP_STORED) as archive:
            for path, data in members.items():
                archive.writestr(path, data)
        content_type = "application/zip"
    elif kind == "tar":
        body.write_bytes(make_tar(members))
        content_type = "application/x-tar"
    else:
        with body.open("wb") as out:
            for path, data in members.items():
                out.write(
                    b'--XyZ\r\nContent-Disposition: form-data; name="images"; filename="%s"\r\n\r\n' % path.encode()
                )
                out.write(data + b"\r\n")
            for path in members:
                out.write(
                    b'--XyZ\r\nContent-Disposition: form-data; name="labels"\r\n\r\n' + path[0].encode() + b"\r\n"
                )
            out.write(b"--XyZ--\r\n")
        content_type = "multipart/form-data; boundary=XyZ"
    spool_dir = tmp_path / "spool"
    tracemalloc.start()
    try:
        upload = await read_task_upload(file_request(body, content_type), limits, spool_dir)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    try:
        assert peak < 8 * 1024**2, f"{peak / 1024**2:.1f} MiB held in memory while reading a 24 MiB upload"
        assert fds_under(spool_dir) >= 1  # the spooled images live in an unnamed file under the spool directory
        assert len(upload.images) == 24 and upload.classes == ["a", "b"]
        for (name, data), (path, expected) in zip(upload.images, members.items(), strict=True):
            assert data == expected and name.endswith(path.rsplit("/", 1)[-1])
    finally:
        upload.close()
    assert fds_under(spool_dir) == 0 and list(spool_dir.iterdir()) == []  # nothing left behind


async def test_a_refused_upload_releases_its_spools(tmp_path: Any) -> None:
    spool_dir = tmp_path / "spool"
    body = tmp_path / "body"
    body.write_bytes(make_zip({**folder({"cat": 2}), "dog/0.png": png()}))  # one class too small: 422
    with pytest.raises(ApiError) as caught:
        await read_task_upload(file_request(body, "application/zip"), LIMITS, spool_dir)
    assert caught.value.code == "too_few_images"
    assert fds_under(spool_dir) == 0 and list(spool_dir.iterdir()) == []
