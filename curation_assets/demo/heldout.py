"""A held-out near-duplicate corpus: other bases and other edits than the demo pool plants.

The demo pool (:mod:`curation_assets.demo.pool`) is what the built-in descriptor was first
tuned on, so its planted copies cannot tell how the descriptor does on edits it has not
seen. :func:`generate_heldout` writes a corpus that shares none of its edits:

- **bases** (``n_bases``, every one at least 400 px on its shorter side): crops of the
  photos that installed packages ship (scikit-image's sample data and matplotlib's
  ``grace_hopper.jpg``; the grey ones tinted with a random two-colour ramp) and generated
  scenes (sky gradient, a textured terrain line, shaded shapes, grain). Crops of one photo
  overlap by at most ``_MAX_IOU`` so two bases are never an unlabelled near duplicate.
- **copies**: two per base, by two different edits of :data:`HELDOUT_TRANSFORMS`, cycled so
  that every edit gets the same number of copies: letterbox bars, greyscale, a +-3 degree
  rotation (black corners, as a plain rotate leaves them), a corner watermark box, Gaussian
  blur, JPEG quality 30, a 0.88 vertical squash, saturation x1.6, and 4x down then up.
- **hard negatives**: pairs of adjacent tiles of one photo (the two halves of one window):
  same colours, textures and light, different content. No pair may be grouped.

Everything comes from ``numpy.random.default_rng(seed)``; no file carries a time stamp.
Pure library: no Dagster import.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import polars as pl
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageOps

MIN_SIDE = 400  # every base and tile is at least this large on its shorter side
HELDOUT_TRANSFORMS: tuple[str, ...] = (
    "letterbox",
    "grayscale",
    "rotate_3deg",
    "corner_watermark",
    "gaussian_blur",
    "jpeg_q30",
    "squash_0.88",
    "saturation_1.6",
    "down4_up",
)
_MAX_IOU = 0.12  # crops of one photo overlap at most this much (bounding-box IoU)

# (package, path inside it): photos with content over most of the frame. The stereo pair's
# right view is left out (it is a near duplicate of the left one), so are drawings and scans.
_PHOTOS: tuple[tuple[str, str], ...] = (
    ("skimage", "data/astronaut.png"),
    ("skimage", "data/brick.png"),
    ("skimage", "data/camera.png"),
    ("skimage", "data/chelsea.png"),
    ("skimage", "data/coffee.png"),
    ("skimage", "data/coins.png"),
    ("skimage", "data/grass.png"),
    ("skimage", "data/gravel.png"),
    ("skimage", "data/hubble_deep_field.jpg"),
    ("skimage", "data/ihc.png"),
    ("skimage", "data/motorcycle_left.png"),
    ("skimage", "data/rocket.jpg"),
    ("skimage", "data/moon.png"),
    ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
)

GROUND_TRUTH_SCHEMA = {
    "image_id": pl.Utf8,
    "kind": pl.Utf8,  # base | copy | tile
    "family": pl.Utf8,  # a base and its copies share one; each tile is its own
    "source_id": pl.Utf8,  # copies: their base
    "transform": pl.Utf8,  # copies: the edit
    "tile_pair": pl.Int64,  # tiles: the pair they belong to
    "origin": pl.Utf8,  # photo name or "generated"
    "width": pl.Int64,
    "height": pl.Int64,
}


@dataclass(frozen=True)
class HeldoutCorpus:
    """Where a generated held-out corpus lies and what it holds."""

    images_root: Path
    ground_truth_path: Path
    n_bases: int
    n_copies: int
    n_tile_pairs: int

    def truth(self) -> pl.DataFrame:
        return pl.read_parquet(self.ground_truth_path)


def _package_dir(package: str) -> Path | None:
    spec = find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


@cache
def _photos() -> dict[str, Image.Image]:
    """Name -> RGB photo, for every listed photo whose package is installed."""
    found = {}
    for package, rel in _PHOTOS:
        root = _package_dir(package)
        if root is None or not (root / rel).exists():
            continue
        with Image.open(root / rel) as im:
            found[Path(rel).name] = im.convert("RGB") if im.mode != "L" else im.convert("L")
    if len(found) < 4:
        raise RuntimeError("the held-out corpus needs scikit-image's sample photos (install scikit-image)")
    return found


# ----------------------------------------------------------------------------- bases


def _tint(grey: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A grey photo coloured through a random dark-to-light two-colour ramp (a duotone)."""
    dark = rng.uniform(0, 90, 3)
    light = rng.uniform(150, 255, 3)
    t = np.asarray(grey, dtype=np.float32)[..., None] / 255.0
    return Image.fromarray(np.clip(dark + (light - dark) * t, 0, 255).astype(np.uint8))


def _smooth_field(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Smooth random values in [0, 1]: a cells x cells grid upsampled bicubically."""
    grid = rng.random((cells, cells)).astype(np.float32)
    field = np.asarray(Image.fromarray(grid, mode="F").resize((w, h), Image.Resampling.BICUBIC))
    lo, hi = field.min(), field.max()
    return (field - lo) / max(hi - lo, 1e-6)


def _scene(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """A generated scene: sky gradient, textured terrain below a random line, shaded shapes, grain."""
    w, h = size
    top, bottom = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    ramp = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]
    sky = top + (bottom - top) * ramp
    sky = sky + 40 * (_smooth_field(rng, h, w, int(rng.integers(3, 7)))[..., None] - 0.5)
    canvas = np.broadcast_to(sky, (h, w, 3)).copy()
    # terrain: below a smooth random line, a textured colour
    line = h * (0.35 + 0.45 * _smooth_field(rng, 1, w, int(rng.integers(3, 9)))[0])
    below = np.arange(h, dtype=np.float32)[:, None] > line[None, :]
    ground = rng.uniform(0, 255, 3) + 70 * (
        _smooth_field(rng, h, w, int(rng.integers(8, 30)))[..., None] - 0.5
    )
    canvas = np.where(below[..., None], ground, canvas)
    image = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(2, 7))):
        cx, cy = rng.uniform(0.05, 0.95) * w, rng.uniform(0.05, 0.95) * h
        rx, ry = rng.uniform(0.04, 0.22) * w, rng.uniform(0.04, 0.22) * h
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        shape = int(rng.integers(3))
        if shape == 0:
            draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=colour)
        elif shape == 1:
            draw.rectangle((cx - rx, cy - ry, cx + rx, cy + ry), fill=colour)
        else:
            angles = np.sort(rng.uniform(0, 2 * np.pi, int(rng.integers(3, 7))))
            draw.polygon([(cx + rx * np.cos(a), cy + ry * np.sin(a)) for a in angles], fill=colour)
    image = image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.5, 1.5))))
    grain = rng.normal(0, rng.uniform(2, 7), (h, w, 1)).astype(np.float32)
    return Image.fromarray(np.clip(np.asarray(image, dtype=np.float32) + grain, 0, 255).astype(np.uint8))


class _Windows:
    """Crop windows of the photos, each overlapping earlier windows of its photo by <= _MAX_IOU."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.photos = _photos()
        self.names = sorted(self.photos)
        self.taken: dict[str, list[tuple[float, float, float, float]]] = {n: [] for n in self.names}

    def pick(self, aspect: float, scale: tuple[float, float]) -> tuple[str, tuple[int, int, int, int]] | None:
        for _ in range(60):
            name = self.names[int(self.rng.integers(len(self.names)))]
            pw, ph = self.photos[name].size
            side = self.rng.uniform(*scale) * min(pw, ph)
            cw, ch = (side * aspect, side) if aspect >= 1 else (side, side / aspect)
            if cw > pw or ch > ph:
                continue
            x0, y0 = self.rng.uniform(0, pw - cw), self.rng.uniform(0, ph - ch)
            box = (x0, y0, x0 + cw, y0 + ch)
            if all(_iou(box, other) <= _MAX_IOU for other in self.taken[name]):
                self.taken[name].append(box)
                return name, tuple(round(v) for v in box)  # type: ignore[return-value]
        return None


def _iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _upright(crop: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A crop scaled so that its shorter side is 400-560 px, grey photos tinted."""
    if crop.mode == "L":
        crop = _tint(crop, rng)
    short = int(rng.integers(MIN_SIDE, 561))
    scale = short / min(crop.size)
    return crop.resize((round(crop.width * scale), round(crop.height * scale)), Image.Resampling.BICUBIC)


# ----------------------------------------------------------------------------- edits


def _jpeg_roundtrip(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    buffer.seek(0)
    with Image.open(buffer) as im:
        return im.convert("RGB")


def _letterbox(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Bars on the two sides across the longer dimension (pillarbox for portrait), 8-20% each."""
    fill = (0, 0, 0) if rng.random() < 0.7 else ((255, 255, 255) if rng.random() < 0.5 else (18, 18, 18))
    bar = float(rng.uniform(0.08, 0.2))
    w, h = image.size
    if w >= h:
        pad = round(bar * h)
        return ImageOps.expand(image, border=(0, pad, 0, pad), fill=fill)
    pad = round(bar * w)
    return ImageOps.expand(image, border=(pad, 0, pad, 0), fill=fill)


def _watermark(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A dark translucent box with white text in one corner, 18-28% wide and 7-11% high."""
    w, h = image.size
    bw, bh = round(rng.uniform(0.18, 0.28) * w), round(rng.uniform(0.07, 0.11) * h)
    margin = round(0.02 * min(w, h))
    corner = int(rng.integers(4))
    x0 = margin if corner in (0, 2) else w - margin - bw
    y0 = margin if corner in (0, 1) else h - margin - bh
    overlay = Image.new("RGBA", image.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    draw.rectangle((x0, y0, x0 + bw, y0 + bh), fill=(20, 20, 20, int(rng.integers(150, 220))))
    draw.text((x0 + 6, y0 + bh // 3), "(c) sample stock", fill=(255, 255, 255, 255))
    return Image.alpha_composite(image.convert("RGBA"), overlay).convert("RGB")


def _rotate(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    angle = 3.0 if rng.random() < 0.5 else -3.0
    return image.rotate(angle, Image.Resampling.BILINEAR, expand=False)


def _down_up(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    small = image.resize((image.width // 4, image.height // 4), Image.Resampling.BILINEAR)
    return small.resize(image.size, Image.Resampling.BICUBIC)


EDITS: dict[str, Callable[[Image.Image, np.random.Generator], Image.Image]] = {
    "letterbox": _letterbox,
    "grayscale": lambda im, rng: im.convert("L"),
    "rotate_3deg": _rotate,
    "corner_watermark": _watermark,
    "gaussian_blur": lambda im, rng: im.filter(ImageFilter.GaussianBlur(float(rng.uniform(1.5, 2.5)))),
    "jpeg_q30": lambda im, rng: im,  # the edit is the save at quality 30
    "squash_0.88": lambda im, rng: im.resize((im.width, round(im.height * 0.88)), Image.Resampling.BICUBIC),
    "saturation_1.6": lambda im, rng: ImageEnhance.Color(im).enhance(1.6),
    "down4_up": _down_up,
}
assert tuple(EDITS) == HELDOUT_TRANSFORMS


# ----------------------------------------------------------------------------- corpus


def generate_heldout(
    out_dir: str | Path,
    n_bases: int = 150,
    n_tile_pairs: int = 30,
    seed: int = 11,
    photo_share: float = 0.5,
) -> HeldoutCorpus:
    """Write the corpus to ``out_dir/images`` (JPEG) and its ground truth to ``out_dir/truth.parquet``.

    Tile pairs come first (up to ``n_tile_pairs``, as many as fit: 21 with the defaults), then
    ``photo_share`` of the bases are photo crops (as many as fit without overlap: 39 of 150
    with the defaults), the rest generated scenes. Copy ``k`` of base ``i`` gets edit
    ``HELDOUT_TRANSFORMS[(2 i + k) % 9]``, so every edit is applied equally often and a base's
    two copies differ.
    """
    rng = np.random.default_rng(seed)
    out = Path(out_dir)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    windows = _Windows(rng)
    rows: list[dict] = []

    def save(image: Image.Image, image_id: str, quality: int = 92, **row: object) -> None:
        image.save(images / image_id, "JPEG", quality=quality)
        rows.append({"image_id": image_id, "width": image.width, "height": image.height, **row})

    # tiles first: they need the largest windows, which later crops would fragment
    made_tiles = 0
    for pair in range(n_tile_pairs):
        wide = rng.random() < 0.5
        picked = windows.pick(2.0 if wide else 0.5, (0.42, 0.6))
        if picked is None:
            break
        name, (x0, y0, x1, y1) = picked
        photo = windows.photos[name]
        if wide:
            mid = (x0 + x1) // 2
            halves = [photo.crop((x0, y0, mid, y1)), photo.crop((mid, y0, x1, y1))]
        else:
            mid = (y0 + y1) // 2
            halves = [photo.crop((x0, y0, x1, mid)), photo.crop((x0, mid, x1, y1))]
        tone = int(rng.integers(2**32))
        for half, tile in zip("ab", halves, strict=True):
            # one seed for both tiles: the same tint and size, as the halves of one photo share them
            image = _upright(tile, np.random.default_rng(tone))
            image_id = f"tile_{pair:03d}{half}.jpg"
            save(image, image_id, kind="tile", family=image_id, tile_pair=pair, origin=name)
        made_tiles += 1

    for i in range(n_bases):
        image_id = f"base_{i:04d}.jpg"
        aspect = float(np.exp(rng.uniform(np.log(0.7), np.log(1.5))))
        picked = windows.pick(aspect, (0.3, 0.45)) if rng.random() < photo_share else None
        if picked is not None:
            name, box = picked
            base = _upright(windows.photos[name].crop(box), rng)
            origin = name
        else:
            short = int(rng.integers(MIN_SIDE, 561))
            size = (round(short * aspect), short) if aspect >= 1 else (short, round(short / aspect))
            base, origin = _scene(rng, size), "generated"
        save(base, image_id, kind="base", family=image_id, origin=origin)
        for k in range(2):
            transform = HELDOUT_TRANSFORMS[(2 * i + k) % len(HELDOUT_TRANSFORMS)]
            copy = EDITS[transform](base, rng)
            copy_id = f"copy_{i:04d}_{transform}.jpg"
            quality = 30 if transform == "jpeg_q30" else int(rng.integers(85, 95))
            save(
                copy,
                copy_id,
                quality=quality,
                kind="copy",
                family=image_id,
                source_id=image_id,
                transform=transform,
                origin=origin,
            )

    truth_path = out / "truth.parquet"
    pl.DataFrame(rows, schema=GROUND_TRUTH_SCHEMA).write_parquet(truth_path)
    return HeldoutCorpus(images, truth_path, n_bases, 2 * n_bases, made_tiles)


# ----------------------------------------------------------------------------- scoring


def centred(vectors: np.ndarray) -> np.ndarray:
    """Rows minus their mean, L2-normalised: what the near-duplicate search compares."""
    v = np.asarray(vectors, dtype=np.float64)
    v = v - v.mean(0)
    return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)


def score_pairs(truth: pl.DataFrame, image_ids: list[str], vectors: np.ndarray, threshold: float) -> dict:
    """Pair recall and precision of 'cosine distance < threshold' on centred ``vectors``.

    True pairs are a base with each of its copies (counted per edit) and the two copies of a
    base with each other; every other pair under the threshold is a false one. Also: the best
    recall any threshold reaches at precision >= 0.98, and the tile pairs (hard negatives)
    under the threshold.
    """
    v = centred(vectors)
    return score_distances(truth, image_ids, 1.0 - v @ v.T, threshold)


def score_distances(
    truth: pl.DataFrame, image_ids: list[str], distance: np.ndarray, threshold: float
) -> dict:
    """:func:`score_pairs` on a symmetric matrix of pair distances (any measure, e.g. Hamming)."""
    row = {image_id: i for i, image_id in enumerate(image_ids)}
    family = dict(zip(truth["image_id"], truth["family"], strict=True))
    fam = np.array([family[i] for i in image_ids])
    same = fam[:, None] == fam[None, :]
    upper = np.triu(np.ones_like(same), 1)
    d_all = distance[upper]
    same_all = same[upper]
    under = d_all < threshold
    copies = truth.filter(pl.col("kind") == "copy")
    per_transform: dict[str, dict] = {}
    for transform in HELDOUT_TRANSFORMS:
        d = np.array(
            [
                distance[row[c], row[s]]
                for c, s in zip(
                    copies.filter(pl.col("transform") == transform)["image_id"],
                    copies.filter(pl.col("transform") == transform)["source_id"],
                    strict=True,
                )
            ]
        )
        if len(d):
            per_transform[transform] = {
                "n": len(d),
                "recall": round(float((d < threshold).mean()), 4),
                "median": round(float(np.median(d)), 4),
                "max": round(float(d.max()), 4),
            }
    base_copy = np.array(
        [distance[row[c], row[s]] for c, s in zip(copies["image_id"], copies["source_id"], strict=True)]
    )
    tiles = truth.filter(pl.col("kind") == "tile").sort("image_id")
    tile_d = np.array(
        [
            distance[row[a], row[b]]
            for a, b in zip(tiles["image_id"][0::2], tiles["image_id"][1::2], strict=True)
        ]
    )
    # best recall at precision >= 0.98, over every threshold (distances sorted ascending)
    order = np.argsort(d_all, kind="stable")
    hits = np.cumsum(same_all[order])
    precision = hits / np.arange(1, len(order) + 1)
    n_true = int(same_all.sum())
    ok = np.flatnonzero(precision >= 0.98)
    best = {"recall": 0.0, "threshold": None}
    if len(ok):
        k = int(ok[np.argmax(hits[ok])])
        best = {"recall": round(float(hits[k] / n_true), 4), "threshold": round(float(d_all[order[k]]), 4)}
    negatives = d_all[~same_all]
    return {
        "threshold": threshold,
        "images": len(image_ids),
        "true_pairs": n_true,
        "pair_recall": round(float((under & same_all).sum() / max(n_true, 1)), 4),
        "precision": round(float((under & same_all).sum() / max(under.sum(), 1)), 4),
        "false_pairs": int((under & ~same_all).sum()),
        "base_copy_recall": round(float((base_copy < threshold).mean()), 4),
        "copy_copy_recall": round(
            float((same_all & under).sum() - (base_copy < threshold).sum()) / max(n_true - len(base_copy), 1),
            4,
        ),
        "per_transform": per_transform,
        "best_recall_at_precision_0.98": best,
        "hard_negatives": {
            "pairs": len(tile_d),
            "grouped": int((tile_d < threshold).sum()),
            "min_distance": round(float(tile_d.min()), 4) if len(tile_d) else None,
        },
        "unrelated_q001": round(float(np.quantile(negatives, 0.001)), 4),
    }
