"""Tests of the offline benchmark datasets and task streams (bench)."""

from __future__ import annotations

import io
import re
import unicodedata
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bench import glyphs as glyphs_module
from bench.datasets import (
    DIGITS_CLASSES,
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    STREAM_NAMES,
    Split,
    Task,
    TaskStream,
    is_safe_label,
    load_fashion_mnist,
    make_stream,
    png_bytes,
    write_imagefolder,
    write_imagefolder_zip,
)
from bench.glyph_render import GlyphRenderConfig, render_glyph_samples, split_fonts
from bench.glyphs import DEFAULT_FONT_DIR, glyph_classes, select_glyph_classes

needs_fmnist = pytest.mark.skipif(
    not (FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file(),
    reason=f"Fashion-MNIST not in {FASHION_MNIST_DIR}: `sudo apt-get install dataset-fashion-mnist` (CI installs it)",
)
needs_fonts = pytest.mark.skipif(
    not (DEFAULT_FONT_DIR / "NotoSans-Regular.ttf").is_file(),
    reason=f"Noto fonts not in {DEFAULT_FONT_DIR}: `sudo apt-get install fonts-noto-core` (CI installs it)",
)


def arrays(images: list[Image.Image]) -> list[np.ndarray]:
    return [np.asarray(image) for image in images]


def same_images(a: list[Image.Image], b: list[Image.Image]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(arrays(a), arrays(b), strict=True))


def check_stream_shape(stream: TaskStream, tasks: int, per_task: int, train: int, test: int, size: int) -> None:
    assert len(stream) == tasks
    assert len(set(stream.classes)) == tasks * per_task  # unique, hence disjoint across tasks
    for task in stream:
        assert len(task.classes) == per_task
        assert len(task.train_images) == len(task.train_labels) == per_task * train
        assert len(task.test_images) == len(task.test_labels) == per_task * test
        assert set(task.train_labels) == set(task.test_labels) == set(task.classes)
        for image in task.train_images + task.test_images:
            assert image.mode == "RGB" and image.size == (size, size)
        assert all(is_safe_label(label) for label in task.classes)


# ----------------------------------------------------------------------------------------------- Fashion-MNIST


@needs_fmnist
def test_fmnist_stream_shape_and_classes() -> None:
    stream = make_stream("fmnist5", seed=3, train_per_class=6, test_per_class=4)
    check_stream_shape(stream, tasks=5, per_task=2, train=6, test=4, size=28)
    assert sorted(stream.classes) == sorted(FASHION_MNIST_CLASSES)
    assert stream.seen_classes(1) == stream[0].classes + stream[1].classes
    assert len(stream.seen_test_data(2)) == 3 * 2 * 4


@needs_fmnist
def test_fmnist_deterministic_and_seeded() -> None:
    a = make_stream("fmnist5", seed=1, train_per_class=3, test_per_class=2)
    b = make_stream("fmnist5", seed=1, train_per_class=3, test_per_class=2)
    c = make_stream("fmnist5", seed=2, train_per_class=3, test_per_class=2)
    assert a.classes == b.classes
    for x, y in zip(a, b, strict=True):
        assert x.train_labels == y.train_labels and same_images(x.train_images, y.train_images)
        assert same_images(x.test_images, y.test_images)
    assert a.classes != c.classes or not same_images(a[0].train_images, c[0].train_images)


@needs_fmnist
@pytest.mark.parametrize("split", ["train", "test"])
def test_fmnist_images_come_from_their_official_split(split: str) -> None:
    stream = make_stream("fmnist5", seed=0, train_per_class=3, test_per_class=3, num_tasks=2)
    raw_images, raw_labels = load_fashion_mnist("test" if split == "test" else "train")
    for task in stream:
        data = task.split("test" if split == "test" else "train")
        for image, label in zip(data.images, data.labels, strict=True):
            gray = np.asarray(image)[..., 0]
            pool = raw_images[raw_labels == FASHION_MNIST_CLASSES.index(label)]
            assert (pool == gray).all(axis=(1, 2)).any(), f"{label} image not found in the {split} split"


def test_fmnist_missing_files_message(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        make_stream("fmnist5", data_dir=tmp_path)


# ----------------------------------------------------------------------------------------------------- digits


def test_digits_stream() -> None:
    stream = make_stream("digits5", seed=0, train_per_class=5, test_per_class=3)
    check_stream_shape(stream, tasks=5, per_task=2, train=5, test=3, size=32)
    assert sorted(stream.classes) == sorted(DIGITS_CLASSES)
    again = make_stream("digits5", seed=0, train_per_class=5, test_per_class=3)
    assert same_images(stream[4].train_images, again[4].train_images)
    for task in stream:  # the 1797 digits are all distinct, so equal arrays would mean a shared sample
        train = {a.tobytes() for a in arrays(task.train_images)}
        assert train.isdisjoint(a.tobytes() for a in arrays(task.test_images))


# ----------------------------------------------------------------------------------------------------- glyphs


@needs_fonts
def test_glyph_class_list() -> None:
    classes = glyph_classes()
    assert len(classes) >= 1000
    assert len({g.render_hash for g in classes}) == len(classes)
    assert len({g.char for g in classes}) == len(classes)
    assert [ord(g.char) for g in classes] == sorted(ord(g.char) for g in classes)
    assert len({g.script for g in classes}) >= 15
    chars = {g.char for g in classes}
    assert "A" in chars and "Α" not in chars and "А" not in chars  # Latin kept, Greek/Cyrillic lookalikes dropped
    for glyph in classes:
        assert len(set(glyph.fonts)) >= 3
        assert unicodedata.category(glyph.char)[0] in "LNS"
        assert is_safe_label(glyph.label) and re.fullmatch(r"glyph-U\+[0-9A-F]{4,6}", glyph.label)
    assert glyph_classes() is classes  # memoized


@needs_fonts
def test_glyph_selection_is_seeded_and_balanced() -> None:
    a = select_glyph_classes(1000, seed=5)
    assert a == select_glyph_classes(1000, seed=5) and a != select_glyph_classes(1000, seed=6)
    counts: dict[str, int] = {}
    for glyph in a:
        counts[glyph.script] = counts.get(glyph.script, 0) + 1
    assert max(counts.values()) <= 1000 // 15


@needs_fonts
def test_glyph_presets_sizes_and_labels() -> None:
    for name, tasks, per_task in (("glyphs100", 100, 10), ("glyphs300", 334, 3)):
        stream = make_stream(name, seed=0)  # lazy: nothing is rendered here
        assert len(stream) == tasks and all(len(t.classes) == per_task for t in stream)
        assert len(set(stream.classes)) == tasks * per_task >= 1000
        assert all(is_safe_label(label) for label in stream.classes)


@needs_fonts
def test_glyph_tiny_stream_renders_and_is_deterministic() -> None:
    stream = make_stream("glyphs-tiny", seed=7, train_per_class=4, test_per_class=3, image_size=48)
    check_stream_shape(stream, tasks=3, per_task=2, train=4, test=3, size=48)
    again = make_stream("glyphs-tiny", seed=7, train_per_class=4, test_per_class=3, image_size=48)
    other = make_stream("glyphs-tiny", seed=8, train_per_class=4, test_per_class=3, image_size=48)
    for x, y in zip(stream, again, strict=True):
        assert same_images(x.train_images, y.train_images) and same_images(x.test_images, y.test_images)
    assert stream.classes != other.classes


@needs_fonts
def test_glyph_train_and_test_renderings_are_disjoint() -> None:
    for glyph in select_glyph_classes(8, seed=1):
        fonts = split_fonts(glyph, seed=1)
        assert fonts["test"] and len(fonts["train"]) >= 2 and set(fonts["train"]).isdisjoint(fonts["test"])
        for holdout in (True, False):
            train = render_glyph_samples(glyph, "train", 6, seed=1, image_size=32, holdout_fonts=holdout)
            test = render_glyph_samples(glyph, "test", 6, seed=1, image_size=32, holdout_fonts=holdout)
            train_bytes = {a.tobytes() for a in arrays(train)}
            assert len(train_bytes) == 6 and train_bytes.isdisjoint(a.tobytes() for a in arrays(test))


@needs_fonts
def test_glyph_renderings_have_ink_inside_the_frame() -> None:
    clean = GlyphRenderConfig(noise_std=0.0, tint=0.0)  # exact two-level images make ink easy to measure
    for glyph in select_glyph_classes(30, seed=2):
        for image in render_glyph_samples(glyph, "train", 2, seed=2, image_size=48, config=clean):
            gray = np.asarray(image, dtype=np.float32).mean(axis=2)
            border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
            ink = np.abs(gray - np.median(border)) > 30
            assert 0.01 < ink.mean() < 0.8, glyph.label
            assert np.concatenate([ink[0], ink[-1], ink[:, 0], ink[:, -1]]).mean() < 0.1, glyph.label


@needs_fonts
def test_glyph_rendering_is_deterministic_and_prefix_stable() -> None:
    glyph = select_glyph_classes(1, seed=0)[0]
    first = render_glyph_samples(glyph, "train", 5, seed=3, image_size=32)
    assert same_images(first, render_glyph_samples(glyph, "train", 5, seed=3, image_size=32))
    assert same_images(first, render_glyph_samples(glyph, "train", 8, seed=3, image_size=32)[:5])
    assert not same_images(first, render_glyph_samples(glyph, "train", 5, seed=4, image_size=32))


@needs_fonts
def test_glyph_class_list_disk_cache(tmp_path: Path) -> None:
    # A handful of fonts keeps this scan cheap; symlinks are enough for fontTools and FreeType.
    font_dir = tmp_path / "fonts"
    font_dir.mkdir()
    for name in ("NotoSans-Regular", "NotoSans-Bold", "NotoSerif-Regular", "NotoSansArmenian-Regular"):
        (font_dir / f"{name}.ttf").symlink_to(DEFAULT_FONT_DIR / f"{name}.ttf")
    classes = glyph_classes(font_dir, cache_dir=tmp_path / "c1")
    assert classes and {g.script for g in classes} >= {"Latin", "Greek", "Cyrillic"}
    (cache_file,) = (tmp_path / "c1").glob("glyph-classes-*.json")
    # A second cache dir with a doctored copy proves the class list is read back from disk, not rescanned.
    (tmp_path / "c2").mkdir()
    text = cache_file.read_text(encoding="utf-8").replace('"script": "Latin"', '"script": "Doctored"')
    (tmp_path / "c2" / cache_file.name).write_text(text, encoding="utf-8")
    reread = glyph_classes(font_dir, cache_dir=tmp_path / "c2")
    assert [g.char for g in reread] == [g.char for g in classes] and "Doctored" in {g.script for g in reread}
    assert glyphs_module._from_json(text, "another fingerprint") is None


def test_missing_font_dir_message(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="apt-get install fonts-noto-core"):
        make_stream("glyphs-tiny", font_dir=tmp_path)


# ------------------------------------------------------------------------------------------- model and writers


def test_unknown_stream_name_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="unknown stream 'cifar100'") as info:
        make_stream("cifar100", seed=0)
    assert all(name in str(info.value) for name in STREAM_NAMES)
    assert {"fmnist5", "digits5", "glyphs100", "glyphs300", "glyphs-tiny"} <= set(STREAM_NAMES)


@pytest.mark.parametrize(
    ("label", "safe"),
    [
        ("sneaker", True),
        ("glyph-U+0915", True),
        ("ankle-boot", True),
        ("a/b", False),
        ("a\\b", False),
        ("tab\there", False),
        ("", False),
        ("..", False),
        (" padded", False),
        ("x" * 65, False),
    ],
)
def test_label_safety(label: str, safe: bool) -> None:
    assert is_safe_label(label) is safe


def test_task_rejects_bad_input_and_stream_rejects_repeated_classes() -> None:
    empty = Split([], [])
    with pytest.raises(ValueError, match="unsafe class label"):
        Task(0, ["a/b"], train=empty, test=empty)
    with pytest.raises(ValueError, match="repeats classes"):
        TaskStream("x", 0, (Task(0, ["a"], train=empty, test=empty), Task(1, ["a"], train=empty, test=empty)))
    with pytest.raises(ValueError, match="labels outside the task"):
        Task(0, ["a"], train=Split([Image.new("RGB", (2, 2))], ["b"]), test=empty).split("train")


def test_lazy_task_release_rebuilds_same_data() -> None:
    calls = []

    def load() -> Split:
        calls.append(1)
        return Split([Image.new("RGB", (4, 4), (len(calls), 0, 0))], ["a"])

    task = Task(0, ["a"], train=load, test=Split([], []))
    assert task.train is task.train and len(calls) == 1
    task.release("train")
    assert len(task.train) == 1 and len(calls) == 2
    task.release()
    assert len(task.test) == 0  # eager splits survive release()


def make_tiny_task() -> Task:
    stream = make_stream("digits5", seed=0, train_per_class=3, test_per_class=2, image_size=16)
    return stream[0]


def test_imagefolder_zip_round_trip(tmp_path: Path) -> None:
    task = make_tiny_task()
    buffer = io.BytesIO()
    write_imagefolder_zip(task, buffer)
    with zipfile.ZipFile(io.BytesIO(buffer.getvalue())) as archive:
        names = sorted(archive.namelist())
        assert names == sorted(f"{label}/{n}.png" for label in task.classes for n in range(3))
        first = Image.open(io.BytesIO(archive.read(f"{task.classes[0]}/0.png")))
        assert np.array_equal(np.asarray(first), np.asarray(task.train_images[0]))  # PNG is lossless
    write_imagefolder_zip(task, tmp_path / "test.zip", split="test")
    with zipfile.ZipFile(tmp_path / "test.zip") as archive:
        assert len(archive.namelist()) == 2 * 2
    again = io.BytesIO()
    write_imagefolder_zip(task, again)
    assert again.getvalue() == buffer.getvalue()  # reproducible bytes


def test_imagefolder_directory_and_png_bytes(tmp_path: Path) -> None:
    task = make_tiny_task()
    root = write_imagefolder(task, tmp_path / "tree", split="test")
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png")) == sorted(
        f"{label}/{n}.png" for label in task.classes for n in range(2)
    )
    data = png_bytes(task.test_images[0])
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(data))), np.asarray(task.test_images[0]))
