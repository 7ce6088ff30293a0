"""The demo image pool: photo-like images with planted duplicates, defects and unwanted images.

:func:`generate_demo` writes a folder (or tar shards) of images made from scikit-image's
bundled sample photos plus drawings, and a ground-truth table saying what every file is
and what a correct sanitize stage must report for it under the packaged default rules.
Later stages (exact and near dedup, rotation, quality, example filters) are scored
against the same table.

Everything is drawn from ``numpy.random.default_rng(seed)``: the plan (what each file is,
its name, shard, crop and size) is made in one process from one generator, and every file
then gets its own seed, so the output is byte-identical whatever the number of worker
processes. No file carries a time stamp.

Pure library: no Dagster import.
"""

from __future__ import annotations

import colorsys
import io
import json
import os
import shutil
import struct
import tarfile
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from functools import cache
from importlib.util import find_spec
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Literal

import numpy as np
import polars as pl
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont

from curation_assets.core.atomic import atomic_path, write_text
from curation_assets.core.ingest.formats import sniff_format
from curation_assets.core.outputs.reasons import Reason, Status

GENERATOR_VERSION = 1  # bump when the output changes: a marker of another version regenerates

KINDS: tuple[str, ...] = (
    "base",
    "byte_copy",
    "pixel_copy",
    "near_duplicate",
    "rotated_copy",
    "exif_rotated",
    "quality",
    "unwanted",
    "defect",
    "non_image",
)
NEAR_DUPLICATE_TRANSFORMS: tuple[str, ...] = (
    "resize",
    "jpeg",
    "crop",
    "brightness_contrast",
    "text",
    "hflip",
)
PIXEL_COPY_TRANSFORMS: tuple[str, ...] = ("png_to_bmp", "png_recompress", "comment_segment")
ROTATIONS: tuple[int, ...] = (90, 180, 270)  # clockwise degrees of the stored pixels
EXIF_ORIENTATIONS: tuple[int, ...] = (3, 6, 8)
QUALITY_ISSUES: tuple[str, ...] = ("blur", "dark", "bright")
CATEGORIES: tuple[str, ...] = ("document", "chart", "map")
EXAMPLES_PER_CATEGORY = 20

# What a correct sanitizer reports for each planted defect under the default rules.
DEFECT_EXPECTATIONS: dict[str, tuple[Status, tuple[Reason, ...]]] = {
    "truncated": (Status.REJECTED, (Reason.TRUNCATED,)),
    "zero_byte": (Status.REJECTED, (Reason.EMPTY_FILE,)),
    "garbage": (Status.REJECTED, (Reason.UNRECOGNIZED_FORMAT,)),
    "png_as_jpg": (Status.FIXABLE, (Reason.EXTENSION_MISMATCH,)),
    "jpg_as_png": (Status.FIXABLE, (Reason.EXTENSION_MISMATCH,)),
    "tiny": (Status.REJECTED, (Reason.TOO_SMALL,)),
    "panorama": (Status.REJECTED, (Reason.ASPECT_RATIO,)),
    "tall": (Status.REJECTED, (Reason.ASPECT_RATIO,)),
    "too_large": (Status.FIXABLE, (Reason.TOO_LARGE,)),
    "file_too_large": (Status.FIXABLE, (Reason.FILE_TOO_LARGE,)),
    "cmyk": (Status.FIXABLE, (Reason.MODE_CMYK,)),
    "palette": (Status.FIXABLE, (Reason.MODE_PALETTE,)),
    "sixteen_bit": (Status.FIXABLE, (Reason.MODE_HIGH_BIT_DEPTH,)),
    "alpha": (Status.FIXABLE, (Reason.MODE_ALPHA,)),
    "animated": (Status.FIXABLE, (Reason.MODE_PALETTE, Reason.MULTI_FRAME)),
    "bomb": (Status.REJECTED, (Reason.DECOMPRESSION_BOMB,)),
    "unsupported": (Status.REJECTED, (Reason.UNSUPPORTED_FORMAT,)),
}
_DEFECT_EXT: dict[str, str] = {
    "truncated": "jpg",
    "zero_byte": "jpg",
    "garbage": "jpg",
    "png_as_jpg": "jpg",
    "jpg_as_png": "png",
    "tiny": "jpg",
    "panorama": "jpg",
    "tall": "jpg",
    "too_large": "jpg",
    "file_too_large": "png",
    "cmyk": "jpg",
    "palette": "png",
    "sixteen_bit": "png",
    "alpha": "png",
    "animated": "gif",
    "bomb": "png",
    "unsupported": "ppm",
}
_SINGLE_DEFECTS = ("too_large", "file_too_large")  # heavy files: exactly one each
_NOT_PHOTO_DEFECTS = ("zero_byte", "garbage", "file_too_large", "bomb")
BOMB_SIZE = (20000, 20000)
_NON_IMAGE_NAMES = ("notes.txt", "meta.json", "labels.csv")
_MIN_BASES = 10

# Bundled scikit-image photos used as raw material. Left out: the synthetic ones and those
# whose crops are mostly flat (moon, cell, clock_motion, microaneurysms).
_PHOTOS: tuple[str, ...] = (
    "astronaut.png",
    "brick.png",
    "camera.png",
    "chelsea.png",
    "coffee.png",
    "coins.png",
    "grass.png",
    "gravel.png",
    "hubble_deep_field.jpg",
    "ihc.png",
    "motorcycle_left.png",
    "retina.jpg",
    "rocket.jpg",
)

# Part of a photo crops may come from (fractions), where the rest is a flat border.
_PHOTO_REGIONS: dict[str, tuple[float, float, float, float]] = {
    "retina.jpg": (0.18, 0.18, 0.82, 0.82),  # the square inside the fundus disc
}

Layout = Literal["directory", "webdataset"]

GROUND_TRUTH_SCHEMA: dict[str, Any] = {
    "image_id": pl.Utf8,
    "shard": pl.Utf8,
    "kind": pl.Utf8,
    "source_id": pl.Utf8,
    "transform": pl.Utf8,
    "expected_status": pl.Utf8,
    "expected_reasons": pl.List(pl.Utf8),
    "rotation": pl.Int64,
    "category": pl.Utf8,
    "quality_issue": pl.Utf8,
    "width": pl.Int64,
    "height": pl.Int64,
}


@dataclass(frozen=True)
class DemoSummary:
    """Where a generated demo lies and what it holds."""

    out_dir: Path
    images_root: Path  # shard folders, or shard tars for the webdataset layout
    examples_root: Path  # one folder of example images per unwanted category
    ground_truth_path: Path
    counts: dict[str, int]  # kind -> number of files in images/
    n_files: int
    layout: str = "directory"


def demo_counts(n_images: int) -> dict[str, int]:
    """How many files of each kind a pool of ``n_images`` files holds (they sum to n_images)."""
    counts = {
        "byte_copy": max(1, round(0.03 * n_images)),
        "pixel_copy": max(len(PIXEL_COPY_TRANSFORMS), round(0.02 * n_images)),
        "near_duplicate": max(len(NEAR_DUPLICATE_TRANSFORMS), round(0.12 * n_images)),
        "rotated_copy": max(len(ROTATIONS), round(0.03 * n_images)),
        "exif_rotated": max(len(EXIF_ORIENTATIONS), round(0.02 * n_images)),
        "quality": max(len(QUALITY_ISSUES), round(0.03 * n_images)),
        "unwanted": max(len(CATEGORIES), round(0.05 * n_images)),
        "defect": sum(defect_counts(n_images).values()),
        "non_image": max(3, n_images // 500),
    }
    n_base = n_images - sum(counts.values())
    if n_base < _MIN_BASES:
        raise ValueError(
            f"n_images={n_images} is too small for the demo: use at least {n_images - n_base + 10}"
        )
    return {"base": n_base, **counts}


def defect_counts(n_images: int) -> dict[str, int]:
    """Planted files per defect: max(1, n_images // 400), exactly one of each heavy defect."""
    per = max(1, n_images // 400)
    return {name: 1 if name in _SINGLE_DEFECTS else per for name in DEFECT_EXPECTATIONS}


# ============================================================================ the plan


@dataclass
class _Item:
    """One file to write: everything random about it is fixed here except its own seed."""

    kind: str
    seed: int
    ext: str = "jpg"
    transform: str | None = None
    category: str | None = None
    quality_issue: str | None = None
    rotation: int = 0
    source: int | None = None  # plan index of the base it derives from
    photo: str | None = None  # bundled photo name and crop window (corner fractions) for photo-like renders
    box: tuple[float, ...] | None = None
    size: tuple[int, int] | None = None  # upright (width, height) of a photo-like render
    quality: int = 90  # JPEG/WebP quality when one is written
    gray: bool = False  # a base stored as a greyscale ('L') JPEG
    folder: str = ""  # relative to out_dir
    name: str = ""
    shard: str | None = None
    source_id: str | None = None


def _photo_dir() -> Path:
    spec = find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the demo needs scikit-image (its bundled sample photos)")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


@cache
def _photo_sizes() -> dict[str, tuple[int, int]]:
    sizes = {}
    for name in _PHOTOS:
        with Image.open(_photo_dir() / name) as im:
            sizes[name] = im.size
    return sizes


MAX_TILT_DEGREES = 20.0  # crop windows are turned by up to this much, so crops of one photo differ


class _CropPlanner:
    """Picks crop windows of the bundled photos for photo-like renders.

    A window is a rectangle of the target aspect, 30-60% of the usable part of a photo,
    turned by a random angle. Of `tries` random windows the one least like the windows
    already taken from the same photo wins: overlap (IoU of the bounding boxes) counts
    less the more the two angles differ.
    """

    def __init__(self, rng: np.random.Generator, tries: int = 16) -> None:
        self.rng = rng
        self.tries = tries
        self.sizes = _photo_sizes()
        self.boxes: dict[str, list[tuple[float, float, float, float]]] = {name: [] for name in _PHOTOS}
        self.angles: dict[str, list[float]] = {name: [] for name in _PHOTOS}

    def _likeness(self, name: str, box: tuple[float, float, float, float], angle: float) -> float:
        if not self.boxes[name]:
            return 0.0
        b = np.asarray(self.boxes[name])
        ix = np.clip(np.minimum(box[2], b[:, 2]) - np.maximum(box[0], b[:, 0]), 0, None)
        iy = np.clip(np.minimum(box[3], b[:, 3]) - np.maximum(box[1], b[:, 1]), 0, None)
        inter = ix * iy
        union = (box[2] - box[0]) * (box[3] - box[1]) + (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) - inter
        turn = np.abs(np.asarray(self.angles[name]) - angle) / MAX_TILT_DEGREES
        return float(np.max(inter / union * np.clip(1.0 - turn, 0.15, 1.0)))

    def pick(self, aspect: float) -> tuple[str, tuple[float, ...]]:
        """(photo name, window corners as fractions: upper-left, lower-left, lower-right, upper-right)."""
        best: tuple[float, str, tuple[float, ...], tuple[float, float, float, float], float] | None = None
        extreme = aspect > 3 or aspect < 1 / 3
        for _ in range(self.tries):
            name = _PHOTOS[int(self.rng.integers(len(_PHOTOS)))]
            fx0, fy0, fx1, fy1 = _PHOTO_REGIONS.get(name, (0.0, 0.0, 1.0, 1.0))
            pw, ph = self.sizes[name]
            rw, rh = pw * (fx1 - fx0), ph * (fy1 - fy0)  # the usable region, in pixels
            if rw / rh > aspect:  # the largest upright window of this aspect is as tall as the region
                cw_max, ch_max = rh * aspect, rh
            else:
                cw_max, ch_max = rw, rw / aspect
            angle = 0.0 if extreme else float(self.rng.uniform(-MAX_TILT_DEGREES, MAX_TILT_DEGREES))
            c, s_ = abs(np.cos(np.radians(angle))), abs(np.sin(np.radians(angle)))
            scale = self.rng.uniform(0.7, 1.0) if extreme else self.rng.uniform(0.3, 0.6)
            # shrink until the turned window fits the region
            scale = min(scale, rw / (cw_max * c + ch_max * s_), rh / (cw_max * s_ + ch_max * c))
            cw, ch = cw_max * scale, ch_max * scale
            bw, bh = cw * c + ch * s_, cw * s_ + ch * c  # bounding box of the turned window
            cx = fx0 * pw + bw / 2 + self.rng.uniform(0, max(rw - bw, 0.0))
            cy = fy0 * ph + bh / 2 + self.rng.uniform(0, max(rh - bh, 0.0))
            t = np.radians(angle)
            corners = []
            for u, v in ((-cw / 2, -ch / 2), (-cw / 2, ch / 2), (cw / 2, ch / 2), (cw / 2, -ch / 2)):
                corners += [
                    (cx + u * np.cos(t) - v * np.sin(t)) / pw,
                    (cy + u * np.sin(t) + v * np.cos(t)) / ph,
                ]
            box = ((cx - bw / 2) / pw, (cy - bh / 2) / ph, (cx + bw / 2) / pw, (cy + bh / 2) / ph)
            score = self._likeness(name, box, angle) + 0.02 * len(self.boxes[name]) / 50  # spread over photos
            if best is None or score < best[0]:
                best = (score, name, tuple(float(v) for v in corners), box, angle)
        assert best is not None
        _, name, quad, box, angle = best
        self.boxes[name].append(box)
        self.angles[name].append(angle)
        return name, quad


def _base_size(rng: np.random.Generator) -> tuple[int, int]:
    while True:
        w, h = (int(v) for v in rng.integers(320, 801, 2))
        if 0.6 <= w / h <= 1.7:
            return w, h


def _defect_size(name: str, rng: np.random.Generator) -> tuple[int, int]:
    if name == "tiny":
        return int(rng.integers(48, 72)), int(rng.integers(44, 64))  # aspect 0.75..1.6
    if name == "panorama":
        return int(rng.integers(1400, 1801)), 200  # aspect 7..9
    if name == "tall":
        return int(rng.integers(110, 131)), 900  # aspect 0.12..0.146
    if name == "too_large":
        return 3600, 900
    if name == "animated":
        return int(rng.integers(240, 401)), int(rng.integers(240, 401))
    return _base_size(rng)


def _seed(rng: np.random.Generator) -> int:
    return int(rng.integers(0, 2**63 - 1))


def _cycle_perm(rng: np.random.Generator, pool: list[int]) -> Iterator[int]:
    """Draw from pool without replacement, reshuffling when it runs out."""
    while True:
        yield from (pool[int(i)] for i in rng.permutation(len(pool)))


def _plan(n_images: int, n_shards: int, seed: int) -> tuple[list[_Item], list[_Item]]:
    """Decide every file: (pool items, example items). All randomness here comes from one rng."""
    rng = np.random.default_rng(seed)
    counts = demo_counts(n_images)
    crops = _CropPlanner(rng)
    items: list[_Item] = []

    def photo_item(kind: str, size: tuple[int, int], **kw: Any) -> _Item:
        photo, box = crops.pick(size[0] / size[1])
        return _Item(kind=kind, seed=_seed(rng), photo=photo, box=box, size=size, **kw)

    # -- bases, with their formats decided up front so pixel copies find PNG/JPEG sources
    n_base = counts["base"]
    pixel_transforms = [PIXEL_COPY_TRANSFORMS[i % 3] for i in range(counts["pixel_copy"])]
    n_png_needed = sum(t != "comment_segment" for t in pixel_transforms)
    n_png = max(n_png_needed + 1, round(0.06 * n_base))
    n_webp = max(1, round(0.03 * n_base))
    n_gray = max(1, round(0.04 * n_base))
    formats = ["png"] * n_png + ["webp"] * n_webp + ["gray"] * n_gray
    formats += ["jpg"] * (n_base - len(formats))
    formats = [formats[int(i)] for i in rng.permutation(n_base)]
    for fmt in formats:
        ext = "jpg" if fmt == "gray" else fmt
        size = _base_size(rng)
        items.append(photo_item("base", size, ext=ext, quality=int(rng.integers(85, 96)), gray=fmt == "gray"))
    bases = list(range(n_base))
    png_bases = [i for i in bases if items[i].ext == "png"]
    jpg_bases = [i for i in bases if items[i].ext == "jpg"]

    # -- derivatives of bases
    any_base = _cycle_perm(rng, bases)
    png_source = _cycle_perm(rng, png_bases)
    jpg_source = _cycle_perm(rng, jpg_bases)
    for t in pixel_transforms:
        src = next(jpg_source) if t == "comment_segment" else next(png_source)
        ext = {"png_to_bmp": "bmp", "png_recompress": "png", "comment_segment": "jpg"}[t]
        items.append(_Item(kind="pixel_copy", seed=_seed(rng), ext=ext, transform=t, source=src))
    for _ in range(counts["byte_copy"]):
        src = next(any_base)
        items.append(_Item(kind="byte_copy", seed=_seed(rng), ext=items[src].ext, source=src))
    for i in range(counts["near_duplicate"]):
        t = NEAR_DUPLICATE_TRANSFORMS[i % len(NEAR_DUPLICATE_TRANSFORMS)]
        q = int(rng.integers(40, 76)) if t == "jpeg" else int(rng.integers(85, 96))
        items.append(
            _Item(kind="near_duplicate", seed=_seed(rng), transform=t, source=next(any_base), quality=q)
        )
    for i in range(counts["rotated_copy"]):
        deg = ROTATIONS[i % len(ROTATIONS)]
        src = next(any_base)
        items.append(
            _Item(
                kind="rotated_copy",
                seed=_seed(rng),
                ext=items[src].ext,
                transform=f"rot{deg}",
                rotation=deg,
                source=src,
                quality=int(rng.integers(90, 96)),
            )
        )
    for i in range(counts["quality"]):
        issue = QUALITY_ISSUES[i % len(QUALITY_ISSUES)]
        items.append(
            _Item(
                kind="quality",
                seed=_seed(rng),
                transform=issue,
                quality_issue=issue,
                source=next(any_base),
                quality=int(rng.integers(90, 96)),
            )
        )
    # -- new, distinct images
    for i in range(counts["exif_rotated"]):
        orientation = EXIF_ORIENTATIONS[i % len(EXIF_ORIENTATIONS)]
        items.append(
            photo_item(
                "exif_rotated",
                _base_size(rng),
                transform=f"exif_orientation_{orientation}",
                quality=int(rng.integers(85, 96)),
            )
        )
    for i in range(counts["unwanted"]):
        cat = CATEGORIES[i % len(CATEGORIES)]
        ext = "png" if rng.random() < 0.3 else "jpg"
        items.append(
            _Item(kind="unwanted", seed=_seed(rng), ext=ext, category=cat, quality=int(rng.integers(85, 96)))
        )
    for name, count in defect_counts(n_images).items():
        for _ in range(count):
            kw: dict[str, Any] = {
                "ext": _DEFECT_EXT[name],
                "transform": name,
                "quality": int(rng.integers(85, 96)),
            }
            if name in _NOT_PHOTO_DEFECTS:
                items.append(_Item(kind="defect", seed=_seed(rng), **kw))
            else:
                items.append(photo_item("defect", _defect_size(name, rng), **kw))
    for _ in range(counts["non_image"]):
        items.append(_Item(kind="non_image", seed=_seed(rng), ext=""))
    assert len(items) == n_images

    # -- names and shards: a random order, shard = position mod n_shards
    order = [int(i) for i in rng.permutation(n_images)]  # order[position] = plan index
    _separate_some_copies(items, order, n_shards)
    width = max(2, len(str(n_shards - 1)))
    taken: set[tuple[str, str]] = set()
    for position, index in enumerate(order):
        item = items[index]
        item.shard = f"shard-{position % n_shards:0{width}d}"
        if item.kind == "non_image":
            item.name = _non_image_name(rng, item.shard, taken)
        else:
            item.name = f"img_{position:06d}.{item.ext}"
        item.folder = f"images/{item.shard}"
    for item in items:
        if item.source is not None:
            item.source_id = _image_id(items[item.source])

    # -- example sets: the same drawings, new draws
    examples = []
    for cat in CATEGORIES:
        for i in range(EXAMPLES_PER_CATEGORY):
            ext = "png" if rng.random() < 0.3 else "jpg"
            examples.append(
                _Item(
                    kind="example",
                    seed=_seed(rng),
                    ext=ext,
                    category=cat,
                    quality=int(rng.integers(85, 96)),
                    folder=f"examples/{cat}",
                    name=f"example_{i:02d}.{ext}",
                )
            )
    return items, examples


def _separate_some_copies(items: list[_Item], order: list[int], n_shards: int) -> None:
    """Make sure some copies of each kind lie in another shard than their source."""
    if n_shards < 2:
        return
    position = {index: pos for pos, index in enumerate(order)}
    for kind in ("byte_copy", "pixel_copy", "near_duplicate", "rotated_copy"):
        copies = [i for i, it in enumerate(items) if it.kind == kind]
        if not copies:
            continue
        apart = [i for i in copies if position[i] % n_shards != position[items[i].source] % n_shards]  # type: ignore[index]
        if apart:
            continue
        i = copies[0]
        p = position[i]
        q = p + 1 if p + 1 < len(order) else p - 1  # a neighbour lies in another shard
        order[p], order[q] = order[q], order[p]
        position[order[p]], position[order[q]] = p, q


def _non_image_name(rng: np.random.Generator, shard: str, taken: set[tuple[str, str]]) -> str:
    names = list(_NON_IMAGE_NAMES)
    start = int(rng.integers(len(names)))
    for k in range(1, 1000):
        for j in range(len(names)):
            stem, ext = names[(start + j) % len(names)].split(".")
            name = f"{stem}.{ext}" if k == 1 else f"{stem}_{k}.{ext}"
            if (shard, name) not in taken:
                taken.add((shard, name))
                return name
    raise RuntimeError("no free name")  # pragma: no cover


def _image_id(item: _Item) -> str:
    return f"{item.shard}/{item.name}"


# ============================================================================ rendering helpers


@cache
def _photo(name: str) -> Image.Image:
    with Image.open(_photo_dir() / name) as im:
        gray = im.mode in ("L", "I;16", "I")
        out = im.convert("RGB")
    out.info["gray"] = gray
    return out


@cache
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _colour_matrix(rng: np.random.Generator, gray: bool) -> tuple[float, ...]:
    """A random affine colour transform (3x4, row-major) for Image.convert(matrix=...)."""
    if gray:  # a random duotone: dark -> lo, light -> hi
        while True:
            lo = rng.uniform(0, 140, 3)
            hi = rng.uniform(110, 255, 3)
            if rng.random() < 0.25:
                lo, hi = hi, lo  # an inverted tone now and then
            if abs(hi.mean() - lo.mean()) > 90:
                break
        rows = [[(hi[c] - lo[c]) / 255 / 3] * 3 + [lo[c]] for c in range(3)]
        return tuple(float(v) for row in rows for v in row)
    yiq = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    theta = rng.uniform(0, 2 * np.pi)
    sat = rng.uniform(0.6, 1.5)
    hue = np.array(
        [
            [1, 0, 0],
            [0, sat * np.cos(theta), -sat * np.sin(theta)],
            [0, sat * np.sin(theta), sat * np.cos(theta)],
        ]
    )
    gains = np.diag(rng.uniform(0.75, 1.25, 3))
    m = gains @ np.linalg.inv(yiq) @ hue @ yiq
    offsets = rng.uniform(-20, 20, 3)
    return tuple(float(v) for c in range(3) for v in (*m[c], offsets[c]))


def _random_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(0, 256, 3))  # type: ignore[return-value]


def _draw_shapes(img: Image.Image, rng: np.random.Generator, n: int) -> None:
    """Alpha-blend n random shapes (ellipse, rotated rectangle, polygon, thick line) onto img."""
    w, h = img.size
    for _ in range(n):
        mask = Image.new("L", (w, h), 0)
        draw = ImageDraw.Draw(mask)
        alpha = int(rng.uniform(0.3, 0.8) * 255)
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        rx, ry = rng.uniform(0.08, 0.3) * w, rng.uniform(0.08, 0.3) * h
        shape = int(rng.integers(4))
        if shape == 0:
            draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=alpha)
        elif shape == 1:
            a = rng.uniform(0, np.pi)
            corners = [(-rx, -ry), (rx, -ry), (rx, ry), (-rx, ry)]
            pts = [
                (cx + x * np.cos(a) - y * np.sin(a), cy + x * np.sin(a) + y * np.cos(a)) for x, y in corners
            ]
            draw.polygon(pts, fill=alpha)
        elif shape == 2:
            k = int(rng.integers(3, 8))
            angles = np.sort(rng.uniform(0, 2 * np.pi, k))
            radii = rng.uniform(0.4, 1.0, k)
            pts = [
                (cx + rx * r * np.cos(t), cy + ry * r * np.sin(t)) for t, r in zip(angles, radii, strict=True)
            ]
            draw.polygon(pts, fill=alpha)
        else:
            k = int(rng.integers(2, 5))
            pts = [
                (float(x), float(y)) for x, y in zip(rng.uniform(0, w, k), rng.uniform(0, h, k), strict=True)
            ]
            width = int(max(4, rng.uniform(0.015, 0.05) * min(w, h)))
            draw.line(pts, fill=alpha, width=width, joint="curve")
        colour = _random_colour(rng)
        bbox = mask.getbbox()
        if bbox is not None:  # blend only where the shape is
            img.paste(colour, bbox, mask.crop(bbox))


def _render_photo(item: _Item, rng: np.random.Generator) -> Image.Image:
    """A distinct photo-like RGB image: a recoloured crop of a bundled photo under random shapes."""
    assert item.photo is not None and item.box is not None and item.size is not None
    src = _photo(item.photo)
    pw, ph = src.size
    x0, y0, x1, y1, _, _, x3, y3 = (v * (pw if k % 2 == 0 else ph) for k, v in enumerate(item.box))
    w, h = item.size
    # output (x, y) -> photo: upper-left + x * (along the top edge) + y * (down the left edge)
    affine = ((x3 - x0) / w, (x1 - x0) / h, x0, (y3 - y0) / w, (y1 - y0) / h, y0)
    img = src.transform(item.size, Image.Transform.AFFINE, affine, Image.Resampling.BILINEAR)
    img = img.convert("RGB", matrix=_colour_matrix(rng, bool(src.info.get("gray"))))
    _draw_shapes(img, rng, int(rng.integers(3, 8)))
    return img


def _encode(img: Image.Image, fmt: str, quality: int = 90, **kw: Any) -> bytes:
    buf = io.BytesIO()
    if fmt == "jpg":
        img.save(buf, "JPEG", quality=quality, **kw)
    elif fmt == "webp":
        img.save(buf, "WEBP", quality=quality, method=4, **kw)
    elif fmt == "png":
        img.save(buf, "PNG", **kw)
    elif fmt == "bmp":
        img.save(buf, "BMP", **kw)
    elif fmt == "ppm":
        img.save(buf, "PPM", **kw)
    elif fmt == "gif":
        img.save(buf, "GIF", **kw)
    else:  # pragma: no cover
        raise ValueError(fmt)
    return buf.getvalue()


def _decode(data: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    im.load()
    return im


def _brightness(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("L"), dtype=np.float32) / 255.0


# ============================================================================ drawings (unwanted)

_CONSONANTS = "bcdfghklmnprstvz"
_VOWELS = "aeiou"


def _word(rng: np.random.Generator, min_syl: int = 1, max_syl: int = 3) -> str:
    parts = []
    for _ in range(int(rng.integers(min_syl, max_syl + 1))):
        part = _CONSONANTS[int(rng.integers(len(_CONSONANTS)))] + _VOWELS[int(rng.integers(len(_VOWELS)))]
        if rng.random() < 0.3:
            part += _CONSONANTS[int(rng.integers(len(_CONSONANTS)))]
        parts.append(part)
    return "".join(parts)


def _words(rng: np.random.Generator, n: int) -> str:
    return " ".join(_word(rng) for _ in range(n))


def _line_of_text(rng: np.random.Generator, font: Any, width: float) -> str:
    """Random words filling about `width` pixels."""
    text = ""
    while True:
        candidate = (text + " " + _word(rng)).strip()
        if font.getlength(candidate) > width:
            return text or candidate
        text = candidate


def _bold_text(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, font: Any, fill: Any) -> None:
    draw.text(xy, text, font=font, fill=fill)
    draw.text((xy[0] + 1, xy[1]), text, font=font, fill=fill)


def _draw_document(rng: np.random.Generator) -> Image.Image:
    """A text page: title, paragraphs, headings, maybe a table, a list and a figure box."""
    w = int(rng.integers(520, 761))
    h = int(w * rng.uniform(1.28, 1.42))
    paper = tuple(int(v) for v in rng.integers(236, 256, 3))
    ink = tuple(int(v) for v in rng.integers(0, 60, 3))
    accent = _random_colour(rng) if rng.random() < 0.4 else ink
    img = Image.new("RGB", (w, h), paper)
    draw = ImageDraw.Draw(img)
    margin = int(w * rng.uniform(0.06, 0.12))
    body = _font(int(rng.integers(10, 15)))
    leading = body.size * rng.uniform(1.3, 1.7)
    y = float(margin)
    if rng.random() < 0.5:  # running head and rule
        draw.text((margin, y), _words(rng, 3).upper(), font=_font(max(8, body.size - 2)), fill=ink)
        y += body.size + 4
        draw.line([(margin, y), (w - margin, y)], fill=ink, width=1)
        y += 10
    title_font = _font(int(rng.integers(20, 34)))
    title = _words(rng, int(rng.integers(2, 6))).title()
    while title_font.getlength(title) > w - 2 * margin and " " in title:
        title = title.rsplit(" ", 1)[0]
    tx = (w - title_font.getlength(title)) / 2 if rng.random() < 0.6 else margin
    _bold_text(draw, (tx, y), title, title_font, accent)
    y += title_font.size * 1.6
    if rng.random() < 0.6:
        draw.text((tx, y), _words(rng, 3).title(), font=_font(body.size + 1), fill=ink)
        y += body.size * 2.5
    n_cols = 2 if rng.random() < 0.35 else 1
    gutter = int(w * 0.04)
    col_w = (w - 2 * margin - (n_cols - 1) * gutter) / n_cols
    top = y
    bottom = h - margin - body.size * 2
    used = {"table": False, "figure": False}
    for col in range(n_cols):
        x = margin + col * (col_w + gutter)
        y = top
        while y < bottom - leading * 2:
            r = rng.random()
            if r < 0.12:  # heading
                hf = _font(body.size + int(rng.integers(2, 6)))
                _bold_text(
                    draw, (x, y + leading * 0.4), _words(rng, int(rng.integers(1, 4))).title(), hf, accent
                )
                y += hf.size + leading
            elif r < 0.2 and not used["table"] and bottom - y > 8 * leading:
                used["table"] = True
                y = _draw_table(draw, rng, x, y, col_w, body, ink, leading) + leading
            elif r < 0.27 and not used["figure"] and bottom - y > 10 * leading:
                used["figure"] = True
                fh = leading * rng.uniform(6, 9)
                shade = tuple(int(v) - int(rng.integers(20, 60)) for v in paper)
                draw.rectangle([x, y, x + col_w, y + fh], fill=shade, outline=ink)
                for _ in range(int(rng.integers(2, 5))):
                    px = rng.uniform(x, x + col_w, 2)
                    py = rng.uniform(y, y + fh, 2)
                    draw.line([(px[0], py[0]), (px[1], py[1])], fill=ink, width=2)
                y += fh + 4
                caption = "Figure " + str(int(rng.integers(1, 9))) + ". " + _words(rng, 4)
                draw.text((x, y), caption, font=body, fill=ink)
                y += leading * 1.5
            elif r < 0.35:  # bullet list
                for _ in range(int(rng.integers(2, 6))):
                    if y > bottom - leading:
                        break
                    cy = y + body.size * 0.55
                    draw.ellipse([x + 4, cy - 2, x + 8, cy + 2], fill=ink)
                    draw.text(
                        (x + 16, y),
                        _line_of_text(rng, body, (col_w - 16) * rng.uniform(0.4, 1.0)),
                        font=body,
                        fill=ink,
                    )
                    y += leading
                y += leading * 0.5
            else:  # paragraph
                n_lines = int(rng.integers(3, 10))
                indent = body.size * 2 if rng.random() < 0.5 else 0
                for k in range(n_lines):
                    if y > bottom - leading:
                        break
                    last = k == n_lines - 1
                    span = (col_w - (indent if k == 0 else 0)) * (rng.uniform(0.3, 0.8) if last else 0.98)
                    draw.text(
                        (x + (indent if k == 0 else 0), y),
                        _line_of_text(rng, body, span),
                        font=body,
                        fill=ink,
                    )
                    y += leading
                y += leading * rng.uniform(0.4, 1.0)
    page = str(int(rng.integers(1, 300)))
    draw.text(((w - body.getlength(page)) / 2, h - margin), page, font=body, fill=ink)
    return img


def _draw_table(
    draw: ImageDraw.ImageDraw,
    rng: np.random.Generator,
    x: float,
    y: float,
    width: float,
    font: Any,
    ink: Any,
    leading: float,
) -> float:
    n_rows, n_cols = int(rng.integers(4, 9)), int(rng.integers(3, 6))
    row_h = leading * 1.2
    cell_w = width / n_cols
    header_fill = tuple(int(v) for v in rng.integers(180, 236, 3))
    draw.rectangle([x, y, x + width, y + row_h], fill=header_fill)
    for r in range(n_rows + 1):
        draw.line([(x, y + r * row_h), (x + width, y + r * row_h)], fill=ink, width=1)
    if rng.random() < 0.6:
        for c in range(n_cols + 1):
            draw.line([(x + c * cell_w, y), (x + c * cell_w, y + n_rows * row_h)], fill=ink, width=1)
    for r in range(n_rows):
        for c in range(n_cols):
            if r == 0:
                text = _word(rng, 1, 2).title()
            elif c == 0:
                text = _word(rng, 1, 3)
            else:
                text = f"{rng.uniform(0, 1000):.{int(rng.integers(0, 3))}f}"
            while font.getlength(text) > cell_w - 6 and len(text) > 1:
                text = text[:-1]
            draw.text(
                (x + c * cell_w + 3, y + r * row_h + (row_h - font.size) / 2), text, font=font, fill=ink
            )
    return y + n_rows * row_h


def _nice_step(span: float, n: int) -> float:
    raw = span / max(n, 1)
    mag = 10 ** np.floor(np.log10(raw))
    for m in (1, 2, 2.5, 5, 10):
        if m * mag >= raw:
            return float(m * mag)
    return float(10 * mag)  # pragma: no cover


def _palette(rng: np.random.Generator, n: int, dark: bool) -> list[tuple[int, int, int]]:
    start = rng.uniform(0, 1)
    sat = rng.uniform(0.45, 0.9)
    val = rng.uniform(0.75, 1.0) if dark else rng.uniform(0.5, 0.85)
    out = []
    for i in range(n):
        r, g, b = colorsys.hsv_to_rgb((start + i / max(n, 1) * rng.uniform(0.8, 1.0)) % 1.0, sat, val)
        out.append((int(r * 255), int(g * 255), int(b * 255)))
    return out


def _draw_chart(rng: np.random.Generator) -> Image.Image:
    """A bar, line, horizontal bar or scatter chart with axes, ticks, labels and a legend."""
    w = int(rng.integers(560, 881))
    h = int(w / rng.uniform(1.2, 1.6))
    dark = rng.random() < 0.2
    bg = tuple(int(v) for v in (rng.integers(10, 50, 3) if dark else rng.integers(235, 256, 3)))
    fg = (225, 225, 225) if dark else tuple(int(v) for v in rng.integers(0, 70, 3))
    grid = tuple(int(0.75 * b + 0.25 * f) for b, f in zip(bg, fg, strict=True))
    img = Image.new("RGB", (w, h), bg)
    draw = ImageDraw.Draw(img)
    kind = ("bar", "line", "hbar", "scatter")[int(rng.integers(4))]
    n_series = int(rng.integers(1, 4)) if kind != "hbar" else int(rng.integers(1, 3))
    colours = _palette(rng, n_series, dark)
    title_font = _font(int(rng.integers(15, 24)))
    label_font = _font(int(rng.integers(10, 14)))
    title = _words(rng, int(rng.integers(2, 5))).capitalize()
    title_x = (w - title_font.getlength(title)) / 2 if rng.random() < 0.6 else 20
    _bold_text(draw, (title_x, 12), title, title_font, fg)
    legend_w = 110 if n_series > 1 else 0
    left, top = 70.0, 24.0 + title_font.size * 1.6
    right, bottom = w - 24.0 - legend_w, h - 56.0
    if kind == "hbar":
        left = 110.0

    if kind in ("bar", "hbar"):
        n_cat = int(rng.integers(3, 9)) if kind == "bar" else int(rng.integers(3, 8))
        cats = [_word(rng, 1, 2).title() for _ in range(n_cat)]
        values = rng.uniform(0.1, 1.0, (n_series, n_cat)) * 10 ** int(rng.integers(1, 4))
        vmax = float(values.max()) * 1.1
    elif kind == "line":
        n_pts = int(rng.integers(8, 40))
        walk = np.cumsum(rng.normal(0, 1, (n_series, n_pts)), axis=1)
        scale = 10 ** int(rng.integers(1, 4))
        values = (walk - walk.min() + rng.uniform(0.5, 3)) * scale / 10
        vmax = float(values.max()) * 1.1
    else:
        n_pts = int(rng.integers(20, 120))
        xs = rng.uniform(0, 100, (n_series, n_pts))
        values = xs * rng.uniform(-1, 1, (n_series, 1)) + rng.normal(0, 15, (n_series, n_pts)) + 100
        vmax = float(values.max()) * 1.1
    vmin = 0.0 if kind != "scatter" else float(min(0.0, values.min()))
    step = _nice_step(vmax - vmin, int(rng.integers(4, 8)))
    ticks = np.arange(np.floor(vmin / step) * step, vmax + step * 0.5, step)
    vmin, vmax = float(ticks[0]), float(ticks[-1])
    show_grid = rng.random() < 0.7

    def vy(v: float) -> float:  # value -> y (vertical value axis)
        return bottom - (v - vmin) / (vmax - vmin) * (bottom - top)

    def vx(v: float) -> float:  # value -> x (horizontal value axis)
        return left + (v - vmin) / (vmax - vmin) * (right - left)

    fmt = (lambda v: f"{v:g}") if step >= 1 else (lambda v: f"{v:.1f}")
    for t in ticks:
        label = fmt(float(t))
        if kind == "hbar":
            x = vx(float(t))
            if show_grid:
                draw.line([(x, top), (x, bottom)], fill=grid)
            draw.line([(x, bottom), (x, bottom + 5)], fill=fg)
            draw.text((x - label_font.getlength(label) / 2, bottom + 8), label, font=label_font, fill=fg)
        else:
            y = vy(float(t))
            if show_grid:
                draw.line([(left, y), (right, y)], fill=grid)
            draw.line([(left - 5, y), (left, y)], fill=fg)
            draw.text(
                (left - 8 - label_font.getlength(label), y - label_font.size / 2),
                label,
                font=label_font,
                fill=fg,
            )
    draw.line([(left, top), (left, bottom)], fill=fg, width=2)
    draw.line([(left, bottom), (right, bottom)], fill=fg, width=2)

    if kind == "bar":
        slot = (right - left) / n_cat
        bar_w = slot * rng.uniform(0.5, 0.85) / n_series
        for c in range(n_cat):
            x0 = left + c * slot + (slot - bar_w * n_series) / 2
            for s in range(n_series):
                draw.rectangle(
                    [x0 + s * bar_w, vy(float(values[s, c])), x0 + (s + 1) * bar_w - 1, bottom],
                    fill=colours[s],
                )
            cx = left + (c + 0.5) * slot
            draw.text((cx - label_font.getlength(cats[c]) / 2, bottom + 8), cats[c], font=label_font, fill=fg)
    elif kind == "hbar":
        slot = (bottom - top) / n_cat
        bar_h = slot * rng.uniform(0.5, 0.85) / n_series
        for c in range(n_cat):
            y0 = top + c * slot + (slot - bar_h * n_series) / 2
            for s in range(n_series):
                draw.rectangle(
                    [left, y0 + s * bar_h, vx(float(values[s, c])), y0 + (s + 1) * bar_h - 1], fill=colours[s]
                )
            cy = top + (c + 0.5) * slot
            draw.text(
                (left - 8 - label_font.getlength(cats[c]), cy - label_font.size / 2),
                cats[c],
                font=label_font,
                fill=fg,
            )
    elif kind == "line":
        xs = np.linspace(left + 8, right - 8, values.shape[1])
        for s in range(n_series):
            pts = [(float(x), vy(float(v))) for x, v in zip(xs, values[s], strict=True)]
            draw.line(pts, fill=colours[s], width=int(rng.integers(2, 4)), joint="curve")
            if rng.random() < 0.5:
                for px, py in pts:
                    draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colours[s])
        for k in range(0, values.shape[1], max(1, values.shape[1] // 6)):
            label = str(2000 + k) if rng.random() < 0.5 else str(k)
            draw.line([(xs[k], bottom), (xs[k], bottom + 5)], fill=fg)
            draw.text((xs[k] - label_font.getlength(label) / 2, bottom + 8), label, font=label_font, fill=fg)
    else:
        xmin, xmax = 0.0, 100.0
        for s in range(n_series):
            for xv, yv in zip(xs[s], values[s], strict=True):
                px = left + (xv - xmin) / (xmax - xmin) * (right - left)
                py = vy(float(yv))
                draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colours[s])
        for t in range(0, 101, 20):
            px = left + t / 100 * (right - left)
            draw.line([(px, bottom), (px, bottom + 5)], fill=fg)
            draw.text((px - label_font.getlength(str(t)) / 2, bottom + 8), str(t), font=label_font, fill=fg)

    xlabel = _words(rng, int(rng.integers(1, 3))).capitalize()
    draw.text(
        ((left + right) / 2 - label_font.getlength(xlabel) / 2, h - 24), xlabel, font=label_font, fill=fg
    )
    if rng.random() < 0.7:  # a rotated y-axis label
        ylabel = _words(rng, int(rng.integers(1, 3))).capitalize()
        tw = int(label_font.getlength(ylabel)) + 4
        tag = Image.new("RGB", (tw, label_font.size + 6), bg)
        ImageDraw.Draw(tag).text((2, 1), ylabel, font=label_font, fill=fg)
        tag = tag.transpose(Image.Transpose.ROTATE_90)
        img.paste(tag, (4, int((top + bottom) / 2 - tw / 2)))
    if n_series > 1:
        lx, ly = right + 16, top + 4
        for s in range(n_series):
            draw.rectangle([lx, ly + s * 22, lx + 14, ly + s * 22 + 12], fill=colours[s])
            draw.text((lx + 20, ly + s * 22), _word(rng, 1, 3).title(), font=label_font, fill=fg)
    return img


def _smooth_noise(rng: np.random.Generator, w: int, h: int, octaves: int = 3) -> np.ndarray:
    """A smooth random field in [0, 1] of shape (h, w): upsampled low-resolution noise."""
    field_ = np.zeros((h, w), dtype=np.float32)
    amp = 1.0
    cells = int(rng.integers(3, 6))
    for _ in range(octaves):
        gw, gh = cells + 1, max(2, round((cells + 1) * h / w))
        low = Image.fromarray(rng.random((gh, gw)).astype(np.float32))
        field_ += amp * np.asarray(low.resize((w, h), Image.Resampling.BICUBIC), dtype=np.float32)
        amp *= 0.5
        cells *= 2
    field_ -= field_.min()
    return field_ / max(float(field_.max()), 1e-6)


def _draw_map(rng: np.random.Generator) -> Image.Image:
    """A map: land and water, elevation or political regions, borders, roads, cities and labels."""
    w = int(rng.integers(480, 861))
    h = int(w / rng.uniform(0.8, 1.5))
    style = ("atlas", "political", "road")[int(rng.integers(3))]
    elevation = _smooth_noise(rng, w, h)
    water = elevation < rng.uniform(0.25, 0.5)
    water_colour = np.array(
        [rng.integers(120, 180), rng.integers(170, 215), rng.integers(215, 255)], dtype=np.float32
    )
    rgb = np.empty((h, w, 3), dtype=np.float32)
    regions = None
    if style == "atlas":
        bands = np.array(
            [
                [rng.integers(90, 150), rng.integers(160, 210), rng.integers(80, 130)],
                [rng.integers(180, 230), rng.integers(200, 235), rng.integers(120, 170)],
                [rng.integers(200, 235), rng.integers(170, 205), rng.integers(110, 150)],
                [rng.integers(160, 200), rng.integers(120, 160), rng.integers(90, 120)],
            ],
            dtype=np.float32,
        )
        level = np.clip(
            ((elevation - elevation[~water].min() if (~water).any() else elevation) * 5).astype(int), 0, 3
        )
        rgb[:] = bands[level]
    elif style == "political":
        k = int(rng.integers(5, 13))
        sx, sy = rng.uniform(0, w, k), rng.uniform(0, h, k)
        yy, xx = np.mgrid[0:h:4, 0:w:4].astype(np.float32)
        wobble = _smooth_noise(rng, xx.shape[1], xx.shape[0]) * rng.uniform(20, 60)
        d = (xx[None] + wobble[None] - sx[:, None, None]) ** 2 + (
            yy[None] - wobble[None] - sy[:, None, None]
        ) ** 2
        small = np.argmin(d, axis=0).astype(np.uint8)
        regions = np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.NEAREST))
        pastel = np.array([[rng.integers(170, 250) for _ in range(3)] for _ in range(k)], dtype=np.float32)
        rgb[:] = pastel[regions]
    else:
        base = np.array(rng.integers(225, 248, 3), dtype=np.float32)
        rgb[:] = base
        parks = _smooth_noise(rng, w, h) > rng.uniform(0.7, 0.85)
        rgb[parks & ~water] = np.array(
            [rng.integers(170, 205), rng.integers(215, 235), rng.integers(165, 195)]
        )
    rgb[water] = water_colour * (0.9 + 0.1 * elevation[water, None])
    coast = np.zeros_like(water)
    coast[1:, :] |= water[1:, :] != water[:-1, :]
    coast[:, 1:] |= water[:, 1:] != water[:, :-1]
    rgb[coast] = water_colour * 0.55
    if regions is not None:
        edge = np.zeros_like(water)
        edge[1:, :] |= regions[1:, :] != regions[:-1, :]
        edge[:, 1:] |= regions[:, 1:] != regions[:, :-1]
        rgb[edge & ~water] = (90, 70, 110)
    img = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    if rng.random() < 0.5:  # graticule
        step = int(rng.integers(60, 140))
        tone = tuple(int(v) for v in rng.integers(120, 200, 3))
        for gx in range(step, w, step):
            draw.line([(gx, 0), (gx, h)], fill=tone, width=1)
        for gy in range(step, h, step):
            draw.line([(0, gy), (w, gy)], fill=tone, width=1)
    land = np.argwhere(~water)
    n_cities = int(rng.integers(5, 16))
    if len(land) == 0:
        land = np.argwhere(np.ones_like(water))
    picks = land[rng.integers(0, len(land), n_cities)]
    cities = [(float(x), float(y)) for y, x in picks]
    if style != "political":  # dashed borders
        for _ in range(int(rng.integers(1, 4))):
            pts = np.cumsum(rng.normal(0, 40, (12, 2)), axis=0) + rng.uniform([0, 0], [w, h])
            for a, b in zip(pts[:-1:2], pts[1::2], strict=True):
                draw.line([tuple(a), tuple(b)], fill=(120, 80, 140), width=2)
    road_colour = ((250, 200, 90), (255, 255, 255), (230, 120, 80))[int(rng.integers(3))]
    order = np.argsort([c[0] for c in cities])
    n_roads = n_cities + int(rng.integers(0, 6)) if style == "road" else n_cities - 1
    for r in range(n_roads):
        a = cities[int(order[r % n_cities])]
        b = (
            cities[int(order[(r + 1) % n_cities])]
            if r < n_cities - 1
            else cities[int(rng.integers(n_cities))]
        )
        mid = ((a[0] + b[0]) / 2 + rng.normal(0, 30), (a[1] + b[1]) / 2 + rng.normal(0, 30))
        width = int(rng.integers(3, 7))
        draw.line([a, mid, b], fill=(110, 110, 110), width=width + 2, joint="curve")
        draw.line([a, mid, b], fill=road_colour, width=width, joint="curve")
    if style == "road":  # a street grid in a corner
        gx0, gy0 = rng.uniform(0, w * 0.6), rng.uniform(0, h * 0.6)
        gstep = rng.uniform(14, 30)
        for k in range(int(rng.integers(4, 9))):
            draw.line(
                [(gx0 + k * gstep, gy0), (gx0 + k * gstep, gy0 + 8 * gstep)], fill=(255, 255, 255), width=2
            )
            draw.line(
                [(gx0, gy0 + k * gstep), (gx0 + 8 * gstep, gy0 + k * gstep)], fill=(255, 255, 255), width=2
            )
    font = _font(int(rng.integers(10, 15)))
    for i, (cx, cy) in enumerate(cities):
        r = 5 if i < 2 else int(rng.integers(2, 5))
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(30, 30, 30), outline=(255, 255, 255))
        name = _word(rng, 2, 3).title()
        draw.text(
            (cx + r + 3, cy - font.size / 2),
            name,
            font=font,
            fill=(20, 20, 20),
            stroke_width=1,
            stroke_fill=(255, 255, 255),
        )
    if rng.random() < 0.6:  # scale bar
        sx0, sy0 = 16, h - 24
        draw.rectangle([sx0, sy0, sx0 + 100, sy0 + 6], fill=(255, 255, 255), outline=(0, 0, 0))
        draw.rectangle([sx0, sy0, sx0 + 50, sy0 + 6], fill=(0, 0, 0))
        draw.text((sx0 + 106, sy0 - 4), f"{int(rng.integers(1, 50)) * 10} km", font=font, fill=(0, 0, 0))
    if rng.random() < 0.5:  # north arrow
        ax, ay = w - 30, 40
        draw.polygon([(ax, ay - 20), (ax - 8, ay + 6), (ax + 8, ay + 6)], fill=(20, 20, 20))
        draw.text((ax - 4, ay + 8), "N", font=font, fill=(20, 20, 20))
    return img


_DRAWERS: dict[str, Callable[[np.random.Generator], Image.Image]] = {
    "document": _draw_document,
    "chart": _draw_chart,
    "map": _draw_map,
}


# ============================================================================ per-file renders


def _row(
    item: _Item, status: Status | str, reasons: tuple[str, ...], size: tuple[int, int] | None
) -> dict[str, Any]:
    return {
        "image_id": _image_id(item),
        "shard": item.shard,
        "kind": item.kind,
        "source_id": item.source_id,
        "transform": item.transform,
        "expected_status": str(status),
        "expected_reasons": sorted(str(r) for r in reasons),
        "rotation": item.rotation,
        "category": item.category,
        "quality_issue": item.quality_issue,
        "width": size[0] if size else None,
        "height": size[1] if size else None,
    }


def _render_base(item: _Item) -> bytes:
    rng = np.random.default_rng(item.seed)
    img = _render_photo(item, rng)
    if item.gray:
        return _encode(img.convert("L"), "jpg", item.quality)
    if item.ext == "png":
        return _encode(img, "png", compress_level=6)
    return _encode(img, item.ext, item.quality)


def _render_derivative(item: _Item, src: Image.Image, src_bytes: bytes) -> tuple[bytes, tuple[int, int]]:
    """(file bytes, upright size) of a copy or derivative of a decoded base."""
    rng = np.random.default_rng(item.seed)
    size = src.size
    if item.kind == "byte_copy":
        return src_bytes, size
    if item.kind == "pixel_copy":
        if item.transform == "png_to_bmp":
            return _encode(src, "bmp"), size
        if item.transform == "png_recompress":
            for level in (1, 3, 9):
                data = _encode(src, "png", compress_level=level)
                if data != src_bytes:
                    return data, size
            raise RuntimeError("PNG re-encode gave the same bytes")  # pragma: no cover
        comment = b"demo copy " + rng.bytes(8).hex().encode()
        segment = b"\xff\xfe" + struct.pack(">H", len(comment) + 2) + comment
        return src_bytes[:2] + segment + src_bytes[2:], size
    if item.kind == "rotated_copy":
        transpose = {
            90: Image.Transpose.ROTATE_270,  # PIL's ROTATE_n turns counter-clockwise
            180: Image.Transpose.ROTATE_180,
            270: Image.Transpose.ROTATE_90,
        }[item.rotation]
        out = src.transpose(transpose)
        if item.ext == "png":
            return _encode(out, "png", compress_level=6), size
        return _encode(out, item.ext, item.quality), size
    if item.kind == "quality":
        return _render_quality(item, src, rng), size
    # near duplicates
    t = item.transform
    out = src
    if t == "resize":
        s = rng.uniform(0.5, 0.8)
        out = src.resize((max(96, round(size[0] * s)), max(96, round(size[1] * s))), Image.Resampling.LANCZOS)
    elif t == "crop":
        fx = rng.uniform(0.02, 0.10, 4)
        w, h = size
        out = src.crop((round(fx[0] * w), round(fx[1] * h), w - round(fx[2] * w), h - round(fx[3] * h)))
    elif t == "brightness_contrast":
        b = 1 + rng.choice([-1, 1]) * rng.uniform(0.10, 0.25)
        c = 1 + rng.choice([-1, 1]) * rng.uniform(0.10, 0.25)
        out = ImageEnhance.Contrast(ImageEnhance.Brightness(src).enhance(b)).enhance(c)
    elif t == "text":
        out = src.copy()
        draw = ImageDraw.Draw(out)
        font = _font(int(rng.integers(12, 22)))
        word = _word(rng, 1, 3).upper() if rng.random() < 0.5 else _word(rng, 1, 3)
        tw = font.getlength(word)
        x = rng.uniform(4, max(5, size[0] - tw - 4))
        y = rng.uniform(4, max(5, size[1] - font.size - 6))
        light = rng.random() < 0.5
        fill: Any = 255 if light else 0
        stroke: Any = 0 if light else 255
        if out.mode == "RGB":
            fill, stroke = (fill,) * 3, (stroke,) * 3
        draw.text((x, y), word, font=font, fill=fill, stroke_width=1, stroke_fill=stroke)
    elif t == "hflip":
        out = src.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    # "jpeg": the decoded base itself, re-encoded at low quality below
    return _encode(out, "jpg", item.quality), out.size


def _render_quality(item: _Item, src: Image.Image, rng: np.random.Generator) -> bytes:
    issue = item.quality_issue
    if issue == "blur":
        return _encode(src.filter(ImageFilter.GaussianBlur(rng.uniform(4.0, 7.0))), "jpg", item.quality)
    if issue == "dark":
        f = rng.uniform(0.12, 0.25)
        out = src.point(lambda v: int(v * f))
        check = lambda im: float(np.percentile(_brightness(im), 99)) < 0.30  # noqa: E731
    else:
        k = rng.uniform(0.01, 0.035)
        out = src.point(lambda v: round(255 - (255 - v) * k))
        check = lambda im: float(np.percentile(_brightness(im), 5)) > 0.955  # noqa: E731
    data = _encode(out, "jpg", item.quality)
    if not check(_decode(data)):  # JPEG ringing pushed it over: fall back to the best JPEG quality
        data = _encode(out, "jpg", 100)
    return data


def _render_exif_rotated(item: _Item) -> tuple[bytes, tuple[int, int]]:
    rng = np.random.default_rng(item.seed)
    upright = _render_photo(item, rng)
    orientation = int(str(item.transform).rsplit("_", 1)[1])
    # the stored pixels are the upright ones turned so that the tag's transpose undoes it
    stored = upright.transpose(
        {
            3: Image.Transpose.ROTATE_180,
            6: Image.Transpose.ROTATE_90,  # tag 6: viewers turn 90 degrees clockwise
            8: Image.Transpose.ROTATE_270,  # tag 8: viewers turn 90 degrees counter-clockwise
        }[orientation]
    )
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _encode(stored, "jpg", item.quality, exif=exif), upright.size


def _bomb_png(rng: np.random.Generator) -> bytes:
    """A few hundred bytes whose IHDR declares BOMB_SIZE: never decodable at that size."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
        )

    w, h = BOMB_SIZE
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)  # 8-bit greyscale, no interlace
    text = b"Comment\x00" + rng.bytes(8).hex().encode()  # makes each bomb's bytes distinct
    idat = zlib.compress(b"\x00" * (w + 1) * 2, 9)  # two rows of the 20000 declared
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"tEXt", text)
        + chunk(b"IDAT", idat)
        + chunk(b"IEND", b"")
    )


def _garbage(rng: np.random.Generator) -> bytes:
    while True:
        data = rng.bytes(int(rng.integers(2000, 20000)))
        if sniff_format(data[:32]) is not None:
            continue
        try:
            Image.open(io.BytesIO(data)).close()
        except Exception:  # anything but an image is what we want
            return data


def _render_defect(item: _Item) -> tuple[bytes, tuple[int, int] | None]:
    rng = np.random.default_rng(item.seed)
    name = item.transform
    if name == "zero_byte":
        return b"", None
    if name == "garbage":
        return _garbage(rng), None
    if name == "bomb":
        return _bomb_png(rng), BOMB_SIZE
    if name == "file_too_large":
        noise = Image.fromarray(rng.integers(0, 256, (1700, 2200, 3), dtype=np.uint8))
        return _encode(noise, "png", compress_level=0), noise.size
    img = _render_photo(item, rng)
    size = img.size
    if name == "truncated":
        data = _encode(img, "jpg", item.quality)
        return data[: int(len(data) * rng.uniform(0.45, 0.55))], size
    if name == "png_as_jpg":
        return _encode(img, "png", compress_level=6), size
    if name in ("jpg_as_png", "tiny", "panorama", "tall", "too_large"):
        return _encode(img, "jpg", item.quality), size
    if name == "cmyk":
        return _encode(img.convert("CMYK"), "jpg", item.quality), size
    if name == "palette":
        pal = img.quantize(colors=int(rng.integers(64, 257)), method=Image.Quantize.MEDIANCUT)
        pal.info.pop("transparency", None)
        return _encode(pal, "png", compress_level=6), size
    if name == "sixteen_bit":
        grey = np.asarray(img.convert("L"), dtype=np.float64)
        span = max(float(grey.max() - grey.min()), 1.0)
        arr = np.round((grey - grey.min()) / span * 65535).astype(np.uint16)
        return _encode(Image.fromarray(arr), "png", compress_level=6), size
    if name == "alpha":
        ramp = np.linspace(rng.uniform(0, 80), 255, size[0], dtype=np.float32)[None, :].repeat(size[1], 0)
        alpha = Image.fromarray(ramp.astype(np.uint8))
        out = img.convert("LA") if rng.random() < 0.5 else img.convert("RGBA")
        out.putalpha(alpha)
        return _encode(out, "png", compress_level=6), size
    if name == "animated":
        frames = []
        for k in range(int(rng.integers(3, 6))):
            frame = img.copy()
            draw = ImageDraw.Draw(frame)
            r = size[1] // 6
            cx = size[0] * (0.15 + 0.7 * k / 4)
            draw.ellipse([cx - r, size[1] / 2 - r, cx + r, size[1] / 2 + r], fill=_random_colour(rng))
            frames.append(frame.quantize(colors=255, method=Image.Quantize.MEDIANCUT))
        return _encode(frames[0], "gif", save_all=True, append_images=frames[1:], duration=150, loop=0), size
    if name == "unsupported":
        return _encode(img, "ppm"), size
    raise ValueError(f"unknown defect {name}")  # pragma: no cover


def _non_image_bytes(item: _Item) -> bytes:
    rng = np.random.default_rng(item.seed)
    if item.name.endswith(".json"):
        meta = {
            "collection": _word(rng, 2, 3),
            "shard": item.shard,
            "license": "CC0",
            "camera": _word(rng, 2, 3),
        }
        return (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode()
    if item.name.endswith(".csv"):
        lines = ["file,label"] + [
            f"img_{int(rng.integers(0, 999999)):06d}.jpg,{_word(rng)}" for _ in range(12)
        ]
        return ("\n".join(lines) + "\n").encode()
    lines = ["Collection notes"] + [_words(rng, int(rng.integers(5, 12))) for _ in range(8)]
    return ("\n".join(lines) + "\n").encode()


def _write(root: Path, item: _Item, data: bytes) -> None:
    path = root / item.folder / item.name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _run_task(root_str: str, task: list[_Item]) -> list[dict[str, Any]]:
    """Render and write one task's files; return their ground-truth rows."""
    root = Path(root_str)
    rows: list[dict[str, Any]] = []
    head = task[0]
    if head.kind == "base":
        data = _render_base(head)
        _write(root, head, data)
        src = _decode(data)
        rows.append(_row(head, Status.OK, (), src.size))
        for item in task[1:]:
            out, size = _render_derivative(item, src, data)
            _write(root, item, out)
            rows.append(_row(item, Status.OK, (), size))
        return rows
    for item in task:
        if item.kind == "exif_rotated":
            data, size = _render_exif_rotated(item)
            rows.append(_row(item, Status.FIXABLE, (Reason.EXIF_ORIENTATION,), size))
        elif item.kind in ("unwanted", "example"):
            img = _DRAWERS[str(item.category)](np.random.default_rng(item.seed))
            data = (
                _encode(img, "png", compress_level=6)
                if item.ext == "png"
                else _encode(img, "jpg", item.quality)
            )
            size = img.size
            if item.kind == "unwanted":
                rows.append(_row(item, Status.OK, (), size))
        elif item.kind == "defect":
            data, size = _render_defect(item)
            status, reasons = DEFECT_EXPECTATIONS[str(item.transform)]
            rows.append(_row(item, status, reasons, size))
        elif item.kind == "non_image":
            data = _non_image_bytes(item)
            rows.append(_row(item, Status.REJECTED, (Reason.NOT_AN_IMAGE,), None))
        else:  # pragma: no cover
            raise ValueError(item.kind)
        _write(root, item, data)
    return rows


# ============================================================================ the entry point

_MARKER = ".complete"
_GENERATED = ("images", "examples", "ground_truth.parquet", "ground_truth.parquet.tmp", _MARKER + ".tmp")


def _marker_args(n_images: int, n_shards: int, seed: int, layout: str) -> dict[str, Any]:
    return {
        "generator_version": GENERATOR_VERSION,
        "layout": layout,
        "n_images": n_images,
        "n_shards": n_shards,
        "seed": seed,
    }


def _summary(out_dir: Path, layout: str) -> DemoSummary:
    gt_path = out_dir / "ground_truth.parquet"
    kinds = pl.read_parquet(gt_path, columns=["kind"])["kind"].to_list()
    counts = {kind: kinds.count(kind) for kind in KINDS}
    return DemoSummary(
        out_dir=out_dir,
        images_root=out_dir / "images",
        examples_root=out_dir / "examples",
        ground_truth_path=gt_path,
        counts=counts,
        n_files=len(kinds),
        layout=layout,
    )


def _tasks(items: list[_Item], examples: list[_Item]) -> list[list[_Item]]:
    """Each base with its derivatives is one task; every other file is its own task."""
    groups: dict[int, list[_Item]] = {}
    singles: list[list[_Item]] = []
    for index, item in enumerate(items):
        if item.kind == "base":
            groups.setdefault(index, []).insert(0, item)
        elif item.source is not None:
            groups.setdefault(item.source, []).append(item)
        else:
            singles.append([item])
    heavy = [t for t in singles if t[0].transform in _SINGLE_DEFECTS]
    rest = [t for t in singles if t[0].transform not in _SINGLE_DEFECTS]
    return heavy + list(groups.values()) + rest + [[e] for e in examples]


def _batches(tasks: list[list[_Item]], per_batch: int) -> list[list[list[_Item]]]:
    batches: list[list[list[_Item]]] = []
    current: list[list[_Item]] = []
    size = 0
    for task in tasks:
        if task[0].transform in _SINGLE_DEFECTS:  # heavy: alone, and first
            batches.append([task])
            continue
        current.append(task)
        size += len(task)
        if size >= per_batch:
            batches.append(current)
            current, size = [], 0
    if current:
        batches.append(current)
    return batches


def _run_batch(root_str: str, batch: list[list[_Item]]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for task in batch:
        rows.extend(_run_task(root_str, task))
    return rows


def _default_workers() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        n = os.cpu_count() or 1
    return max(1, min(n, 8))


def _pack_tars(images_root: Path) -> None:
    """Replace each shard folder by a plain tar of its files (sorted, no time stamps, no owners)."""
    for shard_dir in sorted(p for p in images_root.iterdir() if p.is_dir()):
        tar_path = images_root / f"{shard_dir.name}.tar"
        with tarfile.open(tar_path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for path in sorted(shard_dir.iterdir()):
                info = tarfile.TarInfo(path.name)
                info.size = path.stat().st_size
                info.mtime = 0
                info.mode = 0o644
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                with path.open("rb") as fh:
                    tar.addfile(info, fh)
        shutil.rmtree(shard_dir)


def generate_demo(
    out_dir: Path,
    n_images: int = 2000,
    n_shards: int = 4,
    seed: int = 0,
    layout: Literal["directory", "webdataset"] = "directory",
    progress: Callable[[int, int], None] | None = None,
    *,
    workers: int | None = None,
) -> DemoSummary:
    """Write the demo pool, example sets and ground truth under ``out_dir``.

    ``n_images`` is the number of files in ``images/`` (non-images included). A finished
    dataset with the same arguments (the ``.complete`` marker) is returned as is; otherwise
    what an earlier call wrote is deleted and everything is generated again. ``workers``
    (default: the CPU cores, at most 8) only changes the speed, never the output.
    ``progress(done, total)`` is called in this process as files are written.
    """
    if layout not in ("directory", "webdataset"):
        raise ValueError(f"layout must be 'directory' or 'webdataset', not {layout!r}")
    if n_shards < 1:
        raise ValueError("n_shards must be at least 1")
    out_dir = Path(out_dir)
    args = _marker_args(n_images, n_shards, seed, layout)
    marker = out_dir / _MARKER
    if marker.is_file():
        try:
            found = json.loads(marker.read_text())
        except (OSError, ValueError):
            found = None
        if found == args and (out_dir / "ground_truth.parquet").is_file():
            return _summary(out_dir, layout)
    # stale or interrupted: remove the marker first, then what we wrote before
    marker.unlink(missing_ok=True)
    for name in _GENERATED:
        path = out_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()

    items, examples = _plan(n_images, n_shards, seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "images").mkdir()
    for cat in CATEGORIES:
        (out_dir / "examples" / cat).mkdir(parents=True)
    total = len(items) + len(examples)
    batches = _batches(_tasks(items, examples), per_batch=12)
    n_workers = _default_workers() if workers is None else max(1, workers)
    n_workers = min(n_workers, len(batches))
    rows: list[dict[str, Any]] = []
    done = 0
    if progress:
        progress(0, total)
    if n_workers <= 1:
        for batch in batches:
            rows.extend(_run_batch(str(out_dir), batch))
            done += sum(len(t) for t in batch)
            if progress:
                progress(done, total)
    else:
        # spawn, not fork: the caller may hold threads (Dagster, polars); a script that calls
        # this at import time needs the usual `if __name__ == "__main__":` guard (or workers=1)
        pool = ProcessPoolExecutor(n_workers, mp_context=get_context("spawn"))
        try:
            futures = {pool.submit(_run_batch, str(out_dir), batch): batch for batch in batches}
            for future in as_completed(futures):
                rows.extend(future.result())
                done += sum(len(t) for t in futures[future])
                if progress:
                    progress(done, total)
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        pool.shutdown(wait=True)

    if layout == "webdataset":
        _pack_tars(out_dir / "images")
    frame = pl.DataFrame(rows, schema=GROUND_TRUTH_SCHEMA).sort("image_id")
    with atomic_path(out_dir / "ground_truth.parquet") as tmp:
        frame.write_parquet(tmp, statistics=False)
    # the marker last: it says the folder is complete, so only a whole ground truth may precede it
    write_text(marker, json.dumps(args, sort_keys=True, indent=2) + "\n")
    return _summary(out_dir, layout)


__all__ = [
    "CATEGORIES",
    "DEFECT_EXPECTATIONS",
    "EXAMPLES_PER_CATEGORY",
    "GROUND_TRUTH_SCHEMA",
    "KINDS",
    "DemoSummary",
    "defect_counts",
    "demo_counts",
    "generate_demo",
]
