"""A real multi-process cluster on this machine: the Dagster instance on PostgreSQL, steps on two
celery workers (Redis broker), the store and the dataset on an S3 endpoint; every service is
started here from the system packages and stopped at the end.

The same pool curated by the cluster and by a local in-process run must give the same
decisions. CI sets CURATION_REQUIRE_CLUSTER=1 (``.ci/run``): there a missing server binary
fails the test instead of skipping it (``make services`` installs them).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from pathlib import Path

import polars as pl
import psutil
import pytest

from curation_assets.assets.ingest.discovery import partitions_name
from curation_assets.assets.outputs.decisions import decisions_path
from curation_assets.assets.project import shard_job_name
from curation_assets.config import load_project
from curation_assets.core import storage
from curation_assets.definitions import build_definitions
from curation_assets.launch import LaunchedRuns, code_location
from curation_assets.resources.store import StoreResource
from curation_assets.runner import init_instance, materialize_project
from curation_assets.services import (
    CeleryWorkers,
    LocalPostgres,
    LocalRedis,
    LocalS3,
    ServiceError,
    find_binary,
    free_port,
)
from curation_assets_tests.conftest import write_photo
from curation_assets_tests.test_object_store import SHARDS, comparable, project_file, write_pool

pytestmark = pytest.mark.xdist_group("cluster")


def _services_or_skip() -> None:
    missing = []
    for name, package, versioned in (
        ("pg_ctl", "postgresql", "usr/lib/postgresql/*/bin/pg_ctl"),
        ("redis-server", "redis-server", None),
    ):
        try:
            find_binary(name, package, versioned)
        except ServiceError:
            missing.append(package)
    try:
        import dagster_celery  # noqa: F401
        import dagster_postgres  # noqa: F401
    except ImportError:
        missing.append("the cluster extra (pip install -e '.[cluster]')")
    if missing:
        why = f"the cluster test needs {', '.join(missing)} (make services installs the servers)"
        if os.environ.get("CURATION_REQUIRE_CLUSTER") == "1":
            pytest.fail(why)
        pytest.skip(why)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _tree(pid: int) -> list[int]:
    try:
        root = psutil.Process(pid)
        return [pid, *(child.pid for child in root.children(recursive=True))]
    except psutil.NoSuchProcess:
        return []


def test_the_demo_on_postgres_celery_and_s3_matches_a_local_run(tmp_path: Path, monkeypatch):
    _services_or_skip()
    images = tmp_path / "images"
    write_pool(images)
    projects = tmp_path / "projects"
    projects.mkdir()
    local_file = project_file(projects, "single", str(images), str(tmp_path / "store"))
    cluster_file = project_file(
        projects, "cluster", "s3://pool/images", "s3://store/curation", runs={"executor": "celery"}
    )
    monkeypatch.setenv("CURATION_PROJECTS", str(projects))
    monkeypatch.setenv("CURATION_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    started: list[int] = []
    with LocalS3() as s3, LocalPostgres() as postgres, LocalRedis() as redis:
        for key, value in s3.env.items():
            monkeypatch.setenv(key, value)
        monkeypatch.setenv("CURATION_CELERY_BROKER", redis.url)
        storage.reset()
        s3.make_bucket("pool")
        s3.make_bucket("store")
        s3.upload_tree(images, "s3://pool/images")
        started += [
            s3.process.pid,
            redis.process.pid,
            int((postgres.data / "postmaster.pid").read_text().split()[0]),
        ]
        instance = init_instance(postgres.url)
        try:
            assert type(instance.run_storage).__name__ == "PostgresRunStorage"
            cluster = load_project(cluster_file)
            with CeleryWorkers(redis.url, count=2, log_folder=tmp_path / "celery") as workers:
                worker_trees = {pid: set(_tree(pid)) for pid in workers.pids()}
                with code_location(instance) as workspace:
                    runs = LaunchedRuns(instance, workspace)
                    summary = materialize_project(cluster, runs, instance, echo=lambda _: None)
                    assert not summary.failed, summary.failed
                # the steps ran in the workers' processes, spread over both workers
                step_pids = {
                    entry.dagster_event.pid
                    for run in instance.get_runs()
                    for entry in instance.all_logs(run.run_id)
                    if entry.is_dagster_event and entry.dagster_event.event_type_value == "STEP_START"
                }
                trees = {pid: set(_tree(pid)) | tree for pid, tree in worker_trees.items()}
                used = [pid for pid, tree in trees.items() if tree & step_pids]
                assert len(used) == 2, f"steps ran in {step_pids}; worker process trees {trees}"
                started += [pid for tree in trees.values() for pid in tree]
            local = load_project(local_file)
            summary = materialize_project(local, build_definitions([local]), instance, echo=lambda _: None)
            assert not summary.failed, summary.failed
            on_cluster, on_disk = StoreResource().for_project(cluster), StoreResource().for_project(local)
            decided = comparable(on_cluster.read_parquet(decisions_path(on_cluster)))
            assert decided.height == sum(SHARDS.values()) + 2
            assert decided.equals(comparable(on_disk.read_parquet(decisions_path(on_disk))))
        finally:
            instance.dispose()
    storage.reset()
    time.sleep(0.5)
    assert not [pid for pid in started if _alive(pid)], "a service outlived the test"


def test_unreachable_postgres_and_broker_fail_naming_the_url(tmp_path, monkeypatch):
    """An instance database that does not answer fails init-instance in seconds, naming the URL
    (without its password); a celery run whose broker does not answer fails, naming the broker,
    instead of waiting for workers that will never get its steps."""
    _services_or_skip()
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    monkeypatch.setenv("CURATION_HOME", str(tmp_path / "home"))
    port = free_port()
    started = time.perf_counter()
    with pytest.raises(RuntimeError) as info:
        init_instance(f"postgresql://curation:secret@127.0.0.1:{port}/dagster")
    assert time.perf_counter() - started < 30
    message = str(info.value)
    assert f"postgresql://curation:***@127.0.0.1:{port}/dagster" in message, message
    assert "secret" not in message and "make services" in message

    images = tmp_path / "images"
    for i in range(4):
        write_photo(images / "a" / f"img_{i}.jpg", i)
    projects = tmp_path / "projects"
    projects.mkdir()
    project = load_project(
        project_file(projects, "nobroker", str(images), str(tmp_path / "store"), runs={"executor": "celery"})
    )
    broker = f"redis://127.0.0.1:{free_port()}/0"
    monkeypatch.setenv("CURATION_PROJECTS", str(projects))
    monkeypatch.setenv("CURATION_CELERY_BROKER", broker)
    instance = init_instance()
    instance.add_dynamic_partitions(partitions_name(project), ["a"])
    started = time.perf_counter()
    with code_location(instance) as workspace:
        outcome = LaunchedRuns(instance, workspace).run(shard_job_name(project), partition_key="a")
    instance.dispose()
    assert not outcome.success
    assert time.perf_counter() - started < 120, "a dead broker must fail the run, not hang it"
    assert broker.removeprefix("redis://").split("/")[0] in outcome.message, outcome.message


def test_a_killed_step_process_is_run_again_by_a_worker(tmp_path, monkeypatch):
    """SIGKILL the celery worker process running a shard's pass mid-step: its task is handed back
    (acks late, rejected when its worker is lost), a worker runs the step again, and the launched
    run succeeds with every image's row, under its timeout instead of hanging."""
    _services_or_skip()
    images = tmp_path / "images"
    for i in range(240):
        write_photo(images / "big" / f"img_{i:04d}.jpg", 7000 + i, size=(900, 700))
    projects = tmp_path / "projects"
    projects.mkdir()
    project = load_project(
        project_file(projects, "killed", str(images), str(tmp_path / "store"), runs={"executor": "celery"})
    )
    monkeypatch.setenv("CURATION_PROJECTS", str(projects))
    monkeypatch.setenv("CURATION_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    killed: list[int] = []
    with LocalPostgres() as postgres, LocalRedis() as redis:
        monkeypatch.setenv("CURATION_CELERY_BROKER", redis.url)
        instance = init_instance(postgres.url)
        try:
            instance.add_dynamic_partitions(partitions_name(project), ["big"])
            with CeleryWorkers(redis.url, count=2, log_folder=tmp_path / "celery") as workers:
                parents = set(workers.pids())
                stop = threading.Event()

                def killer() -> None:
                    # wrapper (dagster-celery) -> celery worker -> its pool process, which runs the
                    # step: one that has started the pass's decode workers is mid-step
                    while not stop.is_set() and not killed:
                        for wrapper in parents:
                            with contextlib.suppress(psutil.Error):
                                for worker in psutil.Process(wrapper).children():
                                    for pool_process in worker.children():
                                        if len(pool_process.children(recursive=True)) >= 2:
                                            pool_process.kill()
                                            killed.append(pool_process.pid)
                                            return
                        time.sleep(0.05)

                thread = threading.Thread(target=killer, daemon=True)
                thread.start()
                try:
                    with code_location(instance) as workspace:
                        outcome = LaunchedRuns(instance, workspace).run(
                            shard_job_name(project), partition_key="big"
                        )
                finally:
                    stop.set()
                    thread.join(timeout=5)
        finally:
            instance.dispose()
    assert killed, "no step process was seen running: the shard finished before it could be killed"
    assert outcome.success, outcome.message
    store = StoreResource().for_project(project)
    sanitized = store.read_parquet(store.shard_path("sanitized_images", "big"))
    assert sanitized.height == 240 and sanitized.filter(pl.col("status") == "rejected").is_empty()
