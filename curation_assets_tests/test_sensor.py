"""Discovery: a new shard becomes a partition and only it runs; other shards stay untouched."""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg
import polars as pl

from curation_assets.assets.project import shard_job_name
from curation_assets.definitions import build_definitions
from curation_assets.resources.store import StoreResource
from curation_assets_tests.conftest import make_project, sensor_tick, write_photo


def _run(defs: dg.Definitions, project, instance: dg.DagsterInstance, key: str) -> None:
    assert (
        defs.resolve_job_def(shard_job_name(project))
        .execute_in_process(partition_key=key, instance=instance)
        .success
    )


def _stamps(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.glob("*.parquet"))}


def test_new_shard_is_added_and_run_alone(tmp_path: Path):
    root = tmp_path / "pool"
    for shard in ("a", "b"):
        for i in range(3):
            write_photo(root / shard / f"{i}.jpg", hash((shard, i)) % 1000)
    project = make_project(tmp_path, str(root))
    defs = build_definitions([project])
    instance = dg.DagsterInstance.ephemeral()

    first = sensor_tick(defs, project, instance)
    assert sorted(r.partition_key for r in first.run_requests) == ["a", "b"]
    assert set(instance.get_dynamic_partitions("testproj_shards")) == {"a", "b"}
    for request in first.run_requests:
        _run(defs, project, instance, request.partition_key)
    store = StoreResource().for_project(project)
    before = {asset: _stamps(store.asset_dir(asset)) for asset in ("image_inventory", "sanitized_images")}
    assert all(set(files) == {"a.parquet", "b.parquet"} for files in before.values())

    quiet = sensor_tick(defs, project, instance)
    assert not quiet.run_requests and "none new or changed" in quiet.skip_reason.skip_message

    for i in range(2):
        write_photo(root / "c" / f"{i}.jpg", 500 + i)
    second = sensor_tick(defs, project, instance)
    assert [r.partition_key for r in second.run_requests] == ["c"]
    assert second.run_requests[0].tags["curation/shard_reason"] == "new"
    assert [list(r.partition_keys) for r in second.dynamic_partitions_requests] == [["c"]]
    _run(defs, project, instance, "c")

    for asset, files in before.items():
        after = _stamps(store.asset_dir(asset))
        assert {name: after[name] for name in files} == files  # same bytes, same mtimes
        assert "c.parquet" in after


def test_changed_shard_is_rerun_and_refresh_waits_for_it(tmp_path: Path):
    root = tmp_path / "pool"
    write_photo(root / "a" / "0.jpg", 1)
    project = make_project(tmp_path, str(root))
    defs = build_definitions([project])
    with dg.instance_for_test() as instance:  # schedule contexts need an instance with a ref
        _rerun_changed_shard(defs, project, instance, root)


def _rerun_changed_shard(defs: dg.Definitions, project, instance: dg.DagsterInstance, root: Path) -> None:
    for request in sensor_tick(defs, project, instance).run_requests:
        _run(defs, project, instance, request.partition_key)

    schedule = defs.resolve_schedule_def("testproj_refresh_schedule")
    with dg.build_schedule_context(instance=instance, resources={"store": StoreResource()}) as context:
        assert isinstance(schedule.evaluate_tick(context).run_requests[0], dg.RunRequest)

    os.utime(root / "a", ns=(1, 1))
    write_photo(root / "a" / "1.jpg", 2)
    changed = sensor_tick(defs, project, instance)
    assert [(r.partition_key, r.tags["curation/shard_reason"]) for r in changed.run_requests] == [
        ("a", "changed")
    ]
    with dg.build_schedule_context(instance=instance, resources={"store": StoreResource()}) as context:
        data = schedule.evaluate_tick(context)
    assert not data.run_requests and "still to process" in data.skip_message


def test_missing_root_is_a_skip_not_a_crash(tmp_path: Path):
    project = make_project(tmp_path, str(tmp_path / "not-there"))
    defs = build_definitions([project])
    result = sensor_tick(defs, project, dg.DagsterInstance.ephemeral())
    assert not result.run_requests and "roots not found" in result.skip_reason.skip_message


def _sensor_status(defs: dg.Definitions, project) -> dg.DefaultSensorStatus:
    return defs.resolve_sensor_def(f"{project.name}_discovery_sensor").default_status


def test_sensor_of_a_missing_root_is_stopped_and_its_skip_names_the_root(tmp_path: Path):
    # A walkthrough project whose dataset is not on this machine (tol10m, gldv2) must not tick
    # every minute just to say so; if started by hand, the tick page names what is missing.
    missing = tmp_path / "not-there"
    project = make_project(tmp_path, str(missing), discovery={"sensor_running": True})
    defs = build_definitions([project])
    assert _sensor_status(defs, project) == dg.DefaultSensorStatus.STOPPED
    assert str(missing) in defs.resolve_sensor_def("testproj_discovery_sensor").description
    result = sensor_tick(defs, project, dg.DagsterInstance.ephemeral())
    assert not result.run_requests and str(missing) in result.skip_reason.skip_message


def test_sensor_of_an_existing_root_runs_only_when_switched_on(tmp_path: Path):
    root = tmp_path / "pool"
    root.mkdir()
    running = make_project(tmp_path, str(root), discovery={"sensor_running": True})
    assert _sensor_status(build_definitions([running]), running) == dg.DefaultSensorStatus.RUNNING
    off = make_project(tmp_path, str(root), discovery={"sensor_running": False})
    assert _sensor_status(build_definitions([off]), off) == dg.DefaultSensorStatus.STOPPED


def test_partly_missing_roots_are_named_when_nothing_is_requested(tmp_path: Path):
    root, missing = tmp_path / "train", tmp_path / "test-not-mounted"
    write_photo(root / "a" / "0.jpg", 1)
    project = make_project(tmp_path, {"train": str(root), "test": str(missing)})
    defs = build_definitions([project])
    assert _sensor_status(defs, project) == dg.DefaultSensorStatus.RUNNING  # one root is there
    instance = dg.DagsterInstance.ephemeral()
    first = sensor_tick(defs, project, instance)
    assert [r.partition_key for r in first.run_requests] == ["train.a"]
    store = StoreResource().for_project(project)
    fingerprint = first.run_requests[0].run_key.split(":", 1)[1]
    store.write_parquet(  # as the run would: an inventory with the shard's fingerprint
        pl.DataFrame({"image_id": ["x"]}),
        store.shard_path("image_inventory", "train.a"),
        metadata={"fingerprint": fingerprint},
    )
    quiet = sensor_tick(defs, project, instance, first.cursor)
    assert not quiet.run_requests
    assert "none new or changed" in quiet.skip_reason.skip_message
    assert str(missing) in quiet.skip_reason.skip_message


def test_many_shards_are_requested_once_in_bounded_batches(tmp_path: Path, monkeypatch):
    from curation_assets.assets.ingest import discovery

    root = tmp_path / "pool"
    for i in range(1000):
        (root / f"s{i:04d}").mkdir(parents=True)
        (root / f"s{i:04d}" / "x.jpg").write_bytes(b"x")  # never read: the runs are not launched
    project = make_project(tmp_path, str(root), discovery={"max_new_shards_per_tick": 400})
    defs = build_definitions([project])
    instance = dg.DagsterInstance.ephemeral()
    footers: list[str] = []
    real = discovery.recorded_fingerprint
    monkeypatch.setattr(
        discovery, "recorded_fingerprint", lambda store, key: footers.append(key) or real(store, key)
    )

    store = StoreResource().for_project(project)
    requested: list[str] = []
    cursor = None
    for batch in (400, 400, 200):
        result = sensor_tick(defs, project, instance, cursor)
        cursor = result.cursor
        assert len(result.run_requests) == batch
        assert {r.tags["curation/shard_reason"] for r in result.run_requests} == {"new"}
        requested += [r.partition_key for r in result.run_requests]
        for request in result.run_requests:  # as the runs would: an inventory with its fingerprint
            fingerprint = request.run_key.split(":", 1)[1]
            path = store.shard_path("image_inventory", request.partition_key)
            store.write_parquet(
                pl.DataFrame({"image_id": ["x"]}), path, metadata={"fingerprint": fingerprint}
            )
    assert sorted(requested) == [f"s{i:04d}" for i in range(1000)]  # each shard once, in key order
    assert len(instance.get_dynamic_partitions("testproj_shards")) == 1000

    footers.clear()
    steady = sensor_tick(defs, project, instance, cursor)
    cursor = steady.cursor
    assert not steady.run_requests and "none new or changed" in steady.skip_reason.skip_message
    assert footers == []  # unchanged shards: no inventory read at all
    assert cursor is not None and len(cursor) < 8000  # bounded, whatever the pool size

    os.utime(root / "s0123", ns=(1, 1))  # one shard changes
    changed = sensor_tick(defs, project, instance, cursor)
    cursor = changed.cursor
    assert [(r.partition_key, r.tags["curation/shard_reason"]) for r in changed.run_requests] == [
        ("s0123", "changed")
    ]
    assert "s0123" in footers and len(footers) < 20  # only its bucket's inventories were read
    assert changed.run_requests[0].run_key == "s0123:dir:1"
    again = sensor_tick(defs, project, instance, cursor)
    assert not again.run_requests
