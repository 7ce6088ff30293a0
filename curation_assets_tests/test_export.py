"""Export of the curated subset: manifest, link/copy trees with fixes applied, WebDataset shards."""

from __future__ import annotations

import errno
import io
import tarfile
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import xxhash
from PIL import Image, ImageOps

from curation_assets.core.outputs.export import (
    ExportError,
    export_tree,
    export_webdataset,
    read_webdataset_ids,
    read_webdataset_sample,
    write_manifest,
)
from curation_assets_tests.conftest import write_photo

PLAN_SCHEMA = {
    "image_id": pl.String,
    "split": pl.String,
    "source_path": pl.String,
    "offset": pl.Int64,
    "size_bytes": pl.Int64,
    "content_hash": pl.String,
    "rel_path": pl.String,
    "fixes": pl.List(pl.String),
    "rotate": pl.Int64,
}


def plan_row(root: Path, split: str, rel: str, fixes: tuple[str, ...] = (), rotate: int = 0) -> dict:
    """The plan row of a file under a split root, hashed the way inventory hashes it."""
    data = (root / rel).read_bytes()
    return {
        "image_id": f"{split}/{rel}",
        "split": split,
        "source_path": str(root / rel),
        "offset": None,
        "size_bytes": len(data),
        "content_hash": xxhash.xxh3_128_hexdigest(data),
        "rel_path": rel,
        "fixes": list(fixes),
        "rotate": rotate,
    }


def plan_frame(rows: list[dict]) -> pl.DataFrame:
    return pl.DataFrame(rows, schema=PLAN_SCHEMA)


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)


def tree_hashes(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (no links followed) -> hash of its bytes."""
    return {
        str(p.relative_to(folder)): xxhash.xxh3_128_hexdigest(p.read_bytes())
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def build_dataset(base: Path) -> tuple[dict[str, Path], dict[str, dict]]:
    """Two split roots with plain photos and one image per kind of fix; returns (roots, rows by name)."""
    train, val = base / "train", base / "val"
    for rel, seed in (("birds/a.jpg", 1), ("birds/b.jpg", 2), ("birds/c.png", 3), ("fish/d.jpg", 4)):
        write_photo(train / rel, seed, (64, 48))
    write_photo(val / "v1.jpg", 11, (64, 48))
    write_photo(val / "v2.png", 12, (64, 48))
    odd = train / "odd"
    odd.mkdir(parents=True)
    Image.open(write_photo(base / "scratch" / "cmyk.png", 5, (64, 48))).convert("CMYK").save(odd / "cmyk.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6  # "turn 90° clockwise to view": stored sideways
    Image.open(write_photo(base / "scratch" / "exif.png", 6, (80, 40))).save(odd / "exif.jpg", exif=exif)
    upright = Image.open(write_photo(base / "scratch" / "upright.png", 7, (60, 40)))
    upright.rotate(-90, expand=True).save(odd / "turned.png")  # turned 90° clockwise
    write_photo(odd / "big.png", 8, (240, 120))
    write_photo(odd / "named.jpg", 9, (64, 48), fmt="PNG")  # PNG data behind a .jpg name
    write_photo(odd / "heavy.jpg", 10, (64, 48))
    rows = {
        "a": plan_row(train, "train", "birds/a.jpg"),
        "b": plan_row(train, "train", "birds/b.jpg"),
        "c": plan_row(train, "train", "birds/c.png"),
        "d": plan_row(train, "train", "fish/d.jpg"),
        "cmyk": plan_row(train, "train", "odd/cmyk.jpg", ("convert_rgb",)),
        "exif": plan_row(train, "train", "odd/exif.jpg", ("exif_transpose",)),
        "turned": plan_row(train, "train", "odd/turned.png", rotate=90),
        "big": plan_row(train, "train", "odd/big.png", ("resize_max_side:100",)),
        "named": plan_row(train, "train", "odd/named.jpg", ("rename_extension:png",)),
        "heavy": plan_row(train, "train", "odd/heavy.jpg", ("recompress:webp:80",)),
        "v1": plan_row(val, "val", "v1.jpg"),
        "v2": plan_row(val, "val", "v2.png"),
    }
    return {"train": train, "val": val}, rows


def add_tar_members(base: Path, rows: dict[str, dict]) -> Path:
    """A WebDataset-style tar with a plain member and a member turned 180°, added to ``rows``."""
    tar_path = base / "wds" / "shard-0.tar"
    tar_path.parent.mkdir(parents=True)
    plain = write_photo(base / "scratch" / "m1.jpg", 21, (64, 48)).read_bytes()
    buffer = io.BytesIO()
    Image.open(write_photo(base / "scratch" / "m2.png", 22, (50, 30))).rotate(180).save(buffer, "PNG")
    with tarfile.open(tar_path, "w") as tar:
        for name, data in (("sample.1.jpg", plain), ("sample.2.png", buffer.getvalue())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with tarfile.open(tar_path) as tar:
        members = {m.name: m for m in tar}
    for key, name, rotate in (("m1", "sample.1.jpg", 0), ("m2", "sample.2.png", 180)):
        member = members[name]
        data = tar_path.read_bytes()[member.offset_data : member.offset_data + member.size]
        rows[key] = {
            "image_id": f"wds.shard-0/{name}",
            "split": "web",
            "source_path": str(tar_path),
            "offset": member.offset_data,
            "size_bytes": member.size,
            "content_hash": xxhash.xxh3_128_hexdigest(data),
            "rel_path": f"shard-0/{name}",
            "fixes": [],
            "rotate": rotate,
        }
    return tar_path


@pytest.fixture
def dataset(tmp_path: Path) -> tuple[Path, dict[str, dict]]:
    _, rows = build_dataset(tmp_path / "ds")
    add_tar_members(tmp_path / "ds", rows)
    return tmp_path / "ds", rows


def out_path(out: Path, row: dict, new_rel: str | None = None) -> Path:
    return out / row["split"] / (new_rel or row["rel_path"])


FIXED = {"cmyk", "exif", "turned", "big", "heavy", "m2"}  # re-encoded; "named" is only renamed


def test_manifest_lists_exactly_the_kept_images(tmp_path: Path, dataset) -> None:
    _, rows = dataset
    plan = plan_frame(list(rows.values()))
    paths = write_manifest(plan, tmp_path / "out")
    manifest = pl.read_parquet(paths["manifest"])
    assert sorted(manifest["image_id"]) == sorted(r["image_id"] for r in rows.values())
    assert paths["files"].read_text().splitlines() == manifest["image_id"].to_list()
    by_id = dict(zip(manifest["image_id"], manifest["export_path"], strict=True))
    assert by_id["train/odd/named.jpg"] == "train/odd/named.png"
    assert by_id["train/odd/heavy.jpg"] == "train/odd/heavy.webp"
    assert by_id["train/birds/a.jpg"] == "train/birds/a.jpg"
    keys = manifest["wds_key"].to_list()
    assert len(set(keys)) == len(keys) and not any("." in k or "/" in k for k in keys)


@pytest.mark.parametrize("mode", ["symlink", "hardlink", "copy"])
def test_export_tree_links_or_copies_every_kept_image(tmp_path: Path, dataset, mode: str) -> None:
    base, rows = dataset
    before = tree_hashes(base)
    out = tmp_path / "out"
    summary = export_tree(plan_frame(list(rows.values())), out, mode)

    assert summary.failed == []
    assert summary.written == len(rows) and summary.fixed == len(FIXED)
    renamed = {"named": "odd/named.png", "heavy": "odd/heavy.webp"}
    assert len(summary.files) == len(rows)
    for name, row in rows.items():
        dest = out_path(out, row, renamed.get(name))
        assert str(dest) in summary.files
        with Image.open(dest) as im:  # every output decodes (a symlink is followed)
            im.load()
        source = Path(row["source_path"])
        linkable = name not in FIXED and row["offset"] is None  # a renamed file keeps its bytes: linked
        if linkable and mode == "symlink":
            assert dest.is_symlink() and dest.resolve() == source.resolve()
        elif linkable and mode == "hardlink":
            assert not dest.is_symlink() and dest.samefile(source)
        else:  # copies, re-encoded images and tar members are files of their own
            assert not dest.is_symlink() and not dest.samefile(source)
        if name not in FIXED:
            assert xxhash.xxh3_128_hexdigest(dest.read_bytes()) == row["content_hash"]
    assert tree_hashes(base) == before  # the source is only read


def test_fixes_and_rotations_reach_the_pixels(tmp_path: Path, dataset) -> None:
    base, rows = dataset
    out = tmp_path / "out"
    assert export_tree(plan_frame(list(rows.values())), out, "symlink").failed == []

    with Image.open(out / "train/odd/cmyk.jpg") as im:
        assert (im.format, im.mode) == ("JPEG", "RGB")
    with Image.open(out / "train/odd/exif.jpg") as im:
        assert im.size == (40, 80)  # stored 80x40 sideways, comes out upright
        assert im.getexif().get(0x0112) is None
        expected = np.asarray(ImageOps.exif_transpose(Image.open(rows["exif"]["source_path"])), np.int16)
        assert np.abs(pixels(out / "train/odd/exif.jpg") - expected).mean() < 4
    upright = pixels(base / "scratch" / "upright.png")
    assert np.array_equal(pixels(out / "train/odd/turned.png"), upright)  # lossless PNG: exact
    with Image.open(out / "train/odd/big.png") as im:
        assert max(im.size) == 100 and im.size == (100, 50)
    assert (out / "train/odd/named.png").read_bytes() == (base / "train/odd/named.jpg").read_bytes()
    assert not (out / "train/odd/named.jpg").exists()
    with Image.open(out / "train/odd/heavy.webp") as im:
        assert im.format == "WEBP"
    m2_upright = pixels(base / "scratch" / "m2.png")
    assert np.array_equal(pixels(out / "web/shard-0/sample.2.png"), m2_upright)


def test_rerun_skips_finished_files_and_repairs_damaged_ones(tmp_path: Path, dataset) -> None:
    _, rows = dataset
    plan = plan_frame(list(rows.values()))
    out = tmp_path / "out"
    first = export_tree(plan, out, "copy")
    assert first.written == len(rows)

    again = export_tree(plan, out, "copy")
    assert (again.written, again.skipped) == (0, len(rows))

    (out / "train/odd/turned.png").write_bytes(b"half a file")  # damaged output
    (out / "train/birds/a.jpg").unlink()  # missing output
    repaired = export_tree(plan, out, "copy")
    assert (repaired.written, repaired.skipped) == (2, len(rows) - 2)
    assert np.array_equal(pixels(out / "train/odd/turned.png"), pixels(tmp_path / "ds/scratch/upright.png"))

    # Switching mode replaces copies by links; nothing is left behind under temporary names.
    links = export_tree(plan, out, "symlink")
    assert links.failed == [] and (out / "train/birds/a.jpg").is_symlink()
    assert not [p for p in out.rglob(".*tmp-*")]


def test_bad_rows_are_recorded_and_the_rest_exported(tmp_path: Path, dataset) -> None:
    base, rows = dataset
    (base / "train/garbage.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    bad = [
        {**rows["a"], "image_id": "train/missing.jpg", "source_path": str(base / "train/none.jpg")},
        {**rows["b"], "image_id": "train/unknown-fix.jpg", "rel_path": "x.jpg", "fixes": ["sharpen"]},
        {**rows["c"], "image_id": "train/stale.png", "rel_path": "stale.png", "content_hash": "0" * 32},
        {**plan_row(base / "train", "train", "garbage.jpg", ("convert_rgb",)), "image_id": "train/garbage"},
        {**rows["d"], "image_id": "train/escape.jpg", "rel_path": "../../escape.jpg"},
    ]
    summary = export_tree(plan_frame([*rows.values(), *bad]), tmp_path / "out", "copy")
    failed = dict(summary.failed)
    assert set(failed) == {r["image_id"] for r in bad}
    assert "sharpen" in failed["train/unknown-fix.jpg"]
    assert "changed since" in failed["train/stale.png"]
    assert "relative path" in failed["train/escape.jpg"]
    assert summary.written == len(rows)
    assert not (tmp_path / "escape.jpg").exists()


def test_an_export_laid_over_the_dataset_never_writes_a_source(tmp_path: Path, dataset) -> None:
    base, rows = dataset
    before = tree_hashes(base)
    # out/<split>/<rel> is the source itself
    summary = export_tree(plan_frame([rows["a"], rows["turned"]]), base, "copy")
    assert {image_id for image_id, _ in summary.failed} == {rows["a"]["image_id"], rows["turned"]["image_id"]}
    assert all("source file itself" in why for _, why in summary.failed)
    assert tree_hashes(base) == before


def test_unknown_mode_and_missing_columns_fail_clearly(tmp_path: Path, dataset) -> None:
    _, rows = dataset
    plan = plan_frame(list(rows.values()))
    with pytest.raises(ExportError, match="mode"):
        export_tree(plan, tmp_path / "out", "move")
    with pytest.raises(ExportError, match="content_hash"):
        export_tree(plan.drop("content_hash"), tmp_path / "out")


def test_webdataset_shards_read_back_with_the_same_ids(tmp_path: Path, dataset) -> None:
    base, rows = dataset
    plan = plan_frame(list(rows.values()))
    out = tmp_path / "wds"
    summary = export_webdataset(plan, out, shard_max_count=3, prefix="cur")

    assert summary.failed == [] and summary.written == len(rows)
    tars = [Path(p) for p in summary.files]
    assert [t.parent.name for t in tars].count("train") == 4  # 10 train images, 3 per shard
    assert sorted(read_webdataset_ids(tars)) == sorted(r["image_id"] for r in rows.values())
    for tar_path in tars:  # one split per shard, WebDataset-safe keys: one dot, before the extension
        with tarfile.open(tar_path) as tar:
            names = tar.getnames()
        assert all(name.count(".") == 1 and "/" not in name for name in names)
        assert len({n.split(".")[0] for n in names}) * 2 == len(names)  # image + json per key
    web_tar = next(t for t in tars if t.parent.name == "web")
    member, data = read_webdataset_sample(web_tar, rows["m2"]["image_id"])
    assert member.endswith(".png")
    upright = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), np.int16)
    assert np.array_equal(upright, pixels(base / "scratch" / "m2.png"))

    stamps = {t: t.stat().st_mtime_ns for t in tars}
    again = export_webdataset(plan, out, shard_max_count=3, prefix="cur")
    assert (again.written, again.skipped) == (0, len(rows))
    assert {t: t.stat().st_mtime_ns for t in tars} == stamps  # finished shards are not rewritten

    kept = plan.filter(pl.col("split") == "train").head(4)  # a smaller plan: stale shards go away
    smaller = export_webdataset(kept, out, shard_max_count=3, prefix="cur")
    left = sorted((out / "train").glob("cur-*.tar"))
    assert [Path(p) for p in smaller.files] == left and len(left) == 2
    assert sorted(read_webdataset_ids(left)) == sorted(kept["image_id"])


def test_webdataset_shards_respect_the_byte_budget(tmp_path: Path, dataset) -> None:
    _, rows = dataset
    plain = [r for name, r in rows.items() if name not in FIXED and r["split"] == "train"]
    budget = 3 * max(r["size_bytes"] for r in plain) + 6 * 1024
    summary = export_webdataset(plan_frame(plain), tmp_path / "wds", shard_max_bytes=budget)
    assert len(summary.files) >= 2
    assert all(Path(p).stat().st_size <= budget + 1024 * 10 for p in summary.files)  # tar end blocks
    assert sorted(read_webdataset_ids(summary.files)) == sorted(r["image_id"] for r in plain)


def test_hardlinks_across_filesystems_fail_with_advice(tmp_path: Path, dataset, monkeypatch) -> None:
    _, rows = dataset

    def cross_device(self: Path, target: Path) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link", str(self))

    monkeypatch.setattr(Path, "hardlink_to", cross_device)
    with pytest.raises(ExportError, match=r"same filesystem.*'copy'"):
        export_tree(plan_frame([rows["a"]]), tmp_path / "out", "hardlink")


def test_webdataset_export_never_writes_over_a_source_tar(tmp_path: Path, dataset) -> None:
    base, rows = dataset
    source_tar = base / "wds" / "shard-000000.tar"  # named like an output shard
    before = (base / "wds" / "shard-0.tar").read_bytes()
    source_tar.write_bytes(before)
    plan = plan_frame([{**rows["m1"], "split": "wds", "source_path": str(source_tar)}])
    with pytest.raises(ExportError, match="source tar"):
        export_webdataset(plan, base, prefix="shard", shard_max_count=1)
    assert source_tar.read_bytes() == before
