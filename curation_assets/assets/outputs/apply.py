"""The destructive jobs, kept apart from every materialization: `<p>_apply_curation`, `<p>_restore_curation`.

`apply_curation` needs run config ``confirm: true``. It moves every removed image of a
directory dataset into ``apply.backup_root`` (mirroring its path under the split root) and
rewrites fixed images in place, their originals backed up first. Every action is journaled
before it happens (``<backup_root>/<project>.journal.jsonl``), a backup file is never
overwritten, a backup root inside a dataset root is refused, and a re-run after a crash
finishes the journal. `restore_curation` reverses the journal exactly (bit-identical files).

Every apply is entered in ``<storage_root>/<project>/apply_journals/applies.json`` (backup
root, journal, time, counts, restored or not) and its journal path is in the run's metadata,
so restore needs no config: it reverses the latest unrestored apply, and lists the others
when there are several. Run config ``backup_root`` (``curate restore --backup-root``) picks one.
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
from curation_assets.assets.keys import APPLY_JOURNALS, DECISIONS
from curation_assets.assets.outputs.decisions import decisions_path
from curation_assets.assets.outputs.export import plan_from_decisions
from curation_assets.config import ProjectConfig
from curation_assets.core.outputs.apply import (
    ApplyRefused,
    apply_actions,
    journal_restored,
    plan_actions,
    read_registry,
    record_apply,
    record_restore,
    restore_journal,
    unrestored_applies,
)
from curation_assets.core.outputs.decisions import KEEP_WITH_FIX
from curation_assets.core.storage import is_remote
from curation_assets.resources.store import ProjectStore, StoreResource


class ApplyRunConfig(dg.Config):
    confirm: bool = False  # must be true: this job moves files out of the dataset


class RestoreRunConfig(dg.Config):
    # None: the latest apply not yet restored, found in the store's registry of applies
    backup_root: str | None = None


def apply_job_name(project: ProjectConfig) -> str:
    return f"{project.name}_apply_curation"


def restore_job_name(project: ProjectConfig) -> str:
    return f"{project.name}_restore_curation"


def journal_path(project: ProjectConfig, backup_root: str | None = None) -> Path | None:
    root = backup_root or project.apply.backup_root
    return Path(root).expanduser().resolve() / f"{project.name}.journal.jsonl" if root else None


def refuse_object_storage(
    project: ProjectConfig, what: str, storage_root: str | None, backup_root: str | None = None
) -> None:
    """Apply and restore move files on local disks only (renames that a journal can undo, under a
    file lock): refuse, naming the location, when any of their places is on object storage."""
    places = {
        **{f"dataset.roots.{split}": root for split, root in project.dataset.roots.items()},
        "storage_root": storage_root or project.storage_root,
        "apply.backup_root": backup_root or project.apply.backup_root,
    }
    remote = {key: value for key, value in places.items() if value and is_remote(value)}
    if remote:
        named = ", ".join(f"{key} = {value}" for key, value in remote.items())
        raise ApplyRefused(
            f"{what} works on local directories only (it renames files and journals every move); "
            f"{named} is on object storage. Materialize curated_dataset to export the curated subset "
            "instead, or run the project on local copies."
        )


def registry_path(store: ProjectStore) -> Path:
    return store.global_path(APPLY_JOURNALS, "applies.json")


def apply_plans(project: ProjectConfig, decisions: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(rows to move out, rows to fix in place) from the decisions and the apply settings."""
    removable = decisions.filter(~pl.col("reasons").list.contains("sanitize:not_an_image"))
    if not project.apply.include_not_sampled:
        removable = removable.filter(pl.col("stage") != "sampling")
    removed = plan_from_decisions(removable, keep=False)
    fixed = plan_from_decisions(decisions.filter(pl.col("action") == KEEP_WITH_FIX))
    return removed, fixed


def run_apply(
    project: ProjectConfig, store: StoreResource, confirm: bool, log, run_id: str | None = None
) -> dict:
    """Plan from the stored decisions, apply, and register the journal; returns the summary (plain values)."""
    refuse_object_storage(project, "apply", store.storage_root)
    if project.dataset.input_kind != "directory":
        raise ApplyRefused(
            f"project {project.name!r} reads WebDataset tar shards, which are never modified; "
            "materialize curated_dataset (export.layout: webdataset) to get the curated shards"
        )
    if not project.apply.backup_root:
        raise ApplyRefused(
            f"set apply.backup_root in the project file of {project.name!r} (outside the dataset)"
        )
    project_store = store.for_project(project)
    path = decisions_path(project_store)
    if not path.is_file():
        raise ApplyRefused("no curation_decisions yet: materialize the project first")
    removed, fixed = apply_plans(project, project_store.read_parquet(path))
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
    registry = registry_path(project_store)
    record_apply(registry, summary, run_id=run_id)
    log.info(f"apply journal {summary.journal} recorded in {registry}")
    return {**summary.as_metadata(), "registry": str(registry)}


def choose_journal(
    project: ProjectConfig, store: StoreResource, backup_root: str | None
) -> tuple[Path, list[str]]:
    """The journal a restore reverses, and lines that say why (listing every unrestored apply).

    An explicit backup root wins; else the latest unrestored apply of the registry; else, for
    applies made before the registry existed, the project file's backup root if its journal is
    not restored yet. Raises :class:`ApplyRefused` naming every place it looked.
    """
    registry = registry_path(store.for_project(project))
    if backup_root:
        journal = journal_path(project, backup_root)
        assert journal is not None
        return journal, [f"restoring the apply journal of backup root {backup_root}: {journal}"]
    records = read_registry(registry)
    pending = unrestored_applies(records)
    if pending:
        lines = []
        if len(pending) > 1:
            lines.append(f"{len(pending)} applies of {project.name!r} are not restored (latest first):")
            lines += [f"  {record.describe()}" for record in pending]
            lines.append("reversing the latest; pass its backup root to restore another one")
        lines.append(f"restoring the apply of {pending[0].applied_at}: journal {pending[0].journal}")
        return Path(pending[0].journal), lines
    legacy = journal_path(project)
    if legacy is not None and legacy.is_file() and not journal_restored(legacy):
        return legacy, [f"restoring the journal of the project's backup root (not in the registry): {legacy}"]
    looked = (
        f"no unrestored apply in {registry} ({len(records)} recorded, all restored)"
        if records
        else f"no apply recorded in {registry}"
    )
    if legacy is not None:
        looked += f", and no unrestored journal at {legacy}"
    raise ApplyRefused(f"nothing to restore for {project.name!r}: {looked}")


def run_restore(project: ProjectConfig, store: StoreResource, backup_root: str | None, log) -> dict:
    """Reverse the chosen apply journal and mark it restored in the registry."""
    refuse_object_storage(project, "restore", store.storage_root, backup_root)
    journal, why = choose_journal(project, store, backup_root)
    for line in why:
        log.info(line)
    if not journal.is_file():
        raise ApplyRefused(f"no apply journal for {project.name!r} at {journal}: nothing to restore")
    summary = restore_journal(journal, progress=RateLogger(log, "restore", unit="files"))
    for image_id, why_not in summary.conflicts[:20]:
        log.warning(f"{image_id}: not restored ({why_not}); left untouched")
    record_restore(registry_path(store.for_project(project)), summary)
    return {**summary.as_metadata(), "choice": "\n".join(why)}


def build_apply_jobs(project: ProjectConfig) -> list[dg.JobDefinition]:
    @dg.op(
        name=f"{project.name}_apply", description="Move removed files to the backup; fix kept ones in place."
    )
    def apply_op(context: dg.OpExecutionContext, config: ApplyRunConfig, store: StoreResource) -> None:
        try:
            summary = run_apply(project, store, config.confirm, context.log, run_id=context.run_id)
        except ApplyRefused as exc:
            raise dg.Failure(str(exc)) from None
        # shows on curation_decisions' page in the UI: when the decisions were applied, what it did,
        # and where its journal is (what restore reverses)
        context.log_event(
            dg.AssetObservation(
                asset_key=asset_key(project, DECISIONS),
                metadata={
                    "applied": dg.MetadataValue.json(summary),
                    "journal": dg.MetadataValue.path(summary["journal"]),
                    "apply_registry": dg.MetadataValue.path(summary["registry"]),
                },
            )
        )
        context.log.info(f"apply finished: {summary}")

    @dg.op(
        name=f"{project.name}_restore",
        description="Reverse the latest unrestored apply journal: originals back, bit-identical.",
    )
    def restore_op(context: dg.OpExecutionContext, config: RestoreRunConfig, store: StoreResource) -> None:
        try:
            summary = run_restore(project, store, config.backup_root, context.log)
        except ApplyRefused as exc:
            raise dg.Failure(str(exc)) from None
        choice = summary.pop("choice")
        context.log_event(
            dg.AssetObservation(
                asset_key=asset_key(project, DECISIONS),
                metadata={
                    "restored": dg.MetadataValue.json(summary),
                    "journal": dg.MetadataValue.path(summary["journal"]),
                    "restore_choice": dg.MetadataValue.text(choice),
                },
            )
        )
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

    @dg.job(
        name=restore_job_name(project),
        description=f"Undo {project.name}'s latest unrestored apply from its journal (no config needed).",
    )
    def restore_job() -> None:
        restore_op()

    return [apply_job, restore_job]
