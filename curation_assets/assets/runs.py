"""Headless runs in a Dagster instance: what `curate materialize` and `curate demo` do.

The runs go through the same jobs the UI launches (one shard-job run per shard, then the
global job), into the persistent instance under $DAGSTER_HOME, so `dagster dev` shows them.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg
import polars as pl

from curation_assets.assets.discovery import partitions_name, pending_shards, recorded_fingerprint
from curation_assets.assets.embeddings import embedding_models, input_signature
from curation_assets.assets.exact_duplicates import EXACT
from curation_assets.assets.near_dedup import GROUPS
from curation_assets.assets.project import global_job_name, per_shard_asset_names, shard_job_name
from curation_assets.assets.sanitize import SANITIZED
from curation_assets.config import ProjectConfig, curation_home
from curation_assets.core.funnel import Funnel, build_funnel
from curation_assets.resources.store import ProjectStore, StoreResource

INSTANCE_TEMPLATE = Path(__file__).resolve().parent.parent / "instance" / "dagster.yaml"
GPU_POOL = "gpu"
# Headless runs print INFO and above (progress with rates); Dagster's step events are DEBUG.
QUIET_CONSOLE = {"loggers": {"console": {"config": {"log_level": "INFO"}}}}


def dagster_home() -> Path:
    """$DAGSTER_HOME, defaulting to ${CURATION_HOME}/dagster_home (and exported for Dagster)."""
    home = Path(os.environ.get("DAGSTER_HOME") or curation_home() / "dagster_home").resolve()
    os.environ["DAGSTER_HOME"] = str(home)
    return home


def init_instance() -> dg.DagsterInstance:
    """The persistent instance, created with our dagster.yaml when there is none yet."""
    home = dagster_home()
    home.mkdir(parents=True, exist_ok=True)
    config = home / "dagster.yaml"
    if not config.exists():
        config.write_text(INSTANCE_TEMPLATE.read_text())
    instance = dg.DagsterInstance.get()
    if instance.event_log_storage.supports_global_concurrency_limits:
        instance.event_log_storage.set_concurrency_slots(GPU_POOL, 1)
    return instance


@dataclass
class RunSummary:
    shards_run: list[str] = field(default_factory=list)
    shards_skipped: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)  # run descriptions that failed
    seconds: float = 0.0


def shard_is_current(
    project: ProjectConfig, store: ProjectStore, key: str, fingerprint: str, assets: list[str]
) -> bool:
    """True when the shard's inventory matches its files, sanitize ran with today's rules and
    every per-shard asset has an output (each asset also skips unchanged work itself)."""
    if recorded_fingerprint(store, key) != fingerprint:
        return False
    if not all(store.shard_path(asset, key).is_file() for asset in assets):
        return False
    sanitized = store.shard_path(SANITIZED, key)
    if store.parquet_metadata(sanitized).get("rules") != project.stages.sanitize.model_dump(mode="json"):
        return False
    return all(
        store.parquet_metadata(store.shard_path(asset, key)).get("input_signature")
        == input_signature(sanitized, model_name, project.models[model_name])
        for asset, model_name in embedding_models(project).items()
    )


def materialize_project(
    project: ProjectConfig,
    defs: dg.Definitions,
    instance: dg.DagsterInstance,
    shards: list[str] | None = None,
    force: bool = False,
    run_global: bool = True,
    echo: Callable[[str], None] = print,
) -> RunSummary:
    """Discover shards, run the shard job for each stale (or named) shard, then the global job."""
    start = time.perf_counter()
    store = StoreResource().for_project(project)
    pending = pending_shards(project, store, instance, persist_new_chunks=True)
    if pending.found.missing_roots:
        echo(f"warning: dataset roots not found: {', '.join(pending.found.missing_roots)}")
    known = {s.key: s for s in pending.found.shards}
    if pending.new:
        instance.add_dynamic_partitions(partitions_name(project), [s.key for s in pending.new])
    wanted = shards if shards is not None else sorted(known)
    unknown = sorted(set(wanted) - set(known))
    if unknown:
        raise ValueError(f"unknown shard(s) {unknown}; found: {sorted(known)}")
    summary = RunSummary()
    shard_job = defs.resolve_job_def(shard_job_name(project))
    follow = project.dataset.follow_symlinks
    assets = per_shard_asset_names(project)
    for index, key in enumerate(wanted, start=1):
        if not force and shard_is_current(project, store, key, known[key].fingerprint(follow), assets):
            summary.shards_skipped.append(key)
            continue
        echo(f"[{index}/{len(wanted)}] shard {key}")
        result = shard_job.execute_in_process(
            partition_key=key,
            instance=instance,
            raise_on_error=False,
            tags={"curation/trigger": "cli"},
            run_config=QUIET_CONSOLE,
        )
        summary.shards_run.append(key)
        if not result.success:
            summary.failed.append(f"shard {key} (run {result.run_id})")
    if summary.shards_skipped:
        echo(f"{len(summary.shards_skipped)} shard(s) already up to date (use --force to redo them)")
    if run_global and global_job_name(project) in {job.name for job in defs.resolve_all_job_defs()}:
        echo("global assets")
        result = defs.resolve_job_def(global_job_name(project)).execute_in_process(
            instance=instance,
            raise_on_error=False,
            tags={"curation/trigger": "cli"},
            run_config=QUIET_CONSOLE,
        )
        if not result.success:
            summary.failed.append(f"global job (run {result.run_id})")
    summary.seconds = time.perf_counter() - start
    return summary


def project_funnel(project: ProjectConfig, store: ProjectStore | None = None) -> Funnel | None:
    """The funnel from what is in the store (None before the first sanitize run)."""
    store = store or StoreResource().for_project(project)
    scan = store.scan_shards(SANITIZED)
    if scan is None:
        return None
    exact_path = store.global_path(EXACT, f"{EXACT}.parquet")
    exact = pl.read_parquet(exact_path) if exact_path.is_file() else None
    near_path = store.global_path(GROUPS, f"{GROUPS}.parquet")
    near = pl.read_parquet(near_path) if project.stages.near_dedup.enabled and near_path.is_file() else None
    return build_funnel(scan.collect(), exact, near)
