"""What the Dagster UI shows: every plot in asset metadata is a markdown image it renders.

A path entry only copies to the clipboard in the UI (issue 13), so a ``*_plot`` entry must be
markdown with the image embedded, not a path.
"""

from __future__ import annotations

import dagster as dg
import pytest

from curation_assets.definitions import build_definitions
from curation_assets.runner import materialize_project
from curation_assets_tests.conftest import make_project

pytestmark = pytest.mark.xdist_group("demo")

# The stages whose assets draw plots (near-duplicate sweep, cluster sizes), kept small: the
# demo pool's ~240 images and a two-level hierarchy of a few clusters.
STAGES = {
    "embeddings": {"enabled": True, "copy_model": "descriptor", "semantic_model": "descriptor_content"},
    "near_dedup": {"enabled": True, "model": "descriptor", "threshold": 0.1, "report_threshold": 0.3},
    "clustering": {
        "enabled": True,
        "model": "descriptor_content",
        "levels": [{"n_clusters": 8, "n_samples": 3}, {"n_clusters": 3, "n_samples": 2}],
        "n_resamples": 2,
    },
}
PLOTTING_ASSETS = {"duplicate_groups", "hierarchical_clusters"}


@pytest.fixture(scope="module")
def plot_entries(demo_dataset, tmp_path_factory) -> dict[str, dict[str, dg.MetadataValue]]:
    """asset name -> its ``*_plot`` metadata entries, over every materialization of every asset."""
    project = make_project(
        tmp_path_factory.mktemp("ui"),
        {"train": str(demo_dataset.images_root)},
        stages=STAGES,
        report={"enabled": False},
        export={"enabled": False},
    )
    defs = build_definitions([project])
    instance = dg.DagsterInstance.ephemeral()
    summary = materialize_project(project, defs, instance, echo=lambda _: None)
    assert summary.failed == []
    entries: dict[str, dict[str, dg.MetadataValue]] = {}
    for key in defs.resolve_asset_graph().get_all_asset_keys():
        for record in instance.fetch_materializations(key, limit=1000).records:
            metadata = record.asset_materialization.metadata if record.asset_materialization else {}
            plots = {name: value for name, value in metadata.items() if name.endswith("_plot")}
            entries.setdefault(key.path[-1], {}).update(plots)
    return entries


def test_every_plot_entry_is_a_markdown_image(plot_entries):
    for asset in PLOTTING_ASSETS:  # not vacuous: these assets draw plots
        assert plot_entries.get(asset), f"{asset} has no *_plot metadata entry"
    for asset, plots in plot_entries.items():
        for name, value in plots.items():
            assert isinstance(value, dg.MarkdownMetadataValue), f"{asset}.{name} is {type(value).__name__}"
            assert "![" in value.md_str and "data:image/png;base64," in value.md_str, f"{asset}.{name}"
