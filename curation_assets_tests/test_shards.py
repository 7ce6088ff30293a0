"""Shard rules and the inventory: every file listed, new files never reshuffle old shards."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import xxhash

from curation_assets.core.ingest.inventory import build_inventory
from curation_assets.core.ingest.shards import ROOT_FILES_SHARD, discover_shards, list_shard_files, safe_key
from curation_assets_tests.conftest import make_project, write_photo


def test_subfolder_rule_with_root_files_and_splits(tmp_path: Path):
    write_photo(tmp_path / "train" / "birds" / "a.jpg", 1)
    write_photo(tmp_path / "train" / "fish" / "deep" / "b.jpg", 2)
    write_photo(tmp_path / "train" / "loose.jpg", 3)
    write_photo(tmp_path / "val" / "birds" / "c.jpg", 4)
    project = make_project(
        tmp_path,
        {"train": str(tmp_path / "train"), "val": str(tmp_path / "val"), "test": str(tmp_path / "missing")},
    )
    found = discover_shards(project.dataset)
    assert [s.key for s in found.shards] == [
        f"train.{ROOT_FILES_SHARD}",
        "train.birds",
        "train.fish",
        "val.birds",
    ]
    assert found.missing_roots == [str(tmp_path / "missing")]
    fish = next(s for s in found.shards if s.key == "train.fish")
    assert [f.image_id for f in list_shard_files(fish)] == ["train.fish/deep/b.jpg"]
    root_files = next(s for s in found.shards if s.kind == "root_files")
    assert [f.rel_path for f in list_shard_files(root_files)] == ["loose.jpg"]


def test_fingerprint_changes_when_files_are_added(tmp_path: Path):
    write_photo(tmp_path / "s" / "a.jpg", 1)
    project = make_project(tmp_path, str(tmp_path))
    shard = next(s for s in discover_shards(project.dataset).shards if s.key == "s")
    before = shard.fingerprint()
    assert shard.fingerprint() == before
    import os

    os.utime(tmp_path / "s", ns=(1, 1))  # make sure the next change moves the stamp
    write_photo(tmp_path / "s" / "b.jpg", 2)
    assert shard.fingerprint() != before


def test_chunks_are_frozen_once_created(tmp_path: Path):
    root = tmp_path / "pool"
    for i in range(5):
        write_photo(root / f"img_{i:03d}.jpg", i)
    project = make_project(tmp_path, str(root), dataset={"shard_rule": {"kind": "chunks", "chunk_size": 2}})
    first = discover_shards(project.dataset)
    assert {k: len(v) for k, v in first.new_chunk_manifests.items()} == {
        "chunk-000000": 2,
        "chunk-000001": 2,
        "chunk-000002": 1,
    }
    # a file that sorts FIRST arrives later: old chunks keep their members, it forms a new chunk
    write_photo(root / "aaa_new.jpg", 9)
    second = discover_shards(project.dataset, first.new_chunk_manifests)
    assert list(second.new_chunk_manifests) == ["chunk-000003"]
    assert second.new_chunk_manifests["chunk-000003"] == ["aaa_new.jpg"]
    kept = {s.key: list(s.members) for s in second.shards if s.key in first.new_chunk_manifests}
    assert kept == first.new_chunk_manifests


def _tar_with(path: Path, members: dict[str, bytes]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))


def test_tar_shards_are_read_in_place(tmp_path: Path):
    jpeg = write_photo(tmp_path / "x.jpg", 5).read_bytes()
    _tar_with(tmp_path / "wds" / "part-000.tar", {"0001.jpg": jpeg, "0001.json": b'{"caption": "x"}'})
    project = make_project(
        tmp_path, str(tmp_path / "wds"), dataset={"input_kind": "webdataset", "shard_rule": {"kind": "tar"}}
    )
    (shard,) = discover_shards(project.dataset).shards
    assert shard.key == "part-000"
    table = build_inventory(shard, list_shard_files(shard))
    rows = {r["image_id"]: r for r in table.to_dicts()}
    assert rows["part-000/0001.jpg"]["content_hash"] == xxhash.xxh3_128(jpeg).hexdigest()
    assert rows["part-000/0001.jpg"]["detected_format"] == "JPEG" and rows["part-000/0001.jpg"]["is_image"]
    # the sample's .json is its metadata (img2dataset's layout), not a file of its own
    assert "part-000/0001.json" not in rows
    assert json.loads(rows["part-000/0001.jpg"]["metadata"]) == {"caption": "x"}
    with open(rows["part-000/0001.jpg"]["source_path"], "rb") as handle:
        handle.seek(rows["part-000/0001.jpg"]["offset"])
        assert handle.read(len(jpeg)) == jpeg


def test_damaged_tar_keeps_readable_members_and_says_where_it_broke(tmp_path: Path):
    jpeg = write_photo(tmp_path / "x.jpg", 5).read_bytes()
    tar = tmp_path / "wds" / "broken.tar"
    _tar_with(tar, {"a.jpg": jpeg, "b.jpg": jpeg + b"x" * 5000})
    with tarfile.open(tar) as archive:
        cut = archive.getmember("b.jpg").offset_data + 100
    tar.write_bytes(tar.read_bytes()[:cut])  # a partial download: cut inside b.jpg's data
    project = make_project(
        tmp_path, str(tmp_path / "wds"), dataset={"input_kind": "webdataset", "shard_rule": {"kind": "tar"}}
    )
    (shard,) = discover_shards(project.dataset).shards
    table = build_inventory(shard, list_shard_files(shard))
    notes = dict(zip(table["rel_path"], table["note"], strict=True))
    assert notes["a.jpg"] is None
    assert notes["b.jpg"].startswith("unreadable")
    assert notes["<damaged tar>"].startswith("unreadable: tar is damaged after b.jpg")


def test_inventory_lists_every_file_with_a_reason(tmp_path: Path):
    shard_dir = tmp_path / "s"
    write_photo(shard_dir / "ok.jpg", 1)
    (shard_dir / "empty.jpg").write_bytes(b"")
    (shard_dir / "garbage.png").write_bytes(b"\x00\x01 not a png at all" * 10)
    (shard_dir / "notes.txt").write_text("hello")
    (shard_dir / "noext").write_bytes(write_photo(tmp_path / "tmp.png", 2).read_bytes())
    (shard_dir / "dangling.jpg").symlink_to(tmp_path / "nowhere.jpg")
    project = make_project(tmp_path, str(tmp_path))
    shard = next(s for s in discover_shards(project.dataset).shards if s.key == "s")
    table = build_inventory(shard, list_shard_files(shard))
    notes = dict(zip(table["rel_path"], table["note"], strict=True))
    assert len(table) == 6
    assert notes["ok.jpg"] is None and notes["noext"] is None
    assert notes["empty.jpg"] == "empty_file"
    assert notes["garbage.png"] == "unrecognized_format"
    assert notes["notes.txt"] == "not_an_image"
    assert notes["dangling.jpg"].startswith("unreadable: FileNotFoundError")
    assert table.filter(table["rel_path"] == "noext")["detected_format"].item() == "PNG"


def test_safe_key_is_stable_and_unique():
    assert safe_key("shard-01") == "shard-01"
    assert safe_key("my photos") != safe_key("my_photos")
    assert safe_key("my photos") == safe_key("my photos")
    assert "/" not in safe_key("a/b") and not safe_key(".hidden").startswith(".")
