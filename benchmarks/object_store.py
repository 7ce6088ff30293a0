"""A pool on object storage against the same pool on local disk (issue 16).

    python benchmarks/object_store.py [--images N] [--shards S] [--workers W] [--keep DIR]

Generates N distinct 1200x850 JPEGs (benchmarks/sanitize.py's generator) in S shards, packs
each shard as a WebDataset tar (with a .json sidecar per image, as img2dataset writes them),
starts an S3-compatible endpoint on localhost (moto in server mode, curation_assets.services)
and uploads the tars. Then it curates the pool twice, through the asset code, with the same
stages (sanitize, copy and semantic vectors with the built-in descriptor, near duplicates):

(a) local: the tars on local disk, the store on local disk;
(b) s3: the tars on the bucket, streamed, and the store on the bucket.

It reports the wall time of each (shard jobs plus the global job), the shard pass's images/s
(from the runs' step timings), and for (b) the bytes read from the endpoint per image
(every GET the process made, against the images' own bytes). Target: the S3 pass rate
>= 0.8 of the local one. Prints one JSON object; logs go to stderr.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the package importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def make_tars(folder: Path, images: int, shards: int) -> tuple[Path, int]:
    """Shards of generated JPEGs as tars; returns (the tar folder, the images' total bytes)."""
    from benchmarks.sanitize import generate

    tars, total = folder / "wds", 0
    tars.mkdir(parents=True, exist_ok=True)
    per = -(-images // shards)
    for shard in range(shards):
        count = min(per, images - shard * per)
        work = folder / "gen" / f"{shard:03d}"
        work.mkdir(parents=True, exist_ok=True)
        paths = generate(work, count, seed=shard)
        with tarfile.open(tars / f"shard-{shard:03d}.tar", "w") as archive:
            for path in paths:
                archive.add(path, arcname=path.name)
                meta = json.dumps({"url": f"https://example.org/{path.name}", "label": shard}).encode()
                info = tarfile.TarInfo(f"{path.stem}.json")
                info.size = len(meta)
                archive.addfile(info, io.BytesIO(meta))
                total += path.stat().st_size
        shutil.rmtree(work)
        log(f"shard {shard}: {count} images")
    return tars, total


def project_data(name: str, root: str, store: str, workers: int) -> dict:
    return {
        "name": name,
        "storage_root": store,
        "dataset": {"roots": {"train": root}, "input_kind": "webdataset", "shard_rule": {"kind": "tar"}},
        "discovery": {"sensor_running": False},
        "stages": {
            "sanitize": {"workers": workers},
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


class ReadCounter:
    """Bytes this process received from object storage: s3fs's whole-object and ranged reads."""

    def __init__(self):
        import s3fs.core

        self.bytes = 0
        self.requests = 0
        fs_class, file_class = s3fs.core.S3FileSystem, s3fs.core.S3File
        cat_file, fetch_range = fs_class._cat_file, file_class._fetch_range
        counter = self

        async def counted_cat(self, *args, **kwargs):
            data = await cat_file(self, *args, **kwargs)
            counter.bytes += len(data)
            counter.requests += 1
            return data

        def counted_fetch(self, start, end):
            data = fetch_range(self, start, end)
            counter.bytes += len(data)
            counter.requests += 1
            return data

        fs_class._cat_file, file_class._fetch_range = counted_cat, counted_fetch


def curate(data: dict, home: Path) -> dict:
    """Materialize the project (shard jobs, then the global job) in this process; its timings."""
    import dagster as dg

    from curation_assets.assets.project import shard_job_name
    from curation_assets.config import load_project_dict
    from curation_assets.definitions import build_definitions
    from curation_assets.runner import materialize_project

    project = load_project_dict(data, source="object_store bench")
    instance = dg.DagsterInstance.ephemeral(tempdir=str(home))
    started = time.perf_counter()
    summary = materialize_project(project, build_definitions([project]), instance, echo=log)
    wall = time.perf_counter() - started
    if summary.failed:
        raise SystemExit(f"{project.name}: failed: {summary.failed}")
    pass_seconds = 0.0
    for run in instance.get_runs(dg.RunsFilter(job_name=shard_job_name(project))):
        for step in instance.get_run_step_stats(run.run_id):
            if step.step_key.endswith("_shard_pass") and step.end_time and step.start_time:
                pass_seconds += step.end_time - step.start_time
    shards = len(summary.shards_run)
    return {"wall_s": round(wall, 2), "shard_pass_s": round(pass_seconds, 2), "shards": shards}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--shards", type=int, default=10)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--keep", type=Path, help="keep the generated tars here (reused when present)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from curation_assets.core import storage
    from curation_assets.services import LocalS3

    folder = args.keep or Path(tempfile.mkdtemp(prefix="object_store_bench-"))
    tars = folder / "wds"
    if tars.is_dir() and len(list(tars.glob("*.tar"))) == args.shards:
        total = 0
        for path in tars.glob("*.tar"):
            with tarfile.open(path) as archive:
                total += sum(m.size for m in archive if m.name.endswith(".jpg"))
    else:
        tars, total = make_tars(folder, args.images, args.shards)
    figures: dict = {"images": args.images, "shards": args.shards, "workers": args.workers}
    figures["image_mib"] = round(total / 2**20, 1)
    try:
        # a warm-up shard first: the pool's fork server and the model imports are paid once per
        # process, and would otherwise be charged to whichever layout runs first
        warm = folder / "warm"
        warm.mkdir(exist_ok=True)
        shutil.copy(next(iter(sorted(tars.glob("*.tar")))), warm / "warm.tar")
        curate(project_data("bench_warm", str(warm), str(folder / "warm_store"), args.workers), folder / "i0")
        log("local: tars and store on local disk")
        shutil.rmtree(folder / "store", ignore_errors=True)
        local = curate(
            project_data("bench_local", str(tars), str(folder / "store"), args.workers), folder / "i1"
        )
        with LocalS3() as s3:
            os.environ.update(s3.env)
            storage.reset()
            s3.make_bucket("pool")
            s3.make_bucket("store")
            started = time.perf_counter()
            s3.upload_tree(tars, "s3://pool/wds")
            figures["upload_s"] = round(time.perf_counter() - started, 1)
            counter = ReadCounter()
            log("s3: tars streamed from the bucket, store on the bucket")
            on_s3 = project_data("bench_s3", "s3://pool/wds", "s3://store/curation", args.workers)
            remote = curate(on_s3, folder / "i2")
            remote["bytes_read_per_image"] = round(counter.bytes / args.images)
            remote["image_bytes_per_image"] = round(total / args.images)
            remote["read_amplification"] = round(counter.bytes / total, 2)
            remote["get_requests"] = counter.requests
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    for result in (local, remote):
        result["shard_pass_images_per_s"] = round(args.images / max(result["shard_pass_s"], 1e-9), 1)
    figures["local"], figures["s3"] = local, remote
    figures["s3_pass_rate_vs_local"] = round(
        remote["shard_pass_images_per_s"] / local["shard_pass_images_per_s"], 3
    )
    figures["s3_wall_vs_local"] = round(remote["wall_s"] / local["wall_s"], 3)
    figures["target_pass_rate_vs_local"] = 0.8
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
