"""CPU matrix products shared by the k-means and the vector index: whether bfloat16 pays, and
worker threads that each run torch on one core.

Why worker threads with single-threaded torch: the blocked kernels here (the join's grouped
products, the IVF assignment, Lloyd passes) alternate a torch product with numpy work on its
result (row maxima, selections, partitions) that runs on one core. Torch's own intra-op
threads do not help the products at these shapes (a 3584 x 256 x 512 bfloat16 product: 0.88
ms on one thread, 1.10 ms on two, measured on the 2-core CI machine), and two Python threads
that each used both cores oversubscribed them. One thread per core, each doing a whole block
(product, then its numpy work), keeps every core busy with no contention.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

from curation_assets.core.pool import usable_cores

Item = TypeVar("Item")
Result = TypeVar("Result")

# Product operands are padded with zero rows to a multiple of this: oneDNN's AMX kernels run
# ~3x faster on such shapes (4096 x 1000 x 512: 9 ms, x 1024: 3 ms)
PAD_ROWS = 64


@functools.cache
def bf16_is_faster() -> bool:
    """Whether this CPU multiplies bfloat16 matrices clearly faster than float32.

    With AMX tiles, yes (bfloat16 products run 4-8x float32's rate): decided from the CPU's
    features, not timed, as a timing on a busy shared machine once came out the other way and
    left a whole run on the float32 path. Otherwise a 4096 x 512 x 512 product, best of 5,
    must be at least 1.5x faster (AVX512-BF16 alone: about 2x; emulated: slower).
    """
    import torch

    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    if amx is not None and amx():
        return True
    generator = torch.Generator().manual_seed(0)
    a32 = torch.randn(4096, 512, generator=generator)
    b32 = torch.randn(512, 512, generator=generator)
    a16, b16 = a32.to(torch.bfloat16), b32.to(torch.bfloat16)
    a_np, b_np = a32.numpy(), b32.numpy()

    def best(product: Callable[[], Any]) -> float:
        product()
        times = []
        for _ in range(5):
            started = time.perf_counter()
            product()
            times.append(time.perf_counter() - started)
        return min(times)

    return best(lambda: a16 @ b16.T) * 1.5 < best(lambda: a_np @ b_np.T)


def padded(matrix: Any, dtype: Any) -> Any:
    """``matrix`` (numpy or torch) as a torch matrix in ``dtype`` with zero rows added up to a
    multiple of PAD_ROWS (the callers cut off their scores)."""
    import torch

    rows, dim = matrix.shape
    out = torch.zeros((-(-rows // PAD_ROWS) * PAD_ROWS, dim), dtype=dtype)
    out[:rows] = torch.as_tensor(matrix)
    return out


@contextlib.contextmanager
def torch_workers(workers: int | None = None) -> Iterator[ThreadPoolExecutor]:
    """A pool of ``workers`` threads (default: one per usable core) whose torch calls each run
    on one thread, for the duration of the block (see the module docstring).

    Torch's thread count is process-wide: it is 1 inside the block (the calling thread
    should only collect results there) and restored afterwards.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(
            max_workers=max(1, workers or usable_cores()),
            thread_name_prefix="products",
            initializer=torch.set_num_threads,
            initargs=(1,),
        ) as pool:
            yield pool
    finally:
        torch.set_num_threads(before)


def in_order(
    pool: ThreadPoolExecutor, work: Callable[[Item], Result], items: Iterable[Item], ahead: int = 4
) -> Iterator[Result]:
    """``work(item)`` for every item on ``pool``, yielded in the items' order, with at most
    ``ahead`` tasks in flight (results are not all held at once)."""
    pending: deque[Future] = deque()
    for item in items:
        pending.append(pool.submit(work, item))
        while len(pending) > ahead or (pending and pending[0].done()):
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()
