"""The weight-free descriptor: contract (shape, norm, determinism, autocast) and quality on the demo pool.

Quality is measured the way the pipeline uses the vectors: centred on the set's mean vector,
L2-normalised, compared by cosine distance. The measured values are printed (``pytest -s``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from curation_assets.core.embed.descriptor import (
    DESCRIPTOR_DIM,
    DESCRIPTOR_INPUT_SIZE,
    ImageDescriptor,
    descriptor_preprocessing,
)
from curation_assets.core.ingest.images import load_rgb, read_bytes
from curation_assets.demo.pool import CATEGORIES, NEAR_DUPLICATE_TRANSFORMS

KINDS = ("base", "byte_copy", "near_duplicate", "unwanted")


def roc_auc(positives: np.ndarray, negatives: np.ndarray) -> float:
    """P(a positive's distance < a negative's), ties counted half (Mann-Whitney U)."""
    pos = np.asarray(positives, dtype=np.float64)
    neg = np.sort(np.asarray(negatives, dtype=np.float64))
    below = np.searchsorted(neg, pos, side="left")
    at_or_below = np.searchsorted(neg, pos, side="right")
    greater = len(neg) - at_or_below
    return float((greater + 0.5 * (at_or_below - below)).sum() / (len(pos) * len(neg)))


def _load(path: Path, variant: str = "copy") -> np.ndarray:
    """The variant's model input, as the pipeline makes it (the copy variant crops borders)."""
    pre = descriptor_preprocessing(variant)
    image = load_rgb(
        read_bytes(str(path)), draft_size=pre.draft_size(DESCRIPTOR_INPUT_SIZE, DESCRIPTOR_INPUT_SIZE)
    )
    return np.asarray(pre.apply(image))


def _to_tensor(pixels: np.ndarray) -> torch.Tensor:
    """uint8 N x S x S x 3 -> float N x 3 x S x S in [0, 1], as the generic normalisation does."""
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255.0


@dataclass
class DemoVectors:
    rows: list[dict]
    row_of: dict[str, int]
    pixels: np.ndarray  # N x S x S x 3 uint8
    raw: np.ndarray  # N x D, as the descriptor returns them
    vectors: np.ndarray  # centred on the pool mean, unit length
    examples: dict[str, np.ndarray]  # category -> 8 x D, centred with the same mean


@pytest.fixture(scope="module")
def descriptor() -> ImageDescriptor:
    return ImageDescriptor().eval()


@pytest.fixture(scope="module")
def demo_vectors(demo_dataset, descriptor) -> DemoVectors:
    """The copy-detection variant (the default) over the demo pool."""
    return _demo_vectors(demo_dataset, descriptor)


@pytest.fixture(scope="module")
def content_vectors(demo_dataset) -> DemoVectors:
    """The content-grouping variant over the demo pool."""
    return _demo_vectors(demo_dataset, ImageDescriptor("content").eval())


def _demo_vectors(demo_dataset, descriptor: ImageDescriptor) -> DemoVectors:
    gt = pl.read_parquet(demo_dataset.ground_truth_path).filter(pl.col("kind").is_in(KINDS))
    rows = gt.to_dicts()
    variant = descriptor.variant
    pixels = np.stack([_load(demo_dataset.images_root / r["image_id"], variant) for r in rows])
    example_pixels = {
        cat: np.stack([_load(p, variant) for p in sorted((demo_dataset.examples_root / cat).iterdir())])
        for cat in CATEGORIES
    }
    with torch.no_grad():
        raw = descriptor(_to_tensor(pixels)).double().numpy()
        raw_examples = {
            cat: descriptor(_to_tensor(px)).double().numpy() for cat, px in example_pixels.items()
        }
    mean = raw.mean(0)

    def centre(v: np.ndarray) -> np.ndarray:
        v = v - mean
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    return DemoVectors(
        rows=rows,
        row_of={r["image_id"]: i for i, r in enumerate(rows)},
        pixels=pixels,
        raw=raw,
        vectors=centre(raw),
        examples={cat: centre(v) for cat, v in raw_examples.items()},
    )


def _random_base_pairs(dv: DemoVectors, n: int = 5000) -> np.ndarray:
    """Cosine distances of random pairs of different bases."""
    bases = np.array([i for i, r in enumerate(dv.rows) if r["kind"] == "base"])
    rng = np.random.default_rng(0)
    a, b = rng.choice(bases, n), rng.choice(bases, n)
    keep = a != b
    return 1.0 - (dv.vectors[a[keep]] * dv.vectors[b[keep]]).sum(1)


def _copy_distances(dv: DemoVectors, kind: str) -> dict[str, np.ndarray]:
    """transform -> cosine distances of the planted copies of ``kind`` to their sources."""
    out: dict[str, list[float]] = {}
    for r in dv.rows:
        if r["kind"] == kind:
            i, j = dv.row_of[r["image_id"]], dv.row_of[r["source_id"]]
            out.setdefault(r["transform"] or kind, []).append(1.0 - float(dv.vectors[i] @ dv.vectors[j]))
    return {k: np.array(v) for k, v in out.items()}


# ------------------------------------------------------------------------------ contract


def test_constants_and_preprocessing():
    assert ImageDescriptor.DESCRIPTOR_DIM == DESCRIPTOR_DIM == 512
    assert ImageDescriptor.DESCRIPTOR_INPUT_SIZE == DESCRIPTOR_INPUT_SIZE == 64
    pre = descriptor_preprocessing()
    assert pre.resize == "square" and pre.size == DESCRIPTOR_INPUT_SIZE and pre.fixed_shape
    assert pre.mean == (0.0, 0.0, 0.0) and pre.std == (1.0, 1.0, 1.0)
    assert pre.interpolation == "bilinear"
    assert not list(ImageDescriptor().parameters())  # nothing learned
    assert not ImageDescriptor().state_dict()  # nothing to load either


def test_shape_dtype_norm(descriptor, demo_vectors):
    x = _to_tensor(demo_vectors.pixels[:8])
    with torch.no_grad():
        out = descriptor(x)
    assert out.shape == (8, DESCRIPTOR_DIM) and out.dtype == torch.float32
    assert torch.allclose(out.norm(dim=1), torch.ones(8), atol=1e-5)
    assert torch.isfinite(out).all()
    # flat images (no gradients, no colour) stay finite and unit length
    flat = torch.cat([torch.zeros(1, 3, 64, 64), torch.ones(1, 3, 64, 64), torch.full((1, 3, 64, 64), 0.5)])
    with torch.no_grad():
        out = descriptor(flat)
    assert torch.isfinite(out).all() and torch.allclose(out.norm(dim=1), torch.ones(3), atol=1e-5)


def test_input_checks_and_conveniences(descriptor, demo_vectors):
    pixels = demo_vectors.pixels[:4]
    with torch.no_grad():
        reference = descriptor(_to_tensor(pixels))
        as_uint8 = descriptor(torch.from_numpy(pixels).permute(0, 3, 1, 2))
        assert torch.allclose(as_uint8, reference, atol=1e-6)
        bigger = torch.nn.functional.interpolate(_to_tensor(pixels), size=(96, 96), mode="bilinear")
        assert descriptor(bigger).shape == (4, DESCRIPTOR_DIM)  # other sizes are resized first
        assert descriptor(torch.zeros(0, 3, 64, 64)).shape == (0, DESCRIPTOR_DIM)
    with pytest.raises(ValueError, match="B x 3 x H x W"):
        descriptor(torch.zeros(2, 1, 64, 64))


def test_deterministic_and_batch_independent(descriptor, demo_vectors):
    x = _to_tensor(demo_vectors.pixels[:16])
    with torch.no_grad():
        batch = descriptor(x)
        again = descriptor(x)
        single = torch.cat([descriptor(x[i : i + 1]) for i in range(16)])
        fresh = ImageDescriptor()(x)
    assert torch.equal(batch, again)
    assert torch.equal(batch, fresh)
    assert torch.allclose(single, batch, atol=1e-5, rtol=0)


def test_float32_under_autocast(descriptor, demo_vectors):
    x = _to_tensor(demo_vectors.pixels[:16])
    with torch.no_grad():
        reference = descriptor(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            under = descriptor(x)
            half_input = descriptor(x.to(torch.bfloat16))
    assert under.dtype == torch.float32 and half_input.dtype == torch.float32
    assert torch.allclose(under, reference, atol=1e-5, rtol=0)
    # a bfloat16 input has lost precision (8 bits of mantissa) but still lands next to its image
    assert float((half_input * reference).sum(1).min()) > 0.99


def test_horizontal_flip_is_exact(descriptor, demo_vectors):
    x = _to_tensor(demo_vectors.pixels[:16])
    with torch.no_grad():
        assert torch.allclose(descriptor(x.flip(-1)), descriptor(x), atol=1e-4, rtol=0)


def test_byte_copies_give_identical_vectors(demo_vectors):
    pairs = [
        (demo_vectors.row_of[r["image_id"]], demo_vectors.row_of[r["source_id"]])
        for r in demo_vectors.rows
        if r["kind"] == "byte_copy"
    ]
    assert pairs
    for i, j in pairs:
        assert np.array_equal(demo_vectors.raw[i], demo_vectors.raw[j])


# ------------------------------------------------------------------------------ quality on the demo


def test_near_duplicates_are_closer_than_random_pairs(demo_vectors):
    negatives = _random_base_pairs(demo_vectors)
    by_transform = _copy_distances(demo_vectors, "near_duplicate")
    assert set(by_transform) == set(NEAR_DUPLICATE_TRANSFORMS)
    everything = np.concatenate(list(by_transform.values()))
    report = {
        "near_duplicate_auc": roc_auc(everything, negatives),
        "random_pairs": {"median": float(np.median(negatives)), "q01": float(np.quantile(negatives, 0.01))},
        "per_transform": {
            t: {"auc": roc_auc(d, negatives), "median": float(np.median(d)), "max": float(d.max())}
            for t, d in sorted(by_transform.items())
        },
    }
    print("near duplicates:", json.dumps(report, indent=1))
    assert report["near_duplicate_auc"] >= 0.95
    for t, d in by_transform.items():
        assert roc_auc(d, negatives) >= 0.95, t
    # What the descriptor guarantees per transform (the demo's ranges, with a margin):
    # flips are exact and re-encoding, resizing and a small text overlay barely register...
    for t in ("hflip", "jpeg", "resize", "text"):
        assert by_transform[t].max() < 0.03, (t, by_transform[t])
    # ...crops of <= 10% per side and brightness/contrast changes move it further, but every
    # planted near duplicate stays closer than 99% of the pairs of unrelated photos.
    assert everything.max() < np.quantile(negatives, 0.01)


def test_near_duplicates_find_their_source(demo_vectors):
    """Searched among all bases, every planted near duplicate's nearest neighbour is its source."""
    bases = np.array([i for i, r in enumerate(demo_vectors.rows) if r["kind"] == "base"])
    v = demo_vectors.vectors
    for r in demo_vectors.rows:
        if r["kind"] == "near_duplicate":
            sims = v[bases] @ v[demo_vectors.row_of[r["image_id"]]]
            assert bases[int(np.argmax(sims))] == demo_vectors.row_of[r["source_id"]], r


def test_content_grouping_by_example_images(content_vectors):
    """Min distance to a category's 8 examples separates that category's images from photos.

    Asserts ROC AUC >= 0.95 per category. Reports the tightest threshold keeping >= 90% of
    the category (and the share of photos under it), the loosest one keeping <= 5% of the
    photos (and the recall there), and their midpoint. The recall target is not asserted
    here: with 4 members per category one miss is 25%, and a dark chart whose style none of
    the examples share can be that miss (1500-image pools: benchmarks/descriptor_quality.py).
    """
    demo_vectors = content_vectors
    v = demo_vectors.vectors
    rows = demo_vectors.rows
    photos = [i for i, r in enumerate(rows) if r["kind"] == "base"]
    report = {}
    for cat in CATEGORIES:
        members = [i for i, r in enumerate(rows) if r["kind"] == "unwanted" and r["category"] == cat]
        assert members
        examples = demo_vectors.examples[cat]
        d_members = (1.0 - v[members] @ examples.T).min(1)
        d_photos = (1.0 - v[photos] @ examples.T).min(1)
        for_recall = float(np.quantile(d_members, 0.9, method="higher"))
        for_fpr = float(np.quantile(d_photos, 0.05, method="lower"))
        threshold = (for_recall + for_fpr) / 2
        report[cat] = {
            "auc": roc_auc(d_members, d_photos),
            "threshold_recall_90": for_recall,
            "photo_fpr_there": float((d_photos <= for_recall).mean()),
            "threshold_photo_fpr_5": for_fpr,
            "recall_there": float((d_members < for_fpr).mean()),
            "threshold": threshold,
            "recall": float((d_members <= threshold).mean()),
            "photo_fpr": float((d_photos <= threshold).mean()),
        }
    print("content grouping:", json.dumps(report, indent=1))
    for cat, r in report.items():
        assert r["auc"] >= 0.95, (cat, r)
    # documents (white pages of text) are the easy case: every page is closer than any photo
    assert report["document"]["photo_fpr_there"] == 0.0, report["document"]


def test_copy_variant_keeps_different_pages_apart(demo_vectors, content_vectors):
    """Pages of text share every global statistic: the copy weighting must not call them copies."""
    pages = [
        i for i, r in enumerate(demo_vectors.rows) if r["kind"] == "unwanted" and r["category"] == "document"
    ]
    assert len(pages) >= 2

    def closest_other_page(vectors: np.ndarray) -> float:
        d = 1.0 - vectors[pages] @ vectors[pages].T
        np.fill_diagonal(d, np.inf)
        return float(d.min())

    assert closest_other_page(demo_vectors.vectors) > 0.1  # above the demo's near-duplicate threshold
    assert closest_other_page(content_vectors.vectors) < closest_other_page(demo_vectors.vectors)


def test_unknown_variant_is_refused():
    with pytest.raises(ValueError, match="unknown descriptor variant"):
        ImageDescriptor("fancy")
