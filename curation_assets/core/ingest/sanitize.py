"""Sanitize: is each file a usable image, and if not, can export fix it?

Pure code, no Dagster. :func:`check_image` turns one file's bytes into one row of the
sanitize table; :func:`sanitize_items` runs it over a shard in a process pool.

The checks are small named units in :data:`CHECKS` (name, the reasons it can produce,
the rule fields it reads, and a function returning findings), run in phase order:

1. ``file``: from the bytes and the name only (type, allowed format, extension, size);
2. ``header``: after Pillow has parsed the header, before any pixel is decoded
   (decompression bomb, frame count);
3. ``decode``: the one full decode;
4. ``pixels``: from what the header and decode told (orientation, mode, geometry).

A *gate* check that rejects ends the row: a file that is no image, a format the
project does not accept, a header Pillow cannot parse, or a decompression bomb is
reported with that reason alone (and whatever the earlier checks found), and is never
decoded. A failed decode is not a gate: the header still tells mode and geometry.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import TYPE_CHECKING, Any, Literal

import xxhash
from PIL import Image, ImageFile

from curation_assets.core.ingest.formats import (
    FORMAT_EXTENSIONS,
    HEAD_BYTES,
    allowed_real_formats,
    classify_file,
    extension_of,
)
from curation_assets.core.ingest.images import (
    ALPHA_MODES,
    HIGH_BIT_DEPTH_MODES,
    TRANSFORMING_ORIENTATIONS,
    TRANSPOSING_ORIENTATIONS,
    describe_error,
    exif_orientation,
    needs_normalizing,
    normalize_image,
    read_bytes,
)
from curation_assets.core.outputs.reasons import (
    ALWAYS_REJECT,
    FIX_ORDER,
    Fix,
    Reason,
    Severity,
    Status,
    status_of,
)
from curation_assets.core.pool import map_chunks, usable_cores

if TYPE_CHECKING:
    from curation_assets.config import SanitizeStage

# Columns of a check_image row, in order (sanitize_items puts image_id first).
ROW_COLUMNS: tuple[str, ...] = (
    "status",  # str: ok | fixable | rejected
    "reasons",  # list[str]: sorted, deduplicated Reason values
    "fixes",  # list[str]: in FIX_ORDER; empty when rejected
    "detail",  # str | None: what was found, "; "-joined
    "format",  # str | None: real format from the magic bytes (JPEG, PNG, ...)
    "width",  # int | None: as displayed (after EXIF orientation)
    "height",  # int | None
    "mode",  # str | None: Pillow mode of the stored first frame
    "n_frames",  # int | None
    "exif_orientation",  # int | None: the raw tag value when present
    "file_size",  # int: bytes
    "pixel_hash",  # str | None: xxh3_128 of normalised RGB pixels + size
)


def row_schema() -> dict[str, Any]:
    """The polars schema of :func:`sanitize_items` rows: ``image_id`` then :data:`ROW_COLUMNS`."""
    import polars as pl  # not needed by the checks or the workers

    return {
        "image_id": pl.String,
        "status": pl.String,
        "reasons": pl.List(pl.String),
        "fixes": pl.List(pl.String),
        "detail": pl.String,
        "format": pl.String,
        "width": pl.Int64,
        "height": pl.Int64,
        "mode": pl.String,
        "n_frames": pl.Int64,
        "exif_orientation": pl.Int64,
        "file_size": pl.Int64,
        "pixel_hash": pl.String,
    }


@dataclass(frozen=True, slots=True)
class _Rules:
    """A plain copy of the rules that workers receive (unpickling it imports no pydantic)."""

    min_width: int
    min_height: int
    max_width: int
    max_height: int
    min_aspect_ratio: float
    max_aspect_ratio: float
    max_file_bytes: int
    allowed_formats: tuple[str, ...]
    max_pixels: int
    too_large_action: str
    file_too_large_action: str
    recompress_quality: int
    allowed_real: frozenset[str] = field(default=frozenset())


def plain_rules(rules: SanitizeStage | _Rules) -> _Rules:
    if isinstance(rules, _Rules):
        return rules
    return _Rules(
        min_width=rules.min_width,
        min_height=rules.min_height,
        max_width=rules.max_width,
        max_height=rules.max_height,
        min_aspect_ratio=rules.min_aspect_ratio,
        max_aspect_ratio=rules.max_aspect_ratio,
        max_file_bytes=rules.max_file_bytes,
        allowed_formats=tuple(rules.allowed_formats),
        max_pixels=rules.max_pixels,
        too_large_action=rules.too_large_action,
        file_too_large_action=rules.file_too_large_action,
        recompress_quality=rules.recompress_quality,
        allowed_real=allowed_real_formats(tuple(rules.allowed_formats)),
    )


# ----------------------------------------------------------------------------- findings


@dataclass(frozen=True, slots=True)
class Finding:
    """One thing a check found: its reason, what it does to the image, the fix and a detail."""

    reason: Reason
    severity: Severity
    fix: str | None = None
    detail: str | None = None


def _reject(reason: Reason, detail: str | None = None) -> Finding:
    return Finding(reason, Severity.REJECT, None, detail)


def _fix(reason: Reason, fix: str, detail: str | None = None) -> Finding:
    assert reason not in ALWAYS_REJECT, reason
    return Finding(reason, Severity.FIX, fix, detail)


@dataclass(slots=True)
class Subject:
    """What the checks know about one file so far; checks read it and fill it in."""

    data: bytes
    name: str
    ext: str
    real_format: str | None = None
    im: Image.Image | None = None  # set once the header is parsed
    stored_size: tuple[int, int] | None = None  # (width, height) as stored
    mode: str | None = None
    n_frames: int | None = None
    orientation: int | None = None
    decoded: bool = False


Phase = Literal["file", "header", "decode", "pixels"]
PHASES: tuple[Phase, ...] = ("file", "header", "decode", "pixels")


@dataclass(frozen=True, slots=True)
class Check:
    """A named sanitize check.

    ``params`` are the rule fields it reads; :meth:`defaults` gives their values for a
    rules object (the packaged defaults are VDC's, see ``projects/defaults.yaml``).
    """

    name: str
    phase: Phase
    reasons: tuple[Reason, ...]
    params: tuple[str, ...]
    run: Callable[[Subject, _Rules], list[Finding]]
    gate: bool = False  # a rejecting finding ends the row
    doc: str = ""

    def defaults(self, rules: SanitizeStage | _Rules) -> dict[str, Any]:
        return {param: getattr(rules, param) for param in self.params}


CHECKS: dict[str, Check] = {}


def check(
    name: str, phase: Phase, reasons: tuple[Reason, ...], params: tuple[str, ...] = (), gate: bool = False
) -> Callable[[Callable[[Subject, _Rules], list[Finding]]], Callable[[Subject, _Rules], list[Finding]]]:
    """Register a check function under ``name`` (registration order is run order within a phase)."""

    def register(
        fn: Callable[[Subject, _Rules], list[Finding]],
    ) -> Callable[[Subject, _Rules], list[Finding]]:
        if name in CHECKS:
            raise ValueError(f"check {name!r} is registered twice")
        doc = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        CHECKS[name] = Check(name, phase, reasons, params, fn, gate, doc)
        return fn

    return register


def _checks_in(phase: Phase) -> tuple[Check, ...]:
    return tuple(c for c in CHECKS.values() if c.phase == phase)


# ----------------------------------------------------------------------------- file checks


@check("file_type", "file", (Reason.EMPTY_FILE, Reason.UNRECOGNIZED_FORMAT, Reason.NOT_AN_IMAGE), gate=True)
def _file_type(subject: Subject, rules: _Rules) -> list[Finding]:
    """Magic bytes decide the real format; a file with none is empty, garbage or no image."""
    size = len(subject.data)
    real, reason = classify_file(subject.name, size, subject.data[:HEAD_BYTES])
    subject.real_format = real
    if reason is None:
        return []
    details = {
        Reason.EMPTY_FILE: "zero bytes",
        Reason.UNRECOGNIZED_FORMAT: f".{subject.ext} file whose bytes are no known image format",
        Reason.NOT_AN_IMAGE: "neither the name nor the bytes say image",
    }
    return [_reject(reason, details.get(reason))]


@check("format_allowed", "file", (Reason.UNSUPPORTED_FORMAT,), ("allowed_formats",), gate=True)
def _format_allowed(subject: Subject, rules: _Rules) -> list[Finding]:
    """The real format must be one the project's allowed_formats name."""
    real = subject.real_format
    if real in rules.allowed_real:
        return []
    # Still report the size when Pillow can parse the header (nothing is decoded).
    try:
        with _pillow_pixel_limit(None), Image.open(io.BytesIO(subject.data)) as im:
            subject.stored_size = im.size
            subject.mode = im.mode
    except Exception:
        pass
    from curation_assets.core.ingest.formats import unsupported_format_detail  # says what would read it

    return [_reject(Reason.UNSUPPORTED_FORMAT, unsupported_format_detail(real, rules.allowed_formats))]


@check("extension", "file", (Reason.EXTENSION_MISMATCH,), ("allowed_formats",))
def _extension(subject: Subject, rules: _Rules) -> list[Finding]:
    """The extension must name the real format (a PNG named .jpg is renamed on export)."""
    honest = FORMAT_EXTENSIONS.get(subject.real_format or "", ())
    if not honest or subject.ext in honest:
        return []
    canonical = next((ext for ext in honest if ext in rules.allowed_formats), honest[0])
    shown = f".{subject.ext}" if subject.ext else "no extension"
    return [
        _fix(
            Reason.EXTENSION_MISMATCH,
            f"{Fix.RENAME_EXTENSION}:{canonical}",
            f"{subject.real_format} data with {shown}",
        )
    ]


@check(
    "file_size",
    "file",
    (Reason.FILE_TOO_LARGE,),
    ("max_file_size_mb", "file_too_large_action", "recompress_quality"),
)
def _file_size(subject: Subject, rules: _Rules) -> list[Finding]:
    """Files over max_file_size_mb are recompressed to WebP on export, or rejected."""
    size = len(subject.data)
    if size <= rules.max_file_bytes:
        return []
    detail = f"{size / 1048576:.2f} MB > {rules.max_file_bytes / 1048576:.2f} MB"
    if rules.file_too_large_action == "recompress":
        return [_fix(Reason.FILE_TOO_LARGE, f"{Fix.RECOMPRESS}:webp:{rules.recompress_quality}", detail)]
    return [_reject(Reason.FILE_TOO_LARGE, detail)]


# ----------------------------------------------------------------------------- header checks


@check("header", "header", (Reason.TRUNCATED, Reason.DECODE_ERROR), gate=True)
def _header(subject: Subject, rules: _Rules) -> list[Finding]:
    """Pillow must parse the header (nothing is decoded yet; the project's pixel limit applies)."""
    # Only the plugin the magic bytes name is tried: faster, and its error is the relevant one.
    if subject.real_format not in Image.OPEN:
        Image.init()  # registers the plugins Image.open has not needed yet (WebP, TIFF)
    formats = [subject.real_format] if subject.real_format in Image.OPEN else None
    try:
        with _pillow_pixel_limit(None):
            im = Image.open(io.BytesIO(subject.data), formats=formats)
    except Exception as exc:
        return [_decode_failure(exc, "header")]
    subject.im = im
    subject.stored_size = im.size
    subject.mode = im.mode
    return []


@check("decompression_bomb", "header", (Reason.DECOMPRESSION_BOMB,), ("max_pixels",), gate=True)
def _decompression_bomb(subject: Subject, rules: _Rules) -> list[Finding]:
    """A header declaring more than max_pixels is rejected and never decoded."""
    assert subject.stored_size is not None
    width, height = subject.stored_size
    pixels = width * height
    if pixels <= rules.max_pixels:
        return []
    return [_reject(Reason.DECOMPRESSION_BOMB, f"{width}x{height} = {pixels} pixels > {rules.max_pixels}")]


@check("frames", "header", (Reason.MULTI_FRAME,))
def _frames(subject: Subject, rules: _Rules) -> list[Finding]:
    """Animated GIF/WebP/APNG and multi-page TIFF keep their first frame."""
    im = subject.im
    assert im is not None
    try:
        # Counted before decoding: a GIF counts its frames by seeking, which resets frame 0.
        with _pillow_pixel_limit(rules.max_pixels):
            n_frames = int(getattr(im, "n_frames", 1))
            if im.tell() != 0:
                im.seek(0)
    except Exception:  # a damaged later frame: the first frame is still what is used
        n_frames = None
    subject.n_frames = n_frames
    # MPO (a JPEG carrying extra pictures, common from phones) opens as its primary JPEG
    # picture: it is reported with its n_frames but is no multi-frame image to fix.
    if n_frames is None or n_frames <= 1 or im.format == "MPO":
        return []
    return [_fix(Reason.MULTI_FRAME, str(Fix.FIRST_FRAME), f"{n_frames} frames")]


# ----------------------------------------------------------------------------- the decode


@check("decode", "decode", (Reason.TRUNCATED, Reason.DECODE_ERROR, Reason.DECOMPRESSION_BOMB))
def _decode(subject: Subject, rules: _Rules) -> list[Finding]:
    """The one full decode: catches truncated data that Image.verify() lets through."""
    im = subject.im
    assert im is not None
    try:
        with _pillow_pixel_limit(rules.max_pixels):
            im.load()
    except Exception as exc:
        return [_decode_failure(exc, "decode")]
    subject.decoded = True
    return []


def _decode_failure(exc: BaseException, step: str) -> Finding:
    detail = f"{step}: {describe_error(exc)}"
    if isinstance(exc, Image.DecompressionBombError):
        return _reject(Reason.DECOMPRESSION_BOMB, detail)
    if isinstance(exc, EOFError) or "truncated" in str(exc).lower():
        return _reject(Reason.TRUNCATED, detail)
    return _reject(Reason.DECODE_ERROR, detail)


# ----------------------------------------------------------------------------- pixel checks


@check("exif_orientation", "pixels", (Reason.EXIF_ORIENTATION,))
def _exif_orientation(subject: Subject, rules: _Rules) -> list[Finding]:
    """An EXIF orientation other than 1 is applied on read (export transposes the pixels)."""
    im = subject.im
    assert im is not None
    # A PNG's eXIf chunk may follow the pixel data: Pillow decodes to find it, so after a
    # failed decode it is not looked for (that would decode the broken data again).
    if subject.decoded or im.format != "PNG":
        subject.orientation = exif_orientation(im)
    if subject.orientation not in TRANSFORMING_ORIENTATIONS:
        return []
    return [_fix(Reason.EXIF_ORIENTATION, str(Fix.EXIF_TRANSPOSE), f"EXIF orientation {subject.orientation}")]


_MODE_REASONS: dict[str, Reason] = {
    "CMYK": Reason.MODE_CMYK,
    "P": Reason.MODE_PALETTE,
    "PA": Reason.MODE_PALETTE,
    "1": Reason.MODE_BILEVEL,
    **dict.fromkeys(ALPHA_MODES - {"PA"}, Reason.MODE_ALPHA),
    **dict.fromkeys(HIGH_BIT_DEPTH_MODES, Reason.MODE_HIGH_BIT_DEPTH),
}


@check(
    "mode",
    "pixels",
    (
        Reason.MODE_CMYK,
        Reason.MODE_PALETTE,
        Reason.MODE_ALPHA,
        Reason.MODE_HIGH_BIT_DEPTH,
        Reason.MODE_BILEVEL,
        Reason.MODE_OTHER,
    ),
)
def _mode(subject: Subject, rules: _Rules) -> list[Finding]:
    """Every pixel layout but L and RGB is converted to 8-bit RGB on read."""
    mode = subject.mode
    im = subject.im
    assert mode is not None and im is not None
    keyed = "transparency" in im.info  # a tRNS colour key on L/RGB acts as alpha
    if mode in ("L", "RGB") and not keyed:
        return []
    if mode in ("L", "RGB"):
        return [_fix(Reason.MODE_ALPHA, str(Fix.CONVERT_RGB), f"mode {mode} with a transparency key")]
    reason = _MODE_REASONS.get(mode, Reason.MODE_OTHER)
    return [_fix(reason, str(Fix.CONVERT_RGB), f"mode {mode}")]


def _displayed_size(subject: Subject) -> tuple[int, int] | None:
    if subject.stored_size is None:
        return None
    width, height = subject.stored_size
    if subject.orientation in TRANSPOSING_ORIENTATIONS:
        return height, width
    return width, height


@check(
    "dimensions",
    "pixels",
    (Reason.TOO_SMALL, Reason.TOO_LARGE),
    ("min_width", "min_height", "max_width", "max_height", "too_large_action"),
)
def _dimensions(subject: Subject, rules: _Rules) -> list[Finding]:
    """Displayed width/height within [min, max]; too large is resized on export, or rejected."""
    size = _displayed_size(subject)
    assert size is not None
    width, height = size
    found = []
    if width < rules.min_width or height < rules.min_height:
        found.append(
            _reject(Reason.TOO_SMALL, f"{width}x{height} < min {rules.min_width}x{rules.min_height}")
        )
    if width > rules.max_width or height > rules.max_height:
        detail = f"{width}x{height} > max {rules.max_width}x{rules.max_height}"
        if rules.too_large_action == "resize":
            side = max(rules.max_width, rules.max_height)
            found.append(_fix(Reason.TOO_LARGE, f"{Fix.RESIZE_MAX_SIDE}:{side}", detail))
        else:
            found.append(_reject(Reason.TOO_LARGE, detail))
    return found


@check("aspect_ratio", "pixels", (Reason.ASPECT_RATIO,), ("min_aspect_ratio", "max_aspect_ratio"))
def _aspect_ratio(subject: Subject, rules: _Rules) -> list[Finding]:
    """Displayed width/height within [min_aspect_ratio, max_aspect_ratio]."""
    size = _displayed_size(subject)
    assert size is not None
    width, height = size
    if width <= 0 or height <= 0:
        return [_reject(Reason.ASPECT_RATIO, f"{width}x{height} has no aspect ratio")]
    ratio = width / height
    if ratio > rules.max_aspect_ratio:
        return [
            _reject(Reason.ASPECT_RATIO, f"{width}x{height} aspect {ratio:.2f} > {rules.max_aspect_ratio:g}")
        ]
    if ratio < rules.min_aspect_ratio:
        return [
            _reject(Reason.ASPECT_RATIO, f"{width}x{height} aspect {ratio:.2f} < {rules.min_aspect_ratio:g}")
        ]
    return []


# ----------------------------------------------------------------------------- one image


@contextmanager
def _pillow_pixel_limit(limit: int | None) -> Iterator[None]:
    """Run with Pillow's decompression-bomb limit set to ``limit`` (None: off), then restore it.

    Headers are parsed with the limit off so that the project's max_pixels decides (and
    the row still reports the declared size). Seeking and decoding run with the limit
    at max_pixels, so Pillow's checks of GIF frames and TIFF tiles larger than the
    declared image refuse to allocate them. Pillow keeps the limit in a module global:
    a thread decoding beside this one sees the temporary value.
    """
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = limit
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def pixel_hash(im: Image.Image, orientation: int | None) -> str:
    """xxh3_128 of the normalised (first frame, upright, 8-bit RGB) pixels and the size.

    Equal for equal upright RGB pixels whatever the file format or metadata: the digest
    of ``normalize_image(im).tobytes()`` followed by ``b"<width>x<height>"``. An image
    that is already upright single-frame RGB is hashed without a conversion.
    """
    return hash_pixels(upright_rgb(im, orientation))


def upright_rgb(im: Image.Image, orientation: int | None) -> Image.Image:
    """The decoded ``im`` as upright 8-bit RGB: ``im`` itself when it already is."""
    rgb = normalize_image(im) if needs_normalizing(im, orientation) else im
    rgb.load()
    return rgb


def hash_pixels(rgb: Image.Image) -> str:
    """The pixel hash of an already upright 8-bit RGB image (see :func:`pixel_hash`)."""
    try:
        digest = _streamed_digest(rgb)
    except Exception:  # this Pillow's encoder API differs: hash the joined bytes instead
        digest = xxhash.xxh3_128(rgb.tobytes())
    digest.update(b"%dx%d" % rgb.size)
    return digest.hexdigest()


def _streamed_digest(im: Image.Image) -> xxhash.xxh3_128:
    """The digest of exactly ``im.tobytes()``, without building those bytes.

    ``tobytes()`` joins its chunks into one fresh buffer of the whole image (3 MB for
    1 MP RGB); depending on the state of the C heap, allocating and faulting in that
    buffer for every image cost as much as the JPEG decode itself. The chunks of
    Pillow's raw encoder (what tobytes() itself runs) are hashed as they come instead.
    """
    digest = xxhash.xxh3_128()
    width, height = im.size
    if width == 0 or height == 0:
        return digest
    encoder = Image._getencoder(im.mode, "raw", im.mode)
    try:
        encoder.setimage(im.im, (0, 0, width, height))
        bufsize = max(ImageFile.MAXBLOCK, width * 4)  # as tobytes() does
        while True:
            _, status, chunk = encoder.encode(bufsize)
            digest.update(chunk)
            if status:
                break
        if status < 0:
            raise RuntimeError(f"raw encoder error {status}")
    finally:
        encoder.cleanup()
    return digest


_FIX_RANK = {str(fix): rank for rank, fix in enumerate(FIX_ORDER)}


def _row(subject: Subject, findings: list[Finding], hashed: str | None) -> dict[str, Any]:
    status = status_of([f.severity for f in findings])
    fixes: list[str] = []
    if status != "rejected":
        fixes = sorted(
            {f.fix for f in findings if f.fix is not None},
            key=lambda fix: (_FIX_RANK.get(fix.split(":", 1)[0], len(_FIX_RANK)), fix),
        )
    details = [f.detail for f in findings if f.detail]
    size = _displayed_size(subject)
    return {
        "status": str(status),
        "reasons": sorted({str(f.reason) for f in findings}),
        "fixes": fixes,
        "detail": "; ".join(details) if details else None,
        "format": subject.real_format,
        "width": size[0] if size else None,
        "height": size[1] if size else None,
        "mode": subject.mode,
        "n_frames": subject.n_frames,
        "exif_orientation": subject.orientation,
        "file_size": len(subject.data),
        "pixel_hash": hashed,
    }


def check_image(data: bytes, name: str, rules: SanitizeStage | _Rules) -> dict[str, Any]:
    """One row of the sanitize table for a file's bytes (see :data:`ROW_COLUMNS`).

    ``name`` is the file or tar-member name; only its extension is used. Never raises:
    an unexpected failure becomes ``decode_error`` with the exception in ``detail``.
    """
    row, image = inspect_image(data, name, rules)
    if image is not None:
        image.close()
    return row


def inspect_image(
    data: bytes, name: str, rules: SanitizeStage | _Rules
) -> tuple[dict[str, Any], Image.Image | None]:
    """:func:`check_image`'s row, and the decoded picture as upright 8-bit RGB when it is kept.

    The one full decode the checks make is what every later use of the image reads (the
    shard pass hashes, scores and resizes it for each model), so no stage decodes again.
    The image is None for a rejected file; the caller closes it.
    """
    plain = plain_rules(rules)
    subject = Subject(data=data, name=name, ext=extension_of(name))
    findings: list[Finding] = []
    hashed = None
    rgb: Image.Image | None = None
    try:
        for phase in PHASES:
            for unit in _checks_in(phase):
                found = unit.run(subject, plain)
                findings.extend(found)
                if unit.gate and any(f.severity == Severity.REJECT for f in found):
                    return _row(subject, findings, None), None
        if subject.decoded:
            assert subject.im is not None
            rgb = upright_rgb(subject.im, subject.orientation)
            hashed = hash_pixels(rgb)
    except Exception as exc:  # a bug or an exotic file must not stop a shard
        findings.append(_reject(Reason.DECODE_ERROR, f"unexpected: {describe_error(exc)}"))
        hashed, rgb = None, None
    finally:
        if subject.im is not None and subject.im is not rgb:
            subject.im.close()
    row = _row(subject, findings, hashed)
    if rgb is not None and row["status"] == str(Status.REJECTED):
        rgb.close()
        rgb = None
    return row, rgb


def rejected_row(reason: Reason, detail: str | None = None, file_size: int = 0) -> dict[str, Any]:
    """The row of a file rejected without being opened (one reason, no pixels)."""
    row = _row(Subject(data=b"", name="", ext=""), [_reject(reason, detail)], None)
    row["file_size"] = file_size
    return row


def unreadable_row(exc: BaseException, file_size: int = 0) -> dict[str, Any]:
    """The row of a file the OS would not read (missing, permissions, I/O error, short tar)."""
    return rejected_row(Reason.UNREADABLE, describe_error(exc), file_size)


# ----------------------------------------------------------------------------- the runner


@dataclass(frozen=True, slots=True)
class SanitizeItem:
    """One file to check: a plain file (offset None) or a member of a container file."""

    image_id: str
    source_path: str
    offset: int | None = None
    size: int | None = None
    name: str = ""  # file or member name (the extension is taken from it); "" = source_path's name

    @property
    def display_name(self) -> str:
        return self.name or PurePath(self.source_path).name


ProgressFn = Callable[[int, int, float], None]


def _check_item(item: SanitizeItem, rules: _Rules) -> dict[str, Any]:
    try:
        data = read_bytes(item.source_path, item.offset, item.size)
    except Exception as exc:  # OSError mostly; a bad offset gives ValueError
        row = unreadable_row(exc, item.size or 0)
    else:
        row = check_image(data, item.display_name, rules)
    return {"image_id": item.image_id, **row}


def _check_chunk(items: tuple[SanitizeItem, ...], rules: _Rules) -> list[dict[str, Any]]:
    """Worker entry point (module level so that spawn/forkserver workers can import it)."""
    return [_check_item(item, rules) for item in items]


def _failed_row(item: SanitizeItem, what: str, exc: BaseException) -> dict[str, Any]:
    subject = Subject(data=b"", name=item.display_name, ext="")
    row = _row(subject, [_reject(Reason.DECODE_ERROR, f"{what} ({describe_error(exc)})")], None)
    row["file_size"] = item.size or 0
    return {"image_id": item.image_id, **row}


def _unreturned_row(item: SanitizeItem, exc: BaseException) -> dict[str, Any]:
    return _failed_row(item, "the worker could not return this row", exc)


def _died_row(item: SanitizeItem, exc: BaseException) -> dict[str, Any]:
    return _failed_row(item, "the worker process died while checking this file", exc)


def sanitize_items(
    items: Sequence[SanitizeItem],
    rules: SanitizeStage,
    progress: ProgressFn | None = None,
) -> list[dict[str, Any]]:
    """check_image over many files, in ``rules.workers`` processes; rows in the order of ``items``.

    Each row is check_image's row with ``image_id`` first. Workers read the bytes
    themselves (only paths cross process boundaries), take tasks of ``chunk_size``
    items, and at most ``workers * max_in_flight`` tasks are queued at once, so memory
    stays bounded on million-file shards. Nothing raises: a file the OS will not read is
    ``unreadable``; a file that kills its worker (a decoder crash, the OOM killer) is
    found by re-running the tasks of the broken pool one file at a time, and gets
    ``decode_error``. ``progress(done, total, images_per_second)`` follows each task
    (an exception raised by ``progress`` itself is the caller's and propagates).

    Runs inline, without processes, when workers is 1 or everything fits in one task.
    The worker processes live for this call only (:func:`~curation_assets.core.pool.map_chunks`),
    so the process that called it can always exit.
    """
    return map_chunks(
        items,
        _check_chunk,
        (plain_rules(rules),),
        workers=int(getattr(rules, "workers", 0)) or usable_cores(),
        chunk_size=getattr(rules, "chunk_size", 16),
        in_flight_per_worker=getattr(rules, "max_in_flight", 4),
        failed_row=_unreturned_row,
        died_row=_died_row,
        progress=progress,
    )
