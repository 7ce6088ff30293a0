"""One project's asset graph: per-shard assets, global assets, their jobs, sensor and schedule.

Stages switched off in the project file are absent from the graph (ToL has no rotation,
GLDv2 no example filters); ``declared_stages`` lists what a project switches on.
"""

from __future__ import annotations

import dagster as dg

from curation_assets.assets.common import shard_partitions
from curation_assets.assets.dedup.exact_duplicates import build_exact_duplicates_asset
from curation_assets.assets.dedup.near_dedup import build_near_dedup_assets
from curation_assets.assets.embed.embeddings import build_embedding_assets
from curation_assets.assets.filters.aesthetic import build_aesthetic_asset
from curation_assets.assets.filters.example_filters import (
    build_example_distances_asset,
    build_example_embeddings_asset,
)
from curation_assets.assets.filters.filter_decisions import build_filter_decisions_asset, score_assets
from curation_assets.assets.filters.quality import build_quality_asset
from curation_assets.assets.filters.rotation import build_rotation_asset
from curation_assets.assets.ingest.discovery import build_discovery_sensor, build_refresh_schedule
from curation_assets.assets.ingest.inventory import build_inventory_asset
from curation_assets.assets.ingest.sanitize import build_sanitize_asset
from curation_assets.assets.labeled.labeled import build_labeled_assets, build_labeled_shard_assets
from curation_assets.assets.outputs.apply import build_apply_jobs
from curation_assets.assets.outputs.decisions import build_decisions_asset
from curation_assets.assets.outputs.export import build_export_asset
from curation_assets.assets.outputs.report import build_report_asset
from curation_assets.assets.select.clustering import build_clusters_asset, build_sample_asset
from curation_assets.config import ProjectConfig

CODE_LOCATION_MODULE = "curation_assets.definitions"  # what workspace.yaml and the run workers load


# A backfill launches one run per shard: each per-shard asset computes exactly the partition it
# is given, a failed shard is retried alone, and the run queue (max_concurrent_runs) decides how
# many shards run at once. A run's start costs about a second (README: "Running it at scale").
SHARD_BACKFILL = dg.BackfillPolicy.multi_run(max_partitions_per_run=1)
MAX_RUNTIME_TAG = "dagster/max_runtime"  # read by Dagster's run monitoring


def job_executor(project: ProjectConfig) -> dg.ExecutorDefinition:
    """The executor of the shard and global jobs (project file: runs.executor).

    in_process runs every step in the run process: one interpreter start per run instead of
    one per step. multiprocess forks each step from a forkserver that imported this code
    location once, so a step pays a fork, not an interpreter start and the imports.
    """
    if project.runs.executor == "in_process":
        return dg.in_process_executor
    config: dict = {"start_method": {"forkserver": {"preload_modules": [CODE_LOCATION_MODULE]}}}
    if project.runs.max_concurrent_steps:
        config["max_concurrent"] = project.runs.max_concurrent_steps
    return dg.multiprocess_executor.configured(config, name="forkserver_multiprocess")


def max_runtime_tags(seconds: int) -> dict[str, str]:
    """Job tags that make run monitoring fail a run still going after ``seconds`` (0: no limit)."""
    return {MAX_RUNTIME_TAG: str(seconds)} if seconds else {}


def shard_job_name(project: ProjectConfig) -> str:
    return f"{project.name}_shard_job"


def global_job_name(project: ProjectConfig) -> str:
    return f"{project.name}_global_job"


def build_project_definitions(project: ProjectConfig) -> dg.Definitions:
    partitions = shard_partitions(project)
    per_shard = build_per_shard_assets(project, partitions)
    global_assets = []
    if project.stages.exact_dedup.enabled:
        global_assets.append(build_exact_duplicates_asset(project))
    global_assets += build_near_dedup_assets(project)
    if project.stages.example_filters.enabled:
        global_assets.append(build_example_embeddings_asset(project))
    if score_assets(project):
        global_assets.append(build_filter_decisions_asset(project))
    if project.stages.clustering.enabled:
        global_assets.append(build_clusters_asset(project))
    if project.stages.sampling.enabled:
        global_assets.append(build_sample_asset(project))
    global_assets.append(build_decisions_asset(project))
    if project.export.enabled:
        global_assets.append(build_export_asset(project))
    if project.report.enabled:
        global_assets.append(build_report_asset(project))
    global_assets += build_labeled_assets(project)  # each only when its stage or section is on

    shard_job = dg.define_asset_job(
        shard_job_name(project),
        selection=dg.AssetSelection.assets(*per_shard),
        description=f"Per-shard assets of {project.name}: one run per shard (partition).",
        executor_def=job_executor(project),
        tags=max_runtime_tags(project.runs.shard_max_runtime_seconds),
    )
    jobs = [shard_job, *build_apply_jobs(project)]
    schedules = []
    if global_assets:  # always: curation_decisions is global
        global_job = dg.define_asset_job(
            global_job_name(project),
            selection=dg.AssetSelection.assets(*global_assets),
            description=f"Global assets of {project.name}: read every processed shard from the store.",
            executor_def=job_executor(project),
            tags=max_runtime_tags(project.runs.global_max_runtime_seconds),
        )
        jobs.append(global_job)
        schedules.append(build_refresh_schedule(project, global_job))
    return dg.Definitions(
        assets=[*per_shard, *global_assets],
        jobs=jobs,
        sensors=[
            build_discovery_sensor(project, shard_job, partitions, global_job if global_assets else None)
        ],
        schedules=schedules,
    )


def build_per_shard_assets(
    project: ProjectConfig, partitions: dg.PartitionsDefinition
) -> list[dg.AssetsDefinition]:
    stages = project.stages
    assets = [
        build_inventory_asset(project, partitions),
        build_sanitize_asset(project, partitions),
        *build_embedding_assets(project, partitions),
    ]
    if stages.example_filters.enabled:
        assets.append(build_example_distances_asset(project, partitions))
    if stages.aesthetic.enabled:
        assets.append(build_aesthetic_asset(project, partitions))
    if stages.quality.enabled:
        assets.append(build_quality_asset(project, partitions))
    if stages.rotation.enabled:
        assets.append(build_rotation_asset(project, partitions))
    assets += build_labeled_shard_assets(project, partitions)
    return [asset.with_attributes(backfill_policy=SHARD_BACKFILL) for asset in assets]


def per_shard_asset_names(project: ProjectConfig) -> list[str]:
    """Names (without the project prefix) of the project's per-shard assets."""
    return [asset.key.path[-1] for asset in build_per_shard_assets(project, shard_partitions(project))]


def declared_stages(project: ProjectConfig) -> list[str]:
    """Stages switched on in the project file, built or not yet."""
    stages = project.stages
    on = ["sanitize"]
    on += [name for name in type(stages).model_fields if name != "sanitize" and getattr(stages, name).enabled]
    return on
