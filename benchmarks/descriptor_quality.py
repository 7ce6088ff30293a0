"""Quality and speed of the built-in weight-free descriptor on a generated demo pool.

    python benchmarks/descriptor_quality.py [--demo DIR] [--images N] [--seed S] [--stress N]

Generates a demo pool (1500 images by default; ``--demo`` reuses or creates one in DIR),
embeds every photo-like image and the category example images with the descriptor, centres
the vectors on the pool's mean and L2-normalises them (what the near-duplicate search does),
then reports cosine distances:

- ``near_duplicates``: ROC AUC of planted near duplicates (image vs its source) against
  random pairs of different bases, overall and per transform (with median / max distance
  and the share whose nearest base is their source); byte, pixel, rotated and quality
  copies are listed for information;
- ``content_grouping``: per unwanted category, the min distance of each image to the
  category's 8 examples, members against natural photos (bases): AUC, the threshold for
  90% recall and the photo false-positive rate there, the threshold for a 5% photo rate
  and the recall there, and their midpoint with its recall and photo rate;
- ``stress`` (``--stress N`` > 0): transforms the demo does not plant (heavier crops,
  tilts, gamma, greyscale, padding, rotations...) applied to N bases: median distance, AUC
  against random pairs, and the share found as the nearest base;
- ``speed``: forward-pass throughput, batch 64, float32, one CPU thread.

Prints one JSON object to stdout; logs go to stderr.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the package importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import polars as pl
import torch
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from curation_assets.core.embed.descriptor import (
    DESCRIPTOR_INPUT_SIZE,
    ImageDescriptor,
    descriptor_preprocessing,
)
from curation_assets.core.ingest.images import load_rgb, read_bytes
from curation_assets.demo.pool import CATEGORIES, generate_demo

PHOTO_KINDS = ("base", "byte_copy", "pixel_copy", "near_duplicate", "rotated_copy", "quality", "unwanted")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def roc_auc(positives: np.ndarray, negatives: np.ndarray) -> float:
    """P(a positive's distance < a negative's), ties counted half (Mann-Whitney U)."""
    pos = np.asarray(positives, dtype=np.float64)
    neg = np.sort(np.asarray(negatives, dtype=np.float64))
    below = np.searchsorted(neg, pos, side="left")
    at_or_below = np.searchsorted(neg, pos, side="right")
    return float(((len(neg) - at_or_below) + 0.5 * (at_or_below - below)).sum() / (len(pos) * len(neg)))


def _r(value: float) -> float:
    return round(float(value), 4)


class Embedder:
    def __init__(self) -> None:
        self.model = ImageDescriptor().eval()
        self.pre = descriptor_preprocessing()

    def pixels(self, image: Image.Image) -> np.ndarray:
        return np.asarray(self.pre.apply(image.convert("RGB")))

    def load(self, path: Path) -> np.ndarray:
        size = self.pre.draft_size(DESCRIPTOR_INPUT_SIZE, DESCRIPTOR_INPUT_SIZE)
        return self.pixels(load_rgb(read_bytes(str(path)), draft_size=size))

    def __call__(self, pixels: np.ndarray, batch: int = 256) -> np.ndarray:
        out = []
        with torch.no_grad():
            for i in range(0, len(pixels), batch):
                x = torch.from_numpy(pixels[i : i + batch]).permute(0, 3, 1, 2).float() / 255.0
                out.append(self.model(x).double().numpy())
        return np.concatenate(out)


def _jpeg(image: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=quality)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def _crop(image: Image.Image, f: float, sides: str = "lrtb") -> Image.Image:
    w, h = image.size
    dx, dy = round(f * w), round(f * h)
    box = (dx if "l" in sides else 0, dy if "t" in sides else 0)
    box += (w - dx if "r" in sides else w, h - dy if "b" in sides else h)
    return image.crop(box)


def _noise(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    a = np.asarray(image, dtype=np.float32) + rng.normal(0, 10, (image.height, image.width, 3))
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


STRESS: dict[str, Callable[[Image.Image, np.random.Generator], Image.Image]] = {
    "jpeg_q20": lambda im, rng: _jpeg(im, 20),
    "downscale_x0.25": lambda im, rng: im.resize((max(32, im.width // 4), max(32, im.height // 4))),
    "aspect_x1.3": lambda im, rng: im.resize((round(im.width * 1.3), im.height)),
    "noise_sigma10": _noise,
    "blur_r2": lambda im, rng: im.filter(ImageFilter.GaussianBlur(2)),
    "crop_5pct_each_side": lambda im, rng: _crop(im, 0.05),
    "crop_10pct_each_side": lambda im, rng: _crop(im, 0.10),
    "crop_15pct_each_side": lambda im, rng: _crop(im, 0.15),
    "crop_20pct_each_side": lambda im, rng: _crop(im, 0.20),
    "crop_20pct_left": lambda im, rng: _crop(im, 0.20, "l"),
    "tilt_3deg": lambda im, rng: im.rotate(3, Image.Resampling.BILINEAR),
    "tilt_8deg": lambda im, rng: im.rotate(8, Image.Resampling.BILINEAR),
    "gamma_0.6": lambda im, rng: im.point(lambda v: round(255 * (v / 255) ** 0.6)),
    "brightness_x1.4": lambda im, rng: ImageEnhance.Brightness(im).enhance(1.4),
    "contrast_x0.6": lambda im, rng: ImageEnhance.Contrast(im).enhance(0.6),
    "saturation_x0.3": lambda im, rng: ImageEnhance.Color(im).enhance(0.3),
    "greyscale": lambda im, rng: im.convert("L").convert("RGB"),
    "hflip_crop5_jpeg40": lambda im, rng: _jpeg(_crop(ImageOps.mirror(im), 0.05), 40),
    "black_border_10pct": lambda im, rng: ImageOps.expand(im, border=round(0.1 * im.width), fill=(0, 0, 0)),
    "vflip": lambda im, rng: ImageOps.flip(im),
    "rot90": lambda im, rng: im.transpose(Image.Transpose.ROTATE_90),
    "rot180": lambda im, rng: im.transpose(Image.Transpose.ROTATE_180),
}


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--demo", type=Path, help="demo folder to reuse or create (default: a temp folder)")
    parser.add_argument("--images", type=int, default=1500)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--stress", type=int, default=250, help="bases to stress-test (0: skip)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        out_dir = args.demo or Path(tmp) / "demo"
        log(f"demo pool: {args.images} images in {out_dir}")
        summary = generate_demo(out_dir, n_images=args.images, n_shards=args.shards, seed=args.seed)
        return evaluate(summary, args)


def evaluate(summary, args) -> dict:
    embed = Embedder()
    gt = pl.read_parquet(summary.ground_truth_path).filter(pl.col("kind").is_in(PHOTO_KINDS))
    rows = gt.to_dicts()
    row_of = {r["image_id"]: i for i, r in enumerate(rows)}
    t0 = time.perf_counter()
    pixels = np.stack([embed.load(summary.images_root / r["image_id"]) for r in rows])
    log(f"decoded {len(rows)} images in {time.perf_counter() - t0:.1f}s")
    raw = embed(pixels)
    mean = raw.mean(0)

    def centre(v: np.ndarray) -> np.ndarray:
        v = v - mean
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    v = centre(raw)
    bases = np.array([i for i, r in enumerate(rows) if r["kind"] == "base"])
    rng = np.random.default_rng(0)
    a, b = rng.choice(bases, 40000), rng.choice(bases, 40000)
    keep = a != b
    negatives = 1.0 - (v[a[keep]] * v[b[keep]]).sum(1)

    # -- copies against their sources
    groups: dict[str, list[tuple[float, bool]]] = {}
    for r in rows:
        if r["source_id"] is None:
            continue
        i, j = row_of[r["image_id"]], row_of[r["source_id"]]
        nearest = bases[int(np.argmax(v[bases] @ v[i]))] == j
        key = r["kind"] if r["kind"] == "byte_copy" else f"{r['kind']}:{r['transform']}"
        groups.setdefault(key, []).append((1.0 - float(v[i] @ v[j]), bool(nearest)))
    per_group = {}
    for key, values in sorted(groups.items()):
        d = np.array([t[0] for t in values])
        per_group[key] = {
            "n": len(d),
            "auc": _r(roc_auc(d, negatives)),
            "median": _r(np.median(d)),
            "max": _r(d.max()),
            "nearest_is_source": _r(np.mean([t[1] for t in values])),
        }
    near = np.concatenate(
        [[t[0] for t in values] for key, values in groups.items() if key.startswith("near_duplicate:")]
    )
    report: dict = {
        "descriptor": {"dim": int(raw.shape[1]), "input_size": DESCRIPTOR_INPUT_SIZE},
        "demo": {"images": args.images, "seed": args.seed, "embedded": len(rows), "bases": len(bases)},
        "random_base_pairs": {
            "n": len(negatives),
            "median": _r(np.median(negatives)),
            "q001": _r(np.quantile(negatives, 0.001)),
            "q01": _r(np.quantile(negatives, 0.01)),
            "q05": _r(np.quantile(negatives, 0.05)),
        },
        "near_duplicates": {"auc": _r(roc_auc(near, negatives)), "max": _r(near.max()), "by_kind": per_group},
    }

    # -- content grouping by example images
    content = {}
    for cat in CATEGORIES:
        examples = centre(
            embed(np.stack([embed.load(p) for p in sorted((summary.examples_root / cat).iterdir())]))
        )
        members = [i for i, r in enumerate(rows) if r["kind"] == "unwanted" and r["category"] == cat]
        d_members = (1.0 - v[members] @ examples.T).min(1)
        d_photos = (1.0 - v[bases] @ examples.T).min(1)
        for_recall = float(np.quantile(d_members, 0.9, method="higher"))
        for_fpr = float(np.quantile(d_photos, 0.05, method="lower"))
        mid = (for_recall + for_fpr) / 2
        content[cat] = {
            "n": len(members),
            "auc": _r(roc_auc(d_members, d_photos)),
            "threshold_recall_90": _r(for_recall),
            "photo_fpr_there": _r((d_photos <= for_recall).mean()),
            "threshold_photo_fpr_5": _r(for_fpr),
            "recall_there": _r((d_members < for_fpr).mean()),
            "midpoint": _r(mid),
            "recall_midpoint": _r((d_members <= mid).mean()),
            "photo_fpr_midpoint": _r((d_photos <= mid).mean()),
        }
    report["content_grouping"] = content

    # -- stress transforms the demo does not plant
    if args.stress > 0:
        n = min(args.stress, len(bases))
        chosen = rng.choice(bases, n, replace=False)
        originals = [load_rgb(read_bytes(str(summary.images_root / rows[i]["image_id"]))) for i in chosen]
        q01 = np.quantile(negatives, 0.01)
        stress = {}
        for name, transform in STRESS.items():
            t = centre(embed(np.stack([embed.pixels(transform(im, rng)) for im in originals])))
            d = 1.0 - (t * v[chosen]).sum(1)
            nearest = bases[np.argmax(t @ v[bases].T, axis=1)] == chosen
            stress[name] = {
                "median": _r(np.median(d)),
                "auc": _r(roc_auc(d, negatives)),
                "below_random_q01": _r((d < q01).mean()),
                "nearest_is_source": _r(nearest.mean()),
            }
        report["stress"] = stress

    report["speed"] = speed(embed.model)
    return report


def speed(model: torch.nn.Module, batch: int = 64, repeat: int = 20) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x = torch.rand(batch, 3, DESCRIPTOR_INPUT_SIZE, DESCRIPTOR_INPUT_SIZE)
        best = float("inf")
        with torch.no_grad():
            model(x)
            for _ in range(3):
                t0 = time.perf_counter()
                for _ in range(repeat):
                    model(x)
                best = min(best, time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    return {"images_per_s_one_thread": round(batch * repeat / best), "batch": batch, "dtype": "float32"}


if __name__ == "__main__":
    print(json.dumps(main(), indent=1))
