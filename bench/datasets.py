"""Offline datasets and class-incremental task streams for the benchmark, the example client and the tests.

Everything works without network access:

* ``fmnist5`` - Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` (idx ``.gz`` files), 5 tasks of 2
  classes; per-class subsets drawn from the official train split (training) and test split (test).
* ``digits5`` - scikit-learn's bundled 8x8 digits upscaled to 32x32, 5 tasks of 2 classes; a seeded, disjoint
  per-class train/test split. Meant for quick tests.
* ``glyphs100`` / ``glyphs300`` / ``glyphs-tiny`` - characters rendered from the Noto fonts of ``fonts-noto-core``
  (see :mod:`bench.glyphs` and :mod:`bench.glyph_render`): 100 tasks x 10 classes, 334 tasks x 3
  classes, 3 tasks x 2 classes. These render lazily, task by task.

Use :func:`make_stream`. All streams are deterministic in their arguments; class order is a seeded permutation and
task images are grouped by class in task class order. Fashion-MNIST and digits tasks hold their images eagerly.
"""

from __future__ import annotations

import gzip
import importlib.util
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

from bench.glyph_render import GlyphRenderConfig, make_glyph_stream
from bench.glyphs import GlyphClass, glyph_classes
from bench.tasks import (
    Split,
    Task,
    TaskStream,
    is_safe_label,
    png_bytes,
    write_imagefolder,
    write_imagefolder_zip,
)

__all__ = [
    "DIGITS_CLASSES",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIR",
    "STREAM_NAMES",
    "GlyphClass",
    "GlyphRenderConfig",
    "Split",
    "Task",
    "TaskStream",
    "glyph_classes",
    "is_safe_label",
    "load_fashion_mnist",
    "make_stream",
    "png_bytes",
    "write_imagefolder",
    "write_imagefolder_zip",
]

logger = logging.getLogger(__name__)

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot",
)  # fmt: skip
DIGITS_CLASSES = tuple(f"digit-{d}" for d in range(10))
_FMNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# Distinct tags keep the random streams of different datasets apart when they share a seed.
_FMNIST_TAG, _DIGITS_TAG = 0x666D6E, 0x646967


def _read_idx(path: Path, expected_ndim: int) -> np.ndarray:
    """Read an idx file (optionally gzipped): big-endian magic ``0x0000 08 <ndim>``, dims, then uint8 data."""
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if len(raw) < 4 or raw[:3] != b"\x00\x00\x08" or raw[3] != expected_ndim:
        raise ValueError(f"{path} is not an idx file of {expected_ndim}-d uint8 data")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=expected_ndim, offset=4))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * expected_ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {dims} but holds {data.size} values")
    return data.reshape(dims)


@lru_cache(maxsize=4)
def _load_fashion_mnist(directory: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    arrays = []
    for stem, ndim in zip(_FMNIST_FILES[split], (3, 1), strict=True):
        candidates = [Path(directory) / f"{stem}.gz", Path(directory) / stem]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            raise FileNotFoundError(
                f"Fashion-MNIST file {candidates[0]} not found; install it with "
                "`sudo apt-get install dataset-fashion-mnist` or pass data_dir=... pointing at the idx files"
            )
        arrays.append(_read_idx(path, ndim))
    images, labels = arrays
    if len(images) != len(labels) or images.shape[1:] != (28, 28) or labels.max(initial=0) >= 10:
        raise ValueError(f"unexpected Fashion-MNIST {split} arrays in {directory}: {images.shape}, {labels.shape}")
    return images, labels  # np.frombuffer over bytes gives read-only arrays, safe to share from the cache


def load_fashion_mnist(
    split: Literal["train", "test"], data_dir: str | os.PathLike[str] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Load a Fashion-MNIST split (memoized, read-only arrays).

    Args:
        split: ``"train"`` (60000 images) or ``"test"`` (10000 images).
        data_dir: Directory of the idx files, default :data:`FASHION_MNIST_DIR`.

    Returns:
        ``(images, labels)``: uint8 ``(N, 28, 28)`` and uint8 ``(N,)`` indices into :data:`FASHION_MNIST_CLASSES`.

    Raises:
        FileNotFoundError: If the files are missing (with the apt-get hint).
    """
    return _load_fashion_mnist(str(Path(FASHION_MNIST_DIR if data_dir is None else data_dir).resolve()), split)


def _to_rgb(gray: np.ndarray, image_size: int) -> Image.Image:
    image = Image.fromarray(gray)
    if image.size != (image_size, image_size):
        image = image.resize((image_size, image_size), Image.Resampling.BILINEAR)
    return image.convert("RGB")


def _class_tasks(
    names: tuple[str, ...],
    order: np.ndarray,
    classes_per_task: int,
    pick: Callable[[int], tuple[list[Image.Image], list[Image.Image]]],
) -> tuple[Task, ...]:
    """Group classes (in ``order``) into eager tasks; ``pick(class_id)`` returns (train images, test images)."""
    tasks = []
    for index in range(len(order) // classes_per_task):
        ids = [int(i) for i in order[index * classes_per_task : (index + 1) * classes_per_task]]
        train, test = Split([], []), Split([], [])
        for class_id in ids:
            train_images, test_images = pick(class_id)
            train.images.extend(train_images)
            train.labels.extend([names[class_id]] * len(train_images))
            test.images.extend(test_images)
            test.labels.extend([names[class_id]] * len(test_images))
        tasks.append(Task(index, [names[i] for i in ids], train=train, test=test))
    return tuple(tasks)


def _check_counts(
    name: str, seed: int, num_tasks: int, classes_per_task: int, per_class: tuple[int, int], image_size: int
) -> None:
    if seed < 0 or num_tasks < 1 or classes_per_task < 1 or min(per_class) < 1 or image_size < 1:
        raise ValueError(f"{name}: seed must be >= 0 and task/class/image counts and image_size >= 1")
    if num_tasks * classes_per_task > 10:
        raise ValueError(f"{name}: {num_tasks} tasks x {classes_per_task} classes exceeds the 10 classes")


def make_fmnist_stream(
    name: str = "fmnist5",
    *,
    seed: int = 0,
    train_per_class: int = 200,
    test_per_class: int = 100,
    image_size: int = 28,
    num_tasks: int = 5,
    classes_per_task: int = 2,
    data_dir: str | os.PathLike[str] | None = None,
) -> TaskStream:
    """Fashion-MNIST stream; per class, a seeded subset of the official train / test split (kept in file order).

    The subset of a class depends only on (seed, class, split, count) - not on the class order - and a larger
    count extends a smaller one. See :func:`make_stream` for the arguments.
    """
    _check_counts(name, seed, num_tasks, classes_per_task, (train_per_class, test_per_class), image_size)
    splits = {split: load_fashion_mnist(split, data_dir) for split in ("train", "test")}

    def pick(class_id: int) -> tuple[list[Image.Image], list[Image.Image]]:
        out: list[list[Image.Image]] = []
        for code, (split, count) in enumerate((("train", train_per_class), ("test", test_per_class))):
            images, labels = splits[split]
            pool = np.flatnonzero(labels == class_id)
            if count > len(pool):
                raise ValueError(f"{name}: {split} has {len(pool)} images of {FASHION_MNIST_CLASSES[class_id]}")
            chosen = np.sort(np.random.default_rng([seed, _FMNIST_TAG, class_id, code]).permutation(pool)[:count])
            out.append([_to_rgb(images[i], image_size) for i in chosen])
        return out[0], out[1]

    order = np.random.default_rng([seed, _FMNIST_TAG]).permutation(10)
    return TaskStream(
        name, seed, _class_tasks(FASHION_MNIST_CLASSES, order[: num_tasks * classes_per_task], classes_per_task, pick)
    )


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    """The 1797 scikit-learn digits as uint8 0..255 ``(N, 8, 8)`` images and ``(N,)`` labels (read-only)."""
    spec = importlib.util.find_spec("sklearn")
    bundled = None
    if spec is not None and spec.submodule_search_locations:
        bundled = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / "digits.csv.gz"
    if bundled is not None and bundled.is_file():
        # The CSV that load_digits() reads; parsing it directly skips importing scikit-learn (over a second).
        table = np.loadtxt(bundled, delimiter=",")
        pixels, target = table[:, :-1].reshape(-1, 8, 8), table[:, -1]
    else:
        from sklearn.datasets import load_digits

        bunch = load_digits()
        pixels, target = np.asarray(bunch.images, dtype=np.float64), np.asarray(bunch.target)
    if pixels.shape != (1797, 8, 8):
        raise ValueError(f"unexpected scikit-learn digits shape {pixels.shape}")
    images = np.rint(pixels * (255 / 16)).astype(np.uint8)
    labels = target.astype(np.int64)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def digits_split(transform: Callable[[Image.Image], Any], size: int = 64) -> tuple[Any, Any, Any, Any]:
    """scikit-learn's digits as RGB images of `size` px through `transform`, stacked, with their targets and a
    seeded split of the rows into 1200 training and 597 held-out: (images, targets, train_rows, test_rows)."""
    import torch
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.stack(
        [
            transform(Image.fromarray((x * 255 / 16).astype(np.uint8)).resize((size, size)).convert("RGB"))
            for x in digits.images
        ]
    )
    targets = torch.tensor(digits.target)
    order = torch.randperm(len(targets), generator=torch.Generator().manual_seed(0))
    return images, targets, order[:1200], order[1200:]


def make_digits_stream(
    name: str = "digits5",
    *,
    seed: int = 0,
    train_per_class: int = 50,
    test_per_class: int = 20,
    image_size: int = 32,
    num_tasks: int = 5,
    classes_per_task: int = 2,
) -> TaskStream:
    """scikit-learn digits stream (bundled, 8x8 upscaled); per class a seeded permutation gives test then train.

    Each class has ~174-183 images; test takes the first ``test_per_class`` of the permutation and train the next
    ``train_per_class``, so the splits are disjoint. See :func:`make_stream` for the arguments.
    """
    _check_counts(name, seed, num_tasks, classes_per_task, (train_per_class, test_per_class), image_size)
    images, labels = _digits()

    def pick(class_id: int) -> tuple[list[Image.Image], list[Image.Image]]:
        pool = np.random.default_rng([seed, _DIGITS_TAG, class_id]).permutation(np.flatnonzero(labels == class_id))
        if test_per_class + train_per_class > len(pool):
            raise ValueError(f"{name}: digit {class_id} has only {len(pool)} images")
        test_ids, train_ids = pool[:test_per_class], pool[test_per_class : test_per_class + train_per_class]
        return [_to_rgb(images[i], image_size) for i in train_ids], [_to_rgb(images[i], image_size) for i in test_ids]

    order = np.random.default_rng([seed, _DIGITS_TAG]).permutation(10)
    return TaskStream(
        name, seed, _class_tasks(DIGITS_CLASSES, order[: num_tasks * classes_per_task], classes_per_task, pick)
    )


@dataclass(frozen=True)
class _Preset:
    builder: Callable[..., TaskStream]
    train_per_class: int
    test_per_class: int
    image_size: int
    fixed: dict[str, Any] = field(default_factory=dict)


def _glyph_preset(num_tasks: int, classes_per_task: int, train: int, test: int) -> _Preset:
    return _Preset(make_glyph_stream, train, test, 64, {"num_tasks": num_tasks, "classes_per_task": classes_per_task})


_PRESETS: dict[str, _Preset] = {
    "fmnist5": _Preset(make_fmnist_stream, 200, 100, 28),
    "digits5": _Preset(make_digits_stream, 50, 20, 32),
    "glyphs100": _glyph_preset(100, 10, 20, 10),
    "glyphs300": _glyph_preset(334, 3, 20, 10),
    "glyphs-tiny": _glyph_preset(3, 2, 4, 2),
}
STREAM_NAMES: tuple[str, ...] = tuple(_PRESETS)


def make_stream(
    name: str,
    *,
    seed: int = 0,
    train_per_class: int | None = None,
    test_per_class: int | None = None,
    image_size: int | None = None,
    **kwargs: Any,
) -> TaskStream:
    """Build a named task stream.

    ============  ==============  ===================  =====================  ==========
    name          tasks x classes train/test per class  image size (default)  rendering
    ============  ==============  ===================  =====================  ==========
    fmnist5       5 x 2           200 / 100            28                     eager
    digits5       5 x 2           50 / 20              32                     eager
    glyphs100     100 x 10        20 / 10              64                     lazy
    glyphs300     334 x 3         20 / 10              64                     lazy
    glyphs-tiny   3 x 2           4 / 2                64                     lazy
    ============  ==============  ===================  =====================  ==========

    Args:
        name: One of :data:`STREAM_NAMES`.
        seed: Non-negative seed; the same arguments always give the same stream.
        train_per_class: Training images per class (None: preset default).
        test_per_class: Test images per class (None: preset default).
        image_size: Side of the square RGB images (None: preset default).
        **kwargs: Builder options: ``num_tasks`` and ``classes_per_task`` (all streams); ``data_dir`` (fmnist5);
            ``font_dir``, ``cache_dir``, ``holdout_fonts``, ``render_config`` (glyph streams).

    Returns:
        The stream.

    Raises:
        ValueError: On an unknown name (the message lists the valid ones) or impossible counts.
        FileNotFoundError: When the Debian data package of the stream is not installed.
    """
    preset = _PRESETS.get(name)
    if preset is None:
        raise ValueError(f"unknown stream {name!r}; valid names: {', '.join(STREAM_NAMES)}")
    options: dict[str, Any] = {**preset.fixed, **kwargs}
    return preset.builder(
        name,
        seed=seed,
        train_per_class=preset.train_per_class if train_per_class is None else train_per_class,
        test_per_class=preset.test_per_class if test_per_class is None else test_per_class,
        image_size=preset.image_size if image_size is None else image_size,
        **options,
    )
