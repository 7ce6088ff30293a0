"""Sanitize checks, the shared read path and the pooled runner, on files built here."""

from __future__ import annotations

import io
import os
import struct
import tarfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image

from curation_assets.config import SanitizeStage, load_project_dict
from curation_assets.core import pool
from curation_assets.core.ingest import sanitize
from curation_assets.core.ingest.images import ImageReadError, load_rgb, normalize_image, read_bytes
from curation_assets.core.ingest.sanitize import (
    CHECKS,
    ROW_COLUMNS,
    SanitizeItem,
    check_image,
    row_schema,
    sanitize_items,
)
from curation_assets.core.outputs.reasons import Reason


@pytest.fixture(scope="module")
def rules() -> SanitizeStage:
    return load_project_dict({"name": "x", "dataset": {"roots": "/tmp"}}).stages.sanitize


def photo(width: int = 200, height: int = 150, seed: int = 0) -> Image.Image:
    """A smooth random RGB picture (JPEG-friendly, distinct per seed)."""
    rng = np.random.default_rng(seed)
    low = rng.integers(0, 255, size=(6, 8, 3), dtype=np.uint8)
    return Image.fromarray(low).resize((width, height), Image.Resampling.BICUBIC)


def encode(im: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    im.save(buffer, fmt, **params)
    return buffer.getvalue()


def png_chunk(tag: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))


def exif_bytes(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


def assert_row(row: dict, status: str, reasons: list[str], fixes: list[str] | None = None) -> None:
    assert list(row) == list(ROW_COLUMNS)
    assert row["status"] == status, row
    assert row["reasons"] == reasons, row
    if fixes is not None:
        assert row["fixes"] == fixes, row


# ----------------------------------------------------------------------------- file-level reasons


def test_clean_jpeg_is_ok(rules):
    data = encode(photo(), "JPEG", quality=90)
    row = check_image(data, "clean.jpg", rules)
    assert_row(row, "ok", [], [])
    assert row["detail"] is None
    assert (row["format"], row["width"], row["height"], row["mode"]) == ("JPEG", 200, 150, "RGB")
    assert (row["n_frames"], row["exif_orientation"], row["file_size"]) == (1, None, len(data))
    assert isinstance(row["pixel_hash"], str) and len(row["pixel_hash"]) == 32
    grey = check_image(encode(photo().convert("L"), "JPEG"), "grey.jpeg", rules)
    assert_row(grey, "ok", [], [])
    assert grey["mode"] == "L"


@pytest.mark.parametrize(
    ("name", "data", "reason"),
    [
        ("empty.jpg", b"", "empty_file"),
        ("garbage.jpg", b"this is not a picture at all" * 10, "unrecognized_format"),
        ("notes.txt", b"a caption", "not_an_image"),
    ],
)
def test_files_that_are_no_image_are_rejected_without_decoding(rules, name, data, reason):
    row = check_image(data, name, rules)
    assert_row(row, "rejected", [reason], [])
    assert row["format"] is None and row["width"] is None and row["pixel_hash"] is None
    assert row["file_size"] == len(data)


def test_truncated_jpeg(rules):
    data = encode(photo(400, 300), "JPEG", quality=90)
    row = check_image(data[: len(data) // 2], "cut.jpg", rules)
    assert_row(row, "rejected", ["truncated"], [])
    assert "truncated" in row["detail"]
    assert (row["width"], row["height"]) == (400, 300)  # the header still tells the size
    assert row["pixel_hash"] is None
    # Cut inside the header: still truncated, never an exception.
    assert check_image(data[:40], "cut.jpg", rules)["reasons"] == ["truncated"]


def test_broken_data_is_a_decode_error(rules):
    noise = Image.fromarray(np.random.default_rng(2).integers(0, 255, (150, 200, 3), np.uint8))
    data = bytearray(encode(noise, "PNG"))
    start = data.index(b"IDAT") + 14
    data[start : start + 200] = bytes(200)  # the compressed pixel stream no longer inflates
    row = check_image(bytes(data), "broken.png", rules)
    assert_row(row, "rejected", ["decode_error"], [])
    assert row["detail"].startswith("decode: ") and (row["width"], row["height"]) == (200, 150)
    header = bytearray(encode(noise, "PNG"))
    header[29:33] = b"\x00\x00\x00\x00"  # IHDR's CRC no longer matches
    row = check_image(bytes(header), "broken.png", rules)
    assert_row(row, "rejected", ["decode_error"], [])
    assert row["detail"].startswith("header: ") and row["width"] is None


@pytest.mark.parametrize(
    ("fmt", "name", "fix"),
    [
        ("PNG", "really_png.jpg", "rename_extension:png"),
        ("JPEG", "really_jpeg.png", "rename_extension:jpg"),
        ("JPEG", "no_extension", "rename_extension:jpg"),
        ("WEBP", "really_webp.jpeg", "rename_extension:webp"),
    ],
)
def test_extension_mismatch_is_fixed_by_renaming(rules, fmt, name, fix):
    row = check_image(encode(photo(), fmt), name, rules)
    assert_row(row, "fixable", ["extension_mismatch"], [fix])
    assert row["pixel_hash"] is not None


def test_unsupported_format_reports_header_size(rules):
    row = check_image(encode(photo(120, 90), "PPM"), "image.ppm", rules)
    assert_row(row, "rejected", ["unsupported_format"], [])
    assert (row["format"], row["width"], row["height"]) == ("PPM", 120, 90)
    assert row["pixel_hash"] is None


def test_decompression_bomb_is_rejected_from_the_header(rules):
    header = struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0)
    data = (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + png_chunk(b"IEND", b"")
    )
    limit_before = Image.MAX_IMAGE_PIXELS
    started = time.perf_counter()
    row = check_image(data, "bomb.png", rules)
    assert time.perf_counter() - started < 1.0
    assert_row(row, "rejected", ["decompression_bomb"], [])
    assert (row["width"], row["height"], row["pixel_hash"]) == (20000, 20000, None)
    assert limit_before == Image.MAX_IMAGE_PIXELS  # Pillow's global guard is restored


def test_file_too_large(rules):
    data = encode(Image.fromarray(np.random.default_rng(1).integers(0, 255, (100, 100, 3), np.uint8)), "PNG")
    small = rules.model_copy(update={"max_file_size_mb": 0.01})  # 10 KB
    assert len(data) > small.max_file_bytes
    assert_row(check_image(data, "big.png", small), "fixable", ["file_too_large"], ["recompress:webp:80"])
    strict = small.model_copy(update={"file_too_large_action": "reject", "recompress_quality": 70})
    assert_row(check_image(data, "big.png", strict), "rejected", ["file_too_large"], [])


# ----------------------------------------------------------------------------- geometry


def test_too_small(rules):
    row = check_image(encode(photo(40, 60), "JPEG"), "tiny.jpg", rules)
    assert_row(row, "rejected", ["too_small"], [])
    assert row["detail"] == "40x60 < min 80x80"


def test_panorama_aspect_ratio(rules):
    row = check_image(encode(photo(1600, 200), "JPEG"), "pano.jpg", rules)
    assert_row(row, "rejected", ["aspect_ratio"], [])
    assert row["detail"] == "1600x200 aspect 8.00 > 6.667"
    tall = check_image(encode(photo(100, 800), "JPEG"), "tall.jpg", rules)
    assert tall["reasons"] == ["aspect_ratio"] and "< 0.15" in tall["detail"]


def test_too_large_is_resized_or_rejected(rules):
    data = encode(photo(300, 200), "JPEG")
    capped = rules.model_copy(update={"max_width": 250, "max_height": 240})
    assert_row(check_image(data, "big.jpg", capped), "fixable", ["too_large"], ["resize_max_side:250"])
    strict = capped.model_copy(update={"too_large_action": "reject"})
    assert_row(check_image(data, "big.jpg", strict), "rejected", ["too_large"], [])
    # The packaged default (3200) on a real 3300 px wide image.
    wide = check_image(encode(Image.new("RGB", (3300, 1000), (9, 9, 9)), "JPEG"), "wide.jpg", rules)
    assert_row(wide, "fixable", ["too_large"], ["resize_max_side:3200"])


# ----------------------------------------------------------------------------- pixel layout


def test_cmyk_jpeg(rules):
    row = check_image(encode(photo().convert("CMYK"), "JPEG"), "print.jpg", rules)
    assert_row(row, "fixable", ["mode_cmyk"], ["convert_rgb"])
    assert row["mode"] == "CMYK" and row["pixel_hash"] is not None


def test_palette_png(rules):
    row = check_image(encode(photo().convert("P"), "PNG"), "palette.png", rules)
    assert_row(row, "fixable", ["mode_palette"], ["convert_rgb"])


def test_sixteen_bit_png_keeps_its_contrast(rules):
    ramp = np.tile(np.linspace(0, 65535, 256).astype(np.uint16), (100, 1))
    data = encode(Image.fromarray(ramp), "PNG")
    row = check_image(data, "deep.png", rules)
    assert_row(row, "fixable", ["mode_high_bit_depth"], ["convert_rgb"])
    assert row["mode"].startswith("I")
    upright = np.asarray(normalize_image(Image.open(io.BytesIO(data))))
    assert upright.shape == (100, 256, 3) and upright.dtype == np.uint8
    assert upright.min() == 0 and upright.max() == 255
    assert 120 <= upright[0, 128, 0] <= 135  # mid-grey stays mid-grey (not clipped to white)


def test_float_and_int_modes_are_rescaled():
    ramp = np.linspace(0.0, 1.0, 256, dtype=np.float32)[None, :].repeat(4, axis=0)
    out = np.asarray(normalize_image(Image.fromarray(ramp)))
    assert out.min() == 0 and out.max() == 255
    wide = (np.arange(256, dtype=np.int32)[None, :] * 100000 - 5).repeat(4, axis=0)  # beyond 16 bits
    out = np.asarray(normalize_image(Image.fromarray(wide)))
    assert out.min() == 0 and out.max() == 255


def test_alpha_png_is_composited_on_white(rules):
    grey = np.zeros((100, 120), np.uint8)
    alpha = np.zeros((100, 120), np.uint8)
    alpha[:, :60] = 255  # left half opaque black, right half fully transparent
    la = Image.fromarray(np.dstack([grey, alpha]), "LA")
    data = encode(la, "PNG")
    row = check_image(data, "alpha.png", rules)
    assert_row(row, "fixable", ["mode_alpha"], ["convert_rgb"])
    out = np.asarray(normalize_image(Image.open(io.BytesIO(data))))
    assert out[50, 10].tolist() == [0, 0, 0] and out[50, 110].tolist() == [255, 255, 255]
    rgba = check_image(encode(photo().convert("RGBA"), "PNG"), "rgba.png", rules)
    assert rgba["reasons"] == ["mode_alpha"]


def test_bilevel_and_other_modes(rules):
    assert check_image(encode(photo().convert("1"), "PNG"), "bw.png", rules)["reasons"] == ["mode_bilevel"]
    ycc = check_image(encode(photo().convert("YCbCr"), "TIFF"), "ycc.tif", rules)
    assert_row(ycc, "fixable", ["mode_other"], ["convert_rgb"])


def test_exif_orientation_swaps_the_displayed_size(rules):
    stored = photo(200, 120)
    stored.paste((255, 0, 0), (0, 0, 40, 40))  # a red block at the stored top-left
    data = encode(stored, "JPEG", quality=95, exif=exif_bytes(6))
    row = check_image(data, "phone.jpg", rules)
    assert_row(row, "fixable", ["exif_orientation"], ["exif_transpose"])
    assert (row["width"], row["height"], row["exif_orientation"]) == (120, 200, 6)
    upright = normalize_image(Image.open(io.BytesIO(data)))
    assert upright.size == (120, 200)
    # Orientation 6 is shown rotated 90° clockwise: the stored top-left lands top-right.
    red = np.asarray(upright)[10, 110].astype(int)
    assert red[0] > 200 and red[1] < 60 and red[2] < 60
    expected = np.asarray(stored.transpose(Image.Transpose.ROTATE_270)).astype(int)
    assert np.abs(np.asarray(upright).astype(int) - expected).mean() < 4
    # Same upright pixels, stored sideways with a tag or stored upright: one pixel hash.
    sideways = check_image(encode(stored, "PNG", exif=exif_bytes(6)), "sideways.png", rules)
    straight = check_image(encode(stored.transpose(Image.Transpose.ROTATE_270), "PNG"), "up.png", rules)
    assert sideways["pixel_hash"] == straight["pixel_hash"]
    assert check_image(encode(stored, "JPEG", exif=exif_bytes(1)), "a.jpg", rules)["exif_orientation"] == 1


def test_animated_gif_keeps_its_first_frame(rules):
    frames = [photo(seed=seed).convert("P") for seed in range(3)]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    row = check_image(data, "anim.gif", rules)
    assert_row(row, "fixable", ["mode_palette", "multi_frame"], ["first_frame", "convert_rgb"])
    assert row["n_frames"] == 3
    single = check_image(encode(frames[0], "GIF"), "still.gif", rules)
    assert single["pixel_hash"] == row["pixel_hash"]  # the hash is of the first frame


def test_fixes_follow_fix_order(rules):
    capped = rules.model_copy(update={"max_width": 150, "max_height": 150})
    data = encode(photo(200, 150).convert("CMYK"), "JPEG", exif=exif_bytes(3))
    row = check_image(data, "print.png", capped)
    assert row["reasons"] == ["exif_orientation", "extension_mismatch", "mode_cmyk", "too_large"]
    assert row["fixes"] == ["exif_transpose", "convert_rgb", "resize_max_side:150", "rename_extension:jpg"]


# ----------------------------------------------------------------------------- pixel hash


def test_pixel_hash_ignores_the_container(rules):
    im = photo(seed=3)
    png = check_image(encode(im, "PNG"), "a.png", rules)["pixel_hash"]
    assert check_image(encode(im, "BMP"), "a.bmp", rules)["pixel_hash"] == png
    assert check_image(encode(im, "TIFF"), "a.tif", rules)["pixel_hash"] == png
    assert check_image(encode(im.convert("RGBA"), "PNG"), "opaque.png", rules)["pixel_hash"] == png
    other = photo(seed=4)
    assert check_image(encode(other, "PNG"), "b.png", rules)["pixel_hash"] != png
    # Same bytes, another shape: the size is part of the hash.
    flat = Image.frombytes("RGB", (im.height, im.width), im.tobytes())
    assert check_image(encode(flat, "PNG"), "c.png", rules)["pixel_hash"] != png


def test_pixel_hash_ignores_jpeg_metadata(rules):
    data = encode(photo(seed=5), "JPEG", quality=90)
    comment = b"made by a test"
    with_comment = data[:2] + b"\xff\xfe" + struct.pack(">H", len(comment) + 2) + comment + data[2:]
    assert with_comment != data
    a, b = check_image(data, "a.jpg", rules), check_image(with_comment, "b.jpg", rules)
    assert a["status"] == b["status"] == "ok"
    assert a["pixel_hash"] == b["pixel_hash"]


def test_pixel_hash_matches_the_normalized_pixels(rules, monkeypatch):
    import xxhash

    def expected(im: Image.Image) -> str:
        return xxhash.xxh3_128(im.convert("RGB").tobytes() + b"%dx%d" % im.size).hexdigest()

    grey, colour = photo(seed=6).convert("L"), photo(301, 97, seed=7)
    assert check_image(encode(grey, "PNG"), "g.png", rules)["pixel_hash"] == expected(grey)
    assert check_image(encode(colour, "PNG"), "c.png", rules)["pixel_hash"] == expected(colour)

    def unavailable(im):
        raise AttributeError("no raw encoder")

    monkeypatch.setattr(sanitize, "_streamed_digest", unavailable)  # the tobytes() fallback
    assert check_image(encode(colour, "PNG"), "c.png", rules)["pixel_hash"] == expected(colour)


def test_unexpected_failure_becomes_decode_error(rules, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(sanitize, "normalize_image", boom)
    row = check_image(encode(photo().convert("P"), "PNG"), "a.png", rules)
    assert_row(row, "rejected", ["decode_error", "mode_palette"], [])
    assert "boom" in row["detail"] and row["pixel_hash"] is None


def test_check_registry_documents_each_check(rules):
    produced = {reason for check in CHECKS.values() for reason in check.reasons}
    assert produced == set(Reason) - {Reason.UNREADABLE}  # unreadable comes from the runner
    assert CHECKS["dimensions"].defaults(rules)["max_width"] == 3200
    assert CHECKS["aspect_ratio"].defaults(rules) == {"min_aspect_ratio": 0.15, "max_aspect_ratio": 6.667}


# ----------------------------------------------------------------------------- read path


def test_read_bytes_plain_and_tar_member(tmp_path: Path):
    data = encode(photo(), "JPEG")
    plain = tmp_path / "a.jpg"
    plain.write_bytes(data)
    assert read_bytes(str(plain), None, None) == data
    tar_path = tmp_path / "shard.tar"
    with tarfile.open(tar_path, "w") as tar:
        tar.add(plain, arcname="0001.jpg")
    with tarfile.open(tar_path) as tar:
        member = tar.getmember("0001.jpg")
    assert read_bytes(str(tar_path), member.offset_data, member.size) == data
    with pytest.raises(OSError, match="short read"):
        read_bytes(str(tar_path), tar_path.stat().st_size - 10, 100)


def test_load_rgb_draft_and_errors():
    big = photo(800, 600)
    data = encode(big, "JPEG")
    assert load_rgb(data).size == (800, 600)
    drafted = load_rgb(data, draft_size=(200, 150))
    assert drafted.mode == "RGB" and drafted.size == (200, 150)
    sideways = load_rgb(encode(big, "JPEG", exif=exif_bytes(6)), draft_size=(150, 200))
    assert sideways.size == (150, 200)
    cmyk = load_rgb(encode(big.convert("CMYK"), "JPEG"), draft_size=(200, 150))
    assert cmyk.mode == "RGB"
    with pytest.raises(ImageReadError, match="cannot open image"):
        load_rgb(b"not an image")
    with pytest.raises(ImageReadError, match="truncated"):
        load_rgb(data[: len(data) // 2])


# ----------------------------------------------------------------------------- the runner


def _write_pool(folder: Path, count: int) -> list[SanitizeItem]:
    items = []
    for index in range(count):
        path = folder / f"img_{index:03d}.jpg"
        path.write_bytes(encode(photo(100, 90, seed=index), "JPEG"))
        items.append(SanitizeItem(image_id=f"id{index:03d}", source_path=str(path), name=path.name))
    return items


@pytest.mark.parametrize("workers", [1, 2])
def test_runner_keeps_order_and_survives_bad_items(tmp_path, rules, monkeypatch, workers):
    items = _write_pool(tmp_path, 14)
    (tmp_path / "zero.jpg").write_bytes(b"")
    items.insert(3, SanitizeItem("missing", str(tmp_path / "gone.jpg"), name="gone.jpg"))
    items.insert(7, SanitizeItem("zero", str(tmp_path / "zero.jpg")))  # name taken from the path
    items.insert(9, SanitizeItem("folder", str(tmp_path), name="folder.jpg"))
    items.insert(11, SanitizeItem("past_end", str(tmp_path / "zero.jpg"), offset=512, size=100, name="m.jpg"))
    pools: list[int] = []
    real_start_pool = pool._start_pool

    def spy(n_workers):
        pools.append(n_workers)
        return real_start_pool(n_workers)

    monkeypatch.setattr(pool, "_start_pool", spy)
    calls: list[tuple[int, int, float]] = []
    config = rules.model_copy(update={"workers": workers, "chunk_size": 3, "max_in_flight": 1})
    rows = sanitize_items(items, config, progress=lambda *args: calls.append(args))

    assert [row["image_id"] for row in rows] == [item.image_id for item in items]
    assert pools == ([] if workers == 1 else [2])
    by_id = {row["image_id"]: row for row in rows}
    for bad in ("missing", "folder", "past_end"):
        assert by_id[bad]["status"] == "rejected" and by_id[bad]["reasons"] == ["unreadable"], by_id[bad]
    assert "Error" in by_id["missing"]["detail"]
    assert by_id["zero"]["reasons"] == ["empty_file"]
    good = [row for row in rows if row["image_id"].startswith("id")]
    assert len(good) == 14 and all(row["status"] == "ok" for row in good)
    assert len({row["pixel_hash"] for row in good}) == 14
    assert calls[-1][:2] == (len(items), len(items)) and [c[0] for c in calls] == sorted(c[0] for c in calls)
    assert all(rate > 0 for _, _, rate in calls)
    assert list(rows[0]) == ["image_id", *ROW_COLUMNS]
    frame = pl.DataFrame(rows, schema=row_schema())
    assert frame.height == len(items) and frame["reasons"].dtype == pl.List(pl.String)


def test_runner_matches_check_image_and_reads_tar_members(tmp_path, rules):
    items = _write_pool(tmp_path, 6)
    tar_path = tmp_path / "shard.tar"
    with tarfile.open(tar_path, "w") as tar:
        for item in items:
            tar.add(item.source_path, arcname=f"member/{item.name}")
    with tarfile.open(tar_path) as tar:
        members = tar.getmembers()
    in_tar = [
        SanitizeItem(f"tar{i}", str(tar_path), offset=m.offset_data, size=m.size, name=m.name)
        for i, m in enumerate(members)
    ]
    config = rules.model_copy(update={"workers": 2, "chunk_size": 2})
    rows = sanitize_items(items + in_tar, config)
    direct = [check_image(Path(item.source_path).read_bytes(), item.name, rules) for item in items]
    assert [{k: v for k, v in row.items() if k != "image_id"} for row in rows[:6]] == direct
    assert [row["pixel_hash"] for row in rows[6:]] == [row["pixel_hash"] for row in direct]
    assert sanitize_items([], config) == []


@dataclass(frozen=True, slots=True)
class _KillsItsWorker(SanitizeItem):
    """An item whose name kills any process but the test's own (a decoder segfault, say)."""

    test_pid: int = 0

    @property
    def display_name(self) -> str:
        if os.getpid() != self.test_pid:
            os._exit(3)
        return "killer.jpg"


def test_runner_survives_a_worker_crash(tmp_path, rules):
    items: list[SanitizeItem] = _write_pool(tmp_path, 8)
    killer = _KillsItsWorker("killer", items[0].source_path, name="killer.jpg", test_pid=os.getpid())
    items.insert(5, killer)
    config = rules.model_copy(update={"workers": 2, "chunk_size": 2, "max_in_flight": 2})
    rows = sanitize_items(items, config)
    assert [row["image_id"] for row in rows] == [item.image_id for item in items]
    assert rows[5]["reasons"] == ["decode_error"] and "died" in rows[5]["detail"]
    assert all(row["status"] == "ok" for i, row in enumerate(rows) if i != 5)
