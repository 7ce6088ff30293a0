"""Shards: how a dataset's roots are cut into units of work, and what files each holds.

A shard is the unit of a per-shard asset (one Dagster partition). Three rules:

- ``subfolder``: each top-level folder of a root is a shard; files lying directly in the
  root form the shard ``_root``.
- ``chunks``: every file under a root, in sorted path order, cut into chunks of
  ``chunk_size``. Membership is frozen in a manifest when a chunk is created, so files
  added later form new chunks instead of reshuffling old ones.
- ``tar``: each ``.tar`` under a root is a shard (WebDataset); members are read in place.

With several roots (splits), keys are prefixed with the split: ``train.birds``.
Keys are file-name safe: other characters become ``_`` and a short hash keeps them unique.
"""

from __future__ import annotations

import hashlib
import os
import re
import tarfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from curation_assets.config import DatasetConfig

ROOT_FILES_SHARD = "_root"
TAR_DAMAGE_MEMBER = "<damaged tar>"  # the row that records where a damaged tar stopped
_SAFE = re.compile(r"[^A-Za-z0-9._-]")

ShardKind = Literal["folder", "root_files", "chunk", "tar"]


@dataclass(frozen=True)
class Shard:
    """One unit of per-shard work."""

    key: str
    split: str
    root: str  # the split's root folder
    kind: ShardKind
    location: str  # the shard folder, the root (root_files, chunk) or the tar file
    members: tuple[str, ...] = field(default=(), repr=False)  # chunk: root-relative paths

    def fingerprint(self, follow_symlinks: bool = False) -> str:
        """A cheap stamp that changes when files are added to, removed from or renamed in the shard.

        Folders: the newest modification time among the shard folder and its subfolders
        (a folder's mtime changes when its entries change; files are not stat'ed, so a
        scan stays cheap on millions of files). Tars: size and mtime. Chunks are frozen.
        """
        if self.kind == "chunk":
            return "chunk:" + hashlib.sha1("\n".join(self.members).encode()).hexdigest()[:16]
        path = Path(self.location)
        try:
            if self.kind == "tar":
                stat = path.stat()
                return f"tar:{stat.st_size}:{stat.st_mtime_ns}"
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
    offset: int | None  # byte offset of a tar member's data
    size: int
    mtime: float
    error: str | None = None  # why it could not be stat'ed / read


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
        root_path = Path(root)
        if not root_path.is_dir():
            missing.append(root)
            continue
        rule = dataset.shard_rule.kind
        if rule == "subfolder":
            shards.extend(_subfolder_shards(split, root_path, several))
        elif rule == "tar":
            shards.extend(
                Shard(
                    _prefix(split, str(p.relative_to(root_path))[: -len(".tar")], several),
                    split,
                    root,
                    "tar",
                    str(p),
                )
                for p in _walk_files(root_path, dataset.follow_symlinks)
                if p.suffix == ".tar"
            )
        else:
            found, manifests = _chunk_shards(
                split,
                root_path,
                several,
                dataset.shard_rule.chunk_size,
                dataset.follow_symlinks,
                chunk_manifests or {},
            )
            shards.extend(found)
            new_manifests.update(manifests)
    _refuse_collisions(shards)
    return Discovery(sorted(shards, key=lambda s: s.key), missing, new_manifests)


def _subfolder_shards(split: str, root: Path, several: bool) -> list[Shard]:
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


def _chunk_shards(
    split: str,
    root: Path,
    several: bool,
    chunk_size: int,
    follow_symlinks: bool,
    manifests: Mapping[str, Sequence[str]],
) -> tuple[list[Shard], dict[str, list[str]]]:
    prefix = _prefix(split, "chunk", several)
    mine = {k: v for k, v in manifests.items() if k.startswith(prefix + "-")}
    assigned = {member for members in mine.values() for member in members}
    shards = [Shard(k, split, str(root), "chunk", str(root), tuple(v)) for k, v in sorted(mine.items())]
    fresh = [
        str(p.relative_to(root))
        for p in _walk_files(root, follow_symlinks)
        if str(p.relative_to(root)) not in assigned
    ]
    fresh.sort()
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


def list_shard_files(shard: Shard, follow_symlinks: bool = False) -> Iterator[ShardFile]:
    """Every file of a shard, in sorted order, with what is needed to read it later."""
    if shard.kind == "tar":
        yield from _tar_files(shard)
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


def _tar_members(path: str) -> tuple[list[tarfile.TarInfo], str | None]:
    """Members of a tar in name order, and the error that stopped the read early (if any)."""
    members: list[tarfile.TarInfo] = []
    try:
        with tarfile.open(path, "r:") as archive:
            while (member := archive.next()) is not None:
                members.append(member)
    except (OSError, tarfile.TarError, EOFError) as exc:
        return sorted(members, key=lambda m: m.name), f"{type(exc).__name__}: {exc}"
    return sorted(members, key=lambda m: m.name), None


def _tar_files(shard: Shard) -> Iterator[ShardFile]:
    members, error = _tar_members(shard.location)
    for member in members:
        if member.isdir():
            continue
        image_id = f"{shard.key}/{member.name}"
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
        yield ShardFile(
            image_id, member.name, shard.location, member.offset_data, member.size, float(member.mtime)
        )
    if error is not None:  # a damaged tar: keep what was readable and say where it broke
        last = members[-1].name if members else "the start"
        yield ShardFile(
            f"{shard.key}/{TAR_DAMAGE_MEMBER}",
            TAR_DAMAGE_MEMBER,
            shard.location,
            None,
            0,
            0.0,
            f"tar is damaged after {last}: {error}",
        )
