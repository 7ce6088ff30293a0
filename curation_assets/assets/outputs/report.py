"""`curation_report` (global): a self-contained HTML report of what the pipeline did and why.

The funnel; near-duplicate example groups with distances and the distance histogram with
the threshold; with evaluation sets (``references.sets``, role decontaminate) the pool images
removed per set and the closest matches either side of the threshold, each pool image beside the
evaluation image it matched; per filter the score histogram with its threshold and the images just
either side of it; rotation before/after; samples per cluster and example grids. Written
under the store (report.html, with its images embedded up to a size budget, + plots/ +
thumbs/), opened from the asset metadata by a file:// link.
"""

import itertools
import re
from pathlib import Path

import dagster as dg
import numpy as np
import polars as pl

from curation_assets.assets.common import asset_key, group_name, plot_md
from curation_assets.assets.dedup.decontamination import (
    borderline_path,
    decontamination_enabled,
    decontamination_threshold,
)
from curation_assets.assets.filters.filter_decisions import filter_rules
from curation_assets.assets.keys import (
    CLUSTERS,
    DECISIONS,
    GROUPS,
    INVENTORY,
    PAIRS,
    REFERENCE_EMBEDDINGS,
    REPORT,
    SAMPLE,
)
from curation_assets.assets.outputs.decision_inputs import project_stages
from curation_assets.assets.outputs.decisions import decisions_path
from curation_assets.config import ProjectConfig
from curation_assets.core.dedup.decontaminate import locate_reference_images
from curation_assets.core.ingest.retirement import load_batches, retired_root, retired_totals
from curation_assets.core.outputs.decisions import decision_funnel
from curation_assets.core.outputs.report import (
    ClusterSection,
    ContaminationMatch,
    DecontaminationSection,
    DuplicateGroupExample,
    FilterSection,
    FunnelStep,
    ImageLoc,
    NearPair,
    ReferenceSetCount,
    ReportData,
    RotationExample,
    render_report,
    select_threshold_examples,
)
from curation_assets.core.storage import upload_tree
from curation_assets.resources.store import ProjectStore, StoreResource


def report_dir(store: ProjectStore) -> Path:
    return store.asset_dir(REPORT)


class Locator:
    """image_id -> where its bytes are (and the rotation display undoes), from the decisions."""

    def __init__(self, decisions: pl.DataFrame):
        columns = ["image_id", "source_path", "offset", "size_bytes", "rotate", "action"]
        self._rows = {r[0]: r for r in decisions.select(columns).iter_rows()}

    @property
    def ids(self) -> pl.Series:
        return pl.Series("image_id", list(self._rows), dtype=pl.String)

    def __call__(self, image_id: str, rotated: bool = True) -> ImageLoc:
        _, source, offset, size, rotate, action = self._rows[image_id]
        return ImageLoc(image_id, source, offset, size, int(rotate or 0) if rotated else 0, final=action)


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


def near_pairs(
    pairs: pl.DataFrame, threshold: float, locate: Locator, n: int
) -> tuple[list[NearPair], list[NearPair]]:
    """The ``n`` pairs just under the threshold and the ``n`` closest at or above it."""
    # a pair may name an image of a retired shard, which the decisions no longer list
    ids = locate.ids
    known = pairs.filter(
        pl.col("image_id_a").is_in(ids.implode()) & pl.col("image_id_b").is_in(ids.implode())
    )
    distances = known["distance"].cast(pl.Float64).to_numpy()
    below, above = select_threshold_examples(range(known.height), distances, threshold, n)
    rows = known.select("image_id_a", "image_id_b").rows()

    def pair(row: int, distance: float) -> NearPair:
        # 1 - cos of identical vectors can come out a hair below 0 in float32
        return NearPair(locate(rows[row][0]), locate(rows[row][1]), max(distance, 0.0))

    return [pair(r, d) for r, d in below], [pair(r, d) for r, d in above]


def decontamination_section(
    project: ProjectConfig, store: ProjectStore, decisions: pl.DataFrame, locate: Locator, n: int
) -> DecontaminationSection | None:
    """Per evaluation set the pool images removed as near-copies of it, and the ``n`` matches
    closest to the threshold on each side (from ``borderline.parquet``), each with the evaluation
    image it matched; None when the project names no evaluation set."""
    if not decontamination_enabled(project):
        return None
    sets = project.references.of_role("decontaminate")
    # the decisions' reasons, not the matches: a pool image of a retired shard is in neither
    reasons = decisions.select(pl.col("reasons").list.unique().explode().drop_nulls().alias("reason"))
    removed = dict(reasons.group_by("reason").len().iter_rows())
    counts = []
    for name in sorted(sets):
        cached = store.shard_path(REFERENCE_EMBEDDINGS, name)  # absent for a set of vectors
        images = store.parquet_rows(cached) if cached.is_file() else None
        counts.append(
            ReferenceSetCount(name, sets[name].kind, int(removed.get(f"contamination:{name}", 0)), images)
        )
    path = borderline_path(store)
    edge = store.read_parquet(path) if path.is_file() else pl.DataFrame()
    below: list[tuple] = []
    above: list[tuple] = []
    if not edge.is_empty():
        edge = edge.filter(pl.col("image_id").is_in(locate.ids.implode()))
        columns = ["image_id", "reference_set", "reference_image", "distance"]
        # nearest the threshold first, then shown in ascending distance (walking across it)
        removed_side = edge.filter(pl.col("side") == "removed").sort("distance", descending=True).head(n)
        kept_side = edge.filter(pl.col("side") == "kept").sort("distance").head(n)
        below = removed_side.sort("distance").select(columns).rows()
        above = kept_side.select(columns).rows()
    wanted: dict[str, list[str]] = {}
    for _, set_name, image, _ in [*below, *above]:
        wanted.setdefault(set_name, []).append(image)
    where = {
        set_name: locate_reference_images(sets[set_name].path, sets[set_name].kind, images)
        for set_name, images in wanted.items()
        if set_name in sets  # a set removed from the project since: its images show as names
    }

    def match(image_id: str, set_name: str, image: str, distance: float) -> ContaminationMatch:
        found = where.get(set_name, {}).get(image)
        reference = (
            None if found is None else ImageLoc(image, found.source_path, found.offset, found.size_bytes)
        )
        # 1 - cos of identical vectors can come out a hair below 0 in float32
        return ContaminationMatch(locate(image_id), set_name, image, reference, max(float(distance), 0.0))

    return DecontaminationSection(
        decontamination_threshold(project),
        counts,
        below=[match(*row) for row in below],
        above=[match(*row) for row in above],
    )


def filter_sections(
    project: ProjectConfig, decisions: pl.DataFrame, locate: Locator, n: int
) -> list[FilterSection] | None:
    rules = filter_rules(project)
    if not rules:
        return None
    scored = decisions.filter(
        pl.col("sanitize_status").is_not_null() & (pl.col("sanitize_status") != "rejected")
    )
    # duplicates are scored too (the distribution a user tunes by) but left before the filters ran
    still_in = (pl.col("exact_of").is_null() & pl.col("near_of").is_null()).alias("still_in")
    reaching = scored.select(still_in)["still_in"].to_numpy()
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
                still_in=reaching,
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
    clusters = store.read_parquet(clusters_path)
    sample = store.read_parquet(sample_path)
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
        threshold = project.stages.near_dedup.threshold
        if pairs.is_file():
            pair_table = store.read_parquet(pairs)
            data.near_dup_distances = np.clip(pair_table["distance"].to_numpy(), 0.0, 2.0)
            data.near_pairs_below, data.near_pairs_above = near_pairs(pair_table, threshold, locate, n)
        data.near_dup_threshold = threshold
        if groups.is_file():
            data.duplicate_groups = duplicate_examples(store.read_parquet(groups), locate, n)
    data.decontamination = decontamination_section(project, store, decisions, locate, n)
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


def _slug(plot_key: str) -> str:
    """A metadata name from a plot key such as "filter:example:maps and charts"."""
    return re.sub(r"[^A-Za-z0-9]+", "_", plot_key).strip("_").lower()


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
            "A self-contained HTML report: funnel, near-duplicate groups and distance histogram, "
            "decontamination matches either side of the threshold (with evaluation sets), filter "
            "histograms with the images either side of each threshold, rotations, samples per cluster."
        ),
    )
    def curation_report(context: dg.AssetExecutionContext, store: StoreResource) -> dg.MaterializeResult:
        project_store = store.for_project(project)
        path = decisions_path(project_store)
        if not path.is_file():
            raise dg.Failure(f"no {DECISIONS} yet: materialize it first")
        data = build_report_data(project, project_store, project_store.read_parquet(path))
        retired_shards, retired_images = retired_counts(project_store)
        if retired_shards:
            data.notes["retired shards"] = (
                f"{retired_shards:,} shard(s) with {retired_images:,} file(s) left the pool and were "
                f"retired; their outputs were moved to {retired_root(project_store.root)} "
                "(each batch's manifest.json lists them)"
            )
        target = report_dir(project_store)
        # on object storage the page is rendered locally, then uploaded with report.html last
        local = project_store.work_path(REPORT, "staging") if project_store.remote else target
        files = render_report(data, local, thumb_side=project.report.thumb_side)
        for image_id, error in files.broken_thumbnails[:20]:
            context.log.warning(f"report thumbnail of {image_id}: {error}")
        if project_store.remote:
            upload_tree(local, target, last=(files.html.relative_to(local).as_posix(),))
            page = f"`{target / files.html.relative_to(local).as_posix()}`"
        else:  # a path entry only copies to the clipboard; a file:// link opens the page itself
            page = f"[open report.html]({files.html.resolve().as_uri()})\n\n`{files.html.resolve()}`"
        context.log.info(f"report: {page.strip('`')}")
        metadata = {
            "report": dg.MetadataValue.md(page),
            "report_embedded_mib": round(files.embedded_bytes / 2**20, 2),
            "report_images_linked_past_budget": files.linked_images,
            "sections": ", ".join(files.sections),
            "stages_off": ", ".join(files.stages_off) or "none",
            "thumbnails": files.thumbnails,
            "broken_thumbnails": len(files.broken_thumbnails),
            "retired_shards": retired_shards,
            "retired_images": retired_images,
        }
        metadata.update({f"{_slug(k)}_plot": plot_md(v, k) for k, v in files.plots.items()})
        return dg.MaterializeResult(metadata=metadata)

    return curation_report
