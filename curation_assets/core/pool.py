"""Run a function over many items in chunks, in worker processes scoped to the call.

The one pool runner of the per-file stages (sanitize, quality scores, perceptual hashes):
they keep only their worker function and their row builders. Why it looks like this:

* No pool outlives the call. A pool kept for the life of the process keeps worker
  processes that ``multiprocessing`` joins at interpreter exit while they wait on their
  queue, so a Dagster step process that had used one never exited (issue 12). Starting
  workers from the fork server costs well under a second, against shards of minutes.
* Bounded memory: at most ``workers * in_flight_per_worker`` tasks are submitted at once,
  so a million-file shard never sits in the executor's queue (nor do its results).
* A worker that dies (a decoder segfault, the OOM killer) breaks its whole pool, but only
  the chunks in flight are lost: finished chunks keep their rows, and chunks not yet
  submitted go to a fresh pool. The lost chunks are retried once, one item at a time in a
  one-worker pool: the item that kills that worker again is the culprit and gets
  ``died_row``; a fresh worker takes the next item.
* A call that raises (KeyboardInterrupt, an exception from ``progress``) terminates its
  workers instead of waiting for chunks whose rows nobody will read.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.context import BaseContext
from typing import Any, TypeVar

Item = TypeVar("Item")
Row = TypeVar("Row")

Progress = Callable[[int, int, float], None]  # progress(done, total, items_per_second)
_Chunk = tuple[int, tuple[Any, ...]]  # (index of the first item, items)

# How long a terminated worker (and then the executor's manager thread) may take to go:
# past it the worker is killed, so stopping a pool never hangs the caller.
_STOP_TIMEOUT_S = 10.0


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity, where the OS has one): what a stage's
    ``workers: 0`` ("one process per core") resolves to."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def pool_context() -> BaseContext:
    """The start method of every worker process: forkserver where available, else spawn."""
    # Not "fork": the caller runs threads (Dagster's, polars', torch's OpenMP/MKL pools),
    # and a child forked from a multi-threaded process can block forever on a lock another
    # thread held at the fork. forkserver forks each worker from a small single-threaded
    # server instead, without starting an interpreter per worker as spawn does; Dagster's
    # multiprocess executor uses it too. Like spawn, a worker re-imports the main module
    # when that is a script file: such scripts keep heavy imports under their
    # `if __name__ == "__main__":` guard. Windows has only spawn.
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    return multiprocessing.get_context(method)


def map_chunks(
    items: Sequence[Item],
    worker: Callable[..., list[Row]],
    args: tuple[Any, ...] = (),
    *,
    workers: int,
    chunk_size: int,
    in_flight_per_worker: int = 4,
    failed_row: Callable[[Item, BaseException], Row],
    died_row: Callable[[Item, BaseException], Row],
    progress: Progress | None = None,
    sink: Callable[[int, list[Row]], None] | None = None,
) -> list[Row]:
    """``worker(chunk, *args)`` over ``items`` in chunks of ``chunk_size``; one row per item, in item order.

    With ``sink``, rows are not kept: ``sink(index of the chunk's first item, rows)`` takes each
    chunk as it finishes (in any order), in this process, while the workers go on with the
    next chunks (the shard pass runs its models there); the call then returns an empty list.

    ``worker`` takes a tuple of items and returns one row per item; it is a module-level
    function (forkserver and spawn workers import it by name) whose items and arguments
    pickle. It runs in this process when ``workers`` <= 1, when everything fits in one
    chunk, or when this process is daemonic (a pool worker may not start children);
    otherwise in at most ``workers`` processes started for this call and stopped before it
    returns or raises.

    Nothing a worker does makes the call raise or hang: a chunk whose task raises (say, a
    row that would not pickle) gets ``failed_row(item, exc)`` for each of its items; an
    item that kills its worker process twice (once in its chunk, once alone) gets
    ``died_row(item, exc)``. ``progress(done, total, items_per_second)`` follows each
    chunk; an exception it raises is the caller's and propagates (after the workers are
    stopped).
    """
    chunks = _Chunks(items, chunk_size)
    collected = _OrderedRows(len(items), progress, sink)
    workers = min(int(workers), len(chunks))
    if workers <= 1 or multiprocessing.current_process().daemon:
        while chunks:
            chunk = chunks.popleft()
            try:
                chunk_rows = worker(chunk[1], *args)
            except Exception as exc:  # the same rows a pooled task that raises gets
                chunk_rows = [failed_row(item, exc) for item in chunk[1]]
            collected.add(chunk, chunk_rows)
        return collected.rows if sink is None else []
    _preload_in_forkserver(worker)
    pending = chunks
    in_flight = workers * max(1, int(in_flight_per_worker))
    while pending:  # one round per pool: a dead worker ends a round, a fresh pool starts the next
        lost = _run_round(pending, worker, args, workers, in_flight, collected, failed_row)
        if lost:
            _isolate(lost, worker, args, collected, failed_row, died_row)
    return collected.rows if sink is None else []


def _preload_in_forkserver(worker: Callable[..., Any]) -> None:
    """Have the fork server import the worker's module (and so numpy, Pillow, ...) once.

    The server starts at the first pool of the process and forks every later worker; with
    the module preloaded there, a worker starts with it instead of importing it on its first
    task (about half a second for each worker of each pool otherwise). No effect once the
    server runs, or with spawn.
    """
    if pool_context().get_start_method() == "forkserver":
        multiprocessing.set_forkserver_preload(sorted({"__main__", worker.__module__}))


class _Chunks:
    """The chunks not yet run, sliced from ``items`` only when taken.

    Lazily, because slicing may do work: a byte feed (core.ingest.feed) reads the chunk's
    bytes from object storage or a parquet file when it is sliced, so only the chunks in
    flight are ever in memory. A chunk given back (its pool broke first) is taken again.
    """

    def __init__(self, items: Sequence[Any], chunk_size: int):
        self.items, self.size = items, max(1, int(chunk_size))
        self.next, self.returned = 0, deque[_Chunk]()

    def __len__(self) -> int:
        return len(self.returned) + -(-(len(self.items) - self.next) // self.size)

    def __bool__(self) -> bool:
        return len(self) > 0

    def popleft(self) -> _Chunk:
        if self.returned:
            return self.returned.popleft()
        start = self.next
        self.next = min(start + self.size, len(self.items))
        return start, tuple(self.items[start : self.next])

    def appendleft(self, chunk: _Chunk) -> None:
        self.returned.appendleft(chunk)


class _OrderedRows:
    """Collects chunk rows in item order as chunks finish (in any order), reporting progress;
    or hands each chunk's rows to a sink instead of keeping them."""

    def __init__(self, total: int, progress: Progress | None, sink: Callable[[int, list[Any]], None] | None):
        self.rows: list[Any] = [None] * total if sink is None else []
        self.total, self.done, self.progress, self.sink = total, 0, progress, sink
        self.started = time.perf_counter()

    def add(self, chunk: _Chunk, chunk_rows: list[Any]) -> None:
        start, part = chunk
        if len(chunk_rows) != len(part):  # a worker bug would otherwise shift every later row
            raise ValueError(f"the worker returned {len(chunk_rows)} rows for {len(part)} items")
        if self.sink is None:
            self.rows[start : start + len(part)] = chunk_rows
        else:
            self.sink(start, chunk_rows)
        self.done += len(part)
        if self.progress is not None:
            elapsed = max(time.perf_counter() - self.started, 1e-9)
            self.progress(self.done, self.total, self.done / elapsed)


def _start_pool(workers: int) -> ProcessPoolExecutor:
    return ProcessPoolExecutor(max_workers=workers, mp_context=pool_context())


def _stop_pool(pool: ProcessPoolExecutor, *, graceful: bool) -> None:
    """Shut ``pool`` down and leave none of its processes alive.

    ``graceful``: every task is done, the workers exit on their own and are joined.
    Otherwise (a broken pool, or the call is raising) nothing is waited for: queued tasks
    are cancelled and workers still alive are terminated, then killed if they linger.
    """
    if graceful:
        pool.shutdown(wait=True)
        return
    # Private attributes: the executor hands out neither its processes nor its manager
    # thread, and shutdown(wait=False) forgets both.
    processes = list((getattr(pool, "_processes", None) or {}).values())
    manager = getattr(pool, "_executor_manager_thread", None)
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        if process.is_alive():
            process.terminate()
    deadline = time.monotonic() + _STOP_TIMEOUT_S
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():  # SIGTERM caught or ignored; SIGKILL cannot be
            process.kill()
            process.join(_STOP_TIMEOUT_S)
    if manager is not None:  # it notices the dead workers, fails their futures and returns
        manager.join(_STOP_TIMEOUT_S)


def _run_round(
    pending: _Chunks,
    worker: Callable[..., list[Any]],
    args: tuple[Any, ...],
    workers: int,
    in_flight: int,
    collected: _OrderedRows,
    failed_row: Callable[[Any, BaseException], Any],
) -> list[_Chunk]:
    """Run chunks from ``pending`` in one fresh pool until none is left or a worker dies.

    Returns the chunks lost with a broken pool (submitted, never finished), sorted;
    chunks never submitted stay in ``pending`` for the next round.
    """
    pool = _start_pool(min(workers, len(pending)))
    running: dict[Future[list[Any]], _Chunk] = {}
    lost: list[_Chunk] = []
    broken = graceful = False
    try:
        while running or (pending and not broken):
            while pending and not broken and len(running) < in_flight:
                chunk = pending.popleft()
                try:
                    running[pool.submit(worker, chunk[1], *args)] = chunk
                except BrokenProcessPool:  # a worker died meanwhile: this chunk never ran
                    pending.appendleft(chunk)
                    broken = True
            if not running:
                break
            done_now, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done_now:
                chunk = running.pop(future)
                try:
                    chunk_rows = future.result()
                except BrokenProcessPool:
                    lost.append(chunk)
                    broken = True
                    continue
                except Exception as exc:  # e.g. a row that would not pickle: blame the task
                    chunk_rows = [failed_row(item, exc) for item in chunk[1]]
                collected.add(chunk, chunk_rows)
        graceful = not broken
    finally:
        _stop_pool(pool, graceful=graceful)
    return sorted(lost, key=lambda chunk: chunk[0])


def _isolate(
    lost: Sequence[_Chunk],
    worker: Callable[..., list[Any]],
    args: tuple[Any, ...],
    collected: _OrderedRows,
    failed_row: Callable[[Any, BaseException], Any],
    died_row: Callable[[Any, BaseException], Any],
) -> None:
    """Re-run the items of chunks lost with a broken pool one at a time, in a one-worker pool.

    A broken pool fails every task in flight, so the item that killed the worker is found
    by running each item alone: the one that breaks the pool again gets ``died_row`` and a
    fresh worker takes the next item.
    """
    queue = deque((start + offset, item) for start, part in lost for offset, item in enumerate(part))
    while queue:
        pool = _start_pool(1)
        broken = graceful = False
        try:
            while queue and not broken:
                index, item = queue.popleft()
                try:
                    chunk_rows = pool.submit(worker, (item,), *args).result()
                except BrokenProcessPool as exc:
                    chunk_rows, broken = [died_row(item, exc)], True
                except Exception as exc:
                    chunk_rows = [failed_row(item, exc)]
                collected.add((index, (item,)), chunk_rows)
            graceful = not broken
        finally:
            _stop_pool(pool, graceful=graceful)
