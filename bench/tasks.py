"""Task-stream data model shared by every benchmark dataset, plus PNG / ImageFolder writers.

A :class:`TaskStream` is an ordered sequence of :class:`Task` objects. Each task introduces new classes (class-
incremental learning); class labels are unique across the whole stream and safe to use as HTTP labels and as
folder names in an ImageFolder tree.

Splits of a task are either held eagerly (small datasets such as Fashion-MNIST subsets) or produced lazily by a
loader callable (rendered glyphs). A lazy split is materialized on first access and cached on the task until
:meth:`Task.release` drops it, so a long stream can be walked task by task in bounded memory: upload a task's
training split, call ``task.release("train")`` and move on. Re-materializing a released split gives identical
images because every loader is deterministic.
"""

from __future__ import annotations

import io
import os
import unicodedata
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

from PIL import Image

__all__ = [
    "MAX_LABEL_LENGTH",
    "Split",
    "SplitName",
    "Task",
    "TaskStream",
    "check_label",
    "is_safe_label",
    "png_bytes",
    "write_imagefolder",
    "write_imagefolder_zip",
]

MAX_LABEL_LENGTH = 64
SplitName = Literal["train", "test"]
# A fixed timestamp keeps the zip bytes reproducible (zip cannot store dates before 1980).
_ZIP_DATE_TIME = (1980, 1, 1, 0, 0, 0)


def is_safe_label(label: str) -> bool:
    """Whether ``label`` can be used as an HTTP label and as a single path component.

    Args:
        label: Candidate class label.

    Returns:
        True when the label is 1..64 characters, contains no path separator, no control/format/unassigned
        character (Unicode category ``C*``), no leading/trailing whitespace and is not ``.`` or ``..``.
    """
    if not 0 < len(label) <= MAX_LABEL_LENGTH or label in {".", ".."} or label != label.strip():
        return False
    return not any(ch in "/\\" or unicodedata.category(ch).startswith("C") for ch in label)


def check_label(label: str) -> str:
    """Return ``label`` unchanged, or raise ValueError when :func:`is_safe_label` rejects it.

    Args:
        label: Candidate class label.

    Returns:
        The same label.

    Raises:
        ValueError: If the label is unsafe.
    """
    if not is_safe_label(label):
        raise ValueError(f"unsafe class label {label!r}: need 1..{MAX_LABEL_LENGTH} chars, no '/', '\\' or controls")
    return label


@dataclass(frozen=True)
class Split:
    """Images and their labels (parallel lists); images are RGB PIL images."""

    images: list[Image.Image]
    labels: list[str]

    def __post_init__(self) -> None:
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.images)


SplitSource = Split | Callable[[], Split]


class Task:
    """One step of a class-incremental stream: new classes with a training and a test split.

    Args:
        index: Position of the task in its stream (0-based).
        classes: Labels introduced by this task, in a fixed order.
        train: The training split, or a zero-argument callable producing it on demand.
        test: The test split, or a zero-argument callable producing it on demand.

    Lazy splits are cached after the first access (not thread-safe, but loaders are deterministic so a race
    only wastes work).
    """

    def __init__(self, index: int, classes: Sequence[str], *, train: SplitSource, test: SplitSource) -> None:
        if len(set(classes)) != len(classes) or not classes:
            raise ValueError(f"task {index}: classes must be non-empty and unique, got {list(classes)}")
        self.index = index
        self.classes: list[str] = [check_label(c) for c in classes]
        self._sources: dict[SplitName, SplitSource] = {"train": train, "test": test}
        self._cache: dict[SplitName, Split] = {}

    def __repr__(self) -> str:
        return f"Task(index={self.index}, classes={self.classes!r})"

    def split(self, name: SplitName) -> Split:
        """Return the named split, materializing a lazy one.

        Args:
            name: ``"train"`` or ``"test"``.

        Returns:
            The split; its labels are all among :attr:`classes`.
        """
        cached = self._cache.get(name)
        if cached is not None:
            return cached
        source = self._sources[name]
        data = source if isinstance(source, Split) else source()
        unknown = set(data.labels) - set(self.classes)
        if unknown:
            raise ValueError(f"task {self.index} {name} split has labels outside the task: {sorted(unknown)}")
        self._cache[name] = data
        return data

    def release(self, name: SplitName | None = None) -> None:
        """Drop cached lazy splits (both when ``name`` is None); eager splits stay, they cannot be rebuilt.

        Args:
            name: Split to release, or None for both.
        """
        for key in ("train", "test") if name is None else (name,):
            if not isinstance(self._sources[key], Split):
                self._cache.pop(key, None)

    @property
    def train(self) -> Split:
        """The training split."""
        return self.split("train")

    @property
    def test(self) -> Split:
        """The test split."""
        return self.split("test")

    @property
    def train_images(self) -> list[Image.Image]:
        """Training images (RGB)."""
        return self.train.images

    @property
    def train_labels(self) -> list[str]:
        """Training labels, parallel to :attr:`train_images`."""
        return self.train.labels

    @property
    def test_images(self) -> list[Image.Image]:
        """Test images (RGB)."""
        return self.test.images

    @property
    def test_labels(self) -> list[str]:
        """Test labels, parallel to :attr:`test_images`."""
        return self.test.labels


@dataclass(frozen=True)
class TaskStream:
    """An ordered sequence of tasks with disjoint classes.

    Attributes:
        name: Stream preset name (e.g. ``"fmnist5"``).
        seed: Seed the stream was built from.
        tasks: The tasks, ``tasks[i].index == i``.
    """

    name: str
    seed: int
    tasks: tuple[Task, ...]

    def __post_init__(self) -> None:
        seen: set[str] = set()
        for i, task in enumerate(self.tasks):
            if task.index != i:
                raise ValueError(f"task at position {i} has index {task.index}")
            overlap = seen.intersection(task.classes)
            if overlap:
                raise ValueError(f"task {i} repeats classes of earlier tasks: {sorted(overlap)}")
            seen.update(task.classes)

    def __len__(self) -> int:
        return len(self.tasks)

    def __iter__(self) -> Iterator[Task]:
        return iter(self.tasks)

    def __getitem__(self, index: int) -> Task:
        return self.tasks[index]

    @property
    def classes(self) -> list[str]:
        """All class labels in stream order (task 0's classes first)."""
        return [c for task in self.tasks for c in task.classes]

    def seen_classes(self, k: int) -> list[str]:
        """Labels of tasks ``0..k`` inclusive, in stream order.

        Args:
            k: Index of the last task seen.

        Returns:
            The labels.
        """
        return [c for task in self._upto(k) for c in task.classes]

    def seen_test_data(self, k: int) -> Split:
        """All test data of tasks ``0..k`` inclusive, for "accuracy on all seen classes".

        Args:
            k: Index of the last task seen.

        Returns:
            Concatenated test split (materializes lazy test splits of those tasks).
        """
        images: list[Image.Image] = []
        labels: list[str] = []
        for task in self._upto(k):
            images.extend(task.test.images)
            labels.extend(task.test.labels)
        return Split(images, labels)

    def _upto(self, k: int) -> tuple[Task, ...]:
        if not 0 <= k < len(self.tasks):
            raise IndexError(f"task index {k} out of range for a stream of {len(self.tasks)} tasks")
        return self.tasks[: k + 1]


def png_bytes(image: Image.Image, *, compress_level: int = 6) -> bytes:
    """Encode an image as PNG.

    Args:
        image: Any PIL image.
        compress_level: zlib level 0..9 (lower is faster, bigger).

    Returns:
        The PNG file contents.
    """
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=compress_level)
    return buffer.getvalue()


def _imagefolder_entries(data: Task | Split, split: SplitName) -> Iterator[tuple[str, Image.Image]]:
    """Yield ``(<label>/<n>.png, image)`` with ``n`` counting from 0 per label in split order."""
    chosen = data.split(split) if isinstance(data, Task) else data
    counters: dict[str, int] = {}
    for image, label in zip(chosen.images, chosen.labels, strict=True):
        n = counters.get(label, 0)
        counters[label] = n + 1
        yield f"{check_label(label)}/{n}.png", image


def write_imagefolder_zip(
    data: Task | Split, path_or_buffer: str | os.PathLike[str] | BinaryIO, *, split: SplitName = "train"
) -> None:
    """Write a task's split (or a bare split) as an ImageFolder zip: ``<label>/<n>.png``.

    The archive is byte-for-byte reproducible (fixed timestamps, stored entries since PNG is already compressed).

    Args:
        data: A task (``split`` selects which of its splits) or a :class:`Split`.
        path_or_buffer: Destination file path or writable binary file object.
        split: ``"train"`` or ``"test"``; ignored when ``data`` is a Split.
    """
    with zipfile.ZipFile(path_or_buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, image in _imagefolder_entries(data, split):
            archive.writestr(zipfile.ZipInfo(name, date_time=_ZIP_DATE_TIME), png_bytes(image))


def write_imagefolder(data: Task | Split, directory: str | os.PathLike[str], *, split: SplitName = "train") -> Path:
    """Write a task's split (or a bare split) as an ImageFolder tree ``<directory>/<label>/<n>.png``.

    Args:
        data: A task (``split`` selects which of its splits) or a :class:`Split`.
        directory: Root folder, created if missing.
        split: ``"train"`` or ``"test"``; ignored when ``data`` is a Split.

    Returns:
        The root folder.
    """
    root = Path(directory)
    for name, image in _imagefolder_entries(data, split):
        target = root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(png_bytes(image))
    return root
