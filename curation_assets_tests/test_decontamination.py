"""Decontamination against an evaluation set (references.sets, role decontaminate): the search,
the cached reference vectors, the decisions' reason and explanation, and the labeled demo's test
split acting as the evaluation set of a pool made of its train split."""

from __future__ import annotations

import logging
from pathlib import Path

import dagster as dg
import numpy as np
import polars as pl
import pytest

from curation_assets.assets.dedup.decontamination import borderline_path, matches_path, nearest_path
from curation_assets.assets.dedup.references import ensure_reference_vectors, refuse_other_model
from curation_assets.assets.outputs.decisions import decisions_path
from curation_assets.core.dedup.decontaminate import (
    borderline,
    contaminated,
    nearest_references,
    nearest_table,
)
from curation_assets.core.dedup.index import prepare
from curation_assets.core.outputs.decisions import DecisionInputs, build_decisions
from curation_assets.definitions import build_definitions
from curation_assets.resources.store import StoreResource
from curation_assets.runner import materialize_project
from curation_assets_tests.conftest import make_project, write_photo

LOG = logging.getLogger("test")
EMBEDDINGS = {"enabled": True, "copy_model": "descriptor", "semantic_model": "descriptor_content"}


# ----------------------------------------------------------------------------- the search


def test_nearest_references_equal_brute_force():
    rng = np.random.default_rng(0)
    pool = rng.normal(size=(700, 32)).astype(np.float16)
    refs = rng.normal(size=(90, 32)).astype(np.float16)
    mean = pool.astype(np.float32).mean(axis=0)
    found = nearest_references(pool, refs, mean, chunk=128)  # several chunks
    scores = prepare(pool, mean) @ prepare(refs, mean).T  # small case: brute force is the reference
    assert np.array_equal(found.rows, scores.argmax(axis=1))
    np.testing.assert_allclose(found.distance, 1 - scores.max(axis=1), atol=1e-5)


def test_matches_and_borderline_either_side_of_the_threshold():
    table = pl.DataFrame(
        {
            "image_id": ["a", "b", "c", "d", "e"],
            "reference_set": ["eval"] * 5,
            "reference_image": ["r1", "r2", "r3", "r4", "r5"],
            "distance": [0.01, 0.09, 0.1, 0.12, 0.5],
        },
        schema_overrides={"distance": pl.Float32},
    )
    assert contaminated(table, 0.1)["image_id"].to_list() == ["a", "b", "c"]
    edge = borderline(table, 0.1, margin=0.05, shown=2)
    assert edge.select("image_id", "side").rows() == [("b", "removed"), ("c", "removed"), ("d", "kept")]


def test_no_reference_matches_nothing():
    found = nearest_references(np.ones((3, 4), np.float16), np.zeros((0, 4), np.float16), np.zeros(4))
    assert nearest_table(["a", "b", "c"], "eval", [], found).is_empty()


# ----------------------------------------------------------------------------- the decisions


def _inputs(contamination: pl.DataFrame | None) -> DecisionInputs:
    ids = ["s/a.jpg", "s/b.jpg", "s/c.jpg"]
    inventory = pl.DataFrame(
        {
            "image_id": ids,
            "shard": ["s"] * 3,
            "split": ["train"] * 3,
            "rel_path": ["a.jpg", "b.jpg", "c.jpg"],
            "source_path": [f"/data/s/{n}" for n in ("a.jpg", "b.jpg", "c.jpg")],
            "offset": [None] * 3,
            "size_bytes": [10] * 3,
            "content_hash": ["h1", "h2", "h3"],
        },
        schema_overrides={"offset": pl.Int64},
    )
    sanitized = pl.DataFrame(
        {
            "image_id": ids,
            "status": ["valid"] * 3,
            "reasons": [[], [], []],
            "fixes": [[], [], []],
            "width": [10] * 3,
            "height": [10] * 3,
        },
        schema_overrides={"reasons": pl.List(pl.String), "fixes": pl.List(pl.String)},
    )
    return DecisionInputs(inventory, sanitized, contamination=contamination)


def test_contaminated_image_is_removed_with_the_set_and_the_reference_named():
    matches = pl.DataFrame(
        {
            "image_id": ["s/b.jpg", "s/b.jpg"],
            "reference_set": ["imagenet_val", "coco_val"],
            "reference_image": ["n01/val_7.JPEG", "000123.jpg"],
            "distance": [0.031, 0.08],
        },
        schema_overrides={"distance": pl.Float32},
    )
    decided = build_decisions(_inputs(matches), roots={"train": "/data"})
    b = decided.filter(pl.col("image_id") == "s/b.jpg").row(0, named=True)
    assert b["action"] == "remove" and b["stage"] == "decontamination"
    assert b["reasons"] == ["contamination:coco_val", "contamination:imagenet_val"]
    assert "n01/val_7.JPEG" in b["explanation"] and "imagenet_val" in b["explanation"]
    assert "0.0310" in b["explanation"] and "coco_val" in b["explanation"]
    kept = decided.filter(pl.col("image_id") != "s/b.jpg")
    assert kept["action"].to_list() == ["keep", "keep"] and kept["explanation"].to_list() == ["kept", "kept"]


def test_without_references_the_decisions_are_unchanged():
    """No decontaminate set: no new column, no new reason, the same frame as before the stage existed."""
    decided = build_decisions(_inputs(None), roots={"train": "/data"})
    assert not any(c.startswith("contamination") for c in decided.columns)
    assert decided["reasons"].to_list() == [[], [], []]


# ----------------------------------------------------------------------------- reference vectors


def test_reference_vectors_are_cached_and_recomputed_for_another_model(tmp_path: Path):
    eval_dir = tmp_path / "eval"
    for i in range(4):
        write_photo(eval_dir / "cls" / f"e{i}.jpg", 500 + i)
    sets = {"sets": {"eval": {"role": "decontaminate", "path": str(eval_dir)}}}
    embeddings = {"enabled": True, "copy_model": "descriptor", "semantic_model": "descriptor_content"}
    project = make_project(
        tmp_path, str(tmp_path / "pool"), references=sets, stages={"embeddings": embeddings}
    )
    store = StoreResource().for_project(project)
    settings = _cpu_settings()
    first = ensure_reference_vectors(project, store, "eval", settings, LOG)
    assert first.computed and first.paths == [f"cls/e{i}.jpg" for i in range(4)]
    again = ensure_reference_vectors(project, store, "eval", settings, LOG)
    assert not again.computed and np.array_equal(np.asarray(again.vectors), first.vectors)
    # another copy model: the cached vectors are stale, recomputed with it
    other = make_project(
        tmp_path,
        str(tmp_path / "pool"),
        references=sets,
        stages={"embeddings": {**embeddings, "copy_model": "descriptor_content"}},
    )
    recomputed = ensure_reference_vectors(other, store, "eval", settings, LOG)
    assert recomputed.computed and recomputed.meta["model"] != first.meta["model"]
    # and a search of pool vectors from the first model refuses them
    with pytest.raises(dg.Failure, match="different model"):
        refuse_other_model(recomputed, first.meta["model"])


def test_missing_reference_folder_fails_naming_the_key(tmp_path: Path):
    sets = {"sets": {"eval": {"role": "decontaminate", "path": str(tmp_path / "nowhere")}}}
    project = make_project(
        tmp_path,
        str(tmp_path / "pool"),
        references=sets,
        stages={"embeddings": EMBEDDINGS},
    )
    with pytest.raises(dg.Failure, match=r"references\.sets\.eval\.path: folder .*nowhere does not exist"):
        ensure_reference_vectors(project, StoreResource().for_project(project), "eval", _cpu_settings(), LOG)


def test_references_need_the_embeddings(tmp_path: Path):
    with pytest.raises(Exception, match=r"enable stages\.embeddings"):
        make_project(
            tmp_path, str(tmp_path), references={"sets": {"e": {"role": "seed", "path": str(tmp_path)}}}
        )


def _cpu_settings():
    from curation_assets.resources.compute import ComputeResource

    return ComputeResource(device="cpu", num_workers=0).settings()


# ----------------------------------------------------------------------------- the labeled demo


@pytest.fixture(scope="module")
def decontaminated(tmp_path_factory: pytest.TempPathFactory):
    """The labeled demo's train split as the pool, its test split (with train images planted in it)
    as the evaluation set, through the shard and global jobs."""
    from curation_assets.demo.labeled import generate_labeled_demo

    root = tmp_path_factory.mktemp("labeled")
    demo = generate_labeled_demo(root / "data", n_classes=3, per_class=8, test_per_class=3, leaks_per_kind=2)
    project = make_project(
        root,
        {"train": demo.roots["train"]},
        stages={
            "sanitize": {"workers": 1},
            "embeddings": {
                "enabled": True,
                "copy_model": "descriptor",
                "semantic_model": "descriptor_content",
            },
            "near_dedup": {"enabled": True, "model": "descriptor", "threshold": 0.1},
        },
        references={"sets": {"demo_test": {"role": "decontaminate", "path": demo.roots["test"]}}},
    )
    summary = materialize_project(
        project, build_definitions([project]), dg.DagsterInstance.ephemeral(), echo=lambda _: None
    )
    assert summary.failed == []
    store = StoreResource().for_project(project)
    truth = pl.read_parquet(demo.ground_truth_path)
    return project, store, truth


def test_planted_copies_of_evaluation_images_are_removed_with_their_reference(decontaminated):
    _, store, truth = decontaminated
    leaks = truth.filter(pl.col("leak_of").is_not_null()).select("leak_of", "rel_path", "leak_kind")
    decided = pl.read_parquet(decisions_path(store))
    # the demo names train images "train.<class>/<file>"; a pool of the train root alone "<class>/<file>"
    pool_id = {i: i.split(".", 1)[1] for i in leaks["leak_of"]}
    removed = decided.filter(pl.col("stage") == "decontamination")
    missed = []
    for source, rel_path, kind in leaks.iter_rows():
        row = decided.filter(pl.col("image_id") == pool_id[source])
        if row.is_empty() or "contamination:demo_test" not in row["reasons"][0]:
            missed.append((source, kind))
            continue
        # the explanation names an evaluation image that is a planted copy of this pool image
        evaluation_image = rel_path.removeprefix("test/")
        copies = leaks.filter(pl.col("leak_of") == source)["rel_path"].str.strip_prefix("test/").to_list()
        assert any(c in row["explanation"][0] for c in copies), (row["explanation"][0], evaluation_image)
    assert not missed, missed
    unrelated = set(removed["image_id"]) - set(pool_id.values())
    assert not unrelated, f"pool images that copy no evaluation image were removed: {sorted(unrelated)}"


def test_decontamination_output_and_borderline(decontaminated):
    project, store, _ = decontaminated
    matches = pl.read_parquet(matches_path(store))
    assert matches.columns == ["image_id", "reference_set", "reference_image", "distance"]
    assert (matches["distance"] <= project.stages.near_dedup.threshold).all()
    assert set(matches["reference_set"]) == {"demo_test"}
    edge = pl.read_parquet(borderline_path(store))
    assert set(edge["side"]) <= {"removed", "kept"}


def test_a_new_shard_searches_only_its_rows(tmp_path: Path):
    """Each shard's nearest references are kept with what they were computed from: after a new
    shard arrives only its rows are searched, and its planted copy is found."""
    import shutil

    pool, evaluation = tmp_path / "pool", tmp_path / "eval"
    for shard, seed in (("a", 1), ("b", 2)):
        for i in range(6):
            write_photo(pool / shard / f"img_{i}.jpg", seed * 1000 + i)
    for i in range(3):
        write_photo(evaluation / f"val_{i}.jpg", 9000 + i)
    shutil.copy(evaluation / "val_0.jpg", pool / "a" / "copy_of_val_0.jpg")
    project = make_project(
        tmp_path,
        {"train": str(pool)},
        stages={
            "embeddings": EMBEDDINGS,
            "near_dedup": {"enabled": True, "model": "descriptor", "threshold": 0.1},
        },
        references={"sets": {"eval": {"role": "decontaminate", "path": str(evaluation)}}},
    )
    instance = dg.DagsterInstance.ephemeral()
    defs = build_definitions([project])
    assert materialize_project(project, defs, instance, echo=lambda _: None).failed == []
    store = StoreResource().for_project(project)
    cached = {s: nearest_path(store, s).stat().st_mtime_ns for s in ("a", "b")}
    assert set(pl.read_parquet(matches_path(store))["image_id"]) == {"a/copy_of_val_0.jpg"}

    for i in range(4):
        write_photo(pool / "c" / f"img_{i}.jpg", 3000 + i)
    shutil.copy(evaluation / "val_2.jpg", pool / "c" / "copy_of_val_2.jpg")
    assert materialize_project(project, defs, instance, echo=lambda _: None).failed == []
    assert {s: nearest_path(store, s).stat().st_mtime_ns for s in cached} == cached  # not searched again
    matches = pl.read_parquet(matches_path(store))
    assert dict(matches.select("image_id", "reference_image").iter_rows()) == {
        "a/copy_of_val_0.jpg": "val_0.jpg",
        "c/copy_of_val_2.jpg": "val_2.jpg",
    }
    decided = pl.read_parquet(decisions_path(store)).filter(pl.col("stage") == "decontamination")
    assert sorted(decided["image_id"]) == sorted(matches["image_id"])


def test_a_webdataset_reference_set_gives_the_vectors_of_its_images(tmp_path: Path):
    """kind: webdataset reads the image members of .tar shards in place (captions beside them are
    skipped) and names them <tar path>/<member>; the vectors equal the same files' as a folder."""
    import tarfile

    folder, shards = tmp_path / "eval_dir", tmp_path / "eval_wds"
    for i in range(3):
        write_photo(folder / f"{i:03d}.jpg", 700 + i)
    (shards / "part").mkdir(parents=True)
    with tarfile.open(shards / "part" / "000.tar", "w") as archive:
        for i in range(3):
            archive.add(folder / f"{i:03d}.jpg", arcname=f"{i:03d}.jpg")
            caption = tmp_path / f"{i:03d}.txt"
            caption.write_text("a caption")
            archive.add(caption, arcname=f"{i:03d}.txt")
    sets = {
        "as_folder": {"role": "decontaminate", "path": str(folder)},
        "as_tars": {"role": "decontaminate", "path": str(shards), "kind": "webdataset"},
    }
    project = make_project(
        tmp_path, str(tmp_path / "pool"), references={"sets": sets}, stages={"embeddings": EMBEDDINGS}
    )
    store = StoreResource().for_project(project)
    plain = ensure_reference_vectors(project, store, "as_folder", _cpu_settings(), LOG)
    tars = ensure_reference_vectors(project, store, "as_tars", _cpu_settings(), LOG)
    assert tars.paths == [f"part/000.tar/{i:03d}.jpg" for i in range(3)]
    assert plain.paths == [f"{i:03d}.jpg" for i in range(3)]
    np.testing.assert_array_equal(np.asarray(tars.vectors), np.asarray(plain.vectors))


def test_a_vectors_reference_set_is_read_with_its_model_checked(tmp_path: Path):
    """kind: vectors takes a parquet of precomputed vectors (path, vector; the model identity in the
    footer); a file without an identity fails naming the key, another model's is refused."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "eval_dir"
    for i in range(3):
        write_photo(folder / f"{i:03d}.jpg", 800 + i)
    sets = {
        "as_folder": {"role": "decontaminate", "path": str(folder)},
        "as_vectors": {"role": "decontaminate", "path": str(tmp_path / "eval.parquet"), "kind": "vectors"},
    }
    project = make_project(
        tmp_path, str(tmp_path / "pool"), references={"sets": sets}, stages={"embeddings": EMBEDDINGS}
    )
    store = StoreResource().for_project(project)
    plain = ensure_reference_vectors(project, store, "as_folder", _cpu_settings(), LOG)
    table = pa.table({"path": plain.paths, "vector": np.asarray(plain.vectors, np.float32).tolist()})
    pq.write_table(table, tmp_path / "eval.parquet")
    with pytest.raises(dg.Failure, match=r"references\.sets\.as_vectors\.path: .* records no model identity"):
        ensure_reference_vectors(project, store, "as_vectors", _cpu_settings(), LOG)
    identity = json.dumps(plain.meta["model"]).encode()
    pq.write_table(table.replace_schema_metadata({b"curation.model": identity}), tmp_path / "eval.parquet")
    read = ensure_reference_vectors(project, store, "as_vectors", _cpu_settings(), LOG)
    assert read.paths == plain.paths and not read.computed
    np.testing.assert_array_equal(np.asarray(read.vectors), np.asarray(plain.vectors))
    refuse_other_model(read, plain.meta["model"])  # the pool's model: accepted
    other = dict(plain.meta["model"], variant="content")
    with pytest.raises(dg.Failure, match="different model"):
        refuse_other_model(read, other)


def test_the_ivf_path_finds_the_planted_copies_as_brute_force_does():
    """Forced onto the IVF path: every pool image's nearest reference within the relevant range
    is brute force's (recall >= 0.99), at the exact distance."""
    from curation_assets.core.dedup.index import prepare

    rng = np.random.default_rng(11)
    centres = rng.normal(size=(30, 48)).astype(np.float32)
    refs = (np.repeat(centres, 200, axis=0) + 0.6 * rng.normal(size=(6000, 48))).astype(np.float32)
    pool = (np.repeat(centres, 100, axis=0) + 0.6 * rng.normal(size=(3000, 48))).astype(np.float32)
    copies = rng.choice(len(refs), 300, replace=False)
    pool[:300] = refs[copies] + 0.05 * rng.normal(size=(300, 48))  # planted near-copies
    mean = pool.mean(axis=0)
    exact = nearest_references(pool, refs, mean)
    by_ivf = nearest_references(pool, refs, mean, kind="ivf", relevant_distance=0.2)
    near = exact.distance <= 0.2
    assert near[:300].all()
    assert (by_ivf.rows[near] == exact.rows[near]).mean() >= 0.99
    same = by_ivf.rows == exact.rows
    np.testing.assert_allclose(by_ivf.distance[same], exact.distance[same], atol=1e-6)
    brute = 1.0 - prepare(pool, mean) @ prepare(refs, mean).T
    assert (exact.rows == brute.argmin(axis=1)).all()
