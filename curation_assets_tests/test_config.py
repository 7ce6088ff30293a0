"""Project files: packaged ones validate; broken ones fail with the key's path."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from curation_assets.config import (
    ProjectConfigError,
    load_project,
    load_project_dict,
    load_projects,
    packaged_defaults,
    packaged_project_files,
    project_files,
)


def test_every_packaged_project_validates():
    names = {load_project(path).name for path in packaged_project_files()}
    assert {"demo", "tol10m", "gldv2"} <= names


def test_walkthrough_projects_carry_the_walkthrough_numbers():
    projects = {p.name: p for p in load_projects(packaged_project_files())}
    tol, gld = projects["tol10m"].stages, projects["gldv2"].stages
    assert tol.near_dedup.threshold == 0.04 and tol.aesthetic.threshold == 3.4
    assert tol.sampling.budget == 3_000_000 and not tol.rotation.enabled
    assert {k: v.threshold for k, v in tol.example_filters.categories.items()} == {
        "maps": 0.4,
        "charts": 0.2,
        "drawings": 0.11,
        "footprint": 0.34,
        "misc": 0.1,
        "notebook_pages": 0.2,
        "specimen": 0.28,
        "extra": 0.25,
    }
    assert gld.rotation.threshold == 0.9 and gld.near_dedup.threshold == 0.25
    assert gld.sampling.budget == 2_000_000 and not gld.example_filters.enabled
    assert [level.n_clusters for level in tol.clustering.levels] == [60000, 1200, 120]


def test_defaults_match_vdc_and_merge_key_by_key():
    project = load_project_dict(
        {"name": "p", "dataset": {"roots": "/data"}, "stages": {"sanitize": {"min_width": 100}}}
    )
    rules = project.stages.sanitize
    assert rules.min_width == 100  # overridden
    assert (rules.min_height, rules.max_width, rules.max_height) == (80, 3200, 3200)  # kept
    assert (rules.min_aspect_ratio, rules.max_aspect_ratio, rules.max_file_size_mb) == (0.15, 6.667, 10.0)
    assert set(rules.allowed_formats) == {"jpg", "jpeg", "png", "webp", "tif", "tiff", "bmp", "gif"}
    assert packaged_defaults()["stages"]["sanitize"]["min_width"] == 80  # the defaults are not mutated


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (
            {"stages": {"sanitize": {"min_widht": 3}}},
            "stages.sanitize.min_widht: unknown key; allowed keys: min_width",
        ),
        (
            {"dataset": {"input_kind": "folder"}},
            "dataset.input_kind: got 'folder'; allowed values: 'directory', 'webdataset' or 'parquet'",
        ),
        (
            {"stages": {"sanitize": {"min_width": "wide"}}},
            "stages.sanitize.min_width: Input should be a valid integer",
        ),
        ({"stages": {"near_dedup": {"linkage": "complete"}}}, "stages.near_dedup.linkage: got 'complete'"),
        ({"models": {"m": {"kind": "sscd_torchscript"}}}, "models.m: kind 'sscd_torchscript' needs `path`"),
        (
            {"stages": {"near_dedup": {"enabled": True, "model": "sscd"}}},
            "stages.near_dedup.model: model 'sscd' is not defined in models",
        ),
        (
            {"dataset": {"shard_rule": {"kind": "tar"}}},
            "input_kind 'webdataset' goes with shard_rule.kind 'tar'",
        ),
        (
            {"stages": {"clustering": {"levels": [{"n_clusters": 5, "n_sampels": 1}]}}},
            "stages.clustering.levels.0.n_sampels: unknown key",
        ),
        ({"stages": {"sampling": {"enabled": True}}}, "enabled sampling needs a budget"),
        ({"name": "Bad Name"}, "name: name 'Bad Name' must match"),
    ],
)
def test_broken_project_fails_with_the_key_path(override, expected):
    data = {"name": "p", "dataset": {"roots": "/data"}}
    data = {**data, **override, "dataset": {**data["dataset"], **override.get("dataset", {})}}
    with pytest.raises(ProjectConfigError) as info:
        load_project_dict(data, source="broken.yaml")
    assert "broken.yaml" in str(info.value)
    assert expected in str(info.value)


def test_paths_expand_env_home_and_relative_to_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("CURATION_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("POOL", str(tmp_path / "pool"))
    file = tmp_path / "projects" / "p.yaml"
    file.parent.mkdir()
    file.write_text(
        yaml.safe_dump(
            {
                "name": "p",
                "dataset": {"roots": {"train": "${POOL}/train", "val": "relative/val"}},
                "models": {"sscd": {"kind": "sscd_torchscript", "path": "~/w.pt"}},
            }
        )
    )
    project = load_project(file)
    assert project.dataset.roots == {
        "train": str(tmp_path / "pool" / "train"),
        "val": str(file.parent / "relative" / "val"),
    }
    assert project.storage_root == str(tmp_path / "home" / "store")
    assert project.models["sscd"].path == str(Path("~/w.pt").expanduser())


def test_unset_env_var_is_an_error(tmp_path: Path):
    with pytest.raises(ProjectConfigError, match=r"NO_SUCH_VAR_XYZ"):
        load_project_dict({"name": "p", "dataset": {"roots": "${NO_SUCH_VAR_XYZ}/x"}})


def test_extra_project_files_and_name_collisions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    extra = tmp_path / "mine.yaml"
    extra.write_text(yaml.safe_dump({"name": "mine", "dataset": {"roots": str(tmp_path)}}))
    monkeypatch.setenv("CURATION_PROJECTS", str(tmp_path))
    assert extra in project_files()
    assert "mine" in {p.name for p in load_projects()}
    (tmp_path / "again.yaml").write_text(
        yaml.safe_dump({"name": "mine", "dataset": {"roots": str(tmp_path)}})
    )
    with pytest.raises(ProjectConfigError, match="project name 'mine' is used by both"):
        load_projects()


def test_invalid_yaml_is_reported(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ProjectConfigError, match="not valid YAML"):
        load_project(bad)
