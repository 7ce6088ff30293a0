"""`curation_report` (global): a self-contained HTML report of what the pipeline did and why.

The funnel; near-duplicate example groups with distances and the distance histogram with
the threshold; per filter the score histogram with its threshold and the images just
either side of it; rotation before/after; samples per cluster and example grids. Written
under the store (report.html + plots/ + thumbs/), linked from the asset metadata.
"""

import itertools
from pathlib import Path

import dagster as dg
import numpy as np
import polars as pl

from curation_assets.assets.clustering import CLUSTERS
from curation_assets.assets.common import asset_key, group_name
from curation_assets.assets.decision_inputs import project_stages
from curation_assets.assets.decisions import DECISIONS, SAMPLE, decisions_path
from curation_assets.assets.discovery import INVENTORY
from curation_assets.assets.filter_decisions import filter_rules
from curation_assets.assets.near_dedup import GROUPS, PAIRS
from curation_assets.config import ProjectConfig
from curation_assets.core.decisions import decision_funnel
from curation_assets.core.report import (
    ClusterSection,
    DuplicateGroupExample,
    FilterSection,
    FunnelStep,
    ImageLoc,
    ReportData,
    RotationExample,
    render_report,
    select_threshold_examples,
)
from curation_assets.core.retirement import load_batches, retired_root, retired_totals
from curation_assets.resources.store import ProjectStore, StoreResource

REPORT = "curation_report"


def report_dir(store: ProjectStore) -> Path:
    return store.asset_dir(REPORT)


class Locator:
    """image_id -> where its bytes are (and the rotation display undoes), from the decisions."""

    def __init__(self, decisions: pl.DataFrame):
        columns = ["image_id", "source_path", "offset", "size_bytes", "rotate"]
        self._rows = {r[0]: r for r in decisions.select(columns).iter_rows()}

    def __call__(self, image_id: str, rotated: bool = True) -> ImageLoc:
        _, source, offset, size, rotate = self._rows[image_id]
        return ImageLoc(image_id, source, offset, size, int(rotate or 0) if rotated else 0)


def funnel_steps(decisions: pl.DataFrame, stages: list[str]) -> list[FunnelStep]:
    # the renderer shows the first step's input as "input": the steps start after it
    rows = decision_funnel(decisions, stages)
    return [
        FunnelStep(row["step"], before["left"], row["removed"], row["left"])
        for before, row in itertools.pairwise(rows)
    ]


def duplicate_examples(groups: pl.DataFrame, locate: Locator, n: int) -> list[DuplicateGroupExample]:
    """The ``n`` largest groups, members ordered by distance (closest first)."""
    if groups.is_empty():
        return []
    sizes = groups.group_by("group_id").len().sort(["len", "group_id"], descending=[True, False]).head(n)
    examples = []
    for group_id in sizes["group_id"]:
        rows = groups.filter(pl.col("group_id") == group_id)
        keeper = rows.filter(pl.col("is_keeper"))["image_id"][0]
        members = rows.filter(~pl.col("is_keeper")).sort("distance", nulls_last=True)
        examples.append(
            DuplicateGroupExample(
                keeper=locate(keeper),
                members=[
                    # 1 - cos of identical vectors can come out a hair below 0 in float32
                    (locate(i), max(float(d), 0.0) if d is not None else float("nan"))
                    for i, d in members.select("image_id", "distance").iter_rows()
                ],
            )
        )
    return examples


def filter_sections(
    project: ProjectConfig, decisions: pl.DataFrame, locate: Locator, n: int
) -> list[FilterSection] | None:
    rules = filter_rules(project)
    if not rules:
        return None
    scored = decisions.filter(
        pl.col("sanitize_status").is_not_null() & (pl.col("sanitize_status") != "rejected")
    )
    sections = []
    for rule in rules:
        if rule.column not in scored.columns:
            continue
        values = scored[rule.column].cast(pl.Float64).fill_null(np.nan).to_numpy()
        below, above = select_threshold_examples(scored["image_id"], values, rule.threshold, n)
        sections.append(
            FilterSection(
                rule.name,
                values,
                rule.threshold,
                rule.removes,
                below=[(locate(i), v) for i, v in below],
                above=[(locate(i), v) for i, v in above],
            )
        )
    return sections


def rotation_examples(decisions: pl.DataFrame, locate: Locator, n: int) -> list[RotationExample]:
    turned = decisions.filter(pl.col("rotate") != 0).sort("rotation_probability", descending=True).head(n)
    return [
        RotationExample(locate(i, rotated=False), int(angle), float(p))
        for i, angle, p in turned.select("image_id", "rotate", "rotation_probability").iter_rows()
    ]


def cluster_section(
    store: ProjectStore, project: ProjectConfig, locate: Locator, n_clusters: int, n_examples: int
) -> ClusterSection | None:
    clusters_path = store.global_path(CLUSTERS, f"{CLUSTERS}.parquet")
    sample_path = store.global_path(SAMPLE, f"{SAMPLE}.parquet")
    if not (project.stages.sampling.enabled and clusters_path.is_file() and sample_path.is_file()):
        return None
    top = f"cluster_l{len(project.stages.clustering.levels)}"
    clusters = pl.read_parquet(clusters_path)
    sample = pl.read_parquet(sample_path)
    sizes = dict(clusters.group_by(top).len().iter_rows())
    samples = dict(sample.group_by(top).len().iter_rows())
    shown = sorted(samples, key=lambda c: (-samples[c], c))[:n_clusters]
    examples = {
        int(c): [
            locate(i) for i in sample.filter(pl.col(top) == c).sort("distance")["image_id"].head(n_examples)
        ]
        for c in shown
    }
    return ClusterSection(samples_per_cluster=samples, sizes=sizes, examples=examples)


def build_report_data(project: ProjectConfig, store: ProjectStore, decisions: pl.DataFrame) -> ReportData:
    n = project.report.examples_per_section
    locate = Locator(decisions)
    stages = project_stages(project, with_sample=True)
    data = ReportData(project=project.name, funnel=funnel_steps(decisions, stages))
    if project.stages.near_dedup.enabled:
        pairs = store.global_path(PAIRS, f"{PAIRS}.parquet")
        groups = store.global_path(GROUPS, f"{GROUPS}.parquet")
        if pairs.is_file():
            distances = pl.read_parquet(pairs, columns=["distance"])["distance"].to_numpy()
            data.near_dup_distances = np.clip(distances, 0.0, 2.0)
        data.near_dup_threshold = project.stages.near_dedup.threshold
        if groups.is_file():
            data.duplicate_groups = duplicate_examples(pl.read_parquet(groups), locate, n)
    data.filters = filter_sections(project, decisions, locate, n)
    if project.stages.rotation.enabled:
        data.rotations = rotation_examples(decisions, locate, n)
    data.clusters = cluster_section(store, project, locate, project.report.clusters_shown, n)
    removed = decisions.filter(pl.col("action") == "remove").height
    data.notes["funnel"] = (
        f"{decisions.height:,} files; {removed:,} removed, {decisions.height - removed:,} kept. "
        f"Every file's action and reasons: {decisions_path(store)}"
    )
    return data


def retired_counts(store: ProjectStore) -> tuple[int, int]:
    """(shards, files) retired from the pool and not back: read from the retirement manifests."""
    return retired_totals(load_batches(store.root), active=store.shards_written(INVENTORY))


def build_report_asset(project: ProjectConfig) -> dg.AssetsDefinition:
    @dg.asset(
        key=asset_key(project, REPORT),
        deps=[asset_key(project, DECISIONS)],
        group_name=group_name(project, "curation"),
        kinds={"html"},
        description=(
            "A self-contained HTML report: funnel, near-duplicate groups and distance histogram, filter "
            "histograms with the images either side of each threshold, rotations, samples per cluster."
        ),
    )
    def curation_report(context: dg.AssetExecutionContext, store: StoreResource) -> dg.MaterializeResult:
        project_store = store.for_project(project)
        path = decisions_path(project_store)
        if not path.is_file():
            raise dg.Failure(f"no {DECISIONS} yet: materialize it first")
        data = build_report_data(project, project_store, pl.read_parquet(path))
        retired_shards, retired_images = retired_counts(project_store)
        if retired_shards:
            data.notes["retired shards"] = (
                f"{retired_shards:,} shard(s) with {retired_images:,} file(s) left the pool and were "
                f"retired; their outputs were moved to {retired_root(project_store.root)} "
                "(each batch's manifest.json lists them)"
            )
        files = render_report(data, report_dir(project_store), thumb_side=project.report.thumb_side)
        for image_id, error in files.broken_thumbnails[:20]:
            context.log.warning(f"report thumbnail of {image_id}: {error}")
        context.log.info(f"report: {files.html}")
        metadata = {
            "report": dg.MetadataValue.path(str(files.html)),
            "sections": ", ".join(files.sections),
            "stages_off": ", ".join(files.stages_off) or "none",
            "thumbnails": files.thumbnails,
            "broken_thumbnails": len(files.broken_thumbnails),
            "retired_shards": retired_shards,
            "retired_images": retired_images,
        }
        metadata.update(
            {f"plot_{k.replace(':', '_')}": dg.MetadataValue.path(str(v)) for k, v in files.plots.items()}
        )
        return dg.MaterializeResult(metadata=metadata)

    return curation_report
