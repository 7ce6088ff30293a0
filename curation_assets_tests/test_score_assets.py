"""Aesthetic and rotation stages as assets, with tiny models loaded through the real loaders.

The aesthetic path runs a random-weight open_clip model and a LAION-layout head (scores
0-10, clipped; the decision asset removes exactly the images below the threshold, also
after a threshold change). The rotation path runs a random-weight TorchScript classifier
(probabilities per image) and a test model with known probabilities that drives the
decisions: the threshold, argmax 0 degrees meaning no change, and the export turning the
image back. A threshold change re-materializes only filter_decisions.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import numpy as np
import polars as pl
import pytest
import torch
from PIL import Image

from curation_assets.assets.filters.aesthetic import score_vectors
from curation_assets.assets.filters.shard_scores import semantic_vectors
from curation_assets.config import ModelEntry, ProjectConfig
from curation_assets.core.embed.embed import ComputeSettings, embed_images
from curation_assets.core.embed.models import load_model
from curation_assets.core.filters.rotation import upright
from curation_assets.core.ingest.decode import ImageRef
from curation_assets.core.ingest.images import load_rgb
from curation_assets.definitions import build_definitions
from curation_assets.resources.store import ProjectStore, StoreResource
from curation_assets.runner import materialize_project, materialize_selection
from curation_assets_tests.conftest import make_project, write_photo
from curation_assets_tests.tiny_models import (
    FixedProbabilities,
    spread_aesthetic_head,
    write_rotation_net,
    write_tiny_clip,
    write_torchscript,
)

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")

CLIP_NAME = "TinyAestheticCLIP"
PHOTO_SIZE = (128, 96)  # landscape, so a 90 degree turn swaps width and height
SCORE_LOW, SCORE_HIGH = -3.0, 13.0  # raw head outputs at the extremes: one clipped at each end
PROBABILITIES = ["p0", "p90", "p180", "p270"]
CPU = ComputeSettings(
    device=torch.device("cpu"),
    autocast=None,
    batch_size=16,
    min_batch_size=1,
    num_workers=0,
    channels_last=False,
    compile=False,
)


def photo_tree(root: Path, shards: int, per_shard: int) -> Path:
    """``root/s<k>/img_<i>.png``: distinct PNG photos (lossless, so exported pixels compare exactly)."""
    for k in range(shards):
        for i in range(per_shard):
            write_photo(root / f"s{k}" / f"img_{i}.png", seed=100 * k + i, size=PHOTO_SIZE)
    return root


def quiet(_: str) -> None:
    """Headless runs print progress; the tests do not need it."""


def check_passed(instance: dg.DagsterInstance, project: ProjectConfig, asset: str, check: str) -> bool:
    key = dg.AssetCheckKey(dg.AssetKey([project.name, asset]), check)
    record = instance.event_log_storage.get_latest_asset_check_execution_by_key([key]).get(key)
    return bool(record and record.evaluation and record.evaluation.passed)


def shard_metadata(instance: dg.DagsterInstance, project: ProjectConfig, asset: str, shard: str) -> dict:
    """The metadata values of the latest materialization of one shard of ``asset``."""
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey([project.name, asset]), asset_partitions=[shard]), limit=1
    ).records
    assert records, f"{asset} {shard} was never materialized"
    metadata = records[0].asset_materialization.metadata
    return {name: value.value for name, value in metadata.items()}


def kept_ids(store: ProjectStore) -> set[str]:
    sanitized = store.scan_shards("sanitized_images").collect()
    return set(sanitized.filter(pl.col("status") != "rejected")["image_id"])


def read_decisions(store: ProjectStore) -> pl.DataFrame:
    return pl.read_parquet(store.global_path("filter_decisions", "filter_decisions.parquet"))


# ----------------------------------------------------------------------------- aesthetic and rotation


@dataclass
class ScoreModels:
    images: Path
    models: dict[str, dict]


@pytest.fixture(scope="module")
def score_models(tmp_path_factory: pytest.TempPathFactory) -> ScoreModels:
    """Photos in two shards, a tiny CLIP, a head spread over those photos' CLIP embeddings and a
    random rotation net, as the model entries of a project file."""
    folder = tmp_path_factory.mktemp("score_models")
    images = photo_tree(folder / "images", shards=2, per_shard=4)
    config, checkpoint = write_tiny_clip(folder / "clip")
    clip_entry = {"kind": "open_clip", "name": CLIP_NAME, "path": str(checkpoint), "config": str(config)}
    clip = load_model("clip", ModelEntry.model_validate(clip_entry))
    files = sorted(images.rglob("*.png"))
    refs = [ImageRef(str(p), str(p), None, p.stat().st_size, *PHOTO_SIZE) for p in files]
    embedded = embed_images(clip.module, clip.preprocessing, clip.dim, refs, CPU)
    assert not embedded.errors
    head = folder / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save(spread_aesthetic_head(embedded.vectors, SCORE_LOW, SCORE_HIGH).state_dict(), head)
    rotation = write_rotation_net(folder / "rotnet.torchscript.pt")
    return ScoreModels(
        images=images,
        models={
            "clip": clip_entry,
            "aesthetic": {"kind": "aesthetic_mlp", "path": str(head)},
            "rot": {"kind": "rotation", "base_kind": "torchscript", "path": str(rotation), "input_size": 32},
        },
    )


def score_project(
    tmp: Path, models: ScoreModels, reuse: bool, aesthetic_threshold: float = 5.0
) -> ProjectConfig:
    """Aesthetic (over its own CLIP pass, or over the stored semantic vectors when ``reuse``) and
    random-model rotation; no export or report (not what these tests look at)."""
    stages = {
        "aesthetic": {
            "enabled": True,
            "model": "aesthetic",
            "clip_model": "clip",
            "threshold": aesthetic_threshold,
        },
        "rotation": {"enabled": not reuse, "model": "rot", "threshold": 0.9},
    }
    if reuse:
        stages["embeddings"] = {"enabled": True, "copy_model": "descriptor", "semantic_model": "clip"}
    return make_project(
        tmp,
        {"train": str(models.images)},
        models=models.models,
        stages=stages,
        export={"enabled": False},
        report={"enabled": False},
    )


@dataclass
class ScoreRun:
    project: ProjectConfig
    instance: dg.DagsterInstance
    store: ProjectStore


@pytest.fixture(scope="module")
def own_clip_run(score_models: ScoreModels, tmp_path_factory: pytest.TempPathFactory) -> ScoreRun:
    """Both shards and the global job, aesthetic embedding with its own CLIP pass, plus rotation."""
    project = score_project(tmp_path_factory.mktemp("own_clip"), score_models, reuse=False)
    instance = dg.DagsterInstance.ephemeral()
    summary = materialize_project(project, build_definitions([project]), instance, echo=quiet)
    assert summary.failed == [] and summary.shards_run == ["s0", "s1"]
    return ScoreRun(project, instance, StoreResource().for_project(project))


def test_aesthetic_scores_one_finite_clipped_score_per_kept_image(own_clip_run: ScoreRun):
    run = own_clip_run
    kept = kept_ids(run.store)
    assert len(kept) == 8
    scores = run.store.scan_shards("aesthetic_scores").collect()
    assert scores.height == len(kept) and set(scores["image_id"]) == kept
    values = scores["aesthetic"].to_numpy()
    assert np.isfinite(values).all() and values.min() >= 0 and values.max() <= 10
    # the head spreads these photos over -3..13: both ends are clipped, the middle is not
    assert values.min() == 0 and values.max() == 10
    assert ((values > 0) & (values < 10)).sum() >= 4
    out_of_range = [
        shard_metadata(run.instance, run.project, "aesthetic_scores", shard)["raw_out_of_range"]
        for shard in ("s0", "s1")
    ]
    assert sum(out_of_range) == int(((values == 0) | (values == 10)).sum())
    assert check_passed(
        run.instance, run.project, "aesthetic_scores", "every_kept_image_has_an_aesthetic_score"
    )


def test_filter_decisions_remove_exactly_the_images_below_the_threshold(own_clip_run: ScoreRun, score_models):
    run = own_clip_run
    scores = run.store.scan_shards("aesthetic_scores").collect().select("image_id", "aesthetic")

    def removed_and_expected(threshold: float) -> tuple[set[str], set[str]]:
        decisions = read_decisions(run.store).join(scores, on="image_id", how="left", suffix="_scored")
        assert decisions.height == scores.height and decisions["aesthetic_scored"].null_count() == 0
        removed = decisions.filter(pl.col("removed"))
        assert all(by == ["aesthetic"] for by in removed["removed_by"].to_list())
        expected = set(scores.filter(pl.col("aesthetic") < threshold)["image_id"])
        return set(removed["image_id"]), expected

    removed, expected = removed_and_expected(5.0)
    assert removed == expected and 0 < len(removed) < scores.height

    # a new threshold between two scores: only the decision asset re-materializes
    ordered = np.sort(scores["aesthetic"].to_numpy())
    threshold = float((ordered[5] + ordered[6]) / 2)
    score_files = sorted(run.store.asset_dir("aesthetic_scores").glob("*.parquet"))
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in score_files}
    tuned = score_project(
        Path(run.project.storage_root).parent, score_models, reuse=False, aesthetic_threshold=threshold
    )
    summary = materialize_selection(
        tuned, build_definitions([tuned]), run.instance, ["filter_decisions"], quiet
    )
    assert summary.failed == []
    removed, expected = removed_and_expected(threshold)
    assert removed == expected and len(removed) == 6
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in score_files} == before


def test_rotation_predictions_are_probabilities_per_kept_image(own_clip_run: ScoreRun):
    run = own_clip_run
    table = run.store.scan_shards("rotation_predictions").collect()
    assert table.height == 8 and set(table["image_id"]) == kept_ids(run.store)
    p = table.select(PROBABILITIES).to_numpy()
    assert np.isfinite(p).all() and (p >= 0).all() and (p <= 1).all()
    # the embed runner hands back float16 rows: each probability is within 2.5e-4 of the model's
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-3)
    assert check_passed(
        run.instance, run.project, "rotation_predictions", "every_kept_image_has_a_rotation_prediction"
    )
    decisions = read_decisions(run.store)
    assert {"rotate", "rotation_angle", "rotation_probability"} <= set(decisions.columns)
    top = p.max(axis=1)
    np.testing.assert_allclose(np.sort(decisions["rotation_probability"].to_numpy()), np.sort(top), rtol=1e-6)


def test_aesthetic_reuses_the_stored_semantic_vectors(
    score_models: ScoreModels, own_clip_run: ScoreRun, tmp_path
):
    project = score_project(tmp_path, score_models, reuse=True)
    defs = build_definitions([project])
    key = dg.AssetKey([project.name, "aesthetic_scores"])
    assert defs.resolve_assets_def(key).asset_deps[key] == {
        dg.AssetKey([project.name, "semantic_embeddings"])
    }
    own_key = dg.AssetKey([own_clip_run.project.name, "aesthetic_scores"])
    own_defs = build_definitions([own_clip_run.project])
    assert own_defs.resolve_assets_def(own_key).asset_deps[own_key] == {
        dg.AssetKey([own_clip_run.project.name, "sanitized_images"])
    }

    instance = dg.DagsterInstance.ephemeral()
    summary = materialize_project(project, defs, instance, shards=["s1"], run_global=False, echo=quiet)
    assert summary.failed == []
    store = StoreResource().for_project(project)
    ids, vectors = semantic_vectors(store, "s1")
    assert len(vectors) == 4
    mlp = load_model("aesthetic", project.models["aesthetic"])
    direct = np.clip(score_vectors(mlp, vectors, torch.device("cpu")), 0, 10)
    table = pl.read_parquet(store.shard_path("aesthetic_scores", "s1"))
    scored = dict(zip(table["image_id"], table["aesthetic"], strict=True))
    np.testing.assert_allclose([scored[i] for i in ids["image_id"]], direct, rtol=1e-6, atol=1e-6)
    # the same images scored through the aesthetic stage's own CLIP pass agree
    own = own_clip_run.store.scan_shards("aesthetic_scores").collect()
    own_scores = dict(zip(own["image_id"], own["aesthetic"], strict=True))
    np.testing.assert_allclose([own_scores[i] for i in ids["image_id"]], direct, atol=0.05)


# ----------------------------------------------------------------------------- rotation decisions


def rotation_project(tmp: Path, images: Path, model: Path, threshold: float) -> ProjectConfig:
    """Rotation by a model of known probabilities, exported as a symlink tree (fixed images as files)."""
    return make_project(
        tmp,
        {"train": str(images)},
        models={
            "rot": {
                "kind": "rotation",
                "base_kind": "torchscript",
                "path": str(model),
                "input_size": 32,
                "output": "probabilities",
            }
        },
        stages={"rotation": {"enabled": True, "model": "rot", "threshold": threshold}},
        report={"enabled": False},
    )


def exported(store: ProjectStore) -> list[tuple[Path, Path]]:
    """(source file, its file in the curated_dataset tree) of every exported image."""
    root = store.global_path("curated_dataset", "export")
    manifest = pl.read_parquet(root / "manifest.parquet")
    return [
        (Path(row["source_path"]), root / "images" / row["export_path"])
        for row in manifest.iter_rows(named=True)
    ]


def test_known_probabilities_drive_rotation_and_export(tmp_path: Path):
    images = photo_tree(tmp_path / "images", shards=1, per_shard=3)
    turned = write_torchscript(FixedProbabilities([0.02, 0.95, 0.02, 0.01]), tmp_path / "turned90.pt")
    project = rotation_project(tmp_path, images, turned, threshold=0.9)
    instance = dg.DagsterInstance.ephemeral()
    assert materialize_project(project, build_definitions([project]), instance, echo=quiet).failed == []
    store = StoreResource().for_project(project)

    decisions = read_decisions(store)
    assert decisions.height == 3
    assert decisions["rotate"].to_list() == [90] * 3 and decisions["rotation_angle"].to_list() == [90] * 3
    np.testing.assert_allclose(decisions["rotation_probability"].to_numpy(), 0.95, atol=1e-3)  # float16
    assert not decisions["removed"].any()  # a rotation fixes an image, it never removes it

    # the export holds each image turned back: the stored one, 90 degrees counter-clockwise
    files = exported(store)
    assert len(files) == 3
    for source, path in files:
        stored = load_rgb(source.read_bytes())
        with Image.open(path) as out:
            assert not path.is_symlink() and out.size == (PHOTO_SIZE[1], PHOTO_SIZE[0])
            assert np.array_equal(np.asarray(out.convert("RGB")), np.asarray(upright(stored, 90)))

    # threshold sweeps touch only filter_decisions: the predictions stay as they were
    predictions = store.shard_path("rotation_predictions", "s0")
    before = (predictions.stat().st_mtime_ns, predictions.read_bytes())
    stored = float(pl.read_parquet(predictions)["p90"][0])
    for threshold, rotate in ((stored, 90), (0.97, 0), (0.9, 90)):  # probability >= threshold applies
        tuned = rotation_project(tmp_path, images, turned, threshold=threshold)
        summary = materialize_selection(
            tuned, build_definitions([tuned]), instance, ["filter_decisions"], quiet
        )
        assert summary.failed == []
        decisions = read_decisions(store)
        assert decisions["rotate"].to_list() == [rotate] * 3, threshold
        assert decisions["rotation_angle"].to_list() == [90] * 3  # the prediction itself is unchanged
    assert (predictions.stat().st_mtime_ns, predictions.read_bytes()) == before
    # the headless runner agrees: nothing per shard is stale after a threshold change
    tuned = rotation_project(tmp_path, images, turned, threshold=0.97)
    summary = materialize_project(tuned, build_definitions([tuned]), instance, run_global=False, echo=quiet)
    assert summary.shards_skipped == ["s0"] and summary.shards_run == []

    # a model sure of 0 degrees changes nothing, however confident
    upright_model = write_torchscript(FixedProbabilities([0.97, 0.01, 0.01, 0.01]), tmp_path / "upright.pt")
    sure = rotation_project(tmp_path, images, upright_model, threshold=0.9)
    summary = materialize_project(sure, build_definitions([sure]), instance, echo=quiet)
    assert summary.failed == [] and summary.shards_run == ["s0"]  # a new model is new predictions
    decisions = read_decisions(store)
    assert decisions["rotate"].to_list() == [0] * 3 and decisions["rotation_angle"].to_list() == [0] * 3
    for source, path in exported(store):
        assert path.is_symlink() and path.resolve() == source.resolve()
