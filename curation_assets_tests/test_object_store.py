"""Pools and stores on object storage: an S3-compatible endpoint on localhost (moto in server mode,
started and stopped by curation_assets.services) stands in for a bucket.

The same generated pool is read as a local folder, as a bucket folder, as WebDataset tars with
sidecars on the bucket and as parquet files with image bytes on the bucket; the store is local
or on the bucket. The curation must not depend on where the bytes live.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from curation_assets.assets.ingest.discovery import partitions_name
from curation_assets.assets.keys import COPY_EMBEDDINGS, INVENTORY
from curation_assets.assets.outputs.apply import ApplyRefused, run_apply
from curation_assets.assets.outputs.decisions import decisions_path
from curation_assets.assets.outputs.export import export_root
from curation_assets.config import load_project
from curation_assets.core import storage
from curation_assets.definitions import build_definitions
from curation_assets.launch import LaunchedRuns, code_location
from curation_assets.resources.store import StoreResource, project_store
from curation_assets.runner import init_instance, materialize_project
from curation_assets.services import LocalS3, free_port
from curation_assets_tests.conftest import write_photo

pytestmark = pytest.mark.xdist_group("object_store")

MAX_RUNTIME_S = 240
SHARDS = {"a": 24, "b": 16}


@pytest.fixture(scope="module")
def s3() -> Iterator[LocalS3]:
    with LocalS3() as server:
        yield server


@pytest.fixture
def s3_env(s3: LocalS3, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> LocalS3:
    """The endpoint and credentials in the environment (child processes inherit them), and a fresh
    pair of buckets per test."""
    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("CURATION_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    storage.reset()
    client = s3.client()
    for bucket in ("pool", "store"):
        if any(b["Name"] == bucket for b in client.list_buckets().get("Buckets", [])):
            keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", [])]
            for key in keys:
                client.delete_object(Bucket=bucket, Key=key)
        else:
            s3.make_bucket(bucket)
    yield s3
    storage.reset()


def write_pool(images: Path) -> None:
    """Two shards of photos, a cross-shard exact copy and a broken file."""
    for shard, count in SHARDS.items():
        for i in range(count):
            write_photo(images / shard / f"img_{i:03d}.jpg", i + (1000 if shard == "b" else 0))
    shutil.copy(images / "a" / "img_000.jpg", images / "b" / "img_900.jpg")
    (images / "b" / "img_901.jpg").write_bytes(b"\xff\xd8 not a jpeg")


def write_tars(images: Path, out: Path) -> None:
    """One WebDataset tar per shard folder, each image with a .json sidecar (img2dataset's layout)."""
    out.mkdir(parents=True, exist_ok=True)
    for folder in sorted(p for p in images.iterdir() if p.is_dir()):
        with tarfile.open(out / f"{folder.name}.tar", "w") as archive:
            for path in sorted(folder.iterdir()):
                for name, data in (
                    (path.name, path.read_bytes()),
                    (f"{path.stem}.json", json.dumps({"label": folder.name, "url": path.name}).encode()),
                ):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    archive.addfile(info, io.BytesIO(data))


def write_parquets(images: Path, out: Path) -> None:
    """One parquet file per shard folder in the Hugging Face datasets layout: an ``image`` struct of
    bytes and path, plus a label column; small row groups so reads cross them."""
    out.mkdir(parents=True, exist_ok=True)
    for folder in sorted(p for p in images.iterdir() if p.is_dir()):
        paths = sorted(folder.iterdir())
        table = pa.table(
            {
                "image": [{"bytes": p.read_bytes(), "path": p.name} for p in paths],
                "label": [folder.name] * len(paths),
            }
        )
        pq.write_table(table, out / f"{folder.name}.parquet", row_group_size=7)


def project_file(folder: Path, name: str, root: str, store: str, dataset=None, **top) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": name,
                "storage_root": store,
                "dataset": {"roots": {"train": root}, **(dataset or {})},
                "discovery": {"sensor_running": False},
                "runs": {
                    "shard_max_runtime_seconds": MAX_RUNTIME_S,
                    "global_max_runtime_seconds": MAX_RUNTIME_S,
                },
                "stages": {
                    "sanitize": {"workers": 2, "chunk_size": 8},
                    "embeddings": {
                        "enabled": True,
                        "copy_model": "descriptor",
                        "semantic_model": "descriptor_content",
                    },
                    "near_dedup": {"enabled": True, "model": "descriptor", "threshold": 0.1},
                },
                "export": {"layout": "copy"},
                **top,
            }
        )
    )
    return path


def comparable(decisions: pl.DataFrame) -> pl.DataFrame:
    """The decisions without the columns that name where the bytes live."""
    return decisions.drop("source_path", "offset", strict=False).sort("image_id")


def test_pool_and_store_on_s3_give_the_local_decisions(s3_env: LocalS3, tmp_path: Path, monkeypatch):
    """Launched runs (code server, run workers) of the same pool: local folder + local store against
    bucket folder + bucket store. Same decisions; the export and report land on the bucket."""
    images = tmp_path / "images"
    write_pool(images)
    s3_env.upload_tree(images, "s3://pool/images")
    projects = tmp_path / "projects"
    projects.mkdir()
    local_file = project_file(projects, "on_disk", str(images), str(tmp_path / "store"))
    remote_file = project_file(projects, "on_s3", "s3://pool/images", "s3://store/curation")
    monkeypatch.setenv("CURATION_PROJECTS", str(projects))
    instance = init_instance()
    decisions = {}
    with code_location(instance) as workspace:
        runs = LaunchedRuns(instance, workspace)
        for file in (local_file, remote_file):
            project = load_project(file)
            summary = materialize_project(project, runs, instance, echo=lambda _: None)
            assert not summary.failed, summary.failed
            store = StoreResource().for_project(project)
            decisions[project.name] = store.read_parquet(decisions_path(store))
    instance.dispose()
    local, remote = comparable(decisions["on_disk"]), comparable(decisions["on_s3"])
    assert local.height == sum(SHARDS.values()) + 2
    assert remote.equals(local)
    assert remote.filter(pl.col("image_id") == "b/img_900.jpg")["action"].item() == "remove"
    remote_project = load_project(remote_file)
    store = StoreResource().for_project(remote_project)
    assert str(store.root).startswith("s3://store/curation/")
    root = export_root(remote_project, store)
    assert (root / "manifest.parquet").is_file() and (root / "files.txt").is_file()
    kept = local.filter(pl.col("action") != "remove").height
    assert len(list((root / "images").rglob("*.jpg"))) == kept
    assert (store.asset_dir("curation_report") / "report.html").is_file()
    assert not list((tmp_path / "store").glob("on_s3*")), "nothing of the S3 project on the local disk"


def _vectors(project) -> dict[str, np.ndarray]:
    store = StoreResource().for_project(project)
    out = {}
    for shard in SHARDS:
        ids, vectors, _ = store.read_vectors(COPY_EMBEDDINGS, shard)
        for image_id, row in ids.select("image_id", "row").iter_rows():
            if row is not None:
                out[image_id] = np.asarray(vectors[row], dtype=np.float32)
    return out


def test_webdataset_and_parquet_shards_on_s3_give_the_folder_vectors(s3_env: LocalS3, tmp_path: Path):
    """Tar shards with sidecars and parquet shards with image bytes, read from the bucket, give the
    same vectors as the folder layout, and carry their metadata into the inventory (and labels)."""
    images = tmp_path / "images"
    write_pool(images)
    write_tars(images, tmp_path / "wds")
    write_parquets(images, tmp_path / "pq")
    s3_env.upload_tree(tmp_path / "wds", "s3://pool/wds")
    s3_env.upload_tree(tmp_path / "pq", "s3://pool/pq")
    projects = tmp_path / "projects"
    projects.mkdir()
    layouts = {
        "folder": project_file(projects, "folder", str(images), str(tmp_path / "store")),
        "wds": project_file(
            projects,
            "wds",
            "s3://pool/wds",
            "s3://store/c",
            {"input_kind": "webdataset", "shard_rule": {"kind": "tar"}},
        ),
        "pq": project_file(
            projects,
            "pq",
            "s3://pool/pq",
            "s3://store/c",
            {"input_kind": "parquet", "shard_rule": {"kind": "parquet"}},
            labels={"source": "column", "label_column": "label"},
        ),
    }
    instance = init_instance()
    found = {}
    for name, file in layouts.items():
        project = load_project(file)
        summary = materialize_project(
            project, build_definitions([project]), instance, run_global=False, echo=lambda _: None
        )
        assert not summary.failed, summary.failed
        found[name] = _vectors(project)
        assert sorted(instance.get_dynamic_partitions(partitions_name(project))) == sorted(SHARDS)
    assert len(found["folder"]) == sum(SHARDS.values()) + 1  # the broken file has no vector
    for name in ("wds", "pq"):
        assert found[name].keys() == found["folder"].keys(), name
        for image_id, vector in found["folder"].items():
            np.testing.assert_allclose(found[name][image_id], vector, atol=1e-3, err_msg=f"{name} {image_id}")

    wds = load_project(layouts["wds"])
    inventory = (
        StoreResource()
        .for_project(wds)
        .read_parquet(StoreResource().for_project(wds).shard_path(INVENTORY, "b"))
    )
    assert not inventory["rel_path"].str.ends_with(".json").any(), "sidecars are metadata, not files"
    row = inventory.filter(pl.col("rel_path") == "img_003.jpg").row(0, named=True)
    assert json.loads(row["metadata"]) == {"label": "b", "url": "img_003.jpg"}

    from curation_assets.assets.labeled.labeled_data import all_images, with_labels

    parquet = load_project(layouts["pq"])
    labeled, stats = with_labels(parquet, all_images(StoreResource().for_project(parquet), sorted(SHARDS)))
    assert labeled.height >= sum(SHARDS.values()) + 1
    assert stats["labeled_images"] == labeled.height, "every row's label column is its label"
    assert set(zip(labeled["image_id"].str.slice(0, 1), labeled["label"], strict=True)) == {
        ("a", "a"),
        ("b", "b"),
    }


def test_unreachable_endpoint_fails_fast_naming_the_url_and_setting(s3_env, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    storage.reset()
    project = load_project(project_file(tmp_path, "gone", str(tmp_path), "s3://store/x"))
    started = time.perf_counter()
    with pytest.raises(OSError) as info:
        project_store(project)
    assert time.perf_counter() - started < 30, "an unreachable endpoint must not hang a step"
    message = str(info.value)
    assert (
        "s3://store/x" in message and "AWS_ENDPOINT_URL" in message and "EndpointConnectionError" in message
    )


def test_missing_credentials_fail_naming_the_settings(s3_env, tmp_path, monkeypatch):
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    storage.reset()
    project = load_project(project_file(tmp_path, "nocreds", str(tmp_path), "s3://store/x"))
    with pytest.raises(OSError) as info:
        project_store(project)
    message = str(info.value)
    assert "s3://store/x" in message and "AWS_ACCESS_KEY_ID" in message and "NoCredentialsError" in message


def test_a_failed_write_leaves_no_object_and_a_rerun_writes_it(s3_env, tmp_path):
    project = load_project(project_file(tmp_path, "atomic", str(tmp_path), "s3://store/atomic"))
    store = project_store(project)
    path = store.global_path("thing", "table.parquet")

    def killed_half_way(local: Path) -> None:
        local.write_bytes(b"PAR1 half a table")
        raise KeyboardInterrupt  # the step is stopped mid-write

    with pytest.raises(KeyboardInterrupt):
        store.write_with(path, killed_half_way)
    assert not path.exists(), "a half-written object under the final key"
    store.write_parquet(pl.DataFrame({"x": [1, 2]}), path, metadata={"note": "rerun"})
    assert store.read_parquet(path)["x"].to_list() == [1, 2]
    assert store.parquet_metadata(path) == {"note": "rerun"}


def test_apply_refuses_object_storage_and_links_cannot_export_there(s3_env, tmp_path):
    apply = {"backup_root": str(tmp_path / "backup")}
    project = load_project(
        project_file(tmp_path, "refuse", "s3://pool/images", str(tmp_path / "store"), apply=apply)
    )
    with pytest.raises(ApplyRefused) as info:
        run_apply(project, StoreResource(), confirm=True, log=None)
    assert "dataset.roots.train = s3://pool/images" in str(info.value)
    assert "local directories only" in str(info.value)

    import dagster as dg

    from curation_assets.assets.outputs.export import export_staging

    export = {"layout": "symlink", "root": "s3://store/export"}
    linked = load_project(
        project_file(tmp_path, "linked", str(tmp_path), str(tmp_path / "store"), export=export)
    )
    store = project_store(linked)
    with pytest.raises(dg.Failure) as failure:
        export_staging(linked, store, export_root(linked, store))
    assert "symlink" in str(failure.value) and "s3://store/export" in str(failure.value)


def test_a_missing_bucket_prefix_is_a_missing_root(s3_env, tmp_path):
    from curation_assets.core.ingest.shards import discover_shards

    project = load_project(project_file(tmp_path, "empty", "s3://pool/nothing-here", str(tmp_path / "store")))
    found = discover_shards(project.dataset)
    assert found.shards == [] and found.missing_roots == ["s3://pool/nothing-here"]


def test_local_paths_stay_plain_paths(tmp_path):
    """The embedded default is untouched: local and file:// roots are pathlib paths, no fsspec."""
    assert type(storage.as_location(str(tmp_path))) is type(tmp_path)
    assert storage.as_location(f"file://{tmp_path}") == tmp_path
    assert not storage.is_remote(f"file://{tmp_path}") and storage.is_remote("s3://b/k")
    assert os.fspath(storage.as_location(str(tmp_path))) == str(tmp_path)


def test_reference_sets_on_s3_are_listed_and_read_in_place(s3_env, tmp_path):
    """An evaluation set as a bucket folder and as tars on the bucket: the same image names and
    bytes as locally, and a fingerprint that changes when an object is rewritten."""
    from curation_assets.core.dedup.references import list_reference_set, reference_refs
    from curation_assets.core.ingest.images import read_bytes

    evals = tmp_path / "evals"
    for i in range(5):
        write_photo(evals / "val" / f"e{i}.jpg", 500 + i)
    write_tars(evals, tmp_path / "evals_wds")
    s3_env.upload_tree(evals, "s3://pool/evals")
    s3_env.upload_tree(tmp_path / "evals_wds", "s3://pool/evals_wds")
    local = {ref.image_id: ref for ref in reference_refs(list_reference_set("v", evals))[0]}
    folder = list_reference_set("v", "s3://pool/evals")
    remote, unreadable = reference_refs(folder)
    assert not unreadable and [r.image_id for r in remote] == sorted(local)
    for ref in remote:
        assert read_bytes(ref.source_path, ref.offset, ref.size) == (evals / ref.image_id).read_bytes()
    tars, unreadable = reference_refs(list_reference_set("v", "s3://pool/evals_wds", kind="webdataset"))
    assert not unreadable and sorted(r.image_id for r in tars) == [
        f"val.tar/{n.split('/')[1]}" for n in sorted(local)
    ]
    assert all(read_bytes(r.source_path, r.offset, r.size)[:2] == b"\xff\xd8" for r in tars)
    before = folder.fingerprint()
    assert list_reference_set("v", "s3://pool/evals").fingerprint() == before
    write_photo(evals / "val" / "e0.jpg", 999)
    s3_env.upload_tree(evals, "s3://pool/evals")
    assert list_reference_set("v", "s3://pool/evals").fingerprint() != before


def test_the_discovery_sensor_finds_shards_on_s3_and_sees_a_changed_one(s3_env, tmp_path):
    """The daemon's path: one tick adds a partition per bucket prefix and requests its run; once a
    shard is processed, a rewritten object in it makes the next tick request it again."""
    from curation_assets.assets.project import shard_job_name
    from curation_assets_tests.conftest import sensor_tick

    images = tmp_path / "images"
    write_pool(images)
    s3_env.upload_tree(images, "s3://pool/images")
    project = load_project(project_file(tmp_path, "sensed", "s3://pool/images", "s3://store/sensed"))
    instance = init_instance()
    defs = build_definitions([project])
    first = sensor_tick(defs, project, instance)
    assert sorted(r.partition_key for r in first.run_requests) == sorted(SHARDS)
    job = defs.resolve_job_def(shard_job_name(project))
    assert job.execute_in_process(partition_key="a", instance=instance).success
    second = sensor_tick(defs, project, instance, cursor=first.cursor)
    assert "a" not in {r.partition_key for r in second.run_requests}, "a processed shard ran again"
    write_photo(images / "a" / "img_000.jpg", 4242)
    s3_env.upload_tree(images / "a", "s3://pool/images/a")
    third = sensor_tick(defs, project, instance, cursor=second.cursor)
    assert "a" in {r.partition_key for r in third.run_requests}
