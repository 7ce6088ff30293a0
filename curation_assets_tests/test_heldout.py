"""The weight-free copy descriptor on a held-out corpus: edits the demo does not plant.

Builds a small corpus with :func:`curation_assets.demo.heldout.generate_heldout` (every edit on
several bases, adjacent-tile hard negatives), embeds it the way the pipeline does (the model
loader, the decode workers' ``to_tensor`` with its border crop, the batch runner) and scores
pairs at the demo project's near-duplicate threshold. The 150-base figures are in
benchmarks/descriptor_quality.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from curation_assets.config import ModelEntry
from curation_assets.core.embed.embed import ComputeSettings, embed_images
from curation_assets.core.embed.models import load_model
from curation_assets.core.embed.preprocess import Preprocessing, border_box, crop_uniform_borders
from curation_assets.core.ingest.images import ImageRef
from curation_assets.demo.heldout import HELDOUT_TRANSFORMS, MIN_SIDE, generate_heldout, score_pairs

THRESHOLD = 0.1  # projects/demo.yaml near_dedup.threshold


@pytest.fixture(scope="module")
def scored(tmp_path_factory: pytest.TempPathFactory) -> dict:
    corpus = generate_heldout(tmp_path_factory.mktemp("heldout"), n_bases=36, n_tile_pairs=8, seed=5)
    truth = corpus.truth()
    assert corpus.n_tile_pairs >= 6
    assert (
        truth.filter(truth["kind"] != "copy").select(["width", "height"]).min_horizontal() >= MIN_SIDE
    ).all()
    refs = [
        ImageRef(r["image_id"], str(corpus.images_root / r["image_id"]), None, None, r["width"], r["height"])
        for r in truth.iter_rows(named=True)
    ]
    model = load_model("descriptor", ModelEntry(kind="descriptor"))
    settings = ComputeSettings(
        device=torch.device("cpu"),
        autocast=None,
        batch_size=64,
        min_batch_size=1,
        num_workers=0,
        channels_last=False,
        compile=False,
    )
    result = embed_images(model.module, model.preprocessing, model.dim, refs, settings, dtype=np.float32)
    assert result.errors == []
    report = score_pairs(truth, result.image_ids, result.vectors, THRESHOLD)
    print("held-out:", json.dumps(report, indent=1))
    return report


def test_every_edit_is_planted(scored):
    assert set(scored["per_transform"]) == set(HELDOUT_TRANSFORMS)
    assert min(t["n"] for t in scored["per_transform"].values()) >= 8


def test_pairs_are_found_precisely_and_tiles_stay_apart(scored):
    assert scored["pair_recall"] >= 0.85, scored
    assert scored["precision"] >= 0.98, scored
    # adjacent tiles of one photo share colours, light and texture: never one image
    assert scored["hard_negatives"]["grouped"] == 0, scored["hard_negatives"]


@pytest.mark.parametrize(
    "edit",
    # letterboxing (borders cropped first), greyscale (colour weighs little), +-3 degree turns
    # (the margin and the centre-weighted grid) and the re-encodings all match
    ["letterbox", "grayscale", "rotate_3deg", "gaussian_blur", "jpeg_q30", "squash_0.88", "down4_up"],
)
def test_common_edits_are_found(scored, edit):
    found = scored["per_transform"][edit]
    assert found["recall"] >= 0.85, (edit, found)
    assert found["median"] < THRESHOLD / 2, (edit, found)


@pytest.mark.parametrize("edit", ["corner_watermark", "saturation_1.6"])
def test_overlays_and_colour_boosts_degrade_gracefully(scored, edit):
    """Most are found; the rest land near the threshold, far closer than unrelated images."""
    found = scored["per_transform"][edit]
    assert found["recall"] >= 0.7, (edit, found)
    assert found["max"] < scored["unrelated_q001"], (edit, found, scored["unrelated_q001"])


# ------------------------------------------------------------------------------ the border crop


def _photo(size: tuple[int, int] = (200, 150)) -> Image.Image:
    rng = np.random.default_rng(3)
    low = Image.fromarray(rng.integers(0, 255, size=(6, 8, 3), dtype=np.uint8))
    return low.resize(size, Image.Resampling.BICUBIC)


@pytest.mark.parametrize("fill", [(0, 0, 0), (255, 255, 255), (40, 90, 200)])
def test_bars_and_frames_are_cropped(fill):
    photo = _photo()
    letterbox = ImageOps.expand(photo, border=(0, 30, 0, 30), fill=fill)
    assert border_box(letterbox) == (0, 30, 200, 180)
    frame = ImageOps.expand(photo, border=12, fill=fill)
    assert border_box(frame) == (12, 12, 212, 162)
    assert crop_uniform_borders(frame).tobytes() == photo.tobytes()


def test_images_without_bars_and_flat_images_are_kept():
    photo = _photo()
    assert crop_uniform_borders(photo) is photo
    flat = Image.new("RGB", (100, 80), (128, 128, 128))
    left, top, right, bottom = border_box(flat)
    assert right - left >= 30 and bottom - top >= 24  # at most 35% per side: the middle stays


def test_the_crop_runs_in_both_decode_paths_and_only_when_asked(tmp_path: Path):
    boxed = ImageOps.expand(_photo(), border=(0, 40, 0, 40), fill=(0, 0, 0))
    cropping = Preprocessing(resize="square", size=64, mean=(0, 0, 0), std=(1, 1, 1), crop_borders=True)
    plain = Preprocessing(resize="square", size=64, mean=(0, 0, 0), std=(1, 1, 1))
    from_tensor = cropping.to_tensor(boxed).permute(1, 2, 0).numpy().astype(int)
    from_apply = np.asarray(cropping.apply(boxed)).astype(int)
    assert np.abs(from_tensor - from_apply).max() <= 3  # torch vs Pillow resampling
    assert from_tensor[:4].mean() > 20  # no black bar left at the top
    assert plain.to_tensor(boxed).permute(1, 2, 0).numpy()[:4].mean() < 3
    # recorded only when set: other models' preprocessing records (and vector identities) stay
    assert "crop_borders" not in plain.describe() and cropping.describe()["crop_borders"] is True
    assert cropping.draft_size(640, 480) == plain.draft_size(640, 480) == (64, 64)


def test_the_changed_copy_variant_has_a_new_identity_and_the_content_variant_keeps_its_own():
    copy = load_model("d", ModelEntry(kind="descriptor"))
    content = load_model("d", ModelEntry(kind="descriptor", variant="content"))
    assert copy.identity["descriptor_version"] == 2 and copy.identity["preprocessing"]["crop_borders"]
    assert (
        content.identity["descriptor_version"] == 1
        and "crop_borders" not in content.identity["preprocessing"]
    )
