"""The shard pass: every decode-fed per-shard asset of a project in one multi-asset.

Each image of the shard is read and decoded once (``core/shard_pass.py``); sanitize, the
quality scores, the perceptual hashes, and the vectors of every model the project uses all
come from that one decode. In Dagster they stay separate assets: one ``multi_asset`` with
one ``AssetSpec`` per stage (its own key, group, lineage, metadata and checks) and
``can_subset=True``, so materializing one of them alone still works and runs only its part.

What runs is decided per output by its input signature: an output whose signature is
current is reported, not recomputed; when only one model changed, only that model's
vectors are recomputed (sanitize is then current and not re-run; the kept images are
decoded the same way, so an output is the same made alone or with the others). When
sanitize itself is stale (new files, changed rules), the pass re-runs it together with
every selected output, since they all read its kept images.
"""

import importlib

import dagster as dg
import polars as pl

from curation_assets.assets.common import GPU_STEP_TAGS, RateLogger, asset_key, group_name, load_project_model
from curation_assets.assets.ingest.inventory import read_inventory
from curation_assets.assets.ingest.sanitize import (
    finish_sanitize,
    kept_images,
    sanitize_signature,
)
from curation_assets.assets.keys import SANITIZED
from curation_assets.assets.signatures import stored_signature
from curation_assets.assets.stage_spec import PassContext, Stage
from curation_assets.config import ProjectConfig
from curation_assets.resources.compute import ComputeResource
from curation_assets.resources.store import ProjectStore, StoreResource


def pass_name(project: ProjectConfig) -> str:
    return f"{project.name}_shard_pass"


def build_shard_pass_asset(
    project: ProjectConfig, partitions: dg.PartitionsDefinition, stages: list[Stage]
) -> dg.AssetsDefinition:
    """One multi-asset for ``stages`` (the project's enabled decode-fed stages, sanitize first)."""
    specs, check_specs = [], []
    for stage in stages:
        part = stage.decode
        assert part is not None, stage.name
        key = asset_key(project, stage.name)
        specs.append(
            dg.AssetSpec(
                key,
                deps=[asset_key(project, name) for name in stage.reads],
                group_name=group_name(project, part.group),
                kinds=set(part.kinds),
                description=part.description(project),
                skippable=True,
            )
        )
        check_specs += [
            dg.AssetCheckSpec(check.name, asset=key, description=check.description, blocking=check.blocking)
            for check in part.checks
        ]
    with_models = any(stage.decode and stage.decode.model for stage in stages)

    @dg.multi_asset(
        name=pass_name(project),
        specs=specs,
        check_specs=check_specs,
        partitions_def=partitions,
        can_subset=True,
        pool="gpu" if with_models else None,
        op_tags=GPU_STEP_TAGS if with_models else None,
        description=(
            "One read and one full decode per image feed every per-shard stage of the project; "
            "each output is its own asset."
        ),
    )
    def shard_pass(context: dg.AssetExecutionContext, store: StoreResource, compute: ComputeResource):
        selected = {key.path[-1] for key in context.selected_asset_keys}
        yield from run_shard_pass(context, project, store, compute, [s for s in stages if s.name in selected])

    return shard_pass


def run_shard_pass(
    context: dg.AssetExecutionContext,
    project: ProjectConfig,
    store: StoreResource,
    compute: ComputeResource,
    stages: list[Stage],
):
    """Decide what is stale, run one pass for it, and yield every selected output's result."""
    shard = context.partition_key
    project_store = store.for_project(project)
    by_name = {stage.name: stage for stage in stages}
    sanitize_selected = SANITIZED in by_name
    inventory = read_inventory(store, project, shard) if sanitize_selected else None
    sanitize_sig = sanitize_signature(project, inventory) if inventory is not None else None
    redo_sanitize = sanitize_selected and stored_signature(project_store, SANITIZED, shard) != sanitize_sig
    if not project_store.shard_path(SANITIZED, shard).is_file() and not redo_sanitize:
        raise dg.Failure(f"no {SANITIZED} for shard {shard!r}: materialize it first")
    outputs = [stage for stage in stages if stage.name != SANITIZED]

    def todays_signatures() -> dict[str, str]:  # each reads the sanitize table: asked once per table
        return {s.name: _signature(s, project, project_store, shard) for s in outputs}

    signatures = {} if redo_sanitize else todays_signatures()
    if redo_sanitize:
        todo = outputs  # every output reads sanitize's kept images: all are stale with it
    else:
        todo = [s for s in outputs if stored_signature(project_store, s.name, shard) != signatures[s.name]]
    for stage in outputs:
        if stage not in todo:
            context.log.info(f"{stage.name} {shard}: inputs unchanged, kept the stored output")
    for name in ([SANITIZED] if redo_sanitize else []) + [s.name for s in todo]:
        if project_store.shard_path(name, shard).is_file():
            context.log.info(
                f"{name} {shard}: stored output made from other inputs (or an older version), recomputed"
            )

    output, models, items_kept = None, {}, None
    if redo_sanitize or todo:
        output, models, items_kept = _run(
            context, project, project_store, compute, inventory, redo_sanitize, todo
        )
    if sanitize_selected:
        assert inventory is not None and sanitize_sig is not None
        yield finish_sanitize(
            context, project, project_store, inventory, sanitize_sig, output if redo_sanitize else None
        )
    if redo_sanitize:  # the outputs' signatures read the sanitize table just written
        signatures = todays_signatures()
    kept = kept_images(project_store, shard)
    if output is not None and items_kept is not None:
        output = output.select(items_kept(kept))
    described = compute.settings().describe() if any(s.decode.model for s in todo if s.decode) else {}
    for stage in outputs:
        assert stage.decode is not None
        ctx = PassContext(
            project=project,
            store=project_store,
            shard=shard,
            key=asset_key(project, stage.name),
            log=context.log,
            signature=signatures[stage.name],
            kept=kept,
            output=output if stage in todo else None,
            models=models,
            compute=described,
        )
        assert stage.decode.finish is not None
        yield stage.decode.finish(ctx)


def _signature(stage: Stage, project: ProjectConfig, store: ProjectStore, shard: str) -> str:
    assert stage.signature is not None, f"{stage.name} has no input signature"
    return stage.signature(project, store, shard)


def _run(
    context: dg.AssetExecutionContext,
    project: ProjectConfig,
    store: ProjectStore,
    compute: ComputeResource,
    inventory: pl.DataFrame | None,
    redo_sanitize: bool,
    todo: list[Stage],
):
    """Run the pass for sanitize (when stale) and the ``todo`` outputs.

    Returns the pass's output, the loaded models by name, and a function that maps the
    shard's kept images to the pass's item positions.
    """
    from curation_assets.core.ingest.sanitize import plain_rules
    from curation_assets.core.shard_pass import PassItem, PassModel, PassPlan, run_pass

    shard = context.partition_key
    settings = compute.settings() if any(s.decode and s.decode.model for s in todo) else None
    models, pass_models = {}, []
    for stage in todo:  # loaded (and their files checked) before any image is read
        part = stage.decode
        if part is None or part.model is None:
            continue
        name = part.model(project)
        if name not in models:
            models[name] = load_project_model(project, name, settings.device)
        if all(m.name != name for m in pass_models):
            model = models[name]
            pass_models.append(PassModel(name, model.module, model.preprocessing, model.dim, "float32"))
    if redo_sanitize:
        assert inventory is not None
        rows = inventory.filter(pl.col("is_image")).select(
            "image_id", "source_path", "offset", "size_bytes", "rel_path"
        )
        items = [PassItem(*row) for row in rows.iter_rows()]
    else:
        rows = kept_images(store, shard).select("image_id", "source_path", "offset", "size_bytes")
        items = [PassItem(*row) for row in rows.iter_rows()]
    inputs = tuple(dict.fromkeys(m.preprocessing for m in pass_models))
    per_image = tuple(
        (s.name, _function(s.decode.per_image)) for s in todo if s.decode and s.decode.per_image
    )
    rules = project.stages.sanitize
    plan = PassPlan(plain_rules(rules) if redo_sanitize else None, per_image, inputs)
    what = ", ".join(([SANITIZED] if redo_sanitize else []) + [s.name for s in todo])
    context.log.info(f"shard pass {shard}: {len(items)} images, one decode each, for {what}")
    rate = RateLogger(context.log, f"shard pass {shard}")
    output = run_pass(
        items,
        plan,
        pass_models,
        settings,
        workers=rules.workers or _cores(),
        chunk_size=rules.chunk_size,
        progress=rate,
    )
    rate.finish(len(items))
    position = {item.image_id: index for index, item in enumerate(items)}

    def items_kept(kept: pl.DataFrame) -> list[int]:
        return [position[image_id] for image_id in kept["image_id"]]

    return output, models, items_kept


def _function(reference: str):
    """The module-level function a "module:function" reference names."""
    module, _, name = reference.partition(":")
    return getattr(importlib.import_module(module), name)


def _cores() -> int:
    from curation_assets.core.pool import usable_cores

    return usable_cores()
