"""Weight-free quality scores: planted defects of the demo are flagged, their clean originals are not."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image

from curation_assets.core.filters.quality import (
    QUALITY_COLUMNS,
    QualityThresholds,
    quality_flags,
    quality_metrics,
    quality_rules,
    score_images,
)
from curation_assets.core.filters.rules import decide
from curation_assets.core.ingest.decode import ImageRef
from curation_assets.core.ingest.images import load_rgb
from curation_assets_tests.conftest import write_photo

ISSUE_FLAG = {"blur": "is_blurry", "dark": "is_dark", "bright": "is_light"}


def _refs(demo, rows) -> list[ImageRef]:
    return [
        ImageRef(r["image_id"], str(demo.images_root / r["image_id"]), None, None, r["width"], r["height"])
        for r in rows
    ]


@pytest.fixture(scope="module")
def demo_scores(demo_dataset) -> pl.DataFrame:
    """Scores and default flags of every image of the demo that sanitize keeps, with its ground truth."""
    gt = pl.read_parquet(demo_dataset.ground_truth_path).filter(pl.col("expected_status") != "rejected")
    scores = score_images(_refs(demo_dataset, gt.iter_rows(named=True)), workers=1)
    return gt.join(quality_flags(scores, QualityThresholds()), on="image_id", how="left")


@pytest.mark.xdist_group("demo")
def test_planted_defects_are_flagged_by_their_own_flag(demo_scores):
    planted = demo_scores.filter(pl.col("kind") == "quality")
    assert set(planted["quality_issue"]) == set(ISSUE_FLAG)
    assert planted["error"].null_count() == planted.height
    for row in planted.iter_rows(named=True):
        flag = ISSUE_FLAG[row["quality_issue"]]
        assert row[flag], (row["image_id"], row["quality_issue"], row["blur"], row["brightness_p99"])
    # a blurred copy keeps its exposure; a dark or over-exposed copy keeps its sharpness
    blurred = planted.filter(pl.col("quality_issue") == "blur")
    assert not blurred["is_dark"].any() and not blurred["is_light"].any()
    exposed = planted.filter(pl.col("quality_issue") != "blur")
    assert not exposed["is_blurry"].any()


@pytest.mark.xdist_group("demo")
def test_clean_originals_are_not_flagged(demo_scores):
    planted = demo_scores.filter(pl.col("kind") == "quality")
    originals = demo_scores.filter(pl.col("image_id").is_in(planted["source_id"].implode()))
    assert originals.height == planted["source_id"].n_unique()
    assert originals["quality_issues"].to_list() == [[]] * originals.height
    # the blur threshold leaves natural photos alone: at most 5% of clean images flagged
    clean = demo_scores.filter(pl.col("kind").is_in(["base", "near_duplicate", "rotated_copy"]))
    assert clean["is_blurry"].mean() <= 0.05


@pytest.mark.xdist_group("demo")
def test_quality_rules_remove_what_the_flags_flag(demo_scores):
    thresholds = QualityThresholds()
    scores = demo_scores.select(QUALITY_COLUMNS.keys())
    decisions = decide(scores, quality_rules(thresholds)).join(
        quality_flags(scores, thresholds), on="image_id"
    )
    for row in decisions.iter_rows(named=True):
        assert row["removed_by"] == [f"quality:{issue}" for issue in row["quality_issues"]]


def test_broken_files_give_error_rows_in_order(tmp_path: Path):
    good = [write_photo(tmp_path / f"good{i}.jpg", seed=i, size=(300, 200)) for i in range(3)]
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good[0].read_bytes()[:200])
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"not an image at all" * 10)
    paths = [good[0], truncated, good[1], tmp_path / "missing.jpg", garbage, good[2]]
    refs = [ImageRef(f"s/{p.name}", str(p), None, None, 300, 200) for p in paths]

    inline = score_images(refs, workers=1)
    assert inline["image_id"].to_list() == [r.image_id for r in refs]
    assert dict(inline.schema) == QUALITY_COLUMNS
    broken = inline.filter(pl.col("error").is_not_null())
    assert broken["image_id"].to_list() == ["s/truncated.jpg", "s/missing.jpg", "s/garbage.jpg"]
    assert "FileNotFoundError" in broken.filter(pl.col("image_id") == "s/missing.jpg")["error"][0]
    assert broken.select(pl.col("blur", "entropy").null_count()).row(0) == (3, 3)
    ok = inline.filter(pl.col("error").is_null())
    assert ok.height == 3 and ok["blur"].null_count() == 0

    # worker processes, one image per task: the same rows in the same order
    calls = []
    pooled = score_images(refs, workers=2, chunk_size=1, progress=lambda *a: calls.append(a))
    assert pooled.equals(inline)
    assert calls[-1][:2] == (len(refs), len(refs)) and len(calls) == len(refs)

    flags = quality_flags(inline, QualityThresholds())
    unscored = flags.filter(pl.col("error").is_not_null())
    assert unscored["is_blurry"].null_count() == 3 and unscored["quality_issues"].to_list() == [[]] * 3


@pytest.mark.xdist_group("demo")
def test_scores_do_not_depend_on_resolution(demo_dataset):
    gt = pl.read_parquet(demo_dataset.ground_truth_path)
    bases = gt.filter((pl.col("kind") == "base") & (pl.col("width") >= 512)).head(4)
    assert bases.height >= 2
    for image_id in bases["image_id"]:
        image = load_rgb((demo_dataset.images_root / image_id).read_bytes())
        big = quality_metrics(image.resize((image.width * 2, image.height * 2), Image.Resampling.LANCZOS))
        native = quality_metrics(image)
        assert big["blur"] == pytest.approx(native["blur"], rel=0.15), image_id
        assert big["brightness_p99"] == pytest.approx(native["brightness_p99"], abs=0.02)
        assert big["entropy"] == pytest.approx(native["entropy"], abs=0.2)


def test_metric_units_on_synthetic_images():
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (200, 200, 3), dtype=np.uint8))
    flat = Image.new("RGB", (200, 120), (90, 140, 30))
    black, white = Image.new("RGB", (64, 64), 0), Image.new("RGB", (64, 64), (255, 255, 255))
    grey = noise.convert("L").convert("RGB")

    noisy = quality_metrics(noise)
    assert noisy["entropy"] > 7.5 and noisy["blur"] > 1.0 and noisy["colorfulness"] > 0.1
    assert quality_metrics(flat)["entropy"] == 0.0 and quality_metrics(flat)["blur"] == 0.0
    assert quality_metrics(grey)["colorfulness"] == 0.0
    assert quality_metrics(black)["brightness_p99"] == 0.0
    assert quality_metrics(white)["brightness_p5"] == 1.0
    # a blurred copy of the same picture scores far lower
    soft = Image.open(io.BytesIO(_jpeg(noise.resize((50, 50)).resize((200, 200), Image.Resampling.BICUBIC))))
    assert quality_metrics(soft)["blur"] < 0.5 * noisy["blur"]

    scores = pl.DataFrame(
        [{"image_id": name, **quality_metrics(im)} for name, im in (("grey", grey), ("noise", noise))]
    )
    off = quality_flags(scores, QualityThresholds())
    on = quality_flags(scores, QualityThresholds(grayscale=True))
    assert off["is_grayscale"].to_list() == [True, False] == on["is_grayscale"].to_list()
    assert off["quality_issues"].to_list() == [[], []]
    assert on["quality_issues"].to_list() == [["grayscale"], []]


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=95)
    return buffer.getvalue()
