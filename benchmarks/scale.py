"""The distributed path against one process on one machine (issue 17).

    python benchmarks/scale.py [--images N] [--shards S] [--keep DIR]

Generates N small distinct JPEGs (320x240) in S WebDataset tars (the layout large pools ship
in; one object per shard, so the figure is not a count of per-object requests to the local
S3 emulator), then curates them twice with the same stages (sanitize, copy and semantic
vectors with the built-in descriptor, near duplicates, decisions):

(a) local: dataset and store on local disk, SQLite instance, every job run in this process;
(b) distributed: the instance on PostgreSQL, dataset and store on an S3 endpoint (moto),
    runs launched through a code server as the UI launches them, every step sent to two
    celery workers over a Redis broker; all services started here and stopped at the end.

Reports the wall time of each (shard jobs plus the global job) and the per-shard overhead:
a shard run's wall time minus the time its steps computed, averaged over the shards. The
distributed path adds a run worker, a celery round trip and a step process start per step
and object-storage writes; on one 2-core machine it cannot be faster, and the figure is
what a shard pays for being able to run on any machine. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the package importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def generate(folder: Path, images: int, shards: int) -> None:
    """Small distinct photo-like JPEGs (a random 8x6 colour field upsampled) in one tar per shard."""
    import io
    import tarfile

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    tars = [tarfile.open(folder / f"shard-{s:03d}.tar", "w") for s in range(shards)]  # noqa: SIM115
    try:
        for index in range(images):
            low = rng.integers(0, 255, size=(6, 8, 3), dtype=np.uint8)
            buffer = io.BytesIO()
            Image.fromarray(low).resize((320, 240), Image.Resampling.BICUBIC).save(buffer, "JPEG", quality=90)
            info = tarfile.TarInfo(f"img_{index:06d}.jpg")
            info.size = buffer.tell()
            buffer.seek(0)
            tars[index % shards].addfile(info, buffer)
    finally:
        for archive in tars:
            archive.close()


def project(name: str, root: str, store: str, executor: str) -> dict:
    return {
        "name": name,
        "storage_root": store,
        "dataset": {"roots": {"train": root}, "input_kind": "webdataset", "shard_rule": {"kind": "tar"}},
        "discovery": {"sensor_running": False},
        "runs": {"executor": executor},
        "stages": {
            "sanitize": {"workers": 1},
            "embeddings": {
                "enabled": True,
                "copy_model": "descriptor",
                "semantic_model": "descriptor_content",
            },
            "near_dedup": {"enabled": True, "model": "descriptor", "threshold": 0.1},
        },
        "export": {"enabled": False},
        "report": {"enabled": False},
    }


def timings(instance, shard_job: str) -> dict:
    """Per-shard overhead: each shard run's wall time minus its steps' time, averaged."""
    import dagster as dg

    overheads, computed = [], 0.0
    for run in instance.get_runs(dg.RunsFilter(job_name=shard_job)):
        stats = instance.get_run_stats(run.run_id)
        steps = sum(
            (s.end_time - s.start_time)
            for s in instance.get_run_step_stats(run.run_id)
            if s.end_time and s.start_time
        )
        computed += steps
        if stats.start_time and stats.end_time:
            overheads.append(stats.end_time - stats.start_time - steps)
    return {
        "shard_runs": len(overheads),
        "shard_steps_s": round(computed, 1),
        "overhead_per_shard_s": round(sum(overheads) / max(len(overheads), 1), 2),
    }


def write_project(folder: Path, data: dict) -> Path:
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{data['name']}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--shards", type=int, default=10)
    parser.add_argument("--keep", type=Path, help="work here and keep it (the pool is reused)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # stdout carries the JSON only: the code server and workers started below log to it
    json_out = os.dup(1)
    os.dup2(2, 1)

    import dagster as dg

    from curation_assets.assets.project import shard_job_name
    from curation_assets.config import load_project
    from curation_assets.core import storage
    from curation_assets.definitions import build_definitions
    from curation_assets.launch import LaunchedRuns, code_location
    from curation_assets.runner import init_instance, materialize_project
    from curation_assets.services import CeleryWorkers, LocalPostgres, LocalRedis, LocalS3

    folder = args.keep or Path(tempfile.mkdtemp(prefix="scale_bench-"))
    images = folder / "images"
    if len(list(images.glob("*.tar"))) != args.shards:
        shutil.rmtree(images, ignore_errors=True)
        generate(images, args.images, args.shards)
    figures: dict = {"images": args.images, "shards": args.shards}
    try:
        shutil.rmtree(folder / "store", ignore_errors=True)
        os.environ["CURATION_HOME"] = str(folder / "home")
        local_file = write_project(
            folder / "projects", project("scale_local", str(images), str(folder / "store"), "in_process")
        )
        local = load_project(local_file)
        instance = dg.DagsterInstance.ephemeral(tempdir=str(folder / "i_local"))
        started = time.perf_counter()
        summary = materialize_project(local, build_definitions([local]), instance, echo=log)
        assert not summary.failed, summary.failed
        figures["local"] = {
            "wall_s": round(time.perf_counter() - started, 1),
            **timings(instance, shard_job_name(local)),
        }

        with LocalS3() as s3, LocalPostgres() as postgres, LocalRedis() as redis:
            os.environ.update(s3.env)
            storage.reset()
            s3.make_bucket("pool")
            s3.make_bucket("store")
            s3.upload_tree(images, "s3://pool/images")
            remote_file = write_project(
                folder / "projects", project("scale_cluster", "s3://pool/images", "s3://store/c", "celery")
            )
            os.environ.update(
                CURATION_PROJECTS=str(remote_file.parent),
                CURATION_CELERY_BROKER=redis.url,
                DAGSTER_HOME=str(folder / "dagster_home"),
            )
            shutil.rmtree(folder / "dagster_home", ignore_errors=True)
            instance = init_instance(postgres.url)
            cluster = load_project(remote_file)
            try:
                with (
                    CeleryWorkers(redis.url, count=2, log_folder=folder / "celery"),
                    code_location(instance) as ws,
                ):
                    started = time.perf_counter()
                    summary = materialize_project(cluster, LaunchedRuns(instance, ws), instance, echo=log)
                    assert not summary.failed, summary.failed
                    wall = time.perf_counter() - started
                figures["distributed"] = {
                    "wall_s": round(wall, 1),
                    **timings(instance, shard_job_name(cluster)),
                    "what": "Postgres instance, S3 dataset and store, 2 celery workers, launched runs",
                }
            finally:
                instance.dispose()
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    figures["distributed_wall_vs_local"] = round(
        figures["distributed"]["wall_s"] / figures["local"]["wall_s"], 2
    )
    figures["overhead_per_shard_added_s"] = round(
        figures["distributed"]["overhead_per_shard_s"] - figures["local"]["overhead_per_shard_s"], 2
    )
    with os.fdopen(json_out, "w") as out:
        out.write(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
