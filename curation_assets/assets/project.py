"""One project's asset graph: per-shard assets, global assets, their jobs, sensor and schedule.

The assets are those of the registry's stages (assets/stages.py) that the project file
switches on: stages switched off are absent from the graph (ToL has no rotation, GLDv2 no
example filters); ``declared_stages`` lists what a project switches on.
"""

from __future__ import annotations

import os

import dagster as dg

from curation_assets.assets.common import shard_partitions
from curation_assets.assets.ingest.discovery import build_discovery_sensor, build_refresh_schedule
from curation_assets.assets.outputs.apply import build_apply_jobs
from curation_assets.assets.stages import build_stage_assets, enabled_stages
from curation_assets.config import ProjectConfig

CODE_LOCATION_MODULE = "curation_assets.definitions"  # what workspace.yaml and the run workers load


# A backfill launches one run per shard: each per-shard asset computes exactly the partition it
# is given, a failed shard is retried alone, and the run queue (max_concurrent_runs) decides how
# many shards run at once. A run's start costs about a second (README: "Running it at scale").
SHARD_BACKFILL = dg.BackfillPolicy.multi_run(max_partitions_per_run=1)
MAX_RUNTIME_TAG = "dagster/max_runtime"  # read by Dagster's run monitoring


EXECUTOR_ENV = "CURATION_EXECUTOR"  # overrides runs.executor of every project, without code edits
BROKER_ENV = "CURATION_CELERY_BROKER"
BACKEND_ENV = "CURATION_CELERY_BACKEND"
DEFAULT_BROKER = "redis://127.0.0.1:6379/0"


def executor_name(project: ProjectConfig) -> str:
    return os.environ.get(EXECUTOR_ENV) or project.runs.executor


def job_executor(project: ProjectConfig) -> dg.ExecutorDefinition:
    """The executor of the shard and global jobs (project file: runs.executor; $CURATION_EXECUTOR).

    in_process runs every step in the run process: one interpreter start per run instead of
    one per step. multiprocess forks each step from a forkserver that imported this code
    location once, so a step pays a fork, not an interpreter start and the imports. celery
    sends each step to celery workers (broker $CURATION_CELERY_BROKER); k8s runs each step in
    its own Kubernetes job (GPU steps ask for a GPU through their op tags, assets/common.py).
    Both need an instance every worker reaches (Postgres: `curate init-instance --postgres`)
    and a store every worker reaches (object storage).
    """
    name = executor_name(project)
    if name not in ("in_process", "multiprocess", "celery", "k8s"):
        raise ValueError(f"${EXECUTOR_ENV}={name!r}: use in_process, multiprocess, celery or k8s")
    if name == "in_process":
        return dg.in_process_executor
    if name == "celery":
        return _celery_executor()
    if name == "k8s":
        try:
            from dagster_k8s import k8s_job_executor
        except ImportError as exc:
            raise ImportError("runs.executor k8s needs dagster-k8s: pip install -e '.[cluster]'") from exc
        # every step's pod asks for this; GPU steps add a GPU through their op tags (GPU_STEP_TAGS)
        step = {"container_config": {"resources": {"requests": {"cpu": "2", "memory": "8Gi"}}}}
        return k8s_job_executor.configured({"step_k8s_config": step}, name="k8s")
    config: dict = {"start_method": {"forkserver": {"preload_modules": [CODE_LOCATION_MODULE]}}}
    if project.runs.max_concurrent_steps:
        config["max_concurrent"] = project.runs.max_concurrent_steps
    return dg.multiprocess_executor.configured(config, name="forkserver_multiprocess")


def _celery_executor() -> dg.ExecutorDefinition:
    try:
        from dagster_celery import celery_executor
    except ImportError as exc:
        raise ImportError("runs.executor celery needs dagster-celery: pip install -e '.[cluster]'") from exc
    return celery_executor.configured(celery_config(), name="celery")


def celery_config(broker: str | None = None) -> dict:
    """The celery executor's config; workers are started with the same (`dagster-celery worker
    start -y`), since acks and prefetch are settings of the consuming side."""
    broker = broker or os.environ.get(BROKER_ENV) or DEFAULT_BROKER
    return {
        "broker": broker,
        "backend": os.environ.get(BACKEND_ENV) or broker,
        # A step whose worker dies is handed to another worker (acks after the task, and a task
        # lost with its worker is re-queued) instead of waiting forever for a result; the run's
        # max runtime stays the last resort. One task per worker process at a time.
        "config_source": {
            "task_acks_late": True,
            "task_reject_on_worker_lost": True,
            "worker_prefetch_multiplier": 1,
            "broker_connection_retry_on_startup": False,
            "broker_connection_max_retries": 3,
        },
    }


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
    global_assets = build_stage_assets(project, "global", partitions)

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
    assets = build_stage_assets(project, "shard", partitions)
    return [asset.with_attributes(backfill_policy=SHARD_BACKFILL) for asset in assets]


def per_shard_asset_names(project: ProjectConfig) -> list[str]:
    """Names (without the project prefix) of the project's per-shard assets, in pipeline order."""
    return [stage.name for stage in enabled_stages(project, "shard")]


def declared_stages(project: ProjectConfig) -> list[str]:
    """Stages switched on in the project file, built or not yet."""
    stages = project.stages
    on = ["sanitize"]
    on += [name for name in type(stages).model_fields if name != "sanitize" and getattr(stages, name).enabled]
    return on
