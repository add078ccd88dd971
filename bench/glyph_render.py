"""Randomized rendering of glyph samples and the glyph task streams.

Each sample draws, from a per-(seed, character, split) numpy Generator: a font file (which also varies weight and
style: Regular/Bold/Italic, Sans/Serif/Display...), a stroke thickening, the glyph extent (size), an affine jitter
(rotation, shear, aspect, translation), foreground/background intensity with a slight colour tint, and Gaussian
noise. The glyph is always rasterized at the nominal font size ``image_size`` and then mapped by one affine
transform, so a font is loaded once per size.

Train/test disjointness (both hold by construction):

* Fonts: with ``holdout_fonts=True`` (default) a seeded quarter of each class's fonts (at least one; every class
  has >= 3) renders only test images and the rest only training images, so the test split measures
  generalization to unseen typefaces.
* Parameters: train and test use independent random streams (``SeedSequence([seed, code point, split])``), so
  even without font hold-out no rendering is shared (noise and continuous jitter make collisions practically
  impossible; the tests check it).

Because the random stream is per class and per split, a class renders the same images whatever task it lands in
or which other classes are rendered, and the first ``n`` samples do not change when more are requested.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path

import numpy as np
from PIL import Image

from bench.glyphs import (
    DEFAULT_FONT_DIR,
    GlyphClass,
    glyph_mask,
    pil_font,
    resolve_font_dir,
    select_glyph_classes,
)
from bench.tasks import Split, SplitName, Task, TaskStream

__all__ = ["GlyphRenderConfig", "make_glyph_stream", "render_glyph_samples", "split_fonts"]

logger = logging.getLogger(__name__)

_SPLIT_CODES: dict[SplitName, int] = {"train": 0, "test": 1}
_FONT_SPLIT_CODE = 2
_STREAM_TAG = 0x676C7970  # keeps these random streams apart from other uses of the same seed


@dataclass(frozen=True)
class GlyphRenderConfig:
    """Ranges of the per-sample random variations.

    Attributes:
        extent: Glyph extent (longer side, before rotation) as a fraction of the image side.
        rotation_deg: Maximum absolute rotation in degrees.
        shear: Maximum absolute horizontal shear factor.
        aspect: Maximum absolute log aspect-ratio change.
        translate: Fraction of the free margin (around the transformed glyph box) the glyph may move by.
        bold_probability: Probability of thickening strokes by ``image_size / 48`` px.
        dark_background_probability: Probability of light-on-dark (else dark-on-light).
        tint: Maximum absolute per-channel colour offset (0..255 scale).
        noise_std: Maximum standard deviation of the additive Gaussian noise (0..255 scale).
    """

    extent: tuple[float, float] = (0.55, 0.85)
    rotation_deg: float = 12.0
    shear: float = 0.15
    aspect: float = 0.1
    translate: float = 0.8
    bold_probability: float = 0.3
    dark_background_probability: float = 0.5
    tint: float = 25.0
    noise_std: float = 12.0


def split_fonts(glyph: GlyphClass, *, seed: int, holdout_fonts: bool = True) -> dict[SplitName, tuple[str, ...]]:
    """Font files used for each split of a class.

    Args:
        glyph: The class.
        seed: Stream seed (the held-out fonts are a seeded choice).
        holdout_fonts: Reserve ``max(1, n // 4)`` of the class's ``n`` fonts for the test split; when False both
            splits draw from all fonts.

    Returns:
        ``{"train": fonts, "test": fonts}``, disjoint when ``holdout_fonts`` (train keeps >= 2 fonts).
    """
    fonts = glyph.fonts
    if not holdout_fonts or len(fonts) < 2:
        return {"train": fonts, "test": fonts}
    order = np.random.default_rng([seed, _STREAM_TAG, ord(glyph.char), _FONT_SPLIT_CODE]).permutation(len(fonts))
    n_test = max(1, len(fonts) // 4)
    test = {fonts[i] for i in order[:n_test]}
    return {"train": tuple(f for f in fonts if f not in test), "test": tuple(f for f in fonts if f in test)}


def _affine_coefficients(
    size: tuple[int, int], image_size: int, rng: np.random.Generator, config: GlyphRenderConfig
) -> tuple[float, float, float, float, float, float]:
    """Inverse affine (output -> glyph pixel) for PIL: centre, scale to extent, aspect, shear, rotate, shift.

    The transformed glyph box is shrunk if needed to fit 95% of the frame and only shifted within the free
    margin, so wide glyphs (e.g. a Bengali headline) are never clipped by rotation or shear. Plain float
    arithmetic on purpose: numpy on 2x2 matrices costs more than the rest of a sample's geometry.
    """
    width, height = size
    scale = float(rng.uniform(*config.extent)) * image_size / max(size)
    aspect = math.exp(rng.uniform(-config.aspect, config.aspect))
    sx, sy = scale * aspect, scale / aspect
    shear = float(rng.uniform(-config.shear, config.shear))
    theta = math.radians(rng.uniform(-config.rotation_deg, config.rotation_deg))
    cos, sin = math.cos(theta), math.sin(theta)
    # forward = rotation @ [[1, shear], [0, 1]] @ diag(sx, sy)
    a, b = cos * sx, (cos * shear - sin) * sy
    c, d = sin * sx, (sin * shear + cos) * sy
    half_x, half_y = (abs(a) * width + abs(b) * height) / 2, (abs(c) * width + abs(d) * height) / 2
    fit = min(1.0, 0.475 * image_size / max(half_x, half_y))
    a, b, c, d, half_x, half_y = a * fit, b * fit, c * fit, d * fit, half_x * fit, half_y * fit
    det = a * d - b * c
    ia, ib, ic, id_ = d / det, -b / det, -c / det, a / det
    ox = image_size / 2 + float(rng.uniform(-1.0, 1.0)) * max(0.0, 0.475 * image_size - half_x) * config.translate
    oy = image_size / 2 + float(rng.uniform(-1.0, 1.0)) * max(0.0, 0.475 * image_size - half_y) * config.translate
    return (ia, ib, width / 2 - ia * ox - ib * oy, ic, id_, height / 2 - ic * ox - id_ * oy)


@lru_cache(maxsize=4096)
def _cached_mask(font_path: str, size: int, char: str, stroke: int) -> Image.Image | None:
    """Memoized :func:`glyph_mask`: samples of a class reuse a handful of (font, stroke) rasterizations.

    Callers must not modify the returned image (they only derive new images from it).
    """
    return glyph_mask(pil_font(font_path, size), char, stroke)


def _render_sample(
    glyph: GlyphClass,
    fonts: tuple[str, ...],
    font_dir: Path,
    image_size: int,
    rng: np.random.Generator,
    config: GlyphRenderConfig,
) -> Image.Image:
    first = int(rng.integers(len(fonts)))
    stroke = max(1, round(image_size / 48)) if rng.random() < config.bold_probability else 0
    mask = None
    # A font whose glyph for this character is empty (rare: its cmap maps it to a blank) hands over to the next.
    for k in range(len(fonts)):
        mask = _cached_mask(str(font_dir / fonts[(first + k) % len(fonts)]), image_size, glyph.char, stroke)
        if mask is not None:
            break
    if mask is None:
        raise RuntimeError(f"no font renders {glyph.label} ({glyph.char!r}) with ink")
    target = config.extent[0] * image_size
    if max(mask.size) > 2 * target:
        # Very tall glyphs (e.g. Nastaliq) would be shrunk a lot; box-reduce first so bilinear does not alias.
        mask = mask.reduce(max(1, int(max(mask.size) / target)))
    coefficients = _affine_coefficients(mask.size, image_size, rng, config)
    alpha = mask.transform(
        (image_size, image_size), Image.Transform.AFFINE, coefficients, resample=Image.Resampling.BILINEAR, fillcolor=0
    )
    low, high = rng.uniform(0.0, 90.0), rng.uniform(165.0, 255.0)
    background, foreground = (low, high) if rng.random() < config.dark_background_probability else (high, low)
    bg = np.clip(background + rng.uniform(-config.tint, config.tint, 3), 0, 255).astype(np.float32)
    fg = np.clip(foreground + rng.uniform(-config.tint, config.tint, 3), 0, 255).astype(np.float32)
    weight = np.asarray(alpha, dtype=np.float32)[..., None] * ((fg - bg) * np.float32(1 / 255))
    bank = _noise_bank(image_size)
    row, col = rng.integers(0, bank.shape[0] - image_size + 1, 2)
    noise = bank[row : row + image_size, col : col + image_size] * np.float32(rng.uniform(0.0, config.noise_std))
    pixels = weight + (bg + np.float32(0.5)) + noise
    return Image.fromarray(np.clip(pixels, 0, 255, out=pixels).astype(np.uint8))


@lru_cache(maxsize=4)
def _noise_bank(image_size: int) -> np.ndarray:
    """Fixed standard-normal RGB noise; each sample takes a seeded random window of it.

    Drawing 3 * image_size**2 fresh normals per sample was the most expensive step of rendering; a window of a
    (image_size + 448)^2 bank gives ~200k distinct noise fields, plenty for augmentation.
    """
    side = image_size + 448
    bank = np.random.default_rng([_STREAM_TAG, image_size]).standard_normal((side, side, 3), dtype=np.float32)
    bank.setflags(write=False)
    return bank


def render_glyph_samples(
    glyph: GlyphClass,
    split: SplitName,
    count: int,
    *,
    seed: int,
    image_size: int = 64,
    font_dir: str | os.PathLike[str] | None = None,
    holdout_fonts: bool = True,
    config: GlyphRenderConfig | None = None,
) -> list[Image.Image]:
    """Render ``count`` RGB samples of one class for one split (deterministic in all arguments).

    Args:
        glyph: The class.
        split: ``"train"`` or ``"test"``.
        count: Number of images.
        seed: Non-negative stream seed.
        image_size: Side of the square images in pixels.
        font_dir: Directory holding ``glyph.fonts``, default the Noto directory.
        holdout_fonts: See :func:`split_fonts`.
        config: Variation ranges, default :class:`GlyphRenderConfig()`.

    Returns:
        The images.
    """
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8, got {image_size}")
    directory = Path(DEFAULT_FONT_DIR if font_dir is None else font_dir)
    fonts = split_fonts(glyph, seed=seed, holdout_fonts=holdout_fonts)[split]
    rng = np.random.default_rng([seed, _STREAM_TAG, ord(glyph.char), _SPLIT_CODES[split]])
    cfg = config or GlyphRenderConfig()
    return [_render_sample(glyph, fonts, directory, image_size, rng, cfg) for _ in range(count)]


def _render_split(
    group: tuple[GlyphClass, ...],
    split: SplitName,
    per_class: int,
    seed: int,
    image_size: int,
    font_dir: Path,
    holdout_fonts: bool,
    config: GlyphRenderConfig,
) -> Split:
    images: list[Image.Image] = []
    labels: list[str] = []
    for glyph in group:
        images.extend(
            render_glyph_samples(
                glyph,
                split,
                per_class,
                seed=seed,
                image_size=image_size,
                font_dir=font_dir,
                holdout_fonts=holdout_fonts,
                config=config,
            )
        )
        labels.extend([glyph.label] * per_class)
    return Split(images, labels)


def make_glyph_stream(
    name: str,
    *,
    num_tasks: int,
    classes_per_task: int,
    seed: int,
    train_per_class: int,
    test_per_class: int,
    image_size: int = 64,
    font_dir: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    holdout_fonts: bool = True,
    render_config: GlyphRenderConfig | None = None,
) -> TaskStream:
    """Build a lazily rendered glyph stream; splits render on first access (see :class:`Task`).

    Args:
        name: Name recorded on the stream.
        num_tasks: Number of tasks.
        classes_per_task: Classes per task.
        seed: Non-negative seed (class selection, class order, held-out fonts, rendering).
        train_per_class: Training images per class.
        test_per_class: Test images per class.
        image_size: Image side in pixels.
        font_dir: Font directory, default the Noto directory.
        cache_dir: Optional on-disk cache for the class list.
        holdout_fonts: Reserve fonts for the test split (see :func:`split_fonts`).
        render_config: Variation ranges.

    Returns:
        The stream; each task's images are grouped by class in task class order.
    """
    if seed < 0 or num_tasks < 1 or classes_per_task < 1 or min(train_per_class, test_per_class) < 1:
        raise ValueError(f"{name}: seed must be >= 0 and task/class/image counts >= 1")
    if image_size < 8:
        raise ValueError(f"{name}: image_size must be >= 8, got {image_size}")
    directory = resolve_font_dir(font_dir)[0]
    picked = select_glyph_classes(num_tasks * classes_per_task, seed=seed, font_dir=directory, cache_dir=cache_dir)
    config = render_config or GlyphRenderConfig()
    tasks = []
    for index in range(num_tasks):
        group = tuple(picked[index * classes_per_task : (index + 1) * classes_per_task])
        loader = partial(
            _render_split,
            group,
            seed=seed,
            image_size=image_size,
            font_dir=directory,
            holdout_fonts=holdout_fonts,
            config=config,
        )
        tasks.append(
            Task(
                index,
                [g.label for g in group],
                train=partial(loader, split="train", per_class=train_per_class),
                test=partial(loader, split="test", per_class=test_per_class),
            )
        )
    logger.debug("glyph stream %s: %d tasks x %d classes, seed %d", name, num_tasks, classes_per_task, seed)
    return TaskStream(name, seed, tuple(tasks))
