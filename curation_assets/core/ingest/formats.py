"""What a file is, from its first bytes and its name: no decoding, no Pillow.

Inventory and sanitize both classify files with :func:`classify_file`, so a file is an
image or not for the same reason everywhere. Magic bytes decide the real format; the
extension only decides whether a file that is no known format was *meant* to be an image.
"""

from __future__ import annotations

import threading
from importlib.util import find_spec
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
    "HEIF": ("heic", "heif", "hif"),
    "AVIF": ("avif",),
    "TGA": ("tga",),
}

# Formats read through an optional Pillow plugin: real format -> (module, PyPI package). The
# `formats` extra (pip install 'curation_assets[formats]') installs both. Pillow 11.3 and later
# read AVIF themselves; the plugin is then neither needed nor loaded.
OPTIONAL_READERS: dict[str, tuple[str, str]] = {
    "HEIF": ("pillow_heif", "pillow-heif"),
    "AVIF": ("pillow_avif", "pillow-avif-plugin"),
}
FORMATS_EXTRA = "curation_assets[formats]"

# The values sanitize.allowed_formats accepts: every extension of a format Pillow reads without
# a plugin, plus those of the optional formats (read once their plugin is installed).
ALLOWABLE_EXTENSIONS: frozenset[str] = frozenset(
    {"jpg", "jpeg", "png", "webp", "tif", "tiff", "bmp", "gif", "ppm", "pgm", "pbm", "pnm"}
    | {ext for fmt in OPTIONAL_READERS for ext in FORMAT_EXTENSIONS[fmt]}
)

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
    if head[4:8] == b"ftyp":
        return _iso_media_format(head)
    return None


_AVIF_BRANDS = (b"avif", b"avis")
_HEIF_BRANDS = (b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs")
_GENERIC_BRANDS = (b"mif1", b"msf1", b"miaf")  # either codec: the compatible brands decide


def _iso_media_format(head: bytes) -> str | None:
    """HEIF or AVIF from an ISO-BMFF ``ftyp`` box: the major brand, else the compatible ones."""
    major = head[8:12]
    if major in _AVIF_BRANDS:
        return "AVIF"
    if major in _HEIF_BRANDS:
        return "HEIF"
    if major in _GENERIC_BRANDS:
        size = int.from_bytes(head[0:4], "big")
        compatible = [head[i : i + 4] for i in range(16, min(size, len(head)) - 3, 4)]
        if any(brand in _AVIF_BRANDS for brand in compatible):
            return "AVIF"
        return "HEIF"
    return None


def reader_installed(real: str) -> bool:
    """Whether this Python can decode the optional format ``real`` (True for built-in formats)."""
    if real not in OPTIONAL_READERS:
        return True
    if real == "AVIF" and _pillow_reads_avif():
        return True
    return find_spec(OPTIONAL_READERS[real][0]) is not None


def _pillow_reads_avif() -> bool:
    from PIL import features  # Pillow >= 11.3 has a built-in AVIF codec when built with libavif

    return "avif" in features.get_supported_modules() and bool(features.check("avif"))


_REGISTERED = False
_REGISTER_LOCK = threading.Lock()


def register_optional_readers() -> None:
    """Teach Pillow the optional formats whose plugin is installed (idempotent, cheap after once).

    Every decode path calls it before opening a file (images.load_rgb through the ingest
    package's import), so a worker process reads HEIC/AVIF as the parent does.
    """
    global _REGISTERED
    if _REGISTERED:
        return
    with _REGISTER_LOCK:
        if _REGISTERED:
            return
        if find_spec("pillow_heif") is not None:
            import pillow_heif

            pillow_heif.register_heif_opener()
        if not _pillow_reads_avif() and find_spec("pillow_avif") is not None:
            import pillow_avif  # noqa: F401  (importing it registers the AVIF plugin)
        _REGISTERED = True


def allowed_real_formats(allowed_extensions: tuple[str, ...]) -> frozenset[str]:
    """Real formats a project accepts: those with at least one allowed extension.

    HEIF and AVIF are allowed by default once a reader for them is installed (the `formats`
    extra; Pillow 11.3+ reads AVIF itself): installing the extra is the opt-in. Listing their
    extensions in allowed_formats without the reader keeps them refused, with a message that
    names the extra (see :func:`unsupported_format_detail`).
    """
    allowed = set(allowed_extensions)
    named = {fmt for fmt, exts in FORMAT_EXTENSIONS.items() if allowed & set(exts)}
    readable = {fmt for fmt in OPTIONAL_READERS if reader_installed(fmt)}
    return frozenset((named - set(OPTIONAL_READERS)) | readable)


def unsupported_format_detail(real: str | None, allowed_formats: tuple[str, ...]) -> str:
    """Why a file of format ``real`` is refused, and what would read it: the unsupported_format text."""
    allowed = ", ".join(allowed_formats)
    if real in OPTIONAL_READERS and not reader_installed(real):
        package = OPTIONAL_READERS[real][1]
        return (
            f"{real} needs a reader that is not installed: pip install '{FORMATS_EXTRA}' (installs {package})"
        )
    extensions = FORMAT_EXTENSIONS.get(real or "", ())
    listable = [ext for ext in extensions if ext in ALLOWABLE_EXTENSIONS]
    if listable:
        return (
            f"{real} is not among the allowed formats ({allowed}); add {' or '.join(listable)} "
            "to sanitize.allowed_formats to accept it"
        )
    return f"{real} is not among the allowed formats ({allowed}) and no reader for it is supported"


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
