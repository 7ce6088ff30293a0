"""Run chunked work in worker processes, surviving workers that die.

One loop shared by the per-file stages (sanitize, quality). Why it looks like this:

* Bounded memory: at most ``in_flight`` tasks are submitted at once, so a
  million-file shard never sits in the executor's queue (nor do its results).
* A worker that dies (a decoder segfault, the OOM killer) breaks the whole pool, but
  only the chunks in flight (and those not yet submitted) are lost; every finished
  chunk keeps its rows.
* The lost chunks are then retried one item at a time in a one-worker pool
  (:func:`isolate`): the item that kills that worker again is the culprit and gets a
  failure row; a fresh worker takes the next item.

Callers keep what differs: their worker function (module level, so that spawn and
forkserver workers can import it), their pool, and their failure rows.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Executor, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.context import BaseContext
from typing import Any, TypeVar

Item = TypeVar("Item")
Row = TypeVar("Row")

Chunk = tuple[int, tuple[Item, ...]]  # (index of the first item, items)
Worker = Callable[..., list[Row]]  # worker(items, *args) -> one row per item
OnRows = Callable[[int, list[Row]], None]  # on_rows(index of the first item, rows)
FailedRow = Callable[[Item, BaseException], Row]  # a row for an item whose task failed
Progress = Callable[[int, int, float], None]  # progress(done, total, items_per_second)


def split_chunks(items: Sequence[Item], chunk_size: int) -> list[Chunk]:
    """Consecutive tasks of ``chunk_size`` items, each tagged with the index of its first item."""
    size = max(1, int(chunk_size))
    return [(start, tuple(items[start : start + size])) for start in range(0, len(items), size)]


class OrderedRows:
    """Collects chunk rows in item order as tasks finish (in any order), reporting progress.

    Pass the instance as ``on_rows``; ``rows`` holds one row per item once every chunk is in.
    """

    def __init__(self, total: int, progress: Progress | None = None):
        self.rows: list[Any] = [None] * total
        self.total, self.done, self.progress = total, 0, progress
        self.started = time.perf_counter()

    def __call__(self, start: int, chunk_rows: list[Any]) -> None:
        self.rows[start : start + len(chunk_rows)] = chunk_rows
        self.done += len(chunk_rows)
        if self.progress is not None:
            elapsed = max(time.perf_counter() - self.started, 1e-9)
            self.progress(self.done, self.total, self.done / elapsed)


def run_chunks(
    pool: Executor,
    worker: Worker[Row],
    args: tuple[Any, ...],
    chunks: Sequence[Chunk[Item]],
    in_flight: int,
    on_rows: OnRows[Row],
    failed_row: FailedRow[Item, Row],
    release: Callable[[bool], None],
) -> list[Chunk[Item]]:
    """Run ``worker(items, *args)`` for each chunk in ``pool``; return the chunks lost to a broken pool.

    At most ``in_flight`` tasks are submitted at once (bounded memory). Each finished
    chunk's rows go to ``on_rows``; a task that raises (e.g. a result that would not
    pickle) is blamed alone: ``failed_row(item, exc)`` for each of its items. A dead
    worker breaks the pool: the chunks in flight and those never submitted are returned,
    sorted, for :func:`isolate`. ``release(broken)`` is called once at the end, also
    when an exception (from ``on_rows``, say) propagates; ``broken`` says whether the
    pool broke, i.e. whether any chunk was lost.
    """
    pending = deque(chunks)
    lost: list[Chunk[Item]] = []
    try:
        running: dict[Future[list[Row]], Chunk[Item]] = {}
        broken = False
        while running or (pending and not broken):
            while pending and not broken and len(running) < in_flight:
                chunk = pending.popleft()
                try:
                    running[pool.submit(worker, chunk[1], *args)] = chunk
                except (BrokenProcessPool, RuntimeError):  # RuntimeError: shut down meanwhile
                    lost.append(chunk)
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
                except Exception as exc:  # e.g. a result that would not pickle: blame the task
                    chunk_rows = [failed_row(item, exc) for item in chunk[1]]
                on_rows(chunk[0], chunk_rows)
    finally:
        release(bool(lost))
    lost.extend(pending)
    return sorted(lost, key=lambda chunk: chunk[0])


def isolate(
    lost: Sequence[Chunk[Item]],
    mp_context: BaseContext,
    worker: Worker[Row],
    args: tuple[Any, ...],
    on_rows: OnRows[Row],
    failed_row: FailedRow[Item, Row],
    died_row: FailedRow[Item, Row],
) -> None:
    """Re-run the items of chunks lost with a broken pool one at a time, in a one-worker pool.

    A broken pool fails every task in flight, so the item that killed the worker is
    found by running each item alone: the one that breaks the pool again gets
    ``died_row(item, exc)`` and a fresh worker takes the next item. An item whose task
    raises otherwise gets ``failed_row(item, exc)``. Rows go to ``on_rows(index, [row])``.
    """
    queue = deque((start + offset, item) for start, part in lost for offset, item in enumerate(part))
    while queue:
        with ProcessPoolExecutor(max_workers=1, mp_context=mp_context) as pool:
            while queue:
                index, item = queue.popleft()
                try:
                    chunk_rows = pool.submit(worker, (item,), *args).result()
                except BrokenProcessPool as exc:
                    on_rows(index, [died_row(item, exc)])
                    break  # this pool is broken: the next item gets a fresh one
                except Exception as exc:
                    chunk_rows = [failed_row(item, exc)]
                on_rows(index, chunk_rows)
