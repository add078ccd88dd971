"""Glyph classes: one class per Unicode character, covered by several installed fonts (Debian ``fonts-noto-core``).

Class list (deterministic for a given set of font files):

1. Candidates are the code points of :data:`SCRIPT_RANGES` whose general category is a letter, decimal digit or
   symbol (no combining marks, whitespace, controls, punctuation, modifier letters) and that are NFKC-stable
   (drops compatibility duplicates such as ligatures, presentation forms, fullwidth and superscript forms).
2. Coverage is read from each font's ``cmap`` with fontTools; a character is kept when at least
   :data:`MIN_FONTS_PER_CLASS` distinct font files map it. (Empty outlines for such characters are rare - two in
   all of Noto core - so only the canonical rendering is checked; the renderer falls back to another font.)
3. Each character is rendered once in a canonical font (``NotoSans-Regular`` when it has the character, else the
   first ``*-Regular``), cropped to its ink, fitted into 16x16 keeping the aspect ratio and binarized. Walking the
   candidates in code-point order, a character whose bitmap is within :data:`NEAR_DUPLICATE_BITS` bits of an
   already-kept one is dropped, so Latin "A" wins over Greek "Α" and Cyrillic "А", "l" over "ӏ", and so on. The
   crop-and-fit matches what the sample renderer does (it normalizes glyph extent), so classes that only differ by
   size or position ("o" vs "O") are treated as duplicates too.

The scan takes about a second; it is memoized per (font dir, font files fingerprint) and optionally stored as JSON
under a caller-given cache dir. Rendering of samples lives in :mod:`bench.glyph_render`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = [
    "DEFAULT_FONT_DIR",
    "MIN_FONTS_PER_CLASS",
    "NEAR_DUPLICATE_BITS",
    "SCRIPT_RANGES",
    "GlyphClass",
    "glyph_classes",
    "glyph_label",
    "glyph_mask",
    "pil_font",
    "resolve_font_dir",
    "select_glyph_classes",
]

logger = logging.getLogger(__name__)

DEFAULT_FONT_DIR = Path("/usr/share/fonts/truetype/noto")
MIN_FONTS_PER_CLASS = 3
NEAR_DUPLICATE_BITS = 6
_HASH_SIDE = 16
_HASH_FONT_SIZE = 64
_CACHE_VERSION = 1  # bump when anything that changes the class list changes
_KEEP_CATEGORIES = frozenset({"Lu", "Ll", "Lt", "Lo", "Nd", "Sc", "Sm", "So"})
_FONT_SUFFIXES = (".ttf", ".otf")
_SELECT_TAG = 0x73656C  # keeps the selection stream apart from other uses of the same seed

# (script or symbol family, first, last) - inclusive ranges. Ranges the installed fonts do not cover (e.g. CJK and
# Hangul are not in fonts-noto-core) simply yield nothing. Greek Extended and IPA are left out on purpose: they are
# mostly near-duplicates differing by tiny diacritics.
SCRIPT_RANGES: tuple[tuple[str, int, int], ...] = (
    ("Latin", 0x0030, 0x007E),
    ("Latin", 0x00A0, 0x024F),
    ("Latin", 0x1E00, 0x1EFF),
    ("Greek", 0x0370, 0x03FF),
    ("Cyrillic", 0x0400, 0x052F),
    ("Armenian", 0x0530, 0x058F),
    ("Hebrew", 0x0590, 0x05FF),
    ("Arabic", 0x0600, 0x06FF),
    ("Arabic", 0x0750, 0x077F),
    ("Devanagari", 0x0900, 0x097F),
    ("Bengali", 0x0980, 0x09FF),
    ("Gurmukhi", 0x0A00, 0x0A7F),
    ("Gujarati", 0x0A80, 0x0AFF),
    ("Oriya", 0x0B00, 0x0B7F),
    ("Tamil", 0x0B80, 0x0BFF),
    ("Telugu", 0x0C00, 0x0C7F),
    ("Kannada", 0x0C80, 0x0CFF),
    ("Malayalam", 0x0D00, 0x0D7F),
    ("Sinhala", 0x0D80, 0x0DFF),
    ("Thai", 0x0E00, 0x0E7F),
    ("Lao", 0x0E80, 0x0EFF),
    ("Tibetan", 0x0F00, 0x0FFF),
    ("Myanmar", 0x1000, 0x109F),
    ("Georgian", 0x10A0, 0x10FF),
    ("Georgian", 0x1C90, 0x1CBF),
    ("Georgian", 0x2D00, 0x2D2F),
    ("Hangul", 0x1100, 0x11FF),
    ("Hangul", 0x3130, 0x318F),
    ("Hangul", 0xAC00, 0xD7A3),
    ("Ethiopic", 0x1200, 0x139F),
    ("Ethiopic", 0x2D80, 0x2DDF),
    ("Cherokee", 0x13A0, 0x13FF),
    ("Canadian Syllabics", 0x1400, 0x167F),
    ("Khmer", 0x1780, 0x17FF),
    ("Balinese", 0x1B00, 0x1B7F),
    ("Tifinagh", 0x2D30, 0x2D7F),
    ("Kana", 0x3040, 0x30FF),
    ("CJK", 0x4E00, 0x9FFF),
    ("Javanese", 0xA980, 0xA9DF),
    ("Khojki", 0x11200, 0x1124F),
    ("Adlam", 0x1E900, 0x1E95F),
    ("Currency", 0x20A0, 0x20CF),
    ("Letterlike", 0x2100, 0x214F),
    ("Arrows", 0x2190, 0x21FF),
    ("Arrows", 0x27F0, 0x27FF),
    ("Arrows", 0x2900, 0x297F),
    ("Math", 0x2200, 0x22FF),
    ("Math", 0x27C0, 0x27EF),
    ("Math", 0x2980, 0x2AFF),
    ("Technical", 0x2300, 0x23FF),
    ("Geometric", 0x25A0, 0x25FF),
    ("Symbols", 0x2600, 0x27BF),
)


def glyph_label(char: str) -> str:
    """HTTP- and path-safe label of a glyph class, e.g. ``glyph-U+0915``."""
    return f"glyph-U+{ord(char):04X}"


@dataclass(frozen=True)
class GlyphClass:
    """One glyph class.

    Attributes:
        char: The character.
        script: Script or symbol family from :data:`SCRIPT_RANGES`.
        fonts: Font file names (relative to the font dir) whose cmap covers ``char``, sorted.
        render_hash: Hex digest of the canonical 16x16 binarized rendering (unique within the class list).
    """

    char: str
    script: str
    fonts: tuple[str, ...]
    render_hash: str

    @property
    def label(self) -> str:
        """The class label (see :func:`glyph_label`)."""
        return glyph_label(self.char)


def resolve_font_dir(font_dir: str | os.PathLike[str] | None = None) -> tuple[Path, tuple[str, ...]]:
    """Resolve the font directory and list its font files.

    Args:
        font_dir: Directory of TTF/OTF files, default :data:`DEFAULT_FONT_DIR`.

    Returns:
        The resolved directory and the sorted font file names in it.

    Raises:
        FileNotFoundError: If the directory has no fonts, with a hint to install ``fonts-noto-core``.
    """
    directory = Path(DEFAULT_FONT_DIR if font_dir is None else font_dir).resolve()
    files = tuple(sorted(p.name for p in directory.glob("*") if p.suffix.lower() in _FONT_SUFFIXES))
    if not files:
        raise FileNotFoundError(
            f"no .ttf/.otf fonts in {directory}; install them with `sudo apt-get install fonts-noto-core` "
            "(or pass font_dir=...)"
        )
    return directory, files


@lru_cache(maxsize=1024)
def pil_font(path: str, size: int) -> ImageFont.FreeTypeFont:
    """Load (memoized) a font at a pixel size with the basic layout engine.

    Basic layout maps a code point straight through the cmap, so renderings do not depend on whether Pillow was
    built with libraqm (isolated Arabic/Indic letters need no shaping).
    """
    return ImageFont.truetype(path, size, layout_engine=ImageFont.Layout.BASIC)


def glyph_mask(font: ImageFont.FreeTypeFont, char: str, stroke_width: int = 0) -> Image.Image | None:
    """Render ``char`` white on black ("L" mode), cropped to its bounding box; None when the glyph is empty."""
    left, top, right, bottom = font.getbbox(char, stroke_width=stroke_width)
    if right <= left or bottom <= top:
        return None
    mask = Image.new("L", (int(right - left), int(bottom - top)), 0)
    ImageDraw.Draw(mask).text((-left, -top), char, font=font, fill=255, stroke_width=stroke_width, stroke_fill=255)
    return mask if mask.getbbox() is not None else None


def _canonical_rank(name: str) -> tuple[bool, bool, bool, str]:
    stem = name.rsplit(".", 1)[0]
    return (stem != "NotoSans-Regular", not stem.endswith("-Regular"), not stem.startswith("NotoSans"), stem)


def _canonical_bits(char: str, font_path: Path) -> np.ndarray | None:
    """Binarized, aspect-preserving 16x16 fit of the glyph's ink (None when empty)."""
    mask = glyph_mask(pil_font(str(font_path), _HASH_FONT_SIZE), char)
    if mask is None:
        return None
    scale = _HASH_SIDE / max(mask.size)
    small = mask.resize((max(1, round(mask.width * scale)), max(1, round(mask.height * scale))), Image.Resampling.BOX)
    canvas = Image.new("L", (_HASH_SIDE, _HASH_SIDE), 0)
    canvas.paste(small, ((_HASH_SIDE - small.width) // 2, (_HASH_SIDE - small.height) // 2))
    return np.asarray(canvas).reshape(-1) >= 96


@lru_cache(maxsize=1)
def _candidates() -> dict[int, str]:
    """Code point -> script of every candidate character (see module docstring, step 1)."""
    out: dict[int, str] = {}
    for script, first, last in SCRIPT_RANGES:
        for cp in range(first, last + 1):
            ch = chr(cp)
            if unicodedata.category(ch) in _KEEP_CATEGORIES and unicodedata.normalize("NFKC", ch) == ch:
                out.setdefault(cp, script)
    return out


def _fingerprint(directory: Path, files: tuple[str, ...]) -> str:
    digest = hashlib.sha256(f"v{_CACHE_VERSION}/{MIN_FONTS_PER_CLASS}/{NEAR_DUPLICATE_BITS}".encode())
    for name in files:
        st = (directory / name).stat()
        digest.update(f"\n{name}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return digest.hexdigest()


def _scan(directory: Path, files: tuple[str, ...]) -> tuple[GlyphClass, ...]:
    """Coverage scan and near-duplicate removal (module docstring, steps 2-3)."""
    from fontTools.ttLib import TTFont  # type: ignore[import-untyped]  # ships with matplotlib, has no type hints

    candidates = _candidates()
    coverage: dict[int, list[str]] = {}
    for name in files:
        try:
            with TTFont(directory / name, lazy=True) as font:
                # Only code points matter: a synthetic glyph order spares parsing glyph names from 'post'.
                font.setGlyphOrder([f"g{i}" for i in range(font["maxp"].numGlyphs)])
                cmap = font.getBestCmap() or {}
        except Exception as exc:  # a broken font must not take the whole dataset down
            logger.warning("skipping font %s: %s", name, exc)
            continue
        for cp in candidates.keys() & cmap.keys():
            coverage.setdefault(cp, []).append(name)

    kept: list[GlyphClass] = []
    kept_bits = np.zeros((len(coverage), _HASH_SIDE * _HASH_SIDE // 64), dtype=np.uint64)
    for cp in sorted(cp for cp, names in coverage.items() if len(names) >= MIN_FONTS_PER_CLASS):
        names = sorted(coverage[cp])
        bits = _canonical_bits(chr(cp), directory / min(names, key=_canonical_rank))
        if bits is None:
            continue
        packed = np.packbits(bits).view(np.uint64)
        if kept and int(np.bitwise_count(kept_bits[: len(kept)] ^ packed).sum(axis=1).min()) <= NEAR_DUPLICATE_BITS:
            continue
        kept_bits[len(kept)] = packed
        kept.append(GlyphClass(chr(cp), candidates[cp], tuple(names), packed.tobytes().hex()))
    counts: dict[str, int] = {}
    for glyph in kept:
        counts[glyph.script] = counts.get(glyph.script, 0) + 1
    logger.info("glyph classes: %d from %d font files in %s; per script %s", len(kept), len(files), directory, counts)
    return tuple(kept)


def _to_json(classes: tuple[GlyphClass, ...], fingerprint: str) -> str:
    rows = [{"char": g.char, "script": g.script, "fonts": list(g.fonts), "hash": g.render_hash} for g in classes]
    return json.dumps({"version": _CACHE_VERSION, "fingerprint": fingerprint, "classes": rows}, ensure_ascii=False)


def _from_json(text: str, fingerprint: str) -> tuple[GlyphClass, ...] | None:
    data = json.loads(text)
    if data.get("version") != _CACHE_VERSION or data.get("fingerprint") != fingerprint:
        return None
    return tuple(GlyphClass(r["char"], r["script"], tuple(r["fonts"]), r["hash"]) for r in data["classes"])


@lru_cache(maxsize=8)
def _load_or_scan(
    directory: str, files: tuple[str, ...], fingerprint: str, cache_dir: str | None
) -> tuple[GlyphClass, ...]:
    cache_file = None if cache_dir is None else Path(cache_dir) / f"glyph-classes-{fingerprint[:20]}.json"
    if cache_file is not None and cache_file.is_file():
        try:
            cached = _from_json(cache_file.read_text(encoding="utf-8"), fingerprint)
        except (ValueError, KeyError, TypeError) as exc:
            logger.warning("ignoring unreadable glyph cache %s: %s", cache_file, exc)
            cached = None
        if cached is not None:
            return cached
    classes = _scan(Path(directory), files)
    if cache_file is not None:
        tmp = cache_file.with_suffix(f".tmp{os.getpid()}")
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(_to_json(classes, fingerprint), encoding="utf-8")
            tmp.replace(cache_file)  # atomic, so a concurrent reader never sees half a file
        except OSError as exc:  # the disk cache is an optimization; never fail the dataset over it
            logger.warning("could not write glyph cache %s: %s", cache_file, exc)
    return classes


def glyph_classes(
    font_dir: str | os.PathLike[str] | None = None, cache_dir: str | os.PathLike[str] | None = None
) -> tuple[GlyphClass, ...]:
    """All usable glyph classes, sorted by code point (memoized; optionally cached on disk).

    Args:
        font_dir: Directory of font files, default :data:`DEFAULT_FONT_DIR`.
        cache_dir: Optional directory for a JSON cache keyed by a fingerprint of the font files.

    Returns:
        The classes; their ``render_hash`` values are unique.
    """
    directory, files = resolve_font_dir(font_dir)
    cache = None if cache_dir is None else str(Path(cache_dir).resolve())
    return _load_or_scan(str(directory), files, _fingerprint(directory, files), cache)


def select_glyph_classes(
    count: int,
    *,
    seed: int,
    font_dir: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> list[GlyphClass]:
    """Pick ``count`` classes balanced across scripts, in a seeded random order.

    Scripts are visited round-robin (script order and the order inside each script are seeded shuffles), so
    small scripts are used up and big ones (Latin, Arabic, Ethiopic...) do not dominate the selection.

    Args:
        count: Number of classes.
        seed: Non-negative seed.
        font_dir: See :func:`glyph_classes`.
        cache_dir: See :func:`glyph_classes`.

    Returns:
        The classes, already in stream order.

    Raises:
        ValueError: If fewer than ``count`` classes are available.
    """
    pool = glyph_classes(font_dir, cache_dir)
    if not 0 < count <= len(pool):
        raise ValueError(f"need 1..{len(pool)} glyph classes, asked for {count}")
    rng = np.random.default_rng([seed, _SELECT_TAG])
    by_script: dict[str, list[GlyphClass]] = {}
    for glyph in pool:
        by_script.setdefault(glyph.script, []).append(glyph)
    scripts = sorted(by_script)
    script_order = [scripts[j] for j in rng.permutation(len(scripts))]
    queues = [[by_script[s][i] for i in rng.permutation(len(by_script[s]))] for s in script_order]
    picked: list[GlyphClass] = []
    depth = 0
    while len(picked) < count:
        picked.extend(q[depth] for q in queues if depth < len(q))
        depth += 1
    picked = picked[:count]
    return [picked[i] for i in rng.permutation(count)]
