"""Retrieval from seed sets (references.sets, role seed), and the packaged LVD-142M-style recipe
(lvd_style.yaml) run the way users run it: launched runs on an instance, under a timeout."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import dagster as dg
import numpy as np
import polars as pl
import pytest
import yaml

from curation_assets.assets.dedup.references import ensure_reference_vectors, refuse_other_model
from curation_assets.assets.keys import DECONTAMINATION, RETRIEVAL, SAMPLE
from curation_assets.assets.outputs.decisions import decisions_path
from curation_assets.assets.select.retrieval import selection_path
from curation_assets.config import load_project, packaged_project_files
from curation_assets.core.select.retrieval import (
    cluster_selection,
    nearest_pool_images,
    normalised,
    sample_selection,
)
from curation_assets.resources.compute import ComputeResource
from curation_assets.resources.store import StoreResource
from curation_assets_tests.conftest import make_project, write_photo

LOG = logging.getLogger("test")


def clustered(rng: np.random.Generator, centres: np.ndarray, per: int, spread: float) -> np.ndarray:
    points = np.repeat(centres, per, axis=0) + spread * rng.normal(
        size=(len(centres) * per, centres.shape[1])
    )
    return normalised(points).astype(np.float16)


@pytest.fixture
def vectors():
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(8, 24))
    pool = clustered(rng, centres, 60, 0.3)  # 480 pool images in 8 clusters
    seeds = clustered(rng, centres[:3], 4, 0.3)  # 12 seeds near 3 of them
    return pool, seeds


def brute_force(pool: np.ndarray, seeds: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    sim = normalised(seeds) @ normalised(pool).T
    order = np.lexsort((np.broadcast_to(np.arange(len(pool)), sim.shape), -sim), axis=1)[:, :k]
    return order, np.take_along_axis(sim, order, axis=1)


def test_nearest_pool_images_equal_brute_force(vectors):
    pool, seeds = vectors
    found = nearest_pool_images(pool, seeds, k=5, chunk=100)  # five chunks, merged
    rows, sim = brute_force(pool, seeds, 5)
    assert np.array_equal(found.rows, rows)
    np.testing.assert_allclose(found.similarity, sim, atol=1e-5)


def test_sample_mode_is_the_k_nearest_within_the_floor_deduplicated(vectors):
    pool, seeds = vectors
    ids = [f"p{i:03d}" for i in range(len(pool))]
    names = [f"s{i}" for i in range(len(seeds))]
    floor = 0.8
    selected, counts = sample_selection(ids, pool, {"seeds": (names, seeds)}, k=4, min_similarity=floor)
    rows, sim = brute_force(pool, seeds, 4)
    expected: dict[str, tuple[float, str]] = {}
    for s, (seed_rows, seed_sim) in enumerate(zip(rows, sim, strict=True)):
        for row, value in zip(seed_rows, seed_sim, strict=True):
            if value >= floor and (ids[row] not in expected or value > expected[ids[row]][0]):
                expected[ids[row]] = (value, names[s])
    assert set(selected["image_id"]) == set(expected)
    assert selected["image_id"].n_unique() == selected.height
    for image_id, seed, value in selected.select("image_id", "seed_image", "similarity").iter_rows():
        assert expected[image_id][1] == seed and abs(expected[image_id][0] - value) < 1e-5
    assert (selected["similarity"] >= floor).all()
    assert counts["selected"] == selected.height
    assert counts["candidates"] == counts["under_the_floor"] + counts["retrieved_by_several_seeds"] + (
        counts["selected"] + counts["over_the_budget"]
    )
    # every selected image lies in one of the seeds' three clusters
    assert {int(i[1:]) // 60 for i in selected["image_id"]} <= {0, 1, 2}


def test_the_budget_is_exact_and_keeps_the_most_similar(vectors):
    pool, seeds = vectors
    ids = [f"p{i:03d}" for i in range(len(pool))]
    names = [f"s{i}" for i in range(len(seeds))]
    everything, _ = sample_selection(ids, pool, {"a": (names, seeds)}, k=8, min_similarity=-1)
    assert everything.height > 10
    budgeted, counts = sample_selection(ids, pool, {"a": (names, seeds)}, k=8, min_similarity=-1, budget=10)
    assert budgeted.height == 10 and counts["over_the_budget"] == everything.height - 10
    assert budgeted["similarity"].min() >= everything["similarity"].sort(descending=True)[9]


def test_cluster_mode_takes_the_clusters_nearest_the_seeds_up_to_the_cap(vectors):
    pool, seeds = vectors
    ids = [f"p{i:03d}" for i in range(len(pool))]
    clusters = np.arange(len(pool)) // 60  # the generator's 8 clusters of 60
    unit = normalised(pool)
    centroids = np.stack([unit[clusters == c].mean(axis=0) for c in range(8)])
    distance = 1 - np.einsum("ij,ij->i", unit, normalised(centroids)[clusters])
    names = [f"s{i}" for i in range(len(seeds))]
    selected, counts = cluster_selection(
        ids, clusters, distance, centroids, {"a": (names, seeds)}, max_distance=0.3, per_cluster_cap=10
    )
    # the seeds lie near centres 0, 1 and 2: exactly those clusters, 10 images each, nearest first
    assert sorted(set(selected["cluster"])) == [0, 1, 2] and counts["clusters_taken"] == 3
    assert selected.group_by("cluster").len()["len"].to_list() == [10, 10, 10]
    for c in (0, 1, 2):
        members = selected.filter(pl.col("cluster") == c)
        nearest = np.argsort(distance[clusters == c], kind="stable")[:10] + 60 * c
        assert set(members["image_id"]) == {ids[i] for i in nearest}
    assert counts["over_the_cap"] == 3 * 50
    budgeted, counts = cluster_selection(
        ids, clusters, distance, centroids, {"a": (names, seeds)}, 0.3, 10, budget=25
    )
    assert budgeted.height == 25 and counts["over_the_budget"] == 5


def test_cluster_mode_needs_the_clustering(tmp_path: Path):
    with pytest.raises(Exception, match=r"enable stages\.clustering"):
        make_project(
            tmp_path,
            str(tmp_path),
            stages={
                "embeddings": {
                    "enabled": True,
                    "copy_model": "descriptor",
                    "semantic_model": "descriptor_content",
                }
            },
            references={
                "sets": {"s": {"role": "seed", "path": str(tmp_path)}},
                "retrieval": {"mode": "cluster"},
            },
        )


def test_a_seed_set_from_another_model_is_refused(tmp_path: Path):
    seeds = tmp_path / "seeds"
    for i in range(3):
        write_photo(seeds / f"s{i}.jpg", 900 + i)
    embeddings = {"enabled": True, "copy_model": "descriptor", "semantic_model": "descriptor_content"}
    project = make_project(
        tmp_path,
        str(tmp_path / "pool"),
        stages={"embeddings": embeddings},
        references={"sets": {"seeds": {"role": "seed", "path": str(seeds)}}},
    )
    store = StoreResource().for_project(project)
    settings = ComputeResource(device="cpu", num_workers=0).settings()
    seed_vectors = ensure_reference_vectors(project, store, "seeds", settings, LOG)
    assert seed_vectors.meta["model_name"] == "descriptor_content"  # the semantic model, as the pool's
    from curation_assets.core.embed.models import load_model

    copy_identity = load_model("descriptor", project.models["descriptor"]).identity
    with pytest.raises(dg.Failure, match="different model"):
        refuse_other_model(seed_vectors, copy_identity)


# ----------------------------------------------------------------------------- the packaged recipe

MAX_RUNTIME_S = 300  # each launched run is stopped (and the test fails) past this


@pytest.mark.xdist_group("launched_runs")
def test_lvd_style_recipe_in_launched_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """lvd_style.yaml over the generated labeled demo, every job launched on an instance with a
    code server (as the UI and the daemon launch them): planted copies of evaluation images leave
    the pool with their reason, retrieval selects the seeds' classes, the sample is exact."""
    from curation_assets.demo.labeled import generate_labeled_demo
    from curation_assets.launch import LaunchedRuns, code_location
    from curation_assets.runner import init_instance, materialize_project

    home = tmp_path / "home"
    demo = generate_labeled_demo(home / "labeled_demo")
    packaged = next(p for p in packaged_project_files() if p.name == "lvd_style.yaml")
    data = yaml.safe_load(packaged.read_text())
    data["runs"] = {"shard_max_runtime_seconds": MAX_RUNTIME_S, "global_max_runtime_seconds": MAX_RUNTIME_S}
    data["discovery"] = {"sensor_running": False}
    data["name"] = "lvd_launched"  # the packaged lvd_style is loaded beside it: names are unique
    project_file = tmp_path / "lvd_style.yaml"
    project_file.write_text(yaml.safe_dump(data))
    monkeypatch.setenv("CURATION_HOME", str(home))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    monkeypatch.setenv("CURATION_PROJECTS", str(project_file))
    project = load_project(project_file)
    instance = init_instance()
    try:
        with code_location(instance) as workspace:
            summary = materialize_project(project, LaunchedRuns(instance, workspace), instance, echo=LOG.info)
    finally:
        instance.dispose()
    assert summary.failed == [], summary.failed

    store = StoreResource().for_project(project)
    truth = pl.read_parquet(demo.ground_truth_path)
    decided = pl.read_parquet(decisions_path(store))
    sources = {i.split(".", 1)[1] for i in truth["leak_of"].drop_nulls()}  # "train.cat/x" -> "cat/x"
    contaminated = decided.filter(pl.col("reasons").list.contains("contamination:demo_test"))
    assert set(contaminated["image_id"]) == sources
    assert (contaminated["stage"] == "decontamination").all()
    assert contaminated["explanation"].str.contains("demo_test").all()
    assert decided.filter(pl.col("action") != "remove").height == project.stages.sampling.budget
    assert pl.read_parquet(store.global_path(DECONTAMINATION, f"{DECONTAMINATION}.parquet")).height >= len(
        sources
    )

    selected = pl.read_parquet(selection_path(store))
    assert 0 < selected.height <= project.references.retrieval.budget
    assert selected["image_id"].n_unique() == selected.height
    assert not set(selected["image_id"]) & sources, "retrieval must not select decontaminated images"
    assert store.global_path(RETRIEVAL, f"{RETRIEVAL}.parquet").is_file()

    # curated_sample = the selection (its best first, up to its share) ∪ the balanced sample
    budget, share = project.stages.sampling.budget, project.stages.sampling.retrieval_share
    sample = pl.read_parquet(store.global_path(SAMPLE, f"{SAMPLE}.parquet"))
    assert sample.height == budget and sample["image_id"].n_unique() == budget
    quota = int(budget * share)
    from_retrieval = sample.filter(pl.col("sampled_by") == "retrieval")
    assert set(from_retrieval["image_id"]) == set(selected["image_id"].head(quota))
    assert from_retrieval["seed_set"].is_in(["seed_cats", "seed_coffee"]).all()
    assert from_retrieval["seed_image"].is_not_null().all()
    assert (sample["sampled_by"] == "balanced").sum() == budget - from_retrieval.height
    kept = decided.filter(pl.col("action") != "remove")
    assert set(kept["image_id"]) == set(sample["image_id"])  # the decisions keep exactly the sample
    retrieved_kept = kept.filter(pl.col("sampled_by") == "retrieval")
    assert retrieved_kept["explanation"].str.contains("retrieved from seed set").all()
    shutil.rmtree(home / "labeled_demo")  # the big part of tmp_path: freed at once on a shared machine


def test_lvd_style_in_cluster_mode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The recipe with cluster-based retrieval: whole level-1 clusters of hierarchical_clusters near
    the seeds, each image once, the cap and the budget kept (in-process runs, small demo)."""
    from curation_assets.config import load_project_dict
    from curation_assets.definitions import build_definitions
    from curation_assets.demo.labeled import generate_labeled_demo
    from curation_assets.runner import materialize_project

    monkeypatch.setenv("CURATION_HOME", str(tmp_path / "home"))
    generate_labeled_demo(tmp_path / "home" / "labeled_demo", n_classes=3, per_class=10, leaks_per_kind=1)
    packaged = next(p for p in packaged_project_files() if p.name == "lvd_style.yaml")
    data = yaml.safe_load(packaged.read_text())
    data["storage_root"] = str(tmp_path / "store")
    data["stages"]["clustering"]["levels"] = [
        {"n_clusters": 6, "n_samples": 2},
        {"n_clusters": 2, "n_samples": 1},
    ]
    data["stages"]["sampling"]["budget"] = 12
    data["references"]["retrieval"] = {"mode": "cluster", "cluster_max_distance": 0.5, "per_cluster_cap": 3}
    project = load_project_dict(data, base_dir=packaged.parent, source="test")
    summary = materialize_project(
        project, build_definitions([project]), dg.DagsterInstance.ephemeral(), echo=lambda _: None
    )
    assert summary.failed == []
    store = StoreResource().for_project(project)
    selected = pl.read_parquet(selection_path(store))
    assert selected.height > 0 and selected["image_id"].n_unique() == selected.height
    assert selected["cluster"].null_count() == 0
    assert selected.group_by("cluster").len()["len"].max() <= 3
    assert (selected["similarity"] >= 0.5 - 1e-6).all()
    clusters = pl.read_parquet(store.global_path("hierarchical_clusters", "hierarchical_clusters.parquet"))
    joined = selected.join(clusters.select("image_id", "cluster_l1"), on="image_id")
    assert (joined["cluster"] == joined["cluster_l1"]).all()


# ----------------------------------------------------------------------------- the combined sample


def test_combined_sample_is_the_selection_then_the_balanced_part_to_the_exact_budget():
    from curation_assets.core.select.sampling import combined_sample
    from curation_assets_tests.test_sampling import toy_hierarchy

    hierarchy = toy_hierarchy()  # 10 points
    retrieved = np.array([7, 2, 9, 4])  # best first
    for budget, share, taken_expected in ((6, 0.5, [7, 2, 9]), (6, 1.0, [7, 2, 9, 4]), (6, 0.0, [])):
        taken, balanced = combined_sample(hierarchy, retrieved, budget, share, seed=1)
        assert taken.tolist() == taken_expected  # the selection's best first, up to floor(share x budget)
        union = np.concatenate([taken, balanced])
        assert len(union) == budget and len(np.unique(union)) == budget  # exact, no image twice
        assert not set(balanced.tolist()) & set(retrieved[: len(taken)].tolist())
    # retrieval short of its share: the balanced part fills the rest
    taken, balanced = combined_sample(hierarchy, np.array([3]), 8, 0.75, seed=0)
    assert taken.tolist() == [3] and len(balanced) == 7 and 3 not in balanced.tolist()
    # a pool smaller than the budget: every point once
    taken, balanced = combined_sample(hierarchy, retrieved, 20, 0.5, seed=0, warn=lambda _: None)
    assert sorted(np.concatenate([taken, balanced]).tolist()) == list(range(10))


def test_without_retrieval_the_balanced_sample_is_unchanged():
    from curation_assets.core.select.sampling import combined_sample, hierarchical_sample
    from curation_assets_tests.test_sampling import toy_hierarchy

    hierarchy = toy_hierarchy()
    for strategy in ("random", "closest"):
        _, balanced = combined_sample(hierarchy, np.zeros(0, np.int64), 5, 0.5, strategy=strategy, seed=4)
        assert balanced.tolist() == hierarchical_sample(hierarchy, 5, strategy=strategy, seed=4).tolist()


# ----------------------------------------------------------------------------- the IVF path


def test_the_ivf_path_matches_brute_force():
    """A case forced onto the IVF path (kind ivf): the k nearest within the floor are brute
    force's (recall >= 0.99), with exact similarities."""
    from curation_assets.core.dedup.nearest import recall

    rng = np.random.default_rng(5)
    centres = rng.normal(size=(40, 32))
    pool = clustered(rng, centres, 150, 0.25)  # 6,000 pool images
    seeds = clustered(rng, centres, 10, 0.25)
    k = 4
    want, want_sim = brute_force(pool, seeds, k)
    found = nearest_pool_images(pool, seeds, k, kind="ivf", min_similarity=0.5)
    assert recall(found.rows, want, want_sim, 0.5) >= 0.99
    same = found.rows == want
    assert same.mean() >= 0.99
    np.testing.assert_allclose(found.similarity[same], want_sim[same], atol=1e-5)
    exact = nearest_pool_images(pool, seeds, k)  # auto: this size stays exact
    assert exact.rows.tolist() == want.tolist()
    # sample mode over the IVF path: the same selection as the exact path
    names = [f"s{i}" for i in range(len(seeds))]
    ids = [f"p{i}" for i in range(len(pool))]
    by_ivf, _ = sample_selection(ids, pool, {"seeds": (names, seeds)}, k, 0.5, kind="ivf")
    by_flat, _ = sample_selection(ids, pool, {"seeds": (names, seeds)}, k, 0.5, kind="flat")
    shared = set(by_ivf["image_id"]) & set(by_flat["image_id"])
    assert len(shared) >= 0.99 * by_flat.height
