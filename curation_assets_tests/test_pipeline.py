"""The demo dataset through the shard and global jobs: every planted defect found, with its reason."""

from __future__ import annotations

import dagster as dg
import polars as pl
import pytest

from curation_assets.assets.project import global_job_name, shard_job_name
from curation_assets.definitions import build_definitions
from curation_assets.resources.store import StoreResource
from curation_assets.runner import materialize_project
from curation_assets_tests.conftest import make_project

pytestmark = pytest.mark.xdist_group("demo")


@pytest.fixture(scope="module")
def demo_run(demo_dataset, tmp_path_factory):
    """The demo project materialized once in an ephemeral instance."""
    store_dir = tmp_path_factory.mktemp("store")
    project = make_project(
        store_dir, {"train": str(demo_dataset.images_root)}, stages={"sanitize": {"workers": 2}}
    )
    defs = build_definitions([project])
    instance = dg.DagsterInstance.ephemeral()
    summary = materialize_project(project, defs, instance, echo=lambda _: None)
    store = StoreResource().for_project(project)
    sanitized = store.scan_shards("sanitized_images").collect()
    exact = pl.read_parquet(store.global_path("exact_duplicates", "exact_duplicates.parquet"))
    truth = pl.read_parquet(demo_dataset.ground_truth_path)
    return summary, sanitized, exact, truth, instance, project


def test_no_shard_fails_on_bad_input(demo_run):
    summary, sanitized, _, truth, instance, project = demo_run
    assert summary.failed == []
    assert len(summary.shards_run) == 3
    assert len(sanitized) == len(truth)  # one row per file, nothing skipped
    for check in ("one_row_per_inventoried_file", "every_rejection_has_a_reason"):
        record = instance.event_log_storage.get_latest_asset_check_execution_by_key(
            [dg.AssetCheckKey(dg.AssetKey([project.name, "sanitized_images"]), check)]
        )
        assert all(r.evaluation.passed for r in record.values() if r.evaluation) and record


def test_every_planted_defect_has_the_expected_status_and_reasons(demo_run):
    _, sanitized, _, truth, *_ = demo_run
    joined = truth.join(sanitized.select("image_id", "status", "reasons"), on="image_id", how="left")
    assert joined["status"].null_count() == 0
    wrong = joined.filter(
        (pl.col("status") != pl.col("expected_status"))
        | (pl.col("reasons").list.sort() != pl.col("expected_reasons").list.sort())
    )
    assert wrong.is_empty(), wrong.select(
        "image_id", "kind", "transform", "status", "reasons", "expected_reasons"
    ).to_dicts()
    defects = set(truth.filter(pl.col("kind") == "defect")["transform"])
    assert {
        "truncated",
        "zero_byte",
        "garbage",
        "png_as_jpg",
        "cmyk",
        "bomb",
        "animated",
        "sixteen_bit",
    } <= defects


def test_ok_images_stay_ok(demo_run):
    _, sanitized, _, truth, *_ = demo_run
    clean = truth.filter(pl.col("kind").is_in(["base", "near_duplicate", "unwanted", "quality", "byte_copy"]))
    statuses = clean.join(sanitized, on="image_id")["status"].unique().to_list()
    assert statuses == ["ok"]


def test_exact_duplicates_found_across_shards_with_one_keeper(demo_run):
    _, _, exact, truth, *_ = demo_run
    copies = truth.filter(pl.col("kind").is_in(["byte_copy", "pixel_copy"]))
    assert len(copies) > 0
    group_of = dict(zip(exact["image_id"], exact["group_id"], strict=True))
    for copy in copies.iter_rows(named=True):
        assert copy["image_id"] in group_of, copy
        assert group_of[copy["image_id"]] == group_of.get(copy["source_id"]), copy
    assert (exact.group_by("group_id").agg(pl.col("is_keeper").sum())["is_keeper"] == 1).all()
    cross_shard = copies.filter(pl.col("shard") != pl.col("source_id").str.split("/").list.first())
    assert len(cross_shard) > 0  # the generator plants copies in other shards, and they are found
    byte_rows = exact.join(truth.select("image_id", "kind"), on="image_id").filter(
        pl.col("kind") == "byte_copy"
    )
    assert set(byte_rows["match"]) <= {"byte", "keeper"}
    # nothing else is grouped: no near-duplicate or distinct base is called an exact copy
    planted_groups = set(truth.filter(pl.col("kind").is_in(["byte_copy", "pixel_copy"]))["source_id"])
    grouped_bases = set(
        exact.join(truth.select("image_id", "kind"), on="image_id").filter(pl.col("kind") == "base")[
            "image_id"
        ]
    )
    assert grouped_bases <= planted_groups


def test_rerun_skips_up_to_date_shards(demo_run):
    _, _, _, _, instance, project = demo_run
    summary = materialize_project(
        project, build_definitions([project]), instance, run_global=False, echo=lambda _: None
    )
    assert summary.shards_run == [] and len(summary.shards_skipped) == 3


def test_jobs_have_the_project_names(demo_run):
    *_, project = demo_run
    defs = build_definitions([project])
    assert defs.resolve_job_def(shard_job_name(project)) and defs.resolve_job_def(global_job_name(project))
