"""Reference image sets: the evaluation sets a pool is decontaminated against and the seed sets
it is retrieved from. Listing a set's files, a fingerprint that changes when one does, and the
refs the embedding runner reads.

A set is a folder tree of images (``directory``) or of WebDataset ``.tar`` shards
(``webdataset``: the members are read in place, by offset, as the pool's tars are), or a parquet
of vectors computed elsewhere (``vectors``: columns ``path`` and ``vector``, the model identity in
its footer under ``curation.model``, as the store's own vector tables record it). A reference
image is named by its path relative to the set's folder (a tar member: ``<tar path>/<member>``),
so decisions and reports name an evaluation image the way its benchmark does
(``val/n01440764/ILSVRC2012_val_0001.JPEG``). A set's folder may be on object storage
(``s3://bucket/imagenet/val``): it is listed and read through fsspec (core.storage).
"""

from __future__ import annotations

import json
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import xxhash
from PIL import Image

from curation_assets.core.ingest.formats import IMAGE_EXTENSIONS
from curation_assets.core.ingest.images import ImageRef
from curation_assets.core.storage import as_path, open_input


class ReferenceSetError(ValueError):
    """A reference set cannot be used (its folder is missing or holds no image)."""


@dataclass(frozen=True)
class ReferenceFiles:
    """The image files of one reference set, in a stable (sorted) order."""

    name: str
    root: Path  # a Path, or a UPath on object storage
    files: tuple[Path, ...]  # image files (directory) or tar shards (webdataset)
    kind: str = "directory"
    stamps: tuple[str, ...] = ()  # per file: size and mtime (or ETag), taken when it was listed

    def fingerprint(self) -> str:
        """Changes when a file is added, removed or rewritten (path, size, mtime)."""
        digest = xxhash.xxh3_128()
        digest.update(f"{self.name}\0{self.root}\n".encode())
        stamps = self.stamps or tuple(_stamp(path) for path in self.files)
        for path, stamp in zip(self.files, stamps, strict=True):
            digest.update(f"{path}\0{stamp}\n".encode())
        return digest.hexdigest()

    def relative(self, path: Path | str) -> str:
        return as_path(path).relative_to(self.root).as_posix()


def _is_image(name: str) -> bool:
    return Path(name).suffix.lower().lstrip(".") in IMAGE_EXTENSIONS


def list_reference_set(name: str, folder: str | Path, kind: str = "directory") -> ReferenceFiles:
    """Every image file (or ``.tar`` shard) under ``folder``, recursively, failing clearly when
    there is none."""
    root = as_path(str(folder))
    if kind == "vectors":
        if not root.is_file():
            raise ReferenceSetError(f"references.sets.{name}.path: vectors file {root} does not exist")
        return ReferenceFiles(name, root.parent, (root,), kind)
    if not root.is_dir():
        raise ReferenceSetError(f"references.sets.{name}.path: folder {root} does not exist")
    if kind == "webdataset":
        listed = [(p, s) for p, s in _files_below(root) if p.name.endswith(".tar")]
        what = ".tar shards"
    else:
        listed = [(p, s) for p, s in _files_below(root) if _is_image(p.name)]
        what = "image files"
    if not listed:
        raise ReferenceSetError(f"references.sets.{name}.path: no {what} in {root}")
    return ReferenceFiles(name, root, tuple(p for p, _ in listed), kind, tuple(s for _, s in listed))


def _stamp(path: Path) -> str:
    stat = path.stat()
    return f"{stat.st_size}\0{getattr(stat, 'st_mtime_ns', stat.st_mtime)}"  # UPath stats: st_mtime


def _files_below(root: Path) -> list[tuple[Path, str]]:
    """(file, stamp) of every file below ``root``, sorted: a walk locally, one paginated listing
    on object storage (no request per file)."""
    if isinstance(root, Path):
        return [(p, _stamp(p)) for p in sorted(root.rglob("*")) if p.is_file()]
    base = root.path.rstrip("/")  # type: ignore[attr-defined]
    found = root.fs.find(base, detail=True)  # type: ignore[attr-defined]
    return [
        (root / key[len(base) + 1 :], f"{info.get('size')}\0{info.get('ETag')}")
        for key, info in sorted(found.items())
    ]


def reference_refs(files: ReferenceFiles) -> tuple[list[ImageRef], list[str]]:
    """(refs to embed, files that could not be opened with the reason). Each ref's ``image_id`` is
    the image's name in the set (its path relative to the set's folder).

    A broken reference file is reported and left out rather than failing the set: one bad JPEG
    in a 50k-image evaluation set should not stop decontamination against the others.
    """
    if files.kind == "webdataset":
        return _tar_refs(files)
    refs, unreadable = [], []
    for path in files.files:
        try:
            with path.open("rb") as handle, Image.open(handle) as im:
                width, height = im.size
        except Exception as exc:
            unreadable.append(f"{path}: {type(exc).__name__}: {exc}")
            continue
        refs.append(ImageRef(files.relative(path), str(path), None, path.stat().st_size, width, height))
    return refs, unreadable


def _tar_refs(files: ReferenceFiles) -> tuple[list[ImageRef], list[str]]:
    """Image members of every tar shard, read later in place by offset (as the pool's tars are)."""
    refs, unreadable = [], []
    for tar in files.files:
        prefix = files.relative(tar)
        try:
            with open_input(str(tar)) as handle, tarfile.open(fileobj=handle, mode="r:") as archive:
                for member in sorted(archive.getmembers(), key=lambda m: m.name):
                    if not (member.isfile() and _is_image(member.name)):
                        continue  # WebDataset keeps captions and metadata beside each image
                    try:
                        with Image.open(archive.extractfile(member)) as im:
                            width, height = im.size
                    except Exception as exc:
                        unreadable.append(f"{prefix}/{member.name}: {type(exc).__name__}: {exc}")
                        continue
                    name = f"{prefix}/{member.name}"
                    refs.append(ImageRef(name, str(tar), member.offset_data, member.size, width, height))
        except (OSError, tarfile.TarError, EOFError) as exc:
            unreadable.append(f"{prefix}: {type(exc).__name__}: {exc}")
    return refs, unreadable


VECTORS_MODEL_KEY = b"curation.model"


def read_vector_table(files: ReferenceFiles) -> tuple[list[str], np.ndarray, dict[str, Any]]:
    """(image names, float16 vectors, model identity) of a ``vectors`` set's parquet.

    The identity is required: without it nobody can tell which model made the vectors, and
    comparing another model's vectors with the pool's gives distances that mean nothing.
    """
    import pyarrow.parquet as pq

    path = files.files[0]
    key = f"references.sets.{files.name}.path"
    with path.open("rb") as handle:
        table = pq.read_table(handle)
    metadata = table.schema.metadata or {}
    if VECTORS_MODEL_KEY not in metadata:
        raise ReferenceSetError(
            f"{key}: {path} records no model identity (parquet footer key curation.model: the identity "
            "the store's vector tables record, e.g. an sscd_embeddings shard's)"
        )
    missing = {"path", "vector"} - set(table.column_names)
    if missing:
        raise ReferenceSetError(f"{key}: {path} lacks column(s) {', '.join(sorted(missing))}")
    identity = json.loads(metadata[VECTORS_MODEL_KEY])
    vectors = np.asarray(table.column("vector").to_pylist(), dtype=np.float32)
    if vectors.ndim != 2 or not len(vectors):
        raise ReferenceSetError(f"{key}: {path} holds no vectors of one dimension")
    return table.column("path").to_pylist(), vectors.astype(np.float16), identity
