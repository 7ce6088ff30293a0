"""Pools that shrink: a shard folder removed from the pool leaves the curation.

The sensor retires its partition, moves its per-shard outputs into ``retired/<stamp>/`` (with
a manifest) and requests the global job; the decisions and the export then drop it, and the
report counts it. Files removed inside a kept shard leave with that shard's re-run.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import dagster as dg
import polars as pl
import pytest

from curation_assets.assets.ingest.discovery import partitions_name, pending_shards, retire_removed_shards
from curation_assets.assets.outputs.decisions import decisions_path
from curation_assets.assets.outputs.export import export_root
from curation_assets.assets.project import global_job_name, per_shard_asset_names, shard_job_name
from curation_assets.core.ingest.retirement import (
    MANIFEST_FILE,
    ShardToRetire,
    load_batches,
    restore_batch,
    retire_shards,
    retired_root,
    retired_totals,
)
from curation_assets.core.outputs.export import export_tree
from curation_assets.definitions import build_definitions
from curation_assets.resources.store import ProjectStore, StoreResource
from curation_assets_tests.conftest import make_project, sensor_tick, write_photo

SHARDS = ("a", "b", "c")


def _run(defs: dg.Definitions, instance: dg.DagsterInstance, job: str, key: str | None = None) -> None:
    result = defs.resolve_job_def(job).execute_in_process(partition_key=key, instance=instance)
    assert result.success


def _decided_shards(store: ProjectStore) -> dict[str, int]:
    ids = pl.read_parquet(decisions_path(store), columns=["image_id"])["image_id"]
    return dict(ids.str.split("/").list.first().value_counts().iter_rows())


def _export_entries(project, store: ProjectStore) -> list[Path]:
    images = export_root(project, store) / "images"
    return [p for p in images.rglob("*") if p.is_symlink() or p.is_file()]


def test_removed_shard_is_retired_and_leaves_decisions_export_and_report(tmp_path: Path) -> None:
    root = tmp_path / "pool"
    for shard in SHARDS:
        for i in range(3):
            write_photo(root / shard / f"{i}.jpg", 10 * SHARDS.index(shard) + i)
    project = make_project(tmp_path, str(root))
    defs = build_definitions([project])
    store = StoreResource().for_project(project)
    instance = dg.DagsterInstance.ephemeral()

    for request in sensor_tick(defs, project, instance).run_requests:
        assert request.job_name == shard_job_name(project)
        _run(defs, instance, shard_job_name(project), request.partition_key)
    _run(defs, instance, global_job_name(project))
    assert _decided_shards(store) == {"a": 3, "b": 3, "c": 3}
    assert any("/c/" in str(p) for p in _export_entries(project, store))

    shutil.rmtree(root / "c")  # a shard leaves the pool
    (root / "a" / "2.jpg").unlink()  # and a file leaves a kept shard
    os.utime(root / "a", ns=(1, 1))  # a fingerprint change even within the clock's resolution
    result = sensor_tick(defs, project, instance)

    by_job = {(r.job_name, r.partition_key) for r in result.run_requests}
    assert by_job == {(shard_job_name(project), "a"), (global_job_name(project), None)}
    assert [r.tags["curation/shard_reason"] for r in result.run_requests if r.partition_key] == ["changed"]
    deletes = [
        r for r in result.dynamic_partitions_requests if isinstance(r, dg.DeleteDynamicPartitionsRequest)
    ]
    assert [list(r.partition_keys) for r in deletes] == [["c"]]
    assert set(instance.get_dynamic_partitions(partitions_name(project))) == {"a", "b"}

    # c's per-shard outputs moved aside, with a manifest that names them; none left in place
    (batch,) = load_batches(store.root)
    assert batch.status == "done" and [s.key for s in batch.shards] == ["c"]
    (retired,) = batch.shards
    assert retired.images == 3 and retired.location.endswith("c")
    folder = retired_root(store.root) / batch.stamp
    assert json.loads((folder / MANIFEST_FILE).read_text())["shards"][0]["key"] == "c"
    for asset in per_shard_asset_names(project):
        assert store.shard_files(asset, ["c"]) == {"c": []}
    assert {rel.split("/")[0] for rel in retired.files} >= {"image_inventory", "sanitized_images"}
    assert all((folder / rel).is_file() for rel in retired.files)

    # what the sensor requested: the changed shard, then the global job
    _run(defs, instance, shard_job_name(project), "a")
    inventory = pl.read_parquet(store.shard_path("image_inventory", "a"))
    assert sorted(inventory["image_id"]) == ["a/0.jpg", "a/1.jpg"]
    assert "a/2.jpg" not in set(pl.read_parquet(store.shard_path("sanitized_images", "a"))["image_id"])
    _run(defs, instance, global_job_name(project))

    assert _decided_shards(store) == {"a": 2, "b": 3}
    entries = _export_entries(project, store)
    assert entries and not any("/c/" in str(p) or (p.name == "2.jpg" and "/a/" in str(p)) for p in entries)
    assert all(p.exists() for p in entries)  # no dangling link
    manifest = pl.read_parquet(export_root(project, store) / "manifest.parquet")
    assert not manifest.filter(pl.col("image_id").str.starts_with("c/")).height

    report = instance.get_latest_materialization_event(dg.AssetKey([project.name, "curation_report"]))
    metadata = report.asset_materialization.metadata
    assert (metadata["retired_shards"].value, metadata["retired_images"].value) == (1, 3)

    quiet = sensor_tick(defs, project, instance)  # retired once: no second batch, no second global run
    assert not quiet.run_requests and len(load_batches(store.root)) == 1


def test_nothing_is_retired_while_a_root_is_missing_or_empty(tmp_path: Path) -> None:
    train, val = tmp_path / "train", tmp_path / "val"
    write_photo(train / "a" / "0.jpg", 1)
    write_photo(val / "b" / "0.jpg", 2)
    project = make_project(tmp_path, {"train": str(train), "val": str(val)})
    store = StoreResource().for_project(project)
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(partitions_name(project), ["train.a", "val.b"])

    shutil.rmtree(val)  # an unmounted split: its shards look removed
    pending = pending_shards(project, store, instance, persist_new_chunks=False)
    assert pending.removed == ["val.b"]
    held = retire_removed_shards(project, store, pending, instance)
    assert not held.keys and "val" in (held.held_back or "")
    assert set(instance.get_dynamic_partitions(partitions_name(project))) == {"train.a", "val.b"}

    shutil.rmtree(train / "a")
    val.mkdir()  # both roots there, but no shard at all
    pending = pending_shards(project, store, instance, persist_new_chunks=False)
    assert "no shard at all" in (retire_removed_shards(project, store, pending, instance).held_back or "")

    write_photo(train / "z" / "0.jpg", 3)  # a real shard again: the two gone ones are retired
    pending = pending_shards(project, store, instance, persist_new_chunks=False)
    retired = retire_removed_shards(project, store, pending, instance)
    assert retired.keys == ["train.a", "val.b"] and retired.batch is None  # they had no outputs yet
    assert instance.get_dynamic_partitions(partitions_name(project)) == []


def _shard_outputs(store: ProjectStore, key: str) -> list[Path]:
    store.write_parquet(
        pl.DataFrame({"image_id": [f"{key}/x.jpg"]}), store.shard_path("image_inventory", key)
    )
    vectors = store.shard_path("copy_embeddings", key, ".0123456789.npy")
    vectors.parent.mkdir(parents=True, exist_ok=True)
    vectors.write_bytes(b"array")
    return [store.shard_path("image_inventory", key), vectors]


def test_shard_files_are_matched_exactly_and_restore_never_overwrites(tmp_path: Path) -> None:
    store = ProjectStore(tmp_path / "store", "p")
    mine = _shard_outputs(store, "a")
    other = _shard_outputs(store, "a.0123456789")  # a key that extends "a" with a dot
    assert store.shard_files("image_inventory", ["a"]) == {"a": [mine[0]]}
    assert store.shard_files("copy_embeddings", ["a", "a.0123456789"]) == {
        "a": [mine[1]],
        "a.0123456789": [other[1]],
    }

    batch = retire_shards(store.root, [ShardToRetire("a", "/pool/a", 1, mine)], "gone")
    assert batch is not None and not any(p.exists() for p in mine) and all(p.exists() for p in other)
    assert retired_totals(load_batches(store.root)) == (1, 1)
    assert retired_totals(load_batches(store.root), active=["a"]) == (0, 0)
    again = retire_shards(store.root, [ShardToRetire("a.0123456789", "", None, other)], "gone")
    assert again is not None and again.stamp != batch.stamp  # same second: a fresh folder

    store.write_parquet(pl.DataFrame({"image_id": ["new"]}), mine[0])  # processed anew meanwhile
    result = restore_batch(store.root, batch.stamp)
    assert result.conflicts == ["image_inventory/a.parquet"] and result.restored == []
    assert mine[1].read_bytes() == b"array"  # the other file came back
    assert pl.read_parquet(mine[0])["image_id"].to_list() == ["new"]  # never overwritten

    mine[0].unlink()
    assert restore_batch(store.root, batch.stamp).restored == ["a"]
    assert pl.read_parquet(mine[0])["image_id"].to_list() == ["a/x.jpg"]
    assert retired_totals(load_batches(store.root)) == (1, 0)  # only a.0123456789 is still retired
    with pytest.raises(FileNotFoundError):
        restore_batch(store.root, "19700101T000000Z")


def test_export_tree_removes_what_the_plan_dropped_and_only_its_own_files(tmp_path: Path) -> None:
    source = tmp_path / "ds"
    rows = []
    for name in ("a", "b", "c"):
        path = write_photo(source / f"{name}.png", ord(name))
        rows.append(
            {
                "image_id": f"s/{name}.png",
                "split": "train",
                "source_path": str(path),
                "offset": None,
                "size_bytes": path.stat().st_size,
                "content_hash": None,
                "rel_path": f"s/{name}.png",
                "fixes": [],
                "rotate": 0,
            }
        )
    out = tmp_path / "out"
    foreign = out / "train" / "s" / "notes.txt"  # not written by the export: never removed
    foreign.parent.mkdir(parents=True)
    foreign.write_text("mine")
    assert export_tree(pl.DataFrame(rows), out, "symlink").written == 3

    (source / "b.png").unlink()  # b's source is gone, c leaves the plan
    summary = export_tree(pl.DataFrame(rows[:2]), out, "symlink")
    assert [image_id for image_id, _ in summary.failed] == ["s/b.png"]
    assert summary.removed == 2  # c's link, and b's link that now dangles
    left = sorted(p.name for p in (out / "train" / "s").iterdir())
    assert left == ["a.png", "notes.txt"] and foreign.read_text() == "mine"


def test_refresh_schedule_and_headless_runner_retire_removed_shards(tmp_path: Path) -> None:
    from curation_assets.runner import materialize_project

    root = tmp_path / "pool"
    write_photo(root / "a" / "0.jpg", 1)
    project = make_project(tmp_path, str(root))
    defs = build_definitions([project])
    store = StoreResource().for_project(project)
    name = partitions_name(project)
    with dg.instance_for_test() as instance:  # schedule contexts need an instance with a ref
        instance.add_dynamic_partitions(name, ["a", "gone"])
        _shard_outputs(store, "gone")
        schedule = defs.resolve_schedule_def(f"{project.name}_refresh_schedule")
        with dg.build_schedule_context(instance=instance, resources={"store": StoreResource()}) as context:
            schedule.evaluate_tick(context)
        assert instance.get_dynamic_partitions(name) == ["a"]
        assert [s.key for b in load_batches(store.root) for s in b.shards] == ["gone"]

        instance.add_dynamic_partitions(name, ["gone-too"])
        _shard_outputs(store, "gone-too")
        summary = materialize_project(project, defs, instance, run_global=False, echo=lambda _: None)
        assert summary.shards_run == ["a"] and not summary.failed
        assert instance.get_dynamic_partitions(name) == ["a"]
        assert store.shard_files("image_inventory", ["gone-too"]) == {"gone-too": []}
        assert retired_totals(load_batches(store.root)) == (2, 2)
