"""Shard discovery: the sensor that adds new shards as partitions and runs them, and the
schedule that re-scans and refreshes the global assets once every shard is processed."""

import base64
import hashlib
import json
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dagster as dg

from curation_assets.assets.keys import INVENTORY, MANIFESTS
from curation_assets.config import ProjectConfig
from curation_assets.core.ingest.retirement import RetirementBatch, ShardToRetire, retire_shards, retired_root
from curation_assets.core.ingest.shards import Discovery, Shard, discover_shards, shard_for_key
from curation_assets.core.storage import is_remote
from curation_assets.resources.store import ProjectStore, StoreResource

FINGERPRINT_KEY = "fingerprint"  # parquet metadata the inventory records for its shard
AssetJob = Any  # what dg.define_asset_job returns (its class is not exported)
RETIRE_REASON = "its shard folder or tar is no longer under the dataset roots"


def load_chunk_manifests(store: ProjectStore) -> dict[str, list[str]]:
    folder = store.asset_dir(MANIFESTS)
    if not folder.is_dir():
        return {}
    return {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}


def scan(project: ProjectConfig, store: ProjectStore, persist_new_chunks: bool) -> Discovery:
    """Discover shards; new chunk manifests are written first so a chunk never changes later."""
    found = discover_shards(project.dataset, load_chunk_manifests(store))
    if persist_new_chunks:
        for key, members in found.new_chunk_manifests.items():
            store.write_json(members, store.global_path(MANIFESTS, f"{key}.json"))
    return found


def resolve_shard(project: ProjectConfig, store: ProjectStore, key: str) -> Shard:
    """The shard behind a partition key (a chunk straight from its manifest, without a scan)."""
    manifest = store.global_path(MANIFESTS, f"{key}.json")
    if project.dataset.shard_rule.kind == "chunks" and manifest.is_file():
        roots = project.dataset.roots
        split = key.split(".", 1)[0] if len(roots) > 1 else next(iter(roots))
        root = roots[split]
        return Shard(key, split, root, "chunk", root, tuple(json.loads(manifest.read_text())))
    return shard_for_key(discover_shards(project.dataset, load_chunk_manifests(store)), key)


def recorded_fingerprint(store: ProjectStore, key: str) -> str | None:
    """The fingerprint of the shard when its inventory was last written (None: never)."""
    path = store.shard_path(INVENTORY, key)
    if not path.is_file():
        return None
    return store.parquet_metadata(path).get(FINGERPRINT_KEY)


@dataclass
class PendingShards:
    new: list[Shard]  # not yet a partition
    changed: list[Shard]  # files added/removed since the inventory was written
    unprocessed: list[Shard]  # a partition without an inventory yet
    found: Discovery
    removed: list[str] = field(default_factory=list)  # partitions whose folder or tar is gone
    known: set[str] = field(default_factory=set)  # the partitions at the scan
    fingerprints: dict[str, str] = field(default_factory=dict)  # every found shard's, by key

    @property
    def to_run(self) -> list[Shard]:
        return self.new + self.changed + self.unprocessed


def pending_shards(
    project: ProjectConfig,
    store: ProjectStore,
    instance: dg.DagsterInstance,
    persist_new_chunks: bool,
    cursor: "DiscoveryCursor | None" = None,
) -> PendingShards:
    """New, changed and unprocessed shards, and partitions whose shard is gone.

    With a ``cursor`` (the sensor's), partitions in a bucket whose fingerprints are those the
    cursor settled are taken as up to date without reading their inventory's footer; every
    other partition is compared with the fingerprint its inventory recorded.
    """
    found = scan(project, store, persist_new_chunks)
    known = set(instance.get_dynamic_partitions(partitions_name(project)))
    follow = project.dataset.follow_symlinks
    fingerprints = {shard.key: shard.fingerprint(follow) for shard in found.shards}
    settled: set[int] = set()
    if cursor is not None:
        now = DiscoveryCursor.of({key: fp for key, fp in fingerprints.items() if key in known})
        settled = cursor.same_buckets(now)
    new, changed, unprocessed = [], [], []
    for shard in found.shards:
        if shard.key not in known:
            new.append(shard)
            continue
        if settled and bucket_of(shard.key) in settled:
            continue
        recorded = recorded_fingerprint(store, shard.key)
        if recorded is None:
            unprocessed.append(shard)
        elif recorded != fingerprints[shard.key]:
            changed.append(shard)
    removed = sorted(known - set(fingerprints))
    return PendingShards(new, changed, unprocessed, found, removed, known, fingerprints)


# The sensor's cursor: shard keys hashed into a fixed number of buckets, each holding a short
# digest of the (key, fingerprint) pairs the sensor last settled (requested, or found current).
# A tick reads the inventory footer only of partitions in buckets whose digest moved. The
# cursor's size does not grow with the pool (Dagster stores a copy of it with every tick: a
# map with an entry per shard would be megabytes per tick at 100k shards); empty buckets
# compress to almost nothing, so a small project's cursor is a few dozen bytes.
CURSOR_BUCKETS = 1024
_BUCKET_DIGEST = 6  # bytes: a missed change needs a 48-bit collision within one bucket
_CURSOR_PREFIX = "b1:"


def bucket_of(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=4).digest(), "big") % CURSOR_BUCKETS


@dataclass(frozen=True)
class DiscoveryCursor:
    """Per bucket of shard keys, a digest of the fingerprints the discovery sensor settled."""

    digests: tuple[bytes, ...]

    @classmethod
    def of(cls, fingerprints: Mapping[str, str]) -> "DiscoveryCursor":
        buckets: list[list[str]] = [[] for _ in range(CURSOR_BUCKETS)]
        for key, fingerprint in fingerprints.items():
            buckets[bucket_of(key)].append(f"{key}\0{fingerprint}")
        return cls(
            tuple(
                hashlib.blake2b("\n".join(sorted(entries)).encode(), digest_size=_BUCKET_DIGEST).digest()
                if entries
                else bytes(_BUCKET_DIGEST)
                for entries in buckets
            )
        )

    def encode(self) -> str:
        return _CURSOR_PREFIX + base64.urlsafe_b64encode(zlib.compress(b"".join(self.digests), 9)).decode()

    @classmethod
    def decode(cls, text: str | None) -> "DiscoveryCursor | None":
        """The cursor, or None for no cursor or one this code cannot read (the tick then checks
        every partition, as the first tick does)."""
        if not text or not text.startswith(_CURSOR_PREFIX):
            return None
        try:
            raw = zlib.decompress(base64.urlsafe_b64decode(text[len(_CURSOR_PREFIX) :]))
        except (ValueError, zlib.error):
            return None
        if len(raw) != CURSOR_BUCKETS * _BUCKET_DIGEST:
            return None
        size = _BUCKET_DIGEST
        return cls(tuple(raw[i : i + size] for i in range(0, len(raw), size)))

    def same_buckets(self, other: "DiscoveryCursor") -> set[int]:
        return {i for i, (a, b) in enumerate(zip(self.digests, other.digests, strict=True)) if a == b}


@dataclass
class RetiredShards:
    """What one retirement did: partitions to delete, and where their outputs went."""

    keys: list[str]  # partitions to delete (their outputs are in ``batch``)
    batch: RetirementBatch | None
    held_back: str | None = None  # why shards that look removed were not retired


def retire_removed_shards(
    project: ProjectConfig,
    store: ProjectStore,
    pending: PendingShards,
    instance: dg.DagsterInstance | None = None,
    log: Callable[[str], None] | None = None,
) -> RetiredShards:
    """Retire partitions whose shard folder or tar is gone: move their per-shard outputs into
    ``<store>/retired/<UTC stamp>/`` (with a manifest; see core.retirement) so the global
    assets, which read only current partitions' files, drop them.

    With ``instance`` the partitions are deleted here (the headless runner); without, the
    caller deletes them (the sensor returns a delete request, so its tick shows it). Nothing
    is retired while a root is missing or the scan found no shard at all: an unmounted volume
    must not empty the curation.
    """
    if not pending.removed:
        return RetiredShards([], None)
    held_back = None
    if pending.found.missing_roots:
        held_back = f"dataset roots not found ({', '.join(pending.found.missing_roots)})"
    elif not pending.found.shards:
        held_back = "the scan found no shard at all (an unmounted volume?)"
    if held_back:
        held_back += f": {len(pending.removed)} shard(s) that look removed are kept until it is back"
        if log:
            log(held_back)
        return RetiredShards([], None, held_back)
    # Imported here: project.py imports this module to build the sensor.
    from curation_assets.assets.project import per_shard_asset_names

    files = [store.shard_files(asset, pending.removed) for asset in per_shard_asset_names(project)]
    shards = []
    for key in pending.removed:
        inventory = store.shard_path(INVENTORY, key)
        recorded = store.parquet_metadata(inventory) if inventory.is_file() else {}
        shards.append(
            ShardToRetire(
                key,
                str(recorded.get("location", "")),
                store.parquet_rows(inventory) if inventory.is_file() else None,
                [path for by_shard in files for path in by_shard[key]],
            )
        )
    moved = [shard for shard in shards if shard.files]
    batch = retire_shards(store.root, moved, RETIRE_REASON)
    if instance is not None:
        for key in pending.removed:
            instance.delete_dynamic_partition(partitions_name(project), key)
    if log:
        where = f"; their outputs are in {retired_root(store.root) / batch.stamp}" if batch else ""
        log(f"{project.name}: retired {len(pending.removed)} shard(s) no longer in the pool{where}")
    return RetiredShards(list(pending.removed), batch)


def partitions_name(project: ProjectConfig) -> str:
    return f"{project.name}_shards"


def build_discovery_sensor(
    project: ProjectConfig,
    shard_job: AssetJob,
    partitions: dg.DynamicPartitionsDefinition,
    global_job: AssetJob | None = None,
) -> dg.SensorDefinition:
    """Adds a partition per new shard (at most ``discovery.max_new_shards_per_tick`` a tick) and
    requests runs for new or changed shards only; retires partitions whose shard is gone and
    then requests the global job, so decisions and the export drop them."""
    batch_size = project.discovery.max_new_shards_per_tick
    # Checked once, when the definitions load: a packaged walkthrough whose dataset is not on
    # this machine would otherwise tick every minute only to say its roots are missing.
    # ``sensor_running`` stays the user's switch; a root that appears later needs the sensor
    # started from the UI (or a reload of the code location).
    # Object-store roots are not listed at load time (a network call per load): taken as present.
    any_root_exists = any(is_remote(root) or Path(root).is_dir() for root in project.dataset.roots.values())
    running = project.discovery.sensor_running and any_root_exists
    description = (
        f"Scans {project.name}'s roots; adds new shards as partitions and runs only those; "
        "retires shards that left the pool and refreshes the global assets."
    )
    if project.discovery.sensor_running and not any_root_exists:
        description += (
            " Stopped by default: no dataset root existed when the definitions loaded "
            f"({', '.join(sorted(project.dataset.roots.values()))})."
        )

    @dg.sensor(
        name=f"{project.name}_discovery_sensor",
        jobs=[shard_job, *([global_job] if global_job is not None else [])],
        minimum_interval_seconds=project.discovery.sensor_interval_seconds,
        default_status=dg.DefaultSensorStatus.RUNNING if running else dg.DefaultSensorStatus.STOPPED,
        description=description,
    )
    def discovery_sensor(context: dg.SensorEvaluationContext, store: StoreResource) -> dg.SensorResult:
        project_store = store.for_project(project)
        previous = DiscoveryCursor.decode(context.cursor)
        pending = pending_shards(project, project_store, context.instance, True, previous)
        if pending.found.missing_roots and not pending.found.shards:
            return dg.SensorResult(
                skip_reason=f"dataset roots not found: {', '.join(pending.found.missing_roots)}",
                cursor=context.cursor,
            )
        retired = retire_removed_shards(project, project_store, pending, log=context.log.info)
        added, waiting = pending.new[:batch_size], len(pending.new) - batch_size
        requests = [
            dg.RunRequest(
                job_name=shard_job.name,
                partition_key=shard.key,
                run_key=f"{shard.key}:{pending.fingerprints[shard.key]}",
                tags={"curation/shard_reason": reason},
            )
            for reason, shards in (
                ("new", added),
                ("changed", pending.changed),
                ("unprocessed", pending.unprocessed),
            )
            for shard in shards
        ]
        # Shards retired without outputs never reached a global asset: no refresh for them.
        if retired.batch is not None and global_job is not None:
            requests.append(
                dg.RunRequest(
                    job_name=global_job.name,
                    run_key=f"retired:{retired.batch.stamp}",
                    tags={
                        "curation/trigger": "shards_retired",
                        "curation/retired_shards": str(len(retired.batch.shards)),
                        # queued behind this tick's shard runs (the queue takes higher first)
                        "dagster/priority": "-1",
                    },
                )
            )
        # Settled: every partition still in the pool (requested now, or current) and the shards
        # added now, at the fingerprint seen; shards waiting for a later batch are not.
        settled = {key: fp for key, fp in pending.fingerprints.items() if key in pending.known}
        settled.update((shard.key, pending.fingerprints[shard.key]) for shard in added)
        cursor = DiscoveryCursor.of(settled).encode()
        changes = []
        if added:
            changes.append(partitions.build_add_request([s.key for s in added]))
        if retired.keys:
            changes.append(partitions.build_delete_request(retired.keys))
        if waiting > 0:
            context.log.info(f"{project.name}: {waiting} more new shard(s) wait for the next ticks")
        if not requests:
            why = retired.held_back or f"{len(pending.found.shards)} shards, none new or changed"
            # held_back already names the missing roots; otherwise the tick page must still say
            # that part of the pool was not scanned.
            if pending.found.missing_roots and not retired.held_back:
                why += f"; dataset roots not found: {', '.join(pending.found.missing_roots)}"
            return dg.SensorResult(skip_reason=why, dynamic_partitions_requests=changes, cursor=cursor)
        context.log.info(
            f"{project.name}: {len(added)} new, {len(pending.changed)} changed, "
            f"{len(pending.unprocessed)} unprocessed, {len(retired.keys)} retired shards"
        )
        return dg.SensorResult(run_requests=requests, dynamic_partitions_requests=changes, cursor=cursor)

    return discovery_sensor


def build_refresh_schedule(project: ProjectConfig, global_job: AssetJob) -> dg.ScheduleDefinition:
    """On the project's cron: re-scan; refresh the global assets when every shard is processed."""

    @dg.schedule(
        name=f"{project.name}_refresh_schedule",
        cron_schedule=project.discovery.refresh_cron,
        job=global_job,
        default_status=(
            dg.DefaultScheduleStatus.RUNNING
            if project.discovery.refresh_running
            else dg.DefaultScheduleStatus.STOPPED
        ),
        description=f"Re-scans {project.name}'s roots and refreshes its global assets (dedup groups, ...).",
    )
    def refresh_schedule(context: dg.ScheduleEvaluationContext, store: StoreResource):
        project_store = store.for_project(project)
        pending = pending_shards(project, project_store, context.instance, persist_new_chunks=False)
        # Retired here too (not only by the sensor, which may be stopped): a refresh must not
        # bring back the rows of a shard that left the pool.
        retire_removed_shards(project, project_store, pending, context.instance, context.log.info)
        if pending.to_run:
            names = ", ".join(s.key for s in pending.to_run[:10])
            return dg.SkipReason(
                f"{len(pending.to_run)} shards still to process ({names}); the discovery sensor runs them "
                "and the next tick refreshes the global assets"
            )
        if not pending.found.shards:
            return dg.SkipReason("no shards found under the dataset roots")
        return dg.RunRequest(run_key=None, tags={"curation/trigger": "refresh_schedule"})

    return refresh_schedule
