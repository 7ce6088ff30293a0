"""Reading what every stage decided, for `hierarchical_clusters` (before sampling) and
`curation_decisions` (after it). One loader, so both see the same survivors."""

from pathlib import Path

import polars as pl

from curation_assets.assets.keys import INVENTORY, SANITIZED
from curation_assets.config import ProjectConfig
from curation_assets.core.outputs.decisions import STAGES, DecisionInputs, build_decisions
from curation_assets.resources.store import ProjectStore


class MissingInputError(RuntimeError):
    """A stage the project runs has not written its output yet."""


def _global(store: ProjectStore, asset: str) -> Path:
    return store.global_path(asset, f"{asset}.parquet")


def _read_required(store: ProjectStore, asset: str) -> pl.DataFrame:
    path = _global(store, asset)
    if not path.is_file():
        raise MissingInputError(f"no {asset} yet: materialize it first")
    return store.read_parquet(path)


def project_stages(project: ProjectConfig, with_sample: bool) -> list[str]:
    """The decision stages the project runs, in order (each global stage of the registry names the
    decision stage its output feeds)."""
    from curation_assets.assets.stages import enabled_stages

    on = {"sanitize"} | {s.decides for s in enabled_stages(project, "global") if s.decides}
    if not with_sample:
        on.discard("sampling")
    return [stage for stage in STAGES if stage in on]


def decision_asset(project: ProjectConfig, decides: str) -> str:
    """The global asset whose output a decision stage reads."""
    from curation_assets.assets.stages import STAGES as REGISTRY

    return next(s.name for s in REGISTRY if s.decides == decides)


def load_decision_inputs(
    project: ProjectConfig, store: ProjectStore, shards: list[str], sample_path: Path | None = None
) -> DecisionInputs:
    """Every stage's output over ``shards`` (sample_path: the curated sample, None before sampling)."""
    inventory = store.scan_shards(INVENTORY, shards)
    sanitized = store.scan_shards(SANITIZED, shards)
    if inventory is None or sanitized is None:
        raise MissingInputError("no processed shard yet: run the shard job first")
    stages = set(project_stages(project, sample_path is not None))
    sample = None
    if sample_path is not None:
        if not sample_path.is_file():
            raise MissingInputError(f"no sample at {sample_path}: materialize curated_sample first")
        sample = store.read_parquet(sample_path)

    def output_of(decides: str) -> pl.DataFrame | None:
        return _read_required(store, decision_asset(project, decides)) if decides in stages else None

    return DecisionInputs(
        inventory=inventory.collect(),
        sanitized=sanitized.collect(),
        exact=output_of("exact_dedup"),
        near=output_of("near_dedup"),
        filters=output_of("filters"),
        sample=sample,
        contamination=output_of("decontamination"),
    )


def decisions_for(
    project: ProjectConfig, store: ProjectStore, shards: list[str], sample_path: Path | None = None
) -> pl.DataFrame:
    inputs = load_decision_inputs(project, store, shards, sample_path)
    return build_decisions(inputs, project.dataset.roots, project.dataset.input_kind)
