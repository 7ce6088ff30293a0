"""Reference image sets: the evaluation sets a pool is decontaminated against and the seed sets
it is retrieved from. Listing a set's files, a fingerprint that changes when one does, and the
refs the embedding runner reads.

A set is a folder tree of images (``directory``) or of WebDataset ``.tar`` shards
(``webdataset``: the members are read in place, by offset, as the pool's tars are), or a parquet
of vectors computed elsewhere (``vectors``: columns ``path`` and ``vector``, the model identity in
its footer under ``curation.model``, as the store's own vector tables record it). A reference
image is named by its path relative to the set's folder (a tar member: ``<tar path>/<member>``),
so decisions and reports name an evaluation image the way its benchmark does
(``val/n01440764/ILSVRC2012_val_0001.JPEG``).
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


class ReferenceSetError(ValueError):
    """A reference set cannot be used (its folder is missing or holds no image)."""


@dataclass(frozen=True)
class ReferenceFiles:
    """The image files of one reference set, in a stable (sorted) order."""

    name: str
    root: Path
    files: tuple[Path, ...]  # image files (directory) or tar shards (webdataset)
    kind: str = "directory"

    def fingerprint(self) -> str:
        """Changes when a file is added, removed or rewritten (path, size, mtime)."""
        digest = xxhash.xxh3_128()
        digest.update(f"{self.name}\0{self.root}\n".encode())
        for path in self.files:
            stat = path.stat()
            digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        return digest.hexdigest()

    def relative(self, path: Path | str) -> str:
        return Path(path).relative_to(self.root).as_posix()


def _is_image(name: str) -> bool:
    return Path(name).suffix.lower().lstrip(".") in IMAGE_EXTENSIONS


def list_reference_set(name: str, folder: str | Path, kind: str = "directory") -> ReferenceFiles:
    """Every image file (or ``.tar`` shard) under ``folder``, recursively, failing clearly when
    there is none."""
    root = Path(folder)
    if kind == "vectors":
        if not root.is_file():
            raise ReferenceSetError(f"references.sets.{name}.path: vectors file {root} does not exist")
        return ReferenceFiles(name, root.parent, (root,), kind)
    if not root.is_dir():
        raise ReferenceSetError(f"references.sets.{name}.path: folder {root} does not exist")
    if kind == "webdataset":
        files = tuple(sorted(p for p in root.rglob("*.tar") if p.is_file()))
        what = ".tar shards"
    else:
        files = tuple(sorted(p for p in root.rglob("*") if p.is_file() and _is_image(p.name)))
        what = "image files"
    if not files:
        raise ReferenceSetError(f"references.sets.{name}.path: no {what} in {root}")
    return ReferenceFiles(name, root, files, kind)


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
            with Image.open(path) as im:
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
            with tarfile.open(tar, "r:") as archive:
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
    table = pq.read_table(path)
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
