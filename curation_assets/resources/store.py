"""The store: where every asset's files live, written atomically, read lazily.

Layout: ``<storage_root>/<project>/<asset>/<shard>.parquet`` for per-shard assets
(``.npy`` beside it for vectors, row-aligned) and ``<storage_root>/<project>/<asset>/<name>``
for global ones. ``storage_root`` is a local folder or object storage (``s3://bucket/prefix``,
``gs://...``; core.storage). Locally a write goes to a hidden temporary name in the same
folder, is flushed to disk and renamed into place; on object storage it is written to a
local temporary file and uploaded as one object. Either way a crash never leaves half a
file under a final name. Readers that need a real file (memory-mapped vectors, faiss) get
a copy staged in the size-bounded local cache (:meth:`ProjectStore.local_file`).
Per-shard files of a shard that left the pool are moved (never deleted) to
``<storage_root>/<project>/retired/<UTC stamp>/<asset>/`` with a ``manifest.json``
(core.retirement; ``restore_batch`` moves them back).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import dagster as dg
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from curation_assets.config import ProjectConfig
from curation_assets.core.atomic import atomic_path  # fsync'd, parents made: as store writes always were
from curation_assets.core.storage import (
    LocalCache,
    as_location,
    check_reachable,
    is_remote,
    remove_tree,
    staged_upload,
    upload_tree,
    use_options,
)

PARQUET = ".parquet"
VECTORS_FILE = "vectors_file"  # parquet metadata: the .npy a vector table is aligned with
_VECTOR_TOKEN = re.compile(r"[0-9a-f]{6,32}")  # the token write_vectors puts in an array's name


class ProjectStore:
    """Paths and atomic IO for one project's outputs (no Dagster needed to use it)."""

    def __init__(
        self,
        storage_root: str | os.PathLike[str],
        project: str,
        storage_options: Mapping[str, Any] | None = None,
        cache: LocalCache | None = None,
    ):
        self.remote = is_remote(storage_root)
        self.root = as_location(storage_root, storage_options) / project
        self.project = project
        self.cache = cache

    def __repr__(self) -> str:
        return f"ProjectStore({str(self.root)!r})"

    # -- paths
    def asset_dir(self, asset: str) -> Path:
        return self.root / asset

    def shard_path(self, asset: str, shard: str, suffix: str = PARQUET) -> Path:
        return self.asset_dir(asset) / f"{shard}{suffix}"

    def global_path(self, asset: str, name: str) -> Path:
        return self.asset_dir(asset) / name

    def list_names(self, folder: Path) -> list[str]:
        """Names of the files directly in ``folder`` (none when it does not exist), hidden ones left out.

        One listing call either way: ``os.scandir`` locally, one LIST per 1,000 keys remotely.
        """
        if not self.remote:
            try:
                with os.scandir(folder) as entries:
                    names = [e.name for e in entries if not e.is_dir()]
            except (FileNotFoundError, NotADirectoryError):
                return []
        else:
            try:
                found = folder.fs.ls(folder.path, detail=True, refresh=True)  # type: ignore[attr-defined]
            except FileNotFoundError:
                return []
            names = [info["name"].rsplit("/", 1)[-1] for info in found if info.get("type") != "directory"]
        return sorted(name for name in names if not name.startswith("."))

    def work_path(self, asset: str, name: str) -> Path:
        """A local file for a step's working data that it memory-maps (a gather of vectors).

        In the store's folder locally; in the local cache folder when the store is on object
        storage (the data is rebuilt from stored outputs, so it need not be uploaded).
        """
        if not self.remote:
            return self.global_path(asset, name)
        if self.cache is None:
            raise RuntimeError("this store is on object storage and has no local cache folder")
        return self.cache.folder / "work" / self.project / asset / name

    def shards_written(self, asset: str) -> list[str]:
        """Shard keys that have a finished parquet file for ``asset``."""
        return [
            name[: -len(PARQUET)] for name in self.list_names(self.asset_dir(asset)) if name.endswith(PARQUET)
        ]

    def shard_files(self, asset: str, shards: Iterable[str]) -> dict[str, list[Path]]:
        """Per shard, its files in ``asset``'s folder: the parquet and the vector arrays beside it.

        One listing of the folder serves every shard (retiring thousands stays linear). Names
        are matched exactly (``<shard>.parquet``, ``<shard>.<hex token>.npy``), because keys may
        hold dots: shard ``a`` must not take the files of shard ``a.b``.
        """
        found: dict[str, list[Path]] = {shard: [] for shard in shards}
        folder = self.asset_dir(asset)
        if not found:
            return found
        for name in self.list_names(folder):
            if name.endswith(PARQUET):
                shard = name[: -len(PARQUET)]
            elif name.endswith(".npy") and name.count(".") >= 2:
                shard, token = name[: -len(".npy")].rsplit(".", 1)
                if not _VECTOR_TOKEN.fullmatch(token):
                    continue
            else:
                continue
            if shard in found:
                found[shard].append(folder / name)
        return {shard: sorted(paths) for shard, paths in found.items()}

    # -- writes
    @contextlib.contextmanager
    def atomic(self, path: Path) -> Iterator[Path]:
        """A local path to write; it appears whole under ``path`` (a rename locally, one upload remotely)."""
        if self.remote:
            with staged_upload(path) as tmp:
                yield tmp
        else:
            with atomic_path(path) as tmp:
                yield tmp

    def write_parquet(
        self, frame: pl.DataFrame | pa.Table, path: Path, metadata: Mapping[str, Any] | None = None
    ) -> Path:
        """Write a table atomically; ``metadata`` is kept as JSON in the parquet footer."""
        table = frame.to_arrow() if isinstance(frame, pl.DataFrame) else frame
        if metadata:
            extra = {f"curation.{k}".encode(): json.dumps(v).encode() for k, v in metadata.items()}
            table = table.replace_schema_metadata({**(table.schema.metadata or {}), **extra})
        with self.atomic(path) as tmp:
            pq.write_table(table, tmp, compression="zstd")
        return path

    def write_npy(self, array: np.ndarray, path: Path) -> Path:
        with self.atomic(path) as tmp, open(tmp, "wb") as handle:
            np.save(handle, array)
        return path

    def write_json(self, obj: Any, path: Path) -> Path:
        return self.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str), path)

    def write_text(self, text: str, path: Path) -> Path:
        with self.atomic(path) as tmp:
            tmp.write_text(text)
        return path

    def write_with(self, path: Path, writer: Callable[[Path], None]) -> Path:
        """Atomic write through any writer that takes a path (plots, HTML, tar files)."""
        with self.atomic(path) as tmp:
            writer(tmp)
        return path

    def remove(self, path: Path) -> None:
        """Delete a file or a whole folder (every object under the prefix remotely); missing is fine."""
        if path.is_file():
            path.unlink(missing_ok=True)
        else:
            remove_tree(path)

    # -- reads
    @contextlib.contextmanager
    def _reader(self, path: Path) -> Iterator[Any]:
        """What pyarrow / polars read: the path locally, an open handle on the object remotely."""
        if not self.remote:
            yield path
            return
        with path.open("rb") as handle:
            yield handle

    def read_parquet(self, path: Path, columns: list[str] | None = None) -> pl.DataFrame:
        with self._reader(path) as source:
            return pl.read_parquet(source, columns=columns)

    def read_npy(self, path: Path, mmap: bool = False) -> np.ndarray:
        """An array; ``mmap`` maps it (a remote array is staged in the local cache first)."""
        if mmap:
            return np.load(self.local_file(path), mmap_mode="r")
        if not self.remote:
            return np.load(path)
        return np.load(io.BytesIO(path.read_bytes()))

    def local_file(self, path: Path, log: Callable[[str], Any] | None = None) -> Path:
        """A local file with ``path``'s bytes: the file itself locally, a cached copy remotely."""
        if not self.remote:
            return path
        if self.cache is None:
            raise RuntimeError(f"{path} is on object storage and this store has no local cache folder")
        return self.cache.fetch(path, log)

    def local_folder(self, folder: Path, log: Callable[[str], Any] | None = None) -> Path:
        """A local folder with ``folder``'s files: itself locally, a cached copy remotely."""
        if not self.remote:
            return folder
        if self.cache is None:
            raise RuntimeError(f"{folder} is on object storage and this store has no local cache folder")
        return self.cache.fetch_tree(folder, log)

    def publish_folder(self, target: Path, write: Callable[[Path], Any]) -> Path:
        """Write a folder of several files with ``write(local_folder)`` and put it at ``target``.

        Not atomic by itself: the caller makes it visible by writing a manifest that names it
        last (a half-written folder is never named). Remotely the files are written to a local
        temporary folder and uploaded one object each.
        """
        self.remove(target)
        if not self.remote:
            target.mkdir(parents=True)
            write(target)
            return target
        import tempfile

        with tempfile.TemporaryDirectory(prefix=".publish-") as tmp:
            write(Path(tmp))
            upload_tree(Path(tmp), target)
        return target

    def parquet_metadata(self, path: Path) -> dict[str, Any]:
        with self._reader(path) as source:
            raw = pq.read_schema(source).metadata or {}
        return {
            k.decode().removeprefix("curation."): json.loads(v)
            for k, v in raw.items()
            if k.startswith(b"curation.")
        }

    def scan_shards(self, asset: str, shards: list[str] | None = None) -> pl.LazyFrame | None:
        """All shard files of ``asset`` as one lazy frame (None when nothing is written yet)."""
        keys = self.shards_written(asset) if shards is None else shards
        if not keys:
            return None
        if not self.remote:
            # missing_columns: shards written before a column was added read it as null
            paths = [str(self.shard_path(asset, key)) for key in keys]
            return pl.scan_parquet(paths, missing_columns="insert")
        import pyarrow.dataset as ds
        from pyarrow.fs import FSSpecHandler, PyFileSystem

        folder = self.asset_dir(asset)
        dataset = ds.dataset(
            [f"{folder.path}/{key}{PARQUET}" for key in keys],  # type: ignore[attr-defined]
            format="parquet",
            filesystem=PyFileSystem(FSSpecHandler(folder.fs)),  # type: ignore[attr-defined]
        )
        return pl.scan_pyarrow_dataset(dataset)

    def parquet_rows(self, path: Path) -> int:
        """Rows of a parquet file, from its footer (no data is read)."""
        with self._reader(path) as source:
            return pq.read_metadata(source).num_rows

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
        for stale in self.shard_files(asset, [shard])[shard]:
            if stale.name.endswith(".npy") and stale.name != array_path.name:
                stale.unlink(missing_ok=True)
        return table_path

    def read_vectors(self, asset: str, shard: str) -> tuple[pl.DataFrame, np.ndarray, dict[str, Any]]:
        """(id table, memory-mapped float16 array, metadata) of one shard."""
        table_path = self.shard_path(asset, shard)
        metadata = self.parquet_metadata(table_path)
        array = self.read_npy(self.asset_dir(asset) / metadata[VECTORS_FILE], mmap=True)
        return self.read_parquet(table_path), array, metadata


def project_store(project: ProjectConfig, storage_root: str | None = None) -> ProjectStore:
    """The store of ``project`` (at ``storage_root`` when given), with its cache and fsspec options.

    A store on object storage is checked once here, so a wrong endpoint or missing
    credentials fail the step at its start with the URL and the setting to check.
    """
    root = storage_root or project.storage_root
    use_options(project.storage_options)  # dataset reads of this process use them too
    cache = None
    if is_remote(root):
        check_reachable(root, project.storage_options)
        cache = LocalCache(project.cache.folder, int(project.cache.max_gb * 2**30))
    return ProjectStore(root, project.name, project.storage_options, cache)


class StoreResource(dg.ConfigurableResource):
    """Gives assets their project's store. ``storage_root`` overrides every project's
    ``storage_root`` (for example shared storage when runs execute on other machines)."""

    storage_root: str | None = None

    def for_project(self, project: ProjectConfig) -> ProjectStore:
        return project_store(project, self.storage_root)
