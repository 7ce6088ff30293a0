"""The labeled-dataset assets on a generated train/test demo: planted leaks found by the right
methods and nothing else, the review manifest and page, human decisions winning on re-materialize
and reaching the removal list and relabel map, and class subsets of exact sizes."""

import csv
import json
from pathlib import Path

import dagster as dg
import polars as pl
import pytest

from curation_assets.assets.ingest.discovery import partitions_name
from curation_assets.config import load_project
from curation_assets.core.labeled.review import DECISION_COLUMNS
from curation_assets.definitions import build_definitions
from curation_assets.demo.labeled import generate_labeled_demo
from curation_assets.resources.store import StoreResource
from curation_assets.runner import materialize_project, materialize_selection
from curation_assets.torch_dataset import CuratedImageFolder
from curation_assets_tests.conftest import make_project

pytestmark = pytest.mark.xdist_group("labeled")

BROKEN = "broken.jpg"
LABELED_ASSETS = {
    "perceptual_hashes",
    "train_test_leaks",
    "label_issues",
    "review_manifest",
    "cleaning_outputs",
    "class_subsets",
}


def _project(root: Path, demo, decisions: Path, target: Path, external: Path):
    return make_project(
        root,
        demo.roots,
        stages={
            "embeddings": {
                "enabled": True,
                "copy_model": "descriptor",
                "semantic_model": "descriptor_content",
            },
            "train_test_leaks": {"enabled": True, "min_similarity": 0.97, "workers": 1},
            "label_issues": {"enabled": True, "k": 5},
        },
        labels={"source": "layout"},
        review={"enabled": True, "decisions_csv": str(decisions)},
        external_flags={
            "path": str(external),
            "mapping": {"image_path": "file", "issue_type": "issue", "confidence": "score"},
        },
        class_subsets={
            "enabled": True,
            "subsets": {
                "by_count": {"kind": "count", "n": 12, "split": "train"},
                "two_classes": {"kind": "classes", "k": 2, "seed": 1, "split": "train"},
                "tail": {"kind": "trim_tail", "k": 1, "ceil": 3, "split": "train"},
                "matched": {"kind": "frequency", "n": 8, "target": str(target), "split": "train"},
            },
        },
        # the curation decisions' downstream outputs are not under test here
        export={"enabled": False},
        report={"enabled": False},
    )


@pytest.fixture(scope="module")
def labeled_run(tmp_path_factory: pytest.TempPathFactory):
    """3 classes x (10 train + 3 test) plus 8 planted leaks, a truncated file and another tool's
    flag, materialized once."""
    root = tmp_path_factory.mktemp("labeled")
    demo = generate_labeled_demo(
        root / "demo", n_classes=3, per_class=10, test_per_class=3, leaks_per_kind=2, seed=0
    )
    truth = pl.read_parquet(demo.ground_truth_path)
    train_dir = Path(demo.roots["train"]) / demo.classes[0]
    whole = sorted(train_dir.glob("*.jpg"))[0].read_bytes()
    (train_dir / BROKEN).write_bytes(whole[: len(whole) // 2])  # a partial download
    external = root / "other_tool.csv"
    blurry = truth.filter((pl.col("split") == "test") & pl.col("leak_of").is_null())["rel_path"][0]
    external.write_text(f"file,issue,score\n{demo.images_root / blurry},Blurry,0.8\n")
    target = root / "target.json"
    target.write_text(json.dumps({demo.classes[0]: 2, demo.classes[1]: 1, demo.classes[2]: 1}))
    project = _project(root, demo, root / "review_decisions.csv", target, external)
    defs = build_definitions([project])
    instance = dg.DagsterInstance.ephemeral()
    summary = materialize_project(project, defs, instance, echo=lambda _: None)
    store = StoreResource().for_project(project)
    return project, defs, instance, store, demo, truth, summary


def _manifest(store) -> pl.DataFrame:
    return pl.read_parquet(store.global_path("review_manifest", "review_manifest.parquet"))


def test_every_shard_and_global_asset_materializes(labeled_run):
    project, defs, instance, store, _, _, summary = labeled_run
    assert summary.failed == []
    shards = set(instance.get_dynamic_partitions(partitions_name(project)))
    assert len(shards) == 6 and set(summary.shards_run) == shards
    assert set(store.shards_written("perceptual_hashes")) == shards
    # the headless runner knows the hashes are current: nothing to redo
    again = materialize_project(project, defs, instance, run_global=False, echo=lambda _: None)
    assert again.shards_run == [] and set(again.shards_skipped) == shards
    for asset, check in [
        ("perceptual_hashes", "every_kept_image_has_a_perceptual_hash"),
        ("train_test_leaks", "leaks_cross_splits_within_thresholds"),
        ("label_issues", "one_row_per_image"),
        ("review_manifest", "one_row_per_image"),
        ("review_manifest", "tags_in_the_taxonomy"),
        ("cleaning_outputs", "files_match_the_final_manifest"),
        ("class_subsets", "subset_sizes_as_specified"),
    ]:
        key = dg.AssetCheckKey(dg.AssetKey([project.name, asset]), check)
        records = instance.event_log_storage.get_latest_asset_check_execution_by_key([key])
        assert records[key].evaluation and records[key].evaluation.passed, (asset, check)


def test_planted_leaks_found_by_the_right_methods_and_nothing_else(labeled_run):
    _, _, _, store, _, truth, _ = labeled_run
    leaks = pl.read_parquet(store.global_path("train_test_leaks", "train_test_leaks.parquet"))
    planted = truth.filter(pl.col("leak_of").is_not_null())
    pairs = {(row["leak_of"], row["image_id"]): row["leak_kind"] for row in planted.iter_rows(named=True)}

    def found(method: str) -> set[tuple[str, str]]:
        rows = leaks.filter(pl.col("method") == method)
        return set(zip(rows["train_image"], rows["test_image"], strict=True))

    assert set(leaks["method"]) == {"exact", "perceptual", "semantic"}
    assert found("exact") == {pair for pair, kind in pairs.items() if kind == "byte_copy"}
    assert found("perceptual") == set(pairs)  # re-encodes and 1-2% crops stay within 5 bits
    assert found("semantic") <= set(pairs)  # unrelated views of one photo stay under 0.97
    assert set(zip(leaks["train_image"], leaks["test_image"], strict=True)) == set(pairs)
    assert (leaks["train_split"] == "train").all() and (leaks["test_split"] == "test").all()
    byte_copies = leaks.filter(
        pl.col("test_image").is_in([t for (_, t), k in pairs.items() if k == "byte_copy"])
    )
    assert set(byte_copies["leak_type"]) == {"exact_copy"}
    assert set(leaks.filter(pl.col("method") == "perceptual")["hamming_distance"]) <= set(range(6))


def test_review_manifest_lists_the_leaks_and_writes_the_page(labeled_run):
    _, _, _, store, demo, truth, _ = labeled_run
    manifest = _manifest(store)
    leaked = truth.filter(pl.col("leak_of").is_not_null())
    rows = leaked.select("image_id").join(manifest, on="image_id", how="left")
    assert rows["machine_tags"].null_count() == 0, "a leaked test image is missing from the manifest"
    assert all("train_test_leak" in tags for tags in rows["machine_tags"])
    assert all(any(flag.startswith("leak/") for flag in flags) for flags in rows["flags"])
    # the training copy is listed too: removing either side is the reviewer's call
    sources = manifest.filter(pl.col("image_id").is_in(leaked["leak_of"].to_list()))
    assert sources.height == leaked.height
    assert manifest["image_id"].n_unique() == manifest.height
    # a truncated file is corrupt and removed without review; another tool's flag is mapped to a tag
    broken = manifest.filter(pl.col("image_id") == f"train.{demo.classes[0]}/{BROKEN}").row(0, named=True)
    assert broken["flags"] == ["sanitize/corrupt:truncated"] and broken["machine_action"] == "remove"
    assert broken["machine_tags"] == ["low_quality_corrupt"]
    external = manifest.filter(pl.col("flags").list.contains("external/Blurry"))
    assert external.height == 1 and external["machine_tags"][0].to_list() == ["low_quality_blur"]
    page = store.asset_dir("review_manifest") / "review.html"
    assert page.is_file() and leaked["image_id"][0] in page.read_text(encoding="utf-8")
    thumbs = list((store.asset_dir("review_manifest") / "thumbs").glob("*.jpg"))
    assert len(thumbs) == manifest.height - 1  # the truncated file gets a placeholder on the page


def test_human_decisions_win_and_reach_the_cleaning_outputs(labeled_run):
    project, defs, instance, store, demo, truth, _ = labeled_run
    manifest = _manifest(store)
    leaked = truth.filter(pl.col("leak_kind") == "reencode_jpeg").sort("image_id")
    to_remove, to_relabel = leaked["image_id"][0], leaked["image_id"][1]
    old_label = leaked["label"][1]
    new_label = next(c for c in demo.classes if c != old_label)
    machine_removed = manifest.filter(
        (pl.col("machine_action") == "remove") & pl.col("machine_tags").list.contains("duplicate_exact")
    )["image_id"].sort()
    assert len(machine_removed) >= 1  # exact copies are removed by the machine alone
    to_keep = machine_removed[0]

    decisions = Path(project.review.decisions_csv)
    with decisions.open("w", newline="", encoding="utf-8") as handle:  # the page's export format
        writer = csv.writer(handle, quoting=csv.QUOTE_ALL, lineterminator="\n")
        writer.writerow(DECISION_COLUMNS)
        writer.writerow([to_remove, "train_test_leak;remove", "remove", "", "tester"])
        writer.writerow([to_relabel, "mislabel_confirmed;relabel", "relabel", new_label, "tester"])
        writer.writerow([to_keep, "keep", "keep", "", "tester"])
    result = materialize_selection(
        project, defs, instance, ["review_manifest", "cleaning_outputs"], echo=lambda _: None
    )
    assert result.failed == []

    merged = {row["image_id"]: row for row in _manifest(store).iter_rows(named=True)}
    assert merged[to_remove]["user_action"] == "remove" and merged[to_remove]["reviewer"] == "tester"
    assert merged[to_relabel]["new_label"] == new_label
    assert merged[to_keep]["user_action"] == "keep" and merged[to_keep]["machine_action"] == "remove"

    folder = store.asset_dir("cleaning_outputs")
    removal = (folder / "removal_list.txt").read_text(encoding="utf-8").splitlines()
    relabel = json.loads((folder / "relabel_map.json").read_text(encoding="utf-8"))
    rel_path = dict(zip(truth["image_id"], truth["rel_path"], strict=True))
    assert rel_path[to_remove] in removal
    assert rel_path[to_keep] not in removal  # the human's keep beats the machine's remove
    assert relabel == {rel_path[to_relabel]: new_label}
    final = pl.read_parquet(folder / "final_manifest.parquet")
    assert set(final.filter(pl.col("decided_by") == "human")["image_id"]) == {to_remove, to_relabel, to_keep}

    # the torch wrapper applies them to the test folder as training code would
    test = CuratedImageFolder(
        demo.roots["test"],
        removal_list=folder / "removal_list.txt",
        relabel_map=folder / "relabel_map.json",
        split="test",
    )
    files = {Path(path).name: target for path, target in test.samples}
    assert Path(rel_path[to_remove]).name not in files
    assert test.classes[files[Path(rel_path[to_relabel]).name]] == new_label
    assert f"train/{demo.classes[0]}/{BROKEN}" in removal
    train = CuratedImageFolder(
        demo.roots["train"], removal_list=folder / "removal_list.txt", split="train", strict=True
    )
    assert BROKEN not in {Path(path).name for path, _ in train.samples}


def test_class_subsets_have_exact_sizes(labeled_run):
    _, _, _, store, demo, _, _ = labeled_run
    sizes = {}
    for name in ("by_count", "two_classes", "tail", "matched"):
        subset = pl.read_parquet(store.global_path("class_subsets", f"{name}.parquet"))
        assert (subset["split"] == "train").all()
        sizes[name] = dict(subset.group_by("label").len().iter_rows())
    first, second, third = demo.classes
    assert sizes["by_count"] == {first: 4, second: 4, third: 4}
    assert len(sizes["two_classes"]) == 2 and set(sizes["two_classes"].values()) == {10}
    assert sorted(sizes["tail"].values()) == [3, 10, 10]
    assert sizes["matched"] == {first: 4, second: 2, third: 2}


def test_labeled_assets_exist_only_when_switched_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    roots = {"train": str(tmp_path / "train"), "test": str(tmp_path / "test")}

    def names(project) -> set[str]:
        keys = build_definitions([project]).resolve_asset_graph().get_all_asset_keys()
        return {key.path[-1] for key in keys} & LABELED_ASSETS

    assert names(make_project(tmp_path, roots)) == set()
    exact_only = make_project(
        tmp_path, roots, stages={"train_test_leaks": {"enabled": True, "methods": ["exact"]}}
    )
    assert names(exact_only) == {"train_test_leaks"}
    review_only = make_project(tmp_path, roots, review={"enabled": True})
    assert names(review_only) == {"review_manifest", "cleaning_outputs"}
    # the packaged labeled demo validates and switches every one of them on
    monkeypatch.setenv("CURATION_HOME", str(tmp_path))
    packaged = load_project(
        Path(__file__).parent.parent / "curation_assets" / "projects" / "labeled_demo.yaml"
    )
    assert names(packaged) == LABELED_ASSETS
    assert packaged.dataset.roots["test"] == str(tmp_path / "labeled_demo" / "images" / "test")


class _WordEncoder:
    """A stand-in for open_clip's text tower: one axis per class name found in the text."""

    def __init__(self, classes: tuple[str, ...]):
        self.classes = classes

    def __call__(self, texts):
        import torch

        return torch.tensor([[float(c in text.split()) for c in self.classes] for text in texts])


def test_caption_filter_keeps_captions_that_match_their_class(
    labeled_run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from curation_assets.assets.labeled import class_subsets as subsets_asset

    _, _, _, _, demo, truth, _ = labeled_run
    train = truth.filter((pl.col("split") == "train") & pl.col("leak_of").is_null()).sort("image_id")
    # every other image's caption names its own class; the rest describe something else
    captions = [
        f"a {label} seen up close" if i % 2 == 0 else "a blurry holiday snapshot"
        for i, label in enumerate(train["label"])
    ]
    labels_file = tmp_path / "labels.csv"
    pl.DataFrame(
        {"path": train["rel_path"].str.strip_prefix("train/"), "cls": train["label"], "text": captions}
    ).write_csv(labels_file)
    definitions = tmp_path / "definitions.csv"
    definitions.write_text("class,definition\n" + "".join(f"{c},a photo of a {c}\n" for c in demo.classes))
    project = make_project(
        tmp_path,
        {"train": demo.roots["train"]},
        name="captions",
        models={"clip": {"kind": "open_clip", "name": "ViT-B-32", "path": str(tmp_path / "clip.pt")}},
        labels={
            "source": "file",
            "file": str(labels_file),
            "id_column": "path",
            "label_column": "cls",
            "caption_column": "text",
        },
        class_subsets={
            "enabled": True,
            "subsets": {"all_classes": {"kind": "classes", "classes": list(demo.classes)}},
            "caption_filter": {"enabled": True, "class_definitions": str(definitions), "threshold": 0.5},
        },
        export={"enabled": False},
        report={"enabled": False},
    )
    defs = build_definitions([project])

    # without the weights file: a clear failure naming the model entry, nothing written
    instance = dg.DagsterInstance.ephemeral()
    failed = materialize_project(project, defs, instance, echo=lambda _: None)
    store = StoreResource().for_project(project)
    assert failed.failed and not store.asset_dir("class_subsets").exists()
    messages = [
        event.event_specific_data.error.message
        for run in instance.get_runs()
        for record in instance.get_records_for_run(run.run_id).records
        if (event := record.event_log_entry.dagster_event) and event.is_step_failure
    ]
    assert any("models.clip.path" in message for message in messages), messages

    class Loaded:
        encode_text = _WordEncoder(demo.classes)

    monkeypatch.setattr(subsets_asset, "load_project_model", lambda *args, **kwargs: Loaded())
    result = materialize_selection(project, defs, instance, ["class_subsets"], echo=lambda _: None)
    assert result.failed == []
    subset = pl.read_parquet(store.global_path("class_subsets", "all_classes.parquet"))
    assert subset.height == sum(1 for c in captions if c != "a blurry holiday snapshot")
    assert subset["caption"].str.contains("seen up close").all()
    for row in subset.iter_rows(named=True):
        assert row["label"] in row["caption"].split()
