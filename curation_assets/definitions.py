"""The code location: one Definitions holding every project's asset graph.

Projects come from the packaged project files (curation_assets/projects/*.yaml) and from
the files or folders named in $CURATION_PROJECTS. `dagster dev -w workspace.yaml` (or
`make ui`) loads this module.
"""

from __future__ import annotations

import dagster as dg

from curation_assets.assets.project import build_project_definitions
from curation_assets.config import ProjectConfig, load_projects
from curation_assets.resources.compute import ComputeResource
from curation_assets.resources.store import StoreResource


def build_definitions(projects: list[ProjectConfig] | None = None) -> dg.Definitions:
    """Definitions for ``projects`` (default: every project file found)."""
    projects = load_projects() if projects is None else projects
    per_project = [build_project_definitions(project) for project in projects]
    return dg.Definitions.merge(
        *per_project, dg.Definitions(resources={"store": StoreResource(), "compute": ComputeResource()})
    )


defs = build_definitions()
