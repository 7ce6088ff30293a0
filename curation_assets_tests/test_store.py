"""The store writes atomically: an interrupted write leaves nothing under the final name."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest

from curation_assets.resources.store import ProjectStore


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_interrupted_parquet_write_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    store = ProjectStore(tmp_path, "p")
    final = store.shard_path("image_inventory", "shard-00")

    def write_half_then_die(table, where, **kwargs):
        Path(where).write_bytes(b"PAR1 half a file")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(pq, "write_table", write_half_then_die)
    with pytest.raises(KeyboardInterrupt):
        store.write_parquet(pl.DataFrame({"a": [1, 2]}), final)
    assert not final.exists()
    assert _leftovers(final.parent) == []  # the temporary file is gone too
    assert store.shards_written("image_inventory") == []


def test_failed_overwrite_keeps_the_previous_file(tmp_path: Path):
    store = ProjectStore(tmp_path, "p")
    final = store.shard_path("sanitized_images", "s")
    store.write_parquet(pl.DataFrame({"a": [1]}), final)

    def broken_writer(path: Path) -> None:
        path.write_bytes(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        store.write_with(final, broken_writer)
    assert pl.read_parquet(final)["a"].to_list() == [1]
    assert _leftovers(final.parent) == ["s.parquet"]


def test_round_trips_and_metadata(tmp_path: Path):
    store = ProjectStore(tmp_path, "p")
    path = store.write_parquet(
        pl.DataFrame({"x": [1, 2]}), store.shard_path("a", "k1"), metadata={"fingerprint": "dir:1"}
    )
    store.write_parquet(pl.DataFrame({"x": [3]}), store.shard_path("a", "k2"))
    assert path == tmp_path / "p" / "a" / "k1.parquet"
    assert store.parquet_metadata(path) == {"fingerprint": "dir:1"}
    assert store.shards_written("a") == ["k1", "k2"]
    assert sorted(store.scan_shards("a").collect()["x"].to_list()) == [1, 2, 3]
    vectors = np.arange(6, dtype=np.float16).reshape(3, 2)
    npy = store.write_npy(vectors, store.shard_path("a", "k1", ".npy"))
    assert np.array_equal(np.load(npy, mmap_mode="r"), vectors)
    assert store.scan_shards("nothing") is None
