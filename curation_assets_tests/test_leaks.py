"""Train/test leak detection on a generated labeled dataset with planted leaks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image

from curation_assets.config import DatasetConfig, ShardRule
from curation_assets.core.ingest.decode import ImageRef
from curation_assets.core.ingest.inventory import inventory_row
from curation_assets.core.ingest.shards import discover_shards, list_shard_files
from curation_assets.core.labeled.leaks import (
    find_leaks,
    hamming_distance,
    hamming_pairs,
    hash_images,
    leak_summary,
    perceptual_hash,
    split_pairs,
)
from curation_assets.demo.labeled import LEAK_KINDS, generate_labeled_demo
from curation_assets_tests.conftest import write_photo


def _inventory(roots: dict[str, str], rule: str = "subfolder") -> pl.DataFrame:
    """The inventory the pipeline would build for these roots (real shard keys and hashes)."""
    dataset = DatasetConfig(
        roots=roots,
        input_kind="directory",
        shard_rule=ShardRule(kind=rule, chunk_size=1000),
        follow_symlinks=False,
    )
    rows = [
        inventory_row(shard, file)
        for shard in discover_shards(dataset).shards
        for file in list_shard_files(shard)
    ]
    return pl.DataFrame(rows)


@pytest.fixture(scope="module")
def labeled(tmp_path_factory: pytest.TempPathFactory):
    """(demo, ground truth, train frame, test frame): inventory rows with content_hash and phash."""
    demo = generate_labeled_demo(tmp_path_factory.mktemp("labeled"))
    truth = pl.read_parquet(demo.ground_truth_path)
    inventory = _inventory(demo.roots)
    refs = [
        ImageRef(r["image_id"], r["source_path"], None, None, 0, 0) for r in inventory.iter_rows(named=True)
    ]
    hashes = hash_images(refs)
    frame = inventory.join(hashes, on="image_id", how="left")
    train = frame.filter(pl.col("split") == "train")
    test = frame.filter(pl.col("split") == "test")
    return demo, truth, train, test


def _pairs(frame: pl.DataFrame) -> set[tuple[str, str]]:
    return set(frame.select("train_image", "test_image").iter_rows())


def _planted(truth: pl.DataFrame, kinds: tuple[str, ...] = LEAK_KINDS) -> set[tuple[str, str]]:
    leaks = truth.filter(pl.col("leak_kind").is_in(kinds))
    return set(leaks.select("leak_of", "image_id").iter_rows())


def test_demo_is_small_and_ids_match_the_pipeline(labeled) -> None:
    demo, truth, train, test = labeled
    assert truth.height <= 150
    # the ground truth names the same image ids the subfolder shard rule gives
    assert set(truth["image_id"]) == set(train["image_id"]) | set(test["image_id"])
    assert truth.filter(pl.col("leak_kind").is_not_null())["split"].unique().to_list() == ["test"]
    assert set(truth["label"]) == set(demo.classes)
    assert train["error"].null_count() == train.height and test["error"].null_count() == test.height


def test_exact_finds_exactly_the_byte_copies(labeled) -> None:
    _, truth, train, test = labeled
    leaks = find_leaks(train, test, methods=("exact",))
    assert _pairs(leaks) == _planted(truth, ("byte_copy",))
    assert set(leaks["method"]) == {"exact"}
    assert (leaks["similarity"] == 1.0).all() and (leaks["hamming_distance"] == 0).all()


def test_perceptual_finds_reencodes_and_crops_and_nothing_unrelated(labeled) -> None:
    _, truth, train, test = labeled
    leaks = find_leaks(train, test, methods=("exact", "perceptual"), max_hamming=5)
    perceptual = leaks.filter(pl.col("method") == "perceptual")
    # every planted leak, re-encodes and border crops included, and no unrelated pair
    assert _planted(truth, ("reencode_jpeg", "reencode_png", "crop")) <= _pairs(perceptual)
    assert _pairs(leaks) == _planted(truth)
    assert perceptual["hamming_distance"].max() <= 5
    # a byte copy is reported by both methods, typed by the stronger one
    copies = leaks.filter(
        pl.col("test_image").is_in(list(truth.filter(pl.col("leak_kind") == "byte_copy")["image_id"]))
    )
    assert copies.height == 2 * len(_planted(truth, ("byte_copy",)))
    assert set(copies["leak_type"]) == {"exact_copy"}
    others = leaks.filter(pl.col("method") == "perceptual").join(copies, on="test_image", how="anti")
    assert set(others["leak_type"]) == {"near_copy"}
    assert leaks.select("train_image", "test_image", "method").is_unique().all()


def test_leak_summary_counts_test_images(labeled) -> None:
    _, truth, train, test = labeled
    leaks = find_leaks(train, test, methods=("exact", "perceptual"))
    summary = leak_summary(leaks, n_test=test.height)
    n_planted = truth["leak_kind"].drop_nulls().len()
    assert summary["test_images_affected"] == n_planted
    assert summary["percent_test_affected"] == pytest.approx(100 * n_planted / test.height, abs=1e-3)
    assert summary["by_method"]["exact"]["test_images"] == len(_planted(truth, ("byte_copy",)))
    assert summary["by_method"]["perceptual"]["test_images"] == n_planted
    assert summary["by_method"]["semantic"]["pairs"] == 0
    assert summary["test_images_by_split_pair"] == {"train->test": n_planted}


def test_semantic_finds_planted_pairs_only() -> None:
    rng = np.random.default_rng(3)
    dim = 64
    train_vectors = rng.normal(size=(300, dim)).astype(np.float32)
    unit = train_vectors / np.linalg.norm(train_vectors, axis=1, keepdims=True)
    sources = rng.choice(300, 15, replace=False)

    def moved(rows: np.ndarray, cosine: float) -> np.ndarray:
        # a unit vector at exactly this cosine from each source, at a random angle to it
        noise = rng.normal(size=(len(rows), dim))
        noise -= (noise * unit[rows]).sum(axis=1, keepdims=True) * unit[rows]
        noise /= np.linalg.norm(noise, axis=1, keepdims=True)
        return cosine * unit[rows] + np.sqrt(1 - cosine**2) * noise

    close = moved(sources[:10], 0.97)  # leaks
    near_miss = moved(sources[10:], 0.93)  # similar, under the threshold
    test_vectors = np.vstack([close, near_miss, rng.normal(size=(50, dim))]).astype(np.float32)
    train = pl.DataFrame({"image_id": [f"tr{i}" for i in range(300)]})
    test = pl.DataFrame({"image_id": [f"te{i}" for i in range(len(test_vectors))]})
    leaks = find_leaks(
        train, test, train_vectors=train_vectors * 3.0, test_vectors=test_vectors, methods=("semantic",)
    )
    assert _pairs(leaks) == {(f"tr{s}", f"te{i}") for i, s in enumerate(sources[:10])}
    assert leaks["similarity"].min() >= 0.95
    assert leaks["similarity"].to_numpy() == pytest.approx(0.97, abs=1e-4)
    assert set(leaks["leak_type"]) == {"semantic_duplicate"}
    assert leaks["hamming_distance"].null_count() == leaks.height  # no hashes given


def test_hamming_pairs_agrees_with_brute_force() -> None:
    rng = np.random.default_rng(5)
    train = rng.integers(0, 2**63, 400, dtype=np.int64).astype(np.uint64) * np.uint64(2) + np.uint64(1)
    test = train[rng.choice(400, 60)].copy()
    for i in range(len(test)):  # flip 0..7 random bits
        for bit in rng.choice(64, int(rng.integers(0, 8)), replace=False):
            test[i] ^= np.uint64(1) << np.uint64(bit)
    a, b, dist = hamming_pairs(train, np.concatenate([test, train[:5]]), max_hamming=5, chunk=7)
    expected = {
        (i, j)
        for j, t in enumerate(np.concatenate([test, train[:5]]))
        for i, s in enumerate(train)
        if hamming_distance(int(s), int(t)) <= 5
    }
    assert set(zip(a.tolist(), b.tolist(), strict=True)) == expected
    assert len(expected) > 30
    assert all(
        d == hamming_distance(int(train[i]), int(np.concatenate([test, train[:5]])[j]))
        for i, j, d in zip(a, b, dist, strict=True)
    )


def test_perceptual_hash_is_stable_under_resize_and_far_for_other_images(tmp_path: Path) -> None:
    first = Image.open(write_photo(tmp_path / "a.png", seed=1, size=(240, 180))).convert("RGB")
    other = Image.open(write_photo(tmp_path / "b.png", seed=2, size=(240, 180))).convert("RGB")
    base = perceptual_hash(first)
    assert 0 <= base < 2**64
    assert hamming_distance(base, perceptual_hash(first.resize((120, 90)))) <= 4
    assert hamming_distance(base, perceptual_hash(other)) > 12


def test_hash_images_records_unreadable_files(tmp_path: Path) -> None:
    good = write_photo(tmp_path / "good.jpg", seed=4)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    refs = [
        ImageRef("s/good.jpg", str(good), None, None, 160, 120),
        ImageRef("s/bad.jpg", str(bad), None, None, 160, 120),
        ImageRef("s/gone.jpg", str(tmp_path / "gone.jpg"), None, None, 160, 120),
    ]
    seen: list[tuple[int, int]] = []
    hashes = hash_images(refs, progress=lambda done, total: seen.append((done, total)))
    assert hashes["image_id"].to_list() == ["s/good.jpg", "s/bad.jpg", "s/gone.jpg"]
    assert hashes["phash"].null_count() == 2 and hashes["phash"][0] is not None
    assert "cannot" in hashes["error"][1] and "FileNotFoundError" in hashes["error"][2]
    assert seen[-1] == (3, 3)
    # worker processes give the same table, in the same order
    assert hash_images(refs, workers=2, batch_size=1).equals(hashes)


def test_find_leaks_names_missing_columns() -> None:
    train = pl.DataFrame({"image_id": ["a"], "content_hash": ["x"]})
    with pytest.raises(ValueError, match=r"phash.*found: \['image_id', 'content_hash'\]"):
        find_leaks(train, train, methods=("perceptual",))
    with pytest.raises(ValueError, match="train_vectors"):
        find_leaks(train, train, methods=("semantic",))
    with pytest.raises(ValueError, match="unknown leak method"):
        find_leaks(train, train, methods=("fuzzy",))


def test_split_pairs_put_train_first() -> None:
    assert split_pairs(["test", "val", "train"]) == [("train", "val"), ("train", "test"), ("val", "test")]
    assert split_pairs(["train"]) == []
