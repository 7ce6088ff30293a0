"""The path users run: jobs launched on the instance (as the UI, the sensor daemon and backfills
launch them), with the code location in a code server and each run in its own worker process.

Every run here goes through ``instance.launch_run``; none through ``execute_in_process``. A
run that hangs is stopped at the project's max runtime (``LaunchedRuns.wait``), so these
tests fail instead of hanging.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import polars as pl
import psutil
import pytest
import yaml

from curation_assets.assets.ingest.discovery import partitions_name
from curation_assets.assets.keys import QUALITY, SANITIZED
from curation_assets.assets.outputs.apply import apply_job_name, restore_job_name
from curation_assets.assets.outputs.decisions import decisions_path
from curation_assets.assets.outputs.export import export_root
from curation_assets.assets.project import global_job_name, shard_job_name
from curation_assets.config import load_project
from curation_assets.definitions import build_definitions
from curation_assets.launch import LaunchedRuns, code_location
from curation_assets.resources.store import StoreResource
from curation_assets.runner import init_instance, materialize_project
from curation_assets_tests.conftest import sensor_tick, write_photo

# Launched runs start code servers and run workers: keep them on one xdist worker, one at a time.
pytestmark = pytest.mark.xdist_group("launched_runs")

MAX_RUNTIME_S = 240  # the wait gives up (and fails the run) after this: a hang fails the test


@dataclass
class Launched:
    project: object
    instance: dg.DagsterInstance
    runs: LaunchedRuns
    images: Path


def write_shard(images: Path, shard: str, count: int, seed: int, size: tuple[int, int] = (320, 240)) -> None:
    for i in range(count):
        write_photo(images / shard / f"img_{i:04d}.jpg", seed * 100_000 + i, size=size)


@pytest.fixture
def launched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Launched]:
    """A project file the code location loads, an instance from our template, a code server."""
    images = tmp_path / "images"
    project_file = tmp_path / "launched.yaml"
    project_file.write_text(
        yaml.safe_dump(
            {
                "name": "launched",
                "storage_root": str(tmp_path / "store"),
                "dataset": {"roots": {"train": str(images)}},
                "discovery": {"sensor_running": False},
                "runs": {
                    "shard_max_runtime_seconds": MAX_RUNTIME_S,
                    "global_max_runtime_seconds": MAX_RUNTIME_S,
                },
                "stages": {
                    "sanitize": {"workers": 2, "chunk_size": 8},
                    "quality": {"enabled": True, "workers": 2},
                    "embeddings": {
                        "enabled": True,
                        "copy_model": "descriptor",
                        "semantic_model": "descriptor_content",
                    },
                    "near_dedup": {"enabled": True, "model": "descriptor", "threshold": 0.1},
                },
                "export": {"layout": "symlink"},
                "apply": {"backup_root": str(tmp_path / "backup")},
            }
        )
    )
    monkeypatch.setenv("CURATION_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    monkeypatch.setenv("CURATION_PROJECTS", str(project_file))
    instance = init_instance()
    project = load_project(project_file)
    with code_location(instance) as workspace:
        yield Launched(project, instance, LaunchedRuns(instance, workspace), images)
    instance.dispose()


def launch_requests(env: Launched, result: dg.SensorResult) -> list[str]:
    """Launch every run the sensor requested through the instance's run launcher; their job names."""
    launched = []
    for request in result.run_requests or []:
        job = request.job_name or shard_job_name(env.project)
        outcome = env.runs.run(job, partition_key=request.partition_key, tags=request.tags)
        assert outcome.success, f"{job} {request.partition_key}: {outcome.message}"
        launched.append(job)
    return launched


def test_sensor_launched_runs_then_removed_shard_leaves_curation(launched: Launched):
    env = launched
    write_shard(env.images, "part-a", 220, seed=1)  # >= 200 images: sanitize and quality use the pool
    write_shard(env.images, "part-b", 60, seed=2)
    # planted exact and near duplicates across shards, so the global job has work to do
    shutil.copy(env.images / "part-a" / "img_0000.jpg", env.images / "part-b" / "copy_of_a0.jpg")

    first = sensor_tick(build_definitions([env.project]), env.project, env.instance)
    assert sorted(r.partition_key for r in first.run_requests) == ["part-a", "part-b"]
    assert launch_requests(env, first) == [shard_job_name(env.project)] * 2
    store = StoreResource().for_project(env.project)
    sanitized = pl.read_parquet(store.shard_path(SANITIZED, "part-a"))
    assert sanitized.height == 220 and sanitized["status"].null_count() == 0
    assert pl.read_parquet(store.shard_path(QUALITY, "part-a")).height == 220

    outcome = env.runs.run(global_job_name(env.project))
    assert outcome.success, outcome.message
    decided = pl.read_parquet(decisions_path(store))
    assert decided.filter(pl.col("image_id").str.starts_with("part-b/")).height == 61

    # the pool shrinks: part-b leaves; the sensor retires it and requests the global job
    shutil.rmtree(env.images / "part-b")
    second = sensor_tick(build_definitions([env.project]), env.project, env.instance)
    assert env.instance.get_dynamic_partitions(partitions_name(env.project)) == ["part-a"]
    assert launch_requests(env, second) == [global_job_name(env.project)]
    decided = pl.read_parquet(decisions_path(store))
    assert decided.height == 220
    assert decided.filter(pl.col("image_id").str.starts_with("part-b/")).is_empty()
    export = export_root(env.project, store)
    links = [p for p in export.rglob("*") if p.is_symlink()]
    assert links, "the export should hold links to the kept images"
    assert all(link.resolve().is_file() for link in links), "dangling links in the export"
    assert not any("part-b" in str(link) for link in links)
    # the retired shard's outputs were moved aside, not deleted
    assert list((store.root / "retired").rglob("part-b.parquet"))


def pool_workers_of(root: psutil.Process) -> list[psutil.Process]:
    """Processes forked by a forkserver below ``root``: the decode pool's workers (the forkserver's
    children; the forkserver itself is excluded)."""
    workers = []
    for proc in root.children(recursive=True):
        try:
            parent = proc.parent()
            if parent is not None and "forkserver" in " ".join(parent.cmdline()):
                workers.append(proc)
        except psutil.Error:
            continue
    return workers


def test_killed_pool_worker_is_retried_and_the_run_finishes(launched: Launched):
    """SIGKILL a decode worker of a launched shard run mid-shard: its chunks are retried, the run
    succeeds under the timeout and every image has its row."""
    env = launched
    write_shard(env.images, "big", 400, seed=3, size=(1024, 768))
    env.instance.add_dynamic_partitions(partitions_name(env.project), ["big"])
    killed: list[int] = []
    stop = threading.Event()

    def killer() -> None:
        me = psutil.Process()
        while not stop.is_set() and not killed:
            for worker in pool_workers_of(me):
                try:
                    worker.kill()
                    killed.append(worker.pid)
                    break
                except psutil.Error:
                    continue
            time.sleep(0.02)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        outcome = env.runs.run(shard_job_name(env.project), partition_key="big")
    finally:
        stop.set()
        thread.join(timeout=5)
    assert killed, "no pool worker was seen: the shard finished before one could be killed"
    assert outcome.success, outcome.message
    store = StoreResource().for_project(env.project)
    sanitized = pl.read_parquet(store.shard_path(SANITIZED, "big"))
    assert sanitized.height == 400
    # retried chunks give real rows: nothing blamed on the worker that was killed from outside
    assert sanitized.filter(pl.col("status") == "rejected").is_empty()


def test_a_run_past_its_max_runtime_is_failed_with_a_message(launched: Launched):
    """The project's max runtime is the job's dagster/max_runtime tag; past it the run is stopped
    and failed with a message (what run monitoring does under the daemon)."""
    env = launched
    write_shard(env.images, "slow", 200, seed=4, size=(1024, 768))
    env.instance.add_dynamic_partitions(partitions_name(env.project), ["slow"])
    run = env.runs.create_run(shard_job_name(env.project), partition_key="slow")
    assert run.tags["dagster/max_runtime"] == str(MAX_RUNTIME_S)
    # a stricter limit for this run only, as a user would set the tag in the UI's launchpad
    env.instance.add_run_tags(run.run_id, {"dagster/max_runtime": "1"})
    start = time.perf_counter()
    env.instance.launch_run(run.run_id, env.runs.workspace.create_request_context())
    outcome = env.runs.wait(run.run_id, start)
    assert not outcome.success
    assert "maximum runtime" in outcome.message
    assert env.instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.FAILURE


def test_run_monitoring_fails_a_run_past_the_project_max_runtime(launched: Launched):
    """Under `dagster dev`, the daemon's run monitoring reads the job's max runtime tag (from the
    project file) and fails the run with a message, so one stuck run never holds the queue."""
    from dagster._daemon.monitoring.run_monitoring import check_run_timeout

    env = launched
    assert env.instance.run_monitoring_enabled  # our instance template turns it on
    write_shard(env.images, "stuck", 200, seed=7, size=(1024, 768))
    env.instance.add_dynamic_partitions(partitions_name(env.project), ["stuck"])
    run = env.runs.create_run(shard_job_name(env.project), partition_key="stuck")
    env.instance.add_run_tags(run.run_id, {"dagster/max_runtime": "1"})
    env.instance.launch_run(run.run_id, env.runs.workspace.create_request_context())
    deadline = time.monotonic() + 60
    while env.instance.get_run_by_id(run.run_id).status != dg.DagsterRunStatus.STARTED:
        assert time.monotonic() < deadline, "the run never started"
        time.sleep(0.1)
    time.sleep(1.5)
    record = env.instance.get_run_record_by_id(run.run_id)
    check_run_timeout(
        env.instance, record, logging.getLogger("test"), env.instance.run_monitoring_max_runtime_seconds
    )
    assert env.instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.FAILURE
    failures = env.instance.all_logs(run.run_id, of_type=dg.DagsterEventType.RUN_FAILURE)
    assert any("maximum runtime" in (event.message or "") for event in failures)


def file_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_launched_apply_then_a_restore_without_config_gives_back_every_file(launched: Launched):
    """The apply and restore jobs as the UI launches them: apply (confirm in its run config), then
    restore with no config at all finds the apply's journal by itself; files come back bit-identical."""
    env = launched
    write_shard(env.images, "p", 40, seed=8)
    shutil.copy(env.images / "p" / "img_0000.jpg", env.images / "p" / "dup.jpg")  # an exact duplicate
    (env.images / "p" / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")  # a sanitize reject
    before = file_hashes(env.images)
    summary = materialize_project(env.project, env.runs, env.instance, echo=lambda _: None)
    assert summary.failed == []
    name = env.project.name
    confirm = {"ops": {f"{name}_apply": {"config": {"confirm": True}}}}
    applied = env.runs.run(apply_job_name(env.project), run_config=confirm)
    assert applied.success, applied.message
    assert file_hashes(env.images) != before  # removed files went to the backup
    restored = env.runs.run(restore_job_name(env.project))
    assert restored.success, restored.message
    assert file_hashes(env.images) == before


def test_headless_runner_launches_shard_and_global_runs(launched: Launched):
    """`curate materialize` runs the same launched path: one run per shard, then the global job."""
    env = launched
    write_shard(env.images, "s1", 30, seed=5)
    write_shard(env.images, "s2", 30, seed=6)
    summary = materialize_project(env.project, env.runs, env.instance, echo=lambda _: None)
    assert summary.failed == [] and sorted(summary.shards_run) == ["s1", "s2"]
    runs = env.instance.get_runs()
    assert {r.job_name for r in runs} == {shard_job_name(env.project), global_job_name(env.project)}
    assert all(r.status == dg.DagsterRunStatus.SUCCESS for r in runs)
    # launched, not in process: each run records the code location it was launched from
    assert all(r.remote_job_origin is not None for r in runs)
    again = materialize_project(env.project, env.runs, env.instance, run_global=False, echo=lambda _: None)
    assert again.shards_run == [] and sorted(again.shards_skipped) == ["s1", "s2"]


def test_one_output_of_the_shard_pass_materializes_alone_in_a_launched_run(launched: Launched):
    """The shard pass is one multi-asset that can be subset: a launched run of quality_scores alone
    rewrites it (the same scores), materializes nothing else and leaves the other outputs as they are."""
    env = launched
    write_shard(env.images, "one", 12, seed=7)
    env.instance.add_dynamic_partitions(partitions_name(env.project), ["one"])
    first = env.runs.run(shard_job_name(env.project), partition_key="one")
    assert first.success, first.message
    store = StoreResource().for_project(env.project)
    quality = store.shard_path(QUALITY, "one")
    before = pl.read_parquet(quality)
    others = (SANITIZED, "sscd_embeddings", "semantic_embeddings")
    stamps = {name: store.shard_path(name, "one").stat().st_mtime_ns for name in others}
    quality.unlink()

    key = dg.AssetKey([env.project.name, QUALITY])
    outcome = env.runs.run(shard_job_name(env.project), partition_key="one", asset_keys=[key])
    assert outcome.success, outcome.message
    assert pl.read_parquet(quality).equals(before)
    assert {name: store.shard_path(name, "one").stat().st_mtime_ns for name in others} == stamps
    records = env.instance.get_records_for_run(
        outcome.run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION
    ).records
    assert {r.event_log_entry.dagster_event.asset_key for r in records} == {key}
