"""The one registry of stages: every asset of a project's graph, in pipeline order.

The project graph (project.py), the headless runner (runner.py: which outputs are current),
the decision inputs and the filter decisions all loop over :data:`STAGES`. Adding a stage is
one module (its asset builder, or a :class:`~.stage_spec.DecodePart` when it is computed from
each image's one decode) and one entry here; see the README's Development section.
"""

from __future__ import annotations

import dagster as dg

from curation_assets.assets.dedup.decontamination import build_decontamination_asset, decontamination_enabled
from curation_assets.assets.dedup.exact_duplicates import build_exact_duplicates_asset
from curation_assets.assets.dedup.near_dedup import build_near_dedup_assets
from curation_assets.assets.embed.embeddings import embedding_models, embedding_part, embedding_signature
from curation_assets.assets.filters.aesthetic import (
    AESTHETIC_PART,
    aesthetic_rules,
    aesthetic_signature,
    build_aesthetic_asset,
    reuses_semantic_vectors,
)
from curation_assets.assets.filters.example_filters import (
    build_example_distances_asset,
    build_example_embeddings_asset,
    example_distances_signature,
    example_rules,
)
from curation_assets.assets.filters.filter_decisions import build_filter_decisions_asset
from curation_assets.assets.filters.quality import QUALITY_PART, quality_rules, quality_signature
from curation_assets.assets.filters.rotation import ROTATION_PART, rotation_signature
from curation_assets.assets.ingest.inventory import build_inventory_asset
from curation_assets.assets.ingest.sanitize import SANITIZE_PART, shard_sanitize_signature
from curation_assets.assets.keys import (
    AESTHETIC,
    CLASS_SUBSETS,
    CLUSTERS,
    COPY_EMBEDDINGS,
    DECISIONS,
    DECONTAMINATION,
    EXACT,
    EXAMPLE_DISTANCES,
    EXAMPLE_EMBEDDINGS,
    EXPORT,
    FILTER_DECISIONS,
    GROUPS,
    INVENTORY,
    LABEL_ISSUES,
    LEAKS,
    PHASHES,
    QUALITY,
    REPORT,
    RETRIEVAL,
    REVIEW,
    ROTATION,
    SAMPLE,
    SANITIZED,
    SEMANTIC_EMBEDDINGS,
)
from curation_assets.assets.labeled.class_subsets import build_class_subsets_asset
from curation_assets.assets.labeled.label_review import (
    build_cleaning_asset,
    build_label_issues_asset,
    build_review_asset,
)
from curation_assets.assets.labeled.leaks import (
    PHASH_PART,
    build_leaks_asset,
    perceptual_enabled,
    phash_signature,
)
from curation_assets.assets.outputs.decisions import build_decisions_asset
from curation_assets.assets.outputs.export import build_export_asset
from curation_assets.assets.outputs.report import build_report_asset
from curation_assets.assets.select.clustering import build_clusters_asset, build_sample_asset
from curation_assets.assets.select.retrieval import build_retrieval_asset, retrieval_enabled
from curation_assets.assets.stage_spec import Stage, always
from curation_assets.config import ProjectConfig


def _one(builder):
    """A stage builder from a function that makes one global asset of a project."""
    return lambda project, partitions=None: [builder(project)]


def _embeddings_on(asset: str):
    return lambda project: asset in embedding_models(project)


def _scores_on(project: ProjectConfig) -> bool:
    return any(stage.scores and stage.enabled(project) for stage in STAGES)


STAGES: tuple[Stage, ...] = (
    # ------------------------------------------------------------------ per shard
    Stage(INVENTORY, "shard", always, build=lambda p, parts: [build_inventory_asset(p, parts)]),
    Stage(SANITIZED, "shard", always, (INVENTORY,), shard_sanitize_signature, decode=SANITIZE_PART),
    Stage(
        COPY_EMBEDDINGS,
        "shard",
        _embeddings_on(COPY_EMBEDDINGS),
        (SANITIZED,),
        embedding_signature(COPY_EMBEDDINGS),
        decode=embedding_part(COPY_EMBEDDINGS),
    ),
    Stage(
        SEMANTIC_EMBEDDINGS,
        "shard",
        _embeddings_on(SEMANTIC_EMBEDDINGS),
        (SANITIZED,),
        embedding_signature(SEMANTIC_EMBEDDINGS),
        decode=embedding_part(SEMANTIC_EMBEDDINGS),
    ),
    Stage(
        EXAMPLE_DISTANCES,
        "shard",
        lambda p: p.stages.example_filters.enabled,
        (SEMANTIC_EMBEDDINGS, EXAMPLE_EMBEDDINGS),
        example_distances_signature,
        build=lambda p, parts: [build_example_distances_asset(p, parts)],
        scores=True,
        filter_rules=example_rules,
    ),
    Stage(  # the aesthetic head over the stored semantic vectors (its CLIP model is the semantic one)
        AESTHETIC,
        "shard",
        lambda p: p.stages.aesthetic.enabled and reuses_semantic_vectors(p),
        (SEMANTIC_EMBEDDINGS,),
        aesthetic_signature,
        build=lambda p, parts: [build_aesthetic_asset(p, parts)],
        scores=True,
        filter_rules=aesthetic_rules,
    ),
    Stage(  # ... or over its own CLIP model, fed by the shard pass
        AESTHETIC,
        "shard",
        lambda p: p.stages.aesthetic.enabled and not reuses_semantic_vectors(p),
        (SANITIZED,),
        aesthetic_signature,
        decode=AESTHETIC_PART,
        scores=True,
        filter_rules=aesthetic_rules,
    ),
    Stage(
        QUALITY,
        "shard",
        lambda p: p.stages.quality.enabled,
        (SANITIZED,),
        quality_signature,
        decode=QUALITY_PART,
        scores=True,
        filter_rules=quality_rules,
    ),
    Stage(
        ROTATION,
        "shard",
        lambda p: p.stages.rotation.enabled,
        (SANITIZED,),
        rotation_signature,
        decode=ROTATION_PART,
        scores=True,
    ),
    Stage(PHASHES, "shard", perceptual_enabled, (SANITIZED,), phash_signature, decode=PHASH_PART),
    # ------------------------------------------------------------------ global
    Stage(
        EXACT,
        "global",
        lambda p: p.stages.exact_dedup.enabled,
        build=_one(build_exact_duplicates_asset),
        decides="exact_dedup",
    ),
    Stage(
        GROUPS,
        "global",
        lambda p: p.stages.near_dedup.enabled,
        build=lambda p, parts=None: build_near_dedup_assets(p),
        decides="near_dedup",
    ),
    Stage(  # on when references.sets has a decontaminate set
        DECONTAMINATION,
        "global",
        decontamination_enabled,
        build=_one(build_decontamination_asset),
        decides="decontamination",
    ),
    Stage(
        EXAMPLE_EMBEDDINGS,
        "global",
        lambda p: p.stages.example_filters.enabled,
        build=_one(build_example_embeddings_asset),
    ),
    Stage(
        FILTER_DECISIONS, "global", _scores_on, build=_one(build_filter_decisions_asset), decides="filters"
    ),
    Stage(CLUSTERS, "global", lambda p: p.stages.clustering.enabled, build=_one(build_clusters_asset)),
    # on when references.sets has a seed set
    Stage(RETRIEVAL, "global", retrieval_enabled, build=_one(build_retrieval_asset)),
    Stage(
        SAMPLE,
        "global",
        lambda p: p.stages.sampling.enabled,
        build=_one(build_sample_asset),
        decides="sampling",
    ),
    Stage(DECISIONS, "global", always, build=_one(build_decisions_asset)),
    Stage(EXPORT, "global", lambda p: p.export.enabled, build=_one(build_export_asset)),
    Stage(REPORT, "global", lambda p: p.report.enabled, build=_one(build_report_asset)),
    Stage(LEAKS, "global", lambda p: p.stages.train_test_leaks.enabled, build=_one(build_leaks_asset)),
    Stage(
        LABEL_ISSUES, "global", lambda p: p.stages.label_issues.enabled, build=_one(build_label_issues_asset)
    ),
    Stage(
        REVIEW,
        "global",
        lambda p: p.review.enabled,
        build=lambda p, parts=None: [build_review_asset(p), build_cleaning_asset(p)],
    ),
    Stage(CLASS_SUBSETS, "global", lambda p: p.class_subsets.enabled, build=_one(build_class_subsets_asset)),
)


def enabled_stages(project: ProjectConfig, scope: str | None = None) -> list[Stage]:
    """The stages ``project`` switches on (of one scope, or all), in pipeline order."""
    return [s for s in STAGES if (scope is None or s.scope == scope) and s.enabled(project)]


def decode_stages(project: ProjectConfig) -> list[Stage]:
    """The enabled per-shard stages fed by the shard pass (sanitize first)."""
    return [s for s in enabled_stages(project, "shard") if s.decode is not None]


def build_stage_assets(
    project: ProjectConfig, scope: str, partitions: dg.PartitionsDefinition
) -> list[dg.AssetsDefinition]:
    """Every asset of the enabled stages of ``scope``: the shard pass (one multi-asset for the
    decode-fed stages) and each other stage's own assets, in pipeline order."""
    from curation_assets.assets.ingest.shard_pass import build_shard_pass_asset

    assets, fed = [], decode_stages(project) if scope == "shard" else []
    for stage in enabled_stages(project, scope):
        if stage.decode is not None:
            if stage is fed[0]:
                assets.append(build_shard_pass_asset(project, partitions, fed))
            continue
        assert stage.build is not None, stage.name
        assets += stage.build(project, partitions)
    return assets
