"""Orchestration overhead: what a run costs beyond its steps' own compute, per path.

    python benchmarks/orchestration.py [--shards 10] [--images 20] [--sensor-shards 1000 10000]
                                       [--executor in_process multiprocess] [--keep DIR]

On ``--shards`` tiny shards (``--images`` small JPEGs each) of a project with the demo's
per-shard stages (sanitize, quality, both descriptor embeddings) and its global dedup, export
and report, in a SQLite instance made from our instance template:

- ``in_process``: each shard run through ``execute_in_process`` (the floor: no process starts);
- ``launched``: each shard run launched on the instance as the UI, the sensor daemon and a
  backfill launch it (a code server holds the code location; each run is a run worker
  process executing the job with its executor), once per ``--executor``;
- ``launched_bare_dagster``: the floor of that path, launched the same way: a code location
  of one partitioned asset that does nothing and imports only Dagster. Our launched
  overhead is reported as a ratio to it.

A run's overhead is its wall time (launch call to finished, as the caller sees it) minus its
steps' compute time (STEP_START to STEP_SUCCESS in its event log). The global job is run
the same way after the shards. Then the discovery sensor's tick times with 1,000 and 10,000
shard keys (``benchmarks/sensor_ticks.py``). Targets (issue 12, 2 cores): launched overhead
<= 2 s per shard run and <= 15 s for the global job; every sensor tick < 10 s.

Prints one JSON object to stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the package importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import dagster as dg
import numpy as np
import yaml
from PIL import Image

TARGET_SHARD_OVERHEAD_S = 2.0
TARGET_GLOBAL_OVERHEAD_S = 15.0
TARGET_TICK_S = 10.0


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def make_pool(images: Path, shards: int, per_shard: int) -> None:
    rng = np.random.default_rng(0)
    for s in range(shards):
        for i in range(per_shard):
            low = rng.integers(0, 255, size=(6, 8, 3), dtype=np.uint8)
            path = images / f"shard-{s:02d}" / f"{i:03d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(low).resize((320, 240), Image.Resampling.BICUBIC).save(path, quality=90)


def write_project(run_dir: Path, images: Path, executor: str) -> Path:
    path = run_dir / "orch.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": "orch",
                "storage_root": str(run_dir / "store"),
                "dataset": {"roots": {"train": str(images)}},
                "discovery": {"sensor_running": False},
                "runs": {"executor": executor},
                "stages": {
                    "sanitize": {"workers": 2},
                    "quality": {"enabled": True, "workers": 2},
                    "embeddings": {
                        "enabled": True,
                        "copy_model": "descriptor",
                        "semantic_model": "descriptor_content",
                    },
                    "near_dedup": {"enabled": True, "model": "descriptor", "threshold": 0.1},
                },
                "export": {"layout": "symlink"},
            }
        )
    )
    return path


def step_seconds(instance: dg.DagsterInstance, run_id: str) -> float:
    """Compute time of a run's steps: STEP_START to STEP_SUCCESS / STEP_FAILURE, summed."""
    event = dg.DagsterEventType
    kinds = {event.STEP_START, event.STEP_SUCCESS, event.STEP_FAILURE}
    started: dict[str, float] = {}
    total = 0.0
    for record in instance.get_records_for_run(run_id, of_type=kinds, limit=100_000).records:
        entry = record.event_log_entry
        key = entry.step_key or ""
        if entry.dagster_event.event_type == event.STEP_START:
            started[key] = entry.timestamp
        elif key in started:
            total += entry.timestamp - started.pop(key)
    return total


def run_figures(instance: dg.DagsterInstance, outcomes: list) -> dict[str, Any]:
    failed = [o.message for o in outcomes if not o.success]
    if failed:
        raise RuntimeError(f"{len(failed)} run(s) failed: {failed[0]}")
    walls = [o.seconds for o in outcomes]
    steps = [step_seconds(instance, o.run_id) for o in outcomes]
    overheads = [w - s for w, s in zip(walls, steps, strict=True)]
    return {
        "runs": len(outcomes),
        "wall_s_mean": round(statistics.mean(walls), 3),
        "steps_s_mean": round(statistics.mean(steps), 3),
        "overhead_s_mean": round(statistics.mean(overheads), 3),
        "overhead_s_max": round(max(overheads), 3),
    }


def measure_path(workdir: Path, shards: int, path: str, executor: str) -> dict[str, Any]:
    """Every shard then the global job, on a fresh store and instance, by ``path``."""
    from curation_assets.assets.project import global_job_name, shard_job_name
    from curation_assets.config import load_project
    from curation_assets.definitions import build_definitions
    from curation_assets.launch import InProcessRuns, LaunchedRuns, code_location
    from curation_assets.runner import QUIET_CONSOLE, init_instance

    run_dir = workdir / f"{path}-{executor}"
    run_dir.mkdir()
    os.environ["DAGSTER_HOME"] = str(run_dir / "dagster_home")
    project_file = write_project(run_dir, workdir / "images", executor)
    os.environ["CURATION_PROJECTS"] = str(project_file)
    project = load_project(project_file)
    instance = init_instance()
    keys = [f"shard-{s:02d}" for s in range(shards)]
    instance.add_dynamic_partitions(f"{project.name}_shards", keys)
    figures: dict[str, Any] = {"executor": executor}

    def run_all(runs) -> None:
        outcomes = []
        for key in keys:
            outcomes.append(runs.run(shard_job_name(project), partition_key=key, run_config=QUIET_CONSOLE))
            log(f"  {path}/{executor} {key}: {outcomes[-1].seconds:.2f} s")
        figures["shard_runs"] = run_figures(instance, outcomes)
        outcome = runs.run(global_job_name(project), run_config=QUIET_CONSOLE)
        log(f"  {path}/{executor} global job: {outcome.seconds:.2f} s")
        figures["global_run"] = run_figures(instance, [outcome])

    if path == "in_process":
        run_all(InProcessRuns(build_definitions([project]), instance))
    else:
        start = time.perf_counter()
        with code_location(instance) as workspace:
            figures["code_server_start_s"] = round(time.perf_counter() - start, 3)
            run_all(LaunchedRuns(instance, workspace))
    instance.dispose()
    return figures


BARE_LOCATION = """
import dagster as dg

shards = dg.DynamicPartitionsDefinition(name="bare_shards")


@dg.asset(partitions_def=shards)
def bare(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    return dg.MaterializeResult(metadata={"shard": context.partition_key})


defs = dg.Definitions(
    assets=[bare],
    jobs=[dg.define_asset_job("bare_job", selection=[bare], executor_def=dg.in_process_executor)],
)
"""


def measure_bare_dagster(workdir: Path, shards: int) -> dict[str, Any]:
    """The floor of a launched run: a one-asset code location that imports only Dagster, launched
    the same way (code server, run worker, in-process executor), one run per shard."""
    from curation_assets.launch import LaunchedRuns, code_location
    from curation_assets.runner import init_instance

    run_dir = workdir / "bare-dagster"
    run_dir.mkdir()
    (run_dir / "bare_location.py").write_text(BARE_LOCATION)
    os.environ["DAGSTER_HOME"] = str(run_dir / "dagster_home")
    instance = init_instance()
    keys = [f"shard-{s:02d}" for s in range(shards)]
    instance.add_dynamic_partitions("bare_shards", keys)
    with code_location(instance, "bare_location", run_dir) as workspace:
        runs = LaunchedRuns(instance, workspace)
        figures = run_figures(instance, [runs.run("bare_job", partition_key=key) for key in keys])
    instance.dispose()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=int, default=10)
    parser.add_argument("--images", type=int, default=20, help="images per shard")
    parser.add_argument("--sensor-shards", type=int, nargs="*", default=[1000, 10000])
    parser.add_argument("--executor", nargs="+", default=["in_process", "multiprocess"])
    parser.add_argument("--keep", help="work in this folder and keep it")
    args = parser.parse_args()
    # Code servers and run workers inherit fd 1 and log to it: send theirs to stderr and keep
    # stdout for the JSON alone.
    json_out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)

    workdir = Path(args.keep or tempfile.mkdtemp(prefix="bench-orchestration-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("CURATION_HOME", str(workdir / "home"))
    make_pool(workdir / "images", args.shards, args.images)
    result: dict[str, Any] = {"shards": args.shards, "images_per_shard": args.images, "cpus": os.cpu_count()}

    log("in-process runs (the floor)")
    result["in_process"] = measure_path(workdir, args.shards, "in_process", "in_process")
    result["launched"] = {}
    for executor in args.executor:
        log(f"launched runs, {executor} executor")
        result["launched"][executor] = measure_path(workdir, args.shards, "launched", executor)

    log("launched runs of a bare one-asset Dagster code location (the floor of a launched run)")
    result["launched_bare_dagster"] = measure_bare_dagster(workdir, args.shards)

    floor = result["launched_bare_dagster"]["overhead_s_mean"]
    for figures in result["launched"].values():
        shard = figures["shard_runs"]["overhead_s_mean"]
        figures["shard_overhead_ratio_to_bare_dagster"] = round(shard / floor, 2)
        figures["shard_overhead_minus_bare_dagster_s"] = round(shard - floor, 3)
        figures["shard_overhead_ok"] = shard <= TARGET_SHARD_OVERHEAD_S
        figures["global_overhead_ok"] = figures["global_run"]["overhead_s_mean"] <= TARGET_GLOBAL_OVERHEAD_S

    from benchmarks.sensor_ticks import sensor_tick_times

    result["sensor"] = {}
    for n in args.sensor_shards:
        log(f"sensor ticks, {n} shard keys")
        ticks = sensor_tick_times(n, workdir / "sensor")
        slowest = max(v for k, v in ticks.items() if k.endswith("tick_s") and isinstance(v, float))
        result["sensor"][str(n)] = {**ticks, "slowest_tick_ok": slowest < TARGET_TICK_S}
    result["targets"] = {
        "shard_overhead_s": TARGET_SHARD_OVERHEAD_S,
        "global_overhead_s": TARGET_GLOBAL_OVERHEAD_S,
        "sensor_tick_s": TARGET_TICK_S,
    }
    print(json.dumps(result, indent=2), file=json_out, flush=True)


if __name__ == "__main__":
    main()
