"""Vectors of the project's reference sets (``references.sets``), shared by `decontamination`
(copy-detection model) and `retrieval_selection` (semantic model).

A set's vectors are stored once per model under ``<store>/<project>/reference_embeddings/<set>``
with the model's identity, and recomputed only when a file of the set or the model entry changes
(the example filters' rule). Whoever reads them compares that identity with the identity of the
pool vectors it searches and refuses a mix: two models' vectors are not comparable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import dagster as dg
import numpy as np
import polars as pl

from curation_assets.assets.common import RateLogger, load_project_model
from curation_assets.assets.embed.embeddings import model_stamp
from curation_assets.assets.keys import REFERENCE_EMBEDDINGS
from curation_assets.assets.signatures import signature_of
from curation_assets.config import ProjectConfig
from curation_assets.core.dedup.references import (
    ReferenceSetError,
    list_reference_set,
    read_vector_table,
    reference_refs,
)
from curation_assets.core.embed.vectors import VectorMismatchError, assert_compatible
from curation_assets.resources.store import ProjectStore

if TYPE_CHECKING:  # core.embed.embed imports torch: only the steps that embed load it
    from curation_assets.core.embed.embed import ComputeSettings

ROLE_MODEL = {"decontaminate": "copy_model", "seed": "semantic_model"}


@dataclass(frozen=True)
class ReferenceVectors:
    name: str
    paths: list[str]  # each vector's image, relative to the set's folder
    vectors: np.ndarray  # (m, d) float16, row-aligned with paths
    meta: dict[str, Any]  # model identity, counts, signature
    computed: bool  # embedded in this call (False: read from the store)


def reference_model(project: ProjectConfig, role: str) -> str:
    """The models entry a role's vectors come from: the model of the pool vectors they are compared with."""
    return getattr(project.stages.embeddings, ROLE_MODEL[role])


def ensure_reference_vectors(
    project: ProjectConfig, store: ProjectStore, name: str, settings: ComputeSettings, log: Any
) -> ReferenceVectors:
    """The vectors of reference set ``name``, from the store or (re)computed when missing or stale."""
    ref_set = project.references.sets[name]
    model_name = reference_model(project, ref_set.role)
    try:
        files = list_reference_set(name, ref_set.path, ref_set.kind)
    except ReferenceSetError as exc:
        raise dg.Failure(str(exc)) from None
    if ref_set.kind == "vectors":  # computed elsewhere: read as they are, their recorded model checked
        try:
            paths, vectors, identity = read_vector_table(files)
        except ReferenceSetError as exc:
            raise dg.Failure(str(exc)) from None
        meta = {"model": identity, "role": ref_set.role, "kind": "vectors", "images": len(paths)}
        meta["input_signature"] = files.fingerprint()
        return ReferenceVectors(name, paths, vectors, meta, False)
    signature = signature_of(
        files.fingerprint(), ref_set.role, model_stamp(model_name, project.models[model_name])
    )
    table_path = store.shard_path(REFERENCE_EMBEDDINGS, name)
    if table_path.is_file() and store.parquet_metadata(table_path).get("input_signature") == signature:
        ids, vectors, meta = store.read_vectors(REFERENCE_EMBEDDINGS, name)
        return ReferenceVectors(name, ids["path"].to_list(), np.asarray(vectors), meta, False)

    from curation_assets.core.embed.embed import embed_images

    model = load_project_model(project, model_name, settings.device)
    refs, unreadable = reference_refs(files)
    for problem in unreadable:
        log.warning(f"reference set {name}: image skipped: {problem}")
    rate = RateLogger(log, f"reference images of {name}")
    result = embed_images(model.module, model.preprocessing, model.dim, refs, settings, progress=rate)
    rate.finish(len(refs))
    for image_id, error in result.errors:
        log.warning(f"reference set {name}: image skipped: {image_id}: {error}")
    if not result.image_ids:
        raise dg.Failure(f"references.sets.{name}: no readable image in {files.root}")
    paths = list(result.image_ids)  # the refs are named by their path in the set
    ids = pl.DataFrame({"path": paths, "row": np.arange(len(paths), dtype=np.int64)})
    meta = {
        "model": model.identity,
        "model_name": model_name,
        "role": ref_set.role,
        "root": str(files.root),
        "kind": files.kind,
        "input_signature": signature,
        "images": len(paths),
        "skipped_files": len(unreadable) + len(result.errors),
    }
    store.write_vectors(REFERENCE_EMBEDDINGS, name, ids, result.vectors, metadata=meta)
    return ReferenceVectors(name, paths, result.vectors, meta, True)


def refuse_other_model(reference: ReferenceVectors, pool_identity: dict[str, Any]) -> None:
    """Fail the step when the set's vectors and the pool's come from different models."""
    try:
        assert_compatible(f"reference set {reference.name}", reference.meta["model"], pool_identity)
    except VectorMismatchError as exc:
        raise dg.Failure(str(exc)) from None


def pool_vectors(
    store: ProjectStore, asset: str, shards: list[str], identity: dict[str, Any] | None
) -> tuple[list[str], np.ndarray, dict[str, Any] | None]:
    """(image ids, float16 vectors, their model identity) of every processed shard's ``asset``.

    Refuses a shard whose vectors another model made (``identity``: the expected one; None
    takes the first shard's and holds the others to it).
    """
    image_ids: list[str] = []
    blocks: list[np.ndarray] = []
    for shard in shards:
        ids, vectors, meta = store.read_vectors(asset, shard)
        if identity is None:
            identity = meta["model"]
        try:
            assert_compatible(shard, meta["model"], identity)
        except VectorMismatchError as exc:
            raise dg.Failure(str(exc)) from None
        have = ids.filter(pl.col("row").is_not_null()).sort("row")
        image_ids += have["image_id"].to_list()
        blocks.append(np.asarray(vectors)[have["row"].to_numpy()])
    dim = blocks[0].shape[1] if blocks else 0
    return image_ids, (np.concatenate(blocks) if blocks else np.zeros((0, dim), np.float16)), identity
