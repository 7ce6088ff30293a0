"""Headless runs in a Dagster instance: what `curate materialize` and `curate demo` do.

The runs go through the same jobs the UI launches (one shard-job run per shard, then the
global job), into the persistent instance under $DAGSTER_HOME, so `dagster dev` shows them.
How a run executes is the caller's :class:`~curation_assets.launch.Runs`: launched on
the instance as the UI does (`curate`'s default), or in this process (a ``dg.Definitions``
given instead of a ``Runs`` runs in process: tests, a debugger).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg

from curation_assets.assets.ingest.discovery import (
    partitions_name,
    pending_shards,
    recorded_fingerprint,
    retire_removed_shards,
)
from curation_assets.assets.keys import EXACT, GROUPS, SANITIZED
from curation_assets.assets.project import (
    build_project_definitions,
    global_job_name,
    per_shard_asset_names,
    shard_job_name,
)
from curation_assets.assets.signatures import SIGNATURE
from curation_assets.assets.stages import enabled_stages
from curation_assets.config import ProjectConfig, curation_home
from curation_assets.core.outputs.funnel import Funnel, build_funnel
from curation_assets.launch import InProcessRuns, RunOutcome, Runs
from curation_assets.resources.store import ProjectStore, StoreResource

INSTANCE_TEMPLATE = Path(__file__).resolve().parent / "instance" / "dagster.yaml"
GPU_POOL = "gpu"
# Headless runs print INFO and above (progress with rates); Dagster's step events are DEBUG.
QUIET_CONSOLE = {"loggers": {"console": {"config": {"log_level": "INFO"}}}}
CLI_TAGS = {"curation/trigger": "cli"}


def dagster_home() -> Path:
    """$DAGSTER_HOME, defaulting to ${CURATION_HOME}/dagster_home (and exported for Dagster)."""
    home = Path(os.environ.get("DAGSTER_HOME") or curation_home() / "dagster_home").resolve()
    os.environ["DAGSTER_HOME"] = str(home)
    return home


POSTGRES_ENV = "CURATION_POSTGRES_URL"  # the instance's database, as `curate init-instance --postgres`


def init_instance(postgres_url: str | None = None) -> dg.DagsterInstance:
    """The persistent instance, created with our dagster.yaml when there is none yet.

    With ``postgres_url`` (or $CURATION_POSTGRES_URL) its run, event-log and schedule storage
    are that Postgres database (dagster-postgres), checked to answer first; the run queue and
    the concurrency pools are the template's either way.
    """
    home = dagster_home()
    home.mkdir(parents=True, exist_ok=True)
    config = home / "dagster.yaml"
    url = postgres_url or os.environ.get(POSTGRES_ENV)
    if not config.exists():
        config.write_text(INSTANCE_TEMPLATE.read_text())
    if url:
        use_postgres(config, url)
    try:
        instance = dg.DagsterInstance.get()
    except Exception as exc:  # psycopg2 / sqlalchemy errors: say which database, not a stack of frames
        if url:
            raise RuntimeError(f"cannot open the Dagster instance on {redacted(url)}: {exc}") from exc
        raise
    if instance.event_log_storage.supports_global_concurrency_limits:
        instance.event_log_storage.set_concurrency_slots(GPU_POOL, 1)
    return instance


def redacted(url: str) -> str:
    """A database or broker URL without its password (it goes into messages and logs)."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return parts._replace(netloc=netloc).geturl()


def use_postgres(config: Path, url: str, timeout_s: int = 5) -> None:
    """Point the instance config at ``url`` after checking the database answers (a clear error
    naming it, in seconds, rather than a hang or a stack trace at the first run)."""
    try:
        import psycopg2
    except ImportError as exc:
        raise RuntimeError(
            "an instance on Postgres needs dagster-postgres: pip install -e '.[cluster]'"
        ) from exc
    try:
        psycopg2.connect(url, connect_timeout=timeout_s).close()
    except psycopg2.Error as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RuntimeError(
            f"cannot reach Postgres at {redacted(url)}: {detail}. Start it (`make services` runs one "
            f"locally) or fix the URL (curate init-instance --postgres URL, or ${POSTGRES_ENV})"
        ) from exc
    import yaml

    current = yaml.safe_load(config.read_text()) or {}
    # dagster-postgres speaks psycopg2 (its LISTEN/NOTIFY queries), while SQLAlchemy >= 2.1 takes
    # a plain postgresql:// URL to mean psycopg 3: name the driver
    scheme, sep, rest = url.partition("://")
    driver_url = f"postgresql+psycopg2://{rest}" if sep and scheme in ("postgres", "postgresql") else url
    wanted = {"postgres": {"postgres_url": driver_url}}
    if current.get("storage") == wanted:
        return
    if "storage" not in current:  # keep the template's comments: the block goes at the end
        config.write_text(config.read_text().rstrip() + "\n" + yaml.safe_dump({"storage": wanted}))
        return
    config.with_name("dagster.yaml.bak").write_text(config.read_text())
    config.write_text(yaml.safe_dump({**current, "storage": wanted}, sort_keys=False))


@dataclass
class RunSummary:
    shards_run: list[str] = field(default_factory=list)
    shards_skipped: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)  # run descriptions that failed
    seconds: float = 0.0

    def record(self, what: str, outcome: RunOutcome, echo: Callable[[str], None]) -> None:
        """Note a failed run, and say why at once (the run goes on to the next shard)."""
        if not outcome.success:
            self.failed.append(f"{what} (run {outcome.run_id})")
            echo(f"  FAILED {what}: {outcome.message}")


def shard_is_current(
    project: ProjectConfig, store: ProjectStore, key: str, fingerprint: str, assets: list[str]
) -> bool:
    """True when the shard's inventory matches its files and every per-shard asset has an output
    whose recorded input signature is today's (each asset also skips unchanged work itself)."""
    if recorded_fingerprint(store, key) != fingerprint:
        return False
    if not all(store.shard_path(asset, key).is_file() for asset in assets):
        return False
    return all(
        store.parquet_metadata(store.shard_path(asset, key)).get(SIGNATURE) == signature
        for asset, signature in shard_signatures(project, store, key).items()
    )


def shard_signatures(project: ProjectConfig, store: ProjectStore, key: str) -> dict[str, str]:
    """Per-shard asset -> the input signature today's inputs give (what a current output recorded).

    Computed in registry order: an asset's signature may read the recorded signature of its
    input (example distances read the semantic vectors'), which is current once that input is.
    """
    return {
        stage.name: stage.signature(project, store, key)
        for stage in enabled_stages(project, "shard")
        if stage.signature is not None
    }


def as_runs(runs: Runs | dg.Definitions, instance: dg.DagsterInstance) -> Runs:
    """``runs`` itself, or in-process runs of a ``dg.Definitions``."""
    return InProcessRuns(runs, instance) if isinstance(runs, dg.Definitions) else runs


def materialize_project(
    project: ProjectConfig,
    runs: Runs | dg.Definitions,
    instance: dg.DagsterInstance,
    shards: list[str] | None = None,
    force: bool = False,
    run_global: bool = True,
    echo: Callable[[str], None] = print,
) -> RunSummary:
    """Discover shards, run the shard job for each stale (or named) shard, then the global job."""
    start = time.perf_counter()
    runs = as_runs(runs, instance)
    store = StoreResource().for_project(project)
    pending = pending_shards(project, store, instance, persist_new_chunks=True)
    if pending.found.missing_roots:
        echo(f"warning: dataset roots not found: {', '.join(pending.found.missing_roots)}")
    retire_removed_shards(project, store, pending, instance, echo)  # shards gone from the pool
    known = {s.key: s for s in pending.found.shards}
    if pending.new:
        instance.add_dynamic_partitions(partitions_name(project), [s.key for s in pending.new])
    wanted = shards if shards is not None else sorted(known)
    unknown = sorted(set(wanted) - set(known))
    if unknown:
        raise ValueError(f"unknown shard(s) {unknown}; found: {sorted(known)}")
    summary = RunSummary()
    follow = project.dataset.follow_symlinks
    assets = per_shard_asset_names(project)
    for index, key in enumerate(wanted, start=1):
        if not force and shard_is_current(project, store, key, known[key].fingerprint(follow), assets):
            summary.shards_skipped.append(key)
            continue
        echo(f"[{index}/{len(wanted)}] shard {key}")
        outcome = _run(runs, shard_job_name(project), partition_key=key)
        summary.record(f"shard {key}", outcome, echo)
        summary.shards_run.append(key)
    if summary.shards_skipped:
        echo(f"{len(summary.shards_skipped)} shard(s) already up to date (use --force to redo them)")
    if run_global:  # every project has a global job: curation_decisions is global
        echo("global assets")
        summary.record("global job", _run(runs, global_job_name(project)), echo)
    summary.seconds = time.perf_counter() - start
    return summary


def _run(runs: Runs, job_name: str, **kwargs) -> RunOutcome:
    return runs.run(job_name, tags=CLI_TAGS, run_config=QUIET_CONSOLE, **kwargs)


def project_funnel(project: ProjectConfig, store: ProjectStore | None = None) -> Funnel | None:
    """The funnel from what is in the store (None before the first sanitize run)."""
    store = store or StoreResource().for_project(project)
    scan = store.scan_shards(SANITIZED)
    if scan is None:
        return None
    exact_path = store.global_path(EXACT, f"{EXACT}.parquet")
    exact = store.read_parquet(exact_path) if exact_path.is_file() else None
    near_path = store.global_path(GROUPS, f"{GROUPS}.parquet")
    near_on = project.stages.near_dedup.enabled and near_path.is_file()
    near = store.read_parquet(near_path) if near_on else None
    return build_funnel(scan.collect(), exact, near)


def materialize_selection(
    project: ProjectConfig,
    runs: Runs | dg.Definitions,
    instance: dg.DagsterInstance,
    names: list[str],
    echo: Callable[[str], None] = print,
) -> RunSummary:
    """Materialize only the named assets (without the project prefix): per-shard ones for every
    known shard (a shard-job run each), then global ones (one global-job run)."""
    start = time.perf_counter()
    runs = as_runs(runs, instance)
    defs = build_project_definitions(project)
    known = {key.path[-1] for asset in defs.assets or [] for key in asset.keys}
    unknown = sorted(set(names) - known)
    if unknown:
        raise ValueError(f"unknown asset(s) {unknown} in project {project.name}; known: {sorted(known)}")
    per_shard_names = set(per_shard_asset_names(project))
    per_shard = [n for n in names if n in per_shard_names]
    global_names = [n for n in names if n not in per_shard_names]
    summary = RunSummary()

    def keys(selected: list[str]) -> list[dg.AssetKey]:
        return [dg.AssetKey([project.name, n]) for n in selected]

    if per_shard:
        shards = sorted(instance.get_dynamic_partitions(partitions_name(project)))
        for index, key in enumerate(shards, start=1):
            echo(f"[{index}/{len(shards)}] {', '.join(per_shard)} for shard {key}")
            outcome = _run(runs, shard_job_name(project), partition_key=key, asset_keys=keys(per_shard))
            summary.record(f"shard {key}", outcome, echo)
            summary.shards_run.append(key)
    if global_names:
        echo(", ".join(global_names))
        outcome = _run(runs, global_job_name(project), asset_keys=keys(global_names))
        summary.record(", ".join(global_names), outcome, echo)
    summary.seconds = time.perf_counter() - start
    return summary


def run_job(
    defs: dg.Definitions, instance: dg.DagsterInstance, job_name: str, run_config: dict | None = None
) -> RunOutcome:
    """Run one of the project's op jobs (apply, restore) in this process, in the persistent instance.

    In process on purpose: `curate apply --backup-root` changes the project for this run only,
    which a run launched from the code location would not see.
    """
    config = {**QUIET_CONSOLE, **(run_config or {})}
    return InProcessRuns(defs, instance).run(job_name, tags=CLI_TAGS, run_config=config)


def curation_summary(project: ProjectConfig, store: ProjectStore | None = None) -> str | None:
    """The decisions' funnel as text plus where the report and the export are (None before decisions)."""
    from curation_assets.assets.outputs.decisions import decisions_path
    from curation_assets.assets.outputs.export import export_root
    from curation_assets.assets.outputs.report import report_dir

    store = store or StoreResource().for_project(project)
    path = decisions_path(store)
    if not path.is_file():
        return None
    funnel = store.parquet_metadata(path).get("funnel") or []
    lines = [f"== {project.name}: curation funnel =="]
    for row in funnel:
        removed = f"-{row['removed']:,}" if row["removed"] else ""
        lines.append(f"  {row['step']:<26}{row['left']:>12,}  {removed}")
    lines.append("funnel: " + " -> ".join(f"{row['left']:,}" for row in funnel))
    lines.append(f"decisions: {path}")
    report = report_dir(store) / "report.html"
    if project.report.enabled and report.is_file():
        lines.append(f"report:    {report}")
    if project.export.enabled:
        lines.append(f"export:    {export_root(project, store)}")
    return "\n".join(lines)
