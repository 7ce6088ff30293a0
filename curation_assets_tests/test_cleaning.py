"""Cleaning outputs from a reviewed manifest, applied to an image folder by the torch Dataset wrapper."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
import torch

from curation_assets.core.labeled.cleaning import cleaning_outputs, final_actions
from curation_assets.core.labeled.review import build_review_manifest, merge_human_decisions
from curation_assets.torch_dataset import CuratedImageFolder
from curation_assets_tests.conftest import write_photo

CLASSES = {"cat": 4, "dog": 3, "owl": 2}


def make_splits(tmp_path: Path) -> tuple[dict[str, Path], pl.DataFrame]:
    """train/ and test/ image folders (class per subfolder) and their images table."""
    roots = {"train": tmp_path / "data" / "train", "test": tmp_path / "data" / "test"}
    rows = []
    seed = 0
    for split, root in roots.items():
        for name, count in CLASSES.items():
            for i in range(count if split == "train" else 1):
                seed += 1
                sub = "nested/" if (name == "cat" and i == 3) else ""  # images below a class folder count too
                path = write_photo(root / name / f"{sub}{name}_{i}.jpg", seed, size=(24, 18))
                rel = path.relative_to(root).as_posix()
                rows.append(
                    {
                        "image_id": f"{split}.{name}/{rel.split('/', 1)[1]}",
                        "split": split,
                        "label": name,
                        "source_path": str(path),
                        "offset": None,
                        "size_bytes": None,
                    }
                )
    return roots, pl.DataFrame(rows, schema_overrides={"offset": pl.Int64, "size_bytes": pl.Int64})


def flags_for(images: pl.DataFrame) -> pl.DataFrame:
    ids = {(r["split"], Path(r["source_path"]).name): r["image_id"] for r in images.iter_rows(named=True)}
    rows = [
        # machine alone removes exact copies and relabels confident mislabels with a suggestion
        (ids["train", "cat_0.jpg"], "duplicate", "exact", None, None, None),
        (ids["train", "dog_1.jpg"], "label", "mislabel", "8/10 neighbours say owl", 0.95, "owl"),
        # only flagged: kept unless a human decides
        (ids["train", "owl_0.jpg"], "label", "outlier", None, 0.7, None),
        (ids["train", "cat_3.jpg"], "quality", "blur", None, None, None),
        # the human will overrule these
        (ids["train", "cat_1.jpg"], "duplicate", "exact", None, None, None),
        (ids["train", "dog_2.jpg"], "label", "mislabel", None, 0.5, "cat"),
        (ids["test", "dog_0.jpg"], "leak", "perceptual", "hamming 2 to train.dog/dog_0.jpg", None, None),
    ]
    return pl.DataFrame(
        rows, schema=["image_id", "source", "flag", "detail", "confidence", "suggested_label"], orient="row"
    )


def write_decisions(path: Path, rows: list[tuple[str, str, str, str, str]]) -> Path:
    lines = ["image_id,user_tags,user_action,new_label,reviewer"] + [
        ",".join(f'"{v}"' for v in r) for r in rows
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def reviewed(tmp_path: Path):
    roots, images = make_splits(tmp_path)
    manifest = build_review_manifest(flags_for(images), images)
    by_name = {(r["split"], Path(r["source_path"]).name): r["image_id"] for r in images.iter_rows(named=True)}
    csv_path = write_decisions(
        tmp_path / "decisions.csv",
        [
            (by_name["train", "cat_1.jpg"], "", "keep", "", "ann"),  # human keeps a machine removal
            (by_name["train", "dog_2.jpg"], "mislabel_confirmed", "relabel", "fox", "ann"),  # a new class
            (by_name["test", "dog_0.jpg"], "train_test_leak", "remove", "", "bo"),
            (by_name["train", "owl_0.jpg"], "outlier_valid", "", "", "bo"),  # tagged, no action
        ],
    )
    return roots, images, merge_human_decisions(manifest, csv_path), by_name


def test_final_actions_let_the_human_win_and_keep_what_nobody_removes(reviewed) -> None:
    _, _, manifest, by_name = reviewed
    final = {r["image_id"]: r for r in final_actions(manifest).iter_rows(named=True)}
    expect = {
        ("train", "cat_0.jpg"): ("remove", "machine", "cat"),
        ("train", "dog_1.jpg"): ("relabel", "machine", "owl"),
        ("train", "owl_0.jpg"): ("keep", "machine", "owl"),
        ("train", "cat_3.jpg"): ("keep", "machine", "cat"),
        ("train", "cat_1.jpg"): ("keep", "human", "cat"),
        ("train", "dog_2.jpg"): ("relabel", "human", "fox"),
        ("test", "dog_0.jpg"): ("remove", "human", "dog"),
    }
    assert set(final) == {by_name[k] for k in expect}
    for key, (action, who, label) in expect.items():
        row = final[by_name[key]]
        assert (row["final_action"], row["decided_by"], row["final_label"]) == (action, who, label), key


def test_cleaning_outputs_write_sorted_split_relative_entries(reviewed, tmp_path: Path) -> None:
    roots, _, manifest, by_name = reviewed
    paths = cleaning_outputs(manifest, tmp_path / "out", roots=roots)
    assert set(paths) == {"removal_list", "relabel_map", "final_manifest"}
    assert paths["removal_list"].read_text().splitlines() == ["test/dog/dog_0.jpg", "train/cat/cat_0.jpg"]
    assert json.loads(paths["relabel_map"].read_text()) == {
        "train/dog/dog_1.jpg": "owl",
        "train/dog/dog_2.jpg": "fox",
    }
    final = pl.read_parquet(paths["final_manifest"])
    assert len(final) == len(manifest)
    assert set(final["image_id"]) == set(manifest["image_id"])
    assert {"final_action", "final_label", "decided_by", "entry", "user_tags", "machine_tags"} <= set(
        final.columns
    )
    # Same decisions, same bytes: the outputs can be diffed between runs.
    before = paths["removal_list"].read_bytes(), paths["relabel_map"].read_bytes()
    cleaning_outputs(manifest, tmp_path / "out", roots=roots)
    assert (paths["removal_list"].read_bytes(), paths["relabel_map"].read_bytes()) == before
    # Without roots the entries are the stable image ids.
    plain = cleaning_outputs(manifest, tmp_path / "plain")
    assert plain["removal_list"].read_text().splitlines() == sorted(
        [by_name["test", "dog_0.jpg"], by_name["train", "cat_0.jpg"]]
    )


def test_dataset_wrapper_drops_removed_images_and_applies_new_labels(reviewed, tmp_path: Path) -> None:
    roots, images, manifest, _ = reviewed
    paths = cleaning_outputs(manifest, tmp_path / "out", roots=roots)
    plain = CuratedImageFolder(roots["train"])
    cleaned = CuratedImageFolder(
        roots["train"],
        paths["removal_list"],
        paths["relabel_map"],
        split="train",
        transform=lambda im: im.size,
    )
    assert len(plain) == sum(CLASSES.values())
    assert plain.classes == sorted(CLASSES)
    assert cleaned.classes == ["cat", "dog", "fox", "owl"]  # "fox" exists only through the relabel map
    labels = {Path(p).relative_to(roots["train"]).as_posix(): cleaned.classes[t] for p, t in cleaned.samples}
    expected = {
        Path(r["source_path"]).relative_to(roots["train"]).as_posix(): r["label"]
        for r in images.filter(pl.col("split") == "train").iter_rows(named=True)
    }
    del expected["cat/cat_0.jpg"]
    expected["dog/dog_1.jpg"] = "owl"
    expected["dog/dog_2.jpg"] = "fox"
    assert labels == expected
    assert "cat/nested/cat_3.jpg" in labels
    assert cleaned.removed == ["cat/cat_0.jpg"]
    assert cleaned.targets == [t for _, t in cleaned.samples]
    image, target = cleaned[0]
    assert image == (24, 18) and target == cleaned.samples[0][1]
    loader = torch.utils.data.DataLoader(
        CuratedImageFolder(
            roots["train"],
            paths["removal_list"],
            paths["relabel_map"],
            split="train",
            transform=lambda im: torch.zeros(3, 2, 2),
        ),
        batch_size=4,
    )
    assert sum(len(targets) for _, targets in loader) == len(cleaned)
    # The test split takes only its own entries.
    test = CuratedImageFolder(roots["test"], paths["removal_list"], paths["relabel_map"], split="test")
    assert sorted(Path(p).name for p, _ in test.samples) == ["cat_0.jpg", "owl_0.jpg"]


def test_dataset_wrapper_refuses_entries_that_name_no_file(reviewed, tmp_path: Path) -> None:
    roots, _, manifest, _ = reviewed
    paths = cleaning_outputs(manifest, tmp_path / "out", roots=roots)
    with pytest.raises(ValueError, match="pass split="):
        CuratedImageFolder(roots["train"], paths["removal_list"], paths["relabel_map"])
    with pytest.raises(ValueError, match="name no image"):
        CuratedImageFolder(roots["train"], ["cat/missing.jpg"])
    lenient = CuratedImageFolder(roots["train"], ["# a comment", "", "cat/missing.jpg"], strict=False)
    assert lenient.unmatched == ["cat/missing.jpg"]
    assert len(lenient) == sum(CLASSES.values())
    with pytest.raises(ValueError, match="without a label"):
        CuratedImageFolder(roots["train"], relabel_map={"cat/cat_1.jpg": ""})


def test_relabel_without_a_label_is_an_error(tmp_path: Path) -> None:
    manifest = pl.DataFrame(
        {
            "image_id": ["a"],
            "label": ["x"],
            "user_action": ["relabel"],
            "machine_action": [None],
            "new_label": [None],
            "suggested_label": [None],
        },
        schema_overrides={"machine_action": pl.String, "new_label": pl.String, "suggested_label": pl.String},
    )
    with pytest.raises(ValueError, match="no new label"):
        cleaning_outputs(manifest, tmp_path)
    with pytest.raises(ValueError, match="'drop' of 'a' is not one of"):
        final_actions(manifest.with_columns(user_action=pl.lit("drop")))
