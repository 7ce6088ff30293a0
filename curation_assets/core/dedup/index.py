"""Vector indexes for near-duplicate search, and every pair under a cosine distance.

Vectors are searched *prepared*: centred with a dataset mean and L2-normalised
(:func:`prepare`), so the inner product of two of them is their cosine similarity and the
cosine distance is ``1 - dot``. Rows are numbered in the order vectors were added; faiss's
sequential ids are those rows.

Index kinds (:class:`VectorIndex`):

- ``flat``: exact, ``IndexFlatIP``; moved to a GPU with faiss's GPU API when asked and one
  is available.
- ``ivf``: ``IndexIVFFlat`` (or ``IndexIVFPQ`` when ``pq_m`` is set): spherical k-means
  lists trained on a seeded sample; a query searches those of its ``nprobe`` nearest lists
  whose centroid score is within the probe window of its best (see :func:`default_nprobe`).
  The lists' centroids come from our own training (:func:`quantizer.train_centroids`:
  faiss's algorithm with bfloat16 products, ~20x faster than faiss's here) and are handed
  to faiss's quantizer; faiss trains the PQ codebooks, if any.
- ``hnsw``: ``IndexHNSWFlat`` with inner product (graph search, CPU only).
- ``lsh``: random-hyperplane bits as in VDC, for parity (CPU only, exhaustive Hamming
  search). VDC hashes 4 tables x 18 bits and pairs vectors that share a bucket in any
  table; here the 4 x 18 = 72 bits are one code (a seeded random rotation to 72
  dimensions, then the sign of each: ``IndexLSH`` on top of a ``RandomRotationMatrix``).
  The Hamming distance over the 72 bits is the sum of the four tables' Hamming distances,
  and the k nearest codes are taken instead of exact bucket matches: an exact match of 18
  bits catches a pair at distance 0.1 (26 degrees, each bit flips with p = 0.14) in one
  table with probability 0.86^18 = 6%, in any of 4 tables 23%; the k nearest codes catch
  nearly all of them. Candidates are re-scored exactly anyway.

:func:`find_pairs` returns every pair within a distance, re-scored exactly. How it finds
candidates:

- ``flat`` and IVF-Flat on the CPU: a blocked join. Queries are grouped by inverted list
  (IVF: each query goes to its ``nprobe`` nearest lists; flat: one list holding every
  vector), and each group is multiplied with the list's vectors as one matrix product
  (torch; in bfloat16 where this CPU multiplies bfloat16 faster than float32, with a
  margin that covers its rounding), keeping the scores over the threshold. faiss's own
  ``range_search`` scans the lists query by query with vector instructions but no matrix
  products: on 200k x 512-d vectors with 2 cores and queries sorted by list it ran at the
  equivalent of ~22 GFLOP/s, a grouped float32 product (numpy) at ~85 and the bfloat16
  one (torch, oneDNN) at ~400. At 1M vectors that is ~50 s of search instead of an
  estimated ~10 minutes. faiss stores, saves and loads the lists; vectors are assigned to
  lists with the join's own products (the same nearest-centroid rule, 1.5x faster than
  faiss's float32 quantizer here; in bfloat16 ~3% of vectors go to a runner-up list within
  rounding of the nearest, which costs the join nothing as it probes by the same scores).
  The join's gathers and row maxima run in numpy (single-threaded, and faster): torch's
  parallel ops each wait for both cores, which on a shared CPU stalls every call.
  ``faiss.contrib.big_batch_search`` groups queries the same way but only for k-NN with a
  heap per query, 7x slower than the float32 product here. Range-style results also keep
  a big group of copies whole (no k cut).
- HNSW, LSH, IVF-PQ and GPU indexes: faiss k-NN search (``k`` = 32 per query; a query
  whose k results are all within range is searched again with 4x k, up to the cap, so a
  big group of copies is not cut). GPU faiss has no range search.

Bounded memory: no N x N matrix, products are tiled (at most 4096 x 4096 scores at a
time), and at most ``max_neighbours`` (default 100) candidates are kept per query row:
when a query has more neighbours within range than that (degenerate data: thousands of
identical vectors), the closest ``max_neighbours`` are kept and a RuntimeWarning says how
many queries were cut. Such a group still comes out connected (each member keeps
``max_neighbours`` links), but not every pair of it is listed. The output is therefore at
most ``len(query_rows) * max_neighbours`` pairs. Besides the caller's prepared vectors and
the index (2 GB each at 1M x 512), a search needs ~0.4 GB at 1M.

Incremental use: add a new shard's prepared vectors to the index (:meth:`VectorIndex.add`,
no retraining) and call :func:`find_pairs` with ``query_rows`` = the new rows: every
(new, old) and (new, new) pair comes out exactly once; (old, old) pairs are known already.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from curation_assets.core.dedup.quantizer import top_lists, train_centroids
from curation_assets.core.products import bf16_is_faster, in_order, padded, torch_workers

log = logging.getLogger(__name__)

KINDS = ("flat", "ivf", "hnsw", "lsh")
DEFAULT_K = 32
DEFAULT_MAX_NEIGHBOURS = 100

# ``auto`` picks exact ``flat`` up to these sizes, IVF above (see choose_kind).
CPU_FLAT_MAX = 65_536
GPU_FLAT_MAX = 2_000_000

# Join tiles: a product block is at most QUERY_TILE x BASE_TILE scores (32 MiB in bfloat16),
# padded in bfloat16 to multiples of PAD_QUERIES x PAD_BASE (a bounded set of shapes, see _Blocks).
QUERY_TILE = 4096
BASE_TILE = 4096
PAD_QUERIES = 512
PAD_BASE = 64
# Largest bfloat16 copy of the queries the join keeps for its gathers (see _QuerySource.words).
WORDS_MAX_BYTES = 512 << 20
# Candidates held before pruning to max_neighbours per query (grows when that is not enough).
COMPACT_AT = 1 << 24
# Most (row, list) entries the IVF add keeps for the next search (256 MiB of int32).
PROBE_CACHE_MAX = 1 << 26
# Score margins for candidates before exact re-scoring. bfloat16 keeps 8 significant bits
# (unit roundoff 2^-8): rounding both inputs moves each product a_i * b_i by at most ~2^-7 of
# itself, so a dot product of unit vectors by at most 2^-7 (sum |a_i * b_i| <= 1); the sum is
# accumulated in float32 and rounding it to bfloat16 adds 2^-8: 1/64 covers the worst case.
# float32 (d * 2^-24 for d = 512: 3e-5) and faiss's own scores (GPU: maybe TF32) likewise.
BF16_MARGIN = 1 / 64
FP32_MARGIN = 1e-4
# The IVF self-join's probe window, as a share of the longest chord of a pair in range (see
# default_nprobe).
PROBE_WINDOW = 0.2
KNN_MARGIN = 1e-3
GPU_MARGIN = 1e-2
GPU_MAX_K = 2048  # faiss GPU k-selection limit

INDEX_FILE = "index.faiss"
MEAN_FILE = "mean.npy"
META_FILE = "index.json"
FORMAT_VERSION = 1

VectorSource = np.ndarray | Callable[[np.ndarray], np.ndarray]


# ----------------------------------------------------------------------------- preparation


def prepare(vectors: np.ndarray, mean: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """``vectors`` as float32, centred with ``mean`` and L2-normalised, one chunk at a time.

    Works on a memory-mapped float16 array without loading it twice: each chunk is read,
    converted and written into the result. Rows that end up zero (a vector equal to the
    mean) or non-finite stay (or become) zero: they pair with nothing.
    """
    n = len(vectors)
    dim = vectors.shape[1] if vectors.ndim == 2 else 0
    centre = np.asarray(mean, dtype=np.float32).reshape(-1)
    if n and centre.shape[0] != dim:
        raise ValueError(f"mean has {centre.shape[0]} dimensions, vectors have {dim}")
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, chunk):
        block = out[start : start + chunk]
        block[...] = vectors[start : start + chunk]  # one read of the (memory-mapped) chunk
        block -= centre
        norms = np.sqrt(np.einsum("ij,ij->i", block, block))
        good = np.isfinite(norms) & (norms > 0)
        if not good.all():
            block[~good] = 0.0
        block *= np.divide(1.0, norms, out=np.zeros_like(norms), where=good)[:, None]
    return out


def dataset_mean(chunks: Iterable[np.ndarray]) -> np.ndarray:
    """Mean vector over row chunks (summed in float64; returned as float32)."""
    total: np.ndarray | None = None
    count = 0
    for chunk in chunks:
        block = np.asarray(chunk)
        if block.ndim != 2 or not len(block):
            continue
        part = block.sum(axis=0, dtype=np.float64)
        total = part if total is None else total + part
        count += len(block)
    if total is None:
        raise ValueError("dataset_mean: no vectors")
    return (total / count).astype(np.float32)


# ----------------------------------------------------------------------------- parameters


def _pow2(value: float) -> int:
    return 1 << max(0, round(math.log2(max(value, 1.0))))


def default_nlist(n: int) -> int:
    """Inverted lists for ``n`` vectors: the power of two nearest 2 * sqrt(n), 16..65536,
    and no more than n / 39 (faiss's minimum of training points per list).

    Half the usual 4 * sqrt(n): at 1M, 4096 lists would take ~4x the k-means time of 2048
    (~40 s instead of 10 on 2 cores, 40 training points per list) and twice the assignment
    work, for a search that costs about the same: what a query scans is the share
    nprobe / nlist of the data (see default_nprobe).
    """
    by_size = min(max(_pow2(2 * math.sqrt(max(n, 1))), 16), 65536)
    return max(1, min(by_size, n // 39))


def default_nprobe(nlist: int) -> int:
    """Lists searched per query: nlist / 128, at least 16 (all of them for tiny indexes).

    Near-duplicates at cosine distance 0.1 are 26 degrees apart, which is large next to
    the cells of a fine partition: the two vectors of a pair often sit in different lists
    (a third of the pairs at 1M vectors / 2048 lists), and the share of lists that must be
    searched for 99% of the pairs stays about constant as nlist grows. Measured with
    benchmarks/dedup.py (clustered data, copies moved along the data's own directions, a
    pair found from either side): nprobe 8 reached recall 0.986 at 65k / 512 lists and
    0.998 at 200k / 1024; 16 reached 0.997, 1.000 and, at 1M / 2048 lists, 0.996.

    The self-join then narrows each query's nprobe lists to a window (``probe_window``,
    PROBE_WINDOW by default): the lists whose centroid score is within ``probe_window *
    sqrt(2 * max_distance)`` of the query's best. Why this scale: for a pair (a, b) at
    cosine distance t, b stored in list B, the amount by which B's score falls below a's best
    list A is at most (a - b).(c_A - c_B), and |a - b| = sqrt(2t). A query deep inside its
    cell then searches one or two lists, one near a border searches up to nprobe. On the
    same benchmark (threshold 0.1: a window of 0.089 in score) the join scored ~0.45 of the
    (query, row) products of all 16 lists at 200k (6.7 lists per query) and ~0.65 at 1M;
    recall went from 0.999 to 0.997 at 200k and from 0.997 to 0.996 at 1M, and the search
    from 3.3 to 1.5 s and from 44 to 23 s. ``probe_window: 0`` searches all nprobe lists.
    """
    return min(nlist, max(16, nlist // 128))


def default_train_size(nlist: int, n: int, pq_bits: int | None = None) -> int:
    """k-means sample: 40 vectors per list (faiss warns under 39) and, with PQ, 40 per code
    of a sub-quantizer (2^pq_bits); all of them when n is smaller."""
    return min(n, 40 * max(nlist, 2**pq_bits if pq_bits else 0))


_DEFAULTS: dict[str, dict[str, Any]] = {
    "flat": {},
    "ivf": {
        "nlist": None,
        "nprobe": None,
        "probe_window": PROBE_WINDOW,
        "train_size": None,
        "niter": 10,
        "pq_m": None,
        "pq_bits": 8,
    },
    "hnsw": {"M": 32, "ef_search": 128, "ef_construction": 80},
    "lsh": {"tables": 4, "bits": 18},
}


def resolve_params(kind: str, n: int, params: dict[str, Any] | None) -> dict[str, Any]:
    """``params`` with every default filled in for ``n`` vectors (unknown keys are an error)."""
    if kind not in _DEFAULTS:
        raise ValueError(f"unknown index kind {kind!r}; allowed: {', '.join(KINDS)}")
    given = dict(params or {})
    unknown = sorted(set(given) - set(_DEFAULTS[kind]))
    if unknown:
        raise ValueError(f"unknown {kind} index parameter(s) {unknown}; allowed: {sorted(_DEFAULTS[kind])}")
    resolved = {**_DEFAULTS[kind], **{k: v for k, v in given.items() if v is not None}}
    if kind == "ivf":
        resolved["nlist"] = int(resolved["nlist"] or default_nlist(n))
        resolved["nprobe"] = int(resolved["nprobe"] or default_nprobe(resolved["nlist"]))
        pq_bits = int(resolved["pq_bits"]) if resolved["pq_m"] else None
        resolved["train_size"] = int(
            resolved["train_size"] or default_train_size(resolved["nlist"], n, pq_bits)
        )
    return resolved


def choose_kind(n: int, requested: str = "auto", on_gpu: bool = False) -> str:
    """The index kind for ``n`` vectors: ``requested`` unless it is ``auto``.

    ``auto`` is exact ``flat`` while an all-pairs search of every vector stays affordable,
    ``ivf`` above. Exact search costs n^2 * dim multiply-adds. On a GPU that is seconds up
    to a few million vectors (GPU_FLAT_MAX = 2M). On the CPU the flat join computes half
    the n x n products (a self-join is symmetric) at ~400 GFLOP/s in bfloat16 on 2 cores:
    65,536 x 512-d vectors take ~9 s end to end (measured with benchmarks/dedup.py), well
    inside the 20 s budget of a 200k run; IVF takes ~4 s there at recall 0.997, not worth
    giving up exactness for. The cost grows with n^2 (~20 s at 100k, ~80 s at 200k), so IVF
    (training, then 1/128 to 1/32 of the lists per query) takes over above CPU_FLAT_MAX.
    """
    if requested != "auto":
        if requested not in KINDS:
            raise ValueError(f"unknown index kind {requested!r}; allowed: auto, {', '.join(KINDS)}")
        return requested
    return "flat" if n <= (GPU_FLAT_MAX if on_gpu else CPU_FLAT_MAX) else "ivf"


def gpu_available() -> bool:
    try:
        return faiss.get_num_gpus() > 0
    except AttributeError:  # a faiss build without GPU support
        return False


# ----------------------------------------------------------------------------- the index


def _float32(vectors: np.ndarray, dim: int | None = None) -> np.ndarray:
    array = np.ascontiguousarray(vectors, dtype=np.float32)
    if array.ndim != 2 or (dim is not None and array.shape[1] != dim):
        raise ValueError(f"expected a 2-d array of {dim or 'd'}-dimensional vectors, got shape {array.shape}")
    return array


class VectorIndex:
    """A faiss index with what it takes to reuse it: kind, parameters, mean, count.

    ``needs_training`` says whether the kind learns from data (IVF: the lists' centroids;
    PQ codebooks). :meth:`add` never retrains: new vectors go to the existing lists. A
    retrain (a rebuild with :meth:`build`) is advisable when the data grew by more than
    10x since training (``retrain_advised``: lists get long, searches slow down, and
    nlist no longer fits), or when new data comes from another distribution (another
    source or model); the results stay correct either way, as pairs are re-scored exactly.
    """

    def __init__(
        self,
        kind: str,
        params: dict[str, Any],
        dim: int,
        index: faiss.Index,
        mean: np.ndarray | None,
        trained_count: int = 0,
        use_gpu: bool = False,
    ):
        self.kind = kind
        self.params = params
        self.dim = dim
        self.index = index  # always the CPU index: what is saved and what the join reads
        self.mean = np.zeros(dim, np.float32) if mean is None else np.asarray(mean, np.float32).reshape(-1)
        self.trained_count = trained_count
        self.use_gpu = bool(use_gpu) and kind in ("flat", "ivf") and gpu_available()
        self.timings: dict[str, float] = {}
        self._gpu_index: Any = None
        self._gpu_resources: Any = None
        # (first row, nprobe lists per row, their gaps below the best): see _probes
        self._probe_cache: tuple[int, np.ndarray, np.ndarray] | None = None

    def __repr__(self) -> str:
        return f"VectorIndex({self.kind!r}, count={self.count}, dim={self.dim}, params={self.params})"

    @property
    def count(self) -> int:
        return int(self.index.ntotal)

    @property
    def needs_training(self) -> bool:
        return self.kind == "ivf"

    @property
    def retrain_advised(self) -> bool:
        return self.needs_training and self.count > 10 * max(self.trained_count, 1)

    @property
    def ivf(self) -> Any:
        return faiss.extract_index_ivf(self.index) if self.kind == "ivf" else None

    @classmethod
    def build(
        cls,
        kind: str,
        vectors: np.ndarray,
        params: dict[str, Any] | None = None,
        seed: int = 0,
        *,
        mean: np.ndarray | None = None,
        use_gpu: bool = False,
    ) -> VectorIndex:
        """Train (when the kind needs it) and fill an index with prepared ``vectors``.

        ``mean`` is the centring mean the vectors were prepared with (kept with the index
        so new vectors can be prepared alike; zeros when not given). ``use_gpu`` searches
        ``flat`` and ``ivf`` on a GPU when faiss sees one (ignored otherwise).
        """
        kind = choose_kind(len(vectors), kind, use_gpu)
        if vectors.ndim != 2:
            raise ValueError(f"expected a 2-d array of vectors, got shape {vectors.shape}")
        n, dim = vectors.shape
        resolved = resolve_params(kind, n, params)
        metric = faiss.METRIC_INNER_PRODUCT
        started = time.perf_counter()
        if kind == "flat":
            index = faiss.IndexFlatIP(dim)
        elif kind == "hnsw":
            index = faiss.IndexHNSWFlat(dim, int(resolved["M"]), metric)
            index.hnsw.efConstruction = int(resolved["ef_construction"])
            index.hnsw.efSearch = int(resolved["ef_search"])
        elif kind == "lsh":
            nbits = int(resolved["tables"]) * int(resolved["bits"])
            index = faiss.index_factory(dim, f"RR{nbits},LSH")
            faiss.downcast_VectorTransform(index.chain.at(0)).init(int(seed))  # seeded hyperplanes
            index.is_trained = True  # signs against zero thresholds: nothing else to learn
        else:
            if n == 0:
                raise ValueError("an ivf index needs vectors to train on")
            storage = f"PQ{int(resolved['pq_m'])}x{int(resolved['pq_bits'])}" if resolved["pq_m"] else "Flat"
            index = faiss.index_factory(dim, f"IVF{resolved['nlist']},{storage}", metric)
            ivf = faiss.extract_index_ivf(index)
            ivf.cp.seed = int(seed)
            ivf.cp.niter = int(resolved["niter"])
            ivf.nprobe = int(resolved["nprobe"])
            rng = np.random.default_rng(seed)
            sample = np.sort(rng.choice(n, size=min(n, resolved["train_size"]), replace=False))
            training = _float32(vectors[sample], dim)
            centroids = train_centroids(
                training, int(resolved["nlist"]), int(resolved["niter"]), int(seed), bf16_is_faster()
            )
            if centroids is not None:
                # a quantizer that holds nlist centroids already is not retrained by faiss:
                # index.train then learns only what the storage needs (PQ codebooks)
                ivf.quantizer.add(centroids)
            index.train(training)
        built = cls(kind, resolved, dim, index, mean, trained_count=n, use_gpu=use_gpu)
        built.timings["train_s"] = time.perf_counter() - started
        built.add(vectors)
        return built

    def add(self, vectors: np.ndarray, chunk: int = 65536) -> None:
        """Append prepared vectors (rows ``count .. count + len - 1``), without retraining.

        IVF: each vector goes to the list of its nearest centroid, scored with the join's
        own products (:class:`_Engine`); the ``nprobe`` nearest lists of the new rows are
        kept in memory for the next :func:`find_pairs` (not saved; up to PROBE_CACHE_MAX
        entries, 64 MB at 1M rows x 16 lists). IVF-Flat lists are
        filled one list at a time, so each list is allocated once at its final size (faiss's
        own ``add`` appends vector by vector and leaves up to 2x spare capacity).
        """
        started = time.perf_counter()
        first = self.count
        if self.kind != "ivf":
            for start in range(0, len(vectors), chunk):
                self.index.add(_float32(vectors[start : start + chunk], self.dim))
        elif len(vectors):
            ivf = self.ivf
            engine = _Engine("auto")
            nprobe = min(int(self.params["nprobe"]), ivf.nlist)
            probes = _probes(
                engine, lambda s, e: engine.tensor(vectors[s:e], self.dim), len(vectors), ivf, nprobe
            )
            lists = probes[0][:, 0].astype(np.int64)
            if self.params.get("pq_m"):
                for start in range(0, len(vectors), chunk):
                    block = _float32(vectors[start : start + chunk], self.dim)
                    part = np.ascontiguousarray(lists[start : start + chunk])
                    ids = np.arange(first + start, first + start + len(block), dtype=np.int64)
                    ivf.add_core(len(block), faiss.swig_ptr(block), faiss.swig_ptr(ids), faiss.swig_ptr(part))
            else:
                _fill_lists(ivf, vectors, lists, first)
            cache = self._probe_cache
            if (
                cache is not None
                and cache[0] + len(cache[1]) == first
                and cache[1].size + probes[0].size <= PROBE_CACHE_MAX
            ):
                self._probe_cache = (
                    cache[0],
                    np.concatenate([cache[1], probes[0]]),
                    np.concatenate([cache[2], probes[1]]),
                )
            else:
                self._probe_cache = (first, *probes) if probes[0].size <= PROBE_CACHE_MAX else None
        self._gpu_index = None  # cloned again at the next search
        self.timings["add_s"] = self.timings.get("add_s", 0.0) + time.perf_counter() - started

    def cached_probes(self, rows: np.ndarray, nprobe: int) -> tuple[np.ndarray, np.ndarray] | None:
        """The lists of ``rows`` and their gaps (see :func:`_probes`) kept by :meth:`add`, when
        all of them are known."""
        if self._probe_cache is None or not len(rows):
            return None
        start, lists, gaps = self._probe_cache
        if lists.shape[1] != nprobe or rows.min() < start or rows.max() >= start + len(lists):
            return None
        return lists[rows - start], gaps[rows - start]

    def gpu_index(self) -> Any:
        """The GPU copy used for searching (cloned lazily), or None on the CPU."""
        if not self.use_gpu:
            return None
        if self._gpu_index is None:
            self._gpu_resources = self._gpu_resources or faiss.StandardGpuResources()
            self._gpu_index = faiss.index_cpu_to_gpu(self._gpu_resources, 0, self.index)
        return self._gpu_index

    def save(self, folder: str | Path) -> Path:
        """Write ``index.faiss`` (faiss's format), ``mean.npy`` and ``index.json`` into ``folder``.

        Plain writes: the caller makes the folder switch atomic (write a new folder, then
        point at it).
        """
        target = Path(folder)
        target.mkdir(parents=True, exist_ok=True)
        faiss.write_index(self.index, str(target / INDEX_FILE))
        np.save(target / MEAN_FILE, self.mean)
        meta = {
            "format_version": FORMAT_VERSION,
            "kind": self.kind,
            "params": self.params,
            "dim": self.dim,
            "count": self.count,
            "trained_count": self.trained_count,
            "needs_training": self.needs_training,
            "faiss_version": faiss.__version__,
        }
        (target / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
        return target

    @classmethod
    def load(cls, folder: str | Path, use_gpu: bool = False) -> VectorIndex:
        source = Path(folder)
        meta = json.loads((source / META_FILE).read_text())
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{source}: index format {meta.get('format_version')!r}, expected {FORMAT_VERSION}"
            )
        index = faiss.read_index(str(source / INDEX_FILE))
        if index.ntotal != meta["count"]:
            raise ValueError(
                f"{source}: index holds {index.ntotal} vectors, its metadata says {meta['count']}"
            )
        mean = np.load(source / MEAN_FILE)
        return cls(
            meta["kind"], meta["params"], meta["dim"], index, mean, meta.get("trained_count", 0), use_gpu
        )


# ----------------------------------------------------------------------------- the join engine


class _Engine:
    """Matrix products for the join and the IVF assignment (torch on the CPU).

    bfloat16 where this CPU multiplies it faster than float32 (scores then carry
    ``margin`` of rounding), float32 otherwise.
    """

    def __init__(self, precision: str):
        import torch

        if precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"precision must be auto, bf16 or fp32, not {precision!r}")
        self.torch = torch
        self.bf16 = precision == "bf16" or (precision == "auto" and bf16_is_faster())
        self.dtype = torch.bfloat16 if self.bf16 else torch.float32
        self.margin = BF16_MARGIN if self.bf16 else FP32_MARGIN

    def tensor(self, array: np.ndarray, dim: int | None = None) -> Any:
        """A float32 tensor over ``array`` (no copy when it is float32 and C-contiguous)."""
        with warnings.catch_warnings():  # read-only memory maps: the tensors are only read
            warnings.simplefilter("ignore", UserWarning)
            return self.torch.from_numpy(_float32(np.asarray(array), dim))

    def cast(self, tensor: Any) -> Any:
        return tensor.to(self.dtype) if tensor.dtype != self.dtype else tensor

    def select(
        self, scores: Any, low: float, cap: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(row, column, score) of the scores >= ``low``; a row with more than ``cap`` keeps
        its ``cap`` best. Also returns the rows that were cut.

        Nearly every row of a block is empty, so the row maxima come first (one pass, in
        torch) and only rows that reach ``low`` are scanned (numpy). For bfloat16 both run
        on the int16 bit patterns: a positive bfloat16 orders like its bits (negatives fall
        below), and integer kernels are ~5x faster than torch's bfloat16 ones here; the
        threshold is the largest bfloat16 not above ``low``.
        """
        torch = self.torch
        as_bits = self.bf16 and low > 0
        # numpy for the reductions and the gather: single-threaded and fast; torch's parallel
        # ops each wait for both cores, which on a shared CPU stalls ~ms per call (see
        # core/select/kmeans._Ops), thousands of calls per search
        values = (scores.view(torch.int16) if as_bits else scores.float()).numpy()
        limit = int(np.float32(low).view(np.int32) >> 16) if as_bits else low
        hot = np.flatnonzero(values.max(axis=1) >= limit)
        empty = np.zeros(0, np.int64)
        if not len(hot):
            return empty, empty, np.zeros(0, np.float32), empty
        sub = values[hot]
        mask = sub >= limit
        counts = np.count_nonzero(mask, axis=1)
        heavy = np.flatnonzero(counts > cap)
        parts = []
        if len(heavy):
            mask[heavy] = False
            top = torch.topk(scores[torch.from_numpy(hot[heavy])].float(), cap, dim=1)
            hr, hc = np.nonzero((top.values >= low).numpy())
            parts.append((heavy[hr], top.indices.numpy()[hr, hc], top.values.numpy()[hr, hc]))
        r, c = np.nonzero(mask)
        found = (sub[r, c].astype(np.int32) << 16).view(np.float32) if as_bits else sub[r, c]
        parts.append((r, c, found))
        rows, cols, vals = (np.concatenate(p) for p in zip(*parts, strict=True))
        return hot[rows], cols.astype(np.int64), vals.astype(np.float32), hot[heavy]


class _Blocks:
    """Reused buffers for the join's tiles (queries, base, scores): no allocation per tile.

    In bfloat16 the tiles are padded (query rows to a multiple of PAD_QUERIES, base rows of
    PAD_BASE; the padding's scores are cut off): oneDNN compiles and keeps a kernel per
    matrix shape, and unpadded list sizes made it hold ~0.7 GB (and spend time compiling).
    Buffers grow to the largest tile seen.
    """

    def __init__(self, engine: _Engine, dim: int):
        self.engine, self.dim = engine, dim
        self.buffers: dict[str, Any] = {}

    def _get(self, name: str, rows: int, cols: int, dtype: Any) -> Any:
        size = rows * cols
        buffer = self.buffers.get(name)
        if buffer is None or buffer.numel() < size:
            buffer = self.buffers[name] = self.engine.torch.empty(size, dtype=dtype)
        return buffer[:size].view(rows, cols)

    def cast(self, name: str, tensor: Any, step: int) -> Any:
        """``tensor`` in the engine's dtype, padded with zero rows to a multiple of ``step``."""
        rows = len(tensor)
        padded = -(-rows // step) * step if self.engine.bf16 else rows
        if tensor.dtype == self.engine.dtype and padded == rows:
            return tensor
        out = self._get(name, padded, self.dim, self.engine.dtype)
        # torch's cast stays: ~15x faster than a numpy rounding here (0.2 vs 3 ms per tile)
        out[:rows].copy_(tensor)
        out[rows:].zero_()
        return out

    def gather(self, source: _QuerySource, index: np.ndarray) -> Any:
        """Queries ``index`` of ``source`` as a product operand. bfloat16: gathered as 16-bit
        words from the source's one bfloat16 copy, straight into the padded buffer (half the
        bytes of a float32 gather, and no cast per tile)."""
        torch = self.engine.torch
        rows = np.asarray(index if source.positions is None else source.positions[index], dtype=np.int64)
        words = source.words() if self.engine.bf16 else None
        if words is None:
            out = self._get("gather", len(rows), self.dim, torch.float32)
            np.take(source.array.numpy(), rows, axis=0, out=out.numpy())
            return self.cast("queries", out, PAD_QUERIES)
        m = len(rows)
        out = self._get("queries", -(-m // PAD_QUERIES) * PAD_QUERIES, self.dim, torch.bfloat16)
        gathered = out.view(torch.int16)
        torch.index_select(words, 0, torch.from_numpy(rows), out=gathered[:m])
        gathered[m:] = 0
        return out

    def scores(self, block_q: Any, rows_q: int, base: Any, rows_b: int) -> Any:
        """Scores of the first ``rows_q`` queries against the first ``rows_b`` base vectors."""
        out = self._get("scores", len(block_q), len(base), self.engine.dtype)
        return self.engine.torch.matmul(block_q, base.T, out=out)[:rows_q, :rows_b]


def _centroids(ivf: Any) -> np.ndarray:
    quantizer = faiss.downcast_index(ivf.quantizer)
    return quantizer.reconstruct_n(0, ivf.nlist)


def _probes(
    engine: _Engine, read: Callable[[int, int], Any], n: int, ivf: Any, nprobe: int, chunk: int = 4096
) -> tuple[np.ndarray, np.ndarray]:
    """The ``nprobe`` lists of highest centroid score for ``n`` vectors (int32, best first),
    and how far each list's score falls below the best (float16).

    ``read(start, end)`` gives vectors ``start..end`` as a float32 tensor. These are the
    lists the join searches, and (first column) the list a vector is stored in. Blocks of
    ``chunk`` rows run on the worker threads (:func:`torch_workers`), each with its own
    reused score and key buffers: a fresh (32768 x 2048) block per chunk spent more time on
    its pages' first touch than on its product (1M rows: 25 s for the add).
    """
    torch = engine.torch
    nlist = ivf.nlist
    centroids = padded(_centroids(ivf), engine.dtype)
    lists = np.empty((n, nprobe), dtype=np.int32)
    gaps = np.empty((n, nprobe), dtype=np.float16)
    local = threading.local()

    def block(start: int) -> None:
        rows = engine.cast(read(start, min(n, start + chunk)))
        if getattr(local, "scores", None) is None:
            local.scores = torch.empty((min(chunk, n), len(centroids)), dtype=engine.dtype)
            local.keys = np.empty((min(chunk, n), nlist), dtype=np.int32)
        scores = torch.matmul(rows, centroids.T, out=local.scores[: len(rows)])[:, :nlist]
        end = start + len(rows)
        lists[start:end], gaps[start:end] = top_lists(scores, nprobe, local.keys)

    with torch_workers() as pool:
        for _ in in_order(pool, block, range(0, n, chunk)):
            pass
    return lists, gaps


def _fill_lists(ivf: Any, vectors: np.ndarray, lists: np.ndarray, first: int) -> None:
    """Append IVF-Flat entries list by list (row ids ``first + i``)."""
    order = np.argsort(lists, kind="stable")
    bounds = np.searchsorted(lists[order], np.arange(ivf.nlist + 1))
    invlists = ivf.invlists
    sizes = np.diff(bounds)
    # one buffer for every list's rows: a fresh array per list paid its pages' first touch each time
    buffer = np.empty((int(sizes.max(initial=0)), ivf.d), dtype=np.float32)
    contiguous = (
        isinstance(vectors, np.ndarray) and vectors.dtype == np.float32 and vectors.shape[1:] == (ivf.d,)
    )
    for lst in np.flatnonzero(sizes):
        members = order[bounds[lst] : bounds[lst + 1]]
        if contiguous:
            codes = np.take(vectors, members, axis=0, out=buffer[: len(members)])
        else:
            codes = _float32(vectors[members], ivf.d)
        ids = (members + first).astype(np.int64)
        invlists.add_entries(
            int(lst), len(members), faiss.swig_ptr(ids), faiss.swig_ptr(codes.view(np.uint8))
        )
    ivf.ntotal += len(lists)


def _flat_vectors(index: Any) -> np.ndarray:
    """The vectors of an IndexFlat as a float32 view (no copy; valid while the index lives)."""
    flat = faiss.downcast_index(index)
    return faiss.rev_swig_ptr(flat.get_xb(), flat.ntotal * flat.d).reshape(flat.ntotal, flat.d)


class _ListReader:
    """The vectors and row ids of one IVF-Flat list, as views into faiss's storage."""

    def __init__(self, ivf: Any):
        self.ivf = ivf
        self.sizes = np.array([ivf.invlists.list_size(i) for i in range(ivf.nlist)], dtype=np.int64)

    @contextlib.contextmanager
    def read(self, lst: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        invlists, size = self.ivf.invlists, int(self.sizes[lst])
        codes_ptr, ids_ptr = invlists.get_codes(lst), invlists.get_ids(lst)
        try:
            codes = faiss.rev_swig_ptr(codes_ptr, size * self.ivf.code_size)
            yield codes.view(np.float32).reshape(size, self.ivf.d), faiss.rev_swig_ptr(ids_ptr, size)
        finally:
            invlists.release_codes(lst, codes_ptr)
            invlists.release_ids(lst, ids_ptr)


class _Candidates:
    """Candidate (query, row, score) triples with at most ``cap`` kept per query."""

    def __init__(self, n_queries: int, n_rows: int, cap: int):
        self.cap = cap
        self.n_rows = n_rows
        self.parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.size = 0
        self.limit = COMPACT_AT
        self.capped = np.zeros(n_queries, dtype=bool)

    def add(self, queries: np.ndarray, rows: np.ndarray, scores: np.ndarray) -> None:
        if len(queries):
            self.parts.append((queries, rows, scores))
            self.size += len(queries)
            if self.size > self.limit:
                self.compact()
                self.limit = max(self.limit, 2 * self.size)

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if not self.parts:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
        queries, rows, scores = (np.concatenate(p) for p in zip(*self.parts, strict=True))
        self.parts = [(queries, rows, scores)]
        return queries, rows, scores

    def compact(self) -> None:
        """Drop repeated (query, row) candidates; keep the ``cap`` best-scoring ones of each query."""
        queries, rows, scores = self.arrays()
        _, first = np.unique(queries * np.int64(self.n_rows) + rows, return_index=True)
        queries, rows, scores = queries[first], rows[first], scores[first]
        counts = np.bincount(queries, minlength=len(self.capped))
        if counts.max(initial=0) <= self.cap:
            self.parts, self.size = [(queries, rows, scores)], len(queries)
            return
        order = np.lexsort((-scores, queries))
        queries, rows, scores = queries[order], rows[order], scores[order]
        starts = np.concatenate([[0], np.cumsum(counts)])[queries]
        keep = (np.arange(len(queries)) - starts) < self.cap
        self.capped[counts > self.cap] = True
        self.parts = [(queries[keep], rows[keep], scores[keep])]
        self.size = int(keep.sum())


class _QuerySource:
    """Prepared query vectors by query index: ``queries``, else rows of ``all_vectors``."""

    def __init__(self, engine: _Engine, queries: np.ndarray | None, query_rows: np.ndarray, all_vectors: Any):
        self.positions: np.ndarray | None = None
        if queries is not None:
            self.array = engine.tensor(queries)
        elif isinstance(all_vectors, np.ndarray):
            self.array, self.positions = engine.tensor(all_vectors), query_rows
        else:
            self.array = engine.tensor(_rows(all_vectors, query_rows))
        self.torch = engine.torch
        self._words: np.ndarray | None = None

    def words(self) -> np.ndarray | None:
        """The vectors in bfloat16, as int16 words (made once: half the float32 array's size),
        or None above WORDS_MAX_BYTES: then tiles are gathered in float32 and cast, which keeps
        a 1M-vector search within its memory budget (the copy would add 1 GB)."""
        if self._words is None and self.array.shape[0] * self.array.shape[1] * 2 <= WORDS_MAX_BYTES:
            self._words = self.array.to(self.torch.bfloat16).view(self.torch.int16)
        return self._words

    def range(self, start: int, end: int) -> Any:
        """Vectors of queries ``start..end`` (float32)."""
        if self.positions is None:
            return self.array[start:end]
        rows = self.torch.from_numpy(np.asarray(self.positions[start:end], dtype=np.int64))
        return self.torch.index_select(self.array, 0, rows)


def _join(
    vindex: VectorIndex,
    queries: np.ndarray | None,
    query_rows: np.ndarray,
    all_vectors: VectorSource,
    low: float,
    cap: int,
    precision: str,
    stats: dict[str, Any],
) -> _Candidates:
    """Candidates of the blocked join (flat, IVF-Flat): scores >= ``low`` minus the margin."""
    engine = _Engine(precision)
    stats["precision"] = "bf16" if engine.bf16 else "fp32"
    reach = math.sqrt(2.0 * max(0.0, 1.0 - low))  # the longest chord of a pair in range
    low = low - engine.margin
    n_queries, ntotal = len(query_rows), vindex.count
    source = _QuerySource(engine, queries, query_rows, all_vectors)
    candidates = _Candidates(n_queries, ntotal, cap)

    blocks = _Blocks(engine, vindex.dim)

    def scan(blocks: _Blocks, qidx: np.ndarray, block_q: Any, base: Any, base_rows: np.ndarray) -> tuple:
        """(query, row, score) over ``low`` of one tile, and the queries cut at ``cap``."""
        r, c, s, cut = engine.select(blocks.scores(block_q, len(qidx), base, len(base_rows)), low, cap)
        q, rows_b = qidx[r], base_rows[c]
        keep = query_rows[q] != rows_b
        return q[keep], rows_b[keep], s[keep], qidx[cut]

    def accept(q: np.ndarray, rows_b: np.ndarray, s: np.ndarray, cut: np.ndarray) -> None:
        candidates.capped[cut] = True
        candidates.add(q, rows_b, s)

    def emit(qidx: np.ndarray, block_q: Any, base: Any, base_rows: np.ndarray) -> None:
        accept(*scan(blocks, qidx, block_q, base, base_rows))

    if vindex.kind == "flat":
        xb = engine.tensor(_flat_vectors(vindex.index))
        everything = n_queries == ntotal and np.array_equal(query_rows, np.arange(ntotal))
        for qs in range(0, n_queries, QUERY_TILE):
            qidx = np.arange(qs, min(qs + QUERY_TILE, n_queries))
            # a self-join is symmetric: the upper half of the tiles is enough
            block_q = (
                blocks.cast("queries", xb[qs : qs + len(qidx)], PAD_QUERIES)
                if everything
                else blocks.gather(source, qidx)
            )
            for bs in range(qs if everything else 0, ntotal, BASE_TILE):
                base_rows = np.arange(bs, min(bs + BASE_TILE, ntotal))
                emit(qidx, block_q, blocks.cast("base", xb[bs : bs + len(base_rows)], PAD_BASE), base_rows)
        return candidates

    ivf = vindex.ivf
    nprobe = min(int(vindex.params["nprobe"]), ivf.nlist)
    probes = vindex.cached_probes(query_rows, nprobe)
    if probes is None:
        probes = _probes(engine, source.range, n_queries, ivf, nprobe)
    probed, gaps = probes
    # only the lists within the probe window of each query's best (see default_nprobe)
    window = float(vindex.params.get("probe_window") or math.inf) * reach
    near = gaps <= window if math.isfinite(window) else np.ones(gaps.shape, dtype=bool)
    queries_of, _ = np.nonzero(near)
    flat_lists = probed[near]
    stats["lists_per_query"] = round(len(flat_lists) / max(n_queries, 1), 2)
    # (query, list) pairs grouped by list: a radix sort of 16-bit list numbers
    order = np.argsort(flat_lists.astype(np.uint16) if ivf.nlist <= 65536 else flat_lists, kind="stable")
    bounds = np.searchsorted(flat_lists[order], np.arange(ivf.nlist + 1))
    by_list = queries_of[order]
    del probes, probed, gaps, near, queries_of, flat_lists, order
    lists = _ListReader(ivf)
    if engine.bf16:
        source.words()  # made once, before the threads read it
    local = threading.local()  # product buffers per thread

    def scan_list(lst: int) -> list[tuple]:
        mine = getattr(local, "blocks", None)
        if mine is None:
            mine = local.blocks = _Blocks(engine, vindex.dim)
        found = []
        members = by_list[bounds[lst] : bounds[lst + 1]]
        with lists.read(lst) as (vectors, ids):
            tiles = range(0, len(ids), BASE_TILE)
            single = None if len(tiles) > 1 else mine.cast("base", engine.tensor(vectors), PAD_BASE)
            for qs in range(0, len(members), QUERY_TILE):
                qidx = members[qs : qs + QUERY_TILE]
                block_q = mine.gather(source, qidx)
                for bs in tiles:
                    base = (
                        single
                        if single is not None
                        else mine.cast("base", engine.tensor(vectors[bs : bs + BASE_TILE]), PAD_BASE)
                    )
                    found.append(scan(mine, qidx, block_q, base, ids[bs : bs + BASE_TILE]))
        return found

    # Lists on the worker threads, one core each: a list's gather and selection (numpy) run
    # beside another's product. Candidates are taken in list order, as without threads.
    with torch_workers() as pool:
        todo = np.flatnonzero((np.diff(bounds) > 0) & (lists.sizes > 0)).tolist()
        for found in in_order(pool, scan_list, todo):
            for part in found:
                accept(*part)
    return candidates


def _knn(
    vindex: VectorIndex,
    queries: np.ndarray | None,
    query_rows: np.ndarray,
    low: float,
    k: int,
    cap: int,
    all_vectors: VectorSource,
    chunk: int,
    stats: dict[str, Any],
) -> _Candidates:
    """Candidates from faiss k-NN search, with a larger k for queries whose k are all in range."""
    gpu = vindex.gpu_index()
    index = gpu if gpu is not None else vindex.index
    ntotal = vindex.count
    if gpu is not None:
        cap = min(cap, GPU_MAX_K - 1)
    limit = min(cap + 1, ntotal)
    exact_scores = vindex.kind in ("flat", "hnsw") or (vindex.kind == "ivf" and not vindex.params.get("pq_m"))
    if vindex.kind == "ivf":
        (gpu if gpu is not None else vindex.ivf).nprobe = int(vindex.params["nprobe"])
    stats["precision"] = "fp32"
    margin = (GPU_MARGIN if gpu is not None else KNN_MARGIN) if exact_scores else 0.0
    candidates = _Candidates(len(query_rows), ntotal, cap)
    for start in range(0, len(query_rows), chunk):
        qi = np.arange(start, min(start + chunk, len(query_rows)))
        block = (
            _rows(all_vectors, query_rows[qi])
            if queries is None
            else _float32(queries[start : start + len(qi)], vindex.dim)
        )
        kk = min(k + 1, limit)  # +1: the query itself is usually its own first result
        while len(qi):
            extra = {}
            if vindex.kind == "hnsw":  # the graph search keeps efSearch candidates: at least k
                extra["params"] = faiss.SearchParametersHNSW(
                    efSearch=max(int(vindex.params["ef_search"]), kk)
                )
            dist, ids = index.search(block, kk, **extra)
            valid = (ids >= 0) & (ids != query_rows[qi][:, None])
            if exact_scores:
                scores = dist
            else:  # Hamming distances or PQ estimates: score every result exactly
                scores = np.full(ids.shape, -np.inf, dtype=np.float32)
                qq, cc = np.nonzero(valid)
                scores[qq, cc] = 1.0 - _exact_distances(all_vectors, query_rows[qi][qq], ids[qq, cc])
            hit = valid & (scores >= low - margin)
            qq, cc = np.nonzero(hit)
            candidates.add(qi[qq], ids[qq, cc].astype(np.int64), scores[qq, cc].astype(np.float32))
            # all results in range (or the index exhausted): there may be more
            full = hit.sum(axis=1) >= valid.sum(axis=1)
            full &= valid.sum(axis=1) >= kk - 1
            if kk >= limit:
                candidates.capped[qi[full & (kk < ntotal)]] = True
                break
            qi, block = qi[full], block[full]
            kk = min(kk * 4, limit)
    return candidates


# ----------------------------------------------------------------------------- pairs


def _rows(source: VectorSource, rows: np.ndarray) -> np.ndarray:
    """Prepared vectors of ``rows`` (read in sorted order: memory maps like that)."""
    if callable(source):
        return _float32(source(rows))
    unique, inverse = np.unique(rows, return_inverse=True)
    return _float32(np.asarray(source[unique]))[inverse]


def _exact_distances(
    source: VectorSource, rows_a: np.ndarray, rows_b: np.ndarray, chunk: int = 32768
) -> np.ndarray:
    """1 - dot of the prepared vectors of each pair, summed in float64."""
    out = np.empty(len(rows_a), dtype=np.float32)
    for start in range(0, len(rows_a), chunk):
        a = _rows(source, rows_a[start : start + chunk])
        b = _rows(source, rows_b[start : start + chunk])
        out[start : start + len(a)] = 1.0 - np.einsum("ij,ij->i", a, b, dtype=np.float64)
    return out


def find_pairs(
    index: VectorIndex,
    queries: np.ndarray | None,
    query_rows: np.ndarray,
    max_distance: float,
    all_vectors: VectorSource,
    k: int = DEFAULT_K,
    *,
    max_neighbours: int = DEFAULT_MAX_NEIGHBOURS,
    chunk: int = 16384,
    precision: str = "auto",
    stats: dict[str, Any] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair (a, b), a != b, at cosine distance <= ``max_distance`` with a query row.

    ``queries[i]`` is the prepared vector of row ``query_rows[i]``, a row already added to
    the index (``None``: read them from ``all_vectors``). ``all_vectors`` gives the
    prepared vector of any row (an array, a memory map, or a function of row ids) for
    exact re-scoring. ``k`` is the first k of the k-NN kinds, ``chunk`` their queries per
    search call; ``max_neighbours`` caps the pairs kept per query row (see the module
    docstring); ``precision`` picks the join's products (auto, bf16, fp32: the results are
    the same, re-scored exactly); ``stats``, when given, receives timings and counts.

    Returns (rows_a, rows_b, distance): int64, int64, float32, with ``rows_a < rows_b``,
    each unordered pair once, sorted by (rows_a, rows_b); distances are exact
    (1 - dot of the prepared vectors, summed in float64).
    """
    stats = {} if stats is None else stats
    if not 0.0 <= max_distance < 2.0:
        raise ValueError(f"max_distance must be in [0, 2), got {max_distance}")
    query_rows = np.asarray(query_rows, dtype=np.int64).reshape(-1)
    if queries is not None and len(queries) != len(query_rows):
        raise ValueError(f"{len(queries)} query vectors for {len(query_rows)} query rows")
    if len(query_rows) and (query_rows.min() < 0 or query_rows.max() >= index.count):
        raise ValueError(f"query rows must be rows of the index (0..{index.count - 1})")
    empty = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))
    if not len(query_rows) or index.count < 2:
        return empty
    low = 1.0 - float(max_distance)
    cap = max(1, int(max_neighbours))
    started = time.perf_counter()
    joinable = index.gpu_index() is None and (
        index.kind == "flat" or (index.kind == "ivf" and not index.params.get("pq_m"))
    )
    if joinable:
        candidates = _join(index, queries, query_rows, all_vectors, low, cap, precision, stats)
    else:
        candidates = _knn(index, queries, query_rows, low, max(1, k), cap, all_vectors, chunk, stats)
    candidates.compact()
    q, rows_b, _ = candidates.arrays()
    rows_a = query_rows[q]
    stats["candidates"] = len(q)
    stats["capped_queries"] = int(candidates.capped.sum())
    stats["search_s"] = time.perf_counter() - started
    if stats["capped_queries"]:
        warnings.warn(
            f"{stats['capped_queries']} query row(s) have more than {cap} neighbours within distance "
            f"{max_distance}; kept the closest {cap} of each (max_neighbours)",
            RuntimeWarning,
            stacklevel=2,
        )
    started = time.perf_counter()
    lo, hi = np.minimum(rows_a, rows_b), np.maximum(rows_a, rows_b)
    pair_keys = np.unique(lo * np.int64(index.count) + hi)
    lo, hi = pair_keys // index.count, pair_keys % index.count
    distance = _exact_distances(all_vectors, lo, hi)
    keep = distance <= max_distance
    stats["rescore_s"] = time.perf_counter() - started
    stats["pairs"] = int(keep.sum())
    log.debug("find_pairs: %s", stats)
    return lo[keep], hi[keep], distance[keep]


# ----------------------------------------------------------------------------- k nearest of outside queries


def list_of_rows(index: VectorIndex) -> np.ndarray:
    """The inverted list each row of an IVF-Flat index is stored in (int32, by row)."""
    reader = _ListReader(index.ivf)
    out = np.full(index.count, -1, dtype=np.int32)
    for lst in np.flatnonzero(reader.sizes):
        with reader.read(int(lst)) as (_, ids):
            out[ids] = lst
    return out


def screen_margin(precision: str = "auto") -> float:
    """How far a score of :func:`search_knn` at ``precision`` may lie from the exact one (unit
    vectors): what a caller re-scoring its candidates needs to know whether one was missed."""
    return _Engine(precision).margin


def probe_ranks(index: VectorIndex, queries: np.ndarray, precision: str = "fp32") -> np.ndarray:
    """For each (prepared) query, the rank of every inverted list in its probe order (0: probed
    first), by centroid scores at ``precision`` (that of the search being calibrated: bfloat16
    rounding may swap two lists of nearly equal score): a neighbour stored in list l is found
    with nprobe > rank[l]."""
    centroids = _centroids(index.ivf)
    if precision == "fp32":
        scores = _float32(queries, index.dim) @ centroids.T
    else:  # the products _probes computes, rounded as the search rounds them
        engine = _Engine(precision)
        query_t = engine.cast(engine.tensor(queries, index.dim))
        scores = (query_t @ engine.cast(engine.tensor(centroids)).T).float().numpy()
    order = np.argsort(-scores, axis=1, kind="stable")
    ranks = np.empty_like(order, dtype=np.int32)
    np.put_along_axis(ranks, order, np.arange(order.shape[1], dtype=np.int32)[None, :], axis=1)
    return ranks


def _pairs_by_list(engine, source, n: int, ivf, nprobe: int) -> tuple[np.ndarray, np.ndarray]:
    """The (query, probed list) pairs grouped by list: ``order`` indexes the flattened n x nprobe
    probes, and list ``j``'s pairs are ``order[bounds[j]:bounds[j + 1]]``."""
    flat_lists = _probes(engine, source.range, n, ivf, nprobe)[0].reshape(-1)
    order = np.argsort(flat_lists.astype(np.uint16) if ivf.nlist <= 65536 else flat_lists, kind="stable")
    return order, np.searchsorted(flat_lists[order], np.arange(ivf.nlist + 1))


def _probed_tiles(
    engine: _Engine,
    index: VectorIndex,
    source: _QuerySource,
    order: np.ndarray,
    bounds: np.ndarray,
    nprobe: int,
) -> Iterator[tuple[np.ndarray, int, np.ndarray, Any]]:
    """The grouped products of the outside-query searches (:func:`search_knn`, :func:`search_top1`,
    :func:`search_above`): for each probed list, each base tile of at most BASE_TILE rows and each
    run of at most QUERY_TILE of the (query, list) pairs from :func:`_pairs_by_list`: (the pairs,
    query * nprobe + probe position; the tile's first row in its list; its row ids, int64; the
    scores, pairs x tile rows in the engine's dtype). Ids and scores are views, valid until the
    next tile."""
    blocks = _Blocks(engine, index.dim)
    lists = _ListReader(index.ivf)
    for lst in np.flatnonzero((np.diff(bounds) > 0) & (lists.sizes > 0)):
        pairs = order[bounds[lst] : bounds[lst + 1]]
        with lists.read(int(lst)) as (vectors, ids):
            for bs in range(0, len(ids), BASE_TILE):
                rows_b = min(BASE_TILE, len(ids) - bs)
                base = blocks.cast("base", engine.tensor(vectors[bs : bs + rows_b]), PAD_BASE)
                tile_ids = np.asarray(ids[bs : bs + rows_b], dtype=np.int64)
                for qs in range(0, len(pairs), QUERY_TILE):
                    at = pairs[qs : qs + QUERY_TILE]
                    yield (
                        at,
                        bs,
                        tile_ids,
                        blocks.scores(blocks.gather(source, at // nprobe), len(at), base, rows_b),
                    )


def search_knn(
    index: VectorIndex, queries: np.ndarray, k: int, nprobe: int, precision: str = "auto"
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` highest-scoring rows of an IVF-Flat ``index`` for each prepared query (queries
    that are not rows of the index): (rows int64 (n, k), -1 where fewer were probed; scores
    float32, -inf there), best first.

    The blocked join's products (:func:`_join`): queries are grouped by the ``nprobe`` lists
    they probe, and each group is multiplied with its list as one matrix product, so the search
    runs at the machine's matrix rate (faiss's own IVF scan goes query by query, ~8x slower on 2
    cores). Scores carry the engine's rounding (bfloat16: up to BF16_MARGIN): callers ask for a
    few more than they need and re-score them exactly. Memory: the queries, their (n, nprobe)
    probes and (n, k) results, and one product tile.
    """
    engine = _Engine(precision)
    torch = engine.torch
    n = len(queries)
    if not n or not index.count:
        return np.full((n, k), -1, dtype=np.int64), np.full((n, k), -np.inf, dtype=np.float32)
    ivf = index.ivf
    nprobe = max(1, min(int(nprobe), ivf.nlist))
    source = _QuerySource(engine, queries, np.arange(n), None)
    order, bounds = _pairs_by_list(engine, source, n, ivf, nprobe)
    # each (query, probed list) pair has its own k slots: no merging while the lists are scanned,
    # one selection over the nprobe x k candidates of each query at the end
    found_rows = torch.full((n * nprobe, k), -1, dtype=torch.int64)
    found_scores = torch.full((n * nprobe, k), -math.inf, dtype=torch.float32)
    for at, bs, tile_ids, scores in _probed_tiles(engine, index, source, order, bounds, nprobe):
        take = min(k, scores.shape[1])
        top = torch.topk(scores, take, dim=1)
        slots = torch.from_numpy(at)
        values, rows = top.values.float(), torch.from_numpy(tile_ids)[top.indices]
        if bs:  # a list longer than a tile (a big cluster): merge with its earlier tiles
            values = torch.cat([found_scores[slots], values], dim=1)
            rows = torch.cat([found_rows[slots], rows], dim=1)
            keep = torch.topk(values, k, dim=1)
            values, rows, take = keep.values, torch.gather(rows, 1, keep.indices), k
        found_scores[slots, :take] = values
        found_rows[slots, :take] = rows
    found_scores = found_scores.view(n, nprobe * k)
    best = torch.topk(found_scores, min(k, nprobe * k), dim=1)
    rows = torch.gather(found_rows.view(n, nprobe * k), 1, best.indices)
    return rows.numpy(), best.values.numpy()


def search_above(
    index: VectorIndex,
    queries: np.ndarray,
    low: float | np.ndarray,
    cap: int,
    nprobe: int,
    precision: str = "auto",
    probed: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The probed rows of an IVF-Flat ``index`` whose screened score reaches each prepared query's
    ``low`` (one for all, or one per query), at most the ``cap`` best per query: (rows int64
    (n, cap), -1 past a query's candidates; their screened scores float32 (n, cap), -inf there,
    best first; capped bool (n,): the query had more, and those left out screened at most its
    last kept score).

    :func:`search_knn`'s grouped products with a threshold instead of a top-k per tile: per
    (query, list) tile one row maximum (a pass over the int16 bit patterns of the bfloat16
    scores, positive thresholds) says which queries have anything to keep, and only those rows
    are compared; no sort at all where nothing reaches ``low``. For a floor far above the typical
    score (the similarity floor of retrieval) that is ~40x cheaper than a top-k of every tile.
    ``probed``: the queries' (order, bounds) from :func:`_pairs_by_list`, when known.
    """
    engine = _Engine(precision)
    torch = engine.torch
    n = len(queries)
    cap = max(1, int(cap))
    out_rows = np.full((n, cap), -1, dtype=np.int64)
    out_scores = np.full((n, cap), -np.inf, dtype=np.float32)
    capped = np.zeros(n, dtype=bool)
    if not n or not index.count:
        return out_rows, out_scores, capped
    low = np.broadcast_to(np.asarray(low, dtype=np.float32), (n,))
    ivf = index.ivf
    nprobe = max(1, min(int(nprobe), ivf.nlist))
    source = _QuerySource(engine, queries, np.arange(n), None)
    order, bounds = probed if probed is not None else _pairs_by_list(engine, source, n, ivf, nprobe)
    # positive bfloat16 scores order like their int16 bit patterns (see _Engine.select); the
    # threshold is the largest bfloat16 not above low
    as_bits = engine.bf16 and bool(low.min() > 0)
    limits = (low.astype(np.float32).view(np.int32) >> 16).astype(np.int16) if as_bits else low
    candidates = _Candidates(n, index.count, cap)
    for pairs, _, tile_ids, scores in _probed_tiles(engine, index, source, order, bounds, nprobe):
        at = pairs // nprobe
        values = scores.view(torch.int16).numpy() if as_bits else scores.float().numpy()
        limit = limits[at]
        hot = np.flatnonzero(values.max(axis=1) >= limit)
        if not len(hot):
            continue
        r, c = np.nonzero(values[hot] >= limit[hot, None])
        found = values[hot[r], c]
        if as_bits:
            found = (found.astype(np.int32) << 16).view(np.float32)
        candidates.add(at[hot[r]], tile_ids[c], found.astype(np.float32))
    candidates.compact()
    capped[:] = candidates.capped
    q, rows, scores = candidates.arrays()
    order = np.lexsort((rows, -scores, q))
    q, rows, scores = q[order], rows[order], scores[order]
    starts = np.searchsorted(q, np.arange(n))
    slot = np.arange(len(q)) - starts[q]
    out_rows[q, slot], out_scores[q, slot] = rows, scores
    return out_rows, out_scores, capped


def search_top1(
    index: VectorIndex, queries: np.ndarray, nprobe: int, precision: str = "auto"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The single highest-scoring row of an IVF-Flat ``index`` for each prepared query, and a
    bound on every other probed row: (rows int64 (n,), -1 where none was probed; its score
    float32 (n,), -inf there; the second-highest score among the probed rows float32 (n,),
    -inf where fewer than two).

    :func:`search_knn`'s grouped products for k = 1: per (query, list) pair only the row
    maximum, its column and the runner-up are kept (a row maximum instead of a top-k), and the
    queries are gathered in the engine's dtype (half the bytes of float32 in bfloat16).
    """
    engine = _Engine(precision)
    n = len(queries)
    rows = np.full(n, -1, dtype=np.int64)
    first = np.full(n, -np.inf, dtype=np.float32)
    second = np.full(n, -np.inf, dtype=np.float32)
    if not n or not index.count:
        return rows, first, second
    ivf = index.ivf
    nprobe = max(1, min(int(nprobe), ivf.nlist))
    source = _QuerySource(engine, queries, np.arange(n), None)
    order, bounds = _pairs_by_list(engine, source, n, ivf, nprobe)
    # per (query, probe position) slot: best score, its row, and the best other score
    slot_first = np.full(n * nprobe, -np.inf, dtype=np.float32)
    slot_second = np.full(n * nprobe, -np.inf, dtype=np.float32)
    slot_rows = np.full(n * nprobe, -1, dtype=np.int64)
    for at, bs, tile_ids, tile_scores in _probed_tiles(engine, index, source, order, bounds, nprobe):
        scores = tile_scores.float().numpy()
        m = len(at)
        col = scores.argmax(axis=1)
        r = np.arange(m)
        best = scores[r, col]
        if scores.shape[1] > 1:
            scores[r, col] = -np.inf
            runner = scores.max(axis=1)
        else:
            runner = np.full(m, -np.inf, dtype=np.float32)
        if bs:  # a list longer than a tile: merge with its earlier tiles
            prev, prev_second = slot_first[at], slot_second[at]
            better = best > prev
            runner = np.maximum(runner, np.where(better, prev, prev_second))
            slot_rows[at[better]] = tile_ids[col[better]]
            slot_first[at] = np.maximum(best, prev)
            slot_second[at] = np.maximum(runner, np.where(better, -np.inf, best))
        else:
            slot_first[at], slot_second[at], slot_rows[at] = best, runner, tile_ids[col]
    slot_first = slot_first.reshape(n, nprobe)
    slot_second = slot_second.reshape(n, nprobe)
    slot_rows = slot_rows.reshape(n, nprobe)
    winner = slot_first.argmax(axis=1)
    r = np.arange(n)
    first = slot_first[r, winner]
    rows = np.where(np.isfinite(first), slot_rows[r, winner], -1)
    others = slot_first.copy()
    others[r, winner] = -np.inf
    second = np.maximum(others.max(axis=1), slot_second[r, winner])
    return rows, first, second
