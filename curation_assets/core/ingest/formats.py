"""What a file is, from its first bytes and its name: no decoding, no Pillow.

Inventory and sanitize both classify files with :func:`classify_file`, so a file is an
image or not for the same reason everywhere. Magic bytes decide the real format; the
extension only decides whether a file that is no known format was *meant* to be an image.
"""

from __future__ import annotations

from pathlib import PurePosixPath

from curation_assets.core.outputs.reasons import Reason

HEAD_BYTES = 32  # enough for every signature below

# Real format (Pillow's name) -> the extensions that honestly name it.
FORMAT_EXTENSIONS: dict[str, tuple[str, ...]] = {
    "JPEG": ("jpg", "jpeg", "jpe", "jfif"),
    "PNG": ("png", "apng"),
    "GIF": ("gif",),
    "WEBP": ("webp",),
    "TIFF": ("tif", "tiff"),
    "BMP": ("bmp", "dib"),
    "ICO": ("ico",),
    "PPM": ("ppm", "pgm", "pbm", "pnm"),
    "JPEG2000": ("jp2", "j2k", "jpf", "jpx"),
    "PSD": ("psd",),
    "HEIF": ("heic", "heif", "avif"),
    "TGA": ("tga",),
}

# Extensions that announce an image even when the bytes say otherwise (garbage, empty).
IMAGE_EXTENSIONS: frozenset[str] = frozenset(ext for exts in FORMAT_EXTENSIONS.values() for ext in exts)


def extension_of(name: str) -> str:
    """Lower-case extension without the dot ('' when there is none)."""
    return PurePosixPath(name).suffix.lower().lstrip(".")


def sniff_format(head: bytes) -> str | None:
    """The image format named by a file's first bytes, or None when no known image."""
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "TIFF"
    if head[:2] == b"BM" and len(head) >= 14:
        return "BMP"
    if head[:4] == b"\x00\x00\x01\x00":
        return "ICO"
    if len(head) >= 3 and head[0:1] == b"P" and head[1:2] in b"123456" and head[2:3] in b" \t\r\n":
        return "PPM"
    if head.startswith((b"\x00\x00\x00\x0cjP  ", b"\xffO\xffQ")):
        return "JPEG2000"
    if head[:4] == b"8BPS":
        return "PSD"
    if head[4:8] == b"ftyp" and head[8:12] in (b"heic", b"heix", b"mif1", b"msf1", b"avif", b"hevc"):
        return "HEIF"
    return None


def allowed_real_formats(allowed_extensions: tuple[str, ...]) -> frozenset[str]:
    """Real formats a project accepts: those with at least one allowed extension."""
    allowed = set(allowed_extensions)
    return frozenset(fmt for fmt, exts in FORMAT_EXTENSIONS.items() if allowed & set(exts))


def classify_file(name: str, size: int, head: bytes) -> tuple[str | None, Reason | None]:
    """(real format, reason it cannot be an image) for a file; reason None means 'try to decode'.

    A file is an image candidate when its bytes are a known image format, whatever its
    name; a file with an image extension whose bytes are no image is empty or garbage;
    anything else is not an image (a caption, a sidecar, a README).
    """
    if size == 0:
        return None, Reason.EMPTY_FILE if extension_of(name) in IMAGE_EXTENSIONS else Reason.NOT_AN_IMAGE
    real = sniff_format(head)
    if real is not None:
        return real, None
    if extension_of(name) in IMAGE_EXTENSIONS:
        return None, Reason.UNRECOGNIZED_FORMAT
    return None, Reason.NOT_AN_IMAGE
