"""`curate`: headless use of the same assets and jobs the Dagster UI runs.

curate demo                      generate the demo data if missing, materialize it, print the funnel
curate demo-data --out DIR       generate a demo dataset (images, examples, ground truth)
curate materialize --project P   run every stale shard of P, then its global assets
curate validate [FILE ...]       validate project files (default: all known projects)
curate shards --project P        list the shards discovery finds
curate funnel --project P        print the funnel from what is in the store
curate init-instance             create $DAGSTER_HOME with our dagster.yaml
"""

from __future__ import annotations

import argparse
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


def _print(text: str) -> None:
    print(text, flush=True)


def cmd_demo_data(args: argparse.Namespace) -> int:
    from curation_assets.core.demo_data import generate_demo

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
    from curation_assets.core.demo_data import generate_demo

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
    return _materialize(project, shards=None, force=args.force, started=start)


def cmd_materialize(args: argparse.Namespace) -> int:
    project = (
        load_project(args.project) if args.project.endswith((".yaml", ".yml")) else find_project(args.project)
    )
    return _materialize(project, shards=args.shard or None, force=args.force, run_global=not args.skip_global)


def _materialize(project, shards, force, run_global=True, started: float | None = None) -> int:
    from curation_assets.assets.runs import init_instance, materialize_project, project_funnel
    from curation_assets.core.funnel import format_funnel
    from curation_assets.definitions import build_definitions

    started = started or time.perf_counter()
    instance = init_instance()
    defs = build_definitions([project])
    summary = materialize_project(
        project, defs, instance, shards=shards, force=force, run_global=run_global, echo=_print
    )
    funnel = project_funnel(project)
    if funnel is not None:
        _print("")
        _print(format_funnel(funnel, title=f"== {project.name} =="))
    _print(
        f"\n{len(summary.shards_run)} shard run(s), {time.perf_counter() - started:.1f} s; "
        f"outputs in {project.project_storage}; Dagster instance in {instance.root_directory}"
    )
    _print("open the Dagster UI on these runs with: make ui")
    if summary.failed:
        _print("FAILED: " + "; ".join(summary.failed))
        return 1
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    projects = [load_project(f) for f in args.files] if args.files else load_projects()
    for project in projects:
        _print(f"ok: {project.name} ({project.source})")
        if args.show:
            _print(yaml.safe_dump(project.model_dump(mode="json", exclude={"source"}), sort_keys=False))
    return 0


def cmd_shards(args: argparse.Namespace) -> int:
    from curation_assets.assets.discovery import load_chunk_manifests
    from curation_assets.core.shards import discover_shards
    from curation_assets.resources.store import StoreResource

    project = find_project(args.project)
    found = discover_shards(project.dataset, load_chunk_manifests(StoreResource().for_project(project)))
    for root in found.missing_roots:
        _print(f"missing root: {root}")
    for shard in found.shards:
        _print(f"{shard.key}\t{shard.kind}\t{shard.location}")
    return 0


def cmd_funnel(args: argparse.Namespace) -> int:
    from curation_assets.assets.runs import project_funnel
    from curation_assets.core.funnel import format_funnel

    funnel = project_funnel(find_project(args.project))
    if funnel is None:
        _print("nothing materialized yet")
        return 1
    _print(format_funnel(funnel))
    return 0


def cmd_init_instance(args: argparse.Namespace) -> int:
    from curation_assets.assets.runs import init_instance

    _print(f"Dagster instance: {init_instance().root_directory}")
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
    demo.set_defaults(func=cmd_demo)

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
    mat.set_defaults(func=cmd_materialize)

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
