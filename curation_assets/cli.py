"""`curate`: headless use of the same assets and jobs the Dagster UI runs.

curate demo                      generate the demo data if missing, materialize it, print the funnel
curate demo-data --out DIR       generate a demo dataset (images, examples, ground truth)
curate demo-labeled              generate the labeled demo (train/test, planted leaks), materialize it
curate materialize --project P   run every stale shard of P, then its global assets (launched
                                 on the instance as the UI does; --in-process: in this process)
                 [--select A ...]  only these assets (every shard for per-shard ones)
curate apply --project P --confirm   DESTRUCTIVE: move removed files to the backup, fix in place
curate restore --project P       undo the latest unrestored apply (bit-identical files back)
curate report --project P        refresh the decisions and the HTML report, print where it is
curate validate [FILE ...]       validate project files (default: all known projects)
curate shards --project P        list the shards discovery finds
curate funnel --project P        print the funnel from what is in the store
curate init-instance [--postgres URL]  create $DAGSTER_HOME with our dagster.yaml (storage on Postgres)
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import yaml

from curation_assets.config import (
    ProjectConfigError,
    curation_home,
    find_project,
    load_project,
    load_projects,
)

DEMO_PROJECT = "demo"
IN_PROCESS_HELP = (
    "run the jobs in this process instead of launching them on the instance as the UI does "
    "(for a debugger; the runs still appear in the Dagster UI)"
)
LABELED_DEMO_PROJECT = "labeled_demo"


def _print(text: str) -> None:
    print(text, flush=True)


def cmd_demo_data(args: argparse.Namespace) -> int:
    from curation_assets.demo.pool import generate_demo

    out = Path(args.out).expanduser().resolve() if args.out else curation_home() / "demo"
    start = time.perf_counter()
    summary = generate_demo(
        out,
        n_images=args.images,
        n_shards=args.shards,
        seed=args.seed,
        layout=args.layout,
        progress=_progress_printer("generating"),
    )
    _print(f"demo data in {summary.out_dir} ({summary.n_files} files, {time.perf_counter() - start:.1f} s)")
    for kind, count in sorted(summary.counts.items()):
        _print(f"  {kind:<16}{count:>6}")
    return 0


def _progress_printer(what: str):
    last = [0.0]

    def progress(done: int, total: int) -> None:
        now = time.perf_counter()
        if now - last[0] > 2 or done == total:
            last[0] = now
            _print(f"  {what}: {done}/{total}")

    return progress


def cmd_demo(args: argparse.Namespace) -> int:
    from curation_assets.demo.pool import generate_demo

    project = find_project(DEMO_PROJECT)
    images_root = Path(project.dataset.roots["train"])
    start = time.perf_counter()
    summary = generate_demo(
        images_root.parent,
        n_images=args.images,
        n_shards=args.shards,
        seed=args.seed,
        progress=_progress_printer("generating demo data"),
    )
    _print(f"demo data: {summary.n_files} files in {summary.images_root}")
    return _materialize(project, shards=None, force=args.force, started=start, in_process=args.in_process)


def cmd_demo_labeled(args: argparse.Namespace) -> int:
    from curation_assets.demo.labeled import generate_labeled_demo

    project = find_project(LABELED_DEMO_PROJECT)
    # roots are <root>/images/train and <root>/images/test: the generator writes under <root>
    root = Path(project.dataset.roots["train"]).parent.parent
    start = time.perf_counter()
    demo = generate_labeled_demo(
        root,
        n_classes=args.classes,
        per_class=args.per_class,
        test_per_class=args.test_per_class,
        leaks_per_kind=args.leaks_per_kind,
        seed=args.seed,
    )
    counts = ", ".join(f"{kind} {count}" for kind, count in demo.counts.items())
    _print(f"labeled demo: {len(demo.classes)} classes in {demo.images_root} ({counts})")
    code = _materialize(project, shards=None, force=args.force, started=start, in_process=args.in_process)
    review = project.project_storage / "review_manifest" / "review.html"
    if review.is_file():
        _print(f"review page: {review}")
        _print(f"save its exported decisions as {project.review.decisions_csv} and run this again")
    return code


def cmd_materialize(args: argparse.Namespace) -> int:
    project = _project(args.project)
    if args.select:
        return _select(project, args.select, args.in_process)
    return _materialize(
        project,
        shards=args.shard or None,
        force=args.force,
        run_global=not args.skip_global,
        in_process=args.in_process,
    )


def _project(name: str):
    return load_project(name) if name.endswith((".yaml", ".yml")) else find_project(name)


def _print_summary(project) -> None:
    from curation_assets.core.outputs.funnel import format_funnel
    from curation_assets.runner import curation_summary, project_funnel

    funnel = project_funnel(project)
    if funnel is not None:
        _print("")
        _print(format_funnel(funnel, title=f"== {project.name}: sanitize and duplicates =="))
    summary = curation_summary(project)
    if summary:
        _print("")
        _print(summary)


@contextlib.contextmanager
def _runs(project, in_process: bool):
    """The instance and how runs execute: launched as the UI launches them (default), or in process."""
    from curation_assets.definitions import build_definitions
    from curation_assets.launch import InProcessRuns, LaunchedRuns, code_location, serve_project
    from curation_assets.runner import init_instance

    instance = init_instance()
    if in_process:
        yield instance, InProcessRuns(build_definitions([project]), instance)
        return
    serve_project(project)
    with code_location(instance) as workspace:
        yield instance, LaunchedRuns(instance, workspace)


def _select(project, names: list[str], in_process: bool = False) -> int:
    from curation_assets.runner import materialize_selection

    started = time.perf_counter()
    with _runs(project, in_process) as (instance, runs):
        try:
            summary = materialize_selection(project, runs, instance, names, echo=_print)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    _print_summary(project)
    _print(f"\n{time.perf_counter() - started:.1f} s")
    if summary.failed:
        _print("FAILED: " + "; ".join(summary.failed))
        return 1
    return 0


def _materialize(
    project, shards, force, run_global=True, started: float | None = None, in_process: bool = False
) -> int:
    from curation_assets.runner import materialize_project

    started = started or time.perf_counter()
    with _runs(project, in_process) as (instance, runs):
        summary = materialize_project(
            project, runs, instance, shards=shards, force=force, run_global=run_global, echo=_print
        )
    _print_summary(project)
    _print(
        f"\n{len(summary.shards_run)} shard run(s), {time.perf_counter() - started:.1f} s; "
        f"outputs in {project.project_storage}; Dagster instance in {instance.root_directory}"
    )
    _print("open the Dagster UI on these runs with: make ui")
    if summary.failed:
        _print("FAILED: " + "; ".join(summary.failed))
        return 1
    return 0


def _with_backup_root(project, backup_root: str | None):
    """The project with ``--backup-root`` in place of its file's (apply records it; no repeat on restore)."""
    if not backup_root:
        return project
    root = str(Path(backup_root).expanduser().resolve())
    return project.model_copy(update={"apply": project.apply.model_copy(update={"backup_root": root})})


def _run_destructive(project, job: str, run_config: dict | None) -> int:
    import dagster as dg

    from curation_assets.definitions import build_definitions
    from curation_assets.runner import init_instance, run_job

    started = time.perf_counter()
    instance = init_instance()
    result = run_job(build_definitions([project]), instance, job, run_config)
    if not result.success:
        print(f"error: {result.message}", file=sys.stderr)
        return 1
    # The run logs quietly (QUIET_CONSOLE); what a user must see is in its observation's metadata.
    observations = instance.get_records_for_run(result.run_id, of_type=dg.DagsterEventType.ASSET_OBSERVATION)
    for record in observations.records:
        event = record.event_log_entry.dagster_event
        metadata = event.event_specific_data.asset_observation.metadata
        if (choice := metadata.get("restore_choice")) is not None:
            _print(choice.value)
        for what in ("applied", "restored"):
            if (counts := metadata.get(what)) is not None:
                _print(f"{what}: " + ", ".join(f"{k} {v}" for k, v in counts.value.items()))
    _print(f"{job} finished in {time.perf_counter() - started:.1f} s (run {result.run_id})")
    return 0


def cmd_apply(args: argparse.Namespace) -> int:
    from curation_assets.assets.outputs.apply import apply_job_name

    project = _with_backup_root(_project(args.project), args.backup_root)
    if not args.confirm:
        print(
            "error: apply moves files out of the dataset (into the backup root) and rewrites fixed ones; "
            "add --confirm to run it (restore undoes it)",
            file=sys.stderr,
        )
        return 2
    op = f"{project.name}_apply"
    return _run_destructive(project, apply_job_name(project), {"ops": {op: {"config": {"confirm": True}}}})


def cmd_restore(args: argparse.Namespace) -> int:
    from curation_assets.assets.outputs.apply import restore_job_name

    # --backup-root goes to the job as run config (an explicit choice); without it the job
    # finds the latest unrestored apply in the store's registry.
    project = _project(args.project)
    config = None
    if args.backup_root:
        root = str(Path(args.backup_root).expanduser().resolve())
        config = {"ops": {f"{project.name}_restore": {"config": {"backup_root": root}}}}
    return _run_destructive(project, restore_job_name(project), config)


def cmd_report(args: argparse.Namespace) -> int:
    from curation_assets.assets.keys import DECISIONS, REPORT

    project = _project(args.project)
    if not project.report.enabled:
        print(f"error: report.enabled is false in {project.name}'s project file", file=sys.stderr)
        return 2
    return _select(project, [DECISIONS, REPORT], args.in_process)


def cmd_validate(args: argparse.Namespace) -> int:
    projects = [load_project(f) for f in args.files] if args.files else load_projects()
    for project in projects:
        _print(f"ok: {project.name} ({project.source})")
        if args.show:
            _print(yaml.safe_dump(project.model_dump(mode="json", exclude={"source"}), sort_keys=False))
    return 0


def cmd_shards(args: argparse.Namespace) -> int:
    from curation_assets.assets.ingest.discovery import load_chunk_manifests
    from curation_assets.core.ingest.shards import discover_shards
    from curation_assets.resources.store import StoreResource

    project = find_project(args.project)
    found = discover_shards(project.dataset, load_chunk_manifests(StoreResource().for_project(project)))
    for root in found.missing_roots:
        _print(f"missing root: {root}")
    for shard in found.shards:
        _print(f"{shard.key}\t{shard.kind}\t{shard.location}")
    return 0


def cmd_funnel(args: argparse.Namespace) -> int:
    from curation_assets.runner import curation_summary, project_funnel

    project = _project(args.project)
    if project_funnel(project) is None and curation_summary(project) is None:
        _print("nothing materialized yet")
        return 1
    _print_summary(project)
    return 0


def cmd_init_instance(args: argparse.Namespace) -> int:
    from curation_assets.runner import init_instance, redacted

    try:
        instance = init_instance(args.postgres)
    except RuntimeError as exc:
        _print(f"error: {exc}")
        return 2
    where = f"; storage on Postgres {redacted(args.postgres)}" if args.postgres else ""
    _print(f"Dagster instance: {instance.root_directory}{where}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="curate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="generate the demo data if missing and materialize everything")
    demo.add_argument("--images", type=int, default=3000)
    demo.add_argument("--shards", type=int, default=4)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--force", action="store_true", help="re-run shards that are up to date")
    demo.add_argument("--in-process", action="store_true", help=IN_PROCESS_HELP)
    demo.set_defaults(func=cmd_demo)

    labeled = sub.add_parser(
        "demo-labeled",
        help="generate the labeled demo (train/test with planted leaks) and materialize it",
        description="The class subsets of projects/labeled_demo.yaml fit the default sizes; smaller demos "
        "may be too small for them (class_subsets then fails and says which subset).",
    )
    labeled.add_argument("--classes", type=int, default=6)
    labeled.add_argument("--per-class", type=int, default=16, help="train images per class")
    labeled.add_argument("--test-per-class", type=int, default=5, help="unique test images per class")
    labeled.add_argument("--leaks-per-kind", type=int, default=3, help="planted leaks of each kind")
    labeled.add_argument("--seed", type=int, default=0)
    labeled.add_argument("--force", action="store_true", help="re-run shards that are up to date")
    labeled.add_argument("--in-process", action="store_true", help=IN_PROCESS_HELP)
    labeled.set_defaults(func=cmd_demo_labeled)

    data = sub.add_parser("demo-data", help="generate a demo dataset")
    data.add_argument("--out", help="output folder (default: ${CURATION_HOME}/demo)")
    data.add_argument("--images", type=int, default=2000)
    data.add_argument("--shards", type=int, default=4)
    data.add_argument("--seed", type=int, default=0)
    data.add_argument("--layout", choices=["directory", "webdataset"], default="directory")
    data.set_defaults(func=cmd_demo_data)

    mat = sub.add_parser("materialize", help="materialize a project's assets headless")
    mat.add_argument("--project", required=True, help="project name or project file")
    mat.add_argument("--shard", action="append", help="only this shard (repeatable)")
    mat.add_argument("--force", action="store_true", help="re-run shards that are up to date")
    mat.add_argument("--skip-global", action="store_true", help="per-shard assets only")
    mat.add_argument(
        "--select",
        action="append",
        metavar="ASSET",
        help="only this asset, e.g. filter_decisions (repeatable)",
    )
    mat.add_argument("--in-process", action="store_true", help=IN_PROCESS_HELP)
    mat.set_defaults(func=cmd_materialize)

    apply = sub.add_parser("apply", help="DESTRUCTIVE: apply the decisions to a directory dataset (undoable)")
    apply.add_argument("--project", required=True)
    apply.add_argument("--confirm", action="store_true", help="required: you mean it")
    apply.add_argument("--backup-root", help="override apply.backup_root of the project file")
    apply.set_defaults(func=cmd_apply)

    restore = sub.add_parser("restore", help="undo apply from its journal")
    restore.add_argument("--project", required=True)
    restore.add_argument(
        "--backup-root", help="restore the apply made to this backup root (default: the latest unrestored)"
    )
    restore.set_defaults(func=cmd_restore)

    report = sub.add_parser("report", help="refresh the decisions and the HTML report")
    report.add_argument("--project", required=True)
    report.add_argument("--in-process", action="store_true", help=IN_PROCESS_HELP)
    report.set_defaults(func=cmd_report)

    val = sub.add_parser("validate", help="validate project files")
    val.add_argument("files", nargs="*")
    val.add_argument("--show", action="store_true", help="print the merged configuration")
    val.set_defaults(func=cmd_validate)

    shards = sub.add_parser("shards", help="list the shards of a project")
    shards.add_argument("--project", required=True)
    shards.set_defaults(func=cmd_shards)

    funnel = sub.add_parser("funnel", help="print a project's funnel")
    funnel.add_argument("--project", required=True)
    funnel.set_defaults(func=cmd_funnel)

    init = sub.add_parser("init-instance", help="create the Dagster instance folder")
    init.add_argument(
        "--postgres",
        metavar="URL",
        help="keep runs, event logs and schedules in this Postgres database "
        "(postgresql://user@host:port/db); default $CURATION_POSTGRES_URL, else SQLite in its folder",
    )
    init.set_defaults(func=cmd_init_instance)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ProjectConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
