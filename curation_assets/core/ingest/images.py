"""The read path every stage shares: bytes from a file or a tar member, then upright 8-bit RGB.

Pure functions, no Dagster. Sanitize decides which images later stages may read; those
stages read them with :func:`read_bytes` and :func:`load_rgb`, so every stage sees the
same pixels: the first frame, EXIF orientation applied, alpha composited onto white and
high-bit-depth data rescaled (not clipped) to 8 bits.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image, ImageOps

ORIENTATION_TAG = 0x0112  # EXIF Orientation
TRANSFORMING_ORIENTATIONS = frozenset(range(2, 9))  # 1 is upright; 0 and > 8 are invalid, ignored
TRANSPOSING_ORIENTATIONS = frozenset({5, 6, 7, 8})  # orientations that swap width and height
HIGH_BIT_DEPTH_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})
ALPHA_MODES = frozenset({"LA", "La", "RGBA", "RGBa", "PA"})
_WHITE = (255, 255, 255)


# ImageRef lives here, not in decode.py, so that steps which only list kept images (quality,
# perceptual hashes) do not import torch with the decode pipeline (issue 12).
@dataclass(frozen=True)
class ImageRef:
    """Where a kept image's bytes are, and its displayed size (from sanitize)."""

    image_id: str
    source_path: str
    offset: int | None
    size: int | None
    width: int
    height: int


class ImageReadError(ValueError):
    """An image that cannot be opened or decoded; the message says which step failed and why."""


def read_bytes(source_path: str, offset: int | None = None, size: int | None = None) -> bytes:
    """The bytes of a plain file (offset None) or of ``size`` bytes at ``offset`` inside a container.

    The container case reads a WebDataset tar member in place from its data offset. A
    container that ends before ``offset + size`` raises :class:`OSError` (a short read is
    an unreadable member, not a smaller image). Objects on object storage and parquet rows
    are read through core.ingest.sources.
    """
    from curation_assets.core.ingest.sources import needs_feed, read_source

    if needs_feed(source_path):
        return read_source(source_path, offset, size)
    with open(source_path, "rb", buffering=0) as handle:
        if offset is None:
            return handle.readall()
        handle.seek(offset)
        if size is None:
            return handle.readall()
        data = handle.read(size)
        # An unbuffered read may return fewer bytes than asked for; keep reading until EOF.
        while len(data) < size:
            more = handle.read(size - len(data))
            if not more:
                raise OSError(
                    f"short read: {source_path} holds {len(data)} of the {size} bytes at offset {offset}"
                )
            data += more
        return data


def exif_orientation(im: Image.Image) -> int | None:
    """The raw EXIF orientation tag (0x0112) as an int, or None when absent or unreadable."""
    try:
        value = im.getexif().get(ORIENTATION_TAG)
    except Exception:  # malformed EXIF must not make an image unreadable
        return None
    if value is None:
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def needs_normalizing(im: Image.Image, orientation: int | None) -> bool:
    """False when ``im`` is exactly what :func:`normalize_image` would return (upright RGB, frame 0)."""
    return (
        im.mode != "RGB"
        or "transparency" in im.info
        or orientation in TRANSFORMING_ORIENTATIONS
        or im.tell() != 0
    )


def normalize_image(im: Image.Image) -> Image.Image:
    """First frame, EXIF orientation applied, 8-bit RGB.

    - alpha (LA, La, RGBA, RGBa, PA, and P/L/RGB with a transparency key) is composited
      onto white;
    - 16-bit and 32-bit integer or float data (I;16*, I, F) is rescaled to 0-255, never
      clipped: see :func:`_rescale_high_bit_depth`;
    - CMYK, YCbCr, LAB, HSV, RGBX, 1, L and P are converted with Pillow's conversions.

    An image that is already upright single-frame RGB is returned as is (no copy).
    """
    if im.tell() != 0:
        im.seek(0)
    orientation = exif_orientation(im)
    if orientation in TRANSFORMING_ORIENTATIONS:
        transposed = ImageOps.exif_transpose(im)
        if transposed is not None:
            im = transposed
    mode = im.mode
    transparent = "transparency" in im.info
    if mode == "RGB" and not transparent:
        return im
    if mode in HIGH_BIT_DEPTH_MODES:
        return _rescale_high_bit_depth(im)
    if mode in ALPHA_MODES or (transparent and mode in ("P", "L", "RGB", "1")):
        return _composite_on_white(im)
    return im.convert("RGB")


def _composite_on_white(im: Image.Image) -> Image.Image:
    if im.mode == "La":  # premultiplied grey+alpha has no direct route to RGBA
        im = im.convert("LA")
    rgba = im.convert("RGBA")  # honours a P/L/RGB transparency key and un-premultiplies RGBa
    background = Image.new("RGB", rgba.size, _WHITE)
    background.paste(rgba, (0, 0), rgba)  # an RGBA mask uses its alpha band
    return background


def _rescale_high_bit_depth(im: Image.Image) -> Image.Image:
    """Map 16/32-bit integer or float grey levels to 0-255 without clipping.

    - I;16*: the full 16-bit range maps onto 0-255 (value / 257), so relative
      brightness is kept and 65535 becomes 255.
    - I: values already within 0-255 are kept; within 0-65535 they are treated as
      16-bit data; anything else (negative or larger) is stretched min..max to 0..255.
    - F: values within 0-1 are scaled by 255; within 0-255 kept; otherwise stretched.
      NaN and infinities become 0.
    """
    import numpy as np  # only images with these rare modes pay for the import

    mode = im.mode
    values = np.asarray(im)
    if mode == "F":
        values = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    else:
        values = values.astype(np.float64)
    low = float(values.min()) if values.size else 0.0
    high = float(values.max()) if values.size else 0.0
    if mode.startswith("I;16"):
        scaled = values / 257.0
    elif mode == "F" and low >= 0.0 and high <= 1.0:
        scaled = values * 255.0
    elif low >= 0.0 and high <= 255.0:
        scaled = values
    elif mode == "I" and low >= 0.0 and high <= 65535.0:
        scaled = values / 257.0
    elif high > low:
        scaled = (values - low) * (255.0 / (high - low))
    else:  # a constant image outside 0-255
        scaled = np.zeros_like(values)
    grey = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")


def load_rgb(data: bytes, draft_size: tuple[int, int] | None = None) -> Image.Image:
    """Decode ``data`` into upright 8-bit RGB (see :func:`normalize_image`).

    ``draft_size`` (width, height) lets a JPEG decode at a reduced scale (1/2, 1/4, 1/8)
    that is still at least that size, which is much faster when a model only needs a
    small input; other formats ignore it. The size is given for the upright image and
    swapped for sideways-stored JPEGs. Pillow's own decompression-bomb guard stays in
    force here (sanitize has already rejected anything above the project's limit).

    Raises :class:`ImageReadError` naming the failing step and Pillow's message.
    """
    step = "open"
    try:
        im = Image.open(io.BytesIO(data))
        if draft_size is not None:
            step = "draft"
            width, height = draft_size
            if exif_orientation(im) in TRANSPOSING_ORIENTATIONS:
                width, height = height, width
            im.draft("RGB", (width, height))
        step = "decode"
        im.load()
        step = "normalize"
        return normalize_image(im)
    except Exception as exc:
        raise ImageReadError(f"cannot {step} image ({len(data)} bytes): {describe_error(exc)}") from exc


def describe_error(exc: BaseException) -> str:
    """``ExceptionType: message`` for a detail column, without Pillow's object-address noise."""
    if isinstance(exc, Image.UnidentifiedImageError):
        text = "Pillow cannot parse the header"
    else:
        text = str(exc) or repr(exc)
    return f"{type(exc).__name__}: {text}"
