"""Embedding assets on the demo data: one vector per kept image, skipped when unchanged,
recomputed when the model changes, and a clear failure (nothing written) without weights."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import numpy as np
import polars as pl
import pytest
import torch

from curation_assets.assets.project import shard_job_name
from curation_assets.definitions import build_definitions
from curation_assets.resources.store import StoreResource
from curation_assets.runner import materialize_project
from curation_assets_tests.conftest import make_project

pytestmark = pytest.mark.xdist_group("demo")


def _project(tmp: Path, demo_dataset, copy_model: str = "descriptor", models: dict | None = None):
    return make_project(
        tmp,
        {"train": str(demo_dataset.images_root)},
        stages={"embeddings": {"enabled": True, "copy_model": copy_model, "semantic_model": "descriptor"}},
        models=models or {},
    )


def _check_passed(instance: dg.DagsterInstance, project, asset: str, check: str) -> bool:
    key = dg.AssetCheckKey(dg.AssetKey([project.name, asset]), check)
    record = instance.event_log_storage.get_latest_asset_check_execution_by_key([key])[key]
    return bool(record.evaluation and record.evaluation.passed)


def test_descriptor_embeddings_for_every_kept_image(demo_dataset, tmp_path: Path):
    project = _project(tmp_path, demo_dataset)
    defs = build_definitions([project])
    instance = dg.DagsterInstance.ephemeral()
    summary = materialize_project(project, defs, instance, shards=["shard-00"], echo=lambda _: None)
    assert summary.failed == []
    store = StoreResource().for_project(project)
    sanitized = pl.read_parquet(store.shard_path("sanitized_images", "shard-00"))
    kept = set(sanitized.filter(pl.col("status") != "rejected")["image_id"])
    for asset in ("sscd_embeddings", "semantic_embeddings"):
        ids, vectors, meta = store.read_vectors(asset, "shard-00")
        assert set(ids["image_id"]) == kept and ids["error"].null_count() == len(ids)
        assert vectors.dtype == np.float16 and vectors.shape == (len(kept), meta["dim"])
        assert np.isfinite(vectors).all()
        np.testing.assert_allclose(np.linalg.norm(vectors.astype(np.float32), axis=1), 1.0, atol=1e-2)
        assert meta["model"]["kind"] == "descriptor" and meta["preprocessing"]["resize"] == "square"
        for check in ("one_vector_per_kept_image", "vectors_are_finite", "norms_as_expected"):
            assert _check_passed(instance, project, asset, check), (asset, check)
    # byte-identical images give identical vectors
    truth = pl.read_parquet(demo_dataset.ground_truth_path)
    ids, vectors, _ = store.read_vectors("sscd_embeddings", "shard-00")
    row = dict(zip(ids["image_id"], ids["row"], strict=True))
    copies = truth.filter(
        (pl.col("kind") == "byte_copy")
        & pl.col("image_id").is_in(list(row))
        & pl.col("source_id").is_in(list(row))
    )
    for copy in copies.iter_rows(named=True):
        assert np.array_equal(vectors[row[copy["image_id"]]], vectors[row[copy["source_id"]]])

    # unchanged inputs: the vectors are kept as they are
    table = store.shard_path("sscd_embeddings", "shard-00")
    before = (table.stat().st_mtime_ns, sorted(p.name for p in table.parent.glob("*.npy")))
    job = defs.resolve_job_def(shard_job_name(project))
    assert job.execute_in_process(partition_key="shard-00", instance=instance).success
    assert (table.stat().st_mtime_ns, sorted(p.name for p in table.parent.glob("*.npy"))) == before


def test_changing_the_model_recomputes(demo_dataset, tmp_path: Path):
    class Tiny(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            pooled = torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)
            return pooled[:, :16]

    weights = tmp_path / "tiny_sscd.pt"
    torch.jit.script(Tiny()).save(str(weights))
    first = _project(tmp_path, demo_dataset)
    instance = dg.DagsterInstance.ephemeral()
    materialize_project(first, build_definitions([first]), instance, shards=["shard-01"], echo=lambda _: None)
    store = StoreResource().for_project(first)
    _, _, before = store.read_vectors("sscd_embeddings", "shard-01")
    others = ("sanitized_images", "semantic_embeddings")
    stamps = {name: store.shard_path(name, "shard-01").stat().st_mtime_ns for name in others}
    second = _project(
        tmp_path,
        demo_dataset,
        copy_model="sscd",
        models={
            "sscd": {"kind": "sscd_torchscript", "path": str(weights), "resize": "square", "input_size": 64}
        },
    )
    # the headless runner sees the model change too: the shard is not "up to date" any more
    summary = materialize_project(
        second,
        build_definitions([second]),
        instance,
        shards=["shard-01"],
        run_global=False,
        echo=lambda _: None,
    )
    assert summary.shards_run == ["shard-01"] and summary.failed == []
    _, vectors, after = store.read_vectors("sscd_embeddings", "shard-01")
    assert after["model"]["kind"] == "sscd_torchscript" and before["model"]["kind"] == "descriptor"
    assert vectors.shape[1] == 16
    # only the changed model's vectors were recomputed: sanitize and the other model were kept
    assert {name: store.shard_path(name, "shard-01").stat().st_mtime_ns for name in others} == stamps


def test_missing_weights_fail_clearly_and_write_nothing(demo_dataset, tmp_path: Path):
    missing = tmp_path / "nowhere" / "sscd_disc_mixup.torchscript.pt"
    project = _project(
        tmp_path,
        demo_dataset,
        copy_model="sscd",
        models={"sscd": {"kind": "sscd_torchscript", "path": str(missing)}},
    )
    instance = dg.DagsterInstance.ephemeral()
    summary = materialize_project(
        project,
        build_definitions([project]),
        instance,
        shards=["shard-02"],
        run_global=False,
        echo=lambda _: None,
    )
    assert summary.failed
    store = StoreResource().for_project(project)
    assert not store.asset_dir("sscd_embeddings").exists()
    failures = [
        event.event_specific_data.error.message
        for record in instance.get_records_for_run(instance.get_runs()[0].run_id).records
        if (event := record.event_log_entry.dagster_event) and event.is_step_failure
    ]
    assert any("models.sscd.path" in message and str(missing) in message for message in failures), failures


def test_webdataset_tars_give_the_same_vectors_as_folders(tmp_path: Path):
    from curation_assets.demo.pool import generate_demo

    results = {}
    for layout in ("directory", "webdataset"):
        demo = generate_demo(tmp_path / layout, n_images=80, n_shards=2, seed=5, layout=layout)
        overrides = (
            {"dataset": {"input_kind": "webdataset", "shard_rule": {"kind": "tar"}}}
            if layout == "webdataset"
            else {}
        )
        project = make_project(
            tmp_path / f"{layout}_store",
            {"train": str(demo.images_root)},
            stages={
                "embeddings": {"enabled": True, "copy_model": "descriptor", "semantic_model": "descriptor"}
            },
            **overrides,
        )
        instance = dg.DagsterInstance.ephemeral()
        summary = materialize_project(project, build_definitions([project]), instance, echo=lambda _: None)
        assert summary.failed == [] and len(summary.shards_run) == 2
        store = StoreResource().for_project(project)
        sanitized = store.scan_shards("sanitized_images").collect().sort("image_id")
        vectors = {}
        for shard in ("shard-00", "shard-01"):
            ids, array, _ = store.read_vectors("sscd_embeddings", shard)
            vectors.update(
                {i: np.asarray(array[r]) for i, r in zip(ids["image_id"], ids["row"], strict=True)}
            )
        results[layout] = (sanitized.select("image_id", "status", "reasons", "pixel_hash"), vectors)
    folder, tars = results["directory"], results["webdataset"]
    assert folder[0].equals(tars[0])  # same ids, statuses, reasons and pixels from tar members
    assert folder[1].keys() == tars[1].keys() and len(folder[1]) > 50
    assert all(np.array_equal(folder[1][k], tars[1][k]) for k in folder[1])
