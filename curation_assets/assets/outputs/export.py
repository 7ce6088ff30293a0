"""`curated_dataset` (global): the curated subset, written next to the store; the source is never touched.

Always a manifest (parquet with every kept image, where it came from, its fixes, its
export path and WebDataset key, plus a plain file list). Per `export.layout` also a tree
of symlinks, hardlinks or copies mirroring the source paths (images with fixes are written
fixed: EXIF or model rotation, RGB conversion, resize, re-encode), or WebDataset tar
shards. Resumable: a finished file or tar shard is kept; each is written to a temporary
name and renamed.
"""

from pathlib import Path

import dagster as dg
import polars as pl

from curation_assets.assets.common import RateLogger, asset_key, group_name
from curation_assets.assets.keys import DECISIONS, EXPORT
from curation_assets.assets.outputs.decisions import decisions_path
from curation_assets.config import ProjectConfig
from curation_assets.core.outputs.decisions import REMOVE
from curation_assets.core.outputs.export import export_tree, export_webdataset, write_manifest
from curation_assets.core.storage import as_location, is_remote, upload_tree
from curation_assets.resources.store import ProjectStore, StoreResource

CHECK_MANIFEST = "manifest_equals_kept_set"
CHECK_EXPORTED = "every_kept_image_exported"
PLAN_COLUMNS = ["image_id", "split", "source_path", "offset", "size_bytes", "content_hash", "rel_path"]


def export_root(project: ProjectConfig, store: ProjectStore) -> Path:
    if project.export.root:
        return as_location(project.export.root, project.storage_options)
    return store.global_path(EXPORT, "export")


def export_staging(project: ProjectConfig, store: ProjectStore, root: Path) -> Path:
    """Where the export is written: its root, or (on object storage) a local folder uploaded after.

    Links cannot point from object storage into a dataset, so only the copy, webdataset and
    manifest layouts go there; the staging folder keeps finished files, so a re-run resumes.
    """
    if not is_remote(str(root)):
        return root
    if project.export.layout in ("symlink", "hardlink"):
        raise dg.Failure(
            f"export.layout {project.export.layout!r} makes links, which object storage cannot hold "
            f"(export root {root}): use copy, webdataset or manifest"
        )
    return store.work_path(EXPORT, "staging")


def plan_from_decisions(decisions: pl.DataFrame, keep: bool = True) -> pl.DataFrame:
    """The export/apply plan: kept (or removed) rows with paths relative to their split root.

    Rotations are a column of their own (``rotate``), so the ``rotate:<deg>`` entries of the
    fixes list are left out of ``fixes``.
    """
    rows = decisions.filter((pl.col("action") != REMOVE) if keep else (pl.col("action") == REMOVE))
    return rows.select(
        *[c for c in PLAN_COLUMNS if c != "rel_path"],
        pl.col("root_path").alias("rel_path"),
        pl.col("fixes").list.eval(pl.element().filter(~pl.element().str.starts_with("rotate:"))),
        pl.col("rotate").fill_null(0).cast(pl.Int64),
    )


def build_export_asset(project: ProjectConfig) -> dg.AssetsDefinition:
    key = asset_key(project, EXPORT)
    config = project.export

    @dg.asset(
        key=key,
        deps=[asset_key(project, DECISIONS)],
        group_name=group_name(project, "curation"),
        kinds={"parquet", "file"},
        check_specs=[
            dg.AssetCheckSpec(
                CHECK_MANIFEST, asset=key, blocking=True, description="Manifest == kept images."
            ),
            dg.AssetCheckSpec(CHECK_EXPORTED, asset=key, description="Every kept image was written."),
        ],
        description=(
            f"The curated subset: manifest.parquet + files.txt, and a {config.layout} export "
            "(fixes applied to the pixels). Never modifies the source; resumable."
        ),
    )
    def curated_dataset(context: dg.AssetExecutionContext, store: StoreResource) -> dg.MaterializeResult:
        project_store = store.for_project(project)
        path = decisions_path(project_store)
        if not path.is_file():
            raise dg.Failure(f"no {DECISIONS} yet: materialize it first")
        plan = plan_from_decisions(project_store.read_parquet(path))
        root = export_root(project, project_store)
        out_dir = export_staging(project, project_store, root)
        manifest = write_manifest(plan, out_dir)
        rate = RateLogger(context.log, f"export ({config.layout})")
        if config.layout == "webdataset":
            summary = export_webdataset(
                plan,
                out_dir / "webdataset",
                shard_max_count=config.shard_max_count,
                shard_max_bytes=int(config.shard_max_mb * (1 << 20)),
                prefix=project.name,
                jpeg_quality=config.jpeg_quality,
                progress=rate,
            )
        elif config.layout == "manifest":
            summary = None
        else:
            summary = export_tree(
                plan, out_dir / "images", config.layout, jpeg_quality=config.jpeg_quality, progress=rate
            )
        for image_id, why in (summary.failed if summary else [])[:20]:
            context.log.warning(f"{image_id}: not exported ({why})")
        if out_dir != root:  # the manifest and file list go last: they make the export visible
            names = tuple(Path(manifest[k]).relative_to(out_dir).as_posix() for k in ("manifest", "files"))
            sent = upload_tree(out_dir, root, last=names, skip_same_size=True)
            context.log.info(f"export uploaded to {root}: {sent} object(s) written, the rest already there")
        written = pl.read_parquet(manifest["manifest"], columns=["image_id"])
        failed = len(summary.failed) if summary else 0
        metadata = {
            "layout": config.layout,
            "images": plan.height,
            "with_fixes": int((plan["fixes"].list.len() > 0).sum() + (plan["rotate"] != 0).sum()),
            "manifest": dg.MetadataValue.path(str(root / Path(manifest["manifest"]).relative_to(out_dir))),
            "file_list": dg.MetadataValue.path(str(root / Path(manifest["files"]).relative_to(out_dir))),
            "root": dg.MetadataValue.path(str(root)),
            "dagster/row_count": plan.height,
        }
        if summary:
            metadata.update(summary.as_metadata())
            metadata["images_per_second"] = round(
                (summary.written + summary.skipped) / max(summary.seconds, 1e-9), 1
            )
        return dg.MaterializeResult(
            metadata=metadata,
            check_results=[
                dg.AssetCheckResult(
                    check_name=CHECK_MANIFEST,
                    passed=set(written["image_id"]) == set(plan["image_id"]),
                    metadata={"manifest_rows": written.height, "kept": plan.height},
                ),
                dg.AssetCheckResult(
                    check_name=CHECK_EXPORTED,
                    passed=failed == 0,
                    severity=dg.AssetCheckSeverity.WARN,
                    metadata={"failed": failed},
                ),
            ],
        )

    return curated_dataset
