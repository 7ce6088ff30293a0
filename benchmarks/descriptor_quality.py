"""Quality and speed of the built-in weight-free descriptor on the demo pool and a held-out corpus.

    python benchmarks/descriptor_quality.py [--demo DIR] [--images N] [--seed S] [--stress N]
        [--heldout-bases N] [--threshold T]

Two corpora, each embedded as the pipeline does (JPEG draft decode, the copy variant's
preprocessing with its border crop), centred on its own mean and L2-normalised:

- ``heldout``: :mod:`curation_assets.demo.heldout` (150 bases >= 400 px by default, two
  copies each by edits the demo does not plant, adjacent-tile hard negatives): pair recall
  and precision at ``--threshold`` (the demo project's near-duplicate threshold, 0.1),
  recall per edit, the best recall at precision >= 0.98, hard-negative pairs grouped;
- ``demo_pairs``: the same pair scoring on the demo pool's planted copies (near duplicates
  per transform, byte and pixel copies), every other pair of its photo-like images counting
  as a false one unless both derive from one base.

Both also score ``dct_hash_dihedral``, a reference that is not part of the project: a DCT
perceptual hash (pHash as published) matched over 8 dihedral orientations, as PDQ-based
tools match, at <= 10 of 64 bits; on the held-out corpus also ``pdq_dihedral`` (Meta's PDQ
through the pdqhash package, <= 31 of 256 bits) when pdqhash is installed.

Then, on the demo pool only (``--heldout-bases 0`` skips the held-out corpus):

Generates a demo pool (1500 images by default; ``--demo`` reuses or creates one in DIR),
embeds every photo-like image and the category example images with the descriptor, centres
the vectors on the pool's mean and L2-normalises them (what the near-duplicate search does),
then reports cosine distances:

- ``near_duplicates``: ROC AUC of planted near duplicates (image vs its source) against
  random pairs of different bases, overall and per transform (with median / max distance
  and the share whose nearest base is their source); byte, pixel, rotated and quality
  copies are listed for information;
- ``content_grouping`` (the ``content`` variant): per unwanted category, the min distance of each image to the
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
    VARIANT_VERSIONS,
    ImageDescriptor,
    descriptor_preprocessing,
)
from curation_assets.core.ingest.images import load_rgb, read_bytes
from curation_assets.demo.heldout import (
    HELDOUT_TRANSFORMS,
    centred,
    generate_heldout,
    score_distances,
    score_pairs,
)
from curation_assets.demo.pool import CATEGORIES, NEAR_DUPLICATE_TRANSFORMS, generate_demo

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
    def __init__(self, variant: str = "copy") -> None:
        self.model = ImageDescriptor(variant).eval()
        self.pre = descriptor_preprocessing(variant)

    def pixels(self, image: Image.Image) -> np.ndarray:
        # to_tensor, as the decode workers call it (the copy variant crops borders there)
        return self.pre.to_tensor(image.convert("RGB")).permute(1, 2, 0).numpy()

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
    parser.add_argument("--heldout-bases", type=int, default=150, help="held-out corpus bases (0: skip)")
    parser.add_argument("--heldout-seed", type=int, default=11)
    parser.add_argument("--threshold", type=float, default=0.1, help="cosine distance for pair scoring")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        out_dir = args.demo or Path(tmp) / "demo"
        log(f"demo pool: {args.images} images in {out_dir}")
        summary = generate_demo(out_dir, n_images=args.images, n_shards=args.shards, seed=args.seed)
        report = {}
        if args.heldout_bases > 0:
            log(f"held-out corpus: {args.heldout_bases} bases")
            corpus = generate_heldout(
                Path(tmp) / "heldout", n_bases=args.heldout_bases, seed=args.heldout_seed
            )
            report["heldout"] = evaluate_heldout(corpus, args.threshold)
        return {**report, **evaluate(summary, args)}


def evaluate_heldout(corpus, threshold: float) -> dict:
    """Pair recall / precision of the held-out corpus at ``threshold``, per edit."""
    embed = Embedder()
    truth = corpus.truth()
    ids = truth["image_id"].to_list()
    t0 = time.perf_counter()
    raw = embed(np.stack([embed.load(corpus.images_root / i) for i in ids]))
    log(f"held-out: embedded {len(ids)} images in {time.perf_counter() - t0:.1f}s")
    scored = score_pairs(truth, ids, raw, threshold)
    scored["edits"] = list(HELDOUT_TRANSFORMS)
    images = [load_rgb(read_bytes(str(corpus.images_root / i))) for i in ids]
    bits = np.stack([dct_hash_bits(image) for image in images])
    report = {
        "descriptor": scored,
        "dct_hash_dihedral": score_distances(truth, ids, hamming(bits), HASH_THRESHOLD),
    }
    pdq = pdq_bits(images)
    if pdq is not None:
        report["pdq_dihedral"] = score_distances(truth, ids, hamming(pdq), PDQ_THRESHOLD)
    return report


PDQ_THRESHOLD = 31.5 / 256  # PDQ's customary match distance: <= 31 of 256 bits


def pdq_bits(images: list[Image.Image]) -> np.ndarray | None:
    """N x 8 x 256: Meta's PDQ hashes of the 8 dihedral orientations, when pdqhash is installed.

    Another reference only (pdqhash builds from source, with a C++ compiler); absent, skipped.
    """
    try:
        import pdqhash
    except ImportError:
        log("pdqhash is not installed: no PDQ reference")
        return None
    return np.stack([np.stack(pdqhash.compute_dihedral(np.asarray(image))[0]) for image in images])


# A reference, not a model of the project: a DCT perceptual hash implemented here from its
# published description (Zauner 2010, "pHash": 32 x 32 luma, 2-D DCT-II, the 8 x 8 lowest
# frequencies thresholded at their median: 64 bits), matched over the 8 dihedral orientations
# of the query as PDQ-based tools do. Distances are Hamming / 64; pairs at <= 10 bits match.
HASH_THRESHOLD = 10.5 / 64


def dct_hash_bits(image: Image.Image) -> np.ndarray:
    """8 x 64 booleans: the hash of the image in each of its 8 dihedral orientations."""
    from scipy.fft import dctn

    grey = np.asarray(image.convert("L").resize((32, 32), Image.Resampling.BOX), dtype=np.float64)
    out = []
    for turns in range(4):
        for flip in (False, True):
            g = np.rot90(grey, turns)
            low = dctn(g[:, ::-1] if flip else g, type=2, norm="ortho")[:8, :8].reshape(-1)
            out.append(low > np.median(low[1:]))  # the DC term left out of the median
    return np.stack(out)


def hamming(bits: np.ndarray) -> np.ndarray:
    """N x N: min over the 8 orientations of one image against the other's upright hash, / bits."""
    n_bits = bits.shape[2]
    upright = bits[:, 0].astype(np.int32)
    best = np.full((len(bits), len(bits)), n_bits, dtype=np.int32)
    for k in range(bits.shape[1]):
        variant = bits[:, k].astype(np.int32)
        # Hamming distance through dot products: a.(1-b) + (1-a).b
        d = variant @ (1 - upright).T + (1 - variant) @ upright.T
        best = np.minimum(best, d)
    best = np.minimum(best, best.T)
    return best / float(n_bits)


def demo_pairs(rows: list[dict], distance: np.ndarray, threshold: float) -> dict:
    """Planted copies found at ``threshold`` (pairs under it), and how many pairs under it are wrong."""
    source = {r["image_id"]: r["source_id"] for r in rows}

    def root(image_id: str) -> str:
        while source.get(image_id):
            image_id = source[image_id]
        return image_id

    family = np.array([root(r["image_id"]) for r in rows])
    upper = np.triu_indices(len(rows), 1)
    under = distance[upper] < threshold
    same = (family[:, None] == family[None, :])[upper]
    row_of = {r["image_id"]: i for i, r in enumerate(rows)}
    found: dict[str, list[bool]] = {}
    for r in rows:
        if r["kind"] in ("near_duplicate", "byte_copy", "pixel_copy"):
            key = r["transform"] if r["kind"] == "near_duplicate" else r["kind"]
            hit = distance[row_of[r["image_id"]], row_of[r["source_id"]]] < threshold
            found.setdefault(key, []).append(bool(hit))
    planted = [hit for hits in found.values() for hit in hits]
    order = [*NEAR_DUPLICATE_TRANSFORMS, "byte_copy", "pixel_copy"]
    return {
        "threshold": threshold,
        "planted_recall": _r(np.mean(planted)),
        "precision": _r((under & same).sum() / max(under.sum(), 1)),
        "false_pairs": int((under & ~same).sum()),
        "per_transform": {
            k: {"n": len(found[k]), "recall": _r(np.mean(found[k]))} for k in order if k in found
        },
    }


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
        "descriptor": {
            "dim": int(raw.shape[1]),
            "input_size": DESCRIPTOR_INPUT_SIZE,
            "variant": embed.model.variant,
            "version": VARIANT_VERSIONS[embed.model.variant],
        },
        "demo_pairs": {
            "descriptor": demo_pairs(rows, 1.0 - centred(raw) @ centred(raw).T, args.threshold),
            "dct_hash_dihedral": demo_pairs(
                rows,
                hamming(
                    np.stack(
                        [
                            dct_hash_bits(load_rgb(read_bytes(str(summary.images_root / r["image_id"]))))
                            for r in rows
                        ]
                    )
                ),
                HASH_THRESHOLD,
            ),
        },
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

    # -- content grouping by example images, with the variant meant for it (as example filters use)
    content_embed = Embedder("content")
    content_raw = content_embed(
        np.stack([content_embed.load(summary.images_root / r["image_id"]) for r in rows])
    )
    content_mean = content_raw.mean(0)

    def centre_content(x: np.ndarray) -> np.ndarray:
        x = x - content_mean
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    vc = centre_content(content_raw)
    content = {}
    for cat in CATEGORIES:
        paths = sorted((summary.examples_root / cat).iterdir())
        examples = centre_content(content_embed(np.stack([content_embed.load(p) for p in paths])))
        members = [i for i, r in enumerate(rows) if r["kind"] == "unwanted" and r["category"] == cat]
        d_members = (1.0 - vc[members] @ examples.T).min(1)
        d_photos = (1.0 - vc[bases] @ examples.T).min(1)
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
