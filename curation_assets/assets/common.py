"""Small helpers shared by the asset factories: keys, groups, progress logs, metadata."""

from __future__ import annotations

import base64
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dagster as dg
import polars as pl

from curation_assets.config import ProjectConfig

# core.models (torch) is imported where a model is loaded: every asset module
# imports this one, and loading the Definitions must stay cheap (issue 12).
if TYPE_CHECKING:
    from curation_assets.core.embed.models import LoadedModel


def asset_key(project: ProjectConfig, name: str) -> dg.AssetKey:
    """Every asset key is prefixed by its project's name."""
    return dg.AssetKey([project.name, name])


def group_name(project: ProjectConfig, stage: str) -> str:
    """Groups are per project and stage, so the UI shows each project's graph by stage."""
    return f"{project.name}_{stage}"


def load_project_model(project: ProjectConfig, name: str, device: Any = "cpu") -> LoadedModel:
    """The project's model ``name``; a missing or unfit file fails the step with the loader's message
    (it names the models key and the file it expects), not a traceback."""
    from curation_assets.core.embed.models import ModelFileError, ModelLoadError, load_model

    try:
        return load_model(name, project.models[name], allow_download=project.allow_download, device=device)
    except (ModelFileError, ModelLoadError) as exc:
        raise dg.Failure(str(exc)) from None


def shard_partitions(project: ProjectConfig) -> dg.DynamicPartitionsDefinition:
    """One dynamic partition per shard; the discovery sensor adds keys."""
    return dg.DynamicPartitionsDefinition(name=f"{project.name}_shards")


class RateLogger:
    """Logs 'done/total (rate/s)' at most every ``every_s`` seconds, and once at the end."""

    def __init__(self, log: Any, what: str, unit: str = "images", every_s: float = 5.0):
        self.log, self.what, self.unit, self.every_s = log, what, unit, every_s
        self.start = self.last = time.perf_counter()

    def __call__(self, done: int, total: int | None = None, rate: float | None = None) -> None:
        now = time.perf_counter()
        if now - self.last < self.every_s:
            return
        self.last = now
        self.log.info(self._line(done, total, rate))

    def finish(self, done: int) -> float:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        rate = done / elapsed
        self.log.info(f"{self.what}: {done} {self.unit} in {elapsed:.1f} s ({rate:,.1f} {self.unit}/s)")
        return rate

    def _line(self, done: int, total: int | None, rate: float | None) -> str:
        rate = rate if rate is not None else done / max(time.perf_counter() - self.start, 1e-9)
        of = f"/{total}" if total else ""
        return f"{self.what}: {done}{of} {self.unit} ({rate:,.1f} {self.unit}/s)"


CHECK_ONE_KEEPER = "one_keeper_per_group"


def one_keeper_check(groups: pl.DataFrame) -> dg.AssetCheckResult:
    """Every duplicate group (``group_id``, ``is_keeper`` rows) has exactly one keeper."""
    keepers = groups.group_by("group_id").agg(pl.col("is_keeper").sum())
    bad = keepers.filter(pl.col("is_keeper") != 1)
    return dg.AssetCheckResult(
        check_name=CHECK_ONE_KEEPER,
        passed=bad.is_empty(),
        metadata={"groups": len(keepers), "groups_without_exactly_one_keeper": len(bad)},
    )


def md_table(rows: Iterable[Mapping[str, Any]], columns: list[str] | None = None) -> dg.MetadataValue:
    """A small markdown table for asset metadata."""
    rows = list(rows)
    if not rows:
        return dg.MetadataValue.md("_none_")
    columns = columns or list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row.get(c, "")) for c in columns) + " |" for row in rows]
    return dg.MetadataValue.md("\n".join(lines))


def plot_md(path: Path, alt: str) -> dg.MetadataValue:
    """A PNG plot as a markdown image, with its file path as a caption.

    The Dagster UI only copies a path entry to the clipboard, and a markdown link to a local
    file does not open from the browser either; an image embedded as a data URI is what the UI
    renders. Every ``*_plot`` metadata entry goes through here so they all look the same.
    """
    encoded = base64.b64encode(path.read_bytes()).decode()  # a Path, or a UPath on object storage
    return dg.MetadataValue.md(f"![{alt}](data:image/png;base64,{encoded})\n\n`{path}`")


# Steps in Dagster pool "gpu" (embeddings, k-means, index...) ask the k8s executor for a GPU:
# the op tag Dagster's k8s job executor merges into the step's pod (other steps get the
# executor's CPU and memory defaults, assets/project.py).
GPU_STEP_TAGS: dict[str, Any] = {
    "dagster-k8s/config": {
        "container_config": {
            "resources": {
                "requests": {"cpu": "4", "memory": "32Gi", "nvidia.com/gpu": "1"},
                "limits": {"memory": "64Gi", "nvidia.com/gpu": "1"},
            }
        }
    }
}
