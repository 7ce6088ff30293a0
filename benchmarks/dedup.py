"""Near-duplicate search at scale: index + every pair under the threshold + grouping, timed.

    python benchmarks/dedup.py [--sizes 200000 1000000] [--threshold 0.1] [--kind auto]
                               [--params '{"nprobe": 16}'] [--sample 2000] [--seed 0] [--keep DIR]
                               [--vs-vdc] [--vdc-max-n 200000]

For each size N, synthetic 512-d vectors are generated in float16 chunks into a memory-mapped
.npy (as the store keeps embeddings), then a child process runs the pipeline on that file
and reports its own peak RSS (``resource.getrusage`` ru_maxrss), so generation and the
recall check do not count:

    mean (float64 sums over chunks) -> prepare (centre, L2-normalise) -> build the index
    (kind ``auto``: flat up to 65,536 vectors on the CPU, IVF above; train + add) ->
    find_pairs over every row (search, exact re-scoring) -> connected components.

Targets (2 CPU cores): 200k vectors in <= 8 s, 1M in <= 40 s with a peak RSS <= 6 GB, both
at recall >= 0.99; with ``--vs-vdc`` also >= 5x faster than VDC on the same vectors in the
same run, at a higher recall. ``target_met`` says whether a run made them.

``--vs-vdc`` runs the peer, VDC (``vision-data-curation`` 0.1.1, installed by ``make
bench-setup``), on the same vectors right after ours, for sizes up to ``--vdc-max-n``: its
own CLI (``python -m vdc.scripts.build_lsh_index`` with centring and L2 normalisation, then
``deduplicate_images`` with the LSH index, cosine distance and the same report threshold)
reading the parquet layout it expects (a ``sample`` column and an ``embedding``
fixed-size list; float32, written before the clock starts). Reported: its wall time per
step, the pairs it found, its recall on the same sample, and our speed-up. Without VDC
installed the report says so and gives no ratio.

The data (fixed by ``--seed``): cluster centres with heavy-tailed (Pareto) sizes, one
cluster per 200 vectors; each vector is 0.8 x its centre plus noise with a power-law
spectrum (variance ~ rank^-0.7 along random directions), normalised, plus a constant offset
of norm 0.6 (real descriptors are not centred). Nearest unrelated neighbours then sit at
cosine distance ~0.34-0.5. 1% of the rows are replaced by near-duplicates of other rows
(a fifth of them share their original with another copy: triples), at cosine distances
drawn uniformly from (0, threshold] after centring. A copy moves along the data's own
noise directions, which are the directions that decide IVF cells: the hard case for an
inverted index (isotropic noise would mostly stay in the cell).

Threshold: 0.1 by default, the report threshold of a sweep-free run (one threshold, no
sweep over several); every pair up to it is searched.

Recall is measured against exact search on a sample of query rows: ``--sample`` / 2 rows
drawn uniformly and as many drawn from the planted rows (copies and their originals; a
uniform sample of 2,000 holds only ~40 pairs, too few to measure 0.99). Every pair of a
sample row under the threshold is found by an exact float32 product against all vectors
(chunked) and confirmed in float64; recall is the share of those pairs the pipeline
returned. The same product gives the floor: the exact-search rate (queries per second
against all N vectors on this machine) and the all-pairs time it implies (N / rate / 2,
a self-join being symmetric), so the pipeline's time reads as a ratio to brute force.

Prints one JSON object to stdout; logs go to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
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
DUP_FRACTION = 0.01
TRIPLE_SHARE = 0.2
CLUSTER_SIZE = 200
CLUSTER_WEIGHT = 0.8
SPECTRUM_POWER = 0.7
OFFSET_NORM = 0.6
TARGETS = {200_000: {"seconds": 8.0}, 1_000_000: {"seconds": 40.0, "peak_rss_gb": 6.0}}
TARGET_RECALL = 0.99
TARGET_VS_VDC = 5.0  # our speed-up over VDC on the same vectors, at a higher recall
VDC_VERSION = "0.1.1"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


# ----------------------------------------------------------------------------- data


def generate(path: Path, n: int, threshold: float, seed: int, chunk: int = 65536) -> dict[str, np.ndarray]:
    """Write N x 512 float16 vectors to ``path`` (.npy); return the planted pairs."""
    rng = np.random.default_rng(seed)
    rotation, _ = np.linalg.qr(rng.standard_normal((DIM, DIM)))
    spectrum = (np.arange(DIM) + 1.0) ** -SPECTRUM_POWER
    # z @ basis: noise with the power-law spectrum along random directions, unit expected norm
    basis = (rotation * np.sqrt(spectrum / spectrum.sum())).T.astype(np.float32)
    n_clusters = max(8, n // CLUSTER_SIZE)
    centres = rng.standard_normal((n_clusters, DIM)).astype(np.float32) @ basis
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    weights = rng.pareto(1.0, n_clusters) + 1.0
    weights /= weights.sum()
    offset = rng.standard_normal(DIM).astype(np.float32)
    offset *= OFFSET_NORM / np.linalg.norm(offset)

    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(n, DIM))
    for index, start in enumerate(range(0, n, chunk)):
        part = np.random.default_rng([seed, index])
        m = min(chunk, n - start)
        labels = part.choice(n_clusters, m, p=weights)
        x = CLUSTER_WEIGHT * centres[labels] + part.standard_normal((m, DIM), dtype=np.float32) @ basis
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out[start : start + m] = x + offset

    n_dup = int(n * DUP_FRACTION)
    order = rng.permutation(n)
    copies, originals = order[:n_dup], order[n_dup : 2 * n_dup].copy()
    shared = int(n_dup * TRIPLE_SHARE) // 2
    originals[:shared] = originals[shared : 2 * shared]  # two copies of one original: triples
    distances = rng.uniform(0.0, threshold, n_dup).astype(np.float32)
    distances = np.maximum(distances, 1e-4)
    for start in range(0, n_dup, chunk):
        sl = slice(start, start + chunk)
        x = out[originals[sl]].astype(np.float32) - offset
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        u = rng.standard_normal((len(x), DIM), dtype=np.float32) @ basis
        u -= np.sum(u * x, axis=1, keepdims=True) * x
        u /= np.linalg.norm(u, axis=1, keepdims=True)
        cos = (1.0 - distances[sl])[:, None]
        out[copies[sl]] = cos * x + np.sqrt(1.0 - cos**2) * u + offset
    out.flush()
    del out
    return {"copies": copies, "originals": originals}


# ----------------------------------------------------------------------------- the pipeline (child)


def components(n: int, rows_a: np.ndarray, rows_b: np.ndarray) -> tuple[np.ndarray, str]:
    """(component label per row, what computed it): the project's grouping when present,
    else a tiny union-find."""
    try:
        from curation_assets.core.dedup.grouping import connected_components
    except ImportError:
        parent = np.arange(n)

        def root(i: int) -> int:
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        for a, b in zip(rows_a.tolist(), rows_b.tolist(), strict=True):
            ra, rb = root(a), root(b)
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)
        return np.array([root(i) for i in range(n)]), "union-find (benchmarks/dedup.py)"
    return connected_components(n, rows_a, rows_b), "curation_assets.core.dedup.grouping.connected_components"


def pipeline(path: Path, threshold: float, kind: str, params: dict, seed: int, pairs_out: Path) -> dict:
    import faiss
    import torch

    from curation_assets.core.dedup.index import VectorIndex, choose_kind, dataset_mean, find_pairs, prepare
    from curation_assets.core.products import bf16_is_faster

    phases: dict[str, float] = {}
    started = time.perf_counter()
    raw = np.load(path, mmap_mode="r")
    n = len(raw)
    t = time.perf_counter()
    mean = dataset_mean(raw[s : s + 65536] for s in range(0, n, 65536))
    prepared = prepare(raw, mean)
    del raw  # unmapped: only the prepared copy stays
    phases["prepare_s"] = time.perf_counter() - t

    chosen = choose_kind(n, kind, on_gpu=False)
    index = VectorIndex.build(chosen, prepared, params or None, seed=seed, mean=mean)
    phases["train_s"] = index.timings.get("train_s", 0.0)
    phases["add_s"] = index.timings.get("add_s", 0.0)

    stats: dict = {}
    rows_a, rows_b, distance = find_pairs(
        index, prepared, np.arange(n, dtype=np.int64), threshold, prepared, stats=stats
    )
    phases["search_s"] = stats["search_s"]
    phases["rescore_s"] = stats["rescore_s"]

    t = time.perf_counter()
    labels, grouping = components(n, rows_a, rows_b)
    sizes = np.bincount(labels)
    phases["grouping_s"] = time.perf_counter() - t
    total = time.perf_counter() - started
    np.savez(pairs_out, rows_a=rows_a, rows_b=rows_b, distance=distance)
    return {
        "n": n,
        "kind": index.kind,
        "params": index.params,
        "precision": stats.get("precision"),
        "versions": {"faiss": faiss.__version__, "torch": torch.__version__, "numpy": np.__version__},
        "threads": {"faiss_omp": faiss.omp_get_max_threads(), "torch": torch.get_num_threads()},
        # IVF lists trained by our k-means; its assignment screened in bfloat16 where that is faster
        "bf16_products": bool(bf16_is_faster()),
        "grouping": grouping,
        "phases": {k: round(v, 2) for k, v in phases.items()},
        "total_s": round(total, 2),
        "peak_rss_gb": round(peak_rss_bytes() / 1e9, 3),
        "peak_rss_gib": round(peak_rss_bytes() / 2**30, 3),
        "pairs": len(rows_a),
        "lists_per_query": stats.get("lists_per_query"),
        "candidates": stats.get("candidates"),
        "capped_queries": stats.get("capped_queries"),
        "groups": int((sizes > 1).sum()),
        "largest_group": int(sizes.max(initial=0)),
    }


# ----------------------------------------------------------------------------- VDC, the peer


def vdc_installed() -> str | None:
    """VDC's version when it and what its scripts import are installed, else None."""
    import importlib.metadata
    import importlib.util

    if any(importlib.util.find_spec(name) is None for name in ("vdc", "pt_kmeans", "birder")):
        return None
    try:
        return importlib.metadata.version("vision-data-curation")
    except importlib.metadata.PackageNotFoundError:
        return None


def write_vdc_parquet(vectors: np.ndarray, path: Path, chunk: int = 65536) -> None:
    """The layout VDC reads: ``sample`` (the row number as text) and ``embedding``
    (a fixed-size list of float32), written in row groups from the (memory-mapped) vectors."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    n, dim = vectors.shape
    schema = pa.schema([("sample", pa.string()), ("embedding", pa.list_(pa.float32(), dim))])
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, n, chunk):
            block = np.ascontiguousarray(vectors[start : start + chunk], dtype=np.float32)
            samples = pa.array([str(i) for i in range(start, start + len(block))], pa.string())
            embedding = pa.FixedSizeListArray.from_arrays(pa.array(block.reshape(-1)), dim)
            writer.write_table(pa.Table.from_arrays([samples, embedding], schema=schema))


# Runs one VDC script's own entry point (its main(), which parses the arguments as its CLI
# does) in a fresh interpreter, and times main() apart from the imports: torch, birder and
# tensorboard take ~10 s to import on 2 cores, a cost our own figures do not include either.
_VDC_RUNNER = """
import json, sys, time, importlib
module = importlib.import_module("vdc.scripts." + sys.argv[1])
sys.argv = [module.__file__, *sys.argv[2:]]
started = time.perf_counter()
module.main()
print("VDC_RUN_S " + json.dumps(time.perf_counter() - started))
"""


def run_vdc_step(module: str, arguments: list[str], folder: Path) -> dict:
    """One VDC CLI step (``python -m vdc.scripts.<module> ARGS``) run in ``folder`` (its
    results/ and config lookups are relative to the working directory): the seconds of its
    main() (``run_s``) and of the whole process with its imports (``wall_s``)."""
    log(f"  VDC: python -m vdc.scripts.{module} {' '.join(arguments)}")
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", _VDC_RUNNER, module, *arguments], cwd=folder, capture_output=True, text=True
    )
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"VDC {module} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    marks = [line for line in done.stdout.splitlines() if line.startswith("VDC_RUN_S ")]
    return {"run_s": round(float(marks[-1].split()[1]), 2), "wall_s": round(wall, 2)}


def run_vdc(vectors_path: Path, folder: Path, threshold: float, seed: int) -> dict:
    """VDC's LSH near-duplicate search on the vectors at ``vectors_path``: timings and pairs."""
    raw = np.load(vectors_path, mmap_mode="r")
    work = folder / "vdc"
    work.mkdir(exist_ok=True)
    parquet = work / "embeddings.parquet"
    t = time.perf_counter()
    write_vdc_parquet(raw, parquet)
    log(f"  VDC input written in {time.perf_counter() - t:.1f} s: {parquet}")
    index, report = work / "lsh_index.pkl", work / "deduplication_report.csv"
    common = ["--device", "cpu", "--non-interactive", "--force", "--random-seed", str(seed)]
    build = run_vdc_step(
        "build_lsh_index",
        [*common, "--center-embeddings", "--l2-normalize", "--output-file", str(index), str(parquet)],
        work,
    )
    search = run_vdc_step(
        "deduplicate_images",
        [
            *common,
            *("--lsh-index", str(index), "--distance-metric", "cosine"),
            *("--report-threshold", str(threshold), "--output-csv", str(report), str(parquet)),
        ],
        work,
    )
    import polars as pl

    table = pl.read_csv(report, schema_overrides={"sample_id_1": pl.Int64, "sample_id_2": pl.Int64})
    a, b = table["sample_id_1"].to_numpy(), table["sample_id_2"].to_numpy()
    pairs = set(zip(np.minimum(a, b).tolist(), np.maximum(a, b).tolist(), strict=True))
    for leftover in (parquet, index, report):
        leftover.unlink(missing_ok=True)
    return {
        "seconds": {
            "build_lsh_index": build,
            "deduplicate_images": search,
            # what the two steps' main() took, imports apart: compared with our total_s
            "total_s": round(build["run_s"] + search["run_s"], 2),
            "total_wall_s": round(build["wall_s"] + search["wall_s"], 2),
        },
        "pairs_found": pairs,
    }


# ----------------------------------------------------------------------------- recall (parent)


def exact_sample(path: Path, sample: np.ndarray, threshold: float, chunk: int = 65536) -> dict:
    """Every pair of the sample rows under the threshold, by exact search against all rows."""
    from curation_assets.core.dedup.index import dataset_mean, prepare

    raw = np.load(path, mmap_mode="r")
    n = len(raw)
    mean = dataset_mean(raw[s : s + chunk] for s in range(0, n, chunk))
    queries = prepare(raw[sample], mean)
    found_q, found_b = [], []
    seconds = 0.0
    for start in range(0, n, chunk):
        block = prepare(raw[start : start + chunk], mean)
        t = time.perf_counter()
        scores = queries @ block.T
        seconds += time.perf_counter() - t
        qi, bi = np.nonzero(scores >= 1.0 - threshold - 1e-4)
        found_q.append(qi)
        found_b.append(bi + start)
    qi, bi = np.concatenate(found_q), np.concatenate(found_b)
    a, b = sample[qi], bi
    keep = a != b
    a, b, qi = a[keep], b[keep], qi[keep]
    vb = prepare(raw[np.sort(np.unique(b))], mean)
    lookup = {row: i for i, row in enumerate(np.sort(np.unique(b)).tolist())}
    exact = 1.0 - np.einsum("ij,ij->i", queries[qi], vb[[lookup[r] for r in b.tolist()]], dtype=np.float64)
    keep = exact <= threshold
    lo, hi = np.minimum(a, b)[keep], np.maximum(a, b)[keep]
    pairs = dict(zip(zip(lo.tolist(), hi.tolist(), strict=True), exact[keep].tolist(), strict=True))
    rate = len(sample) / seconds
    return {"pairs": pairs, "seconds": seconds, "rate": rate, "all_pairs_s": n / rate / 2}


def vdc_figures(ran: dict, truth: dict, found: dict, ours: dict) -> dict:
    """VDC's run next to ours: its pairs, its recall on the same sample, our speed-up."""
    theirs = ran.pop("pairs_found")
    truth_pairs = list(truth["pairs"])
    return {
        "installed": True,
        "method": "build_lsh_index (4 tables x 18 bits, centred, L2) + deduplicate_images (cosine)",
        **ran["seconds"],
        "pairs": len(theirs),
        "recall": round(sum(p in theirs for p in truth_pairs) / max(1, len(truth_pairs)), 4),
        "recall_pairs": len(truth_pairs),
        "our_pairs_it_missed": len(set(found) - theirs),
        "speedup_ours_vs_vdc": round(ran["seconds"]["total_s"] / ours["total_s"], 2),
    }


def run_size(n: int, args: argparse.Namespace, folder: Path) -> dict:
    path = folder / f"vectors_{n}.npy"
    log(f"[{n}] generating {n} x {DIM} float16 vectors -> {path}")
    t = time.perf_counter()
    planted = generate(path, n, args.threshold, args.seed)
    log(f"[{n}] generated in {time.perf_counter() - t:.1f} s")

    pairs_out = folder / f"pairs_{n}.npz"
    command = [sys.executable, str(Path(__file__).resolve()), "--_pipeline", str(path), str(pairs_out)]
    command += ["--threshold", str(args.threshold), "--kind", args.kind, "--seed", str(args.seed)]
    command += ["--params", json.dumps(args.params)]
    log(f"[{n}] pipeline (child process)")
    child = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True)
    result = json.loads(child.stdout)
    log(f"[{n}] {result['kind']} {result['params']}: {result['total_s']} s, {result['phases']}")

    rng = np.random.default_rng(args.seed + 1)
    half = args.sample // 2
    uniform = rng.choice(n, half, replace=False)
    planted_rows = np.unique(np.concatenate([planted["copies"], planted["originals"]]))
    planted_sample = rng.choice(planted_rows, min(half, len(planted_rows)), replace=False)
    sample = np.unique(np.concatenate([uniform, planted_sample]))
    log(f"[{n}] exact search for {len(sample)} sample rows")
    truth = exact_sample(path, sample, args.threshold)
    got = np.load(pairs_out)
    found = dict(
        zip(
            zip(got["rows_a"].tolist(), got["rows_b"].tolist(), strict=True),
            got["distance"].tolist(),
            strict=True,
        )
    )

    def recall_of(rows: np.ndarray) -> tuple[float, int]:
        members = set(rows.tolist())
        pairs = [p for p in truth["pairs"] if p[0] in members or p[1] in members]
        return sum(p in found for p in pairs) / max(1, len(pairs)), len(pairs)

    recall, n_pairs = recall_of(sample)
    recall_uniform, n_uniform = recall_of(uniform)
    recall_planted, n_planted = recall_of(planted_sample)
    vdc: dict | None = None
    if args.vs_vdc:
        version = vdc_installed()
        if version is None:
            vdc = {"installed": False, "note": "VDC not installed (make bench-setup): no VDC figures"}
        elif n > args.vdc_max_n:
            vdc = {"installed": True, "note": f"not run: n > --vdc-max-n {args.vdc_max_n}"}
        else:
            log(f"[{n}] VDC {version} on the same vectors")
            try:
                vdc = vdc_figures(run_vdc(path, folder, args.threshold, args.seed), truth, found, result)
                vdc["version"] = version
                log(f"[{n}] VDC: {vdc['total_s']} s, {vdc['pairs']} pairs, recall {vdc['recall']:.4f}")
            except RuntimeError as error:  # the peer failing does not fail our benchmark
                vdc = {"installed": True, "version": version, "error": str(error)[-2000:]}
    hits = [p for p in truth["pairs"] if p in found]
    max_error = max((abs(found[p] - truth["pairs"][p]) for p in hits), default=0.0)
    target = TARGETS.get(n, {})
    result.update(
        {
            "recall": round(recall, 4),
            "recall_pairs": n_pairs,
            "recall_sample_rows": len(sample),
            "recall_uniform_rows": {"recall": round(recall_uniform, 4), "pairs": n_uniform},
            "recall_planted_rows": {"recall": round(recall_planted, 4), "pairs": n_planted},
            "max_distance_error": max_error,
            "floor_exact": {
                "sample_queries": len(sample),
                "seconds": round(truth["seconds"], 2),
                "queries_per_s": round(truth["rate"], 1),
                "all_pairs_s_extrapolated": round(truth["all_pairs_s"], 1),
                "speedup_vs_exact": round(truth["all_pairs_s"] / result["total_s"], 1),
            },
            "target": {**target, "recall": TARGET_RECALL},
        }
    )
    met = recall >= TARGET_RECALL
    if "seconds" in target:
        met &= result["total_s"] <= target["seconds"]
    if "peak_rss_gb" in target:
        met &= result["peak_rss_gb"] <= target["peak_rss_gb"]
    if vdc is not None:
        result["vdc"] = vdc
        if "speedup_ours_vs_vdc" in vdc:
            result["target"]["speedup_vs_vdc"] = TARGET_VS_VDC
            met &= vdc["speedup_ours_vs_vdc"] >= TARGET_VS_VDC and recall > vdc["recall"]
    result["target_met"] = bool(met)
    log(f"[{n}] recall {recall:.4f} over {n_pairs} pairs; target met: {met}")
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[200_000, 1_000_000])
    parser.add_argument("--threshold", type=float, default=0.1)
    parser.add_argument("--kind", default="auto", help="auto, flat, ivf, hnsw or lsh")
    parser.add_argument(
        "--params", type=json.loads, default={}, help="index parameters as JSON, e.g. '{\"nprobe\": 16}'"
    )
    parser.add_argument("--sample", type=int, default=2000, help="query rows checked against exact search")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", type=Path, help="keep the generated vectors and pairs in this folder")
    parser.add_argument("--vs-vdc", action="store_true", help="run VDC's CLI on the same vectors too")
    parser.add_argument(
        "--vdc-max-n", type=int, default=200_000, help="largest size VDC runs at (its search is Python loops)"
    )
    parser.add_argument("--_pipeline", nargs=2, metavar=("VECTORS", "PAIRS_OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args._pipeline:
        vectors, pairs_out = (Path(p) for p in args._pipeline)
        print(json.dumps(pipeline(vectors, args.threshold, args.kind, args.params, args.seed, pairs_out)))
        return

    with tempfile.TemporaryDirectory(prefix="dedup-bench-") as tmp:
        folder = args.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        runs = [run_size(n, args, folder) for n in args.sizes]
    print(
        json.dumps(
            {
                "benchmark": "near-duplicate pairs: index + all pairs + grouping",
                "dim": DIM,
                "threshold": args.threshold,
                "duplicates": DUP_FRACTION,
                "cpu_count": os.cpu_count(),
                "runs": runs,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
