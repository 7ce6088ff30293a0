"""The shared pool runner: no worker outlives the call, dead workers cost one row, nothing hangs.

Real worker processes throughout. The worker functions live at module level so that
forkserver workers import them by name; the ones that kill their process check the pid
first, so that they never kill the test process itself.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from curation_assets.core import pool
from curation_assets.core.pool import map_chunks
from curation_assets_tests.conftest import write_photo

REPO_ROOT = Path(__file__).resolve().parent.parent
CALL_TIMEOUT_S = 60  # a pooled call of this file that runs longer than this is taken to hang


@pytest.fixture(autouse=True)
def _deadline(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test that hangs instead of blocking the run (SIGALRM interrupts the waiting main thread).

    A test function may set a longer ``deadline_s`` attribute.
    """
    if threading.current_thread() is not threading.main_thread():  # pragma: no cover - no signals there
        yield
        return
    seconds = getattr(request.function, "deadline_s", CALL_TIMEOUT_S)

    def expired(signum: int, frame: object) -> None:
        raise TimeoutError(f"still running after {seconds} s: the pool call hangs")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def started_pools(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The worker count of every pool the runner starts, in order."""
    sizes: list[int] = []
    real_start_pool = pool._start_pool

    def spy(workers: int):
        sizes.append(workers)
        return real_start_pool(workers)

    monkeypatch.setattr(pool, "_start_pool", spy)
    return sizes


# ----------------------------------------------------------------------------- workers and rows


def _square(chunk: tuple[int, ...]) -> list[tuple[int, object]]:
    return [(x, x * x) for x in chunk]


def _square_and_pid(chunk: tuple[int, ...]) -> list[tuple[int, object]]:
    return [(x, (x * x, os.getpid())) for x in chunk]


def _kill_self(test_pid: int) -> None:
    if os.getpid() != test_pid:  # never the test process (an inline run)
        os.kill(os.getpid(), signal.SIGKILL)


def _dies_on(chunk: tuple[int, ...], marked: int, test_pid: int) -> list[tuple[int, object]]:
    """Kills its own process whenever it meets ``marked`` (a decoder segfault, say)."""
    if marked in chunk:
        _kill_self(test_pid)
    return _square(chunk)


def _dies_once_on(
    chunk: tuple[int, ...], marked: int, marker: str, test_pid: int
) -> list[tuple[int, object]]:
    """Kills its own process the first time it meets ``marked`` (the OOM killer, say)."""
    if marked in chunk:
        try:
            Path(marker).open("x").close()  # only the first worker to get here creates it
        except FileExistsError:
            pass
        else:
            _kill_self(test_pid)
    return _square(chunk)


def _raises_on(chunk: tuple[int, ...], marked: int) -> list[tuple[int, object]]:
    if marked in chunk:
        raise ValueError(f"cannot do {marked}")
    return _square(chunk)


def _slow_and_logs_pid(chunk: tuple[int, ...], folder: str) -> list[tuple[int, object]]:
    (Path(folder) / str(os.getpid())).touch()
    time.sleep(0.5)
    return _square(chunk)


def _failed(item: int, exc: BaseException) -> tuple[int, object]:
    return item, f"failed: {exc}"


def _died(item: int, exc: BaseException) -> tuple[int, object]:
    return item, "the worker process died"


def _run(items, worker, args=(), **options):
    options = {"workers": 2, "chunk_size": 4, "failed_row": _failed, "died_row": _died, **options}
    return map_chunks(items, worker, args, **options)


def _children() -> set[int]:
    return {child.pid for child in multiprocessing.active_children() if child.pid is not None}


def _gone(pid: int, within_s: float = 5.0) -> bool:
    """The process is dead (or a zombie) within ``within_s``; on a system without /proc, always True."""
    status = Path(f"/proc/{pid}/stat")
    if not Path("/proc/self/stat").exists():  # pragma: no cover - not Linux
        return True
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            state = status.read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.05)
    return False


# ----------------------------------------------------------------------------- the runner


def test_rows_in_item_order_and_progress_per_chunk(started_pools):
    calls: list[tuple[int, int, float]] = []
    rows = _run(list(range(30)), _square, progress=lambda *args: calls.append(args))
    assert rows == [(x, x * x) for x in range(30)]
    assert started_pools == [2]
    # one call per chunk (chunks finish in any order: the short last one may not be last)
    dones = [done for done, _, _ in calls]
    assert len(dones) == 8 and dones == sorted(dones) and dones[-1] == 30
    assert all(total == 30 and rate > 0 for _, total, rate in calls)


def test_runs_inline_for_one_worker_or_one_chunk(started_pools):
    assert _run(list(range(10)), _square, workers=1) == _square(tuple(range(10)))
    assert _run(list(range(3)), _square, workers=4) == _square((0, 1, 2))
    assert _run([], _square) == []
    assert started_pools == []


def test_no_worker_outlives_a_pooled_call():
    before = _children()
    rows = _run(list(range(40)), _square_and_pid)
    worker_pids = {pid for _, (_, pid) in rows}
    assert worker_pids and os.getpid() not in worker_pids
    assert [x for x, _ in rows] == list(range(40))
    assert _children() - before == set()
    assert all(_gone(pid) for pid in worker_pids)


def test_a_task_that_raises_gets_failed_rows_in_or_out_of_process():
    for workers in (1, 2):
        rows = _run(list(range(12)), _raises_on, (5,), workers=workers)
        assert rows[4:8] == [(x, "failed: cannot do 5") for x in range(4, 8)]
        assert rows[:4] + rows[8:] == [(x, x * x) for x in [*range(4), *range(8, 12)]]


def test_an_item_that_kills_its_worker_gets_the_died_row(started_pools):
    before = _children()
    rows = _run(list(range(40)), _dies_on, (13, os.getpid()))
    assert rows[13] == (13, "the worker process died")
    assert rows[:13] + rows[14:] == [(x, x * x) for x in range(40) if x != 13]
    # the lost chunks were retried one item at a time; the culprit killed a fresh worker too
    assert started_pools.count(1) >= 2
    assert _children() - before == set()


def test_a_worker_killed_once_loses_no_row(tmp_path, started_pools):
    before = _children()
    marker = tmp_path / "killed_once"
    rows = _run(list(range(40)), _dies_once_on, (21, str(marker), os.getpid()))
    assert marker.exists()  # a worker did die
    assert rows == [(x, x * x) for x in range(40)]
    assert 1 in started_pools  # the lost chunks were retried alone
    assert _children() - before == set()


def test_an_exception_from_progress_propagates_and_stops_the_workers(tmp_path):
    before = _children()
    raised_at: list[float] = []

    def progress(done: int, total: int, rate: float) -> None:
        raised_at.append(time.monotonic())
        raise KeyboardInterrupt("stop")  # what Ctrl-C in the middle of a shard raises

    with pytest.raises(KeyboardInterrupt, match="stop"):
        _run(list(range(40)), _slow_and_logs_pid, (str(tmp_path),), chunk_size=1, progress=progress)
    # the queued tasks were not waited for (39 tasks of 0.5 s on two workers were left)
    assert len(raised_at) == 1 and time.monotonic() - raised_at[0] < 3
    worker_pids = [int(path.name) for path in tmp_path.iterdir()]
    assert worker_pids
    assert _children() - before == set()
    assert all(_gone(pid) for pid in worker_pids)


# ----------------------------------------------------------------------------- issue 12


def _pooled_stage(stage: str, folder: str) -> None:
    """Run ``stage`` over the JPEGs of ``folder`` with two workers, as a shard step does."""
    paths = sorted(Path(folder).glob("*.jpg"))
    if stage == "sanitize":
        from curation_assets.config import load_project_dict
        from curation_assets.core.ingest.sanitize import SanitizeItem, sanitize_items

        rules = load_project_dict({"name": "x", "dataset": {"roots": folder}}).stages.sanitize
        rules = rules.model_copy(update={"workers": 2, "chunk_size": 8})
        rows = sanitize_items([SanitizeItem(p.stem, str(p), name=p.name) for p in paths], rules)
        assert [row["image_id"] for row in rows] == [p.stem for p in paths]
        assert all(row["status"] == "ok" for row in rows), [r for r in rows if r["status"] != "ok"][:2]
    else:
        from curation_assets.core.filters.quality import score_images
        from curation_assets.core.ingest.images import ImageRef

        refs = [ImageRef(p.stem, str(p), None, None, 160, 120) for p in paths]
        scores = score_images(refs, workers=2, chunk_size=8)
        assert scores["image_id"].to_list() == [p.stem for p in paths]
        assert scores["error"].null_count() == len(paths)
    print(stage, len(paths), flush=True)


# A Dagster step process of the multiprocess executor is a (non-daemonic) multiprocessing
# child: it ends through multiprocessing's exit function, which joins every child process
# it has, and never through the interpreter shutdown that stops idle executors; a pool
# kept after the call made that join wait forever. The script runs the stage in such a
# process (started like Dagster's, from the fork server), then in its own main process.
_STEP_THEN_MAIN = textwrap.dedent(
    """
    import sys

    from curation_assets.core.pool import pool_context
    from curation_assets_tests.test_pool import _pooled_stage

    stage, folder = sys.argv[1], sys.argv[2]
    step = pool_context().Process(target=_pooled_stage, args=(stage, folder))
    step.start()
    step.join(90)
    if step.is_alive():
        step.kill()
        sys.exit(f"the {stage} step process did not exit within 90 s of starting")
    if step.exitcode != 0:
        sys.exit(f"the {stage} step process failed with exit code {step.exitcode}")
    _pooled_stage(stage, folder)
    """
)


@pytest.mark.parametrize("stage", ["sanitize", "quality"])
def test_a_process_that_ran_a_pooled_stage_exits(tmp_path, stage):
    """The issue-12 regression: a step process that sanitized >32 images in a pool never exited."""
    folder = tmp_path / "images"
    for index in range(200):
        write_photo(folder / f"img_{index:03d}.jpg", seed=index)
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    # Files, not pipes: workers left behind would hold a pipe open and block reading it.
    # A session of its own: whatever the script leaves behind goes with its process group.
    with out.open("w") as stdout, err.open("w") as stderr:
        script = subprocess.Popen(
            [sys.executable, "-c", _STEP_THEN_MAIN, stage, str(folder)],
            cwd=REPO_ROOT,
            stdout=stdout,
            stderr=stderr,
            start_new_session=True,
        )
        try:
            returncode = script.wait(timeout=120)
        except subprocess.TimeoutExpired:
            returncode = None
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(script.pid, signal.SIGKILL)
            script.wait()
    assert returncode == 0, err.read_text()[-3000:]
    assert out.read_text().split() == [stage, "200"] * 2


test_a_process_that_ran_a_pooled_stage_exits.deadline_s = 150  # type: ignore[attr-defined]
