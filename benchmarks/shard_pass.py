"""The per-shard pass against the bare decode floor, on ~1 MP JPEGs (issue 14).

    python benchmarks/shard_pass.py [--images N] [--workers W] [--previous-tree DIR] [--keep DIR]

Generates N distinct 1200x850 JPEGs (benchmarks/sanitize.py's generator; ``--format png``
re-saves them as PNG, a format without JPEG's reduced-scale decoding) in one shard,
warms the page cache, then measures with the same worker count:

(a) the floor: a process pool (the project's own pool runner) running
    ``Image.open(path).load()`` over the files;
(b) the per-shard stages the demo project enables (sanitize, copy and semantic vectors with
    the built-in descriptor, quality scores), through the asset code: the shard job run in
    process after its inventory, i.e. one read and one decode per image for all of them;
(c) with ``--previous-tree DIR`` (a checkout of an older commit, e.g. ``git worktree add``),
    the same job of that code, measured in a subprocess: the stage-by-stage path, where each
    stage decoded every image again.

Prints one JSON object: images/s of each, and the pass's ratio to the floor (target >= 0.6).
Logs go to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the package importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

STAGES = ["sanitized_images", "sscd_embeddings", "semantic_embeddings", "quality_scores"]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def write_project(folder: Path, images: Path, workers: int) -> Path:
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(folder / "store", ignore_errors=True)  # every run measures a pass from scratch
    path = folder / "pass_bench.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": "pass_bench",
                "storage_root": str(folder / "store"),
                "dataset": {"roots": {"train": str(images)}, "shard_rule": {"kind": "subfolder"}},
                "discovery": {"sensor_running": False},
                "stages": {
                    "sanitize": {"workers": workers},
                    "quality": {"enabled": True, "workers": workers},
                    "embeddings": {
                        "enabled": True,
                        "copy_model": "descriptor",
                        "semantic_model": "descriptor_content",
                    },
                },
            }
        )
    )
    return path


def run_shard_stages(project_file: Path, shard: str, workers: int) -> float:
    """Seconds of the shard job's per-shard stages (after its inventory), run in this process.

    Uses only what every version of the package has (load_project, build_definitions, the
    shard job), so that --previous-tree measures older code the same way.
    """
    import dagster as dg

    from curation_assets.config import load_project
    from curation_assets.definitions import build_definitions

    project = load_project(project_file)
    defs = build_definitions([project])
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(f"{project.name}_shards", [shard])
    job = defs.get_job_def(f"{project.name}_shard_job")
    keys = {key.path[-1]: key for key in job.asset_layer.selected_asset_keys}
    config = {"resources": {"compute": {"config": {"device": "cpu", "num_workers": workers}}}}

    def run(names: list[str]) -> float:
        started = time.perf_counter()
        result = job.execute_in_process(
            partition_key=shard,
            instance=instance,
            asset_selection=[keys[n] for n in names],
            run_config=config,
            raise_on_error=True,
        )
        assert result.success
        return time.perf_counter() - started

    run(["image_inventory"])
    return run([n for n in STAGES if n in keys])


def floor_seconds(paths: list[str], workers: int) -> float:
    from benchmarks.sanitize import _decode_chunk, _not_decoded
    from curation_assets.core.pool import map_chunks

    started = time.perf_counter()
    done = map_chunks(
        paths, _decode_chunk, workers=workers, chunk_size=16, failed_row=_not_decoded, died_row=_not_decoded
    )
    assert all(done)
    return time.perf_counter() - started


PREVIOUS_RUNNER = """
import json, pathlib, sys

if __name__ == "__main__":  # pool workers start from a fork server that re-imports this file
    sys.path.insert(0, sys.argv[1])
    sys.path.insert(1, sys.argv[2])
    from benchmarks.shard_pass import run_shard_stages

    print(json.dumps(run_shard_stages(pathlib.Path(sys.argv[3]), sys.argv[4], int(sys.argv[5]))))
"""


def previous_seconds(tree: Path, project_file: Path, shard: str, workers: int) -> float:
    """The same measurement of an older checkout, in a subprocess that imports that code."""
    runner = project_file.parent / "run_previous.py"
    runner.write_text(PREVIOUS_RUNNER)
    here = str(Path(__file__).resolve().parent.parent)
    out = subprocess.run(
        [sys.executable, str(runner), str(tree), here, str(project_file), shard, str(workers)],
        env={**os.environ, "PYTHONPATH": str(tree)},
        cwd=tree,  # the pool's fork server puts its working directory first on its path
        check=True,
        capture_output=True,
        text=True,
    )
    return float(out.stdout.strip().splitlines()[-1])


def check_previous_run(folder: Path, count: int) -> None:
    """The older code must have processed the images, not rejected them (a broken run is no figure)."""
    import polars as pl

    table = pl.read_parquet(folder / "store" / "pass_bench" / "sanitized_images" / "shard-00.parquet")
    kept = table.filter(pl.col("status") != "rejected").height
    if kept < count:
        raise SystemExit(f"the previous tree kept {kept} of {count} images: its figure would be meaningless")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--format",
        choices=("jpeg", "png"),
        default="jpeg",
        help="png: formats without JPEG's reduced-scale (draft) decoding, where every decode is full",
    )
    parser.add_argument("--previous-tree", type=Path, help="a checkout of older code to measure too")
    parser.add_argument("--keep", type=Path, help="work folder to keep (default: a temporary one)")
    args = parser.parse_args()

    from benchmarks.sanitize import generate

    work = args.keep or Path(tempfile.mkdtemp(prefix="shard_pass_"))
    images = work / f"images_{args.format}"
    shard_dir = images / "shard-00"
    suffix = ".jpg" if args.format == "jpeg" else ".png"
    paths = sorted(shard_dir.glob(f"*{suffix}")) if shard_dir.is_dir() else []
    if len(paths) != args.images:
        shard_dir.mkdir(parents=True, exist_ok=True)
        log(f"generating {args.images} {args.format} images in {shard_dir}")
        paths = generate(shard_dir, args.images)
        if args.format == "png":
            from PIL import Image

            for path in paths:
                Image.open(path).save(path.with_suffix(".png"), compress_level=1)
                path.unlink()
            paths = sorted(shard_dir.glob("*.png"))
    files = [str(p) for p in paths]
    floor_seconds(files[: min(200, len(files))], args.workers)  # warm: page cache, fork server
    floor = floor_seconds(files, args.workers)
    log(f"bare decode: {len(files) / floor:.1f} images/s")

    figures: dict[str, object] = {
        "images": len(files),
        "format": args.format,
        "workers": args.workers,
        "stages": STAGES,
    }
    project_file = write_project(work, images, args.workers)
    shard = "shard-00"
    passed = run_shard_stages(project_file, shard, args.workers)
    log(f"shard pass: {len(files) / passed:.1f} images/s")
    floor_again = floor_seconds(files, args.workers)  # the floor on both sides of the pass: noise shows
    figures["decode_images_per_second"] = round(len(files) / min(floor, floor_again), 1)
    figures["shard_pass_images_per_second"] = round(len(files) / passed, 1)
    figures["shard_pass_to_decode_ratio"] = round(min(floor, floor_again) / passed, 3)
    figures["target_ratio"] = 0.6
    if args.previous_tree:
        previous_project = write_project(work / "previous", images, args.workers)
        seconds = previous_seconds(args.previous_tree.resolve(), previous_project, shard, args.workers)
        check_previous_run(work / "previous", len(files))
        log(f"stage by stage ({args.previous_tree}): {len(files) / seconds:.1f} images/s")
        figures["stage_by_stage_images_per_second"] = round(len(files) / seconds, 1)
        figures["stage_by_stage_to_decode_ratio"] = round(min(floor, floor_again) / seconds, 3)
        figures["speedup_over_stage_by_stage"] = round(seconds / passed, 2)
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
