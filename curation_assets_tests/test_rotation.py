"""Rotation decisions: threshold, argmax 0 degrees, ties; upright() undoes a clockwise turn exactly."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from PIL import Image

from curation_assets.core.filters.rotation import ANGLES, rotation_decisions, upright
from curation_assets.core.ingest.images import load_rgb


class KnownModel:
    """A stand-in rotation model: returns a fixed probability row for each image it knows."""

    def __init__(self, table: dict[str, list[float]]):
        self.table = table

    def __call__(self, names: list[str]) -> np.ndarray:
        return np.array([self.table[name] for name in names], dtype=np.float32)


def test_known_probabilities_drive_the_decisions():
    model = KnownModel(
        {
            "at_threshold": [0.05, 0.90, 0.03, 0.02],  # prob == threshold applies
            "just_below": [0.06, 0.89, 0.03, 0.02],
            "upright": [0.97, 0.01, 0.01, 0.01],  # argmax 0 degrees: no change
            "upside_down": [0.00, 0.01, 0.99, 0.00],
            "tie_with_zero": [0.45, 0.05, 0.05, 0.45],  # a tie goes to the smaller angle
            "tie_sideways": [0.00, 0.50, 0.00, 0.50],
            "unknown": [np.nan, np.nan, np.nan, np.nan],
        }
    )
    names = list(model.table)
    out = rotation_decisions(model(names), threshold=0.9, image_ids=names)
    rows = {r["image_id"]: r for r in out.iter_rows(named=True)}
    assert out.columns == ["image_id", "predicted_angle", "probability", "apply", "correction"]
    assert rows["at_threshold"] | {} == {
        "image_id": "at_threshold",
        "predicted_angle": 90,
        "probability": pytest.approx(0.9),
        "apply": True,
        "correction": 90,
    }
    assert (rows["just_below"]["predicted_angle"], rows["just_below"]["apply"]) == (90, False)
    assert rows["just_below"]["correction"] == 0
    assert (rows["upright"]["predicted_angle"], rows["upright"]["apply"], rows["upright"]["correction"]) == (
        0,
        False,
        0,
    )
    assert (rows["upside_down"]["correction"], rows["upside_down"]["apply"]) == (180, True)
    assert (rows["tie_with_zero"]["predicted_angle"], rows["tie_with_zero"]["apply"]) == (0, False)
    assert rows["tie_sideways"]["predicted_angle"] == 90
    assert rows["unknown"]["predicted_angle"] is None and rows["unknown"]["apply"] is False

    # the threshold is the project's: lowering it applies the unsure ones too
    low = rotation_decisions(model(names), threshold=0.5)
    assert low["correction"].to_list() == [90, 90, 0, 180, 0, 90, 0]


def test_bad_probabilities_are_refused():
    with pytest.raises(ValueError, match=r"shape \(n, 4\)"):
        rotation_decisions(np.zeros((3, 3)), 0.9)
    with pytest.raises(ValueError, match="logits"):
        rotation_decisions(np.array([[2.5, -1.0, 0.3, 0.1]]), 0.9)
    with pytest.raises(ValueError, match="threshold"):
        rotation_decisions(np.full((1, 4), 0.25), 1.5)
    assert rotation_decisions(np.zeros((0, 4)), 0.9).height == 0


def _clockwise(array: np.ndarray, angle: int) -> np.ndarray:
    return np.rot90(array, k=-(angle // 90))  # numpy turns counter-clockwise for positive k


def test_upright_undoes_a_clockwise_turn_exactly():
    array = np.arange(3 * 5 * 3, dtype=np.uint8).reshape(3, 5, 3)  # no symmetry to hide a wrong turn
    for angle in ANGLES:
        turned = Image.fromarray(np.ascontiguousarray(_clockwise(array, angle)))
        assert np.array_equal(np.asarray(upright(turned, angle)), array), angle
    assert np.array_equal(np.asarray(upright(Image.fromarray(_clockwise(array, 90).copy()), 450)), array)
    with pytest.raises(ValueError, match="multiple of 90"):
        upright(Image.fromarray(array), 45)


def test_decisions_turn_images_upright_end_to_end():
    """A model that recognises each image's turn; its decisions' corrections restore the original."""
    original = np.random.default_rng(2).integers(0, 256, (6, 9, 3), dtype=np.uint8)
    images = {f"turned_{a}": Image.fromarray(_clockwise(original, a).copy()) for a in ANGLES}
    model = KnownModel({name: list(np.eye(4)[ANGLES.index(int(name.split("_")[1]))]) for name in images})
    decisions = rotation_decisions(model(list(images)), threshold=0.9, image_ids=list(images))
    for row in decisions.iter_rows(named=True):
        fixed = upright(images[row["image_id"]], row["correction"])
        assert np.array_equal(np.asarray(fixed), original), row


@pytest.mark.xdist_group("demo")
def test_demo_rotated_copies_come_back_upright(demo_dataset):
    gt = pl.read_parquet(demo_dataset.ground_truth_path)
    copies = gt.filter(pl.col("kind") == "rotated_copy")
    assert set(copies["rotation"]) == {90, 180, 270}

    def load(image_id: str) -> np.ndarray:
        return np.asarray(load_rgb((demo_dataset.images_root / image_id).read_bytes()), dtype=np.float32)

    for row in copies.iter_rows(named=True):
        source = load(row["source_id"])
        copy = Image.fromarray(load(row["image_id"]).astype(np.uint8))
        restored = np.asarray(upright(copy, row["rotation"]), dtype=np.float32)
        assert restored.shape == source.shape, row["image_id"]
        error = float(np.abs(restored - source).mean())
        assert error < 4.0, (row["image_id"], error)  # JPEG re-encoding only
        wrong = np.asarray(upright(copy, (row["rotation"] + 180) % 360), dtype=np.float32)
        if wrong.shape == source.shape:
            assert float(np.abs(wrong - source).mean()) > 3 * error
