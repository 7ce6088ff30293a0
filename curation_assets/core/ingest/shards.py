"""Shards: how a dataset's roots are cut into units of work, and what files each holds.

A shard is the unit of a per-shard asset (one Dagster partition). Three rules:

- ``subfolder``: each top-level folder of a root is a shard; files lying directly in the
  root form the shard ``_root``.
- ``chunks``: every file under a root, in sorted path order, cut into chunks of
  ``chunk_size``. Membership is frozen in a manifest when a chunk is created, so files
  added later form new chunks instead of reshuffling old ones.
- ``tar``: each ``.tar`` under a root is a shard (WebDataset); members are read in place.
  Members named like an image's key with a ``.json``, ``.txt`` or ``.cls`` extension (what
  img2dataset writes beside each image) are that image's metadata, not files of their own.
- ``parquet``: each ``.parquet`` under a root is a shard; each row holds an image's bytes in
  a column (core.ingest.sources), the other columns are its metadata.

Roots may be local folders or object-store prefixes (``s3://bucket/pool``): the same rules
apply, with listings from fsspec (one listing per shard prefix) and bytes streamed.

With several roots (splits), keys are prefixed with the split: ``train.birds``.
Keys are file-name safe: other characters become ``_`` and a short hash keeps them unique.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import tarfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from curation_assets.config import DatasetConfig, ParquetInput
from curation_assets.core.storage import access_error, filesystem, is_remote, open_input, strip_scheme

ROOT_FILES_SHARD = "_root"
TAR_DAMAGE_MEMBER = "<damaged tar>"  # the row that records where a damaged tar stopped
_SAFE = re.compile(r"[^A-Za-z0-9._-]")

SIDECARS = frozenset({"json", "txt", "cls"})  # WebDataset metadata members beside an image
ShardKind = Literal["folder", "root_files", "chunk", "tar", "parquet"]


@dataclass(frozen=True)
class Shard:
    """One unit of per-shard work."""

    key: str
    split: str
    root: str  # the split's root folder
    kind: ShardKind
    location: str  # the shard folder, the root (root_files, chunk) or the tar file
    members: tuple[str, ...] = field(default=(), repr=False)  # chunk: root-relative paths
    # on object storage: the fingerprint, from the root's one listing (no request per shard)
    stamp: str | None = field(default=None, repr=False, compare=False)

    def fingerprint(self, follow_symlinks: bool = False) -> str:
        """A cheap stamp that changes when files are added to, removed from or renamed in the shard.

        Folders: the newest modification time among the shard folder and its subfolders
        (a folder's mtime changes when its entries change; files are not stat'ed, so a
        scan stays cheap on millions of files). Tars and parquet files: size and mtime.
        Chunks are frozen. On object storage (no folder mtimes): the objects' ETags, one
        listing of the shard's prefix.
        """
        if self.kind == "chunk":
            return "chunk:" + hashlib.sha1("\n".join(self.members).encode()).hexdigest()[:16]
        if is_remote(self.location):
            return self.stamp or _stamp(_shard_listing(self))
        path = Path(self.location)
        try:
            if self.kind in ("tar", "parquet"):
                stat = path.stat()
                return f"{self.kind}:{stat.st_size}:{stat.st_mtime_ns}"
            if self.kind == "root_files":
                return f"dir:{path.stat().st_mtime_ns}"
            newest = path.stat().st_mtime_ns
            for folder in _walk_dirs(path, follow_symlinks):
                newest = max(newest, folder.stat().st_mtime_ns)
            return f"dir:{newest}"
        except OSError as exc:
            return f"error:{type(exc).__name__}"


@dataclass(frozen=True)
class ShardFile:
    """One file of a shard, addressed so any process can read its bytes."""

    image_id: str  # "<shard key>/<path inside the shard>"
    rel_path: str  # path inside the shard (tar member name for tars)
    source_path: str  # the file, or the tar holding it
    offset: int | None  # byte offset of a tar member's data; a parquet shard's row number
    size: int
    mtime: float
    error: str | None = None  # why it could not be stat'ed / read
    data: bytes | None = field(default=None, repr=False)  # the bytes, where listing read them anyway
    metadata: dict[str, Any] | None = None  # sidecars (WebDataset) or other columns (parquet)


@dataclass
class Discovery:
    """What a scan of the roots found."""

    shards: list[Shard]
    missing_roots: list[str]
    new_chunk_manifests: dict[str, list[str]]  # chunk key -> members, to persist


def safe_key(name: str) -> str:
    """A partition key / file name for ``name``: unchanged when already safe."""
    cleaned = _SAFE.sub("_", name).lstrip(".") or "_"
    if cleaned == name:
        return name
    return f"{cleaned}-{hashlib.sha1(name.encode()).hexdigest()[:6]}"


def _walk_dirs(top: Path, follow_symlinks: bool) -> Iterator[Path]:
    for dirpath, dirnames, _ in os.walk(top, followlinks=follow_symlinks):
        for name in dirnames:
            yield Path(dirpath) / name


def _walk_files(top: Path, follow_symlinks: bool) -> Iterator[Path]:
    """Every non-directory entry below ``top`` (broken symlinks included), sorted per folder."""
    for dirpath, dirnames, filenames in os.walk(top, followlinks=follow_symlinks):
        dirnames.sort()
        for name in sorted(filenames):
            yield Path(dirpath) / name


def _prefix(split: str, name: str, several_splits: bool) -> str:
    return safe_key(f"{split}.{name}" if several_splits else name)


def discover_shards(
    dataset: DatasetConfig,
    chunk_manifests: Mapping[str, Sequence[str]] | None = None,
) -> Discovery:
    """Scan the roots and return every shard, including new chunks (with their manifests)."""
    several = len(dataset.roots) > 1
    shards: list[Shard] = []
    missing: list[str] = []
    new_manifests: dict[str, list[str]] = {}
    for split, root in sorted(dataset.roots.items()):
        if not _root_exists(root):
            missing.append(root)
            continue
        rule = dataset.shard_rule.kind
        if rule == "subfolder":
            shards.extend(_subfolder_shards(split, root, several))
        elif rule in ("tar", "parquet"):
            suffix = f".{rule}"
            objects = _remote_objects(root) if is_remote(root) else {}
            shards.extend(
                Shard(
                    _prefix(split, rel[: -len(suffix)], several),
                    split,
                    root,
                    rule,
                    location,
                    stamp=_stamp({rel: objects[rel]}) if rel in objects else None,
                )
                for rel, location in _files_under(root, dataset.follow_symlinks, objects)
                if rel.endswith(suffix)
            )
        else:
            found, manifests = _chunk_shards(
                split,
                root,
                several,
                dataset.shard_rule.chunk_size,
                dataset.follow_symlinks,
                chunk_manifests or {},
            )
            shards.extend(found)
            new_manifests.update(manifests)
    _refuse_collisions(shards)
    return Discovery(sorted(shards, key=lambda s: s.key), missing, new_manifests)


def _root_exists(root: str) -> bool:
    if not is_remote(root):
        return Path(root).is_dir()
    try:
        return bool(filesystem(root).isdir(strip_scheme(root)))
    except Exception as exc:  # an endpoint or credential problem is not a missing root
        raise access_error(root, exc, "listing the dataset root") from exc


def _remote_join(root: str, key: str) -> str:
    """The URL of an object key (as fsspec lists it) under ``root``'s scheme."""
    return f"{root.split('://', 1)[0]}://{key}"


def _files_under(
    root: str, follow_symlinks: bool, objects: Mapping[str, Any] | None = None
) -> Iterator[tuple[str, str]]:
    """(path relative to ``root``, full path or URL) of every file below ``root``, sorted
    (``objects``: a remote root's listing, when the caller has it already)."""
    if not is_remote(root):
        base = Path(root)
        for path in _walk_files(base, follow_symlinks):
            yield path.relative_to(base).as_posix(), str(path)
        return
    prefix = strip_scheme(root).rstrip("/")
    for rel in sorted(objects if objects is not None else _remote_objects(root)):
        yield rel, _remote_join(root, f"{prefix}/{rel}")


def _remote_objects(location: str) -> dict[str, dict[str, Any]]:
    """Every object under a prefix, by its path below the prefix (one paginated listing); the
    object at ``location`` itself under ``""`` when it is one object."""
    fs = filesystem(location)
    path = strip_scheme(location).rstrip("/")
    try:
        found = fs.find(path, detail=True) or {path: fs.info(path)}
    except FileNotFoundError:
        return {}
    except Exception as exc:
        raise access_error(location, exc, "listing it") from exc
    return {key[len(path) + 1 :]: info for key, info in found.items()}


def _shard_listing(shard: Shard) -> dict[str, dict[str, Any]]:
    """The objects of a shard on object storage (root files: those directly under the root)."""
    listing = _remote_objects(shard.location)
    if shard.kind == "root_files":
        return {rel: info for rel, info in listing.items() if "/" not in rel}
    return listing


def _stamp(objects: Mapping[str, Mapping[str, Any]]) -> str:
    """A fingerprint of objects: their names and ETags (sizes where a store has no ETag)."""
    text = "\n".join(f"{k}:{v.get('ETag') or v.get('size')}" for k, v in sorted(objects.items()))
    return "objects:" + hashlib.sha1(text.encode()).hexdigest()[:16]


def _subfolder_shards(split: str, root: str, several: bool) -> list[Shard]:
    if is_remote(root):
        return _remote_subfolder_shards(split, root, several)
    shards = []
    has_root_files = False
    with os.scandir(root) as entries:
        for entry in entries:
            if entry.is_dir():
                shards.append(
                    Shard(_prefix(split, entry.name, several), split, str(root), "folder", entry.path)
                )
            else:
                has_root_files = True
    if has_root_files:
        shards.append(
            Shard(_prefix(split, ROOT_FILES_SHARD, several), split, str(root), "root_files", str(root))
        )
    return shards


def _remote_subfolder_shards(split: str, root: str, several: bool) -> list[Shard]:
    """One shard per top-level prefix of a bucket folder, as locally, from one listing of the
    root that also gives every shard its fingerprint."""
    groups: dict[str, dict[str, Any]] = {}
    for rel, info in _remote_objects(root).items():
        folder, slash, _ = rel.partition("/")
        groups.setdefault(folder if slash else "", {})[rel] = info
    prefix = strip_scheme(root).rstrip("/")
    shards = [
        Shard(
            _prefix(split, folder, several),
            split,
            root,
            "folder",
            _remote_join(root, f"{prefix}/{folder}"),
            stamp=_stamp({rel[len(folder) + 1 :]: info for rel, info in objects.items()}),
        )
        for folder, objects in sorted(groups.items())
        if folder
    ]
    if "" in groups:
        shards.append(
            Shard(
                _prefix(split, ROOT_FILES_SHARD, several),
                split,
                root,
                "root_files",
                root,
                stamp=_stamp(groups[""]),
            )
        )
    return shards


def _chunk_shards(
    split: str,
    root: str,
    several: bool,
    chunk_size: int,
    follow_symlinks: bool,
    manifests: Mapping[str, Sequence[str]],
) -> tuple[list[Shard], dict[str, list[str]]]:
    prefix = _prefix(split, "chunk", several)
    mine = {k: v for k, v in manifests.items() if k.startswith(prefix + "-")}
    assigned = {member for members in mine.values() for member in members}
    shards = [Shard(k, split, str(root), "chunk", str(root), tuple(v)) for k, v in sorted(mine.items())]
    fresh = sorted(rel for rel, _ in _files_under(root, follow_symlinks) if rel not in assigned)
    next_index = 1 + max((int(k.rsplit("-", 1)[1]) for k in mine), default=-1)
    created: dict[str, list[str]] = {}
    for start in range(0, len(fresh), chunk_size):
        key = f"{prefix}-{next_index:06d}"
        next_index += 1
        created[key] = fresh[start : start + chunk_size]
        shards.append(Shard(key, split, str(root), "chunk", str(root), tuple(created[key])))
    return shards, created


def _refuse_collisions(shards: list[Shard]) -> None:
    seen: dict[str, Shard] = {}
    for shard in shards:
        if shard.key in seen:
            raise ValueError(
                f"two shards map to the key {shard.key!r}: {seen[shard.key].location} and {shard.location}"
            )
        seen[shard.key] = shard


def shard_for_key(discovery: Discovery, key: str) -> Shard:
    for shard in discovery.shards:
        if shard.key == key:
            return shard
    known = ", ".join(s.key for s in discovery.shards[:20]) + ("..." if len(discovery.shards) > 20 else "")
    raise KeyError(f"shard {key!r} is not in the dataset any more (found: {known})")


def list_shard_files(
    shard: Shard, follow_symlinks: bool = False, parquet: ParquetInput | None = None
) -> Iterator[ShardFile]:
    """Every file of a shard, in sorted order (tars: archive order), with what is needed to read it
    later. Tar members and parquet rows come with their bytes (listing them reads them anyway)."""
    if shard.kind == "tar":
        yield from with_sidecars(_tar_files(shard))
        return
    if shard.kind == "parquet":
        if parquet is None:
            raise ValueError("a parquet shard needs the dataset's parquet settings (dataset.parquet)")
        yield from _parquet_files(shard, parquet)
        return
    if is_remote(shard.location):
        yield from _remote_files(shard)
        return
    if shard.kind == "folder":
        base = Path(shard.location)
        paths: Iterator[Path] = _walk_files(base, follow_symlinks)
    elif shard.kind == "root_files":
        base = Path(shard.location)
        paths = iter(sorted(p for p in base.iterdir() if not p.is_dir()))
    else:
        base = Path(shard.root)
        paths = (base / member for member in shard.members)
    for path in paths:
        rel = path.relative_to(base).as_posix()
        try:
            stat = path.stat()
            yield ShardFile(f"{shard.key}/{rel}", rel, str(path), None, stat.st_size, stat.st_mtime)
        except OSError as exc:
            yield ShardFile(
                f"{shard.key}/{rel}", rel, str(path), None, 0, 0.0, f"{type(exc).__name__}: {exc}"
            )


def _mtime(info: Mapping[str, Any]) -> float:
    stamp = info.get("LastModified") or info.get("mtime") or info.get("updated")
    if hasattr(stamp, "timestamp"):
        return float(stamp.timestamp())
    try:
        return float(stamp) if stamp is not None else 0.0
    except (TypeError, ValueError):
        return 0.0


def _remote_files(shard: Shard) -> Iterator[ShardFile]:
    """The objects of a shard on object storage: one listing of its prefix (chunks: of the root)."""
    if shard.kind == "chunk":
        listing = _remote_objects(shard.root)
        wanted = list(shard.members)
    else:
        listing = _shard_listing(shard)
        wanted = sorted(listing)
    base = strip_scheme(shard.location).rstrip("/")
    for rel in wanted:
        info = listing.get(rel)
        url = _remote_join(shard.location, f"{base}/{rel}")
        if info is None:
            yield ShardFile(
                f"{shard.key}/{rel}", rel, url, None, 0, 0.0, "FileNotFoundError: the object is gone"
            )
            continue
        yield ShardFile(f"{shard.key}/{rel}", rel, url, None, int(info.get("size") or 0), _mtime(info))


def _tar_files(shard: Shard) -> Iterator[ShardFile]:
    """Every member of a tar, streamed once front to back (local or on object storage)."""
    last = "the start"
    try:
        with open_input(shard.location) as handle, tarfile.open(fileobj=handle, mode="r|") as archive:
            for member in archive:
                if member.isdir():
                    continue
                image_id = f"{shard.key}/{member.name}"
                last = member.name
                if not member.isfile():
                    yield ShardFile(
                        image_id,
                        member.name,
                        shard.location,
                        None,
                        0,
                        float(member.mtime),
                        "tar member is a link or device, not a regular file",
                    )
                    continue
                data = _member_data(archive, member)
                if isinstance(data, Exception):  # cut short: listed as unreadable, then the tar's damage
                    yield ShardFile(
                        image_id,
                        member.name,
                        shard.location,
                        member.offset_data,
                        member.size,
                        float(member.mtime),
                        f"{type(data).__name__}: {data}",
                    )
                    raise data
                yield ShardFile(
                    image_id,
                    member.name,
                    shard.location,
                    member.offset_data,
                    member.size,
                    float(member.mtime),
                    data=data,
                )
    except Exception as exc:  # a damaged tar (or a read cut short): keep what was read, say where it broke
        yield ShardFile(
            f"{shard.key}/{TAR_DAMAGE_MEMBER}",
            TAR_DAMAGE_MEMBER,
            shard.location,
            None,
            0,
            0.0,
            f"tar is damaged after {last}: {type(exc).__name__}: {exc}",
        )


def _member_data(archive: tarfile.TarFile, member: tarfile.TarInfo) -> bytes | Exception:
    reader = archive.extractfile(member)
    try:
        data = reader.read() if reader is not None else b""
    except (OSError, tarfile.TarError, EOFError) as exc:
        return exc
    if len(data) != member.size:
        return EOFError(f"member data ends {member.size - len(data)} bytes early")
    return data


def sample_key(member: str) -> tuple[str, str]:
    """(WebDataset sample key, extension): the key is the path up to the first dot of the file name."""
    folder, _, name = member.rpartition("/")
    stem, dot, ext = name.partition(".")
    return (f"{folder}/{stem}" if folder else stem), (ext.lower() if dot else "")


def _sidecar_value(ext: str, data: bytes) -> dict[str, Any]:
    text = data.decode("utf-8", errors="replace").strip()
    if ext == "json":
        try:
            parsed = json.loads(text)
        except ValueError:
            return {"json": text}
        return parsed if isinstance(parsed, dict) else {"json": parsed}
    return {ext: text}


def with_sidecars(files: Iterator[ShardFile]) -> Iterator[ShardFile]:
    """Fold each sample's ``.json`` / ``.txt`` / ``.cls`` members into its other members' metadata.

    WebDataset keeps a sample's members next to each other, so samples are grouped as they
    stream by. A sidecar with no other member in its sample stays a file of its own (it is
    then listed as not an image, never dropped).
    """
    group: list[ShardFile] = []
    for file in files:
        if group and sample_key(group[0].rel_path)[0] != sample_key(file.rel_path)[0]:
            yield from _fold(group)
            group = []
        group.append(file)
    yield from _fold(group)


def _fold(group: list[ShardFile]) -> Iterator[ShardFile]:
    sidecars = [f for f in group if sample_key(f.rel_path)[1] in SIDECARS and f.data is not None]
    others = [f for f in group if f not in sidecars]
    if not others or not sidecars:
        yield from group
        return
    metadata: dict[str, Any] = {}
    for sidecar in sidecars:
        metadata.update(_sidecar_value(sample_key(sidecar.rel_path)[1], sidecar.data or b""))
    for file in others:
        yield dataclasses.replace(file, metadata={**(file.metadata or {}), **metadata})


def _parquet_files(shard: Shard, parquet: ParquetInput) -> Iterator[ShardFile]:
    """One file per row of a parquet shard, with its bytes and its other columns as metadata."""
    from curation_assets.core.ingest.sources import iter_parquet_rows, parquet_source

    source = parquet_source(shard.location, parquet.image_column)
    keep = None if parquet.metadata_columns is None else list(parquet.metadata_columns)
    if parquet.path_column and keep is not None and parquet.path_column not in keep:
        keep.append(parquet.path_column)
    explicit = set(parquet.metadata_columns or ())
    mtime = 0.0
    for row, data, extra, cell_path in iter_parquet_rows(shard.location, parquet.image_column, keep):
        named = extra.get(parquet.path_column) if parquet.path_column else cell_path
        rel = str(named) if named else f"row-{row:08d}"
        # the naming column is the image's name, not metadata (unless listed as metadata too)
        metadata = {k: v for k, v in extra.items() if k != parquet.path_column or k in explicit}
        image_id = f"{shard.key}/{rel}"
        if data is None:
            yield ShardFile(
                image_id, rel, source, row, 0, mtime, "the row has no image bytes", metadata=metadata
            )
            continue
        yield ShardFile(image_id, rel, source, row, len(data), mtime, data=data, metadata=metadata)
