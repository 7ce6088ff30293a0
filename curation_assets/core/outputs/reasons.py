"""The vocabulary of sanitize findings: what each reason means and what it does to an image.

Every table that explains a decision uses these strings, so they are stable API:
the demo generator's ground truth, the sanitize table, the funnel and later the
curation decisions all speak this vocabulary.
"""

from __future__ import annotations

from enum import StrEnum


class Severity(StrEnum):
    """What a finding does to an image's status."""

    REJECT = "reject"  # the image cannot be used; export drops it
    FIX = "fix"  # usable after the recorded fix (export applies it)


class Status(StrEnum):
    OK = "ok"
    FIXABLE = "fixable"
    REJECTED = "rejected"


class Reason(StrEnum):
    """One named finding of a sanitize check."""

    # -- the file itself
    NOT_AN_IMAGE = "not_an_image"  # neither the extension nor the bytes say image
    EMPTY_FILE = "empty_file"  # zero bytes
    UNREADABLE = "unreadable"  # the OS refused to read it (permissions, I/O error)
    UNRECOGNIZED_FORMAT = "unrecognized_format"  # image extension, but the bytes are no known image
    UNSUPPORTED_FORMAT = "unsupported_format"  # a real image format outside allowed_formats
    EXTENSION_MISMATCH = "extension_mismatch"  # e.g. a PNG named .jpg; fixed by renaming on export
    FILE_TOO_LARGE = "file_too_large"  # over max_file_size_mb
    # -- decoding
    DECOMPRESSION_BOMB = "decompression_bomb"  # header declares more than max_pixels; never decoded
    TRUNCATED = "truncated"  # the data ends early (a partial download)
    DECODE_ERROR = "decode_error"  # any other failure of the full decode
    # -- geometry
    TOO_SMALL = "too_small"  # width or height below the minimum
    TOO_LARGE = "too_large"  # width or height above the maximum
    ASPECT_RATIO = "aspect_ratio"  # width/height outside [min_aspect_ratio, max_aspect_ratio]
    # -- pixel layout, all normalised to 8-bit RGB on read
    MODE_CMYK = "mode_cmyk"
    MODE_PALETTE = "mode_palette"
    MODE_ALPHA = "mode_alpha"  # LA, RGBA, PA: composited onto white
    MODE_HIGH_BIT_DEPTH = "mode_high_bit_depth"  # I;16*, I, F: rescaled to 8 bits
    MODE_BILEVEL = "mode_bilevel"  # "1"
    MODE_OTHER = "mode_other"  # YCbCr, LAB, HSV and other rare modes
    EXIF_ORIENTATION = "exif_orientation"  # orientation tag != 1: transposed on read
    MULTI_FRAME = "multi_frame"  # animated GIF/WebP/PNG or multi-page TIFF: first frame used


class Fix(StrEnum):
    """A transformation export applies to make a fixable image usable (in this order)."""

    FIRST_FRAME = "first_frame"
    EXIF_TRANSPOSE = "exif_transpose"
    CONVERT_RGB = "convert_rgb"
    RESIZE_MAX_SIDE = "resize_max_side"  # written as "resize_max_side:<pixels>"
    RECOMPRESS = "recompress"  # written as "recompress:webp:<quality>"
    RENAME_EXTENSION = "rename_extension"  # written as "rename_extension:<ext>"


# Reasons that are always a rejection. The severity of too_large and file_too_large
# depends on the project's action for them (resize/recompress or reject), so they are
# not listed here; every mode/orientation/frame finding is a fix.
ALWAYS_REJECT: frozenset[Reason] = frozenset(
    {
        Reason.NOT_AN_IMAGE,
        Reason.EMPTY_FILE,
        Reason.UNREADABLE,
        Reason.UNRECOGNIZED_FORMAT,
        Reason.UNSUPPORTED_FORMAT,
        Reason.DECOMPRESSION_BOMB,
        Reason.TRUNCATED,
        Reason.DECODE_ERROR,
        Reason.TOO_SMALL,
        Reason.ASPECT_RATIO,
    }
)

# Order in which export applies fixes: frame first, orientation before any resize.
FIX_ORDER: tuple[Fix, ...] = (
    Fix.FIRST_FRAME,
    Fix.EXIF_TRANSPOSE,
    Fix.CONVERT_RGB,
    Fix.RESIZE_MAX_SIDE,
    Fix.RECOMPRESS,
    Fix.RENAME_EXTENSION,
)


def status_of(severities: list[Severity]) -> Status:
    """rejected if any finding rejects, fixable if any finding is a fix, else ok."""
    if Severity.REJECT in severities:
        return Status.REJECTED
    if Severity.FIX in severities:
        return Status.FIXABLE
    return Status.OK
