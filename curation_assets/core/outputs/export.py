"""Export of the curated subset: a manifest, a tree of links or copies, or WebDataset tar shards.

The input is a *plan*: a polars frame with one row per kept image (columns in
:data:`PLAN_COLUMNS`). Images whose plan row has no fix and no rotation are exported as
they are (linked or copied; a tar member's bytes are written, since a member cannot be
linked). Images with fixes or a rotation are decoded through :func:`images.load_rgb`
(first frame, EXIF orientation, 8-bit RGB), turned upright, resized, and re-encoded in
the format the fixes name. The source is only ever read.

Every output file is written under a temporary name and renamed into place, so a crash
never leaves half a file under a final name, and a re-run skips what is already right:
links are checked against their target, copies and re-encoded files against a small log
of what was written (``.export-log.jsonl``), tar shards against a per-shard sidecar
(``<shard>.tar.json``) that records which plan rows the shard holds.

Pure library: no Dagster import.
"""

from __future__ import annotations

import errno
import io
import json
import os
import re
import tarfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any

import polars as pl
import xxhash
from PIL import Image

from curation_assets.core.atomic import atomic_path
from curation_assets.core.filters.rotation import upright
from curation_assets.core.ingest.formats import FORMAT_EXTENSIONS, extension_of, sniff_format
from curation_assets.core.ingest.images import describe_error, load_rgb, read_bytes
from curation_assets.core.ingest.sources import needs_feed
from curation_assets.core.outputs.reasons import Fix

PLAN_COLUMNS: tuple[str, ...] = (
    "image_id",
    "split",
    "source_path",
    "offset",
    "size_bytes",
    "content_hash",
    "rel_path",
    "fixes",
    "rotate",
)
EXPORT_MODES: tuple[str, ...] = ("symlink", "hardlink", "copy")
EXPORT_LOG = ".export-log.jsonl"
MANIFEST_FILE = "manifest.parquet"
FILE_LIST = "files.txt"
ROTATIONS = frozenset({0, 90, 180, 270})

ProgressFn = Callable[[int, int], None]  # progress(done, total)

# Formats Pillow writes well from 8-bit RGB; anything else (GIF, PSD, HEIF, ...) becomes PNG,
# because re-quantising to a palette or writing through a missing plugin would lose pixels.
_WRITABLE = frozenset({"JPEG", "PNG", "WEBP", "TIFF", "BMP"})
_EXT_FORMAT = {ext: fmt for fmt, exts in FORMAT_EXTENSIONS.items() for ext in exts}
_PIXEL_FIXES = frozenset({Fix.FIRST_FRAME, Fix.EXIF_TRANSPOSE, Fix.CONVERT_RGB})
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
_KEY_STEM_MAX = 120  # keeps member names short enough for every tar reader
_TAR_BLOCK = 512
_COPY_BLOCK = 1 << 20


class ExportError(ValueError):
    """A plan that cannot be exported as asked (missing columns, colliding names, wrong mode)."""


@dataclass
class ExportSummary:
    """What an export did. ``files`` lists every output (written or already there)."""

    written: int = 0
    skipped: int = 0  # already exported correctly by an earlier run
    fixed: int = 0  # written with fixes or a rotation applied (a subset of written)
    bytes: int = 0  # bytes written by this run
    removed: int = 0  # outputs of an earlier plan that this plan no longer holds, deleted
    seconds: float = 0.0
    files: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (image_id, why)

    def as_metadata(self) -> dict[str, Any]:
        """Plain numbers for asset metadata."""
        return {
            "written": self.written,
            "skipped": self.skipped,
            "fixed": self.fixed,
            "failed": len(self.failed),
            "bytes": self.bytes,
            "removed": self.removed,
            "seconds": round(self.seconds, 3),
        }


# ----------------------------------------------------------------------------- fixes


@dataclass(frozen=True)
class Recipe:
    """What to do to one image's pixels, parsed from its plan row's fixes and rotate."""

    fixes: tuple[str, ...] = ()
    rotate: int = 0
    pixel_fix: bool = False  # first_frame / exif_transpose / convert_rgb: a decode is needed
    max_side: int | None = None
    recompress: tuple[str, int] | None = None  # (format, quality)
    rename_ext: str | None = None

    @property
    def needs_decode(self) -> bool:
        return self.pixel_fix or self.rotate != 0 or self.max_side is not None or self.recompress is not None

    @property
    def is_identity(self) -> bool:
        return not self.needs_decode and self.rename_ext is None

    def fingerprint(self, jpeg_quality: int) -> str:
        """A stable text naming the output this recipe makes (quality only matters when encoding)."""
        quality = jpeg_quality if self.needs_decode else 0
        return f"{','.join(self.fixes)}|rot={self.rotate}|q={quality}"


def parse_recipe(fixes: Sequence[str] | None, rotate: int | None) -> Recipe:
    """Parse fix strings (``"resize_max_side:3200"``, ``"recompress:webp:80"``, ...) and a rotation.

    Raises :class:`ValueError` naming the first fix or rotation it does not understand.
    """
    fixes = tuple(fixes or ())
    rotate = int(rotate or 0)
    if rotate not in ROTATIONS:
        raise ValueError(f"rotate must be one of 0, 90, 180, 270 (clockwise degrees), got {rotate}")
    pixel_fix = False
    max_side: int | None = None
    recompress: tuple[str, int] | None = None
    rename_ext: str | None = None
    for fix in fixes:
        name, _, arg = fix.partition(":")
        try:
            if name in _PIXEL_FIXES:
                pixel_fix = True
            elif name == Fix.RESIZE_MAX_SIDE:
                max_side = int(arg)
                if max_side < 1:
                    raise ValueError("the side must be a positive number of pixels")
            elif name == Fix.RECOMPRESS:
                fmt_name, _, quality = arg.partition(":")
                fmt = _EXT_FORMAT.get(fmt_name.lower())
                if fmt not in _WRITABLE:
                    raise ValueError(f"cannot write format {fmt_name!r}")
                recompress = (fmt, int(quality) if quality else 90)
            elif name == Fix.RENAME_EXTENSION:
                rename_ext = arg.lower().lstrip(".")
                if not rename_ext or "/" in rename_ext:
                    raise ValueError("the extension is empty or not a plain name")
            else:
                raise ValueError("no such fix")
        except ValueError as exc:
            raise ValueError(f"cannot apply fix {fix!r}: {exc}") from exc
    return Recipe(fixes, rotate, pixel_fix, max_side, recompress, rename_ext)


def output_name(rel_path: str, recipe: Recipe) -> tuple[str, str | None]:
    """(output relative path, Pillow format to encode, or None when the bytes are kept as they are).

    The extension changes where a fix says so (rename_extension, recompress) and where the
    original format cannot be written back (a GIF whose first frame is kept becomes PNG).
    """
    ext = extension_of(rel_path)
    if not recipe.needs_decode:
        return (_with_ext(rel_path, recipe.rename_ext) if recipe.rename_ext else rel_path), None
    if recipe.recompress is not None:
        fmt = recipe.recompress[0]
        new_ext = FORMAT_EXTENSIONS[fmt][0]
    else:
        new_ext = recipe.rename_ext or ext
        fmt = _EXT_FORMAT.get(new_ext)
        if fmt not in _WRITABLE:
            fmt, new_ext = "PNG", "png"
    if new_ext == ext:
        return rel_path, fmt
    return _with_ext(rel_path, new_ext), fmt


def _with_ext(rel_path: str, ext: str) -> str:
    path = PurePosixPath(rel_path)
    if path.suffix:
        return str(path.with_suffix(f".{ext}"))
    return f"{rel_path}.{ext}"


def render_fixed(data: bytes, recipe: Recipe, fmt: str, *, jpeg_quality: int = 95) -> bytes:
    """Decode ``data``, apply the recipe (orientation, rotation, resize) and encode it as ``fmt``.

    The output carries no EXIF (its orientation is baked into the pixels). An ICC profile is
    kept only when the source was RGB already: a CMYK profile would misdescribe RGB pixels.
    """
    im = load_rgb(data)
    if recipe.rotate:
        im = upright(im, recipe.rotate)  # undoes the clockwise turn the rotation stage found
    if recipe.max_side is not None and max(im.size) > recipe.max_side:
        scale = recipe.max_side / max(im.size)
        size = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
        im = im.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    options: dict[str, Any] = {}
    icc = im.info.get("icc_profile")
    if icc and _source_mode(data) == "RGB":
        options["icc_profile"] = icc
    quality = recipe.recompress[1] if recipe.recompress is not None else jpeg_quality
    if fmt in ("JPEG", "WEBP"):
        options["quality"] = quality
    elif fmt == "TIFF":
        options["compression"] = "tiff_deflate"
    out = io.BytesIO()
    im.save(out, format=fmt, **options)
    return out.getvalue()


def _source_mode(data: bytes) -> str | None:
    try:
        return Image.open(io.BytesIO(data)).mode  # header only, no decode
    except Exception:
        return None


# ----------------------------------------------------------------------------- plan checks


@dataclass(frozen=True)
class _Item:
    """One plan row, ready to export."""

    image_id: str
    split: str
    source_path: str
    offset: int | None
    size_bytes: int
    content_hash: str
    rel_path: str
    recipe: Recipe | None  # None when the fixes could not be parsed (see error)
    out_rel: str  # "<split>/<output path>", relative to the export folder
    fmt: str | None
    error: str | None = None


def check_plan(plan: pl.DataFrame) -> None:
    """Raise :class:`ExportError` naming the columns a plan lacks."""
    missing = [c for c in PLAN_COLUMNS if c not in plan.columns]
    if missing:
        raise ExportError(f"the plan lacks column(s) {missing}; it needs {list(PLAN_COLUMNS)}")
    duplicated = plan.filter(pl.col("image_id").is_duplicated())["image_id"].unique().sort().to_list()
    if duplicated:
        raise ExportError(f"the plan lists {len(duplicated)} image_id(s) twice, e.g. {duplicated[:3]}")


def safe_rel_path(rel_path: str) -> str | None:
    """Why ``rel_path`` may not be written under an export or backup root, or None when it may."""
    path = PurePosixPath(rel_path)
    if not rel_path or path.is_absolute() or ".." in path.parts or "\\" in rel_path:
        return f"rel_path {rel_path!r} is not a plain relative path"
    return None


def plan_items(plan: pl.DataFrame) -> list[_Item]:
    """The plan's rows sorted by (split, image_id), with output names that never collide.

    A renamed extension can land on another image's name (``a.jpg`` holding PNG data next to
    a real ``a.png``); the renamed one then keeps its old name in front (``a.jpg.png``).
    """
    check_plan(plan)
    rows = plan.select(PLAN_COLUMNS).sort("split", "image_id").iter_rows(named=True)
    items: list[_Item] = []
    for row in rows:
        error = safe_rel_path(row["rel_path"] or "") or _safe_split(row["split"])
        recipe: Recipe | None = None
        out, fmt = row["rel_path"] or "", None
        if error is None:
            try:
                recipe = parse_recipe(row["fixes"], row["rotate"])
                out, fmt = output_name(row["rel_path"], recipe)
            except ValueError as exc:
                error = str(exc)
        items.append(
            _Item(
                image_id=row["image_id"],
                split=row["split"],
                source_path=row["source_path"],
                offset=row["offset"],
                size_bytes=int(row["size_bytes"] or 0),
                content_hash=row["content_hash"] or "",
                rel_path=row["rel_path"] or "",
                recipe=recipe,
                out_rel=f"{row['split']}/{out}",
                fmt=fmt,
                error=error,
            )
        )
    return _resolve_collisions(items)


def _safe_split(split: str | None) -> str | None:
    if not split or "/" in split or "\\" in split or split in (".", ".."):
        return f"split {split!r} cannot name a folder"
    return None


def _resolve_collisions(items: list[_Item]) -> list[_Item]:
    originals = {f"{it.split}/{it.rel_path}" for it in items}
    resolved: list[_Item] = []
    for it in items:
        renamed = it.out_rel != f"{it.split}/{it.rel_path}"
        if renamed and it.out_rel in originals:
            ext = extension_of(it.out_rel)
            it = replace(it, out_rel=f"{it.split}/{it.rel_path}.{ext}")
        resolved.append(it)
    seen: dict[str, str] = {}
    final: list[_Item] = []
    for it in resolved:
        if it.error is None and it.out_rel in seen:
            it = replace(it, error=f"output name {it.out_rel!r} is also the output of {seen[it.out_rel]!r}")
        elif it.error is None:
            seen[it.out_rel] = it.image_id
        final.append(it)
    return final


def webdataset_key(image_id: str) -> str:
    """A WebDataset-safe record key for an image: no dots or slashes, unique per image_id.

    WebDataset splits a member name at the first dot of its basename, so the key keeps only
    letters, digits, ``_`` and ``-`` of the id (without its extension) and ends in a short
    hash of the full id, which keeps two ids that sanitise alike apart.
    """
    stem = image_id.rsplit(".", 1)[0] if "." in PurePosixPath(image_id).name else image_id
    readable = _KEY_UNSAFE.sub("_", stem)[-_KEY_STEM_MAX:].strip("_") or "image"
    return f"{readable}-{xxhash.xxh3_64_hexdigest(image_id.encode())[:12]}"


# ----------------------------------------------------------------------------- manifest


def write_manifest(plan: pl.DataFrame, out_dir: Path) -> dict[str, Path]:
    """Write ``manifest.parquet`` (the plan plus ``export_path`` and ``wds_key``) and ``files.txt``.

    ``export_path`` is where :func:`export_tree` puts the image (relative to its folder);
    ``wds_key`` is its record key in :func:`export_webdataset` shards; ``files.txt`` holds one
    image_id per line, in the manifest's order.
    """
    items = plan_items(plan)
    extra = pl.DataFrame(
        {
            "image_id": [it.image_id for it in items],
            "export_path": [it.out_rel for it in items],
            "wds_key": [webdataset_key(it.image_id) for it in items],
            "export_error": [it.error for it in items],
        },
        schema={
            "image_id": pl.String,
            "export_path": pl.String,
            "wds_key": pl.String,
            "export_error": pl.String,
        },
    )
    manifest = plan.join(extra, on="image_id", how="left").sort("split", "image_id")
    out_dir = Path(out_dir)
    paths = {"manifest": out_dir / MANIFEST_FILE, "files": out_dir / FILE_LIST}
    with atomic_path(paths["manifest"]) as tmp:
        manifest.write_parquet(tmp)
    with atomic_path(paths["files"]) as tmp:
        tmp.write_text("".join(f"{image_id}\n" for image_id in manifest["image_id"]), encoding="utf-8")
    return paths


# ----------------------------------------------------------------------------- atomic files


# The name apply and retirement import; the helper itself lives in core.atomic (one for every writer).
# It fsyncs before the rename, makes the folder, and takes a symlink or hardlink made at the temp path.
atomic_target = atomic_path


def hash_file(path: Path) -> str:
    """xxh3_128 hex digest of a file's bytes, streamed."""
    digest = xxhash.xxh3_128()
    with open(path, "rb") as handle:
        while block := handle.read(_COPY_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def copy_verified(source: Path, dest: Path, expected_hash: str | None, *, sync: bool = True) -> str:
    """Copy ``source`` to ``dest`` (a new file), hashing while copying; the digest of the bytes copied.

    ``sync=False`` leaves the fsync to the caller (:func:`~curation_assets.core.atomic.atomic_path` does it
    before its rename).

    Raises :class:`OSError` when the bytes do not hash to ``expected_hash`` (the source changed
    since it was inventoried), so a stale file is never passed on as the planned one.
    """
    digest = xxhash.xxh3_128()
    with open(source, "rb") as src, open(dest, "xb") as dst:
        while block := src.read(_COPY_BLOCK):
            digest.update(block)
            dst.write(block)
        if sync:
            dst.flush()
            os.fsync(dst.fileno())
    got = digest.hexdigest()
    if expected_hash and got != expected_hash:
        raise OSError(f"{source} changed since it was inventoried (hash {got} != {expected_hash})")
    return got


# ----------------------------------------------------------------------------- tree export


def export_tree(
    plan: pl.DataFrame,
    out_dir: Path,
    mode: str = "symlink",
    *,
    jpeg_quality: int = 95,
    progress: ProgressFn | None = None,
) -> ExportSummary:
    """Export the plan as ``out_dir/<split>/<rel_path>``: symlinks, hardlinks or copies.

    Images with fixes or a rotation are written as new, fixed files (the extension follows
    the fix); tar members are written as files whatever the mode. A re-run skips files that
    are already right and replaces ones that are not. Rows that cannot be exported (missing
    source, undecodable, changed since inventory) are listed in ``summary.failed``.

    Outputs of an earlier run that the plan no longer holds (images of a retired shard, or
    newly removed by a filter) are deleted, and so are links whose source is gone: the tree
    always equals the plan. Only files this export wrote (its log names them) are ever
    deleted, so a folder laid over other files loses none of them.
    """
    if mode not in EXPORT_MODES:
        raise ExportError(f"export mode must be one of {EXPORT_MODES}, got {mode!r}")
    start = time.perf_counter()
    out_dir = Path(out_dir).absolute()
    items = plan_items(plan)
    summary = ExportSummary()
    log = _ExportLog(out_dir / EXPORT_LOG)
    guard = _SourceGuard()
    try:
        for done, item in enumerate(items, 1):
            if item.error is not None:
                summary.failed.append((item.image_id, item.error))
            else:
                try:
                    _export_one(item, out_dir, mode, jpeg_quality, log, guard, summary)
                except _ModeUnsupportedError:
                    raise
                except Exception as exc:  # one bad image never stops the batch
                    summary.failed.append((item.image_id, describe_error(exc)))
            if progress is not None:
                progress(done, len(items))
        failed = {image_id for image_id, _ in summary.failed}
        done = {it.out_rel for it in items if it.image_id not in failed}
        summary.removed = _prune_stale(out_dir, done, {it.out_rel for it in items} - done, log)
    finally:
        log.close()
    summary.seconds = time.perf_counter() - start
    return summary


def _prune_stale(out_dir: Path, done: set[str], failed: set[str], log: _ExportLog) -> int:
    """Delete logged outputs that are not in the plan (``done``: exported now; ``failed``:
    planned but not exported, kept unless a link whose source is gone); then the folders this
    leaves empty. Returns how many outputs were deleted."""
    removed = 0
    for rel in sorted(log.paths()):
        if rel in done:  # checked by this very run: no second stat
            continue
        path = out_dir / rel
        if rel in failed and not (path.is_symlink() and not path.exists()):
            continue
        if path.is_symlink() or path.is_file():
            path.unlink()
            removed += 1
        log.forget(rel)
        folder = path.parent
        while folder != out_dir and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
            folder = folder.parent
    return removed


class _ModeUnsupportedError(ExportError):
    """The chosen mode cannot work at all here (hardlinks across filesystems)."""


def _export_one(
    item: _Item,
    out_dir: Path,
    mode: str,
    jpeg_quality: int,
    log: _ExportLog,
    guard: _SourceGuard,
    summary: ExportSummary,
) -> None:
    assert item.recipe is not None
    dest = out_dir / item.out_rel
    # objects and parquet rows are read through the byte reader (core.ingest.sources), never linked
    fed = needs_feed(item.source_path)
    source = Path(item.source_path).absolute()
    if not fed:
        guard.check(dest, source)
    is_member = item.offset is not None or fed
    recipe_text = f"{item.content_hash}|{item.recipe.fingerprint(jpeg_quality)}"
    link = mode in ("symlink", "hardlink") and not is_member and item.fmt is None
    if link:
        _check_source_size(source, item.size_bytes)
        if _link_ok(dest, source, mode):
            if log.get(item.out_rel) is None:  # made before links were logged
                log.record(item.out_rel, mode, 0)
            _skipped(summary, dest)
            return
        with atomic_path(dest) as tmp:
            _make_link(tmp, source, mode)
        log.record(item.out_rel, mode, 0)  # links are logged too, so a later plan can remove them
        summary.written += 1
        summary.files.append(str(dest))
        return
    if _logged_ok(dest, log, recipe_text, item):
        _skipped(summary, dest)
        return
    with atomic_path(dest) as tmp:
        if item.fmt is None and not is_member:
            copy_verified(source, tmp, item.content_hash, sync=False)
        else:
            data = _source_bytes(item)
            if item.fmt is not None:
                data = render_fixed(data, item.recipe, item.fmt, jpeg_quality=jpeg_quality)
            tmp.write_bytes(data)
    size = dest.stat().st_size
    log.record(item.out_rel, recipe_text, size)
    summary.written += 1
    summary.fixed += int(item.fmt is not None)
    summary.bytes += size
    summary.files.append(str(dest))


def _skipped(summary: ExportSummary, dest: Path) -> None:
    summary.skipped += 1
    summary.files.append(str(dest))


def _source_bytes(item: _Item) -> bytes:
    """The planned bytes of a file or tar member, refused when they no longer hash as inventoried."""
    data = read_bytes(item.source_path, item.offset, item.size_bytes if item.offset is not None else None)
    got = xxhash.xxh3_128_hexdigest(data)
    if item.content_hash and got != item.content_hash:
        raise OSError(f"{item.image_id} changed since it was inventoried (hash {got} != {item.content_hash})")
    return data


def _check_source_size(source: Path, size: int) -> None:
    # Links do not read the bytes; a size check still catches a file replaced since inventory.
    actual = source.stat().st_size
    if size and actual != size:
        raise OSError(f"{source} changed since it was inventoried ({actual} bytes, planned {size})")


def _link_ok(dest: Path, source: Path, mode: str) -> bool:
    try:
        if mode == "symlink":
            return dest.is_symlink() and dest.readlink() == source
        return not dest.is_symlink() and dest.exists() and dest.samefile(source)
    except OSError:
        return False


def _make_link(tmp: Path, source: Path, mode: str) -> None:
    if mode == "symlink":
        tmp.symlink_to(source)
        return
    try:
        tmp.hardlink_to(source)
    except OSError as exc:
        if exc.errno in (errno.EXDEV, errno.EPERM, errno.ENOTSUP, errno.EMLINK):
            raise _ModeUnsupportedError(
                f"cannot hardlink {source} into {tmp.parent} ({os.strerror(exc.errno)}); "
                "hardlinks need the export folder on the same filesystem as the dataset: "
                "use mode 'copy' or 'symlink'"
            ) from exc
        raise


def _logged_ok(dest: Path, log: _ExportLog, recipe_text: str, item: _Item) -> bool:
    """True when ``dest`` is a finished output of this very recipe (a re-run may skip it)."""
    try:
        if dest.is_symlink() or not dest.is_file():
            return False
        size = dest.stat().st_size
    except OSError:
        return False
    entry = log.get(item.out_rel)
    if entry is not None:
        return entry == (recipe_text, size)
    # No log line (it was lost): an unchanged copy can still be recognised by its hash.
    return item.fmt is None and size == item.size_bytes and hash_file(dest) == item.content_hash


class _SourceGuard:
    """Refuses an output path that is the source itself (an export folder laid over the dataset)."""

    def __init__(self) -> None:
        self._real_dirs: dict[Path, Path] = {}

    def check(self, dest: Path, source: Path) -> None:
        if self._real(dest.parent) / dest.name == self._real(source.parent) / source.name:
            raise OSError(f"the output {dest} is the source file itself; export into a separate folder")

    def _real(self, folder: Path) -> Path:
        real = self._real_dirs.get(folder)
        if real is None:
            real = self._real_dirs[folder] = folder.resolve()
        return real


class _ExportLog:
    """Append-only record of files written: ``{"path", "recipe", "size"}`` per line, last one wins.

    It is not fsync'd: the files themselves are atomic, and a lost line only makes a re-run
    redo (or re-hash) that file.
    """

    def __init__(self, path: Path):
        self.path = path
        self._entries: dict[str, tuple[str, int]] = {}
        if path.is_file():
            for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    rec = json.loads(line)
                    if rec.get("removed"):
                        self._entries.pop(rec["path"], None)
                    else:
                        self._entries[rec["path"]] = (rec["recipe"], int(rec["size"]))
                except (ValueError, KeyError, TypeError, AttributeError):
                    continue  # a torn last line after a crash
        self._handle: io.TextIOWrapper | None = None

    def get(self, rel: str) -> tuple[str, int] | None:
        return self._entries.get(rel)

    def paths(self) -> list[str]:
        return list(self._entries)

    def record(self, rel: str, recipe: str, size: int) -> None:
        self._append({"path": rel, "recipe": recipe, "size": size})
        self._entries[rel] = (recipe, size)

    def forget(self, rel: str) -> None:
        """The output at ``rel`` was deleted: a later log read no longer lists it."""
        self._append({"path": rel, "removed": True})
        self._entries.pop(rel, None)

    def _append(self, record: dict[str, Any]) -> None:
        if self._handle is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._handle = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - kept open for the run
        self._handle.write(json.dumps(record) + "\n")
        self._handle.flush()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


# ----------------------------------------------------------------------------- webdataset export


@dataclass(frozen=True)
class _ShardPlan:
    split: str
    index: int
    items: tuple[_Item, ...]

    def name(self, prefix: str) -> str:
        return f"{prefix}-{self.index:06d}.tar"

    def fingerprint(self, jpeg_quality: int) -> str:
        digest = xxhash.xxh3_128()
        for it in self.items:
            recipe = it.recipe.fingerprint(jpeg_quality) if it.recipe else it.error
            digest.update(f"{it.image_id}\t{it.content_hash}\t{recipe}\n".encode())
        return digest.hexdigest()


def assign_shards(items: Sequence[_Item], shard_max_count: int, shard_max_bytes: int) -> list[_ShardPlan]:
    """Cut each split's items (in plan order) into shards by count and by estimated tar size.

    The estimate uses the source sizes, so the assignment depends on the plan alone and a
    re-run finds the same shards; a re-encoded image may make a shard a little larger.
    """
    if shard_max_count < 1 or shard_max_bytes < 1:
        raise ExportError("shard_max_count and shard_max_bytes must be positive")
    shards: list[_ShardPlan] = []
    by_split: dict[str, list[_Item]] = {}
    for it in items:
        by_split.setdefault(it.split, []).append(it)
    for split, split_items in by_split.items():
        current: list[_Item] = []
        current_bytes = 0
        index = 0
        for it in split_items:
            cost = _member_cost(it.size_bytes) + _member_cost(256)  # image + its .json
            if current and (len(current) >= shard_max_count or current_bytes + cost > shard_max_bytes):
                shards.append(_ShardPlan(split, index, tuple(current)))
                index += 1
                current, current_bytes = [], 0
            current.append(it)
            current_bytes += cost
        if current:
            shards.append(_ShardPlan(split, index, tuple(current)))
    return shards


def _member_cost(size: int) -> int:
    return _TAR_BLOCK + -(-size // _TAR_BLOCK) * _TAR_BLOCK


def export_webdataset(
    plan: pl.DataFrame,
    out_dir: Path,
    *,
    shard_max_count: int = 10000,
    shard_max_bytes: int = 1 << 30,
    prefix: str = "curated",
    jpeg_quality: int = 95,
    progress: ProgressFn | None = None,
) -> ExportSummary:
    """Write ``out_dir/<split>/<prefix>-000000.tar`` ... with members ``<key>.<ext>`` and ``<key>.json``.

    The ``.json`` member holds the image_id, split, source hash, fixes and rotation, so the
    key ↔ image_id mapping travels with the data (and :func:`write_manifest` records it too).
    Each shard is written to a temporary name and renamed; a sidecar ``<shard>.tar.json``
    written after it records which plan rows it holds, so a re-run skips finished shards.
    Shards of an earlier, longer plan beyond the new last index are removed.
    """
    if not prefix or _KEY_UNSAFE.sub("", prefix.replace(".", "")) != prefix.replace(".", ""):
        raise ExportError(f"prefix {prefix!r} must be letters, digits, '_', '-' or '.'")
    start = time.perf_counter()
    out_dir = Path(out_dir).absolute()
    items = plan_items(plan)
    shards = assign_shards(items, shard_max_count, shard_max_bytes)
    source_tars = {Path(it.source_path).resolve() for it in items if it.offset is not None}
    summary = ExportSummary()
    done = 0
    for shard in shards:
        tar_path = out_dir / shard.split / shard.name(prefix)
        if tar_path.resolve() in source_tars:  # an output folder laid over WebDataset input
            raise ExportError(f"the output shard {tar_path} is a source tar; export into a separate folder")
        fingerprint = shard.fingerprint(jpeg_quality)
        previous = _finished_shard(tar_path, fingerprint)
        if previous is not None:
            summary.skipped += len(shard.items) - len(previous)
            summary.failed.extend(previous)
        else:
            _write_shard(shard, tar_path, fingerprint, jpeg_quality, summary)
        summary.files.append(str(tar_path))
        done += len(shard.items)
        if progress is not None:
            progress(done, len(items))
    _remove_stale_shards(out_dir, shards, prefix)
    summary.seconds = time.perf_counter() - start
    return summary


def _sidecar(tar_path: Path) -> Path:
    return tar_path.with_name(tar_path.name + ".json")


def _finished_shard(tar_path: Path, fingerprint: str) -> list[tuple[str, str]] | None:
    """The failures recorded for a finished shard of this fingerprint, or None when it must be written."""
    sidecar = _sidecar(tar_path)
    if not (tar_path.is_file() and sidecar.is_file()):
        return None
    try:
        meta = json.loads(sidecar.read_text(encoding="utf-8"))
        if meta.get("fingerprint") != fingerprint or meta.get("tar_bytes") != tar_path.stat().st_size:
            return None
        return [(str(a), str(b)) for a, b in meta.get("failed", [])]
    except (OSError, ValueError, TypeError):
        return None


def _write_shard(
    shard: _ShardPlan, tar_path: Path, fingerprint: str, jpeg_quality: int, summary: ExportSummary
) -> None:
    failed: list[tuple[str, str]] = []
    members: list[dict[str, str]] = []
    written = fixed = 0
    _sidecar(tar_path).unlink(missing_ok=True)  # the tar is about to change: its record is void
    with atomic_path(tar_path) as tmp, tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        for it in shard.items:
            try:
                if it.error is not None:
                    raise ValueError(it.error)
                data, ext = _sample_bytes(it, jpeg_quality)
            except Exception as exc:  # recorded and left out; the shard still completes
                failed.append((it.image_id, it.error or describe_error(exc)))
                continue
            key = webdataset_key(it.image_id)
            _add_member(tar, f"{key}.{ext}", data)
            _add_member(tar, f"{key}.json", _sample_json(it))
            members.append({"key": key, "image_id": it.image_id, "member": f"{key}.{ext}"})
            written += 1
            fixed += int(it.fmt is not None)
    size = tar_path.stat().st_size
    meta = {"fingerprint": fingerprint, "tar_bytes": size, "members": members, "failed": failed}
    with atomic_path(_sidecar(tar_path)) as tmp:
        tmp.write_text(json.dumps(meta), encoding="utf-8")
    summary.written += written
    summary.fixed += fixed
    summary.bytes += size
    summary.failed.extend(failed)


def _sample_bytes(item: _Item, jpeg_quality: int) -> tuple[bytes, str]:
    assert item.recipe is not None
    data = _source_bytes(item)
    if item.fmt is not None:
        data = render_fixed(data, item.recipe, item.fmt, jpeg_quality=jpeg_quality)
    ext = extension_of(item.out_rel)
    if not ext:  # a loader picks its decoder by extension; name the real format
        real = sniff_format(data[:32])
        ext = FORMAT_EXTENSIONS[real][0] if real else "bin"
    return data, ext


def _sample_json(item: _Item) -> bytes:
    assert item.recipe is not None
    record = {
        "image_id": item.image_id,
        "split": item.split,
        "content_hash": item.content_hash,
        "fixes": list(item.recipe.fixes),
        "rotate": item.recipe.rotate,
    }
    return json.dumps(record, sort_keys=True).encode()


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    info.mtime = 0  # identical plans give byte-identical shards
    tar.addfile(info, io.BytesIO(data))


def _remove_stale_shards(out_dir: Path, shards: Sequence[_ShardPlan], prefix: str) -> None:
    """Remove this prefix's shards that the current plan no longer has (a shorter plan than last time)."""
    pattern = re.compile(rf"{re.escape(prefix)}-(\d{{6}})\.tar(\.json)?")
    wanted = {(s.split, s.name(prefix)) for s in shards}
    splits = {s.split for s in shards}
    for split in splits:
        folder = out_dir / split
        for path in folder.iterdir():
            match = pattern.fullmatch(path.name)
            if match and (split, f"{prefix}-{match.group(1)}.tar") not in wanted:
                path.unlink()


def read_webdataset_ids(tar_paths: Iterable[Path | str]) -> list[str]:
    """The image_ids stored in WebDataset shards, in member order (from each sample's ``.json``)."""
    ids: list[str] = []
    for tar_path in tar_paths:
        with tarfile.open(tar_path, "r") as tar:
            for member in tar:
                if member.isfile() and member.name.endswith(".json"):
                    handle = tar.extractfile(member)
                    assert handle is not None
                    ids.append(json.loads(handle.read())["image_id"])
    return ids


def read_webdataset_sample(tar_path: Path | str, image_id: str) -> tuple[str, bytes]:
    """(member name, bytes) of one image in a shard, found through the ``.json`` members."""
    key = webdataset_key(image_id)
    with tarfile.open(tar_path, "r") as tar:
        for member in tar:
            if member.isfile() and member.name.startswith(f"{key}.") and not member.name.endswith(".json"):
                handle = tar.extractfile(member)
                assert handle is not None
                return member.name, handle.read()
    raise KeyError(f"{image_id} is not in {tar_path}")
