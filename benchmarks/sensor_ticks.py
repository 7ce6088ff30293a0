"""Discovery-sensor tick time on a pool of N shard folders (one tiny file each).

    python benchmarks/sensor_ticks.py [--shards 1000 10000] [--keep DIR]

For each N, in a SQLite instance (what `dagster dev` uses by default) and through
``dg.build_sensor_context`` with the store resource, as the daemon evaluates the sensor:

- ``first_tick_s``: the first tick (no cursor, no partitions): scan, fingerprints, the first
  batch of ``discovery.max_new_shards_per_tick`` new shards;
- ``fill_ticks`` / ``max_fill_tick_s``: the ticks until every shard is a partition;
- ``steady_tick_s``: a tick with the cursor after every shard has run (an inventory with its
  fingerprint is written for each, as its run would), nothing changed;
- ``changed_tick_s``: the same with one shard folder touched (one request);
- ``no_cursor_tick_s``: a steady tick without a cursor (every inventory footer is read: what
  the first tick after a cursor reset, and the refresh schedule, pay);
- ``apply_partitions_s``: adding the partition keys to the instance (the daemon's side).

Prints one JSON object to stdout. :func:`sensor_tick_times` is what other benchmarks call.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the package importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import dagster as dg
import polars as pl

from curation_assets.config import load_project_dict
from curation_assets.definitions import build_definitions
from curation_assets.resources.store import StoreResource


def _make_pool(root: Path, n_shards: int) -> None:
    for i in range(n_shards):
        folder = root / f"shard-{i:06d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "0.jpg").write_bytes(b"x")


def sensor_tick_times(n_shards: int, workdir: Path, max_new_per_tick: int | None = None) -> dict[str, Any]:
    """Tick times of the discovery sensor over ``n_shards`` tiny shard folders under ``workdir``."""
    workdir = Path(workdir)
    root = workdir / f"pool-{n_shards}"
    _make_pool(root, n_shards)
    data: dict[str, Any] = {
        "name": "bench",
        "storage_root": str(workdir / f"store-{n_shards}"),
        "dataset": {"roots": str(root)},
    }
    if max_new_per_tick:
        data["discovery"] = {"max_new_shards_per_tick": max_new_per_tick}
    project = load_project_dict(data, source="benchmark")
    defs = build_definitions([project])
    sensor = defs.resolve_sensor_def(f"{project.name}_discovery_sensor")
    store = StoreResource().for_project(project)
    resources = {"store": StoreResource()}
    out: dict[str, Any] = {
        "shards": n_shards,
        "max_new_shards_per_tick": project.discovery.max_new_shards_per_tick,
    }

    home = workdir / f"home-{n_shards}"
    home.mkdir(parents=True, exist_ok=True)
    with dg.instance_for_test(temp_dir=str(home)) as instance:

        def tick(cursor: str | None) -> tuple[dg.SensorResult, float, float]:
            start = time.perf_counter()
            with dg.build_sensor_context(instance=instance, cursor=cursor, resources=resources) as context:
                result = sensor(context)
            seconds = time.perf_counter() - start
            start = time.perf_counter()
            for request in result.dynamic_partitions_requests or []:
                instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
            return result, seconds, time.perf_counter() - start

        cursor = None
        fill_times, apply_times, requested = [], [], []
        while True:
            result, seconds, applying = tick(cursor)
            cursor = result.cursor
            if not result.run_requests:
                break
            fill_times.append(seconds)
            apply_times.append(applying)
            requested += result.run_requests
        out["first_tick_s"] = round(fill_times[0], 3)
        out["fill_ticks"] = len(fill_times)
        out["max_fill_tick_s"] = round(max(fill_times), 3)
        out["apply_partitions_s"] = round(sum(apply_times), 3)
        out["requests"] = len(requested)
        out["cursor_chars"] = len(cursor or "")

        for request in requested:  # what each shard's run leaves: an inventory with its fingerprint
            path = store.shard_path("image_inventory", request.partition_key)
            metadata = {"fingerprint": request.run_key.split(":", 1)[1]}
            store.write_parquet(pl.DataFrame({"image_id": ["x"]}), path, metadata=metadata)
        tick(cursor)  # the tick after the runs: settles the cursor on the fingerprints run
        result, seconds, _ = tick(cursor)
        assert not result.run_requests, "a steady tick requested runs"
        out["steady_tick_s"] = round(seconds, 3)
        os.utime(root / "shard-000007", ns=(1, 1))
        result, seconds, _ = tick(cursor)
        out["changed_tick_s"] = round(seconds, 3)
        out["changed_requests"] = len(result.run_requests)
        result, seconds, _ = tick(None)
        out["no_cursor_tick_s"] = round(seconds, 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shards", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--max-new-per-tick", type=int, default=None)
    parser.add_argument("--keep", type=Path, default=None, help="work in this folder and keep it")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.keep or Path(tmp)
        results = [sensor_tick_times(n, workdir, args.max_new_per_tick) for n in args.shards]
    print(json.dumps({"sensor_ticks": results}, indent=2))


if __name__ == "__main__":
    main()
