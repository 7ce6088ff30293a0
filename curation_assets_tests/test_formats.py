"""Formats users ask for: HEIC/HEIF and AVIF once a reader is installed, PPM/PGM/PBM when listed,
and an unsupported_format message that says what would read the file. Files are built here."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, features

from curation_assets.config import ProjectConfigError, load_project_dict
from curation_assets.core.ingest import formats
from curation_assets.core.ingest.formats import sniff_format
from curation_assets.core.ingest.images import load_rgb
from curation_assets.core.ingest.sanitize import check_image


def rules(allowed: list[str] | None = None):
    stages = {"sanitize": {"allowed_formats": allowed}} if allowed else {}
    return load_project_dict({"name": "x", "dataset": {"roots": "/tmp"}, "stages": stages}).stages.sanitize


def picture(mode: str = "RGB", size: tuple[int, int] = (120, 90)) -> Image.Image:
    rng = np.random.default_rng(0)
    low = Image.fromarray(rng.integers(0, 255, size=(6, 8, 3), dtype=np.uint8))
    return low.resize(size, Image.Resampling.BICUBIC).convert(mode)


def encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("mode", "name", "magic"), [("RGB", "a.ppm", b"P6"), ("L", "a.pgm", b"P5"), ("1", "a.pbm", b"P4")]
)
def test_netpbm_is_accepted_when_listed_and_refused_with_a_hint_otherwise(mode, name, magic):
    data = encode(picture(mode), "PPM")
    assert data[:2] == magic and sniff_format(data[:32]) == "PPM"
    listed = check_image(data, name, rules(["jpg", "png", "ppm", "pgm", "pbm"]))
    # accepted: a 1-bit PBM is fixable (converted to RGB like any bilevel image), the others ok
    assert listed["status"] == ("fixable" if mode == "1" else "ok"), listed
    assert "unsupported_format" not in listed["reasons"]
    assert (listed["format"], listed["width"], listed["height"]) == ("PPM", 120, 90)
    refused = check_image(data, name, rules())  # the packaged default list has no netpbm
    assert refused["status"] == "rejected" and refused["reasons"] == ["unsupported_format"]
    assert "add ppm or pgm or pbm or pnm to sanitize.allowed_formats" in refused["detail"]


def test_unknown_allowed_format_names_the_accepted_values():
    with pytest.raises(ProjectConfigError, match="unknown formats \\['jxl'\\]"):
        rules(["jpg", "jxl"])


def test_heic_is_read_and_allowed_by_default_once_pillow_heif_is_installed():
    pytest.importorskip("pillow_heif", reason="the formats extra (pillow-heif) is not installed")
    data = encode(picture(), "HEIF")
    assert sniff_format(data[:32]) == "HEIF"
    row = check_image(data, "phone.heic", rules())
    assert (row["status"], row["format"], row["width"], row["height"]) == ("ok", "HEIF", 120, 90)
    assert load_rgb(data).size == (120, 90)


def test_avif_is_read_and_allowed_by_default_once_a_reader_is_installed():
    if not (features.check("avif") or formats.find_spec("pillow_avif")):
        pytest.skip("no AVIF reader: Pillow < 11.3 without the formats extra")
    data = encode(picture(), "AVIF")
    assert sniff_format(data[:32]) == "AVIF"
    row = check_image(data, "web.avif", rules())
    assert (row["status"], row["format"], row["width"], row["height"]) == ("ok", "AVIF", 120, 90)


def test_heif_brands_are_told_apart_from_avif():
    def ftyp(major: bytes, *compatible: bytes) -> bytes:
        body = b"ftyp" + major + b"\x00\x00\x00\x00" + b"".join(compatible)
        return (len(body) + 4).to_bytes(4, "big") + body

    assert sniff_format(ftyp(b"heic", b"mif1", b"heic")) == "HEIF"
    assert sniff_format(ftyp(b"mif1", b"mif1", b"heic")) == "HEIF"
    assert sniff_format(ftyp(b"avif", b"mif1", b"avif")) == "AVIF"
    assert sniff_format(ftyp(b"mif1", b"mif1", b"avif")) == "AVIF"
    assert sniff_format(ftyp(b"isom", b"mp41")) is None  # an MP4 video is no image


def test_without_a_reader_the_refusal_names_the_extra(monkeypatch):
    data = encode(picture(), "HEIF") if formats.find_spec("pillow_heif") else None
    # A machine without pillow-heif: its module cannot be found.
    real_find_spec = formats.find_spec
    monkeypatch.setattr(
        formats, "find_spec", lambda name: None if name == "pillow_heif" else real_find_spec(name)
    )
    assert "HEIF" not in formats.allowed_real_formats(("jpg", "heic"))
    detail = formats.unsupported_format_detail("HEIF", ("jpg", "heic"))
    assert "pip install 'curation_assets[formats]'" in detail and "pillow-heif" in detail
    if data is not None:
        row = check_image(data, "phone.heic", rules(["jpg", "heic"]))
        assert row["status"] == "rejected" and row["reasons"] == ["unsupported_format"]
        assert "curation_assets[formats]" in row["detail"]
