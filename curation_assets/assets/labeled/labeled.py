"""The labeled-dataset assets of a project (issue 8), present only where the project file switches them on.

Per shard: `perceptual_hashes` (train_test_leaks with the perceptual method).
Global: `train_test_leaks`, `label_issues`, `review_manifest` and `cleaning_outputs`
(review.enabled), `class_subsets` (class_subsets.enabled). The assets themselves live in
leaks.py, label_review.py and class_subsets.py.
"""

import dagster as dg

from curation_assets.assets.keys import CLASS_SUBSETS, CLEANING, LABEL_ISSUES, LEAKS, PHASHES, REVIEW
from curation_assets.assets.labeled.class_subsets import build_class_subsets_asset
from curation_assets.assets.labeled.label_review import (
    build_cleaning_asset,
    build_label_issues_asset,
    build_review_asset,
)
from curation_assets.assets.labeled.leaks import (
    build_leaks_asset,
    build_phash_asset,
    perceptual_enabled,
    phash_signature,
)
from curation_assets.config import ProjectConfig


def build_labeled_shard_assets(
    project: ProjectConfig, partitions: dg.PartitionsDefinition
) -> list[dg.AssetsDefinition]:
    return [build_phash_asset(project, partitions)] if perceptual_enabled(project) else []


def build_labeled_assets(project: ProjectConfig) -> list[dg.AssetsDefinition]:
    assets = []
    if project.stages.train_test_leaks.enabled:
        assets.append(build_leaks_asset(project))
    if project.stages.label_issues.enabled:
        assets.append(build_label_issues_asset(project))
    if project.review.enabled:
        assets += [build_review_asset(project), build_cleaning_asset(project)]
    if project.class_subsets.enabled:
        assets.append(build_class_subsets_asset(project))
    return assets


__all__ = [
    "CLASS_SUBSETS",
    "CLEANING",
    "LABEL_ISSUES",
    "LEAKS",
    "PHASHES",
    "REVIEW",
    "build_labeled_assets",
    "build_labeled_shard_assets",
    "perceptual_enabled",
    "phash_signature",
]
