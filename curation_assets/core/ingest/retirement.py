"""Retired shards: the per-shard outputs of shards that left the pool, moved aside, never deleted.

When a shard folder or tar disappears from a dataset root, its per-shard outputs must stop
feeding the global assets, but they are the only record of work done (and of what the
shard held), so they are moved, not removed. Layout under a project's store root::

    retired/<UTC stamp>/manifest.json        what was moved, from where, when and why
    retired/<UTC stamp>/<asset>/<file>       each file exactly as it was in <asset>/

``manifest.json`` alone is enough to put the files back by hand: every entry names its
store-relative path, which is also its path under the batch folder. :func:`restore_batch`
does that, refusing to overwrite an output written since.

Pure library: no Dagster import.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from curation_assets.core.storage import as_path, is_remote, move, put_text

RETIRED_DIR = "retired"
MANIFEST_FILE = "manifest.json"
MANIFEST_VERSION = 1
_STAMP = "%Y%m%dT%H%M%SZ"


@dataclass
class RetiredShard:
    """One shard of a batch: where it was, how many images it held, which files moved."""

    key: str
    location: str  # the folder or tar that is gone
    images: int | None  # rows of its inventory (None: it had none)
    files: list[str] = field(default_factory=list)  # store-relative, e.g. "image_inventory/a.parquet"
    restored_at: str | None = None


@dataclass
class RetirementBatch:
    """One retirement: the shards one sensor tick (or headless run) found gone."""

    stamp: str  # the batch folder's name
    retired_at: str  # ISO time, UTC
    reason: str
    shards: list[RetiredShard]
    status: str = "moving"  # "moving" until every file is moved, then "done"
    version: int = MANIFEST_VERSION

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RetirementBatch:
        shards = [RetiredShard(**shard) for shard in data.get("shards", [])]
        return cls(
            stamp=data["stamp"],
            retired_at=data["retired_at"],
            reason=data.get("reason", ""),
            shards=shards,
            status=data.get("status", "done"),
            version=int(data.get("version", MANIFEST_VERSION)),
        )


@dataclass
class ShardToRetire:
    key: str
    location: str
    images: int | None
    files: Sequence[Path]  # absolute paths under the store root


@dataclass
class RestoreResult:
    restored: list[str] = field(default_factory=list)  # shard keys put back
    conflicts: list[str] = field(default_factory=list)  # store-relative paths left in the batch
    missing: list[str] = field(default_factory=list)  # listed in the manifest, not in the batch


def retired_root(store_root: Path) -> Path:
    return as_path(store_root) / RETIRED_DIR


def retire_shards(
    store_root: Path, shards: Sequence[ShardToRetire], reason: str, now: datetime | None = None
) -> RetirementBatch | None:
    """Move each shard's files into a fresh ``retired/<stamp>/`` folder and record them there.

    The manifest is written before the first move (status "moving") and again after the last
    ("done"), so a crash in between leaves a manifest that names every file, moved or not.
    Files are renamed within the store (same filesystem), so nothing is copied. Returns None
    when there is nothing to retire.
    """
    if not shards:
        return None
    store_root = as_path(store_root)
    moment = (now or datetime.now(UTC)).astimezone(UTC)
    folder = _fresh_batch_folder(retired_root(store_root), moment.strftime(_STAMP))
    batch = RetirementBatch(
        stamp=folder.name,
        retired_at=moment.isoformat(timespec="seconds"),
        reason=reason,
        shards=[
            RetiredShard(
                shard.key,
                shard.location,
                shard.images,
                [path.relative_to(store_root).as_posix() for path in shard.files],
            )
            for shard in shards
        ],
    )
    write_manifest(folder, batch)
    for shard in batch.shards:
        for rel in shard.files:
            target = folder / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                move(store_root / rel, target)
            except FileNotFoundError:  # a concurrent retirement took it: the manifest still names it
                continue
    batch.status = "done"
    write_manifest(folder, batch)
    return batch


def _fresh_batch_folder(parent: Path, stamp: str) -> Path:
    # Two retirements within one second get "-2", "-3", ...: a batch folder is never reused.
    parent.mkdir(parents=True, exist_ok=True)
    for n in range(1, 10_000):
        folder = parent / (stamp if n == 1 else f"{stamp}-{n}")
        try:
            if is_remote(str(folder)) and folder.exists():  # object storage has no folder to create
                continue
            folder.mkdir()
            return folder
        except FileExistsError:
            continue
    raise RuntimeError(f"no free retirement folder for {stamp} under {parent}")


def write_manifest(folder: Path, batch: RetirementBatch) -> Path:
    path = folder / MANIFEST_FILE
    put_text(path, json.dumps(batch.to_json(), indent=2, sort_keys=True))
    return path


def load_batches(store_root: Path) -> list[RetirementBatch]:
    """Every retirement batch of a store, oldest first (a torn or foreign manifest is skipped)."""
    root = retired_root(store_root)
    if not root.is_dir():
        return []
    batches = []
    for manifest in sorted(root.glob(f"*/{MANIFEST_FILE}")):
        try:
            batches.append(RetirementBatch.from_json(json.loads(manifest.read_text(encoding="utf-8"))))
        except (ValueError, KeyError, TypeError):
            continue
    return batches


def retired_totals(batches: Iterable[RetirementBatch], active: Iterable[str] = ()) -> tuple[int, int]:
    """(shards, images) retired and not restored, each shard counted once, leaving out ``active``
    keys (a shard whose folder came back and was processed again is not retired any more)."""
    latest: dict[str, RetiredShard] = {}
    for batch in batches:
        for shard in batch.shards:
            if shard.restored_at is None:
                latest[shard.key] = shard
            else:
                latest.pop(shard.key, None)
    for key in set(active):
        latest.pop(key, None)
    return len(latest), sum(shard.images or 0 for shard in latest.values())


def restore_batch(
    store_root: Path, stamp: str, shards: Iterable[str] | None = None, now: datetime | None = None
) -> RestoreResult:
    """Move a batch's files (of every shard, or of ``shards``) back to where they were.

    A file whose original path holds a file again (the shard was processed anew after it came
    back) is left in the batch and reported as a conflict: a restore never overwrites. The
    shard's partition is not re-created here: once its folder or tar is back under a root,
    discovery adds it, and its run finds its outputs current instead of redoing them.
    """
    store_root = as_path(store_root)
    folder = retired_root(store_root) / stamp
    manifest = folder / MANIFEST_FILE
    if not manifest.is_file():
        raise FileNotFoundError(f"no retirement batch {stamp!r} under {retired_root(store_root)}")
    batch = RetirementBatch.from_json(json.loads(manifest.read_text(encoding="utf-8")))
    wanted = set(shards) if shards is not None else None
    moment = (now or datetime.now(UTC)).astimezone(UTC).isoformat(timespec="seconds")
    result = RestoreResult()
    for shard in batch.shards:
        if shard.restored_at is not None or (wanted is not None and shard.key not in wanted):
            continue
        clean = True
        for rel in shard.files:
            source, target = folder / rel, store_root / rel
            if not source.exists():
                result.missing.append(rel)
                continue
            if target.exists():
                result.conflicts.append(rel)
                clean = False
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            move(source, target)
        if clean:
            shard.restored_at = moment
            result.restored.append(shard.key)
    write_manifest(folder, batch)
    return result
