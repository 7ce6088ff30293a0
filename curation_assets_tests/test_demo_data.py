"""The demo generator: files and ground truth agree, every planted case is there and right."""

from __future__ import annotations

import hashlib
import io
import json
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image, ImageOps

from curation_assets.core.ingest.formats import FORMAT_EXTENSIONS, classify_file, extension_of
from curation_assets.demo.pool import (
    CATEGORIES,
    DEFECT_EXPECTATIONS,
    EXAMPLES_PER_CATEGORY,
    GROUND_TRUTH_SCHEMA,
    KINDS,
    generate_demo,
)

N_IMAGES = 200
N_SHARDS = 2


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "ground_truth.parquet"
    }


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("demo")
    calls: list[tuple[int, int]] = []
    summary = generate_demo(
        out, n_images=N_IMAGES, n_shards=N_SHARDS, seed=0, progress=lambda d, t: calls.append((d, t))
    )
    gt = pl.read_parquet(summary.ground_truth_path)
    return summary, gt, calls


def _rows(gt: pl.DataFrame, **where: str) -> list[dict]:
    frame = gt
    for column, value in where.items():
        frame = frame.filter(pl.col(column) == value)
    return frame.to_dicts()


def _read(summary, image_id: str) -> bytes:
    return (summary.images_root / image_id).read_bytes()


def _open(summary, image_id: str) -> Image.Image:
    im = Image.open(io.BytesIO(_read(summary, image_id)))
    im.load()
    return im


# ----------------------------------------------------------------------------- table and files


def test_one_row_per_file(demo):
    summary, gt, _ = demo
    files = {str(p.relative_to(summary.images_root)) for p in summary.images_root.rglob("*") if p.is_file()}
    assert gt["image_id"].n_unique() == gt.height == len(files) == N_IMAGES == summary.n_files
    assert set(gt["image_id"]) == files
    assert dict(gt.schema) == GROUND_TRUTH_SCHEMA
    assert gt["image_id"].to_list() == sorted(gt["image_id"])
    assert all(i.split("/")[0] == s for i, s in zip(gt["image_id"], gt["shard"], strict=True))
    assert set(gt["shard"]) == {f"shard-{k:02d}" for k in range(N_SHARDS)}
    assert (summary.out_dir / ".complete").is_file()


def test_every_kind_and_defect_present(demo):
    summary, gt, _ = demo
    assert set(gt["kind"]) == set(KINDS)
    assert summary.counts == {k: gt.filter(pl.col("kind") == k).height for k in KINDS}
    assert sum(summary.counts.values()) == N_IMAGES
    defects = gt.filter(pl.col("kind") == "defect")
    assert set(defects["transform"]) == set(DEFECT_EXPECTATIONS)
    for name in ("too_large", "file_too_large"):
        assert defects.filter(pl.col("transform") == name).height == 1
    for row in defects.to_dicts():
        status, reasons = DEFECT_EXPECTATIONS[row["transform"]]
        assert row["expected_status"] == status
        assert row["expected_reasons"] == sorted(reasons)
    near = set(gt.filter(pl.col("kind") == "near_duplicate")["transform"])
    assert near == {"resize", "jpeg", "crop", "brightness_contrast", "text", "hflip"}
    assert set(gt.filter(pl.col("kind") == "pixel_copy")["transform"]) == {
        "png_to_bmp",
        "png_recompress",
        "comment_segment",
    }
    assert set(gt.filter(pl.col("kind") == "unwanted")["category"]) == set(CATEGORIES)
    assert set(gt.filter(pl.col("kind") == "quality")["quality_issue"]) == {"blur", "dark", "bright"}
    assert set(gt.filter(pl.col("kind") == "rotated_copy")["rotation"]) == {90, 180, 270}
    # every kind is spread over the shards
    for kind in ("base", "near_duplicate", "defect"):
        assert gt.filter(pl.col("kind") == kind)["shard"].n_unique() == N_SHARDS
    # some copies lie in another shard than their source
    copies = gt.filter(pl.col("source_id").is_not_null())
    assert (copies["shard"] != copies["source_id"].str.split("/").list.first()).any()


def test_statuses_and_reasons_are_consistent(demo):
    _, gt, _ = demo
    for row in gt.to_dicts():
        assert row["expected_reasons"] == sorted(row["expected_reasons"])
        assert (row["expected_status"] == "ok") == (row["expected_reasons"] == [])
        if row["kind"] in ("base", "byte_copy", "pixel_copy", "near_duplicate", "rotated_copy", "quality"):
            assert row["expected_status"] == "ok"
        if row["kind"] == "exif_rotated":
            assert (row["expected_status"], row["expected_reasons"]) == ("fixable", ["exif_orientation"])
        if row["kind"] == "non_image":
            assert (row["expected_status"], row["expected_reasons"]) == ("rejected", ["not_an_image"])
        assert (row["rotation"] != 0) == (row["kind"] == "rotated_copy")
        assert (row["category"] is not None) == (row["kind"] == "unwanted")


def test_file_names_do_not_reveal_the_kind(demo):
    _, gt, _ = demo
    for row in gt.filter(pl.col("kind") != "non_image").to_dicts():
        name = row["image_id"].split("/")[1]
        assert name.startswith("img_") and name[4:10].isdigit()


def _judge(name: str, data: bytes) -> tuple[list[str], tuple[int, int] | None]:
    """A minimal reference sanitizer with the default rules (for checking the ground truth)."""
    real, reason = classify_file(name, len(data), data[:32])
    if reason is not None:
        return [str(reason)], None
    if real not in ("JPEG", "PNG", "WEBP", "TIFF", "BMP", "GIF"):
        return ["unsupported_format"], None
    reasons = []
    if extension_of(name) not in FORMAT_EXTENSIONS[real]:
        reasons.append("extension_mismatch")
    if len(data) > 10 * 1024 * 1024:
        reasons.append("file_too_large")
    try:
        im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        return ["decompression_bomb"], None
    w, h = im.size
    if w * h > 89478485:
        return ["decompression_bomb"], (w, h)
    try:
        im.load()
    except OSError as exc:
        return ["truncated" if "truncated" in str(exc) else "decode_error"], (w, h)
    if getattr(im, "n_frames", 1) > 1:
        reasons.append("multi_frame")
    mode_reason = {"CMYK": "mode_cmyk", "P": "mode_palette", "LA": "mode_alpha", "RGBA": "mode_alpha"}
    if im.mode in mode_reason:
        reasons.append(mode_reason[im.mode])
    elif im.mode.startswith("I") or im.mode == "F":
        reasons.append("mode_high_bit_depth")
    elif im.mode not in ("RGB", "L"):
        reasons.append("mode_other")
    if "transparency" in im.info:
        reasons.append("mode_alpha")
    orientation = im.getexif().get(0x0112, 1)
    if orientation != 1:
        reasons.append("exif_orientation")
        if orientation in (5, 6, 7, 8):
            w, h = h, w
    if w < 80 or h < 80:
        reasons.append("too_small")
    if w > 3200 or h > 3200:
        reasons.append("too_large")
    if not 0.15 <= w / h <= 6.667:
        reasons.append("aspect_ratio")
    return sorted(reasons), (w, h)


def _png_size(data: bytes) -> tuple[int, int]:
    return struct.unpack(">II", data[16:24])


def test_reference_sanitizer_agrees_with_ground_truth(demo):
    summary, gt, _ = demo
    for row in gt.to_dicts():
        reasons, size = _judge(row["image_id"], _read(summary, row["image_id"]))
        assert reasons == row["expected_reasons"], row
        if size is not None and row["kind"] != "rotated_copy":
            assert size == (row["width"], row["height"]), row


# ----------------------------------------------------------------------------- copies


def test_byte_copies_are_identical(demo):
    summary, gt, _ = demo
    rows = _rows(gt, kind="byte_copy")
    assert rows
    for row in rows:
        assert _read(summary, row["image_id"]) == _read(summary, row["source_id"])


def test_pixel_copies_decode_the_same(demo):
    summary, gt, _ = demo
    for row in _rows(gt, kind="pixel_copy"):
        assert _read(summary, row["image_id"]) != _read(summary, row["source_id"])
        a = np.asarray(_open(summary, row["image_id"]))
        b = np.asarray(_open(summary, row["source_id"]))
        assert a.shape == b.shape and np.array_equal(a, b), row["transform"]


def test_derivatives_reference_a_base(demo):
    summary, gt, _ = demo
    kind_of = dict(zip(gt["image_id"], gt["kind"], strict=True))
    derived = gt.filter(
        pl.col("kind").is_in(["byte_copy", "pixel_copy", "near_duplicate", "rotated_copy", "quality"])
    )
    assert derived["source_id"].null_count() == 0
    for row in derived.to_dicts():
        assert kind_of[row["source_id"]] == "base"
        assert min(row["width"], row["height"]) > 80
    others = gt.filter(
        ~pl.col("kind").is_in(["byte_copy", "pixel_copy", "near_duplicate", "rotated_copy", "quality"])
    )
    assert others["source_id"].null_count() == others.height
    for row in _rows(gt, kind="near_duplicate"):
        im = _open(summary, row["image_id"])
        assert im.size == (row["width"], row["height"])
        src = _open(summary, row["source_id"])
        if row["transform"] == "hflip":
            src = src.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if row["transform"] in ("jpeg", "hflip", "text", "resize"):
            a = np.asarray(im.convert("L").resize((32, 32)), np.float32)
            b = np.asarray(src.convert("L").resize((32, 32)), np.float32)
            assert np.abs(a - b).mean() < 12, row


def test_rotated_copies_turn_back_to_their_source(demo):
    summary, gt, _ = demo
    for row in _rows(gt, kind="rotated_copy"):
        stored = _open(summary, row["image_id"])
        src = _open(summary, row["source_id"])
        assert src.size == (row["width"], row["height"])
        # rotation = degrees clockwise; np.rot90 with k>0 turns counter-clockwise
        upright = np.rot90(np.asarray(stored), k=row["rotation"] // 90)
        assert upright.shape == np.asarray(src).shape
        diff = np.abs(upright.astype(np.float32) - np.asarray(src, np.float32)).mean()
        assert diff < (0.01 if row["image_id"].endswith(".png") else 6), row


def test_exif_rotated_become_upright(demo):
    summary, gt, _ = demo
    rows = _rows(gt, kind="exif_rotated")
    assert {r["transform"] for r in rows} == {
        "exif_orientation_3",
        "exif_orientation_6",
        "exif_orientation_8",
    }
    for row in rows:
        im = _open(summary, row["image_id"])
        orientation = im.getexif().get(0x0112)
        assert orientation == int(row["transform"].rsplit("_", 1)[1])
        upright = ImageOps.exif_transpose(im)
        assert upright.size == (row["width"], row["height"])
        if orientation in (6, 8):  # stored turned by a quarter: width and height swap
            assert im.size == (row["height"], row["width"])
        else:
            assert im.size == (row["width"], row["height"])


def test_quality_conditions(demo):
    summary, gt, _ = demo
    for row in _rows(gt, kind="quality"):
        bright = np.asarray(_open(summary, row["image_id"]).convert("L"), np.float32) / 255
        if row["quality_issue"] == "dark":
            assert np.percentile(bright, 99) < 0.32
        elif row["quality_issue"] == "bright":
            assert np.percentile(bright, 5) > 0.95
        else:  # a strong blur removes most of the fine detail
            src = np.asarray(_open(summary, row["source_id"]).convert("L"), np.float32) / 255
            assert _laplacian_var(bright) < 0.25 * _laplacian_var(src)


def _laplacian_var(g: np.ndarray) -> float:
    lap = g[1:-1, :-2] + g[1:-1, 2:] + g[:-2, 1:-1] + g[2:, 1:-1] - 4 * g[1:-1, 1:-1]
    return float(lap.var())


# ----------------------------------------------------------------------------- defects


def test_defect_files(demo):
    summary, gt, _ = demo
    by = {}
    for row in _rows(gt, kind="defect"):
        by.setdefault(row["transform"], []).append(row)
    for row in by["bomb"]:
        data = _read(summary, row["image_id"])
        assert len(data) < 4096
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
        assert _png_size(data) == (20000, 20000) == (row["width"], row["height"])
        assert struct.unpack(">I", data[29:33])[0] == zlib.crc32(data[12:29])
    for row in by["zero_byte"]:
        assert _read(summary, row["image_id"]) == b""
    for row in by["truncated"]:
        with pytest.raises(OSError, match="truncated"):
            _open(summary, row["image_id"])
    for row in by["file_too_large"]:
        assert (summary.images_root / row["image_id"]).stat().st_size > 10 * 1024 * 1024
    assert _open(summary, by["too_large"][0]["image_id"]).size == (3600, 900)
    for row in by["animated"]:
        im = Image.open(summary.images_root / row["image_id"])
        assert im.mode == "P" and im.n_frames >= 3 and "transparency" not in im.info
    for row in by["sixteen_bit"]:
        arr = np.asarray(_open(summary, row["image_id"]))
        assert arr.min() == 0 and arr.max() == 65535
    assert {_open(summary, r["image_id"]).mode for r in by["cmyk"]} == {"CMYK"}
    assert {_open(summary, r["image_id"]).mode for r in by["palette"]} == {"P"}
    assert {_open(summary, r["image_id"]).mode for r in by["alpha"]} <= {"LA", "RGBA"}
    assert {_open(summary, r["image_id"]).format for r in by["unsupported"]} == {"PPM"}
    assert {_open(summary, r["image_id"]).format for r in by["png_as_jpg"]} == {"PNG"}
    assert {_open(summary, r["image_id"]).format for r in by["jpg_as_png"]} == {"JPEG"}


def test_no_unplanned_duplicates(demo):
    summary, gt, _ = demo
    planned = set(gt.filter(pl.col("kind") == "byte_copy")["image_id"])
    seen: dict[str, str] = {}
    for row in gt.filter(pl.col("transform").fill_null("") != "zero_byte").to_dicts():
        digest = hashlib.sha256(_read(summary, row["image_id"])).hexdigest()
        if digest in seen:
            assert row["image_id"] in planned or seen[digest] in planned, row
        seen.setdefault(digest, row["image_id"])


def test_examples(demo):
    summary, _, _ = demo
    for cat in CATEGORIES:
        files = sorted((summary.examples_root / cat).iterdir())
        assert len(files) == EXAMPLES_PER_CATEGORY
        assert len({hashlib.sha256(f.read_bytes()).hexdigest() for f in files}) == len(files)
        for f in files:
            with Image.open(f) as im:
                assert im.mode == "RGB" and min(im.size) >= 80


def test_progress(demo):
    _, _, calls = demo
    assert calls[0][0] == 0 and calls[-1][0] == calls[-1][1] == N_IMAGES + 3 * EXAMPLES_PER_CATEGORY
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)


# ----------------------------------------------------------------------------- runs


def test_same_seed_same_bytes(demo, tmp_path):
    summary, gt, _ = demo
    again = generate_demo(tmp_path / "again", n_images=N_IMAGES, n_shards=N_SHARDS, seed=0, workers=1)
    assert _hashes(again.out_dir) == _hashes(summary.out_dir)
    assert pl.read_parquet(again.ground_truth_path).equals(gt)


def test_second_call_is_a_no_op(demo):
    summary, _, _ = demo
    before = {p: p.stat().st_mtime_ns for p in summary.out_dir.rglob("*") if p.is_file()}
    calls: list[tuple[int, int]] = []
    again = generate_demo(
        summary.out_dir,
        n_images=N_IMAGES,
        n_shards=N_SHARDS,
        seed=0,
        progress=lambda d, t: calls.append((d, t)),
    )
    assert again == summary
    assert calls == []
    assert {p: p.stat().st_mtime_ns for p in summary.out_dir.rglob("*") if p.is_file()} == before


def test_stale_output_is_replaced_and_other_seed_differs(demo, tmp_path):
    summary, gt, _ = demo
    out = tmp_path / "stale"
    (out / "images" / "shard-00").mkdir(parents=True)
    (out / "images" / "shard-00" / "leftover.jpg").write_bytes(b"old")
    (out / "keep.txt").write_text("not ours")
    (out / ".complete").write_text(json.dumps({"seed": 99}))
    other = generate_demo(out, n_images=N_IMAGES, n_shards=N_SHARDS, seed=1)
    assert (out / "keep.txt").read_text() == "not ours"
    assert not (out / "images" / "shard-00" / "leftover.jpg").exists()
    assert json.loads((out / ".complete").read_text())["seed"] == 1
    mine, theirs = _hashes(summary.out_dir / "images"), _hashes(other.images_root)
    shared = set(mine) & set(theirs)
    assert sum(mine[k] == theirs[k] for k in shared) < len(shared) * 0.05  # zero-byte files may match
    assert not pl.read_parquet(other.ground_truth_path).equals(gt)


def test_webdataset_layout(demo, tmp_path):
    summary, gt, _ = demo
    wds = generate_demo(tmp_path / "wds", n_images=N_IMAGES, n_shards=N_SHARDS, seed=0, layout="webdataset")
    assert pl.read_parquet(wds.ground_truth_path).equals(gt)
    entries = sorted(wds.images_root.iterdir())
    assert [p.name for p in entries] == [f"shard-{k:02d}.tar" for k in range(N_SHARDS)]
    ids = []
    for tar_path in entries:
        with tarfile.open(tar_path) as tar:
            members = tar.getmembers()
            names = [m.name for m in members]
            assert names == sorted(names) and all("/" not in n for n in names)
            for m in members:
                assert m.isfile() and m.mtime == 0 and m.uid == 0 and m.gid == 0
                image_id = f"{tar_path.stem}/{m.name}"
                assert tar.extractfile(m).read() == _read(summary, image_id)
                ids.append(image_id)
    assert sorted(ids) == gt["image_id"].to_list()
    assert _hashes(wds.examples_root) == _hashes(summary.examples_root)


def test_too_few_images_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="too small"):
        generate_demo(tmp_path / "tiny", n_images=20)
