"""Decontamination and sample retrieval at scale: a pool against evaluation and seed sets, timed.

    python benchmarks/retrieval.py [--pool 1000000] [--refs 50000] [--seeds N] [--k 4]
                                   [--threshold 0.1] [--margin 0.1] [--min-similarity 0.5]
                                   [--sample 1000] [--kind auto] [--seed 0] [--keep DIR]

Generated data (fixed by ``--seed``), 512-d float16 memory-mapped .npy files as the store keeps
embeddings: cluster centres with heavy-tailed (Pareto) sizes, one cluster per 200 pool vectors;
each vector is 0.8 x its centre plus noise with a power-law spectrum along random directions,
normalised, plus a constant offset of norm 0.6 (real descriptors are not centred). The reference
(evaluation) set and the seed set are drawn from the same clusters. 0.5% of the pool rows are
replaced by near-copies of reference vectors, at distances drawn uniformly from (0, threshold]
(before centring), moved along the data's own noise directions: the hard case for an inverted
index.

Each step runs in a child process that reports its wall time and its own peak RSS
(``resource.getrusage`` ru_maxrss), so generation and the recall check do not count:

- ``decontamination``: the pool's mean (float64 sums over chunks, as the asset computes it when
  there is no near-duplicate index), then every pool vector's nearest reference
  (:func:`~curation_assets.core.dedup.decontaminate.nearest_references`: IVF above the size
  threshold, exact below), and the matches within the threshold;
- ``retrieval``: ``sample`` mode, the k = 4 nearest pool images of every seed within the
  similarity floor, deduplicated across seeds
  (:func:`~curation_assets.core.select.retrieval.sample_selection`).

Recall is measured against exact search (float32 products over chunks of the whole pool or
reference set, re-scored in float64) on ``--sample`` queries: for decontamination, a uniform
sample of pool rows (the nearest reference of each; apart, those within the threshold, which
decide removals, and within threshold + margin, the report's range) and as many planted copies
(their nearest reference must be found); for retrieval, a uniform sample of seeds (their k
nearest, and apart those above the floor). ``target_met`` reads the recall of what a step acts
on: matches within the threshold (sampled rows and planted copies), neighbours above the floor.
The exact product also gives the floor: the brute-force rate on this machine and the time an
exact search of the whole step would take (``exact_estimate_s``), so the step's time reads as a
ratio.

The data is not a worst case of uniformly random vectors (where every neighbour is far and an
inverted index degenerates to a scan): unrelated images are at cosine distance ~0.5 and more
after centring, as copy-detection descriptors of different images are, and the planted copies
stay within the threshold after centring (``planted_copies_within_threshold``).

Targets (2 CPU cores, 1M x 512 pool, 50k references, 50k seeds): each step <= 120 s and
<= 6 GB peak RSS, recall >= 0.99; ``target_met`` says whether a run made them.

Prints one JSON object to stdout; logs go to stderr.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the package importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

DIM = 512
CLUSTER_SIZE = 200
CLUSTER_WEIGHT = 0.8
SPECTRUM_POWER = 0.7
OFFSET_NORM = 0.6
COPY_FRACTION = 0.005
TARGET_SECONDS = 120.0
TARGET_RSS_GB = 6.0
TARGET_RECALL = 0.99


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux: KiB


# ----------------------------------------------------------------------------- data


class Generator:
    """Clustered vectors with a power-law noise spectrum and an offset (see the module docstring)."""

    def __init__(self, n_pool: int, seed: int):
        rng = np.random.default_rng(seed)
        rotation, _ = np.linalg.qr(rng.standard_normal((DIM, DIM)))
        spectrum = (np.arange(DIM) + 1.0) ** -SPECTRUM_POWER
        self.basis = (rotation * np.sqrt(spectrum / spectrum.sum())).T.astype(np.float32)
        n_clusters = max(8, n_pool // CLUSTER_SIZE)
        centres = rng.standard_normal((n_clusters, DIM)).astype(np.float32) @ self.basis
        self.centres = centres / np.linalg.norm(centres, axis=1, keepdims=True)
        weights = rng.pareto(1.0, n_clusters) + 1.0
        self.weights = weights / weights.sum()
        offset = rng.standard_normal(DIM).astype(np.float32)
        self.offset = offset * OFFSET_NORM / np.linalg.norm(offset)
        self.seed = seed

    def write(self, path: Path, n: int, stream: int, chunk: int = 65536) -> np.ndarray:
        out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(n, DIM))
        for index, start in enumerate(range(0, n, chunk)):
            part = np.random.default_rng([self.seed, stream, index])
            m = min(chunk, n - start)
            labels = part.choice(len(self.centres), m, p=self.weights)
            x = (
                CLUSTER_WEIGHT * self.centres[labels]
                + part.standard_normal((m, DIM), dtype=np.float32) @ self.basis
            )
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            out[start : start + m] = x + self.offset
        out.flush()
        return out

    def plant_copies(self, pool: np.ndarray, refs: np.ndarray, threshold: float) -> dict[str, np.ndarray]:
        """Replace COPY_FRACTION of the pool rows by near-copies of random references."""
        rng = np.random.default_rng([self.seed, 99])
        n_copies = max(1, int(len(pool) * COPY_FRACTION))
        rows = np.sort(rng.choice(len(pool), n_copies, replace=False))
        of = rng.integers(0, len(refs), n_copies)
        distance = np.maximum(rng.uniform(0.0, threshold, n_copies), 1e-4).astype(np.float32)
        x = refs[of].astype(np.float32) - self.offset
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        u = rng.standard_normal((n_copies, DIM), dtype=np.float32) @ self.basis
        u -= np.sum(u * x, axis=1, keepdims=True) * x
        u /= np.linalg.norm(u, axis=1, keepdims=True)
        cos = (1.0 - distance)[:, None]
        pool[rows] = cos * x + np.sqrt(1.0 - cos**2) * u + self.offset
        pool.flush()
        return {"rows": rows, "of": of, "distance": distance}


# ----------------------------------------------------------------------------- steps (children)


def pool_mean(pool: np.ndarray) -> np.ndarray:
    from curation_assets.core.dedup.index import dataset_mean

    return dataset_mean(np.asarray(pool[s : s + 65536], dtype=np.float32) for s in range(0, len(pool), 65536))


def step_decontamination(folder: Path, args: argparse.Namespace) -> dict:
    from curation_assets.core.dedup.decontaminate import nearest_references, reference_index
    from curation_assets.core.dedup.nearest import use_ivf

    started = time.perf_counter()
    pool = np.load(folder / "pool.npy", mmap_mode="r")
    refs = np.load(folder / "refs.npy")
    mean = pool_mean(pool)
    mean_s = time.perf_counter() - started
    # as the asset: calibrated for recall at the threshold (what removes an image), the report's
    # margin past it read from the same search
    report = args.threshold + args.margin
    ivf = (
        reference_index(refs, mean, pool, args.threshold, report_distance=report)
        if use_ivf(len(pool), len(refs), args.kind)
        else None
    )
    nearest = nearest_references(
        pool, refs, mean, kind=args.kind, relevant_distance=args.threshold, report_distance=report, ivf=ivf
    )
    total = time.perf_counter() - started
    np.savez(folder / "decontamination.npz", rows=nearest.rows, distance=nearest.distance, mean=mean)
    return {
        "seconds": round(total, 2),
        "mean_s": round(mean_s, 2),
        "search": "ivf" if ivf is not None else "flat",
        "ivf": ivf.stats if ivf is not None else None,
        "peak_rss_gb": round(peak_rss_gb(), 3),
        "contaminated": int((nearest.distance <= args.threshold).sum()),
    }


def step_retrieval(folder: Path, args: argparse.Namespace) -> dict:
    from curation_assets.core.select.retrieval import sample_selection

    started = time.perf_counter()
    pool = np.load(folder / "pool.npy", mmap_mode="r")
    seeds = np.load(folder / "seeds.npy")
    pool_ids = [f"p{i}" for i in range(len(pool))]
    names = [f"s{i}" for i in range(len(seeds))]
    found: dict = {}
    selected, counts = sample_selection(
        pool_ids,
        pool,
        {"seeds": (names, seeds)},
        args.k,
        args.min_similarity,
        kind=args.kind,
        neighbours=found,
    )
    total = time.perf_counter() - started
    np.savez(folder / "retrieval.npz", rows=found["seeds"].rows, similarity=found["seeds"].similarity)
    return {
        "seconds": round(total, 2),
        "peak_rss_gb": round(peak_rss_gb(), 3),
        "selected": selected.height,
        "counts": counts,
    }


STEPS = {"decontamination": step_decontamination, "retrieval": step_retrieval}


# ----------------------------------------------------------------------------- recall (parent)


def exact_rate(queries: np.ndarray, base, chunk: int = 32768) -> tuple[float, float]:
    """(seconds of the float32 products of ``queries`` against all of ``base``, products per second)."""
    seconds = 0.0
    for start in range(0, len(base), chunk):
        block = base[start : start + chunk]
        t = time.perf_counter()
        queries @ block.T
        seconds += time.perf_counter() - t
    return seconds, len(queries) * len(base) / seconds


def decontamination_recall(folder: Path, args: argparse.Namespace, planted: dict) -> dict:
    from curation_assets.core.dedup.nearest import Prepared, exact_knn

    pool = np.load(folder / "pool.npy", mmap_mode="r")
    refs = np.load(folder / "refs.npy")
    got = np.load(folder / "decontamination.npz")
    mean = got["mean"]
    rng = np.random.default_rng(args.seed + 1)
    uniform = np.sort(rng.choice(len(pool), min(args.sample, len(pool)), replace=False))
    copies = np.sort(rng.choice(len(planted["rows"]), min(args.sample, len(planted["rows"])), replace=False))
    base = Prepared(refs, mean)
    queries = Prepared(pool, mean)[uniform]
    truth, score = exact_knn(queries, base, 1)
    hit = got["rows"][uniform] == truth[:, 0]
    relevant = score[:, 0] >= 1.0 - (args.threshold + args.margin)
    within = score[:, 0] >= 1.0 - args.threshold
    copy_rows, copy_of = planted["rows"][copies], planted["of"][copies]
    # a planted copy counts as found when the search names its reference, or one at least as close
    copy_truth, copy_score = exact_knn(Prepared(pool, mean)[copy_rows], base, 1)
    copy_hit = got["rows"][copy_rows] == copy_truth[:, 0]
    copy_within = copy_score[:, 0] >= 1.0 - args.threshold  # the copies the decisions must remove
    _, rate = exact_rate(queries, base)
    return {
        "sampled_queries": len(uniform),
        "recall_at_1": round(float(hit.mean()), 4),
        "within_threshold": int(within.sum()),
        "recall_within_threshold": round(float(hit[within].mean()), 4) if within.any() else None,
        "within_threshold_plus_margin": int(relevant.sum()),
        "recall_within_threshold_plus_margin": round(float(hit[relevant].mean()), 4)
        if relevant.any()
        else None,
        "planted_copies_sampled": len(copies),
        "recall_planted_copies": round(float(copy_hit.mean()), 4),
        "recall_planted_copies_within_threshold": round(float(copy_hit[copy_within].mean()), 4)
        if copy_within.any()
        else None,
        "planted_copies_matching_their_reference": round(float((copy_truth[:, 0] == copy_of).mean()), 4),
        "planted_copies_within_threshold": round(float((copy_score[:, 0] >= 1.0 - args.threshold).mean()), 4),
        "exact_products_per_s": round(rate, 0),
        "exact_estimate_s": round(len(pool) * len(refs) / rate, 1),
    }


def retrieval_recall(folder: Path, args: argparse.Namespace) -> dict:
    from curation_assets.core.dedup.nearest import Prepared, exact_knn, recall

    pool = np.load(folder / "pool.npy", mmap_mode="r")
    seeds = np.load(folder / "seeds.npy")
    got = np.load(folder / "retrieval.npz")
    rng = np.random.default_rng(args.seed + 2)
    sample = np.sort(rng.choice(len(seeds), min(args.sample, len(seeds)), replace=False))
    queries = Prepared(seeds)[sample]
    base = Prepared(pool)
    truth, score = exact_knn(queries, base, args.k)
    found = got["rows"][sample]
    _, rate = exact_rate(queries, base)
    above = score >= args.min_similarity
    return {
        "sampled_queries": len(sample),
        "recall_at_k": round(recall(found, truth, score), 4),
        "neighbours_above_the_floor": int(above.sum()),
        "recall_above_the_floor": round(recall(found, truth, score, args.min_similarity), 4),
        "exact_products_per_s": round(rate, 0),
        "exact_estimate_s": round(len(pool) * len(seeds) / rate, 1),
    }


def run(args: argparse.Namespace, folder: Path) -> dict:
    n_seeds = args.seeds or args.refs
    t = time.perf_counter()
    generator = Generator(args.pool, args.seed)
    log(f"generating pool {args.pool} x {DIM}, references {args.refs}, seeds {n_seeds} -> {folder}")
    pool = generator.write(folder / "pool.npy", args.pool, 0)
    refs = generator.write(folder / "refs.npy", args.refs, 1)
    generator.write(folder / "seeds.npy", n_seeds, 2)
    planted = generator.plant_copies(pool, np.asarray(refs), args.threshold)
    del pool, refs
    log(f"generated in {time.perf_counter() - t:.1f} s")
    steps = {}
    for name in STEPS:
        log(f"step {name} (child process)")
        command = [sys.executable, str(Path(__file__).resolve()), "--_step", name, str(folder), *sys.argv[1:]]
        child = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True)
        steps[name] = json.loads(child.stdout)
        log(f"  {steps[name]}")
    log("recall against exact search")
    steps["decontamination"]["recall"] = decontamination_recall(folder, args, planted)
    steps["retrieval"]["recall"] = retrieval_recall(folder, args)
    met = {}
    # recall of what each step acts on: the matches within the threshold (which remove an image:
    # sampled pool rows and planted copies), the neighbours above the retrieval floor
    for name, keys in (
        ("decontamination", ("recall_within_threshold", "recall_planted_copies_within_threshold")),
        ("retrieval", ("recall_above_the_floor",)),
    ):
        step = steps[name]
        recalls = [step["recall"][key] for key in keys]
        met[name] = bool(
            step["seconds"] <= TARGET_SECONDS
            and step["peak_rss_gb"] <= TARGET_RSS_GB
            and all(r is None or r >= TARGET_RECALL for r in recalls)
        )
    import faiss
    import torch

    return {
        "benchmark": "retrieval",
        "pool": args.pool,
        "references": args.refs,
        "seeds": n_seeds,
        "dim": DIM,
        "k": args.k,
        "threshold": args.threshold,
        "report_margin": args.margin,
        "min_similarity": args.min_similarity,
        "planted_copies": len(planted["rows"]),
        "kind": args.kind,
        "steps": steps,
        "targets": {"seconds": TARGET_SECONDS, "peak_rss_gb": TARGET_RSS_GB, "recall": TARGET_RECALL},
        "target_met": met,
        "versions": {"faiss": faiss.__version__, "torch": torch.__version__, "numpy": np.__version__},
        "threads": {"faiss_omp": faiss.omp_get_max_threads(), "torch": torch.get_num_threads()},
    }


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pool", type=int, default=1_000_000)
    parser.add_argument("--refs", type=int, default=50_000, help="reference (evaluation) vectors")
    parser.add_argument("--seeds", type=int, default=None, help="seed vectors (default: --refs)")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--threshold", type=float, default=0.1, help="decontamination distance")
    parser.add_argument("--margin", type=float, default=0.1, help="the report's margin past the threshold")
    parser.add_argument("--min-similarity", type=float, default=0.5, help="the retrieval floor")
    parser.add_argument("--sample", type=int, default=1000, help="queries checked against exact search")
    parser.add_argument("--kind", default="auto", choices=("auto", "flat", "ivf"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", type=Path, default=None, help="keep the generated data in this folder")
    parser.add_argument("--_step", nargs=2, metavar=("STEP", "FOLDER"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str]) -> None:
    args = parse(argv)
    if args._step:
        name, folder = args._step
        print(json.dumps(STEPS[name](Path(folder), args)))
        return
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
        result = run(args, args.keep)
    else:
        with tempfile.TemporaryDirectory(prefix="bench_retrieval_") as tmp:
            result = run(args, Path(tmp))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
