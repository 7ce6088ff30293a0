"""The store: where every asset's files live, written atomically, read lazily.

Layout: ``<storage_root>/<project>/<asset>/<shard>.parquet`` for per-shard assets
(``.npy`` beside it for vectors, row-aligned) and ``<storage_root>/<project>/<asset>/<name>``
for global ones. A write goes to a hidden temporary name in the same folder, is flushed
to disk and renamed into place, so a crash never leaves half a file under a final name.
Per-shard files of a shard that left the pool are moved (never deleted) to
``<storage_root>/<project>/retired/<UTC stamp>/<asset>/`` with a ``manifest.json``
(core.retirement; ``restore_batch`` moves them back).
"""

from __future__ import annotations

import json
import os
import re
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import dagster as dg
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from curation_assets.config import ProjectConfig
from curation_assets.core.atomic import atomic_path  # fsync'd, parents made: as store writes always were

PARQUET = ".parquet"
VECTORS_FILE = "vectors_file"  # parquet metadata: the .npy a vector table is aligned with
_VECTOR_TOKEN = re.compile(r"[0-9a-f]{6,32}")  # the token write_vectors puts in an array's name


class ProjectStore:
    """Paths and atomic IO for one project's outputs (no Dagster needed to use it)."""

    def __init__(self, storage_root: str | os.PathLike[str], project: str):
        self.root = Path(storage_root) / project
        self.project = project

    def __repr__(self) -> str:
        return f"ProjectStore({str(self.root)!r})"

    # -- paths
    def asset_dir(self, asset: str) -> Path:
        return self.root / asset

    def shard_path(self, asset: str, shard: str, suffix: str = PARQUET) -> Path:
        return self.asset_dir(asset) / f"{shard}{suffix}"

    def global_path(self, asset: str, name: str) -> Path:
        return self.asset_dir(asset) / name

    def shards_written(self, asset: str) -> list[str]:
        """Shard keys that have a finished parquet file for ``asset``."""
        folder = self.asset_dir(asset)
        if not folder.is_dir():
            return []
        return sorted(
            p.name[: -len(PARQUET)] for p in folder.glob(f"*{PARQUET}") if not p.name.startswith(".")
        )

    def shard_files(self, asset: str, shards: Iterable[str]) -> dict[str, list[Path]]:
        """Per shard, its files in ``asset``'s folder: the parquet and the vector arrays beside it.

        One listing of the folder serves every shard (retiring thousands stays linear). Names
        are matched exactly (``<shard>.parquet``, ``<shard>.<hex token>.npy``), because keys may
        hold dots: shard ``a`` must not take the files of shard ``a.b``.
        """
        found: dict[str, list[Path]] = {shard: [] for shard in shards}
        folder = self.asset_dir(asset)
        if not found or not folder.is_dir():
            return found
        with os.scandir(folder) as entries:
            for entry in entries:
                name = entry.name
                if name.endswith(PARQUET):
                    shard = name[: -len(PARQUET)]
                elif name.endswith(".npy") and name.count(".") >= 2:
                    shard, token = name[: -len(".npy")].rsplit(".", 1)
                    if not _VECTOR_TOKEN.fullmatch(token):
                        continue
                else:
                    continue
                if shard in found and not name.startswith("."):
                    found[shard].append(folder / name)
        return {shard: sorted(paths) for shard, paths in found.items()}

    # -- writes
    def write_parquet(
        self, frame: pl.DataFrame | pa.Table, path: Path, metadata: Mapping[str, Any] | None = None
    ) -> Path:
        """Write a table atomically; ``metadata`` is kept as JSON in the parquet footer."""
        table = frame.to_arrow() if isinstance(frame, pl.DataFrame) else frame
        if metadata:
            extra = {f"curation.{k}".encode(): json.dumps(v).encode() for k, v in metadata.items()}
            table = table.replace_schema_metadata({**(table.schema.metadata or {}), **extra})
        with atomic_path(path) as tmp:
            pq.write_table(table, tmp, compression="zstd")
        return path

    def write_npy(self, array: np.ndarray, path: Path) -> Path:
        with atomic_path(path) as tmp, open(tmp, "wb") as handle:
            np.save(handle, array)
        return path

    def write_json(self, obj: Any, path: Path) -> Path:
        return self.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str), path)

    def write_text(self, text: str, path: Path) -> Path:
        with atomic_path(path) as tmp:
            tmp.write_text(text)
        return path

    def write_with(self, path: Path, writer: Callable[[Path], None]) -> Path:
        """Atomic write through any writer that takes a path (plots, HTML, tar files)."""
        with atomic_path(path) as tmp:
            writer(tmp)
        return path

    # -- reads
    def parquet_metadata(self, path: Path) -> dict[str, Any]:
        raw = pq.read_schema(path).metadata or {}
        return {
            k.decode().removeprefix("curation."): json.loads(v)
            for k, v in raw.items()
            if k.startswith(b"curation.")
        }

    def scan_shards(self, asset: str, shards: list[str] | None = None) -> pl.LazyFrame | None:
        """All shard files of ``asset`` as one lazy frame (None when nothing is written yet)."""
        keys = self.shards_written(asset) if shards is None else shards
        paths = [str(self.shard_path(asset, key)) for key in keys]
        return pl.scan_parquet(paths) if paths else None

    def parquet_rows(self, path: Path) -> int:
        """Rows of a parquet file, from its footer (no data is read)."""
        return pq.read_metadata(path).num_rows

    def read_json(self, path: Path) -> Any:
        return json.loads(path.read_text())

    # -- vectors: <asset>/<shard>.parquet (ids, row) naming the .npy it is aligned with
    def write_vectors(
        self, asset: str, shard: str, ids: pl.DataFrame, vectors: np.ndarray, metadata: Mapping[str, Any]
    ) -> Path:
        """Write a shard's vectors and their id table as one unit.

        The array goes to a fresh ``<shard>.<token>.npy`` first; the parquet that names it is
        renamed into place last, so readers always see a parquet and the array it was
        written with, even after a crash between the two writes. Older arrays of the shard
        are removed afterwards.
        """
        token = uuid.uuid4().hex[:10]
        array_path = self.shard_path(asset, shard, f".{token}.npy")
        self.write_npy(vectors, array_path)
        table_path = self.shard_path(asset, shard)
        self.write_parquet(ids, table_path, metadata={**metadata, VECTORS_FILE: array_path.name})
        for stale in self.asset_dir(asset).glob(f"{shard}.*.npy"):
            if stale.name != array_path.name and stale.name.count(".") == 2:
                stale.unlink(missing_ok=True)
        return table_path

    def read_vectors(self, asset: str, shard: str) -> tuple[pl.DataFrame, np.ndarray, dict[str, Any]]:
        """(id table, memory-mapped float16 array, metadata) of one shard."""
        table_path = self.shard_path(asset, shard)
        metadata = self.parquet_metadata(table_path)
        array = np.load(self.asset_dir(asset) / metadata[VECTORS_FILE], mmap_mode="r")
        return pl.read_parquet(table_path), array, metadata


class StoreResource(dg.ConfigurableResource):
    """Gives assets their project's store. ``storage_root`` overrides every project's
    ``storage_root`` (for example shared storage when runs execute on other machines)."""

    storage_root: str | None = None

    def for_project(self, project: ProjectConfig) -> ProjectStore:
        return ProjectStore(self.storage_root or project.storage_root, project.name)
