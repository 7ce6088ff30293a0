"""Cleaning outputs: the reviewed manifest turned into files that training code applies.

Pure library, no Dagster. Nothing here touches the dataset: it writes

- ``removal_list.txt``: one entry per image whose final action is remove;
- ``relabel_map.json``: ``{entry: new label}`` for every image whose final action is relabel;
- ``final_manifest.parquet``: every reviewed image with its final action, final label and
  who decided it (a human or the machine).

An *entry* names a file the way :class:`curation_assets.torch_dataset.CuratedImageFolder`
finds it: ``<split>/<path relative to the split's root>`` when ``roots`` is given and the
image is a plain file under its split's root; otherwise (tar members, no roots) the
image_id. The split prefix keeps entries unique when train and test hold the same path.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import polars as pl

from curation_assets.core.atomic import atomic_path, write_text
from curation_assets.core.labeled.review import ACTIONS

REMOVAL_LIST = "removal_list.txt"
RELABEL_MAP = "relabel_map.json"
FINAL_MANIFEST = "final_manifest.parquet"
_REQUIRED = ("image_id", "user_action", "machine_action", "new_label", "suggested_label")


def final_actions(manifest: pl.DataFrame) -> pl.DataFrame:
    """``manifest`` plus final_action, final_label and decided_by ("human" or "machine").

    The human's user_action wins; without one the machine_action stands, and without that
    the image is kept (a flag alone removes nothing). A relabel takes the human's new_label,
    else the suggested_label. An unknown action, or a relabel with no label to apply, is an
    error naming the image.
    """
    missing = [c for c in _REQUIRED if c not in manifest.columns]
    if missing:
        raise ValueError(f"manifest: missing column(s) {missing}; found {manifest.columns}")
    for column in ("user_action", "machine_action"):
        bad = manifest.filter(pl.col(column).is_not_null() & ~pl.col(column).is_in(list(ACTIONS)))
        if len(bad):
            raise ValueError(
                f"manifest: {column} {bad[column][0]!r} of {bad['image_id'][0]!r} is not one of {ACTIONS}"
            )
    human = pl.col("user_action").is_not_null()
    out = manifest.with_columns(
        final_action=pl.coalesce("user_action", "machine_action", pl.lit("keep")),
        decided_by=pl.when(human).then(pl.lit("human")).otherwise(pl.lit("machine")),
    ).with_columns(
        final_label=pl.when(pl.col("final_action") == "relabel")
        .then(pl.when(human).then(pl.coalesce("new_label", "suggested_label")).otherwise("suggested_label"))
        .otherwise(pl.col("label") if "label" in manifest.columns else pl.lit(None, pl.String()))
    )
    unlabeled = out.filter((pl.col("final_action") == "relabel") & pl.col("final_label").is_null())
    if len(unlabeled):
        raise ValueError(
            f"{len(unlabeled)} image(s) to relabel have no new label, "
            f"e.g. {unlabeled['image_id'].head(3).to_list()}"
        )
    return out


def file_entries(manifest: pl.DataFrame, roots: Mapping[str, str | Path] | None) -> pl.Series:
    """The removal-list / relabel-map entry of every row (see the module docstring)."""
    if not roots:
        return manifest["image_id"].alias("entry")
    resolved = {split: Path(root).resolve() for split, root in roots.items()}
    columns = [manifest[c] if c in manifest.columns else None for c in ("split", "source_path", "offset")]
    entries = []
    for i, image_id in enumerate(manifest["image_id"]):
        split, source, offset = (None if c is None else c[i] for c in columns)
        entries.append(_entry(image_id, split, source, offset, resolved))
    return pl.Series("entry", entries, dtype=pl.String())


def _entry(
    image_id: str, split: str | None, source: str | None, offset: int | None, roots: dict[str, Path]
) -> str:
    if split not in roots or source is None or offset is not None:  # tar members stay image_ids
        return image_id
    try:
        relative = Path(source).resolve().relative_to(roots[split])
    except ValueError:  # a file outside its split's root (a symlinked tree): keep the stable id
        return image_id
    return f"{split}/{relative.as_posix()}"


def cleaning_outputs(
    manifest: pl.DataFrame, out_dir: Path, *, roots: Mapping[str, str | Path] | None = None
) -> dict[str, Path]:
    """Write the removal list, relabel map and final manifest into ``out_dir``; returns their paths.

    Keys of the result: ``removal_list``, ``relabel_map``, ``final_manifest``. The files are
    written through a temp name and renamed, so a reader never sees half a list. Entries are
    sorted, so the same decisions always give byte-identical files.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    final = final_actions(manifest).with_columns(file_entries(manifest, roots)).sort("image_id")
    removed = final.filter(pl.col("final_action") == "remove")["entry"].sort().to_list()
    relabeled = final.filter(pl.col("final_action") == "relabel").sort("entry")
    relabel_map = dict(zip(relabeled["entry"], relabeled["final_label"], strict=True))
    for entry in removed:  # a line break inside a name would split one entry into two
        if "\n" in entry or "\r" in entry:
            raise ValueError(f"cannot write a removal list entry with a line break: {entry!r}")
    paths = {
        "removal_list": out_dir / REMOVAL_LIST,
        "relabel_map": out_dir / RELABEL_MAP,
        "final_manifest": out_dir / FINAL_MANIFEST,
    }
    text = "".join(f"{entry}\n" for entry in removed)
    write_text(paths["removal_list"], text)
    body = json.dumps(relabel_map, indent=1, ensure_ascii=False, sort_keys=True) + "\n"
    write_text(paths["relabel_map"], body)
    with atomic_path(paths["final_manifest"]) as tmp:
        final.write_parquet(tmp)
    return paths
