"""`class_subsets` (global, optional): class-aware subsets of the labeled pool, one parquet each.

Every named subset of the project file (``class_subsets.subsets``) is drawn from the kept,
labeled images of its split (or of every split) with curation_assets/core/select/subsets.py:
``count`` (exactly n images, class shares kept), ``classes`` (k classes drawn with the seed,
or the listed ones), ``trim_tail`` (the k rarest classes capped at ``ceil`` images) and
``frequency`` (n images following a target class distribution). With the caption filter on,
the pool first loses the images whose caption is not close enough to its class's
definition (open_clip text encoder; LAIONet's filter).
"""

import csv
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dagster as dg
import numpy as np
import polars as pl

from curation_assets.assets.common import asset_key, group_name, load_project_model, md_table
from curation_assets.assets.dedup.exact_duplicates import processed_shards
from curation_assets.assets.keys import CLASS_SUBSETS, INVENTORY, SANITIZED
from curation_assets.assets.labeled.labeled_data import all_images, kept, with_labels
from curation_assets.config import ProjectConfig, SubsetSpec
from curation_assets.core.select import subsets as subset_core
from curation_assets.resources.compute import ComputeResource
from curation_assets.resources.store import ProjectStore, StoreResource

CHECK_SIZES = "subset_sizes_as_specified"
SUBSET_COLUMNS = ["image_id", "split", "label", "caption", "source_path", "offset", "size_bytes"]
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # a subset name becomes a file name
TEXT_BATCH = 256


def subset_path(store: ProjectStore, name: str) -> Path:
    return store.global_path(CLASS_SUBSETS, f"{name}.parquet")


def read_class_definitions(path: str | Path) -> dict[str, str]:
    """{class: definition text} from a JSON object or a CSV/TSV with a header (class, definition)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} does not exist or is not a file")
    if path.suffix.lower() == ".json":
        loaded = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(loaded, dict) or not all(isinstance(v, str) for v in loaded.values()):
            raise ValueError(f"{path}: expected a JSON object {{class: definition text}}")
        return {str(k): v for k, v in loaded.items()}
    if path.suffix.lower() not in (".csv", ".tsv"):
        raise ValueError(f"{path}: class definitions are a .json, .csv or .tsv file")
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    with path.open(newline="", encoding="utf-8-sig") as handle:
        rows = list(csv.reader(handle, delimiter=delimiter))
    if not rows or len(rows[0]) < 2:
        raise ValueError(f"{path}: expected a header and two columns: class, definition")
    out: dict[str, str] = {}
    for line, row in enumerate(rows[1:], start=2):
        if not row or not any(cell.strip() for cell in row):
            continue
        if len(row) < 2 or not row[1].strip():
            raise ValueError(f"{path} line {line}: expected class, definition; got {row}")
        out[row[0].strip()] = row[1].strip()
    return out


def draw_subset(pool: pl.DataFrame, spec: SubsetSpec) -> pl.DataFrame:
    """The rows of ``pool`` (labeled: image_id, label, ...) that ``spec`` selects."""
    if spec.kind == "count":
        assert spec.n is not None
        return subset_core.subset_by_count(pool, spec.n, spec.seed)
    if spec.kind == "classes":
        # both k and classes given is refused by the core function, with a clear message
        return subset_core.subset_by_classes(pool, k=spec.k, classes=spec.classes or None, seed=spec.seed)
    if spec.kind == "trim_tail":
        assert spec.k is not None and spec.ceil is not None
        return subset_core.trim_tail(pool, spec.k, spec.ceil, spec.seed)
    assert spec.n is not None and spec.target is not None
    return subset_core.match_frequencies(pool, spec.target, spec.n, spec.seed)


def expected_size(pool: pl.DataFrame, spec: SubsetSpec) -> int | None:
    """The size the spec promises (None where the spec fixes the classes, not the size)."""
    if spec.kind in ("count", "frequency"):
        return spec.n
    if spec.kind == "trim_tail":
        counts = subset_core.class_counts(pool)
        tail = set(subset_core.tail_classes(pool, spec.k or 0, spec.seed))
        return sum(min(c, spec.ceil or 0) if name in tail else c for name, c in counts.items())
    return None


def _encode(encode_text: Callable[[list[str]], Any], texts: list[str]) -> np.ndarray:
    """Unit-norm text embeddings (open_clip's encode_text gives a tensor) in batches."""
    parts = [
        encode_text(texts[i : i + TEXT_BATCH]).float().cpu().numpy() for i in range(0, len(texts), TEXT_BATCH)
    ]
    return np.concatenate(parts) if parts else np.zeros((0, 1), np.float32)


def caption_mask(project: ProjectConfig, pool: pl.DataFrame, device: str) -> np.ndarray:
    """Which rows of ``pool`` have a caption close enough to their class's definition."""
    config = project.class_subsets.caption_filter
    where = "class_subsets.caption_filter"
    if project.labels.source not in ("file", "column") or not project.labels.caption_column:
        raise dg.Failure(
            f"{where}: captions come from the labels file or the metadata "
            "(labels.source file or column, with caption_column)"
        )
    if not config.class_definitions:
        raise dg.Failure(f"{where}.class_definitions: a CSV/JSON of class -> definition text is required")
    entry = project.models.get(config.text_model)
    if entry is None or entry.kind != "open_clip":
        raise dg.Failure(f"{where}.text_model: {config.text_model!r} must name an open_clip models entry")
    try:
        definitions = read_class_definitions(config.class_definitions)
    except ValueError as exc:
        raise dg.Failure(f"{where}.class_definitions: {exc}") from None
    missing = sorted(set(pool["label"].unique().to_list()) - set(definitions))
    if missing:
        raise dg.Failure(
            f"{where}.class_definitions: {len(missing)} class(es) have no definition, e.g. {missing[:5]}"
        )
    # core.models imports torch: imported here so that loading the Definitions stays cheap (issue 12)
    from curation_assets.core.embed.models import ModelLoadError

    model = load_project_model(project, config.text_model, device)
    if model.encode_text is None:
        raise dg.Failure(f"{where}.text_model: {config.text_model!r} has no text encoder")
    if pool.is_empty():
        return np.zeros(0, dtype=bool)
    names = sorted(definitions)
    try:
        class_vectors = _encode(model.encode_text, [definitions[n] for n in names])
        captions = pool["caption"].fill_null("").to_list()
        caption_vectors = _encode(model.encode_text, captions)
    except ModelLoadError as exc:  # e.g. a tokenizer that would have to be downloaded
        raise dg.Failure(str(exc)) from None
    # No caption, no evidence: a zero vector never reaches the threshold.
    caption_vectors[(pool["caption"].fill_null("").str.strip_chars() == "").to_numpy()] = 0
    by_class = dict(zip(names, class_vectors, strict=True))
    try:
        return subset_core.caption_filter(caption_vectors, by_class, pool, config.threshold)
    except ValueError as exc:
        raise dg.Failure(f"{where}: {exc}") from None


def _class_stats(frame: pl.DataFrame) -> dict[str, int]:
    counts = frame.group_by("label").len()
    return {
        "classes": counts.height,
        "min_per_class": int(counts["len"].min() or 0) if counts.height else 0,
        "max_per_class": int(counts["len"].max() or 0) if counts.height else 0,
    }


def build_class_subsets_asset(project: ProjectConfig) -> dg.AssetsDefinition:
    key = asset_key(project, CLASS_SUBSETS)
    config = project.class_subsets
    caption = config.caption_filter

    @dg.asset(
        key=key,
        deps=[asset_key(project, INVENTORY), asset_key(project, SANITIZED)],
        group_name=group_name(project, "labels"),
        kinds={"polars", "parquet"},
        check_specs=[
            dg.AssetCheckSpec(
                CHECK_SIZES, asset=key, blocking=True, description="Every subset has the size its spec asks."
            )
        ],
        description=(
            f"Class-aware subsets of the labeled pool ({', '.join(config.subsets) or 'none configured'}): "
            "one parquet per subset (image_id, split, label, caption, where the file is)"
            + (
                f"; captions filtered at cosine >= {caption.threshold} to the class definitions"
                if caption.enabled
                else ""
            )
            + "."
        ),
    )
    def class_subsets(
        context: dg.AssetExecutionContext, store: StoreResource, compute: ComputeResource
    ) -> dg.MaterializeResult:
        project_store = store.for_project(project)
        bad = sorted(name for name in config.subsets if not _SAFE_NAME.match(name))
        if bad:
            raise dg.Failure(
                f"class_subsets.subsets: names {bad} must be file-name safe ({_SAFE_NAME.pattern})"
            )
        shards = processed_shards(context, project, project_store, SANITIZED)
        images, label_stats = with_labels(project, all_images(project_store, shards))
        pool = kept(images).filter(pl.col("label").is_not_null()).select(SUBSET_COLUMNS)
        metadata: dict[str, object] = {**label_stats, "pool": pool.height}
        if caption.enabled:
            keep = caption_mask(project, pool, str(compute.settings().device))
            metadata["caption_filter_kept"] = int(keep.sum())
            metadata["caption_filter_removed"] = int((~keep).sum())
            metadata["caption_threshold"] = caption.threshold
            pool = pool.filter(pl.Series(keep))
        rows, wrong = [], []
        for name, spec in config.subsets.items():
            part = pool if spec.split is None else pool.filter(pl.col("split") == spec.split)
            try:
                drawn = draw_subset(part, spec)
            except ValueError as exc:
                raise dg.Failure(f"class_subsets.subsets.{name}: {exc}") from None
            expected = expected_size(part, spec)
            if expected is not None and drawn.height != expected:
                wrong.append(name)
            out = project_store.write_parquet(
                drawn,
                subset_path(project_store, name),
                metadata={"spec": spec.model_dump(mode="json"), "pool": part.height},
            )
            rows.append(
                {
                    "subset": name,
                    "kind": spec.kind,
                    "split": spec.split or "all",
                    "images": drawn.height,
                    **_class_stats(drawn),
                    "seed": spec.seed,
                    "path": str(out),
                }
            )
            context.log.info(f"subset {name}: {drawn.height} images")
        # Subsets dropped from the project file leave no stale file behind to be mistaken for current.
        for stale in project_store.asset_dir(CLASS_SUBSETS).glob("*.parquet"):
            if stale.stem not in config.subsets:
                stale.unlink()
        metadata.update(
            {
                **{f"{row['subset']}_images": row["images"] for row in rows},
                "subsets": md_table(
                    rows,
                    [
                        "subset",
                        "kind",
                        "split",
                        "images",
                        "classes",
                        "min_per_class",
                        "max_per_class",
                        "seed",
                    ],
                ),
                "pool_classes": md_table([_class_stats(pool)]),
                "folder": dg.MetadataValue.path(str(project_store.asset_dir(CLASS_SUBSETS))),
            }
        )
        return dg.MaterializeResult(
            metadata=metadata,
            check_results=[
                dg.AssetCheckResult(
                    check_name=CHECK_SIZES,
                    passed=not wrong,
                    metadata={"subsets": len(rows), "wrong_size": ", ".join(wrong) or "none"},
                )
            ],
        )

    return class_subsets
