"""A small labeled dataset, ImageNet style, with train images planted in the test split.

:func:`generate_labeled_demo` writes ``<root>/images/train/<class>/*.jpg`` and
``<root>/images/test/<class>/*`` plus ``<root>/ground_truth.parquet``. Each class is one
of scikit-image's bundled photos; its images are different views of it: a window
20-45% of the photo's shorter side across, turned by up to 15 degrees, mirrored half of
the time, with brightness, contrast and colour jitter, 160-240 px on the longer side.
Windows of one photo overlap little (IoU below 0.25), so two unique images are
different pictures, not near copies.

Planted in test, each from a distinct train image of the same class (``leak_kind``):

- ``byte_copy``: the train file's bytes under another name;
- ``reencode_jpeg``: decoded and saved again as JPEG at quality 55-70;
- ``reencode_png``: decoded and saved as PNG;
- ``crop``: a border trim of 1-2% of the width and of the height, split at random
  between the two edges, saved as JPEG (quality 90). Larger crops are out of reach of a
  64-bit perceptual hash at 5 bits (see :mod:`curation_assets.core.labeled.leaks`).

Image ids follow the ``subfolder`` shard rule with the two roots of :attr:`LabeledDemo.roots`
(``train`` and ``test``): ``<split>.<class>/<file>``. Everything comes from
``numpy.random.default_rng(seed)`` in one process: the output is byte-identical per seed.

Pure library: no Dagster import.
"""

from __future__ import annotations

import io
import json
import math
import shutil
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from PIL import Image, ImageEnhance, ImageOps

from curation_assets.core.atomic import atomic_path, write_text

GENERATOR_VERSION = 1  # bump when the output changes: a marker of another version regenerates

# class name -> bundled photo; the first n_classes are used
CLASS_PHOTOS: dict[str, str] = {
    "astronaut": "astronaut.png",
    "cat": "chelsea.png",
    "coffee": "coffee.png",
    "rocket": "rocket.jpg",
    "motorcycle": "motorcycle_left.png",
    "cameraman": "camera.png",
    "coins": "coins.png",
    "bricks": "brick.png",
    "galaxies": "hubble_deep_field.jpg",
    "tissue": "ihc.png",
    "gravel": "gravel.png",
    "grass": "grass.png",
}
LEAK_KINDS: tuple[str, ...] = ("byte_copy", "reencode_jpeg", "reencode_png", "crop")
SPLITS: tuple[str, ...] = ("train", "test")
MAX_TILT = 15.0
MAX_WINDOW_IOU = 0.25
CROP_TRIM = (0.01, 0.02)  # share of width (and of height) trimmed off a "crop" leak

GROUND_TRUTH_SCHEMA: dict[str, pl.DataType] = {
    "image_id": pl.String(),
    "rel_path": pl.String(),  # relative to images/
    "split": pl.String(),
    "label": pl.String(),
    "leak_of": pl.String(),  # image_id of the train image a planted leak copies
    "leak_kind": pl.String(),
}

_MARKER = ".labeled_demo.json"


def _photo_dir() -> Path:
    """scikit-image's bundled sample photos (read from the package, never downloaded)."""
    spec = find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the labeled demo needs scikit-image (its bundled sample photos)")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


@dataclass(frozen=True)
class LabeledDemo:
    """Where a generated labeled demo lies and what it holds."""

    root: Path
    images_root: Path
    roots: dict[str, str]  # split -> folder, as a project file's dataset.roots
    ground_truth_path: Path
    classes: tuple[str, ...]
    counts: dict[str, int]  # "train", "test" (unique), and one entry per leak kind


def image_id_of(split: str, label: str, name: str) -> str:
    """The image_id the ``subfolder`` rule gives a file with the roots {train, test}."""
    return f"{split}.{label}/{name}"


def _iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _pick_window(
    rng: np.random.Generator, size: tuple[int, int], taken: list[tuple[float, ...]]
) -> tuple[tuple[float, ...], float]:
    """A turned window of the photo (its quad corners) least overlapping the ones taken.

    Side 20-45% of the photo's shorter side, aspect 0.75-1.33, angle within MAX_TILT.
    Of 32 random windows the first whose bounding box has IoU below MAX_WINDOW_IOU with
    every window taken wins, else the least overlapping one (a photo with many views).
    """
    pw, ph = size
    best: tuple[float, tuple[float, ...], tuple[float, ...]] | None = None
    for _ in range(32):
        side = rng.uniform(0.2, 0.45) * min(pw, ph)
        aspect = rng.uniform(0.75, 1.33)
        cw, ch = side * math.sqrt(aspect), side / math.sqrt(aspect)
        angle = math.radians(rng.uniform(-MAX_TILT, MAX_TILT))
        c, s = abs(math.cos(angle)), abs(math.sin(angle))
        bw, bh = cw * c + ch * s, cw * s + ch * c
        if bw >= pw or bh >= ph:
            continue
        cx, cy = rng.uniform(bw / 2, pw - bw / 2), rng.uniform(bh / 2, ph - bh / 2)
        box = (cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2)
        overlap = max((_iou(box, t) for t in taken), default=0.0)
        corners: list[float] = []
        for u, v in ((-cw / 2, -ch / 2), (-cw / 2, ch / 2), (cw / 2, ch / 2), (cw / 2, -ch / 2)):
            cos_a, sin_a = math.cos(angle), math.sin(angle)
            corners += [cx + u * cos_a - v * sin_a, cy + u * sin_a + v * cos_a]
        if best is None or overlap < best[0]:
            best = (overlap, tuple(corners), box)
        if overlap < MAX_WINDOW_IOU:
            break
    assert best is not None
    taken.append(best[2])
    return best[1], float(rng.uniform(0, 1))


def _render_view(photo: Image.Image, rng: np.random.Generator, taken: list[tuple[float, ...]]) -> Image.Image:
    quad, flip = _pick_window(rng, photo.size, taken)
    longer = int(rng.integers(160, 241))
    # corners: upper-left, lower-left, lower-right, upper-right
    width_src = math.dist(quad[0:2], quad[6:8])
    height_src = math.dist(quad[0:2], quad[2:4])
    scale = longer / max(width_src, height_src)
    out_size = (max(32, round(width_src * scale)), max(32, round(height_src * scale)))
    view = photo.transform(out_size, Image.Transform.QUAD, quad, Image.Resampling.BICUBIC)
    if flip < 0.5:
        view = ImageOps.mirror(view)
    view = ImageEnhance.Brightness(view).enhance(float(rng.uniform(0.8, 1.2)))
    view = ImageEnhance.Contrast(view).enhance(float(rng.uniform(0.8, 1.2)))
    return ImageEnhance.Color(view).enhance(float(rng.uniform(0.7, 1.3)))


def _encode(image: Image.Image, fmt: str, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    if fmt == "png":
        image.save(buffer, format="PNG", compress_level=6)
    else:
        image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _leak_bytes(kind: str, data: bytes, rng: np.random.Generator) -> tuple[bytes, str]:
    """(bytes, extension) of a planted leak made from a train file's bytes."""
    if kind == "byte_copy":
        return data, "jpg"
    image = Image.open(io.BytesIO(data))
    image.load()
    image = image.convert("RGB")
    if kind == "reencode_jpeg":
        return _encode(image, "jpg", int(rng.integers(55, 71))), "jpg"
    if kind == "reencode_png":
        return _encode(image, "png"), "png"
    if kind == "crop":
        w, h = image.size
        trim_w, trim_h = (round(rng.uniform(*CROP_TRIM) * side) for side in (w, h))
        left, top = int(rng.integers(0, trim_w + 1)), int(rng.integers(0, trim_h + 1))
        box = (left, top, w - (trim_w - left), h - (trim_h - top))
        return _encode(image.crop(box), "jpg", 90), "jpg"
    raise ValueError(f"unknown leak kind {kind!r}; allowed: {LEAK_KINDS}")


def _marker_args(n_classes: int, per_class: int, test_per_class: int, leaks_per_kind: int, seed: int) -> dict:
    return {
        "generator_version": GENERATOR_VERSION,
        "n_classes": n_classes,
        "per_class": per_class,
        "test_per_class": test_per_class,
        "leaks_per_kind": leaks_per_kind,
        "seed": seed,
    }


def _result(root: Path, classes: tuple[str, ...]) -> LabeledDemo:
    truth = pl.read_parquet(root / "ground_truth.parquet")
    counts = {
        "train": truth.filter(pl.col("split") == "train").height,
        "test": truth.filter((pl.col("split") == "test") & pl.col("leak_kind").is_null()).height,
    }
    for kind in LEAK_KINDS:
        counts[kind] = truth.filter(pl.col("leak_kind") == kind).height
    images = root / "images"
    return LabeledDemo(
        root=root,
        images_root=images,
        roots={split: str(images / split) for split in SPLITS},
        ground_truth_path=root / "ground_truth.parquet",
        classes=classes,
        counts=counts,
    )


def generate_labeled_demo(
    root: str | Path,
    n_classes: int = 6,
    per_class: int = 16,
    *,
    test_per_class: int = 5,
    leaks_per_kind: int = 3,
    seed: int = 0,
) -> LabeledDemo:
    """Write the labeled demo under ``root`` (see the module docstring) and return where it is.

    ``per_class`` train and ``test_per_class`` unique test images per class, plus
    ``leaks_per_kind`` planted leaks of each kind in test (defaults: 96 + 30 + 12 = 138
    files). A finished demo with the same arguments is returned as is; one with other
    arguments (its marker says so) is replaced; an ``images`` folder this function did
    not write is refused rather than deleted.
    """
    if not 1 <= n_classes <= len(CLASS_PHOTOS):
        raise ValueError(f"n_classes must be within 1..{len(CLASS_PHOTOS)}, got {n_classes}")
    if per_class < 1 or test_per_class < 0 or leaks_per_kind < 0:
        raise ValueError("per_class must be >= 1, test_per_class and leaks_per_kind >= 0")
    if leaks_per_kind * len(LEAK_KINDS) > n_classes * per_class:
        raise ValueError(
            f"{leaks_per_kind * len(LEAK_KINDS)} leaks need as many train images, there are "
            f"{n_classes * per_class}"
        )
    root = Path(root)
    classes = tuple(list(CLASS_PHOTOS)[:n_classes])
    args = _marker_args(n_classes, per_class, test_per_class, leaks_per_kind, seed)
    marker = root / _MARKER
    if marker.is_file():
        try:
            found: Any = json.loads(marker.read_text())
        except (OSError, ValueError):
            found = None
        if found == args and (root / "ground_truth.parquet").is_file():
            return _result(root, classes)
        marker.unlink()
        shutil.rmtree(root / "images", ignore_errors=True)
        (root / "ground_truth.parquet").unlink(missing_ok=True)
    elif (root / "images").exists():
        raise FileExistsError(f"{root / 'images'} exists and was not written by generate_labeled_demo")

    rng = np.random.default_rng(seed)
    rows: list[dict[str, Any]] = []
    train_files: list[tuple[str, str, bytes]] = []  # (image_id, label, bytes)
    counters = {(split, label): 0 for split in SPLITS for label in classes}

    def write(split: str, label: str, data: bytes, ext: str, leak_of: str | None, kind: str | None) -> str:
        index = counters[(split, label)]
        counters[(split, label)] += 1
        name = f"{label}_{index:04d}.{ext}"
        path = root / "images" / split / label / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        image_id = image_id_of(split, label, name)
        rows.append(
            {
                "image_id": image_id,
                "rel_path": f"{split}/{label}/{name}",
                "split": split,
                "label": label,
                "leak_of": leak_of,
                "leak_kind": kind,
            }
        )
        return image_id

    photo_dir = _photo_dir()
    for label in classes:
        with Image.open(photo_dir / CLASS_PHOTOS[label]) as opened:
            photo = opened.convert("RGB")
        taken: list[tuple[float, ...]] = []
        for split, count in (("train", per_class), ("test", test_per_class)):
            for _ in range(count):
                view = _render_view(photo, rng, taken)
                data = _encode(view, "jpg", int(rng.integers(88, 96)))
                image_id = write(split, label, data, "jpg", None, None)
                if split == "train":
                    train_files.append((image_id, label, data))

    # leaks: distinct train sources, drawn once for all kinds
    sources = rng.choice(len(train_files), size=leaks_per_kind * len(LEAK_KINDS), replace=False)
    for position, source in enumerate(sources):
        kind = LEAK_KINDS[position % len(LEAK_KINDS)]
        source_id, label, data = train_files[int(source)]
        leak, ext = _leak_bytes(kind, data, rng)
        write("test", label, leak, ext, source_id, kind)

    frame = pl.DataFrame(rows, schema=GROUND_TRUTH_SCHEMA).sort("image_id")
    with atomic_path(root / "ground_truth.parquet") as tmp:
        frame.write_parquet(tmp, statistics=False)
    write_text(marker, json.dumps(args, sort_keys=True, indent=2) + "\n")  # last: it says "complete"
    return _result(root, classes)


__all__ = [
    "CLASS_PHOTOS",
    "GROUND_TRUTH_SCHEMA",
    "LEAK_KINDS",
    "LabeledDemo",
    "generate_labeled_demo",
    "image_id_of",
]
