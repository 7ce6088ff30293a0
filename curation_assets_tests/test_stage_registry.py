"""The registry of stages: a stage added as one entry (here a decode-fed per-image score) shows up
in the graph as its own asset, is computed in the shard pass, is skipped when unchanged, and
its rule reaches filter_decisions and the decisions, with no other file edited."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import numpy as np
import polars as pl
import pytest
from PIL import Image

from curation_assets.assets import stages as registry
from curation_assets.assets.keys import SANITIZED
from curation_assets.assets.project import per_shard_asset_names
from curation_assets.assets.signatures import SIGNATURE, sanitized_bytes, signature_of
from curation_assets.assets.stage_spec import DecodePart, PassContext, Stage
from curation_assets.core.filters.rules import FilterRule
from curation_assets.definitions import build_definitions
from curation_assets.resources.store import StoreResource
from curation_assets.runner import materialize_project
from curation_assets_tests.conftest import make_project, write_photo

BRIGHTNESS = "brightness_scores"


def brightness_row(image_id: str, work: Image.Image) -> dict:
    """Runs in the decode workers (imported by name), on each kept image's working copy."""
    return {"image_id": image_id, "mean_brightness": float(np.asarray(work.convert("L")).mean()) / 255}


def brightness_signature(project, store, shard: str) -> str:
    return signature_of(sanitized_bytes(store, shard), "brightness-v1")


def finish_brightness(ctx: PassContext) -> dg.MaterializeResult:
    path = ctx.store.shard_path(BRIGHTNESS, ctx.shard)
    if not ctx.skipped:
        assert ctx.output is not None
        ctx.store.write_parquet(
            pl.DataFrame(ctx.output.rows[BRIGHTNESS]), path, metadata={SIGNATURE: ctx.signature}
        )
    return dg.MaterializeResult(asset_key=ctx.key, metadata={"skipped": ctx.skipped})


BRIGHTNESS_STAGE = Stage(
    BRIGHTNESS,
    "shard",
    lambda project: True,
    (SANITIZED,),
    brightness_signature,
    decode=DecodePart(
        group="filters",
        kinds=frozenset({"polars"}),
        description=lambda project: "Mean brightness of every kept image.",
        checks=(),
        finish=finish_brightness,
        per_image=f"{__name__}:brightness_row",
    ),
    scores=True,
    filter_rules=lambda project: [FilterRule("dim", "mean_brightness", 0.2, "below")],
)


@pytest.fixture
def with_brightness(monkeypatch: pytest.MonkeyPatch) -> None:
    shard_end = max(i for i, s in enumerate(registry.STAGES) if s.scope == "shard")
    stages = (*registry.STAGES[: shard_end + 1], BRIGHTNESS_STAGE, *registry.STAGES[shard_end + 1 :])
    monkeypatch.setattr(registry, "STAGES", stages)


def test_a_stage_added_to_the_registry_runs_in_the_pass_and_reaches_the_decisions(
    tmp_path: Path, with_brightness: None
):
    images = tmp_path / "images" / "s1"
    for i in range(6):
        write_photo(images / f"bright_{i}.jpg", i, size=(200, 150))
    for i in range(2):  # two very dark pictures
        Image.new("RGB", (200, 150), (8, 8, 8)).save(images / f"dark_{i}.jpg", quality=90)
    project = make_project(
        tmp_path, {"train": str(tmp_path / "images")}, stages={"quality": {"enabled": True}}
    )
    defs = build_definitions([project])
    key = dg.AssetKey([project.name, BRIGHTNESS])
    assert key in defs.resolve_asset_graph().get_all_asset_keys()
    assert BRIGHTNESS in per_shard_asset_names(project)

    instance = dg.DagsterInstance.ephemeral()
    summary = materialize_project(project, defs, instance, echo=lambda _: None)
    assert summary.failed == []
    store = StoreResource().for_project(project)
    table = pl.read_parquet(store.shard_path(BRIGHTNESS, "s1"))
    assert table.height == 8 and table.filter(pl.col("mean_brightness") < 0.2).height == 2
    decisions = pl.read_parquet(store.global_path("curation_decisions", "curation_decisions.parquet"))
    dim = decisions.filter(pl.col("image_id").str.contains("dark_"))
    assert (dim["action"] == "remove").all()
    assert all("filter:dim" in reasons for reasons in dim["reasons"].to_list())

    # unchanged inputs: the headless runner sees the new stage's output as current too
    again = materialize_project(project, defs, instance, run_global=False, echo=lambda _: None)
    assert again.shards_skipped == ["s1"]
