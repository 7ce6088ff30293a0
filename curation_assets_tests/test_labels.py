"""Label inputs (layout, labels files, external flags) and k-NN label issues."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest

from curation_assets.core.labeled.labels import (
    EXTERNAL_FLAG_FIELDS,
    label_issue_summary,
    label_issues,
    labels_from_layout,
    match_flags,
    match_labels,
    read_external_flags,
    read_labels_file,
)
from curation_assets_tests.test_leaks import _inventory

N_CLASSES, PER_CLASS, DIM = 10, 100, 32


def _clusters(seed: int, noise: float = 0.15) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(vectors, true class, class centres): Gaussian clusters around random unit centres."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(N_CLASSES, DIM))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    truth = np.repeat(np.arange(N_CLASSES), PER_CLASS)
    vectors = centres[truth] + rng.normal(scale=noise, size=(len(truth), DIM))
    return vectors, truth, centres


def _swap(truth: np.ndarray, share: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(given labels with a share of them changed to another class, the changed rows)."""
    given = truth.copy()
    swapped = rng.choice(len(truth), int(share * len(truth)), replace=False)
    given[swapped] = (truth[swapped] + rng.integers(1, N_CLASSES, len(swapped))) % N_CLASSES
    return given, swapped


@pytest.mark.parametrize("seed", [0, 1])
def test_planted_label_swaps_are_found(seed: int) -> None:
    vectors, truth, _ = _clusters(seed, noise=0.2)  # neighbouring clusters touch at this spread
    rng = np.random.default_rng(100 + seed)
    given, swapped = _swap(truth, 0.05, rng)
    names = [f"class_{g}" for g in given]
    issues = label_issues(vectors, names, image_ids=[f"img{i}" for i in range(len(names))], k=10)
    flagged = set(np.flatnonzero(issues["is_mislabel"].to_numpy()))
    hits = flagged & set(swapped.tolist())
    assert len(hits) / len(swapped) >= 0.8  # recall
    assert len(hits) / max(len(flagged), 1) >= 0.8  # precision
    # the suggestion is the true class for found swaps, with little support for the given one
    found = issues[sorted(hits)]
    assert (found["suggested_label"] == pl.Series([f"class_{truth[i]}" for i in sorted(hits)])).mean() >= 0.9
    clean = issues.filter(~pl.col("is_mislabel"))
    assert clean["label_confidence"].median() > 0.8
    assert issues["image_id"][0] == "img0" and issues.height == len(names)
    assert issues.filter(pl.col("is_mislabel"))["issue"].list.contains("mislabel").all()


def test_planted_outliers_are_found() -> None:
    vectors, truth, centres = _clusters(2)
    rng = np.random.default_rng(7)
    # far from every cluster: random directions with the centres' span projected out
    far = rng.normal(size=(10, DIM))
    basis, _ = np.linalg.qr(centres.T)
    far -= far @ basis @ basis.T
    vectors = np.vstack([vectors, far])
    labels = [f"class_{t}" for t in truth] + [f"class_{c}" for c in rng.integers(0, N_CLASSES, 10)]
    issues = label_issues(vectors, labels)
    outliers = issues["is_outlier"].to_numpy()
    assert outliers[-10:].all()
    assert outliers[:-10].mean() <= 0.01  # at most 1% of ordinary images
    assert issues["outlier_score"][-10:].min() > issues["outlier_score"][:-10].median()
    summary = label_issue_summary(issues)
    assert summary["outlier_candidates"] == int(outliers.sum())
    assert summary["images"] == len(labels)


def test_images_in_a_region_two_classes_share_are_ambiguous() -> None:
    vectors, truth, centres = _clusters(3)
    rng = np.random.default_rng(8)
    # a concept both classes hold (ImageNet's "laptop" and "notebook"): one blob, half labeled each,
    # away from the other clusters
    centre = rng.normal(size=DIM)
    basis, _ = np.linalg.qr(centres.T)
    centre -= basis @ (basis.T @ centre)
    blob = centre / np.linalg.norm(centre) + rng.normal(scale=0.15, size=(30, DIM))
    vectors = np.vstack([vectors, blob])
    labels = [f"class_{t}" for t in truth] + ["class_0", "class_1"] * 15
    issues = label_issues(vectors, labels, k=10)
    shared = issues[-30:]
    assert shared["is_ambiguous"].mean() >= 0.5
    ambiguous = shared.filter(pl.col("is_ambiguous"))
    pair = ambiguous.select(pl.concat_list("suggested_label", "runner_up_label").list.sort())[
        "suggested_label"
    ]
    assert (pair.to_list().count(["class_0", "class_1"])) >= 0.9 * ambiguous.height
    assert (ambiguous["suggested_confidence"] - ambiguous["runner_up_confidence"]).max() <= 0.25
    assert issues[:-30]["is_ambiguous"].mean() < 0.02
    assert shared["issue"].list.contains("ambiguous").sum() == ambiguous.height


def test_unlabeled_and_unusable_vectors_are_recorded_not_fatal() -> None:
    vectors, truth, _ = _clusters(4)
    vectors[5] = 0.0
    vectors[6, 0] = np.nan
    labels: list[str | None] = [f"class_{t}" for t in truth]
    labels[7] = None
    labels[8] = ""
    issues = label_issues(vectors, labels)
    assert issues["issue"][5].to_list() == ["no_vector"] and issues["issue"][6].to_list() == ["no_vector"]
    assert issues["knn_distance"][5] is None
    assert issues["given_label"][7] is None and issues["given_label"][8] is None
    assert not issues["is_mislabel"][7] and issues["label_confidence"][7] is None
    assert issues["suggested_label"][7] == f"class_{truth[7]}"  # its neighbours still say what it looks like
    with pytest.raises(ValueError, match="labels for"):
        label_issues(vectors, labels[:-1])


def _tree(root: Path) -> dict[str, str]:
    files = [
        "train/cat/c1.jpg",
        "train/cat/c2.jpg",
        "train/dog/d1.jpg",
        "train/dog/puppies/d2.jpg",
        "train/loose.jpg",
        "val/cat/v1.jpg",
        "val/dog/v2.jpg",
    ]
    for rel in files:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(rel.encode())
    return {"train": str(root / "train"), "val": str(root / "val")}


def test_labels_from_layout_on_a_small_tree(tmp_path: Path) -> None:
    roots = _tree(tmp_path)
    expected = {
        "train.cat/c1.jpg": "cat",
        "train.cat/c2.jpg": "cat",
        "train.dog/d1.jpg": "dog",
        "train.dog/puppies/d2.jpg": "dog",
        "train._root/loose.jpg": None,
        "val.cat/v1.jpg": "cat",
        "val.dog/v2.jpg": "dog",
    }
    inventory = _inventory(roots)
    for given_roots in (roots, None):
        labels = labels_from_layout(inventory, given_roots)
        assert dict(labels.select("image_id", "label").iter_rows()) == expected
    # the chunks rule keeps root-relative paths: the class is their first folder
    chunked = labels_from_layout(_inventory(roots, rule="chunks"))
    assert sorted(chunked["label"].to_list(), key=str) == sorted(expected.values(), key=str)


def test_labels_file_matches_by_id_path_and_suffix(tmp_path: Path) -> None:
    roots = _tree(tmp_path / "data")
    inventory = _inventory(roots)
    refs = [
        ("train.cat/c1.jpg", "cat"),  # image id
        (str(tmp_path / "data" / "train" / "cat" / "c2.jpg"), "cat"),  # absolute path
        ("train/dog/d1.jpg", "wolf"),  # relative to the dataset
        ("puppies/d2.jpg", "dog"),  # a shorter suffix
        ("v1.jpg", "cat"),  # a bare file name, unique
        ("missing/x.jpg", "cat"),
    ]
    pl.DataFrame({"file": [r for r, _ in refs], "cls": [c for _, c in refs], "text": ["a"] * 6}).write_csv(
        tmp_path / "labels.csv"
    )
    labels = read_labels_file(
        tmp_path / "labels.csv", id_column="file", label_column="cls", caption_column="text"
    )
    matched = match_labels(labels, inventory)
    assert matched["matched_by"].to_list() == [
        "image_id",
        "path",
        "path_suffix",
        "path_suffix",
        "path_suffix",
        "unmatched",
    ]
    assert matched["image_id"].to_list() == [
        "train.cat/c1.jpg",
        "train.cat/c2.jpg",
        "train.dog/d1.jpg",
        "train.dog/puppies/d2.jpg",
        "val.cat/v1.jpg",
        None,
    ]
    assert matched["caption"].to_list() == ["a"] * 6
    # a file name found twice is ambiguous, never guessed
    (tmp_path / "data" / "val" / "dog" / "c1.jpg").write_bytes(b"again")
    again = match_labels(pl.DataFrame({"ref": ["c1.jpg"], "label": ["cat"]}), _inventory(roots))
    assert again.row(0)[:2] == (None, "ambiguous")
    # parquet works alike; a wrong column name lists the columns found
    pl.DataFrame({"image_id": ["train.cat/c1.jpg"], "label": ["cat"]}).write_parquet(tmp_path / "l.parquet")
    assert read_labels_file(tmp_path / "l.parquet")["label"].to_list() == ["cat"]
    with pytest.raises(ValueError, match=r"'class' \(for label\).*\['file', 'cls', 'text'\]"):
        read_labels_file(tmp_path / "labels.csv", id_column="file", label_column="class")


def test_labels_file_with_conflicting_labels_is_refused(tmp_path: Path) -> None:
    (tmp_path / "l.csv").write_text("image_id,label\na/1.jpg,cat\na/1.jpg,dog\na/2.jpg,cat\na/2.jpg,cat\n")
    with pytest.raises(ValueError, match=r"1 image\(s\) have more than one label.*a/1.jpg"):
        read_labels_file(tmp_path / "l.csv")


def _export(path: Path) -> None:
    pl.DataFrame(
        {
            "id": ["train.cat/c1.jpg", None, None],
            "path": [None, "train/dog/d1.jpg", "nowhere.jpg"],
            "class": ["cat", "dog", "dog"],
            "flag": ["mislabel", "outlier", "duplicate"],
            "score": ["0.91", "0.5", ""],
            "suggestion": ["dog", None, None],
            "note": ["looks like a dog", "odd", "x"],
        }
    ).write_csv(path)


MAPPING = {
    "image_id": "id",
    "image_path": "path",
    "label": "class",
    "issue_type": "flag",
    "confidence": "score",
    "suggested_label": "suggestion",
    "reason": "note",
}


def test_external_flags_read_through_a_column_mapping(tmp_path: Path) -> None:
    roots = _tree(tmp_path / "data")
    _export(tmp_path / "flags.csv")
    flags = read_external_flags(tmp_path / "flags.csv", MAPPING)
    assert tuple(flags.columns) == EXTERNAL_FLAG_FIELDS
    assert flags["issue_type"].to_list() == ["mislabel", "outlier", "duplicate"]
    assert flags["confidence"].to_list() == [0.91, 0.5, None]
    assert flags["suggested_label"][0] == "dog" and flags["reason"][0] == "looks like a dog"
    matched = match_flags(flags, _inventory(roots))
    assert matched["image_id"].to_list() == ["train.cat/c1.jpg", "train.dog/d1.jpg", None]
    assert matched["matched_by"].to_list() == ["image_id", "path_suffix", "unmatched"]
    # fields left out of the mapping are null
    partial = read_external_flags(tmp_path / "flags.csv", {"image_path": "path", "issue_type": "flag"})
    assert partial["label"].null_count() == 3 and partial["image_path"][1] == "train/dog/d1.jpg"


def test_wrong_flag_mapping_lists_the_columns_found(tmp_path: Path) -> None:
    _export(tmp_path / "flags.csv")
    wrong = {**MAPPING, "issue_type": "issue", "label": "label"}
    with pytest.raises(ValueError) as caught:
        read_external_flags(tmp_path / "flags.csv", wrong)
    message = str(caught.value)
    assert "'issue' (for issue_type)" in message and "'label' (for label)" in message
    assert "['id', 'path', 'class', 'flag', 'score', 'suggestion', 'note']" in message
    assert "'issue_type': 'issue'" in message  # the mapping it expected
    with pytest.raises(ValueError, match="unknown external flag field"):
        read_external_flags(tmp_path / "flags.csv", {**MAPPING, "severity": "note"})
    with pytest.raises(ValueError, match="must name issue_type"):
        read_external_flags(tmp_path / "flags.csv", {"image_id": "id"})
    with pytest.raises(ValueError, match=r"'note' \(confidence\).*not numbers"):
        read_external_flags(tmp_path / "flags.csv", {**MAPPING, "confidence": "note"})
