"""Near-duplicates on the demo data: planted copies found, nothing chained, incremental = full."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import polars as pl
import pytest

from curation_assets.definitions import build_definitions
from curation_assets.resources.store import StoreResource
from curation_assets.runner import materialize_project
from curation_assets_tests.conftest import make_project

pytestmark = pytest.mark.xdist_group("demo")

NEAR = {
    "embeddings": {"enabled": True, "copy_model": "descriptor", "semantic_model": "descriptor_content"},
    "near_dedup": {"enabled": True, "model": "descriptor", "threshold": 0.1, "report_threshold": 0.3},
}


def _family(truth: pl.DataFrame) -> dict[str, str]:
    """image_id -> the base it derives from (itself for a base)."""
    source = dict(zip(truth["image_id"], truth["source_id"], strict=True))

    def root(image_id: str) -> str:
        while source.get(image_id):
            image_id = source[image_id]
        return image_id

    return {image_id: root(image_id) for image_id in truth["image_id"]}


def _run(tmp: Path, images_root: Path, shards: list[str] | None = None, instance=None):
    project = make_project(tmp, {"train": str(images_root)}, stages=NEAR)
    instance = instance or dg.DagsterInstance.ephemeral()
    summary = materialize_project(
        project, build_definitions([project]), instance, shards=shards, echo=lambda _: None
    )
    assert summary.failed == []
    store = StoreResource().for_project(project)
    pairs = pl.read_parquet(store.global_path("duplicate_pairs", "duplicate_pairs.parquet"))
    groups = pl.read_parquet(store.global_path("duplicate_groups", "duplicate_groups.parquet"))
    return project, instance, store, pairs, groups


@pytest.fixture(scope="module")
def demo_near(demo_dataset, tmp_path_factory):
    return _run(tmp_path_factory.mktemp("near"), demo_dataset.images_root), pl.read_parquet(
        demo_dataset.ground_truth_path
    )


def test_planted_near_duplicates_are_found_precisely(demo_near):
    (_, _, store, pairs, groups), truth = demo_near
    family = _family(truth)
    under = pairs.filter(pl.col("distance") < 0.1)
    same = [family[a] == family[b] for a, b in zip(under["image_id_a"], under["image_id_b"], strict=True)]
    precision = sum(same) / max(len(same), 1)
    planted = truth.filter(pl.col("kind").is_in(["near_duplicate", "byte_copy", "pixel_copy"]))
    kept = set(pl.concat([pairs["image_id_a"], pairs["image_id_b"]]))
    found = {tuple(sorted(p)) for p in zip(under["image_id_a"], under["image_id_b"], strict=True)}
    hits = [tuple(sorted((r["image_id"], r["source_id"]))) in found for r in planted.iter_rows(named=True)]
    recall = sum(hits) / len(hits)
    assert recall >= 0.9, recall
    assert precision >= 0.95, precision
    # byte copies are always grouped with their source
    group_of = dict(zip(groups["image_id"], groups["group_id"], strict=True))
    byte_copies = truth.filter(pl.col("kind") == "byte_copy")
    assert len(byte_copies) > 0
    for copy in byte_copies.iter_rows(named=True):
        assert copy["image_id"] in kept and copy["source_id"] in kept, copy
        assert group_of.get(copy["image_id"]) == group_of.get(copy["source_id"]) is not None, copy
    assert store.global_path("duplicate_groups", "threshold_sweep.png").stat().st_size > 1000


def test_the_pairs_materialization_shows_how_the_search_went(demo_near):
    (project, instance, _, pairs, _), _ = demo_near
    key = next(
        k
        for k in build_definitions([project]).resolve_asset_graph().get_all_asset_keys()
        if k.path[-1] == "duplicate_pairs"
    )
    metadata = instance.fetch_materializations(key, limit=1).records[0].asset_materialization.metadata
    assert metadata["pairs"].value == len(pairs)
    assert metadata["candidates_rescored"].value >= len(pairs)  # every pair was re-scored exactly
    assert metadata["queries_capped"].value == 0
    assert metadata["search_seconds"].value >= 0 and metadata["queried_rows_per_s"].value > 0


def test_groups_have_one_keeper_and_removed_members_are_close_to_it(demo_near):
    (_, _, _, _, groups), _ = demo_near
    assert len(groups) > 0
    assert (groups.group_by("group_id").agg(pl.col("is_keeper").sum())["is_keeper"] == 1).all()
    removed = groups.filter(~pl.col("is_keeper"))
    assert (removed["distance"] < 0.1).all()  # representative linkage: no chains
    assert removed["reason"].str.starts_with("near duplicate of").all()


def test_adding_a_shard_gives_the_same_pairs_and_groups_as_a_full_build(demo_dataset, tmp_path: Path):
    instance = dg.DagsterInstance.ephemeral()
    _run(tmp_path, demo_dataset.images_root, shards=["shard-00", "shard-01"], instance=instance)
    # the third shard arrives later: only it is embedded, added to the index and searched
    _, _, store, pairs_inc, groups_inc = _run(tmp_path, demo_dataset.images_root, instance=instance)
    manifest = store.read_json(store.asset_dir("lsh_index") / "manifest.json")
    assert manifest["why"] == "new shards added to the existing index" and manifest["added_rows"][0] > 0
    # a full rebuild (same model, so the same kept centring mean) gives exactly the same result
    (store.asset_dir("lsh_index") / "manifest.json").unlink()
    (store.global_path("duplicate_pairs", "duplicate_pairs.parquet")).unlink()
    _, _, _, pairs_full, groups_full = _run(tmp_path, demo_dataset.images_root, instance=instance)
    rebuilt = store.read_json(store.asset_dir("lsh_index") / "manifest.json")
    assert rebuilt["why"] == "first build" and rebuilt["added_rows"] == [0, manifest["count"]]
    key = ["image_id_a", "image_id_b"]
    assert pairs_inc.sort(key).select(key).equals(pairs_full.sort(key).select(key))
    assert (pairs_inc.sort(key)["distance"] - pairs_full.sort(key)["distance"]).abs().max() < 1e-5
    columns = ["group_id", "image_id", "is_keeper"]
    assert groups_inc.select(columns).sort(columns).equals(groups_full.select(columns).sort(columns))
