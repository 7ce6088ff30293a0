"""Sanitize throughput against the bare decode floor, on ~1 MP RGB JPEGs.

    python benchmarks/sanitize.py [--images N] [--workers W] [--repeat R] [--keep DIR]

Generates N distinct 1200x850 JPEGs (quality 90) from scikit-image's bundled photos,
warms the page cache, then times with the same worker count and the same chunking:

(a) the floor: a process pool running ``Image.open(path).load()`` over the files;
(b) ``sanitize_items`` over the same files (read, every check, one decode, pixel hash).

Both start their worker processes in each run (sanitize_items keeps none after its call:
the floor pools through the same runner, core/pool.py) and are warmed up first (imports,
page cache); each time is the best of R interleaved runs. Prints one JSON object to stdout; logs go to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the package importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
from PIL import Image

from curation_assets.config import SanitizeStage, load_project_dict
from curation_assets.core.ingest.images import read_bytes
from curation_assets.core.ingest.sanitize import SanitizeItem, check_image, sanitize_items
from curation_assets.core.pool import map_chunks

WIDTH, HEIGHT = 1200, 850
QUALITY = 90
TARGET_RATIO = 0.8
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "cat", "immunohistochemistry", "motorcycle_left")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _photos() -> list[np.ndarray]:
    import skimage.data  # imported here: the pool's forkserver re-imports this script

    photos = []
    for name in PHOTOS:
        loader = getattr(skimage.data, name, None)
        if loader is None:
            continue
        try:
            photo = np.asarray(loader())
        except Exception as exc:  # a photo that needs a download (pooch) is skipped
            log(f"skipping skimage.data.{name}: {exc}")
            continue
        if photo.ndim == 3 and photo.shape[2] >= 3:
            photos.append(np.ascontiguousarray(photo[:, :, :3]).astype(np.uint8))
    if not photos:
        raise SystemExit("no scikit-image sample photo is available")
    return photos


def generate(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """``count`` distinct 1200x850 RGB JPEGs: random crops, flips, tints and noise of the photos."""
    rng = np.random.default_rng(seed)
    photos = [Image.fromarray(p) for p in _photos()]
    paths = []
    for index in range(count):
        photo = photos[index % len(photos)]
        w, h = photo.size
        cw, ch = int(w * rng.uniform(0.6, 1.0)), int(h * rng.uniform(0.6, 1.0))
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        im = photo.crop((x0, y0, x0 + cw, y0 + ch)).resize((WIDTH, HEIGHT), Image.Resampling.BILINEAR)
        if rng.random() < 0.5:
            im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        pixels = np.asarray(im, dtype=np.int16)
        tint = rng.integers(-20, 21, size=3, dtype=np.int16)
        noise = rng.integers(-4, 5, size=pixels.shape, dtype=np.int16)
        pixels = np.clip(pixels + tint + noise, 0, 255).astype(np.uint8)
        path = folder / f"img_{index:05d}.jpg"
        Image.fromarray(pixels).save(path, "JPEG", quality=QUALITY)
        paths.append(path)
    return paths


def _decode_chunk(paths: Sequence[str]) -> list[bool]:
    """The floor: what any reader must do at least (open, full decode)."""
    for path in paths:
        with Image.open(path) as im:
            im.load()
    return [True] * len(paths)


def _not_decoded(path: str, exc: BaseException) -> bool:
    return False


def floor_run(paths: Sequence[str], rules: SanitizeStage) -> float:
    """Seconds for the bare decode over ``paths``, pooled exactly as sanitize_items pools.

    The same runner with the same workers, chunks and queue bound, so both times include
    starting the call's worker processes.
    """
    started = time.perf_counter()
    decoded = map_chunks(
        paths,
        _decode_chunk,
        workers=rules.workers,
        chunk_size=rules.chunk_size,
        in_flight_per_worker=rules.max_in_flight,
        failed_row=_not_decoded,
        died_row=_not_decoded,
    )
    assert all(decoded), f"{decoded.count(False)} benchmark images did not decode"
    return time.perf_counter() - started


def sanitize_run(items: Sequence[SanitizeItem], rules: SanitizeStage) -> float:
    started = time.perf_counter()
    rows = sanitize_items(items, rules)
    elapsed = time.perf_counter() - started
    bad = [row for row in rows if row["status"] != "ok"]
    if bad:
        raise SystemExit(f"{len(bad)} benchmark images were not ok, e.g. {bad[0]}")
    return elapsed


def cpu_ms_per_image(paths: Sequence[Path], rules: SanitizeStage, repeat: int) -> tuple[float, float]:
    """CPU milliseconds per image in this process (no pool): (bare decode, check_image incl. read).

    CPU time barely moves when other processes share the cores, so this pair still
    compares the two fairly on a busy machine, where wall-clock rates get noisy.
    """
    best_floor = best_check = float("inf")
    for _ in range(repeat):
        started = time.process_time()
        for path in paths:
            with Image.open(path) as im:
                im.load()
        best_floor = min(best_floor, time.process_time() - started)
        started = time.process_time()
        for path in paths:
            check_image(read_bytes(str(path)), path.name, rules)
        best_check = min(best_check, time.process_time() - started)
    return best_floor * 1000 / len(paths), best_check * 1000 / len(paths)


def best_of(repeat: int, runs: dict[str, Callable[[], float]]) -> dict[str, float]:
    """Best time of each run, the runs interleaved so that drift hits all of them alike."""
    times: dict[str, list[float]] = {label: [] for label in runs}
    for attempt in range(repeat):
        for label, run in runs.items():
            times[label].append(run())
            log(f"{label} run {attempt + 1}/{repeat}: {times[label][-1]:.3f} s")
    return {label: min(values) for label, values in times.items()}


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--workers", type=int, default=0, help="0 = one per CPU core")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--keep", type=Path, default=None, help="generate into (and keep) this folder")
    args = parser.parse_args(argv)

    workers = args.workers or os.cpu_count() or 1
    base = load_project_dict({"name": "bench", "dataset": {"roots": tempfile.gettempdir()}}).stages.sanitize
    rules = base.model_copy(update={"workers": workers})

    with tempfile.TemporaryDirectory(prefix="sanitize_bench_") as tmp:
        folder = args.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        paths = generate(folder, args.images)
        log(f"generated {len(paths)} JPEGs of {WIDTH}x{HEIGHT} in {time.perf_counter() - started:.1f} s")
        total_bytes = sum(len(path.read_bytes()) for path in paths)  # also warms the page cache
        log(f"page cache warmed: {total_bytes / 1e6:.1f} MB")

        names = [str(path) for path in paths]
        items = [SanitizeItem(image_id=path.stem, source_path=str(path), name=path.name) for path in paths]
        # One untimed pass of each (imports in the fork server, caches) for both alike.
        floor_run(names, rules)
        sanitize_run(items, rules)

        best = best_of(
            args.repeat,
            {"decode floor": lambda: floor_run(names, rules), "sanitize": lambda: sanitize_run(items, rules)},
        )
        floor_s, sanitize_s = best["decode floor"], best["sanitize"]
        floor_cpu, check_cpu = cpu_ms_per_image(paths, rules, min(args.repeat, 3))
        log(f"CPU per image in one process: decode {floor_cpu:.2f} ms, check_image {check_cpu:.2f} ms")

    decode_rate = len(paths) / floor_s
    sanitize_rate = len(paths) / sanitize_s
    ratio = sanitize_rate / decode_rate
    result = {
        "images": len(paths),
        "workers": workers,
        "megapixels_per_image": round(WIDTH * HEIGHT / 1e6, 3),
        "decode_images_per_s": round(decode_rate, 1),
        "sanitize_images_per_s": round(sanitize_rate, 1),
        "ratio": round(ratio, 3),
        "target_ratio": TARGET_RATIO,
        "meets_target": ratio >= TARGET_RATIO,
        # Contention-proof companions (one process, CPU time): decode vs read + check_image.
        "decode_cpu_ms_per_image": round(floor_cpu, 3),
        "sanitize_cpu_ms_per_image": round(check_cpu, 3),
        "cpu_ratio": round(floor_cpu / check_cpu, 3),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
