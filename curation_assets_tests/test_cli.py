"""`curate demo` end to end on a small demo: runs land in the persistent instance, funnel printed."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest

from curation_assets.cli import main

pytestmark = pytest.mark.xdist_group("demo")


def test_curate_demo_materializes_into_the_persistent_instance(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.setenv("CURATION_HOME", str(tmp_path / "home"))
    home = tmp_path / "home" / "dagster_home"
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    assert main(["demo", "--images", "120", "--shards", "2"]) == 0
    out = capsys.readouterr().out
    assert (
        "images in:" in out and "exact duplicates:" in out and "near duplicates:" in out and "funnel:" in out
    )
    assert "truncated" in out and "decompression_bomb" in out  # rejected reasons are listed
    assert (home / "dagster.yaml").is_file()
    with dg.DagsterInstance.get() as instance:
        runs = instance.get_runs()
        assert {r.job_name for r in runs} == {"demo_shard_job", "demo_global_job"}
        assert all(r.is_success for r in runs)
        # launched on the instance from the code location, as the UI launches them
        assert all(r.remote_job_origin is not None for r in runs)
        assert set(instance.get_dynamic_partitions("demo_shards")) == {"shard-00", "shard-01"}
    assert (tmp_path / "home" / "store" / "demo" / "exact_duplicates" / "exact_duplicates.parquet").is_file()

    # a second run finds nothing to redo
    assert main(["demo", "--images", "120", "--shards", "2"]) == 0
    assert "0 shard run(s)" in capsys.readouterr().out


def test_validate_reports_a_broken_file(tmp_path: Path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\ndataset: {roots: /x}\nstages: {sanitize: {max_widht: 5}}\n")
    assert main(["validate", str(bad)]) == 2
    assert "stages.sanitize.max_widht: unknown key" in capsys.readouterr().err
