"""k-means and hierarchical k-means with resampling over large (memory-mapped) embedding matrices.

The clustering half of the balancing step of Vo et al. 2024 ("Automatic Data Curation for
Self-Supervised Learning: A Clustering-Based Approach"); :mod:`curation_assets.core.select.sampling`
draws the balanced sample from the :class:`Hierarchy` built here.

:func:`kmeans`
    Greedy k-means++ initialisation (``2 + floor(ln k)`` candidates per new centre, the one
    that lowers the potential most is kept), then Lloyd iterations. Metric ``cosine``
    (rows L2-normalised, centroids are normalised means: spherical k-means; distance
    ``1 - cos``) or ``l2`` (squared Euclidean). Distances are float32 matrix products;
    centroid sums are float32 over at most ``_SUM_ROWS`` rows (``_GEMM_ROWS`` when rows are
    streamed) and accumulated in float64.
    Empty clusters are re-seeded deterministically with the points farthest from their
    centroids (farthest first, ties by row; empty clusters in id order). Same seed, same
    result; the chunk size only changes float64 summation order.
:func:`hierarchical_kmeans`
    Bottom-up: level 1 clusters the points, level t the centroids of level t-1. At a level
    with ``n_samples`` r > 0 the clustering is resampled ``n_resamples`` times: the r inputs
    closest to each centroid are taken, a fresh k-means runs on their union and all the
    level's inputs are reassigned to its centroids. Each cluster then weighs the same
    whatever its density, which moves centroids towards a uniform cover of the data's
    support. Finished levels can be checkpointed so that an interrupted run resumes.

Speed (the work is matrix products; everything else is kept off the hot path):

- Lloyd: one pass over the data per iteration: ``block @ centroids.T`` then arg-max in
  blocks of ``_GEMM_ROWS`` rows, so the score block stays in cache; centroid sums after the
  pass (``index_add_``) for rows kept in memory, in the same pass (a sparse one-hot product
  per block) for streamed ones. Backend ``torch`` ("matrix products"): torch on
  CUDA, and on the CPU the same products through numpy's BLAS (see :class:`_Ops` for why).
  Backend ``faiss`` does the nearest-centroid search with faiss (GPU index when the device
  is CUDA and faiss has GPUs) instead; everything else is shared.
- bfloat16 screen (cosine, CPU, where bfloat16 products are clearly faster: AMX or
  AVX512-BF16, measured once): the assignment's product runs in bfloat16 and the exact
  winner is proven in float32 within a rounding bound (:class:`_Screen`); k-means++ scores
  its pools in bfloat16 and recomputes in float32 only the rows a candidate may move
  closer (:class:`_ScreenedColumns`). Results are those of the float32 path (same seed,
  same centres and assignment, within float32 rounding). The screen keeps a bfloat16 copy
  of the cached rows (half the cache's size again); streamed rows are converted per block.
  The screen's own work is numpy on one core, so two blocks are in flight on two threads (one
  multiplying while the other is screened; results do not depend on it), and k-means++ scores
  a centre's candidates two at a time. The float32 dot products of single rows (the winners'
  distances, the close calls, k-means++'s gains) read the rows in place by index with faiss's
  SIMD kernels (:func:`_inner_products_by_index`) instead of gathering copies. The centroids
  are padded to a multiple of 64 rows for the product (oneDNN's AMX kernels: 3 ms instead of
  9 for 4096 x 1000 x 512). Measured on this 2-core CPU (200k x 512, k = 1000, 20
  iterations): Lloyd at 1.8-2.4x the float32 sgemm rate of the same run.
- k-means++: exact greedy k-means++ needs, per new centre, the distance of every point to
  each of its candidates: a skinny product that rereads the whole matrix per centre (1000
  centres x 400 MB at 200k x 512 float32: memory-bound). Here candidates for many centres
  are drawn at once from the current D^2 distribution ("pool"), their distances to all
  points computed by one wide matrix product, and the centres then chosen one by one from
  that pool by rejection sampling: a pool draw ``j`` is accepted with probability
  ``D_now(j) / D_pool(j)`` (D only shrinks as centres are added), which makes each accepted
  candidate an exact draw from the current distribution. When the pool runs dry a new one
  is drawn. Pools serve more centres while most draws are accepted and fewer when not,
  capped by ``pool_bytes`` (200k x 512, k = 1000: ~20 products of up to 670 candidates).
  The random stream differs from one-draw-at-a-time k-means++, the distribution does not.
- Input: rows are read ``chunk_size`` at a time and converted to float32 (normalised for
  cosine). When the prepared float32 matrix fits in ``max_cache_bytes`` (default: 2 GiB on
  the CPU, half the free memory of a CUDA device) it is kept after the first pass, on the
  device; otherwise every pass streams the chunks again, so a large float16 memmap is never
  copied whole (the cost: a conversion per chunk and pass, small next to the products
  whenever k is in the hundreds or more).
- Low-dimensional rows (d <= 8, e.g. the 2-D toys of the paper): nearest centroids by a k-d
  tree (``backend="kdtree"``, picked by ``auto`` on the CPU) and a k-means++ that sums each
  candidate's gain over the few boxes of rows it can reach (:func:`_kmeans_pp_cells`).

Pure library: no Dagster import.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from scipy.spatial import cKDTree

from curation_assets.core.atomic import atomic_path
from curation_assets.core.products import bf16_is_faster, in_order, padded

METRICS = ("cosine", "l2")
INITS = ("kmeans++", "random")
BACKENDS = ("auto", "torch", "faiss", "kdtree")
_LOW_DIM = 8  # up to this dimension a k-d tree beats brute force (30k x 1000 in 2-D: 17 vs 120 ms)
_SUM_ROWS = 65536  # rows per float32 index_add_ of a pass's sums (see _full_pass)
_GEMM_ROWS = 4096  # rows per product block: a 4096 x 1000 float32 score block stays in L3
_DEFAULT_CACHE_BYTES = 2 << 30
_DEFAULT_POOL_BYTES = 512 << 20
_PROGRESS_EVERY_S = 5.0
_CHECKPOINT_VERSION = 1

Progress = Callable[[str], None]


@dataclass
class KMeansResult:
    """A clustering: centroids (unit rows for cosine), each row's cluster and its distance."""

    centroids: np.ndarray  # (k, d) float32
    assignment: np.ndarray  # (n,) int64
    distances: np.ndarray  # (n,) float32: 1 - cos, or squared L2, to the own centroid
    sizes: np.ndarray  # (k,) int64
    iterations: int
    inertia: float  # sum of distances (float64)
    timings: dict[str, float] = field(default_factory=dict)  # init_s, lloyd_s (of which assign_s)


@dataclass(frozen=True)
class Level:
    """One level of the hierarchy: its cluster count and points kept per cluster when resampling."""

    n_clusters: int
    n_samples: int = 0  # 0: no resampling at this level


@dataclass
class LevelResult:
    """One finished level. Inputs are the points (level 1) or the previous level's centroids."""

    centroids: np.ndarray  # (k_t, d) float32
    assignment: np.ndarray  # (n_inputs_t,) int64
    sizes: np.ndarray  # (k_t,) int64: inputs per cluster
    distances: np.ndarray | None = None  # (n_inputs_t,) float32: each input to its centroid
    stats: dict[str, Any] = field(default_factory=dict)  # timings, iterations, inertia, resamples


@dataclass
class Hierarchy:
    """Levels bottom-up: ``levels[0]`` clusters the points, ``levels[t]`` the centroids of ``levels[t-1]``."""

    levels: list[LevelResult]
    metric: str = "cosine"

    def point_clusters(self) -> np.ndarray:
        """(n_points, L) int64: the cluster of each point at each level."""
        out = np.empty((len(self.levels[0].assignment), len(self.levels)), dtype=np.int64)
        out[:, 0] = self.levels[0].assignment
        for t in range(1, len(self.levels)):
            out[:, t] = self.levels[t].assignment[out[:, t - 1]]
        return out

    def point_distances(self) -> np.ndarray:
        """(n_points,) float32: distance of each point to its level-1 centroid."""
        if self.levels[0].distances is None:
            raise ValueError("level 1 carries no distances (LevelResult.distances is None)")
        return self.levels[0].distances


# ----------------------------------------------------------------------------- arrays


class _Ops:
    """Array operations on the compute device: numpy (its BLAS) on the CPU, torch on CUDA.

    On a shared CPU torch's OpenMP pool stalls at every parallel op when another process
    holds a core (measured: ~15 ms for a 200k-element max, 16 ms for a 770 x 12 x 30
    product, against 0.1 ms and 7 us in numpy); numpy's OpenBLAS products run at the same
    GFLOP/s as torch's on large matrices and small ops stay single-threaded.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.numpy = device.type == "cpu" and not _TORCH_ON_CPU

    def put(self, array: np.ndarray) -> Any:
        """A numpy array on the device (shared, not copied, on the CPU)."""
        return array if self.numpy else torch.from_numpy(np.ascontiguousarray(array)).to(self.device)

    def get(self, array: Any) -> np.ndarray:
        return array if self.numpy else array.cpu().numpy()

    def empty(self, shape: tuple[int, ...], dtype: Any = np.float32) -> Any:
        if self.numpy:
            return np.empty(shape, dtype=dtype)
        return torch.empty(shape, dtype=_TORCH_DTYPES[np.dtype(dtype)], device=self.device)

    def zeros(self, shape: tuple[int, ...], dtype: Any = np.float32) -> Any:
        if self.numpy:
            return np.zeros(shape, dtype=dtype)
        return torch.zeros(shape, dtype=_TORCH_DTYPES[np.dtype(dtype)], device=self.device)

    def matmul_nt(self, a: Any, b: Any, out: Any = None) -> Any:
        """a @ b.T (into ``out`` when given)."""
        if self.numpy:
            return np.matmul(a, b.T, out=out)
        return torch.mm(a, b.T, out=out)

    def sq_norms(self, a: Any) -> Any:
        return np.einsum("ij,ij->i", a, a) if self.numpy else torch.einsum("ij,ij->i", a, a)

    def maximum(self, a: Any, b: Any, out: Any = None) -> Any:
        return np.maximum(a, b, out=out) if self.numpy else torch.maximum(a, b, out=out)

    def sum64(self, a: Any) -> float:
        return float(a.sum(dtype=np.float64) if self.numpy else a.sum(dtype=torch.float64))

    def cumsum64(self, a: Any) -> Any:
        return np.cumsum(a, dtype=np.float64) if self.numpy else torch.cumsum(a.to(torch.float64), 0)

    def clamp0(self, a: Any) -> Any:
        """max(a, 0) in place."""
        return np.maximum(a, 0.0, out=a) if self.numpy else a.clamp_(min=0.0)

    def searchsorted(self, cdf: Any, values: np.ndarray) -> np.ndarray:
        """Right-side insertion points of ``values`` (numpy indices)."""
        if self.numpy:
            return np.searchsorted(cdf, values, side="right")
        return torch.searchsorted(cdf, self.put(values), right=True).cpu().numpy()


_TORCH_DTYPES = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}
# Tests set this to run the torch (CUDA) code path on the CPU, where no GPU is at hand.
_TORCH_ON_CPU = False
# The bfloat16 screen of the cosine assignment on the CPU (see _Screen): None measures once
# whether this CPU multiplies bfloat16 clearly faster than float32; tests force it on or off.
_SCREEN: bool | None = None
_SCREEN_MIN_K = 32  # fewer centroids: the product is too small for the screen to pay


# ----------------------------------------------------------------------------- input


class _Points:
    """Rows of ``x`` as prepared float32 blocks (normalised for cosine), cached when small.

    Blocks are numpy arrays on the CPU and torch tensors on CUDA (see :class:`_Ops`).
    """

    def __init__(
        self,
        x: np.ndarray | None,
        *,
        metric: str,
        device: torch.device,
        chunk_size: int,
        max_cache_bytes: int | None = None,
        prepared: Any = None,
    ) -> None:
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.metric = metric
        self.device = device
        self.ops = _Ops(device)
        self.chunk_size = int(chunk_size)
        self._cache: Any = None
        self._low: tuple[Any, np.ndarray, np.ndarray] | None = None
        if prepared is not None:  # rows prepared already (centroids, resampled subsets)
            self.x: Any = None
            self.n, self.d = (int(s) for s in prepared.shape)
            self._cache = prepared
            return
        if x is None or not hasattr(x, "shape") or len(x.shape) != 2:
            raise ValueError(f"x must be a 2-D array (n, d), got shape {getattr(x, 'shape', None)}")
        if not np.issubdtype(x.dtype, np.floating):
            raise ValueError(f"x must hold floating-point vectors, got dtype {x.dtype}")
        self.x = x
        self.n, self.d = (int(s) for s in x.shape)
        if self.n == 0 or self.d == 0:
            raise ValueError(f"x is empty: shape {tuple(x.shape)}")
        if self.n * self.d * 4 <= _cache_budget(max_cache_bytes, device):
            cache = self.ops.empty((self.n, self.d))
            for start, block in self._stream():
                cache[start : start + len(block)] = block
            self._cache = cache

    @classmethod
    def of_prepared(cls, rows: Any, metric: str, device: torch.device, chunk_size: int) -> _Points:
        return cls(None, metric=metric, device=device, chunk_size=chunk_size, prepared=rows)

    def _prepare(self, rows: np.ndarray, first: int | None) -> Any:
        where = f"rows {first}..{first + len(rows) - 1}" if first is not None else "the requested rows"
        if self.ops.numpy:
            # a writable float32 copy: read-only memmaps cannot be normalised in place
            block = np.array(rows, dtype=np.float32, copy=True)
            finite = bool(np.isfinite(block).all())
            norms = np.sqrt(np.einsum("ij,ij->i", block, block))[:, None] if self.metric == "cosine" else None
        else:
            # moved in its stored precision (float16 halves the transfer), float32 on the device
            keep = rows.dtype if rows.dtype in (np.float16, np.float32) else np.float32
            block = torch.from_numpy(np.array(rows, dtype=keep, copy=True)).to(self.device).float()
            finite = bool(torch.isfinite(block).all())
            norms = torch.linalg.vector_norm(block, dim=1, keepdim=True) if self.metric == "cosine" else None
        if not finite:
            raise ValueError(f"x has NaN or infinite values in {where}")
        if norms is not None:
            zero = np.flatnonzero(self.ops.get(norms)[:, 0] == 0)
            if len(zero):
                row = int(zero[0]) + (first or 0)
                raise ValueError(f"x has an all-zero row ({row} in {where}): no direction for cosine")
            block /= norms
        return block

    def _stream(self) -> Iterator[tuple[int, Any]]:
        for start in range(0, self.n, self.chunk_size):
            yield start, self._prepare(self.x[start : start + self.chunk_size], start)

    @property
    def cached(self) -> Any:
        """All prepared rows when they are kept in memory, else None."""
        return self._cache

    def chunks(self) -> Iterator[tuple[int, Any]]:
        """(first row, prepared block) over all rows, ``chunk_size`` rows at a time."""
        if self._cache is None:
            yield from self._stream()
        else:
            for start in range(0, self.n, self.chunk_size):
                yield start, self._cache[start : start + self.chunk_size]

    def low_precision(self) -> tuple[Any, np.ndarray, np.ndarray] | None:
        """All rows in bfloat16 (a torch tensor), the L2 norms of their rounding errors and of
        the rows, made once from the cached rows (None when rows are streamed: per block then)."""
        if self._cache is None or not self.ops.numpy:
            return None
        if self._low is None:
            parts = [_to_bf16(self._cache[s : s + _GEMM_ROWS * 4]) for s in range(0, self.n, _GEMM_ROWS * 4)]
            self._low = (
                torch.cat([p[0] for p in parts]),
                np.concatenate([p[1] for p in parts]),
                np.concatenate([p[2] for p in parts]),
            )
        return self._low

    def all_rows(self) -> np.ndarray:
        """Every prepared row as one float64 numpy array (for low-dimensional data only)."""
        return np.concatenate([self.ops.get(chunk) for _, chunk in self.chunks()]).astype(np.float64)

    def rows(self, index: np.ndarray) -> Any:
        """Prepared rows at ``index`` (any order, repeats allowed)."""
        index = np.asarray(index, dtype=np.int64)
        if self._cache is not None:
            return self._cache[self.ops.put(index)]
        unique, inverse = np.unique(index, return_inverse=True)  # sorted reads from a memmap
        return self._prepare(self.x[unique], None)[self.ops.put(inverse)]


def _cache_budget(max_cache_bytes: int | None, device: torch.device) -> int:
    """Bytes of prepared float32 rows that may be kept: given, or 2 GiB on the CPU and half
    the free memory of a CUDA device (then every pass runs from device memory)."""
    if max_cache_bytes is not None:
        return max_cache_bytes
    if device.type == "cuda":  # pragma: no cover - GPU only
        free, _ = torch.cuda.mem_get_info(device)
        return free // 2
    return _DEFAULT_CACHE_BYTES


def _pool_budget(pool_bytes: int | None, device: torch.device) -> int:
    """Bytes for the k-means++ candidate pool (pool x n float32): given, or 512 MiB on the CPU
    and a quarter of the free memory of a CUDA device."""
    if pool_bytes is not None:
        return pool_bytes
    if device.type == "cuda":  # pragma: no cover - GPU only
        free, _ = torch.cuda.mem_get_info(device)
        return free // 4
    return _DEFAULT_POOL_BYTES


def _block_rows(points: _Points, k: int) -> int:
    """Rows per product block: cache-sized on the CPU; on CUDA a chunk, or fewer when the
    (rows x k) float32 scores would pass 512 MiB (k = 50000: ~2700 rows)."""
    if points.device.type == "cpu":
        return _GEMM_ROWS
    return max(256, min(points.chunk_size, (512 << 20) // (4 * k)))


def _fingerprint(x: np.ndarray) -> str:
    """Cheap identity of a matrix: shape, dtype and a hash of 64 evenly spaced rows."""
    digest = hashlib.sha256(f"{tuple(x.shape)}|{x.dtype}".encode())
    for row in np.unique(np.linspace(0, len(x) - 1, 64).astype(np.int64)).tolist():
        digest.update(np.ascontiguousarray(x[row]).tobytes())
    return digest.hexdigest()[:32]


# ----------------------------------------------------------------------------- distances


def _resolve(backend: str, device: str | torch.device) -> tuple[str, torch.device]:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    dev = torch.device(device)
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda[:i]', got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but torch sees no CUDA device")
    if backend == "faiss":
        try:
            import faiss  # noqa: F401
        except ImportError as error:  # pragma: no cover - faiss is a dependency
            raise ValueError("backend 'faiss' needs the faiss package") from error
    return backend, dev


def _pick_backend(backend: str, d: int, device: torch.device) -> str:
    """``auto``: a k-d tree for low-dimensional rows on the CPU, else matrix products
    (measured faster than faiss's flat search on this 2-core CPU: ~175 vs ~85 GFLOP/s)."""
    if backend != "auto":
        return backend
    return "kdtree" if d <= _LOW_DIM and device.type == "cpu" else "torch"


def _to_bf16(rows: np.ndarray) -> tuple[Any, np.ndarray, np.ndarray]:
    """float32 rows as a bfloat16 tensor, the L2 norm of each row's rounding error, and of each row."""
    exact = np.ascontiguousarray(rows, dtype=np.float32)
    low = torch.from_numpy(exact).to(torch.bfloat16)
    error = exact - low.float().numpy()
    errors = np.sqrt(np.einsum("ij,ij->i", error, error, dtype=np.float64))
    return low, errors, np.sqrt(np.einsum("ij,ij->i", exact, exact, dtype=np.float64))


def _screen_on(metric: str, backend: str, ops: _Ops, k: int, d: int) -> bool:
    if not (metric == "cosine" and backend == "torch" and ops.numpy and d > _LOW_DIM):
        return False
    if _SCREEN is not None:
        return _SCREEN
    return k >= _SCREEN_MIN_K and bf16_is_faster()


class _Screen:
    """The cosine assignment's product in bfloat16, with the exact winner proven in float32.

    bfloat16 products run ~3x faster than float32 on CPUs with AMX or AVX512-BF16, but
    round scores by up to ~1%. Every score s~ of the bfloat16 product is within E of the
    exact x.c, E per row (below), so the exact nearest centroid is among the columns with
    s~ >= max s~ - 2E. A row with one such column has its winner; the rows with more
    (~15% on random 512-d data, 1-2 extra columns each) score those columns in float32,
    and rows whose window reaches down to 0 (the order argument below needs positive
    scores) get a float32 product. The winner's distance is always recomputed in float32
    (one dot product per row). The result is the float32 arg-max, as without the screen,
    within float32 rounding.

    The bound, with x = xh + xl and c = ch + cl (xh, ch the bfloat16 roundings; |xl|, |cl|
    measured): x.c - xh.ch = xl.c + xh.cl, at most |xl||c| + |xh||cl| by Cauchy-Schwarz;
    float32 accumulation adds at most d 2^-24 |xh||ch|; rounding the output to bfloat16
    adds u |s~| (u = 2^-8 for round-to-nearest; 2^-7 here, in case a kernel truncates).
    With E = those terms + u max s~ and max s~ > 2E, the exact winner j* is a candidate:
    x.c_j* >= x.c_max >= max s~ - E > E, and s~_j* >= x.c_j* - base - u |s~_j*| is then
    positive (so no larger than max s~) and >= max s~ - 2E.
    """

    def __init__(self, centroids: np.ndarray) -> None:
        self.centroids = centroids
        self.high, errors, norms = _to_bf16(centroids)
        self.c_max = float(norms.max())
        self.cl_max = float(errors.max())
        self.accumulate = centroids.shape[1] * 2.0**-24 * 1.01
        self.out = 2.0**-7
        self.padded = padded(self.high, torch.bfloat16)  # AMX's fast shapes
        self._buffers = threading.local()  # a reused (rows x padded k) bfloat16 buffer per thread

    def __call__(
        self, block: np.ndarray, low: tuple[Any, np.ndarray, np.ndarray] | None
    ) -> tuple[np.ndarray, np.ndarray]:
        rows = len(block)
        high, xl, x_norm = low if low is not None else _to_bf16(block)
        buffer = getattr(self._buffers, "scores", None)
        if buffer is None or buffer.shape[0] < rows:
            buffer = self._buffers.scores = torch.empty((rows, len(self.padded)), dtype=torch.bfloat16)
        scores = torch.matmul(high, self.padded.T, out=buffer[:rows])
        # bfloat16 bit patterns read as int16 order like the numbers they encode where those
        # are positive; numpy's integer reductions are fast and single-threaded (see _Ops)
        # every padded column: numpy's row reductions run ~2x faster on whole rows. The padding
        # scores exactly 0 (bits 0): it wins a row only where no score is positive, and such
        # rows go to the float32 product below (low_end <= 0); thresholds are at least 1
        bits = scores.view(torch.int16).numpy()
        every = np.arange(rows)
        nearest = bits.argmax(axis=1)
        top = bits[every, nearest].astype(np.int32)
        best = (top << 16).view(np.float32).astype(np.float64)
        xh = x_norm + xl
        bound = xl * self.c_max + xh * self.cl_max + self.accumulate * xh * (self.c_max + self.cl_max)
        low_end = best - 2.0 * (bound + self.out * np.maximum(best, 0.0))
        # the largest bfloat16 not above low_end, as int16 (positive thresholds only)
        threshold = np.maximum(np.maximum(low_end, 0.0).astype(np.float32).view(np.int32) >> 16, 1).astype(
            np.int16
        )
        bits[every, nearest] = np.iinfo(np.int16).min  # the runner-up decides if a row is settled
        several = np.flatnonzero((bits.max(axis=1) >= threshold) & (low_end > 0.0))
        nearest = nearest.astype(np.int64)
        full = np.flatnonzero(low_end <= 0.0)
        if len(full):
            nearest[full] = (block[full] @ self.centroids.T).argmax(axis=1)
        if len(several):
            # each such row's columns within the window (the product's best last), scored in
            # float32; the winner is the highest score, the lowest column of equal ones
            window = bits[several] >= threshold[several, None]
            counts = np.count_nonzero(window, axis=1)
            rows, cols = np.nonzero(window)
            ids = np.full((len(several), int(counts.max()) + 1), -1, dtype=np.int64)  # -1: none
            ids[rows, np.arange(len(rows)) - np.repeat(np.cumsum(counts) - counts, counts)] = cols
            ids[np.arange(len(several)), counts] = nearest[several]
            dots = _inner_products_by_index(block[several], self.centroids, ids)  # -inf where -1
            top = dots.max(axis=1, keepdims=True)
            nearest[several] = np.where(dots == top, ids, np.iinfo(np.int64).max).min(axis=1)
        dots = _paired_dots(block, self.centroids, nearest)
        return nearest, np.maximum(1.0 - dots, 0.0).astype(np.float32)


class _Searcher:
    """Nearest centroid of each row of a block: matrix products, a faiss flat index or a k-d tree.

    Returns (nearest, distance) as device arrays (numpy on the CPU).
    """

    def __init__(self, centroids: Any, metric: str, backend: str, ops: _Ops) -> None:
        self.metric = metric
        self.ops = ops
        self.backend = backend = _pick_backend(backend, centroids.shape[1], ops.device)
        c_sq = ops.sq_norms(centroids)
        self.centroids = centroids
        self.screen = (
            _Screen(centroids)
            if _screen_on(metric, backend, ops, len(centroids), centroids.shape[1])
            else None
        )
        if backend == "torch":
            # cosine: argmax x.c; L2: argmin |c|^2 - 2 x.c (|x|^2 added to the winner only),
            # with the -2 folded into the centroids so that one pass follows the product
            self.right = centroids if metric == "cosine" else centroids * -2.0
            self.bias = None if metric == "cosine" else c_sq
        elif backend == "kdtree":
            self.tree = cKDTree(ops.get(centroids).astype(np.float64))
        else:
            import faiss

            d = centroids.shape[1]
            index = faiss.IndexFlatIP(d) if metric == "cosine" else faiss.IndexFlatL2(d)
            if ops.device.type == "cuda" and faiss.get_num_gpus() > 0:  # pragma: no cover - GPU only
                self._resources = faiss.StandardGpuResources()
                index = faiss.index_cpu_to_gpu(self._resources, ops.device.index or 0, index)
            index.add(np.ascontiguousarray(ops.get(centroids), dtype=np.float32))
            self.index = index

    def __call__(self, block: Any, low: tuple[Any, np.ndarray, np.ndarray] | None = None) -> tuple[Any, Any]:
        """``low``: the block's rows in bfloat16 with their rounding errors, when known."""
        ops = self.ops
        if self.screen is not None:
            return self.screen(block, low)
        if self.backend == "kdtree":
            # scipy starts its threads per call: worth it for big blocks only
            workers = min(os.cpu_count() or 1, 4) if len(block) >= 16384 else 1
            dist, nearest = self.tree.query(ops.get(block), k=1, workers=workers)
            # Euclidean -> squared; on unit vectors 1 - cos = |x - c|^2 / 2
            sq = dist**2 / (2.0 if self.metric == "cosine" else 1.0)
            return ops.put(nearest.astype(np.int64)), ops.put(sq.astype(np.float32))
        if self.backend == "faiss":
            dist, nearest = self.index.search(np.ascontiguousarray(ops.get(block)), 1)
            dist = (1.0 - dist[:, 0]) if self.metric == "cosine" else dist[:, 0]
            return ops.put(nearest[:, 0].astype(np.int64)), ops.put(np.maximum(dist, 0.0).astype(np.float32))
        scores = ops.matmul_nt(block, self.right)
        if self.bias is not None:
            scores += self.bias
        if ops.numpy:
            nearest = scores.argmin(1) if self.bias is not None else scores.argmax(1)
            best = np.take_along_axis(scores, nearest[:, None], 1)[:, 0]
        else:
            best, nearest = scores.min(dim=1) if self.bias is not None else scores.max(dim=1)
        if self.bias is None:
            return nearest, ops.clamp0(1.0 - best)
        # |x|^2 + |c|^2 - 2 x.c cancels badly far from the origin: the winner's distance is
        # recomputed directly (d operations per row next to the product's k x d)
        diff = block - self.centroids[nearest]
        return nearest, ops.sq_norms(diff)


def _block_sums(block: Any, nearest: Any, ops: _Ops) -> tuple[Any, Any]:
    """(clusters present, float32 sum of the block's rows in each): a sparse one-hot product."""
    order = np.argsort(nearest, kind="stable")
    present, first = np.unique(nearest[order], return_index=True)
    indptr = np.append(first, len(nearest)).astype(np.int64)
    onehot = sp.csr_matrix(
        (np.ones(len(nearest), dtype=np.float32), order, indptr), shape=(len(present), len(nearest))
    )
    # scipy's sparse x dense product: ~10x faster than torch's index_add_ on a block this size
    return present, onehot @ block


def _assign_block(
    points: _Points, searcher: _Searcher, first: int, block: Any, low: Any, want_sums: bool
) -> tuple[Any, Any, list[tuple[Any, Any]]]:
    """(nearest, distance, per-cluster partial sums) of one product block of rows ``first..``."""
    ops = points.ops
    nearest, dist = searcher(
        block, None if low is None else tuple(part[first : first + len(block)] for part in low)
    )
    partial: list[tuple[Any, Any]] = []
    if want_sums:
        if not ops.numpy:
            partial.append((nearest, block.to(torch.float64)))
        else:
            # float32 sums over at most _GEMM_ROWS rows, whatever the chunk size
            for part in range(0, len(block), _GEMM_ROWS):
                partial.append(
                    _block_sums(block[part : part + _GEMM_ROWS], nearest[part : part + _GEMM_ROWS], ops)
                )
    return nearest, dist, partial


@functools.cache
def _threads() -> ThreadPoolExecutor:
    """Two worker threads for the screen's numpy work (kept for the process: made once)."""
    return ThreadPoolExecutor(max_workers=2, thread_name_prefix="kmeans")


def _full_pass(
    points: _Points, searcher: _Searcher, k: int, *, want_sums: bool
) -> tuple[np.ndarray, np.ndarray, Any, float]:
    """Assign every row: (assignment, distances, float64 sums per cluster or None, seconds).

    With the bfloat16 screen, two blocks are in flight on two threads: a block's product runs
    while the other's screen (numpy, single-threaded, the larger share of a block's time) does,
    which keeps both cores busy. The sums of rows kept in memory are ``index_add_`` products
    after the pass (float32 over _SUM_ROWS rows in row order, added up in float64: ~40 ms for
    200k x 512 rows, against ~0.15 s of per-block sparse products and float64 adds per
    pass); streamed rows are summed per block and the partial sums added in block order.
    Either way the result does not depend on the threads.
    """
    started = time.perf_counter()
    ops = points.ops
    assignment = np.empty(points.n, dtype=np.int64)
    distances = np.empty(points.n, dtype=np.float32)
    sums = ops.zeros((k, points.d), np.float64) if want_sums else None
    # rows kept in memory on the CPU: their sums in one index_add_ after the pass (torch, both
    # cores) instead of a sparse product per block and a scattered add of each in turn
    sums_after = want_sums and ops.numpy and points.cached is not None
    want_block_sums = want_sums and not sums_after
    # products in bounded blocks; faiss and the k-d tree block for themselves
    step = _block_rows(points, k) if searcher.backend == "torch" else points.chunk_size
    low = points.low_precision() if searcher.screen is not None else None

    def blocks() -> Iterator[tuple[int, Any]]:
        for start, chunk in points.chunks():
            for offset in range(0, len(chunk), step):
                yield start + offset, chunk[offset : offset + step]

    def finish(first: int, nearest: Any, dist: Any, partial: list[tuple[Any, Any]]) -> None:
        for present, values in partial:
            if ops.numpy:
                sums[present] += values
            else:
                sums.index_add_(0, present, values)
        assignment[first : first + len(nearest)] = ops.get(nearest)
        distances[first : first + len(nearest)] = ops.get(dist)

    if searcher.screen is None or (os.cpu_count() or 1) < 2:
        for first, block in blocks():
            finish(first, *_assign_block(points, searcher, first, block, low, want_block_sums))
    else:
        # at most two blocks ahead: streamed chunks are not all read ahead
        def assign(item: tuple[int, Any]) -> tuple[int, tuple]:
            first, block = item
            return first, _assign_block(points, searcher, first, block, low, want_block_sums)

        for first, result in in_order(_threads(), assign, blocks(), ahead=2):
            finish(first, *result)
    if sums_after:
        # float32 over at most _SUM_ROWS rows at a time, those partial sums added in float64:
        # a float32 running sum over millions of rows would drift
        rows, clusters = torch.from_numpy(points.cached), torch.from_numpy(assignment)
        partial = torch.empty((k, points.d), dtype=torch.float32)
        for start in range(0, points.n, _SUM_ROWS):
            partial.zero_().index_add_(
                0, clusters[start : start + _SUM_ROWS], rows[start : start + _SUM_ROWS]
            )
            sums += partial.numpy()
    return assignment, distances, sums, time.perf_counter() - started


def _gains_to(points: _Points, centres: Any) -> Any:
    """(len(centres), n) float32 "closeness" g of each row to each centre, one wide product.

    The distance is ``base(x) - g``: cosine ``g = x.c`` (base 1), squared L2
    ``g = 2 x.c - |c|^2`` (base ``|x|^2``), so the nearest centre is the largest g.
    """
    ops = points.ops
    out = ops.empty((len(centres), points.n))
    left = centres if points.metric == "cosine" else centres * 2.0
    if points.cached is not None:  # one product writing the rows of out: no copy, BLAS blocks it
        ops.matmul_nt(left, points.cached, out=out)
    else:
        for start, chunk in points.chunks():
            out[:, start : start + len(chunk)] = ops.matmul_nt(left, chunk)
    if points.metric == "l2":
        out -= ops.sq_norms(centres)[:, None]
    return out


def _base(points: _Points) -> Any:
    """Per row: distance = base - g (see :func:`_gains_to`)."""
    ops = points.ops
    if points.metric == "cosine":
        return ops.put(np.ones(points.n, dtype=np.float32))
    out = ops.empty((points.n,))
    for start, chunk in points.chunks():
        out[start : start + len(chunk)] = ops.sq_norms(chunk)
    return out


# ----------------------------------------------------------------------------- k-means


def _kmeans_pp(
    points: _Points,
    k: int,
    rng: np.random.Generator,
    *,
    pool_bytes: int | None,
    progress: Progress | None,
    tag: str,
) -> np.ndarray:
    """Greedy k-means++: row indices of the k initial centres.

    Each new centre: ``2 + floor(ln k)`` candidates drawn with probability proportional to
    their distance to the nearest centre so far (squared L2, or 1 - cos which is half of it
    on unit vectors); the one whose addition leaves the smallest total distance is kept.
    """
    trials = 2 + int(math.log(k))
    first = int(rng.integers(points.n))
    if points.d <= _LOW_DIM:
        chosen = _kmeans_pp_cells(points.all_rows(), k, rng, first, trials)
    else:
        chosen = _kmeans_pp_pool(points, k, rng, first, trials, pool_bytes, progress, tag)
    return np.array(chosen, dtype=np.int64)


def _batch_size(have: int, k: int) -> int:
    # D changes little while a quarter more centres are added: most pool draws stay acceptable
    return min(k - have, max(1, have // 4))


def _fill_degenerate(n: int, k: int, chosen: list[int], rng: np.random.Generator) -> list[int]:
    """Every row coincides with a centre already: the remaining centres are arbitrary other rows."""
    rest = np.setdiff1d(np.arange(n), np.array(chosen))
    return chosen + rng.choice(rest, k - len(chosen), replace=False).tolist()


def _kmeans_pp_pool(
    points: _Points,
    k: int,
    rng: np.random.Generator,
    first: int,
    trials: int,
    pool_bytes: int | None,
    progress: Progress | None,
    tag: str,
) -> list[int]:
    """k-means++ with candidates drawn in pools whose distances are one wide matrix product.

    Works in closeness g (distance = base - g, :func:`_gains_to`): the best candidate is the
    one with the largest sum of max(g_now, g_candidate). The batch of centres per pool grows
    while most draws are accepted (random high-dimensional data: nearly all) and shrinks
    when few are (early centres of clustered data change D a lot); the pool holds as many
    draws as the last acceptance rate says the batch needs, so few columns are wasted.
    """
    n, ops = points.n, points.ops
    base = _base(points)
    chosen = [first]
    g_now = _gains_to(points, points.rows(np.array(chosen)))[0]
    max_pool = max(2 * trials, int(_pool_budget(pool_bytes, points.device) // (4 * n)))
    growth = 0.25  # centres per pool, as a share of the centres so far
    rate = 0.8  # share of draws accepted, from the last pool
    last_report = time.perf_counter()
    scratch = ops.empty((n,))
    wide = _WideBuffers()
    screened = (
        points.metric == "cosine"
        and _screen_on("cosine", "torch", ops, k, points.d)
        and points.low_precision() is not None
    )
    while len(chosen) < k:
        fits = max(1, int((max_pool - trials) * rate / trials))  # centres one capped pool can serve
        batch = min(k - len(chosen), math.ceil(growth * len(chosen)), fits)
        size = min(max_pool, math.ceil(batch * trials / rate) + trials)
        d_pool = ops.clamp0(base - g_now)
        cdf = ops.cumsum64(d_pool)
        total = float(cdf[-1])
        if not total > 0.0:
            return _fill_degenerate(n, k, chosen, rng)
        pool = np.minimum(ops.searchsorted(cdf, rng.random(size) * total), n - 1)
        accept_u = rng.random(size)
        pool_at = ops.put(pool)
        d_pool_at = ops.get(d_pool[pool_at]).astype(np.float64)
        base_at = base[pool_at]
        columns: Any = (
            _ScreenedColumns(points, points.rows(pool), scratch, wide)
            if screened
            else _Columns(points, _gains_to(points, points.rows(pool)), scratch)
        )

        def d_now_at(a: int, b: int, pool_at: Any = pool_at, base_at: Any = base_at) -> np.ndarray:
            return ops.get(ops.clamp0(base_at[a:b] - g_now[pool_at[a:b]]))

        position, taken = 0, 0
        while taken < batch:
            accepted = _accept(accept_u, d_pool_at, d_now_at, position, trials)
            if len(accepted) < trials:
                break  # pool used up: draw a new one from the current distribution
            kept = columns.kept_all(accepted.tolist(), g_now)
            best = int(accepted[int(np.argmax(kept))])  # first of equal sums: deterministic
            chosen.append(int(pool[best]))
            columns.take(best, g_now)
            position, taken = int(accepted[-1]) + 1, taken + 1
        rate = min(1.0, max(0.1, taken * trials / max(position, 1)))
        if rate >= 0.8:
            growth = min(growth * 2, 4.0)  # most draws accepted: serve more centres per product
        elif rate < 0.5:
            growth = max(growth / 2, 1 / 16)
        if progress is not None and time.perf_counter() - last_report > _PROGRESS_EVERY_S:
            last_report = time.perf_counter()
            progress(f"{tag}k-means++: {len(chosen)}/{k} centres")
    return chosen


class _Columns:
    """A pool's candidates as float32 columns of closeness g to every row (:func:`_gains_to`)."""

    def __init__(self, points: _Points, columns: Any, scratch: Any) -> None:
        self.ops, self.columns, self.scratch = points.ops, columns, scratch

    def kept(self, j: int, g_now: Any) -> float:
        """What adding candidate j leaves: sum of max(g_now, g_j) (the larger, the better)."""
        return self.ops.sum64(self.ops.maximum(self.columns[j], g_now, out=self.scratch))

    def kept_all(self, candidates: list[int], g_now: Any) -> list[float]:
        return [self.kept(j, g_now) for j in candidates]  # one shared scratch row: in turn

    def take(self, j: int, g_now: Any) -> None:
        """Candidate j becomes a centre: g_now = max(g_now, g_j) in place."""
        self.ops.maximum(g_now, self.columns[j], out=g_now)


_WIDE_CHUNK = 16384


class _WideBuffers:
    """The screened pools' (pool, n) bfloat16 products and their chunk, allocated once per
    k-means++ run at the largest pool seen: a fresh 100-300 MB array per pool spent more on
    its pages' first touch than on its product."""

    def __init__(self) -> None:
        self.columns: Any = None
        self.chunk: Any = None

    def get(self, rows: int, n: int) -> tuple[Any, Any]:
        if self.columns is None or self.columns.shape[0] < rows:
            self.columns = torch.empty((rows, n), dtype=torch.bfloat16)
            self.chunk = torch.empty((rows, min(n, _WIDE_CHUNK)), dtype=torch.bfloat16)
        return self.columns[:rows], self.chunk[:rows]


class _ScreenedColumns:
    """The pool's columns in bfloat16 (cosine, CPU), each candidate's gain proven in float32.

    A candidate changes only the rows it moves closer to: g_j(x) > g_now(x). The bfloat16
    product (~3x faster than float32 here) gives g~ within E of g (the bound of
    :class:`_Screen`, here per candidate: |xl||c| + |xh||cl| + d 2^-24 |xh||ch| + u |g~|);
    only the rows with g~ + E > g_now can gain, and their g is recomputed in float32
    (:func:`_dots_at`: each row read in place by index). After the first few centres that
    is a small share of the rows (random 512-d data: ~3% at 10 centres, ~0.1% at 500).
    ``kept`` returns the gain sum max(g_j - g_now, 0), which ranks candidates as the float32
    path's sum max(g_now, g_j) does (both are the potential left, less a constant).
    """

    def __init__(
        self, points: _Points, candidates: np.ndarray, scratch: np.ndarray, wide: _WideBuffers
    ) -> None:
        self.points, self.scratch = points, scratch
        self.x = points.cached
        high, xl, x_norm = points.low_precision()
        c_high, cl, c_norm = _to_bf16(candidates)
        self.candidates = candidates
        pool = padded(c_high, torch.bfloat16)  # AMX's fast shapes
        # (pool, n) bfloat16, rows past the pool unused; written 16384 rows of x at a time: one
        # product with n output columns ran at half the rate (oneDNN's blocking of a wide output)
        columns, chunk = wide.get(len(pool), len(high))
        for start in range(0, len(high), _WIDE_CHUNK):
            part = high[start : start + _WIDE_CHUNK]
            columns[:, start : start + len(part)] = torch.matmul(pool, part.T, out=chunk[:, : len(part)])
        self.bits = columns.view(torch.int16).numpy()
        xh_max = float((x_norm + xl).max())
        accumulate = candidates.shape[1] * 2.0**-24 * 1.01
        # per row: |xl| |c| (below); per candidate: the rest, with the largest |xh|
        self.xl, self.c_norm = xl.astype(np.float32), c_norm
        self.bound = xh_max * cl + accumulate * xh_max * (c_norm + cl)
        self.out = 2.0**-7  # output rounding, as in _Screen
        self.found: dict[int, tuple[np.ndarray | None, np.ndarray]] = {}
        self.threshold: np.ndarray | None = None  # per row, for the g_now it was made from

    def _threshold(self, g_now: np.ndarray) -> np.ndarray:
        """Per row, the int16 bfloat16 pattern a column must reach for the row to gain, with
        the largest bound of the pool's candidates: one compare per candidate instead of the
        bound's arithmetic. A row gains only if g~ (1 + u) > need = g_now - |xl| max|c| - max
        bound, i.e. g~ > need / (1 + u) where need > 0; the threshold is the largest bfloat16
        not above that (rounded down: a superset). Rows with need <= 0 are always looked at."""
        if self.threshold is None:
            need = g_now - self.xl * np.float32(self.c_norm.max()) - np.float32(self.bound.max())
            level = (need / np.float32(1.0 + self.out)).astype(np.float32)
            bits = (level.view(np.int32) >> 16).astype(np.int16)
            bits[~(need > 0.0)] = np.iinfo(np.int16).min
            self.threshold = bits
        return self.threshold

    def _exact(self, j: int, g_now: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(rows that can gain, their float32 g_j)."""
        if j in self.found:
            return self.found[j]
        # bfloat16 patterns as int16 order like their values where the threshold is positive;
        # a negative pattern never reaches a positive threshold, and INT16_MIN passes all
        rows = np.flatnonzero(self.bits[j] >= self._threshold(g_now))
        # read in place by index: faster than numpy streaming every row even when most can gain
        found = (rows, _dots_at(self.x, rows, self.candidates[j]))
        self.found[j] = found
        return found

    def kept_all(self, candidates: list[int], g_now: np.ndarray) -> list[float]:
        """:meth:`kept` of each candidate, two at a time on two threads: a candidate's work is
        the float32 products of the rows it may gain (memory-bound, GIL released), which one
        core does at a time; the result is the same as in turn."""
        self._threshold(g_now)  # made once, before the threads read it
        if len(candidates) < 2 or (os.cpu_count() or 1) < 2:
            return [self.kept(j, g_now) for j in candidates]
        return list(_threads().map(lambda j: self.kept(j, g_now), candidates))

    def kept(self, j: int, g_now: np.ndarray) -> float:
        rows, g = self._exact(j, g_now)
        return float(np.maximum(g - g_now[rows], 0.0).sum(dtype=np.float64))

    def take(self, j: int, g_now: np.ndarray) -> None:
        rows, g = self._exact(j, g_now)
        g_now[rows] = np.maximum(g_now[rows], g)
        self.found.clear()  # g_now changed: what other candidates can gain must be looked at again
        self.threshold = None


def _inner_products_by_index(left: np.ndarray, right: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """float32 ``left[i] . right[ids[i, j]]`` (ids: (len(left), m) int64), reading the rows of
    ``right`` in place: faiss's SIMD inner products by index, 2.5-4x numpy's gather and einsum
    here (which copied every row before reading it again), within float32 rounding of them."""
    import faiss

    left = np.ascontiguousarray(left, dtype=np.float32)
    right = np.ascontiguousarray(right, dtype=np.float32)
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    out = np.empty(ids.shape, dtype=np.float32)
    faiss.fvec_inner_products_by_idx(
        faiss.swig_ptr(out),
        faiss.swig_ptr(left),
        faiss.swig_ptr(right),
        faiss.swig_ptr(ids),
        left.shape[1],
        len(left),
        ids.shape[1],
    )
    return out


def _dots_at(x: np.ndarray, rows: np.ndarray, vector: np.ndarray) -> np.ndarray:
    """float32 ``x[rows] @ vector``, without gathering the rows."""
    return _inner_products_by_index(vector[None, :], x, rows[None, :])[0]


def _paired_dots(x: np.ndarray, centroids: np.ndarray, nearest: np.ndarray) -> np.ndarray:
    """float32 ``x[i] . centroids[nearest[i]]`` for every row, without gathering the centroids."""
    return _inner_products_by_index(x, centroids, nearest[:, None])[:, 0]


def _leaf_cells(x: np.ndarray, leaf_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """A k-d partition: (permutation of the rows, start of each cell in it), cells <= leaf_size rows.

    Each segment is split at the median of its widest dimension, so cells are compact boxes.
    """
    n = len(x)
    order = np.arange(n)
    segments, leaves = [(0, n)], []
    while segments:
        split = []
        for start, end in segments:
            if end - start <= leaf_size:
                leaves.append(start)
                continue
            part = x[order[start:end]]
            widest = int(np.argmax(part.max(axis=0) - part.min(axis=0)))
            middle = (end - start) // 2
            order[start:end] = order[start:end][np.argpartition(part[:, widest], middle)]
            split += [(start, start + middle), (start + middle, end)]
        segments = split
    return order, np.sort(np.array(leaves, dtype=np.int64))


def _accept(
    accept_u: np.ndarray,
    d_pool_at: np.ndarray,
    d_now_at: Callable[[int, int], np.ndarray],
    position: int,
    trials: int,
) -> np.ndarray:
    """Pool positions of the next ``trials`` accepted draws from ``position`` on (fewer when the
    pool runs out). Draw j was made with probability ~ D_pool; accepting it with probability
    D_now / D_pool (D only shrinks) makes it a draw ~ D_now. ``d_pool_at``: D_pool at each pool
    draw; ``d_now_at(start, end)``: D_now at draws start..end-1. Looks at a small window first:
    most draws are accepted."""
    window = 2 * trials
    while True:
        end = min(len(accept_u), position + window)
        ok = accept_u[position:end] * d_pool_at[position:end] < d_now_at(position, end)
        accepted = position + np.flatnonzero(ok)
        if len(accepted) >= trials or end == len(accept_u):
            return accepted[:trials]
        window *= 4


def _kmeans_pp_cells(x: np.ndarray, k: int, rng: np.random.Generator, first: int, trials: int) -> list[int]:
    """k-means++ for low-dimensional rows, gains summed over the rows that can gain only.

    A row moves to candidate c only if |x - c|^2 < D(x). Rows are grouped in small boxes
    (:func:`_leaf_cells`) that keep their largest D; a box whose nearest point to c is farther
    than that is skipped whole. Late in the initialisation a candidate touches a few boxes,
    so each new centre costs far less than a pass over all rows.
    """
    n = len(x)
    order, starts = _leaf_cells(x)
    xp = np.ascontiguousarray(x[order])  # rows in cell order
    lengths = np.diff(np.append(starts, n))
    low = np.minimum.reduceat(xp, starts, axis=0)
    high = np.maximum.reduceat(xp, starts, axis=0)
    middle = np.ascontiguousarray(((low + high) / 2).T)  # (d, cells): one dimension at a time below
    half = np.ascontiguousarray(((high - low) / 2).T)
    first_p = int(np.flatnonzero(order == first)[0])
    diff = xp - xp[first_p]
    d_now = np.einsum("ij,ij->i", diff, diff)
    cell_max = np.maximum.reduceat(d_now, starts)
    chosen = [first_p]

    def rows_of(cells: np.ndarray) -> np.ndarray:
        size = lengths[cells]
        ends = np.cumsum(size)
        return np.arange(ends[-1] if len(ends) else 0) + np.repeat(starts[cells] - (ends - size), size)

    while len(chosen) < k:
        batch = _batch_size(len(chosen), k)
        size = math.ceil(batch * trials * 1.25) + trials
        d_pool = d_now.copy()
        cdf = np.cumsum(d_pool)
        if not cdf[-1] > 0.0:
            return order[_fill_degenerate(n, k, chosen, rng)].tolist()
        pool = np.minimum(np.searchsorted(cdf, rng.random(size) * cdf[-1], side="right"), n - 1)
        accept_u = rng.random(size)
        d_pool_at = d_pool[pool]
        position = 0
        for _ in range(batch):
            accepted = _accept(
                accept_u, d_pool_at, lambda a, b, pool=pool: d_now[pool[a:b]], position, trials
            )
            if len(accepted) < trials:
                break
            candidates = pool[accepted]
            centres = xp[candidates]
            # squared distance from each candidate to each box (0 inside), built dimension by
            # dimension: 7x faster than one (candidates, cells, d) broadcast here
            box = np.zeros((len(candidates), len(starts)))
            for dim in range(x.shape[1]):
                gap = np.abs(centres[:, dim, None] - middle[dim])
                gap -= half[dim]
                np.maximum(gap, 0.0, out=gap)
                box += gap * gap
            # all (candidate, cell) pairs that may gain at once: few numpy calls per centre
            which, cells = np.nonzero(box < cell_max)
            rows = rows_of(cells)
            owner = np.repeat(which, lengths[cells])
            diff = xp[rows] - centres[owner]
            dist = np.einsum("ij,ij->i", diff, diff)
            gains = np.bincount(owner, weights=np.maximum(d_now[rows] - dist, 0.0), minlength=len(candidates))
            best = int(np.argmax(gains))  # first of equal gains: deterministic
            chosen.append(int(candidates[best]))
            mine = owner == best
            rows, dist, cells = rows[mine], dist[mine], cells[which == best]
            if len(rows):
                d_now[rows] = np.minimum(d_now[rows], dist)
                size = lengths[cells]
                offsets = np.cumsum(size) - size
                cell_max[cells] = np.maximum.reduceat(d_now[rows], offsets)
            position = int(accepted[-1]) + 1
    return order[np.array(chosen)].tolist()


def _update(
    points: _Points, sums: Any, sizes: np.ndarray, previous: Any, distances: np.ndarray
) -> tuple[Any, int]:
    """New centroids from the sums; empty clusters re-seeded at the farthest rows. (centroids, empties)."""
    ops = points.ops
    sums, old = ops.get(sums), ops.get(previous).astype(np.float64)
    filled = sizes > 0
    means = old.copy()
    means[filled] = sums[filled] / sizes[filled, None]
    if points.metric == "cosine":
        norms = np.linalg.norm(means, axis=1, keepdims=True)
        # a sum of unit vectors that cancels out has no direction: keep the old centroid
        means = np.where(norms > 1e-12, means / np.maximum(norms, 1e-30), old)
    centroids = means.astype(np.float32)
    empty = np.flatnonzero(sizes == 0)
    if len(empty):
        count = min(len(empty), points.n)
        far = np.argpartition(-distances, count - 1)[:count]
        far = far[np.lexsort((far, -distances[far]))]  # farthest first, ties by row: deterministic
        centroids[empty[:count]] = ops.get(points.rows(far))
    return ops.put(centroids), len(empty)


def _lloyd(
    points: _Points,
    centroids: Any,
    *,
    max_iters: int,
    tol: float,
    backend: str,
    progress: Progress | None,
    tag: str,
) -> tuple[KMeansResult, Any]:
    k = len(centroids)
    previous: np.ndarray | None = None
    previous_inertia = math.inf
    assign_s = 0.0
    iteration = 0
    while True:
        iteration += 1
        searcher = _Searcher(centroids, points.metric, backend, points.ops)
        assignment, distances, sums, seconds = _full_pass(points, searcher, k, want_sums=True)
        assign_s += seconds
        sizes = np.bincount(assignment, minlength=k).astype(np.int64)
        inertia = float(distances.sum(dtype=np.float64))
        if progress is not None:
            progress(
                f"{tag}iteration {iteration}/{max_iters}: inertia {inertia:.6g}, "
                f"{points.n / max(seconds, 1e-9):,.0f} points/s"
            )
        unchanged = previous is not None and np.array_equal(assignment, previous)
        small_gain = tol > 0 and previous_inertia - inertia <= tol * abs(inertia)
        if unchanged or small_gain or iteration >= max_iters:
            break  # the returned centroids are the ones this assignment was made with
        previous, previous_inertia = assignment, inertia
        centroids, _ = _update(points, sums, sizes, centroids, distances)
    result = KMeansResult(
        centroids=np.array(points.ops.get(centroids), dtype=np.float32),
        assignment=assignment,
        distances=distances,
        sizes=sizes,
        iterations=iteration,
        inertia=inertia,
        timings={"assign_s": assign_s},
    )
    return result, centroids


def _kmeans(
    points: _Points,
    k: int,
    *,
    rng: np.random.Generator,
    max_iters: int,
    tol: float,
    backend: str,
    pool_bytes: int | None,
    progress: Progress | None,
    tag: str = "",
    init: str = "kmeans++",
) -> tuple[KMeansResult, Any]:
    if not 1 <= k <= points.n:
        raise ValueError(f"k must be between 1 and the number of rows ({points.n}), got {k}")
    if max_iters < 1:
        raise ValueError(f"max_iters must be >= 1, got {max_iters}")
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    started = time.perf_counter()
    if init == "random":
        # k distinct rows, as faiss seeds its k-means: no pass over the data at all
        seeds = np.sort(rng.choice(points.n, k, replace=False))
    else:
        seeds = _kmeans_pp(points, k, rng, pool_bytes=pool_bytes, progress=progress, tag=tag)
    init_s = time.perf_counter() - started
    result, centroids = _lloyd(
        points, points.rows(seeds), max_iters=max_iters, tol=tol, backend=backend, progress=progress, tag=tag
    )
    result.timings.update(init_s=init_s, lloyd_s=time.perf_counter() - started - init_s)
    return result, centroids


def kmeans(
    x: np.ndarray,
    k: int,
    *,
    metric: str = "cosine",
    max_iters: int = 50,
    tol: float = 1e-4,
    seed: int = 0,
    chunk_size: int = 65536,
    backend: str = "auto",
    device: str = "cpu",
    progress: Progress | None = None,
    max_cache_bytes: int | None = None,
    pool_bytes: int | None = None,
    init: str = "kmeans++",
) -> KMeansResult:
    """k-means of the rows of ``x`` (float16/32 array or memmap, read in ``chunk_size`` rows).

    Stops after ``max_iters`` assignment passes, when no row changes cluster, or (``tol`` >
    0) when the inertia falls by less than ``tol`` x inertia. ``iterations`` counts passes.
    Backends: ``auto`` (matrix products, or the k-d tree for d <= 8 on the CPU), ``torch``
    (matrix products: torch on CUDA, numpy's BLAS on the CPU), ``faiss``, ``kdtree``; they
    differ in the nearest-centroid search only. ``max_cache_bytes``: see the
    module notes; ``pool_bytes``: memory for the k-means++ candidate pool (pool x n float32;
    default 512 MiB on the CPU, a quarter of the free memory of a CUDA device). ``init``:
    greedy ``kmeans++`` (module notes) or ``random`` (k distinct rows drawn with the seed, as
    faiss does: for many clusters on a sample, where k-means++ would cost as much as the
    Lloyd iterations, e.g. training the lists of an IVF index).
    """
    backend, dev = _resolve(backend, device)
    points = _Points(x, metric=metric, device=dev, chunk_size=chunk_size, max_cache_bytes=max_cache_bytes)
    result, _ = _kmeans(
        points,
        int(k),
        rng=np.random.default_rng(seed),
        max_iters=max_iters,
        tol=tol,
        backend=backend,
        pool_bytes=pool_bytes,
        progress=progress,
        init=init,
    )
    return result


def assign(
    x: np.ndarray,
    centroids: np.ndarray,
    *,
    metric: str = "cosine",
    chunk_size: int = 65536,
    backend: str = "auto",
    device: str = "cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid of each row of ``x``: (assignment int64, distance float32)."""
    backend, dev = _resolve(backend, device)
    points = _Points(x, metric=metric, device=dev, chunk_size=chunk_size, max_cache_bytes=0)
    centres = np.asarray(centroids)
    if centres.ndim != 2 or centres.shape[1] != points.d or len(centres) == 0:
        raise ValueError(f"centroids must be (k, {points.d}), got shape {centres.shape}")
    prepared = _Points(centres, metric=metric, device=dev, chunk_size=len(centres)).rows(
        np.arange(len(centres))
    )
    searcher = _Searcher(prepared, metric, backend, points.ops)
    assignment, distances, _, _ = _full_pass(points, searcher, len(centres), want_sums=False)
    return assignment, distances


# ----------------------------------------------------------------------------- hierarchy


def closest_per_cluster(assignment: np.ndarray, distances: np.ndarray, r: int) -> np.ndarray:
    """Sorted indices of the ``r`` members closest to their centroid in every cluster (ties by index)."""
    order = np.lexsort((np.arange(len(assignment)), distances, assignment))
    labels = assignment[order]
    starts = np.flatnonzero(np.r_[True, labels[1:] != labels[:-1]])
    rank = np.arange(len(order)) - np.repeat(starts, np.diff(np.r_[starts, len(order)]))
    return np.sort(order[rank < r])


def _signature(x: np.ndarray, levels: Sequence[Level], upto: int, params: dict[str, Any]) -> str:
    return json.dumps(
        {
            "version": _CHECKPOINT_VERSION,
            "n": int(x.shape[0]),
            "d": int(x.shape[1]),
            "levels": [[lv.n_clusters, lv.n_samples] for lv in levels[:upto]],
            "params": params,
            "fingerprint": _fingerprint(x),
        },
        sort_keys=True,
    )


def _save_level(path: Path, level: LevelResult, signature: str) -> None:
    # a crash never leaves a half-written level under the real name;
    # a handle, not the path: np.savez would append ".npz" to a name
    with atomic_path(path) as temporary, open(temporary, "wb") as handle:
        np.savez(
            handle,
            centroids=level.centroids,
            assignment=level.assignment,
            sizes=level.sizes,
            distances=level.distances,
            stats=np.array(json.dumps(level.stats)),
            signature=np.array(signature),
        )


def _load_level(path: Path, signature: str) -> LevelResult | None:
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as saved:
            if str(saved["signature"]) != signature:
                return None
            return LevelResult(
                centroids=saved["centroids"],
                assignment=saved["assignment"],
                sizes=saved["sizes"],
                distances=saved["distances"],
                stats={**json.loads(str(saved["stats"])), "from_checkpoint": True},
            )
    except (OSError, ValueError, KeyError):  # unreadable or foreign file: recompute the level
        return None


def _validate_levels(levels: Sequence[Level], n: int, n_resamples: int) -> None:
    if not levels:
        raise ValueError("levels is empty: give at least one Level(n_clusters, n_samples)")
    previous = n
    for t, level in enumerate(levels, 1):
        if level.n_clusters < 1 or level.n_samples < 0:
            raise ValueError(f"level {t}: n_clusters must be >= 1 and n_samples >= 0, got {level}")
        if level.n_clusters > previous:
            what = "points" if t == 1 else f"level {t - 1} clusters"
            raise ValueError(f"level {t}: {level.n_clusters} clusters but only {previous} {what} to cluster")
        previous = level.n_clusters
    if n_resamples < 0:
        raise ValueError(f"n_resamples must be >= 0, got {n_resamples}")


def _cluster_level(
    inputs: _Points,
    level: Level,
    *,
    t: int,
    seed: int,
    n_resamples: int,
    options: dict[str, Any],
    progress: Progress | None,
    tag: str,
) -> LevelResult:
    k = level.n_clusters
    started = time.perf_counter()
    rng = np.random.default_rng(np.random.SeedSequence([seed, t, 0]))
    result, centroids = _kmeans(inputs, k, rng=rng, progress=progress, tag=tag, **options)
    stats: dict[str, Any] = {
        "init_s": result.timings["init_s"],
        "lloyd_s": result.timings["lloyd_s"],
        "assign_s": result.timings["assign_s"],
        "iterations": result.iterations,
        "inertia_first": result.inertia,
    }
    assignment, distances = result.assignment, result.distances
    resample_s = time.perf_counter()
    done = 0
    for round_ in range(1, n_resamples + 1 if level.n_samples > 0 else 1):
        chosen = closest_per_cluster(assignment, distances, level.n_samples)
        if len(chosen) < k:  # empty clusters left too few rows for k clusters
            stats["resample_stopped"] = f"round {round_}: {len(chosen)} rows for {k} clusters"
            if progress is not None:
                progress(f"{tag}resampling stopped: {stats['resample_stopped']}")
            break
        subset = _Points.of_prepared(inputs.rows(chosen), inputs.metric, inputs.device, inputs.chunk_size)
        rng = np.random.default_rng(np.random.SeedSequence([seed, t, round_]))
        sub_tag = f"{tag}resample {round_}/{n_resamples} ({len(chosen)} rows) "
        _, centroids = _kmeans(subset, k, rng=rng, progress=progress, tag=sub_tag, **options)
        searcher = _Searcher(centroids, inputs.metric, options["backend"], inputs.ops)
        assignment, distances, _, _ = _full_pass(inputs, searcher, k, want_sums=False)
        done = round_
    stats.update(
        resamples=done,
        resample_s=time.perf_counter() - resample_s,
        seconds=time.perf_counter() - started,
        inertia=float(distances.sum(dtype=np.float64)),
    )
    return LevelResult(
        centroids=np.array(inputs.ops.get(centroids), dtype=np.float32),
        assignment=assignment,
        sizes=np.bincount(assignment, minlength=k).astype(np.int64),
        distances=distances,
        stats=stats,
    )


def hierarchical_kmeans(
    x: np.ndarray,
    levels: Sequence[Level],
    *,
    n_resamples: int = 10,
    max_iters: int = 50,
    tol: float = 1e-4,
    metric: str = "cosine",
    seed: int = 0,
    chunk_size: int = 65536,
    backend: str = "auto",
    device: str = "cpu",
    checkpoint_dir: Path | None = None,
    progress: Progress | None = None,
    max_cache_bytes: int | None = None,
    pool_bytes: int | None = None,
) -> Hierarchy:
    """Bottom-up hierarchical k-means with resampling (Vo et al. 2024) of the rows of ``x``.

    With ``checkpoint_dir`` each finished level is saved as ``level_<t>.npz`` together with a
    signature (shape, levels up to t, parameters, seed, a fingerprint of ``x``); a later call
    with the same signature loads finished levels instead of recomputing them. The chunk
    size and backend are not part of the signature (they change float rounding only).
    """
    levels = [lv if isinstance(lv, Level) else Level(*lv) for lv in levels]
    backend, dev = _resolve(backend, device)
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if not hasattr(x, "shape") or len(x.shape) != 2:
        raise ValueError(f"x must be a 2-D array (n, d), got shape {getattr(x, 'shape', None)}")
    _validate_levels(levels, int(x.shape[0]), n_resamples)
    params = {"n_resamples": n_resamples, "max_iters": max_iters, "tol": tol, "metric": metric, "seed": seed}
    options = {"max_iters": max_iters, "tol": tol, "backend": backend, "pool_bytes": pool_bytes}
    folder = Path(checkpoint_dir) if checkpoint_dir is not None else None

    done: list[LevelResult] = []
    inputs: _Points | None = None
    for t, level in enumerate(levels, 1):
        tag = f"level {t}/{len(levels)} k={level.n_clusters}: "
        signature = _signature(x, levels, t, params) if folder is not None else ""
        path = folder / f"level_{t}.npz" if folder is not None else None
        loaded = _load_level(path, signature) if path is not None else None
        if loaded is not None:
            done.append(loaded)
            inputs = None  # rebuilt from the loaded centroids if a later level needs them
            if progress is not None:
                progress(f"{tag}loaded from checkpoint {path}")
            continue
        if inputs is None:
            if t == 1:
                inputs = _Points(
                    x, metric=metric, device=dev, chunk_size=chunk_size, max_cache_bytes=max_cache_bytes
                )
            else:
                inputs = _Points.of_prepared(_Ops(dev).put(done[-1].centroids), metric, dev, chunk_size)
        if progress is not None:
            progress(f"{tag}clustering {inputs.n} inputs")
        result = _cluster_level(
            inputs,
            level,
            t=t,
            seed=seed,
            n_resamples=n_resamples,
            options=options,
            progress=progress,
            tag=tag,
        )
        done.append(result)
        if path is not None:
            _save_level(path, result, signature)
        if progress is not None:
            progress(f"{tag}done in {result.stats['seconds']:.1f} s" + (" (saved)" if path else ""))
        inputs = _Points.of_prepared(_Ops(dev).put(result.centroids), metric, dev, chunk_size)
    return Hierarchy(levels=done, metric=metric)
