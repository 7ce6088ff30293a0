"""What a stage is: the one spec that the project graph, the headless runner, the decision inputs
and the filter decisions read (the entries are in :mod:`curation_assets.assets.stages`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import dagster as dg

from curation_assets.assets.signatures import SIGNATURE
from curation_assets.config import ProjectConfig
from curation_assets.resources.store import ProjectStore

if TYPE_CHECKING:  # torch and the filter arithmetic load only in the steps that use them
    import polars as pl

    from curation_assets.core.embed.models import LoadedModel
    from curation_assets.core.filters.rules import FilterRule
    from curation_assets.core.shard_pass import PassOutput


@dataclass
class PassContext:
    """What a decode-fed stage gets back from the shard pass to write (or report) its output."""

    project: ProjectConfig
    store: ProjectStore
    shard: str
    key: dg.AssetKey
    log: Any
    signature: str  # today's input signature of this output
    kept: pl.DataFrame  # the shard's kept images (kept_images), in the order of the pass's items
    output: PassOutput | None  # None: the stored output is current and was kept
    models: dict[str, LoadedModel] = field(default_factory=dict)  # loaded models of the pass, by name
    compute: dict[str, Any] = field(default_factory=dict)  # the compute settings, described

    @property
    def skipped(self) -> bool:
        return self.output is None

    def per_image_table(
        self, to_frame: Callable[[list[Any]], pl.DataFrame], metadata: dict[str, Any], what: str
    ) -> pl.DataFrame:
        """A per-image stage's table: made from the pass's rows and written with its signature, or
        the stored one when current. Rows with an ``error`` are logged (the first 20) as ``no <what>``."""
        import polars as pl

        path = self.store.shard_path(self.key.path[-1], self.shard)
        if self.output is None:
            table = self.store.read_parquet(path)
        else:
            table = to_frame(self.output.rows[self.key.path[-1]])
            self.store.write_parquet(table, path, metadata={**metadata, SIGNATURE: self.signature})
        for row in table.filter(pl.col("error").is_not_null()).head(20).iter_rows(named=True):
            self.log.warning(f"{row['image_id']}: no {what} ({row['error']})")
        return table


@dataclass(frozen=True)
class CheckDef:
    name: str
    description: str
    blocking: bool = False


@dataclass(frozen=True)
class DecodePart:
    """A per-shard stage fed by the shard pass's one decode per image.

    Exactly one of ``per_image`` (a function the decode workers run on each kept image's
    256 px working copy) or ``model`` (the name of the project's model it runs on each kept
    image, resized by that model's preprocessing) says what the pass computes for it;
    ``finish`` writes the output from the pass's results, or reports the stored output when
    its input signature is current. Sanitize, the pass's root, has neither.
    """

    group: str
    kinds: frozenset[str]
    description: Callable[[ProjectConfig], str]
    checks: tuple[CheckDef, ...]
    finish: Callable[[PassContext], dg.MaterializeResult] | None  # None: sanitize (the pass writes it)
    per_image: str | None = None  # "module:function", imported in the step (see core/shard_pass.py PerImage)
    model: Callable[[ProjectConfig], str] | None = None
    vector_dtype: str = "float16"  # rotation probabilities keep float32 (exact threshold comparisons)


@dataclass(frozen=True)
class Stage:
    """One stage: an asset (or a few) of a project's graph.

    ``signature(project, store, shard)`` (per-shard stages) gives the input signature today's
    inputs make, which a current output recorded; the headless runner and the assets skip
    unchanged work with it. ``build(project, partitions)`` makes the stage's own assets;
    decode-fed stages have a ``decode`` part instead and are built together by the shard pass.
    ``scores``: filter_decisions joins this per-shard table's columns, with ``filter_rules``.
    ``decides``: the curation_decisions stage whose input this global asset is.
    """

    name: str
    scope: Literal["shard", "global"]
    enabled: Callable[[ProjectConfig], bool]
    reads: tuple[str, ...] = ()
    signature: Callable[[ProjectConfig, ProjectStore, str], str] | None = None
    build: Callable[[ProjectConfig, dg.PartitionsDefinition], list[dg.AssetsDefinition]] | None = None
    decode: DecodePart | None = None
    scores: bool = False
    filter_rules: Callable[[ProjectConfig], list[FilterRule]] | None = None
    decides: str | None = None


def always(project: ProjectConfig) -> bool:
    return True
