"""core.atomic: a final name shows a whole file or none, temporaries never outlive a failed write,
and writers racing on one name each leave a whole file."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from curation_assets.core.atomic import (
    TEMP_MARK,
    atomic_path,
    fsync_dir,
    temp_beside,
    temp_name,
    write_bytes,
    write_text,
    write_with,
)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if TEMP_MARK in p.name)


def test_writes_land_whole_with_parents_made_and_no_temporaries(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "report.txt"
    assert write_text(target, "héllo\n") == target
    assert target.read_bytes() == "héllo\n".encode()  # UTF-8 whatever the locale
    assert write_bytes(target, b"\x00\x01") == target and target.read_bytes() == b"\x00\x01"
    write_with(target, lambda tmp: tmp.write_bytes(b"via writer"), fsync=False)
    assert target.read_bytes() == b"via writer"
    assert _leftovers(target.parent) == []


def test_a_writer_that_raises_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "table.parquet"
    target.write_bytes(b"old, whole")

    class WriterError(RuntimeError):
        pass

    with pytest.raises(WriterError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half of the new")  # written, then the writer fails
        raise WriterError
    assert target.read_bytes() == b"old, whole"
    assert _leftovers(tmp_path) == []

    fresh = tmp_path / "never.bin"
    with pytest.raises(WriterError), atomic_path(fresh) as tmp:
        tmp.write_bytes(b"half")
        raise WriterError
    assert not fresh.exists() and _leftovers(tmp_path) == []


def test_a_body_that_writes_nothing_is_an_error_not_an_empty_file(tmp_path: Path) -> None:
    target = tmp_path / "out.json"
    with pytest.raises(FileNotFoundError), atomic_path(target):
        pass
    assert not target.exists() and _leftovers(tmp_path) == []


def test_a_process_killed_mid_write_never_shows_half_a_file(tmp_path: Path) -> None:
    target = tmp_path / "manifest.parquet"
    target.write_bytes(b"A" * 1000)
    code = (
        "import os, sys\n"
        "from curation_assets.core.atomic import atomic_path\n"
        "with atomic_path(sys.argv[1]) as tmp:\n"
        "    with open(tmp, 'wb') as f:\n"
        "        f.write(b'B' * 500)\n"
        "        f.flush()\n"
        "        os._exit(9)  # a kill: no finally runs, no rename happens\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(target)], cwd=Path(__file__).parents[1], check=False
    )
    assert done.returncode == 9
    assert target.read_bytes() == b"A" * 1000  # the final name still holds the whole old file
    (left,) = _leftovers(tmp_path)  # only a hidden temporary shows what was cut off
    assert left.startswith(".manifest.parquet" + TEMP_MARK)


def test_temporary_names_are_hidden_beside_the_final_and_unique(tmp_path: Path) -> None:
    final = tmp_path / "x.npy"
    names = {temp_name(final) for _ in range(200)}
    assert len(names) == 200
    assert all(n.parent == tmp_path and n.name.startswith(".x.npy" + TEMP_MARK) for n in names)
    with atomic_path(final) as first, atomic_path(final) as second:  # nested writers of one name
        assert first != second
        first.write_bytes(b"1")
        second.write_bytes(b"2")
    assert final.read_bytes() == b"1"  # the outer one renamed last
    assert _leftovers(tmp_path) == []


def test_a_link_made_at_the_temporary_path_is_renamed_into_place(tmp_path: Path) -> None:
    source = tmp_path / "source.jpg"
    source.write_bytes(b"jpeg")
    with atomic_path(tmp_path / "out" / "linked.jpg") as tmp:
        tmp.symlink_to(source)
    linked = tmp_path / "out" / "linked.jpg"
    assert linked.is_symlink() and linked.read_bytes() == b"jpeg"
    # a dangling link left by a failing body is removed too (it does not "exist")
    with pytest.raises(OSError), atomic_path(tmp_path / "out" / "dangling.jpg") as tmp:
        tmp.symlink_to(tmp_path / "nowhere")
        raise OSError("cannot read the source")
    assert _leftovers(tmp_path / "out") == [] and not (tmp_path / "out" / "dangling.jpg").exists()


def test_temp_beside_removes_what_the_body_left(tmp_path: Path) -> None:
    final = tmp_path / "dest.jpg"
    with temp_beside(final) as tmp:
        tmp.write_bytes(b"copy")
        final.hardlink_to(tmp)  # the caller puts it in place itself, without overwriting
    assert final.read_bytes() == b"copy" and _leftovers(tmp_path) == []
    fsync_dir(tmp_path)
    fsync_dir(tmp_path / "missing")  # a folder that cannot be synced is not an error


def _payload(writer: int, size: int = 64 * 1024) -> bytes:
    return bytes([65 + writer]) * size  # one letter per writer: a mix of two would show


def _check_whole(data: bytes, writers: int) -> None:
    whole = data in {_payload(w) for w in range(writers)}
    assert whole, f"torn file: {len(data)} bytes of letters {bytes(sorted(set(data)))!r}"


def test_concurrent_writers_to_one_name_each_leave_a_whole_file(tmp_path: Path) -> None:
    """Threads of this process and two other processes write one name over and over while a
    reader watches it: every read is one writer's whole payload, and no temporary is left."""
    target = tmp_path / "shared.bin"
    threads, processes, rounds = 4, 2, 25
    writers = threads + processes
    stop = threading.Event()
    seen: list[bytes] = []
    errors: list[BaseException] = []

    def watch() -> None:
        while not stop.is_set():
            try:
                seen.append(target.read_bytes())
            except FileNotFoundError:  # nothing renamed into place yet
                time.sleep(0.0005)

    def write(writer: int) -> None:
        try:
            for _ in range(rounds):
                with atomic_path(target, fsync=False) as tmp, open(tmp, "wb") as handle:
                    data = _payload(writer)
                    handle.write(data[: len(data) // 2])
                    time.sleep(0.0002)  # let the others run between the halves
                    handle.write(data[len(data) // 2 :])
        except BaseException as exc:
            errors.append(exc)

    code = (
        "import sys, time\n"
        "from curation_assets.core.atomic import atomic_path\n"
        "target, writer, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])\n"
        "data = bytes([65 + writer]) * (64 * 1024)\n"
        "for _ in range(rounds):\n"
        "    with atomic_path(target, fsync=False) as tmp, open(tmp, 'wb') as f:\n"
        "        f.write(data[: len(data) // 2])\n"
        "        f.flush()\n"
        "        time.sleep(0.0002)\n"
        "        f.write(data[len(data) // 2 :])\n"
    )
    reader = threading.Thread(target=watch)
    reader.start()
    children = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(target), str(threads + p), str(rounds)],
            cwd=Path(__file__).parents[1],
        )
        for p in range(processes)
    ]
    pool = [threading.Thread(target=write, args=(w,)) for w in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    codes = [child.wait(timeout=120) for child in children]
    stop.set()
    reader.join()

    assert errors == [] and codes == [0] * processes
    assert seen, "the reader never saw the file"
    for data in seen:
        _check_whole(data, writers)
    _check_whole(target.read_bytes(), writers)
    assert _leftovers(tmp_path) == []
