"""The whole demo project on a copy of the demo data: filters, clustering and sampling, decisions,
export, the report, and apply/restore on the copy (the shared demo data is never modified)."""

from __future__ import annotations

import shutil
from pathlib import Path

import dagster as dg
import numpy as np
import polars as pl
import pytest
import xxhash
import yaml
from PIL import Image

from curation_assets.assets.outputs.apply import apply_job_name, restore_job_name
from curation_assets.config import PROJECTS_DIR, deep_merge, load_project_dict
from curation_assets.core.ingest.images import load_rgb
from curation_assets.definitions import build_definitions
from curation_assets.resources.store import StoreResource
from curation_assets.runner import materialize_project, materialize_selection, run_job

pytestmark = pytest.mark.xdist_group("demo")
BUDGET = 120


def demo_project(tmp: Path, images: Path, examples: Path, **overrides):
    """The packaged demo project, pointed at a temp store and a copy of the demo images."""
    data = yaml.safe_load((PROJECTS_DIR / "demo.yaml").read_text())
    data = deep_merge(
        data,
        {
            "storage_root": str(tmp / "store"),
            "dataset": {"roots": {"train": str(images)}},
            "stages": {
                "sanitize": {"workers": 2},
                "quality": {"workers": 1},
                "example_filters": {"examples_root": str(examples)},
                # a 240-file pool: ~170 images reach clustering
                "clustering": {
                    "levels": [{"n_clusters": 24, "n_samples": 3}, {"n_clusters": 6, "n_samples": 2}],
                    "n_resamples": 3,
                },
                "sampling": {"budget": BUDGET},
            },
            "apply": {"backup_root": str(tmp / "backup")},
        },
    )
    return load_project_dict(deep_merge(data, overrides), source="test-demo")


def tree_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): xxhash.xxh3_128_hexdigest(p.read_bytes())
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def run(demo_dataset, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("curation")
    images = tmp / "images"
    shutil.copytree(demo_dataset.images_root, images)
    project = demo_project(tmp, images, demo_dataset.examples_root)
    defs = build_definitions([project])
    instance = dg.DagsterInstance.ephemeral()
    summary = materialize_project(project, defs, instance, echo=lambda _: None)
    store = StoreResource().for_project(project)
    truth = pl.read_parquet(demo_dataset.ground_truth_path)
    decisions = pl.read_parquet(store.global_path("curation_decisions", "curation_decisions.parquet"))
    filters = pl.read_parquet(store.global_path("filter_decisions", "filter_decisions.parquet"))
    return {
        "tmp": tmp,
        "images": images,
        "project": project,
        "defs": defs,
        "instance": instance,
        "summary": summary,
        "store": store,
        "truth": truth,
        "decisions": decisions,
        "filters": filters.join(truth.select("image_id", "kind", "category", "source_id"), on="image_id"),
    }


def check_passed(instance: dg.DagsterInstance, project, asset: str, check: str) -> bool:
    key = dg.AssetCheckKey(dg.AssetKey([project.name, asset]), check)
    records = instance.event_log_storage.get_latest_asset_check_execution_by_key([key])
    return bool(records) and all(r.evaluation and r.evaluation.passed for r in records.values())


def test_every_stage_ran(run):
    assert run["summary"].failed == []
    for asset, check in [
        ("example_distances", "every_kept_image_has_a_distance_per_category"),
        ("quality_scores", "every_kept_image_has_a_quality_score"),
        ("filter_decisions", "one_row_per_kept_image"),
        ("curated_sample", "sample_size_equals_budget"),
        ("curated_sample", "no_duplicate_ids_unless_multiplier"),
        ("curated_sample", "every_sampled_id_is_a_kept_image"),
        ("curation_decisions", "one_row_per_inventoried_file"),
        ("curation_decisions", "every_kept_image_is_valid"),
        ("curation_decisions", "kept_count_equals_the_sample"),
        ("curated_dataset", "manifest_equals_kept_set"),
    ]:
        assert check_passed(run["instance"], run["project"], asset, check), (asset, check)


# ----------------------------------------------------------------------------- issue 5: filters


def test_unwanted_examples_are_filtered_and_photos_are_not(run):
    filters = run["filters"]
    unwanted = filters.filter(pl.col("kind") == "unwanted")
    assert unwanted.height >= 9
    by_category = unwanted.filter(
        pl.col("removed_by").list.contains(pl.format("example:{}", pl.col("category")))
        | pl.col("removed_by").list.eval(pl.element().str.starts_with("example:")).list.any()
    )
    assert by_category.height / unwanted.height >= 0.9, unwanted.select("image_id", "removed_by").to_dicts()
    photos = filters.filter(pl.col("kind") == "base")
    example_removed = photos.filter(
        pl.col("removed_by").list.eval(pl.element().str.starts_with("example:")).list.any()
    )
    assert example_removed.height / photos.height <= 0.05


@pytest.mark.parametrize(
    ("issue", "rule"), [("blur", "quality:blur"), ("dark", "quality:dark"), ("bright", "quality:light")]
)
def test_planted_quality_defects_are_flagged_and_their_originals_are_not(run, issue, rule):
    truth = run["truth"]
    planted = truth.filter((pl.col("kind") == "quality") & (pl.col("quality_issue") == issue))
    assert planted.height >= 1
    rows = run["filters"].filter(pl.col("image_id").is_in(planted["image_id"].to_list()))
    assert rows.height == planted.height
    assert rows["removed_by"].list.contains(rule).all(), rows.select("image_id", "removed_by").to_dicts()
    originals = run["filters"].filter(pl.col("image_id").is_in(planted["source_id"].to_list()))
    assert originals.height >= 1
    flagged = originals.filter(
        pl.col("removed_by").list.eval(pl.element().str.starts_with("quality:")).list.any()
    )
    assert flagged.is_empty(), flagged.select("image_id", "removed_by").to_dicts()


# ----------------------------------------------------------------------------- issue 6: sampling


def test_sample_is_exactly_the_budget_of_surviving_images(run):
    store = run["store"]
    sample = pl.read_parquet(store.global_path("curated_sample", "curated_sample.parquet"))
    clusters = pl.read_parquet(store.global_path("hierarchical_clusters", "hierarchical_clusters.parquet"))
    assert sample.height == BUDGET and sample["image_id"].n_unique() == BUDGET
    assert set(sample["image_id"]) <= set(clusters["image_id"])
    survivors = run["decisions"].filter(pl.col("stage").is_null() | (pl.col("stage") == "sampling"))
    assert set(clusters["image_id"]) == set(survivors["image_id"])
    assert {"cluster_l1", "cluster_l2", "distance"} <= set(clusters.columns)


# ----------------------------------------------------------------------------- issue 7: decisions


def test_decisions_match_the_ground_truth(run):
    decisions = run["decisions"].join(run["truth"], on="image_id", how="left")
    assert decisions.height == run["truth"].height  # one row per file
    defects = decisions.filter(pl.col("expected_status") == "rejected")
    assert (defects["action"] == "remove").all()
    assert (defects["stage"] == "sanitize").all()
    for row in defects.iter_rows(named=True):
        assert {f"sanitize:{r}" for r in row["expected_reasons"]} <= set(row["reasons"]), row["image_id"]
    copies = decisions.filter(pl.col("kind").is_in(["byte_copy", "pixel_copy"]))
    for row in copies.iter_rows(named=True):  # the copy or its source goes, as an exact duplicate
        pair = decisions.filter(pl.col("image_id").is_in([row["image_id"], row["source_id"]]))
        assert pair["reasons"].list.contains("exact_duplicate").sum() == 1, row["image_id"]
    near = decisions.filter(pl.col("kind") == "near_duplicate")
    found = near.filter(
        pl.col("reasons").list.contains("near_duplicate") | pl.col("reasons").list.contains("exact_duplicate")
    )
    pairs_flagged = 0
    for row in near.iter_rows(named=True):
        pair = decisions.filter(pl.col("image_id").is_in([row["image_id"], row["source_id"]]))
        pairs_flagged += int(pair["reasons"].list.contains("near_duplicate").any())
    assert pairs_flagged / near.height >= 0.8, found.height
    removed = decisions.filter(pl.col("action") == "remove")
    assert (removed["explanation"].str.len_chars() > 0).all()
    kept = decisions.filter(pl.col("action") != "remove")
    assert kept.height == BUDGET
    assert (kept["sanitize_status"] != "rejected").all()
    near_rows = decisions.filter(pl.col("reasons").list.contains("near_duplicate"))
    assert near_rows["explanation"].str.contains(r"near duplicate of .+ at distance 0\.\d+").any()


def test_fixable_images_are_kept_with_their_fixes(run):
    decisions = run["decisions"]
    fixable = decisions.filter((pl.col("sanitize_status") == "fixable") & (pl.col("action") != "remove"))
    assert fixable.height >= 1
    assert (fixable["action"] == "keep_with_fix").all()
    assert (fixable["fixes"].list.len() > 0).all()


def test_export_links_every_kept_image_and_fixes_orientation(run):
    store, decisions, truth = run["store"], run["decisions"], run["truth"]
    root = store.global_path("curated_dataset", "export")
    manifest = pl.read_parquet(root / "manifest.parquet")
    kept = decisions.filter(pl.col("action") != "remove")
    assert set(manifest["image_id"]) == set(kept["image_id"])
    assert (root / "files.txt").read_text().split() == manifest["image_id"].to_list()
    for row in manifest.iter_rows(named=True):
        out = root / "images" / row["export_path"]
        assert out.is_file(), out
        with Image.open(out) as im:
            im.load()
    turned = manifest.join(truth, on="image_id").filter(pl.col("kind") == "exif_rotated")
    for row in turned.iter_rows(named=True):
        out = root / "images" / row["export_path"]
        with Image.open(out) as im:
            assert im.size == (row["width"], row["height"])  # upright size
            assert im.getexif().get(0x0112) in (None, 1)  # no tag left to turn it again
            exported = np.asarray(im.convert("RGB"), dtype=np.float32)
        upright = np.asarray(load_rgb(Path(row["source_path"]).read_bytes()), dtype=np.float32)
        assert np.abs(exported - upright).mean() < 6


def test_report_renders_every_section_with_real_numbers(run):
    report = run["store"].asset_dir("curation_report") / "report.html"
    html = report.read_text()
    for heading in ("Funnel", "Near duplicates", "Filters", "Clusters"):
        assert f">{heading}<" in html, heading
    kept = run["decisions"].filter(pl.col("action") != "remove").height
    assert f"{kept:,}" in html
    assert "example:document" in html and "quality:blur" in html
    import base64
    import io
    import re

    # issue 13: every image is inside the page (the demo is far under the budget), none linked
    assert not re.findall(r'src="((?:plots|thumbs)/[^"]+)"', html)
    embedded = re.findall(r'src="data:image/(png|jpeg);base64,([^"]+)"', html)
    assert {kind for kind, _ in embedded} == {"png", "jpeg"}
    for _, data in embedded:
        with Image.open(io.BytesIO(base64.b64decode(data))) as im:
            im.load()
    assert "Images are embedded in this file" in html and "past the budget" not in html
    # distances print with three decimals, never as 9.375e-08
    assert not re.search(r"d = [0-9.]+e-", html)
    assert re.search(r"d = \d\.\d{3}<", html)
    # filter counts: over all scored images, and over those still in at the filter stage
    assert "would remove" in html and "still in at this stage" in html
    # near-duplicate pairs either side of the threshold, and each image's final decision apart
    assert "Just under it: grouped" in html and "At or just above it: not grouped" in html
    assert re.search(r"At or just above it: not grouped, both kept by this stage \([1-9]", html)
    assert 'class="badge final removed"' in html and 'class="badge final kept"' in html


# ----------------------------------------------------------------------------- issue 7: apply / restore


def test_apply_refuses_without_confirm_and_a_backup_inside_the_dataset(run):
    defs, instance, project = run["defs"], run["instance"], run["project"]
    before = tree_hashes(run["images"])
    result = run_job(defs, instance, apply_job_name(project))
    assert not result.success and "confirm" in result.message
    inside = project.model_copy(
        update={"apply": project.apply.model_copy(update={"backup_root": str(run["images"] / "backup")})}
    )
    result = run_job(
        build_definitions([inside]),
        instance,
        apply_job_name(inside),
        {"ops": {f"{project.name}_apply": {"config": {"confirm": True}}}},
    )
    assert not result.success and "inside" in result.message
    assert tree_hashes(run["images"]) == before


def test_apply_then_restore_gives_back_a_bit_identical_tree(run):
    defs, instance, project, images = run["defs"], run["instance"], run["project"], run["images"]
    before = tree_hashes(images)
    confirm = {"ops": {f"{project.name}_apply": {"config": {"confirm": True}}}}
    result = run_job(defs, instance, apply_job_name(project), confirm)
    assert result.success, result.message
    decisions = run["decisions"]
    moved = decisions.filter(
        (pl.col("action") == "remove")
        & (pl.col("stage") != "sampling")
        & ~pl.col("reasons").list.contains("sanitize:not_an_image")
    )
    after = tree_hashes(images)
    backup = Path(project.apply.backup_root)
    for rel in moved["root_path"]:
        assert rel not in after
        assert (backup / "train" / rel).is_file()
    # nothing lost: every original is in place or in the backup, byte for byte
    backed = tree_hashes(backup / "train")
    for rel, digest in before.items():
        assert after.get(rel) == digest or backed.get(rel) == digest, rel
    result = run_job(defs, instance, restore_job_name(project))
    assert result.success, result.message
    assert tree_hashes(images) == before


def test_cli_restore_finds_the_journal_of_an_apply_given_its_backup_root_on_the_command_line(
    run, monkeypatch, capsys
):
    """Issue 13: `curate apply --backup-root DIR`, then a bare `curate restore`, puts back every file."""
    from curation_assets.assets.outputs.apply import registry_path
    from curation_assets.cli import main
    from curation_assets.core.outputs.apply import read_registry

    tmp, images, project = run["tmp"], run["images"], run["project"]
    monkeypatch.setenv("CURATION_HOME", str(tmp / "cli_home"))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp / "cli_home" / "dagster_home"))
    # the project file names no backup root: only the command line knows it
    data = project.model_dump(mode="json", exclude={"source"})
    data["apply"]["backup_root"] = None
    project_file = tmp / "cli_project.yaml"
    project_file.write_text(yaml.safe_dump(data, sort_keys=False))
    before = tree_hashes(images)

    first, second = tmp / "cli_backup", tmp / "cli_backup_2"
    assert main(["apply", "--project", str(project_file), "--confirm", "--backup-root", str(first)]) == 0
    out = capsys.readouterr().out
    journal = first.resolve() / f"{project.name}.journal.jsonl"
    assert f"journal {journal}" in out
    assert tree_hashes(images) != before and tree_hashes(first)
    # a second apply to another root (finds the files gone): two unrestored applies, listed
    assert main(["apply", "--project", str(project_file), "--confirm", "--backup-root", str(second)]) == 0
    capsys.readouterr()
    registry = registry_path(run["store"])
    assert [r.journal for r in read_registry(registry) if not r.restored][-2:] == [
        str(journal),
        str(second.resolve() / f"{project.name}.journal.jsonl"),
    ]

    assert main(["restore", "--project", str(project_file)]) == 0
    out = capsys.readouterr().out
    assert "2 applies" in out and "reversing the latest" in out and str(second.resolve()) in out
    assert main(["restore", "--project", str(project_file)]) == 0
    out = capsys.readouterr().out
    assert f"journal {journal}" in out and "restored:" in out
    assert tree_hashes(images) == before  # every file of the dataset, bit-identical
    assert all(r.restored for r in read_registry(registry))

    assert main(["restore", "--project", str(project_file)]) == 1
    err = capsys.readouterr().err
    assert "nothing to restore" in err and str(registry) in err


# ----------------------------------------------------------------------------- threshold change (last: it
# changes filter_decisions in the store)


def test_changing_one_threshold_touches_only_the_decision_asset(run):
    store, project, instance = run["store"], run["project"], run["instance"]
    scores = {
        p: p.stat().st_mtime_ns
        for a in ("example_distances", "quality_scores")
        for p in store.asset_dir(a).glob("*.parquet")
    }
    records_before = {
        a: len(instance.fetch_materializations(dg.AssetKey([project.name, a]), limit=100).records)
        for a in ("example_distances", "quality_scores", "filter_decisions")
    }
    changed = demo_project(
        run["tmp"],
        run["images"],
        Path(project.stages.example_filters.examples_root),
        stages={"example_filters": {"categories": {"document": {"threshold": 0.0}}}},
    )
    summary = materialize_selection(
        changed, build_definitions([changed]), instance, ["filter_decisions"], echo=lambda _: None
    )
    assert summary.failed == []
    after = pl.read_parquet(store.global_path("filter_decisions", "filter_decisions.parquet"))
    assert not after["removed_by"].list.contains("example:document").any()
    assert run["filters"]["removed_by"].list.contains("example:document").any()
    assert {p: p.stat().st_mtime_ns for p in scores} == scores
    records_after = {
        a: len(instance.fetch_materializations(dg.AssetKey([project.name, a]), limit=100).records)
        for a in records_before
    }
    assert records_after["filter_decisions"] == records_before["filter_decisions"] + 1
    assert records_after["example_distances"] == records_before["example_distances"]
    assert records_after["quality_scores"] == records_before["quality_scores"]


# ----------------------------------------------------------------------------- issue 13: decisions


def test_not_sampled_only_marks_images_that_reached_sampling():
    """A six-image project where each stage removes one: only the image still in at sampling and not
    drawn is ``not_sampled``; earlier removals keep their own reasons alone."""
    from curation_assets.assets.outputs.decisions import reason_hits, removed_by_stage
    from curation_assets.core.outputs.decisions import DecisionInputs, build_decisions, decision_funnel

    ids = ["bad", "copy", "near", "blurry", "undrawn", "drawn"]
    inventory = pl.DataFrame(
        {
            "image_id": ids,
            "shard": ["s"] * 6,
            "split": ["train"] * 6,
            "rel_path": [f"{i}.jpg" for i in ids],
            "source_path": [f"/data/{i}.jpg" for i in ids],
            "offset": [0] * 6,
            "size_bytes": [10] * 6,
            "content_hash": ids,
        }
    )
    sanitized = pl.DataFrame(
        {
            "image_id": ids,
            "status": ["rejected"] + ["ok"] * 5,
            "reasons": [["truncated"]] + [[]] * 5,
            "fixes": [[]] * 6,
            "width": [64] * 6,
            "height": [64] * 6,
        },
        schema_overrides={"reasons": pl.List(pl.String), "fixes": pl.List(pl.String)},
    )
    exact = pl.DataFrame(
        {"image_id": ["copy", "drawn"], "is_keeper": [False, True], "keeper_id": ["drawn"] * 2}
    )
    exact = exact.with_columns(match=pl.lit("bytes"))
    near = pl.DataFrame(
        {
            "image_id": ["near", "undrawn"],
            "is_keeper": [False, True],
            "keeper_id": ["undrawn"] * 2,
            "distance": [0.05, 0.0],
        }
    )
    filters = pl.DataFrame(
        {
            "image_id": ids[1:],
            "removed": [False, False, True, False, False],
            "removed_by": [[], [], ["quality:blur"], [], []],
        },
        schema_overrides={"removed_by": pl.List(pl.String)},
    )
    sample = pl.DataFrame({"image_id": ["drawn"]})
    decisions = build_decisions(
        DecisionInputs(inventory, sanitized, exact, near, filters, sample), roots={"train": "/data"}
    )
    by_id = {row["image_id"]: row for row in decisions.iter_rows(named=True)}
    not_sampled = {i for i, row in by_id.items() if "not_sampled" in row["reasons"]}
    assert not_sampled == {"undrawn"}
    assert by_id["bad"]["reasons"] == ["sanitize:truncated"]
    assert by_id["copy"]["reasons"] == ["exact_duplicate"]
    assert by_id["near"]["reasons"] == ["near_duplicate"]
    assert by_id["blurry"]["reasons"] == ["filter:quality:blur"]
    assert by_id["drawn"]["action"] == "keep"
    # the counts labelled images are once per removed image and add up to the funnel
    funnel = decision_funnel(decisions, ["sanitize", "exact_dedup", "near_dedup", "filters", "sampling"])
    stages = removed_by_stage(decisions)
    assert stages[-1] == {"first removing stage": "total", "removed images": 5}
    assert sum(r["removed images"] for r in stages[:-1]) == sum(r["removed"] for r in funnel) == 5
    hits = {r["reason"]: r["reason hits"] for r in reason_hits(decisions)}
    assert hits == {"sanitize": 1, "exact_duplicate": 1, "near_duplicate": 1, "filter": 1, "not_sampled": 1}


def test_removed_images_by_stage_add_up_to_the_demo_funnel(run):
    from curation_assets.assets.outputs.decision_inputs import project_stages
    from curation_assets.assets.outputs.decisions import reason_hits, removed_by_stage
    from curation_assets.core.outputs.decisions import decision_funnel

    decisions = run["decisions"]  # the first run's: a later test changes a threshold
    funnel = decision_funnel(decisions, project_stages(run["project"], with_sample=True))
    removed = decisions.filter(pl.col("action") == "remove").height
    stages = removed_by_stage(decisions)
    assert stages[-1]["removed images"] == removed
    assert sum(r["removed images"] for r in stages[:-1]) == removed
    assert sum(r["removed"] for r in funnel) + funnel[0]["not_images"] == removed
    by_stage = {r["first removing stage"]: r["removed images"] for r in stages}
    sampled_out = {r["reason"]: r["removed images with it"] for r in reason_hits(decisions)}.get(
        "not_sampled", 0
    )
    assert sampled_out == by_stage.get("sampling", 0)
    assert not decisions.filter(
        pl.col("reasons").list.contains("not_sampled") & (pl.col("stage") != "sampling")
    ).height
    # filter_decisions' "removed here" is the funnel's filter step; "would remove" counts duplicates too
    key = dg.AssetKey([run["project"].name, "filter_decisions"])
    first = run["instance"].fetch_materializations(key, limit=1, ascending=True).records[0]
    metadata = first.asset_materialization.metadata
    assert metadata["removed_here_of_still_in"].value == by_stage.get("filters", 0)
    assert metadata["removed"].value >= metadata["removed_here_of_still_in"].value
    assert "removed here (of still in)" in metadata["filters"].md_str
    # curation_decisions labels what each table counts; the report's entry is a link that opens it
    key = dg.AssetKey([run["project"].name, "curation_decisions"])
    first = run["instance"].fetch_materializations(key, limit=1, ascending=True).records[0]
    metadata = first.asset_materialization.metadata
    assert f"| total | {removed} |" in metadata["removed_images_by_stage"].md_str
    assert "| reason | reason hits | removed images with it |" in metadata["reason_hits"].md_str
    key = dg.AssetKey([run["project"].name, "curation_report"])
    report = run["instance"].fetch_materializations(key, limit=1).records[0].asset_materialization.metadata
    html_path = run["store"].asset_dir("curation_report") / "report.html"
    assert f"]({html_path.resolve().as_uri()})" in report["report"].md_str
