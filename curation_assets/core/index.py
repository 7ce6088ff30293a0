"""Vector indexes for near-duplicate search, and every pair under a cosine distance.

Vectors are searched *prepared*: centred with a dataset mean and L2-normalised
(:func:`prepare`), so the inner product of two of them is their cosine similarity and the
cosine distance is ``1 - dot``. Rows are numbered in the order vectors were added; faiss's
sequential ids are those rows.

Index kinds (:class:`VectorIndex`):

- ``flat``: exact, ``IndexFlatIP``; moved to a GPU with faiss's GPU API when asked and one
  is available.
- ``ivf``: ``IndexIVFFlat`` (or ``IndexIVFPQ`` when ``pq_m`` is set): spherical k-means
  lists trained on a seeded sample, ``nprobe`` lists searched per query.
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
  equivalent of ~22 GFLOP/s, the grouped float32 product at ~85, the bfloat16 one at
  ~400 (torch, oneDNN), which is what makes 1M vectors in two minutes possible. faiss
  still trains and assigns the lists, stores them, saves and loads them. ``big_batch_search``
  in ``faiss.contrib`` groups the same way but only for k-NN with a heap, 6x slower here.
  Range-style results also keep a big group of copies whole (no k cut).
- HNSW, LSH, IVF-PQ and GPU indexes: faiss k-NN search (``k`` per query; a query whose k
  results are all within range is searched again with 4x k, up to the cap, so a big group
  of copies is not cut). GPU faiss has no range search.

Bounded memory: no N x N matrix, products are tiled, and at most ``max_neighbours``
candidates are kept per query row: when a query has more neighbours within range than that
(degenerate data: thousands of identical vectors), the closest ``max_neighbours`` are kept
and a warning says how many queries were cut. Such a group still comes out connected (each
member keeps ``max_neighbours`` links), but not every pair of it is listed. The output is
therefore at most ``len(query_rows) * max_neighbours`` pairs.

Incremental use: add a new shard's prepared vectors to the index (:meth:`VectorIndex.add`,
no retraining) and call :func:`find_pairs` with ``query_rows`` = the new rows: every
(new, old) and (new, new) pair comes out exactly once; (old, old) pairs are known already.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import faiss
import numpy as np

log = logging.getLogger(__name__)

KINDS = ("flat", "ivf", "hnsw", "lsh")
DEFAULT_K = 32
DEFAULT_MAX_NEIGHBOURS = 100

# ``auto`` picks exact ``flat`` up to these sizes, IVF above (see choose_kind).
CPU_FLAT_MAX = 65_536
GPU_FLAT_MAX = 2_000_000

# Join tiles: a product block is at most QUERY_TILE x BASE_TILE scores (128 MiB in bfloat16).
QUERY_TILE = 8192
BASE_TILE = 8192
# Candidates held before pruning to max_neighbours per query (grows when that is not enough).
COMPACT_AT = 1 << 24
# Score margins for candidates before exact re-scoring. bfloat16 keeps 8 significant bits:
# for unit vectors the rounding of the inputs moves a dot product by at most 2^-8 and the
# rounding of the result by 2^-9 more (sums are accumulated in float32): 0.01 covers both.
BF16_MARGIN = 0.01
FP32_MARGIN = 1e-4
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
        block = np.array(vectors[start : start + chunk], dtype=np.float32)
        block -= centre
        norms = np.linalg.norm(block, axis=1)
        good = np.isfinite(norms) & (norms > 0)
        block[~good] = 0.0
        block[good] /= norms[good, None]
        out[start : start + len(block)] = block
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

    Half faiss's usual 4 * sqrt(n): at 1M the usual 4096 lists cost 80 s of k-means
    (40 points per list) and twice the assignment work on 2 cores, while what a query scans
    only depends on nprobe / nlist (see default_nprobe): 2048 lists are the cheaper way to
    scan the same share.
    """
    by_size = min(max(_pow2(2 * math.sqrt(max(n, 1))), 16), 65536)
    return max(1, min(by_size, n // 39))


def default_nprobe(nlist: int) -> int:
    """Lists searched per query: nlist / 128, at least 8 (all of them for tiny indexes).

    Near-duplicates at cosine distance 0.1 are 26 degrees apart, large next to the cells
    of a fine partition: the second vector of a pair lands in another list than the first
    often (a third of pairs at 1M / 2048 lists), and the share of lists that must be
    scanned to find 99% of the pairs stays about constant as nlist grows. Measured on the
    benchmark's clustered data (benchmarks/dedup.py), with a pair found from either side:
    1/128 of the lists gives recall 0.993-0.997 at 200k and 1M.
    """
    return min(nlist, max(8, nlist // 128))


def default_train_size(nlist: int, n: int) -> int:
    """k-means sample: 40 vectors per list (faiss warns under 39), all when n is smaller."""
    return min(n, 40 * nlist)


_DEFAULTS: dict[str, dict[str, Any]] = {
    "flat": {},
    "ivf": {"nlist": None, "nprobe": None, "train_size": None, "niter": 10, "pq_m": None, "pq_bits": 8},
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
        resolved["train_size"] = int(resolved["train_size"] or default_train_size(resolved["nlist"], n))
    return resolved


def choose_kind(n: int, requested: str = "auto", on_gpu: bool = False) -> str:
    """The index kind for ``n`` vectors: ``requested`` unless it is ``auto``.

    ``auto`` is exact ``flat`` while an all-pairs search of every vector stays affordable,
    ``ivf`` above. Exact search costs n^2 * dim multiply-adds. On a GPU that is seconds up
    to a few million vectors (GPU_FLAT_MAX = 2M). On the CPU the flat join computes half
    the n x n products (a self-join is symmetric) at ~400 GFLOP/s in bfloat16 on 2 cores:
    65,536 x 512-d vectors take ~6 s, less than the time budget of the whole 200k run
    (20 s), and IVF would save only a few seconds there while giving up exactness. The
    cost grows with n^2, so IVF (with training and nprobe / nlist = 1/128 of the work per
    query) takes over above CPU_FLAT_MAX.
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
            index.train(_float32(vectors[sample], dim))
        built = cls(kind, resolved, dim, index, mean, trained_count=n, use_gpu=use_gpu)
        built.timings["train_s"] = time.perf_counter() - started
        built.add(vectors)
        return built

    def add(self, vectors: np.ndarray, chunk: int = 65536) -> None:
        """Append prepared vectors (rows ``count .. count + len - 1``), without retraining."""
        started = time.perf_counter()
        if self.kind == "ivf":
            ivf = self.ivf
            engine = _Engine("auto")
            centroids = engine.convert(_centroids(ivf))
        for start in range(0, len(vectors), chunk):
            block = _float32(vectors[start : start + chunk], self.dim)
            if self.kind == "ivf":
                # the lists chosen with the join's own products (see _probes); faiss stores them
                lists = _probes(engine, engine.convert(block), centroids, 1)[:, 0].astype(np.int64)
                ivf.add_core(len(block), faiss.swig_ptr(block), None, faiss.swig_ptr(lists))
            else:
                self.index.add(block)
        self._gpu_index = None  # cloned again at the next search
        self.timings["add_s"] = self.timings.get("add_s", 0.0) + time.perf_counter() - started

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


@functools.cache
def _bf16_is_faster() -> bool:
    """Whether this CPU multiplies bfloat16 matrices clearly faster than float32 (measured once)."""
    import torch

    a32, b32 = torch.randn(2048, 512), torch.randn(1024, 512)
    a16, b16 = a32.to(torch.bfloat16), b32.to(torch.bfloat16)

    def best(a: Any, b: Any) -> float:
        a @ b.T
        times = []
        for _ in range(3):
            started = time.perf_counter()
            a @ b.T
            times.append(time.perf_counter() - started)
        return min(times)

    return best(a16, b16) * 1.3 < best(a32, b32)


class _Engine:
    """Matrix products for the join (torch on the CPU): bfloat16 or float32."""

    def __init__(self, precision: str):
        import torch

        if precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"precision must be auto, bf16 or fp32, not {precision!r}")
        self.torch = torch
        bf16 = precision == "bf16" or (precision == "auto" and _bf16_is_faster())
        self.dtype = torch.bfloat16 if bf16 else torch.float32
        self.margin = BF16_MARGIN if bf16 else FP32_MARGIN

    def convert(self, array: np.ndarray, chunk: int = 65536) -> Any:
        """A (n, d) tensor of the engine's dtype (no copy for float32 input in float32 mode)."""
        torch = self.torch
        if self.dtype == torch.float32 and isinstance(array, np.ndarray) and array.dtype == np.float32:
            return torch.from_numpy(np.ascontiguousarray(array))
        out = torch.empty(array.shape, dtype=self.dtype)
        for start in range(0, len(array), chunk):
            block = np.ascontiguousarray(array[start : start + chunk], dtype=np.float32)
            out[start : start + len(block)] = torch.from_numpy(block)
        return out


def _centroids(ivf: Any) -> np.ndarray:
    quantizer = faiss.downcast_index(ivf.quantizer)
    return quantizer.reconstruct_n(0, ivf.nlist)


def _probes(engine: _Engine, queries: Any, centroids: Any, nprobe: int, chunk: int = 32768) -> np.ndarray:
    """The ``nprobe`` lists of highest centroid score per query (int32, best first)."""
    torch = engine.torch
    out = np.empty((len(queries), nprobe), dtype=np.int32)
    for start in range(0, len(queries), chunk):
        scores = queries[start : start + chunk] @ centroids.T
        top = torch.topk(scores, nprobe, dim=1, sorted=True).indices
        out[start : start + len(top)] = top.numpy()
    return out


def _ivf_lists(ivf: Any, engine: _Engine) -> tuple[Any, np.ndarray, np.ndarray]:
    """Every stored vector in list order as one tensor, its row ids, and list offsets."""
    invlists = ivf.invlists
    sizes = np.array([invlists.list_size(i) for i in range(ivf.nlist)], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    total = int(offsets[-1])
    base = engine.torch.empty((total, ivf.d), dtype=engine.dtype)
    ids = np.empty(total, dtype=np.int64)
    for lst in np.flatnonzero(sizes):
        size = int(sizes[lst])
        codes_ptr = invlists.get_codes(int(lst))
        ids_ptr = invlists.get_ids(int(lst))
        try:
            codes = faiss.rev_swig_ptr(codes_ptr, size * ivf.code_size)
            vectors = codes.view(np.float32).reshape(size, ivf.d)
            base[offsets[lst] : offsets[lst + 1]] = engine.torch.from_numpy(vectors)
            ids[offsets[lst] : offsets[lst + 1]] = faiss.rev_swig_ptr(ids_ptr, size)
        finally:
            invlists.release_codes(int(lst), codes_ptr)
            invlists.release_ids(int(lst), ids_ptr)
    return base, ids, offsets


def _flat_vectors(index: Any) -> np.ndarray:
    """The vectors of an IndexFlat as a float32 view (no copy; valid while the index lives)."""
    flat = faiss.downcast_index(index)
    return faiss.rev_swig_ptr(flat.get_xb(), flat.ntotal * flat.d).reshape(flat.ntotal, flat.d)


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


def _select(
    engine: _Engine, scores: Any, low: float, cap: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(row, column, score) of the entries >= ``low``; rows with more than ``cap`` keep their
    ``cap`` best. Also returns the rows that were cut."""
    torch = engine.torch
    mask = scores >= low
    counts = mask.sum(dim=1)
    heavy = torch.nonzero(counts > cap).flatten()
    cut = heavy.numpy()
    parts = []
    if len(heavy):
        mask[heavy] = False
        top = torch.topk(scores[heavy], cap, dim=1)
        keep = top.values >= low
        hr, hc = torch.nonzero(keep, as_tuple=True)
        parts.append((heavy[hr], top.indices[hr, hc], top.values[hr, hc]))
    r, c = torch.nonzero(mask, as_tuple=True)
    parts.append((r, c, scores[r, c]))
    rows = torch.cat([p[0] for p in parts]).numpy()
    cols = torch.cat([p[1] for p in parts]).numpy()
    vals = torch.cat([p[2] for p in parts]).float().numpy()
    return rows, cols, vals, cut


def _join(
    vindex: VectorIndex,
    queries: np.ndarray | None,
    query_rows: np.ndarray,
    low: float,
    cap: int,
    precision: str,
    stats: dict[str, Any],
) -> _Candidates:
    """Candidates of the blocked join (flat, IVF-Flat): scores >= ``low`` minus the margin."""
    _t0 = time.perf_counter()
    engine = _Engine(precision)
    torch = engine.torch
    stats["precision"] = "bf16" if engine.dtype == torch.bfloat16 else "fp32"
    low = low - engine.margin
    n_queries = len(query_rows)
    ntotal = vindex.count
    if vindex.kind == "flat":
        base = engine.convert(_flat_vectors(vindex.index))
        base_ids = np.arange(ntotal, dtype=np.int64)
        offsets = np.array([0, ntotal], dtype=np.int64)
        position = base_ids
    else:
        base, base_ids, offsets = _ivf_lists(vindex.ivf, engine)
        position = np.empty(ntotal, dtype=np.int64)
        position[base_ids] = np.arange(ntotal, dtype=np.int64)
    everything = n_queries == ntotal and np.array_equal(query_rows, np.arange(ntotal))
    if queries is None or everything:
        # the index holds the same prepared vectors: use its copy instead of a second one
        source, source_pos = base, position[query_rows]
    else:
        source, source_pos = engine.convert(queries), np.arange(n_queries, dtype=np.int64)
    source_pos_t = torch.from_numpy(source_pos)
    # queries grouped by list: (list, query index) sorted by list
    if vindex.kind == "flat":
        by_list = np.arange(n_queries, dtype=np.int64)
        bounds = np.array([0, n_queries], dtype=np.int64)
    else:
        ivf = vindex.ivf
        nprobe = min(int(vindex.params.get("nprobe") or ivf.nprobe), ivf.nlist)
        centroids = engine.convert(_centroids(ivf))
        probes = np.empty((n_queries, nprobe), dtype=np.int32)
        for start in range(0, n_queries, 65536):
            block = source[source_pos_t[start : start + 65536]]
            probes[start : start + len(block)] = _probes(engine, block, centroids, nprobe)
        flat_lists = probes.reshape(-1)
        order = np.argsort(flat_lists.astype(np.uint16) if ivf.nlist <= 65536 else flat_lists, kind="stable")
        by_list = order // nprobe
        bounds = np.searchsorted(flat_lists[order], np.arange(ivf.nlist + 1))
        del probes, flat_lists, order
    # flat self-join: the products are symmetric, compute the upper half of the tiles only
    triangle = vindex.kind == "flat" and source is base and everything
    candidates = _Candidates(n_queries, ntotal, cap)
    stats["prep_s"] = time.perf_counter() - _t0
    for lst in range(len(bounds) - 1):
        members = by_list[bounds[lst] : bounds[lst + 1]]
        lo, hi = int(offsets[lst]), int(offsets[lst + 1])
        if not len(members) or lo == hi:
            continue
        for qs in range(0, len(members), QUERY_TILE):
            qidx = members[qs : qs + QUERY_TILE]
            _t = time.perf_counter()
            block_q = source[source_pos_t[torch.from_numpy(qidx)]] if not triangle else None
            stats["gather_s"] = stats.get("gather_s", 0) + time.perf_counter() - _t
            for bs in range(lo, hi, BASE_TILE):
                be = min(bs + BASE_TILE, hi)
                if triangle:
                    if be <= qs:
                        continue
                    block_q = base[qs : qs + len(qidx)]
                _t = time.perf_counter()
                scores = block_q @ base[bs:be].T
                _t2 = time.perf_counter()
                r, c, s, cut = _select(engine, scores, low, cap)
                stats["mm_s"] = stats.get("mm_s", 0) + _t2 - _t
                stats["sel_s"] = stats.get("sel_s", 0) + time.perf_counter() - _t2
                if len(cut):
                    candidates.capped[qidx[cut]] = True
                rows_b = base_ids[bs + c]
                q = qidx[r]
                keep = query_rows[q] != rows_b
                candidates.add(q[keep], rows_b[keep], s[keep])
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
    limit = min(cap + 1, ntotal, GPU_MAX_K if gpu is not None else ntotal)
    exact_scores = vindex.kind in ("flat", "hnsw") or (vindex.kind == "ivf" and not vindex.params.get("pq_m"))
    if vindex.kind == "ivf":
        (gpu if gpu is not None else vindex.ivf).nprobe = int(vindex.params["nprobe"])
    stats["precision"] = "fp32"
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
            if vindex.kind == "hnsw":
                vindex.index.hnsw.efSearch = max(int(vindex.params["ef_search"]), kk)
            dist, ids = index.search(block, kk)
            valid = (ids >= 0) & (ids != query_rows[qi][:, None])
            if exact_scores:
                scores = dist
            else:  # Hamming distances or PQ estimates: score every result exactly
                scores = np.full(ids.shape, -np.inf, dtype=np.float32)
                qq, cc = np.nonzero(valid)
                scores[qq, cc] = 1.0 - _exact_distances(all_vectors, query_rows[qi][qq], ids[qq, cc])
            margin = FP32_MARGIN * 10 if exact_scores else 0.0
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
        if vindex.kind == "hnsw":
            vindex.index.hnsw.efSearch = int(vindex.params["ef_search"])
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

    ``queries[i]`` is the prepared vector of row ``query_rows[i]`` (a row already in the
    index); ``None`` (or all rows as queries) lets the index's own copy serve.
    ``all_vectors`` gives the prepared vector of any row (an array, a memory map, or a
    function of row ids) for exact re-scoring. ``k`` is the first k of the k-NN kinds;
    ``max_neighbours`` caps the pairs kept per query row (see the module docstring);
    ``precision`` picks the join's products (auto, bf16, fp32; results are re-scored
    exactly either way); ``stats``, when given, receives timings and counts.

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
        candidates = _join(index, queries, query_rows, low, cap, precision, stats)
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
