"""Where an image's bytes come from when they are not a local file: object storage and parquet.

Pure library, no Dagster. An image is addressed by ``(source_path, offset, size)`` as the
inventory records it:

- a local file (offset None) or a local tar member (its data offset): read by the workers
  themselves, in place;
- an object (``s3://...``) or a member of a tar on object storage: a range read;
- a row of a parquet shard: ``source_path`` is ``<file>.parquet::<image column>`` and
  ``offset`` the row number (image bytes inside a parquet column are not a byte range of the
  file: pages are encoded and compressed).

:class:`ByteFeed` gives the shard pass its items with their bytes already read when a
worker could not read them cheaply itself: it is sliced chunk by chunk as the pool takes
them (core.pool), and reads each chunk's bytes in order, so a tar on object storage is
streamed through one read-ahead handle, a parquet shard is decoded one row group at a time,
and the objects of a bucket folder are fetched concurrently.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from typing import Any, Protocol

from curation_assets.core.storage import filesystem, is_remote, open_input, strip_scheme

PARQUET_SEP = "::"  # <file>.parquet::<column>: the column of a parquet shard that holds the images


class Addressed(Protocol):
    source_path: str
    offset: int | None
    size: int | None


def parquet_source(path: str, column: str) -> str:
    return f"{path}{PARQUET_SEP}{column}"


def split_parquet_source(source_path: str) -> tuple[str, str] | None:
    """(file, column) of a parquet row's source path, None for anything else."""
    head, sep, column = source_path.rpartition(PARQUET_SEP)
    if not sep or not head.endswith(".parquet"):
        return None
    return head, column


def needs_feed(source_path: str) -> bool:
    """True where the shard pass should read bytes in the main process (see the module doc)."""
    return is_remote(source_path) or split_parquet_source(source_path) is not None


def image_bytes(value: Any) -> bytes | None:
    """The bytes of a parquet image cell: a Hugging Face ``{bytes, path}`` struct or plain binary."""
    if isinstance(value, Mapping):
        value = value.get("bytes")
    return bytes(value) if value is not None else None


class ParquetRows:
    """Rows of one parquet file's image column, read a row group at a time (the last one kept)."""

    def __init__(self, path: str, column: str, options: Mapping[str, Any] | None = None):
        import pyarrow.parquet as pq

        self.path, self.column = path, column
        self._handle = open_input(path, options)
        self.file = pq.ParquetFile(self._handle)
        self.starts: list[int] = []
        at = 0
        for index in range(self.file.num_row_groups):
            self.starts.append(at)
            at += self.file.metadata.row_group(index).num_rows
        self.num_rows = at
        self._group: int | None = None
        self._values: list[Any] = []

    def get(self, row: int) -> bytes:
        import bisect

        if not 0 <= row < self.num_rows:
            raise OSError(f"{self.path} has {self.num_rows} rows; row {row} does not exist")
        group = bisect.bisect_right(self.starts, row) - 1
        if group != self._group:
            table = self.file.read_row_group(group, columns=[self.column])
            self._values = table.column(0).to_pylist()
            self._group = group
        data = image_bytes(self._values[row - self.starts[group]])
        if data is None:
            raise OSError(f"row {row} of {self.path} has no image bytes in column {self.column!r}")
        return data

    def close(self) -> None:
        self._handle.close()


def read_source(source_path: str, offset: int | None, size: int | None) -> bytes:
    """One image's bytes from object storage or a parquet row (workers, thumbnails, export)."""
    from curation_assets.core.storage import read_range

    parquet = split_parquet_source(source_path)
    if parquet is not None:
        rows = ParquetRows(*parquet)
        try:
            return rows.get(int(offset or 0))
        finally:
            rows.close()
    return read_range(source_path, offset, size)


class ByteFeed(Sequence[Any]):
    """``items`` (anything with source_path/offset/size and a ``data`` field), with ``data`` filled
    in when sliced, for the items a worker should not read itself (:func:`needs_feed`).

    Slices are expected in order (the pool takes chunks front to back); any order works, at
    the cost of reopening a container. A read that fails leaves ``data`` None: the worker then
    reads the item itself and records the error as it would for a local file.
    """

    def __init__(self, items: Sequence[Any], options: Mapping[str, Any] | None = None, fetch_batch: int = 64):
        self.items = items
        self.options = options
        self.fetch_batch = fetch_batch
        self._parquet: ParquetRows | None = None
        self._tar: tuple[str, Any] | None = None
        self.bytes_read = 0

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return self.fill(self.items[index])
        return self.fill([self.items[index]])[0]

    def fill(self, items: Sequence[Any]) -> list[Any]:
        """``items`` with the bytes of those that need the feed read in."""
        out = list(items)
        objects = [
            i
            for i, item in enumerate(out)
            if item.data is None and is_remote(item.source_path) and item.offset is None
        ]
        if objects:
            fs = filesystem(out[objects[0]].source_path, self.options)
            found = fs.cat([strip_scheme(out[i].source_path) for i in objects], on_error="return")
            for i in objects:
                data = found.get(strip_scheme(out[i].source_path))
                if isinstance(data, bytes | bytearray):
                    out[i] = replace(out[i], data=bytes(data))
                    self.bytes_read += len(data)
        for i, item in enumerate(out):
            if item.data is not None or item.offset is None or not needs_feed(item.source_path):
                continue
            try:
                data = self._read_member(item)
            except Exception:  # the worker reads it again and records why it failed
                continue
            out[i] = replace(item, data=data)
            self.bytes_read += len(data)
        return out

    def _read_member(self, item: Addressed) -> bytes:
        parquet = split_parquet_source(item.source_path)
        if parquet is not None:
            if self._parquet is None or (self._parquet.path, self._parquet.column) != parquet:
                self.close()
                self._parquet = ParquetRows(*parquet, options=self.options)
            return self._parquet.get(int(item.offset or 0))
        if self._tar is None or self._tar[0] != item.source_path:
            self.close()
            self._tar = (item.source_path, open_input(item.source_path, self.options))
        handle = self._tar[1]
        handle.seek(int(item.offset or 0))
        data = handle.read(item.size)
        if item.size is not None and len(data) != item.size:
            raise OSError(f"short read: {len(data)} of {item.size} bytes at {item.offset}")
        return data

    def close(self) -> None:
        if self._parquet is not None:
            self._parquet.close()
            self._parquet = None
        if self._tar is not None:
            self._tar[1].close()
            self._tar = None


def iter_parquet_rows(
    path: str, column: str, keep: Sequence[str] | None, options: Mapping[str, Any] | None = None
) -> Iterator[tuple[int, bytes | None, dict[str, Any], Any]]:
    """(row number, image bytes, other columns, the image cell's ``path`` if any) of every row,
    a row group at a time (an inventory reads each image once)."""
    import pyarrow.parquet as pq

    with open_input(path, options) as handle:
        file = pq.ParquetFile(handle)
        names = file.schema_arrow.names
        if column not in names:
            raise ValueError(
                f"{path} has no column {column!r} (dataset.parquet.image_column); columns: {', '.join(names)}"
            )
        others = [n for n in names if n != column] if keep is None else [n for n in keep if n in names]
        row = 0
        for group in range(file.num_row_groups):
            table = file.read_row_group(group, columns=[column, *others])
            cells = table.column(column).to_pylist()
            meta = table.select(others).to_pylist() if others else [{}] * len(cells)
            for cell, extra in zip(cells, meta, strict=True):
                name = cell.get("path") if isinstance(cell, Mapping) else None
                yield row, image_bytes(cell), extra, name
                row += 1
