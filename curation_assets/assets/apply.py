"""The destructive jobs, kept apart from every materialization: `<p>_apply_curation`, `<p>_restore_curation`.

`apply_curation` needs run config ``confirm: true``. It moves every removed image of a
directory dataset into ``apply.backup_root`` (mirroring its path under the split root) and
rewrites fixed images in place, their originals backed up first. Every action is journaled
before it happens (``<backup_root>/<project>.journal.jsonl``), a backup file is never
overwritten, a backup root inside a dataset root is refused, and a re-run after a crash
finishes the journal. `restore_curation` reverses the journal exactly (bit-identical files).
WebDataset sources are never modified: the job says so and points to `curated_dataset`.

Files that are not images (a README, a labels CSV) stay where they are: they are not part of
the image pool, and moving a project's metadata out of its tree would surprise its owner.
Images dropped only because sampling did not pick them stay too unless
``apply.include_not_sampled`` is true.
"""

from pathlib import Path

import dagster as dg
import polars as pl

from curation_assets.assets.common import RateLogger, asset_key
from curation_assets.assets.decisions import DECISIONS, decisions_path
from curation_assets.assets.export import plan_from_decisions
from curation_assets.config import ProjectConfig
from curation_assets.core.apply import ApplyRefused, apply_actions, plan_actions, restore_journal
from curation_assets.core.decisions import KEEP_WITH_FIX
from curation_assets.resources.store import StoreResource


class ApplyRunConfig(dg.Config):
    confirm: bool = False  # must be true: this job moves files out of the dataset


def apply_job_name(project: ProjectConfig) -> str:
    return f"{project.name}_apply_curation"


def restore_job_name(project: ProjectConfig) -> str:
    return f"{project.name}_restore_curation"


def journal_path(project: ProjectConfig) -> Path | None:
    root = project.apply.backup_root
    return Path(root) / f"{project.name}.journal.jsonl" if root else None


def apply_plans(project: ProjectConfig, decisions: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(rows to move out, rows to fix in place) from the decisions and the apply settings."""
    removable = decisions.filter(~pl.col("reasons").list.contains("sanitize:not_an_image"))
    if not project.apply.include_not_sampled:
        removable = removable.filter(pl.col("stage") != "sampling")
    removed = plan_from_decisions(removable, keep=False)
    fixed = plan_from_decisions(decisions.filter(pl.col("action") == KEEP_WITH_FIX))
    return removed, fixed


def run_apply(project: ProjectConfig, store: StoreResource, confirm: bool, log) -> dict:
    """Plan from the stored decisions and apply; returns the summary as plain numbers."""
    if project.dataset.input_kind != "directory":
        raise ApplyRefused(
            f"project {project.name!r} reads WebDataset tar shards, which are never modified; "
            "materialize curated_dataset (export.layout: webdataset) to get the curated shards"
        )
    if not project.apply.backup_root:
        raise ApplyRefused(
            f"set apply.backup_root in the project file of {project.name!r} (outside the dataset)"
        )
    path = decisions_path(store.for_project(project))
    if not path.is_file():
        raise ApplyRefused("no curation_decisions yet: materialize the project first")
    removed, fixed = apply_plans(project, pl.read_parquet(path))
    roots = {split: Path(root) for split, root in project.dataset.roots.items()}
    actions = plan_actions(removed, fixed, roots)
    log.info(f"apply: {removed.height} file(s) to move out, {fixed.height} to fix in place")
    summary = apply_actions(
        actions,
        roots=roots,
        backup_root=Path(project.apply.backup_root),
        journal_path=journal_path(project),
        confirm=confirm,
        input_kind=project.dataset.input_kind,
        jpeg_quality=project.export.jpeg_quality,
        progress=RateLogger(log, "apply", unit="files"),
    )
    for image_id, why in summary.failed[:20]:
        log.warning(f"{image_id}: not applied ({why}); nothing was lost")
    return summary.as_metadata()


def run_restore(project: ProjectConfig, log) -> dict:
    journal = journal_path(project)
    if journal is None or not journal.is_file():
        raise ApplyRefused(f"no apply journal for {project.name!r} at {journal}: nothing to restore")
    summary = restore_journal(journal, progress=RateLogger(log, "restore", unit="files"))
    for image_id, why in summary.conflicts[:20]:
        log.warning(f"{image_id}: not restored ({why}); left untouched")
    return summary.as_metadata()


def build_apply_jobs(project: ProjectConfig) -> list[dg.JobDefinition]:
    @dg.op(
        name=f"{project.name}_apply", description="Move removed files to the backup; fix kept ones in place."
    )
    def apply_op(context: dg.OpExecutionContext, config: ApplyRunConfig, store: StoreResource) -> None:
        try:
            summary = run_apply(project, store, config.confirm, context.log)
        except ApplyRefused as exc:
            raise dg.Failure(str(exc)) from None
        # shows on curation_decisions' page in the UI: when the decisions were applied, and what it did
        context.log_event(
            dg.AssetObservation(
                asset_key=asset_key(project, DECISIONS), metadata={"applied": dg.MetadataValue.json(summary)}
            )
        )
        context.log.info(f"apply finished: {summary}")

    @dg.op(
        name=f"{project.name}_restore",
        description="Reverse the apply journal: originals back, bit-identical.",
    )
    def restore_op(context: dg.OpExecutionContext) -> None:
        try:
            summary = run_restore(project, context.log)
        except ApplyRefused as exc:
            raise dg.Failure(str(exc)) from None
        context.log.info(f"restore finished: {summary}")

    @dg.job(
        name=apply_job_name(project),
        description=(
            f"DESTRUCTIVE: apply {project.name}'s curation decisions to the dataset (needs run config "
            "ops.<apply op>.config.confirm: true); every action journaled and backed up; undo with restore."
        ),
        tags={"curation/destructive": "true"},
    )
    def apply_job() -> None:
        apply_op()

    @dg.job(name=restore_job_name(project), description=f"Undo {project.name}'s apply job from its journal.")
    def restore_job() -> None:
        restore_op()

    return [apply_job, restore_job]
