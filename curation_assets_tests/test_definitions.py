"""The code location loads, with one graph per project and only the stages switched on."""

from __future__ import annotations

import dagster as dg

from curation_assets.assets.project import declared_stages
from curation_assets.config import load_projects, packaged_project_files
from curation_assets.definitions import build_definitions, defs
from curation_assets_tests.conftest import make_project


def _keys(definitions: dg.Definitions) -> set[str]:
    return {k.to_user_string() for k in definitions.resolve_asset_graph().get_all_asset_keys()}


def test_definitions_load_with_every_packaged_project():
    dg.Definitions.validate_loadable(defs)
    keys = _keys(defs)
    for project in load_projects(packaged_project_files()):
        assert {
            f"{project.name}/image_inventory",
            f"{project.name}/sanitized_images",
            f"{project.name}/exact_duplicates",
        } <= keys
        assert defs.resolve_job_def(f"{project.name}_shard_job").partitions_def is not None
        assert defs.resolve_sensor_def(f"{project.name}_discovery_sensor") is not None
        assert (
            defs.resolve_schedule_def(f"{project.name}_refresh_schedule").cron_schedule
            == project.discovery.refresh_cron
        )


def test_per_shard_assets_are_partitioned_and_global_ones_are_not():
    graph = defs.resolve_asset_graph()
    inventory = graph.get(dg.AssetKey(["demo", "image_inventory"]))
    exact = graph.get(dg.AssetKey(["demo", "exact_duplicates"]))
    assert isinstance(inventory.partitions_def, dg.DynamicPartitionsDefinition)
    assert inventory.partitions_def.name == "demo_shards"
    assert exact.partitions_def is None
    assert dg.AssetKey(["demo", "sanitized_images"]) in exact.parent_keys
    assert inventory.group_name == "demo_ingest"


def test_jobs_run_in_process_with_max_runtimes_and_backfills_run_one_shard_per_run(tmp_path):
    project = make_project(
        tmp_path, str(tmp_path), runs={"shard_max_runtime_seconds": 60, "global_max_runtime_seconds": 0}
    )
    definitions = build_definitions([project])
    shard_job = definitions.resolve_job_def("testproj_shard_job")
    assert shard_job.executor_def.name == "in_process"
    assert shard_job.tags["dagster/max_runtime"] == "60"  # what run monitoring reads
    assert "dagster/max_runtime" not in definitions.resolve_job_def("testproj_global_job").tags  # 0: none
    graph = definitions.resolve_asset_graph()
    for key in graph.get_all_asset_keys():
        node = graph.get(key)
        if node.partitions_def is not None:  # a backfill of N shards is N runs of one shard each
            assert node.backfill_policy == dg.BackfillPolicy.multi_run(max_partitions_per_run=1)
    forked = make_project(
        tmp_path, str(tmp_path), runs={"executor": "multiprocess", "max_concurrent_steps": 3}
    )
    executor = build_definitions([forked]).resolve_job_def("testproj_shard_job").executor_def
    assert executor.name == "forkserver_multiprocess"


def test_a_disabled_stage_is_absent_from_the_graph(tmp_path):
    project = make_project(tmp_path, str(tmp_path), stages={"exact_dedup": {"enabled": False}})
    keys = _keys(build_definitions([project]))
    # no duplicate stage: the per-shard pair plus the decisions, export and report every project has
    assert keys == {
        "testproj/image_inventory",
        "testproj/sanitized_images",
        "testproj/curation_decisions",
        "testproj/curated_dataset",
        "testproj/curation_report",
    }
    assert "exact_dedup" not in declared_stages(project)


def test_walkthrough_stages_are_declared():
    projects = {p.name: p for p in load_projects(packaged_project_files())}
    assert declared_stages(projects["gldv2"]) == [
        "sanitize",
        "exact_dedup",
        "rotation",
        "embeddings",
        "near_dedup",
        "clustering",
        "sampling",
    ]
    assert "example_filters" in declared_stages(projects["tol10m"]) and "rotation" not in declared_stages(
        projects["tol10m"]
    )
