"""Shard discovery: the sensor that adds new shards as partitions and runs them, and the
schedule that re-scans and refreshes the global assets once every shard is processed."""

import json
from dataclasses import dataclass
from typing import Any

import dagster as dg

from curation_assets.config import ProjectConfig
from curation_assets.core.shards import Discovery, Shard, discover_shards, shard_for_key
from curation_assets.resources.store import ProjectStore, StoreResource

MANIFESTS = "shard_manifests"  # chunk membership, frozen when a chunk is created
INVENTORY = "image_inventory"
FINGERPRINT_KEY = "fingerprint"  # parquet metadata the inventory records for its shard
AssetJob = Any  # what dg.define_asset_job returns (its class is not exported)


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

    @property
    def to_run(self) -> list[Shard]:
        return self.new + self.changed + self.unprocessed


def pending_shards(
    project: ProjectConfig, store: ProjectStore, instance: dg.DagsterInstance, persist_new_chunks: bool
) -> PendingShards:
    found = scan(project, store, persist_new_chunks)
    known = set(instance.get_dynamic_partitions(partitions_name(project)))
    new, changed, unprocessed = [], [], []
    for shard in found.shards:
        if shard.key not in known:
            new.append(shard)
            continue
        recorded = recorded_fingerprint(store, shard.key)
        if recorded is None:
            unprocessed.append(shard)
        elif recorded != shard.fingerprint(project.dataset.follow_symlinks):
            changed.append(shard)
    return PendingShards(new, changed, unprocessed, found)


def partitions_name(project: ProjectConfig) -> str:
    return f"{project.name}_shards"


def build_discovery_sensor(
    project: ProjectConfig, shard_job: AssetJob, partitions: dg.DynamicPartitionsDefinition
) -> dg.SensorDefinition:
    """Adds a partition per new shard and requests runs for new (or changed) shards only."""

    @dg.sensor(
        name=f"{project.name}_discovery_sensor",
        job=shard_job,
        minimum_interval_seconds=project.discovery.sensor_interval_seconds,
        default_status=(
            dg.DefaultSensorStatus.RUNNING
            if project.discovery.sensor_running
            else dg.DefaultSensorStatus.STOPPED
        ),
        description=f"Scans {project.name}'s roots; adds new shards as partitions and runs only those.",
    )
    def discovery_sensor(context: dg.SensorEvaluationContext, store: StoreResource) -> dg.SensorResult:
        project_store = store.for_project(project)
        pending = pending_shards(project, project_store, context.instance, persist_new_chunks=True)
        if pending.found.missing_roots and not pending.found.shards:
            return dg.SensorResult(
                skip_reason=f"dataset roots not found: {', '.join(pending.found.missing_roots)}"
            )
        requests = [
            dg.RunRequest(
                partition_key=shard.key,
                run_key=f"{shard.key}:{shard.fingerprint(project.dataset.follow_symlinks)}",
                tags={"curation/shard_reason": reason},
            )
            for reason, shards in (
                ("new", pending.new),
                ("changed", pending.changed),
                ("unprocessed", pending.unprocessed),
            )
            for shard in shards
        ]
        if not requests:
            return dg.SensorResult(skip_reason=f"{len(pending.found.shards)} shards, none new or changed")
        context.log.info(
            f"{project.name}: {len(pending.new)} new, {len(pending.changed)} changed, "
            f"{len(pending.unprocessed)} unprocessed shards"
        )
        adds = [partitions.build_add_request([s.key for s in pending.new])] if pending.new else []
        return dg.SensorResult(run_requests=requests, dynamic_partitions_requests=adds)

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
        pending = pending_shards(
            project, store.for_project(project), context.instance, persist_new_chunks=False
        )
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
