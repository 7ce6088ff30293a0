"""Shared fixtures: projects in temp folders, tiny image trees, the generated demo dataset."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import dagster as dg
import numpy as np
import pytest
from PIL import Image

from curation_assets.config import ProjectConfig, deep_merge, load_project_dict

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the tests may reach a model hub


def sensor_tick(
    defs: dg.Definitions, project: ProjectConfig, instance: dg.DagsterInstance, cursor: str | None = None
) -> dg.SensorResult:
    """One evaluation of the project's discovery sensor (``cursor``: the previous tick's), with its
    partition additions and deletions applied to ``instance`` as the daemon applies them."""
    from curation_assets.resources.store import StoreResource

    sensor = defs.resolve_sensor_def(f"{project.name}_discovery_sensor")
    with dg.build_sensor_context(
        instance=instance, cursor=cursor, resources={"store": StoreResource()}
    ) as ctx:
        result = sensor(ctx)
    for request in result.dynamic_partitions_requests or []:
        if isinstance(request, dg.DeleteDynamicPartitionsRequest):
            for key in request.partition_keys:
                instance.delete_dynamic_partition(request.partitions_def_name, key)
        else:
            instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
    return result


def make_project(tmp_path: Path, roots: dict[str, str] | str, **overrides: Any) -> ProjectConfig:
    """A validated project whose store lives under tmp_path."""
    data = deep_merge(
        {
            "name": "testproj",
            "storage_root": str(tmp_path / "store"),
            "dataset": {"roots": roots},
            "stages": {"sanitize": {"workers": 1}},
        },
        overrides,
    )
    return load_project_dict(data, source="test")


def write_photo(path: Path, seed: int, size: tuple[int, int] = (160, 120), fmt: str | None = None) -> Path:
    """A small random RGB image (distinct per seed)."""
    rng = np.random.default_rng(seed)
    low = rng.integers(0, 255, size=(6, 8, 3), dtype=np.uint8)
    image = Image.fromarray(low).resize(size, Image.Resampling.BICUBIC)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format=fmt, quality=90) if (fmt or path.suffix.lower()) in (
        "JPEG",
        ".jpg",
    ) else image.save(path, format=fmt)
    return path


@pytest.fixture(scope="session")
def demo_dataset(tmp_path_factory: pytest.TempPathFactory):
    """A small generated demo dataset (3 shards), shared by the tests of one worker."""
    from curation_assets.demo.pool import generate_demo

    return generate_demo(tmp_path_factory.mktemp("demo"), n_images=240, n_shards=3, seed=7)
