"""The review manifest and its static review page: machine flags in, human decisions back.

Pure library, no Dagster. Three steps, each a plain function:

- :func:`build_review_manifest` folds the long table of machine flags (leaks, label issues,
  duplicates, quality, external tools) into one row per flagged image, maps every flag to
  the standard tag taxonomy (:data:`TAGS`) and proposes a machine action;
- :func:`write_review_page` writes ``review.html`` plus small thumbnails: a reviewer filters,
  tags with the keyboard and exports a decisions CSV;
- :func:`merge_human_decisions` reads that CSV back into the manifest. Human decisions win
  over machine flags; anything the CSV says that the manifest cannot hold (an unknown
  image, tag or action) is an error naming the CSV line, never a silent drop.
"""

from __future__ import annotations

import csv
import hashlib
import html
import json
import os
import re
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import polars as pl
from PIL import Image

from curation_assets.core.ingest.images import describe_error, load_rgb, read_bytes

TAGS: tuple[str, ...] = (
    "mislabel_confirmed",
    "mislabel_uncertain",
    "outlier_valid",
    "outlier_invalid",
    "duplicate_exact",
    "duplicate_near",
    "low_quality_blur",
    "low_quality_corrupt",
    "ambiguous_class",
    "train_test_leak",
    "keep",
    "remove",
    "relabel",
)
ACTIONS: tuple[str, ...] = ("keep", "remove", "relabel")
# The action tags mirror user_action; the other ten fit the number keys 1-9, 0 on the page.
ACTION_TAGS = frozenset(ACTIONS)
DECISION_COLUMNS: tuple[str, ...] = ("image_id", "user_tags", "user_action", "new_label", "reviewer")
TAG_SEPARATOR = ";"

# Machine tags that make the machine propose an action on its own. Conservative on purpose:
# exact copies and undecodable files are safe to drop; a leak, an outlier or an uncertain
# mislabel needs a human (which copy of a leak goes depends on the project).
DEFAULT_AUTO_REMOVE: tuple[str, ...] = ("duplicate_exact", "low_quality_corrupt")
DEFAULT_AUTO_RELABEL: tuple[str, ...] = ("mislabel_confirmed",)
DEFAULT_CONFIRM_AT = 0.9  # a machine mislabel this confident (and with a suggestion) counts as confirmed

MANIFEST_SCHEMA: dict[str, pl.DataType] = {
    "image_id": pl.String(),
    "split": pl.String(),
    "label": pl.String(),
    "flags": pl.List(pl.String()),
    "details": pl.String(),
    "confidence": pl.Float64(),
    "suggested_label": pl.String(),
    "machine_tags": pl.List(pl.String()),
    "machine_action": pl.String(),
    "user_tags": pl.List(pl.String()),
    "user_action": pl.String(),
    "new_label": pl.String(),
    "reviewer": pl.String(),
    "source_path": pl.String(),
    "offset": pl.Int64(),
    "size_bytes": pl.Int64(),
}
_FLAG_COLUMNS = ("image_id", "source", "flag")
_FLAG_OPTIONAL: dict[str, pl.DataType] = {
    "detail": pl.String(),
    "confidence": pl.Float64(),
    "suggested_label": pl.String(),
}
_IMAGE_OPTIONAL: dict[str, pl.DataType] = {
    "split": pl.String(),
    "label": pl.String(),
    "offset": pl.Int64(),
    "size_bytes": pl.Int64(),
}
_NON_WORD = re.compile(r"[^a-z0-9]+")
_CORRUPT_WORDS = ("corrupt", "truncat", "unreadable", "broken", "decode", "damaged")
_EXACT_WORDS = ("exact", "byte", "pixel", "identical")
THUMB_QUALITY = 85
THUMB_DIR = "thumbs"
_THUMB_NAME = re.compile(r"^[0-9a-f]{20}\.jpg$")


# ----------------------------------------------------------------------------- manifest


def machine_tag(
    source: str, flag: str, confidence: float | None, confirm_at: float = DEFAULT_CONFIRM_AT
) -> str | None:
    """The taxonomy tag a machine flag stands for, or None when the taxonomy has no word for it.

    Matching is by keyword on the lower-cased flag, so other tools' spellings work
    ("mislabels", "Label Issue", "near-duplicate", "blurry"). A flag that already is a tag
    maps to itself; every flag from the ``leak`` source is a train/test leak. A mislabel
    flag is *confirmed* only when its confidence reaches ``confirm_at``; outliers map to
    ``outlier_invalid`` (the machine's claim) and the reviewer flips true-but-rare ones to
    ``outlier_valid``.
    """
    word = _NON_WORD.sub("_", str(flag).lower()).strip("_")
    source = str(source).lower()
    if word in TAGS:
        return word
    if source == "leak" or "leak" in word:
        return "train_test_leak"
    if "mislabel" in word or word in {"label_issue", "label_issues", "wrong_label", "label_error"}:
        sure = confidence is not None and confidence >= confirm_at
        return "mislabel_confirmed" if sure else "mislabel_uncertain"
    if "outlier" in word:
        return "outlier_invalid"
    if "ambiguous" in word:
        return "ambiguous_class"
    if source == "duplicate" or "dup" in word:
        return "duplicate_exact" if any(w in word for w in _EXACT_WORDS) else "duplicate_near"
    if "blur" in word:
        return "low_quality_blur"
    if any(w in word for w in _CORRUPT_WORDS):
        return "low_quality_corrupt"
    return None


def build_review_manifest(
    flags: pl.DataFrame,
    images: pl.DataFrame,
    *,
    confirm_at: float = DEFAULT_CONFIRM_AT,
    auto_remove: Sequence[str] = DEFAULT_AUTO_REMOVE,
    auto_relabel: Sequence[str] = DEFAULT_AUTO_RELABEL,
) -> pl.DataFrame:
    """One row per flagged image (schema :data:`MANIFEST_SCHEMA`), sorted by image_id.

    ``flags``: image_id, source, flag and optionally detail, confidence, suggested_label.
    ``images``: image_id, source_path and optionally split, label, offset, size_bytes (the
    thumbnail is read from there). ``flags`` lists ``source/flag`` strings; ``details`` one
    line per flag; ``confidence`` the highest; ``suggested_label`` that of the most
    confident flag that has one. ``machine_action`` is what the machine alone would do:
    ``remove`` when a tag is in ``auto_remove``, else ``relabel`` when a tag is in
    ``auto_relabel`` and there is a suggested label, else null (kept). The user columns
    start empty.

    A flagged image_id missing from ``images`` is an error: the flag cannot be reviewed or
    applied, and it usually means the flags came from another dataset or version.
    """
    _check_tags(auto_remove, "auto_remove")
    _check_tags(auto_relabel, "auto_relabel")
    flags = _with_optional(_require(flags, _FLAG_COLUMNS, "flags"), _FLAG_OPTIONAL)
    images = _with_optional(_require(images, ("image_id", "source_path"), "images"), _IMAGE_OPTIONAL)
    repeated = images.filter(pl.col("image_id").is_duplicated())["image_id"].unique().sort()
    if len(repeated):
        raise ValueError(
            f"images: {len(repeated)} image_id(s) listed twice, e.g. {repeated.head(3).to_list()}"
        )
    if flags["image_id"].null_count() or flags["flag"].null_count() or flags["source"].null_count():
        raise ValueError("flags: image_id, source and flag must not be null")
    unknown = flags.join(images.select("image_id"), on="image_id", how="anti")["image_id"].unique().sort()
    if len(unknown):
        raise ValueError(
            f"flags name {len(unknown)} image(s) that are not in the images table, "
            f"e.g. {unknown.head(3).to_list()}"
        )

    if flags.is_empty():
        return pl.DataFrame(schema=MANIFEST_SCHEMA)
    folded = _fold_flags(_tagged_flags(flags.cast({"source": pl.String, "flag": pl.String}), confirm_at))
    remove_hit = pl.col("machine_tags").list.eval(pl.element().is_in(list(auto_remove))).list.any()
    relabel_hit = pl.col("machine_tags").list.eval(pl.element().is_in(list(auto_relabel))).list.any()
    info = images.select("image_id", "split", "label", "source_path", "offset", "size_bytes")
    return (
        folded.join(info.cast({k: MANIFEST_SCHEMA[k] for k in info.columns}), on="image_id", how="left")
        .with_columns(
            # Remove beats relabel; a relabel needs a label to go to.
            machine_action=pl.when(remove_hit)
            .then(pl.lit("remove"))
            .when(relabel_hit & pl.col("suggested_label").is_not_null())
            .then(pl.lit("relabel")),
            user_tags=pl.lit([], pl.List(pl.String())),
            user_action=pl.lit(None, pl.String()),
            new_label=pl.lit(None, pl.String()),
            reviewer=pl.lit(None, pl.String()),
        )
        .select(list(MANIFEST_SCHEMA))
        .cast(MANIFEST_SCHEMA)
        .sort("image_id")
    )


def _tagged_flags(flags: pl.DataFrame, confirm_at: float) -> pl.DataFrame:
    """Flags with their taxonomy tag and a readable detail line.

    The keyword mapping runs in Python once per distinct (source, flag) pair, not per row:
    millions of flag rows share a handful of spellings.
    """
    pairs = flags.select("source", "flag").unique()
    sure = [machine_tag(s, f, confirm_at, confirm_at) for s, f in pairs.iter_rows()]
    unsure = [machine_tag(s, f, None, confirm_at) for s, f in pairs.iter_rows()]
    pairs = pairs.with_columns(
        _sure=pl.Series(sure, dtype=pl.String()), _unsure=pl.Series(unsure, dtype=pl.String())
    )
    sure_enough = pl.col("confidence").fill_null(float("-inf")) >= confirm_at
    optional = [
        pl.when(pl.col("detail").is_not_null() & (pl.col("detail") != ""))
        .then(pl.lit(": ") + pl.col("detail"))
        .otherwise(pl.lit("")),
        pl.when(pl.col("confidence").is_not_null())
        .then(pl.lit(" (confidence ") + pl.col("confidence").round_sig_figs(3).cast(pl.String) + pl.lit(")"))
        .otherwise(pl.lit("")),
        pl.when(pl.col("suggested_label").is_not_null())
        .then(pl.lit(" (suggests ") + pl.col("suggested_label") + pl.lit(")"))
        .otherwise(pl.lit("")),
    ]
    return flags.join(pairs, on=["source", "flag"], how="left").with_columns(
        flag_key=pl.col("source") + pl.lit("/") + pl.col("flag"),
        tag=pl.when(sure_enough).then(pl.col("_sure")).otherwise(pl.col("_unsure")),
        detail_line=pl.concat_str([pl.col("source") + pl.lit("/") + pl.col("flag"), *optional]),
    )


def _fold_flags(tagged: pl.DataFrame) -> pl.DataFrame:
    """One row per image: flags, details, highest confidence, best suggestion, tags in TAGS order."""
    tag_order = pl.DataFrame({"tag": list(TAGS), "_tag_order": list(range(len(TAGS)))})
    by_confidence = pl.col("confidence").fill_null(-1.0)
    return (
        tagged.join(tag_order, on="tag", how="left")
        .sort("image_id", "source", "flag", "detail_line")
        .group_by("image_id", maintain_order=True)
        .agg(
            flags=pl.col("flag_key").unique().sort(),
            details=pl.col("detail_line").unique(maintain_order=True).str.join("\n"),
            confidence=pl.col("confidence").max(),
            # The most confident flag that suggests a label; ties go to the first in source/flag order.
            suggested_label=pl.col("suggested_label")
            .sort_by(by_confidence, descending=True, maintain_order=True)
            .drop_nulls()
            .first(),
            machine_tags=pl.col("tag").sort_by("_tag_order").drop_nulls().unique(maintain_order=True),
        )
    )


def _require(frame: pl.DataFrame, columns: Iterable[str], name: str) -> pl.DataFrame:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{name}: missing column(s) {missing}; found {frame.columns}")
    return frame


def _with_optional(frame: pl.DataFrame, optional: dict[str, pl.DataType]) -> pl.DataFrame:
    absent = {c: pl.lit(None, dtype) for c, dtype in optional.items() if c not in frame.columns}
    present = {c: dtype for c, dtype in optional.items() if c in frame.columns}
    return frame.with_columns(**absent).cast(present)


def _check_tags(tags: Iterable[str], what: str) -> None:
    unknown = sorted(set(tags) - set(TAGS))
    if unknown:
        raise ValueError(f"{what}: unknown tag(s) {unknown}; allowed: {', '.join(TAGS)}")


# ----------------------------------------------------------------------------- human decisions


def merge_human_decisions(manifest: pl.DataFrame, decisions_csv: Path | None) -> pl.DataFrame:
    """``manifest`` with the reviewer's decisions from the page's CSV export; they win over machine flags.

    The CSV has the columns :data:`DECISION_COLUMNS` (others are ignored): user_tags joined
    by ``;``, user_action one of keep/remove/relabel or empty. Rules that keep a decision
    unambiguous:

    - the action tags (keep, remove, relabel) mirror user_action: an empty action with one
      action tag takes that action; a contradicting or second action tag is an error;
    - a new_label without an action means relabel; a relabel without new_label takes the
      image's suggested_label, and is an error when there is none; a new_label on a keep
      or remove is an error;
    - an image_id that is not in the manifest, an unknown tag or action, a missing column
      or an image listed twice is an error naming the CSV line.

    Images not in the CSV keep their user columns. ``decisions_csv=None`` returns the
    manifest unchanged (nothing reviewed yet); a path that does not exist is an error.
    """
    if decisions_csv is None:
        return manifest
    path = Path(decisions_csv)
    if not path.is_file():
        raise FileNotFoundError(f"review decisions file not found: {path}")
    suggested = dict(zip(manifest["image_id"], manifest["suggested_label"], strict=True))
    decisions = _read_decisions(path, suggested)
    if not decisions:
        return manifest
    table = pl.DataFrame(
        decisions,
        schema={
            "image_id": pl.String(),
            "_tags": pl.List(pl.String()),
            "_action": pl.String(),
            "_label": pl.String(),
            "_reviewer": pl.String(),
        },
        orient="row",
    ).with_columns(_decided=pl.lit(True))
    decided = pl.col("_decided").fill_null(False)
    return (
        manifest.join(table, on="image_id", how="left")
        .with_columns(
            user_tags=pl.when(decided).then(pl.col("_tags")).otherwise(pl.col("user_tags")),
            user_action=pl.when(decided).then(pl.col("_action")).otherwise(pl.col("user_action")),
            new_label=pl.when(decided).then(pl.col("_label")).otherwise(pl.col("new_label")),
            reviewer=pl.when(decided).then(pl.col("_reviewer")).otherwise(pl.col("reviewer")),
        )
        .select(manifest.columns)
    )


def _read_decisions(path: Path, suggested: dict[str, str | None]) -> list[tuple]:
    # utf-8-sig: a CSV saved again by a spreadsheet program starts with a byte-order mark.
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        found = reader.fieldnames or []
        missing = [c for c in DECISION_COLUMNS if c not in found]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}; found {found}")
        seen: dict[str, int] = {}
        out = []
        for row in reader:
            line = reader.line_num
            image_id = (row["image_id"] or "").strip()
            if not image_id:
                raise ValueError(f"{path} line {line}: empty image_id")
            if image_id not in suggested:
                raise ValueError(
                    f"{path} line {line}: image_id {image_id!r} is not in the review manifest "
                    "(was it flagged in an earlier run? remove the line to go on)"
                )
            if image_id in seen:
                raise ValueError(
                    f"{path} line {line}: image_id {image_id!r} already decided on line {seen[image_id]}"
                )
            seen[image_id] = line
            out.append(_parse_decision(row, image_id, suggested[image_id], f"{path} line {line}"))
        return out


def _parse_decision(row: dict[str, str | None], image_id: str, suggested: str | None, where: str) -> tuple:
    tags = [t.strip() for t in (row["user_tags"] or "").split(TAG_SEPARATOR) if t.strip()]
    unknown = [t for t in tags if t not in TAGS]
    if unknown:
        raise ValueError(f"{where} ({image_id}): unknown tag(s) {unknown}; allowed: {', '.join(TAGS)}")
    tags = list(dict.fromkeys(tags))
    action = (row["user_action"] or "").strip().lower() or None
    if action is not None and action not in ACTIONS:
        raise ValueError(
            f"{where} ({image_id}): unknown user_action {action!r}; allowed: {', '.join(ACTIONS)}"
        )
    new_label = (row["new_label"] or "").strip() or None
    action_tags = [t for t in tags if t in ACTION_TAGS]
    if len(set(action_tags + ([action] if action else []))) > 1:
        raise ValueError(
            f"{where} ({image_id}): contradicting actions: user_action {action!r}, tags {action_tags}"
        )
    action = action or (action_tags[0] if action_tags else None) or ("relabel" if new_label else None)
    if new_label is not None and action != "relabel":
        raise ValueError(f"{where} ({image_id}): new_label {new_label!r} given with user_action {action!r}")
    if action == "relabel" and new_label is None:
        if suggested is None:
            raise ValueError(f"{where} ({image_id}): relabel without new_label and no suggested_label")
        new_label = suggested
    if action is not None and action not in tags:
        tags.append(action)
    tags = [t for t in TAGS if t in tags]
    reviewer = (row["reviewer"] or "").strip() or None
    return (image_id, tags, action, new_label, reviewer)


# ----------------------------------------------------------------------------- review page


def write_review_page(
    manifest: pl.DataFrame,
    out_dir: Path,
    *,
    thumb_side: int = 160,
    title: str = "Review flagged images",
    workers: int = 4,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write ``out_dir/review.html`` and ``out_dir/thumbs/*.jpg``; returns the page's path.

    The page is self-contained (inline CSS and JS, the manifest embedded as JSON, thumbnails
    by relative link), so the folder can be opened from disk, copied or zipped. Thumbnails
    are re-encoded JPEGs at most ``thumb_side`` pixels on a side, read through the same
    path as every stage (never the originals, which may be huge or inside tar shards).
    Their names hash where they come from, so a rewrite after merging decisions reuses
    them; thumbnails no row needs any more are deleted. An image that cannot be read gets
    a placeholder with the error; it never stops the page.
    """
    _require(manifest, ("image_id", "flags", "machine_tags", "user_tags", "source_path"), "manifest")
    if thumb_side < 16:
        raise ValueError(f"thumb_side must be at least 16, got {thumb_side}")
    out_dir = Path(out_dir)
    thumbs = out_dir / THUMB_DIR
    thumbs.mkdir(parents=True, exist_ok=True)
    frame = _with_optional(manifest, {k: v for k, v in MANIFEST_SCHEMA.items() if k not in manifest.columns})
    records = frame.select(list(MANIFEST_SCHEMA)).to_dicts()
    made = _make_thumbnails(records, thumbs, thumb_side, workers, progress)
    _prune_thumbnails(thumbs, {name for name, _ in made if name is not None})
    rows = []
    for record, (name, error) in zip(records, made, strict=True):
        row = {k: record[k] for k in MANIFEST_SCHEMA if k not in ("source_path", "offset", "size_bytes")}
        row["user_tags"] = row["user_tags"] or []
        row["thumb"] = None if name is None else f"{THUMB_DIR}/{name}"
        row["thumb_error"] = error
        rows.append(row)
    data = {"tags": list(TAGS), "actions": list(ACTIONS), "columns": list(DECISION_COLUMNS), "rows": rows}
    page = (
        _PAGE.replace("__TITLE__", html.escape(title, quote=True))
        .replace("__COUNT__", str(len(rows)))
        .replace("__DATA__", _script_json(data))
    )
    path = out_dir / "review.html"
    _write_atomic(path, lambda tmp: tmp.write_text(page, encoding="utf-8"))
    return path


def _script_json(data: Any) -> str:
    """JSON safe inside a <script> element: no '<', '>' or '&' can close it or open a comment."""
    text = json.dumps(data, ensure_ascii=False, allow_nan=False)
    for char, code in (
        ("<", "\\u003c"),
        (">", "\\u003e"),
        ("&", "\\u0026"),
        ("\u2028", "\\u2028"),
        ("\u2029", "\\u2029"),
    ):
        text = text.replace(char, code)
    return text


def _thumb_name(record: dict[str, Any], side: int) -> str:
    where = (record["image_id"], record["source_path"], record["offset"], record["size_bytes"], side)
    return hashlib.sha1(repr(where).encode()).hexdigest()[:20] + ".jpg"


def _make_thumbnails(
    records: list[dict[str, Any]],
    folder: Path,
    side: int,
    workers: int,
    progress: Callable[[int, int], None] | None,
) -> list[tuple[str | None, str | None]]:
    """(file name, None) or (None, error) per record, in order."""

    def make(record: dict[str, Any]) -> tuple[str | None, str | None]:
        if record["source_path"] is None:
            return None, "no source path"
        name = _thumb_name(record, side)
        target = folder / name
        if target.is_file():  # same image, same size: made by an earlier run
            return name, None
        try:
            data = read_bytes(record["source_path"], record["offset"], record["size_bytes"])
            image = load_rgb(data, draft_size=(side, side))
            image.thumbnail((side, side), Image.Resampling.LANCZOS)
            _write_atomic(target, lambda tmp: image.save(tmp, "JPEG", quality=THUMB_QUALITY))
        except Exception as exc:  # one unreadable image must not cost the whole page
            return None, f"cannot read {record['source_path']}: {describe_error(exc)}"
        return name, None

    total = len(records)
    results: list[tuple[str | None, str | None]] = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for done, result in enumerate(pool.map(make, records), start=1):
            results.append(result)
            if progress is not None:
                progress(done, total)
    return results


def _prune_thumbnails(folder: Path, keep: set[str]) -> None:
    for path in folder.iterdir():
        if _THUMB_NAME.match(path.name) and path.name not in keep:
            path.unlink(missing_ok=True)


def _write_atomic(path: Path, write: Callable[[Path], Any]) -> None:
    """Write through a temp name in the same folder and rename: no half-written file looks whole."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{id(write)}.tmp")
    try:
        write(tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


# The page. Every value from the manifest reaches the DOM through textContent, attribute
# setters or option labels, never through innerHTML, so an image_id or label holding markup
# stays text. The title is HTML-escaped in Python; the data is JSON escaped for <script>.
_PAGE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>__TITLE__</title>
<style>
:root { --line: #d0d4da; --muted: #5b6470; --focus: #1f6feb; }
* { box-sizing: border-box; }
body { margin: 0; font: 13px/1.4 system-ui, sans-serif; color: #1c2128; background: #f6f8fa; }
header { position: sticky; top: 0; z-index: 2; background: #fff; border-bottom: 1px solid var(--line);
  padding: 8px 12px; display: flex; flex-wrap: wrap; gap: 8px 16px; align-items: center; }
header h1 { font-size: 15px; margin: 0 8px 0 0; }
header label { color: var(--muted); }
#help { padding: 6px 12px; color: var(--muted); border-bottom: 1px solid var(--line); background: #fff; }
#help kbd { border: 1px solid var(--line); border-radius: 3px; padding: 0 3px; background: #f6f8fa; }
main { display: grid; grid-template-columns: repeat(auto-fill, minmax(250px, 1fr)); gap: 10px;
  padding: 12px; }
.card { background: #fff; border: 2px solid var(--line); border-radius: 6px; padding: 8px; display: flex;
  flex-direction: column; gap: 4px; }
.card.current { border-color: var(--focus); box-shadow: 0 0 0 2px rgba(31,111,235,.25); }
.card[data-action="remove"] { background: #fff1f0; }
.card[data-action="relabel"] { background: #fffbe6; }
.card[data-action="keep"] { background: #f0fff4; }
.thumb { height: 170px; display: flex; align-items: center; justify-content: center; background: #eef1f4; }
.thumb img { max-width: 100%; max-height: 170px; }
.thumb .broken { color: #b42318; padding: 6px; font-size: 12px; word-break: break-all; }
.id { font-family: ui-monospace, monospace; font-size: 12px; word-break: break-all; }
.meta { color: var(--muted); }
.chips { display: flex; flex-wrap: wrap; gap: 3px; }
.chip { border-radius: 10px; padding: 0 6px; font-size: 11px; border: 1px solid var(--line); }
.flag { background: #eef1f4; }
.mtag { background: #ddf4ff; border-color: #9cd0ff; }
.tagbtn { cursor: pointer; background: #fff; color: var(--muted); }
.tagbtn.on { background: #1f6feb; border-color: #1f6feb; color: #fff; }
.row { display: flex; gap: 4px; align-items: center; }
.row input { flex: 1; min-width: 0; }
.actbtn { cursor: pointer; }
.actbtn.on { font-weight: bold; outline: 2px solid var(--focus); }
details pre { white-space: pre-wrap; word-break: break-word; margin: 2px 0; font-size: 11px; }
</style>
</head>
<body>
<header>
  <h1>__TITLE__</h1>
  <span id="shown">__COUNT__ images</span>
  <label>Tag <select id="filter-tag"><option value="">any</option></select></label>
  <label>Flag <select id="filter-flag"><option value="">any</option></select></label>
  <label>Decision <select id="filter-action">
    <option value="">any</option><option value="undecided">undecided</option>
    <option value="keep">keep</option><option value="remove">remove</option>
    <option value="relabel">relabel</option></select></label>
  <label>Reviewer <input id="reviewer" size="10" placeholder="your name"></label>
  <button id="export" type="button">Export decisions</button>
  <span id="status" class="meta"></span>
</header>
<div id="help"><kbd>j</kbd>/<kbd>k</kbd> next/previous &middot; <kbd>1</kbd>&ndash;<kbd>9</kbd>,
<kbd>0</kbd> toggle a tag &middot; <kbd>a</kbd> keep &middot; <kbd>x</kbd> remove &middot;
<kbd>r</kbd> relabel &middot; <kbd>u</kbd> clear the action &middot; <kbd>n</kbd> edit the new label
&middot; <kbd>Esc</kbd> leave a text field. Machine tags are blue; your tags are the buttons.
Export writes every decision on the page (earlier merged ones included) to one CSV.</div>
<main id="grid"></main>
<p><button id="more" type="button" hidden>Show more</button></p>
<script type="application/json" id="manifest-data">__DATA__</script>
<script>
"use strict";
const DATA = JSON.parse(document.getElementById("manifest-data").textContent);
const TAGS = DATA.tags, ACTIONS = DATA.actions, ROWS = DATA.rows;
const KEY_TAGS = TAGS.filter(t => !ACTIONS.includes(t));  // digits 1..9, 0
const KEYS = ["1","2","3","4","5","6","7","8","9","0"];
const TAGSEP = ";";
const grid = document.getElementById("grid");
const reviewerInput = document.getElementById("reviewer");
const more = document.getElementById("more");
const PAGE = 200;  // cards in the page at once: tens of thousands of cards would crawl
let cards = [], matches = [], limit = PAGE, current = -1, dirty = false;

function cardFor(index) {  // built on first use, then kept with its state
  if (!cards[index]) { cards[index] = buildCard(ROWS[index], index); refresh(index); }
  return cards[index];
}

function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}

function buildCard(row, index) {
  const card = el("div", "card");
  card.dataset.index = String(index);
  card.dataset.imageId = row.image_id;
  const thumb = el("div", "thumb");
  if (row.thumb) {
    const img = el("img");
    img.src = row.thumb;
    img.alt = row.image_id;
    img.loading = "lazy";
    thumb.appendChild(img);
  } else {
    thumb.appendChild(el("div", "broken", row.thumb_error || "no thumbnail"));
  }
  card.appendChild(thumb);
  card.appendChild(el("div", "id", row.image_id));
  let meta = [row.split, row.label].filter(v => v !== null && v !== undefined && v !== "").join(" \u00b7 ");
  if (row.suggested_label) meta += " \u2192 suggested: " + row.suggested_label;
  if (row.confidence !== null && row.confidence !== undefined) meta += " (" + row.confidence.toFixed(2) + ")";
  card.appendChild(el("div", "meta", meta));
  const flags = el("div", "chips");
  row.flags.forEach(f => flags.appendChild(el("span", "chip flag", f)));
  card.appendChild(flags);
  const mtags = el("div", "chips");
  row.machine_tags.forEach(t => mtags.appendChild(el("span", "chip mtag", t)));
  if (row.machine_action) mtags.appendChild(el("span", "chip mtag", "machine: " + row.machine_action));
  card.appendChild(mtags);
  const tagbox = el("div", "chips user-tags");
  TAGS.forEach(t => {
    const slot = KEY_TAGS.indexOf(t);
    const b = el("button", "chip tagbtn", (slot >= 0 ? KEYS[slot] + " " : "") + t);
    b.type = "button";
    b.dataset.tag = t;
    b.addEventListener("click", () => { select(index); toggleTag(index, t); });
    tagbox.appendChild(b);
  });
  card.appendChild(tagbox);
  const acts = el("div", "row");
  ACTIONS.forEach(a => {
    const b = el("button", "actbtn", a);
    b.type = "button";
    b.dataset.action = a;
    b.addEventListener("click", () => { select(index); setAction(index, row.user_action === a ? null : a); });
    acts.appendChild(b);
  });
  const label = el("input", "new-label");
  label.placeholder = "new label";
  label.addEventListener("input", () => {
    row.new_label = label.value.trim() || null;
    if (row.new_label && row.user_action !== "relabel") setAction(index, "relabel", true);
    else touch(index);
  });
  acts.appendChild(label);
  card.appendChild(acts);
  if (row.details) {
    const d = el("details");
    d.appendChild(el("summary", null, "details"));
    d.appendChild(el("pre", null, row.details));
    card.appendChild(d);
  }
  card.addEventListener("click", () => select(index));
  return card;
}

function refresh(index) {
  const row = ROWS[index], card = cards[index];
  card.dataset.action = row.user_action || "";
  card.dataset.userTags = row.user_tags.join(TAGSEP);
  card.querySelectorAll(".tagbtn")
    .forEach(b => b.classList.toggle("on", row.user_tags.includes(b.dataset.tag)));
  card.querySelectorAll(".actbtn")
    .forEach(b => b.classList.toggle("on", row.user_action === b.dataset.action));
  const input = card.querySelector(".new-label");
  if (document.activeElement !== input) input.value = row.new_label || "";
  input.placeholder = row.suggested_label ? "new label (" + row.suggested_label + ")" : "new label";
}

function touch(index) {
  // No re-filtering here: a keypress never makes the card being edited vanish. Filters
  // apply when they are changed.
  const row = ROWS[index];
  row.reviewer = reviewerInput.value.trim() || row.reviewer || null;
  dirty = true;
  document.getElementById("status").textContent = "unsaved changes: export before closing";
  refresh(index);
}

function setAction(index, action, keepLabel) {
  const row = ROWS[index];
  row.user_action = action;
  row.user_tags = row.user_tags.filter(t => !ACTIONS.includes(t));
  if (action) row.user_tags.push(action);
  row.user_tags = TAGS.filter(t => row.user_tags.includes(t));
  if (action === "relabel") {
    if (!row.new_label && !keepLabel) row.new_label = row.suggested_label || null;
  } else {
    row.new_label = null;
  }
  touch(index);
}

function toggleTag(index, tag) {
  const row = ROWS[index];
  if (ACTIONS.includes(tag)) { setAction(index, row.user_action === tag ? null : tag); return; }
  if (row.user_tags.includes(tag)) row.user_tags = row.user_tags.filter(t => t !== tag);
  else row.user_tags = TAGS.filter(t => t === tag || row.user_tags.includes(t));
  touch(index);
}

function finalAction(row) { return row.user_action || row.machine_action || "keep"; }

function matchesFilters(row) {
  const tag = document.getElementById("filter-tag").value;
  const flag = document.getElementById("filter-flag").value;
  const action = document.getElementById("filter-action").value;
  return (!tag || row.machine_tags.includes(tag) || row.user_tags.includes(tag))
    && (!flag || row.flags.includes(flag))
    && (!action || (action === "undecided" ? !row.user_action : finalAction(row) === action));
}

function applyFilters() {
  matches = [];
  ROWS.forEach((row, i) => { if (matchesFilters(row)) matches.push(i); });
  limit = PAGE;
  render();
  if (!matches.includes(current)) select(matches.length ? matches[0] : -1, true);
}

function render() {
  grid.replaceChildren(...matches.slice(0, limit).map(cardFor));
  more.hidden = matches.length <= limit;
  more.textContent = "Show " + Math.min(PAGE, matches.length - limit) + " more";
  const partial = matches.length > limit ? " (first " + limit + " shown)" : "";
  document.getElementById("shown").textContent = matches.length + " of " + ROWS.length + " images" + partial;
}

function reveal(index) {
  const pos = matches.indexOf(index);
  if (pos < 0) return false;
  if (pos >= limit) { limit = PAGE * Math.ceil((pos + 1) / PAGE); render(); }
  return true;
}

function select(index, noScroll) {
  if (current >= 0 && cards[current]) cards[current].classList.remove("current");
  current = index;
  if (index < 0) return;
  cardFor(index).classList.add("current");
  if (!noScroll) cards[index].scrollIntoView({block: "nearest"});
}

function move(step) {
  const next = matches.indexOf(current) + step;
  if (next < 0 || next >= matches.length) return;
  reveal(matches[next]);
  select(matches[next]);
}

function csvField(value) {
  const text = value === null || value === undefined ? "" : String(value);
  return '"' + text.replace(/"/g, '""') + '"';
}

function exportDecisions() {
  // The CSV must merge: a relabel without a label would be refused there, so refuse it here.
  const unnamed = ROWS.findIndex(row => row.user_action === "relabel" && !row.new_label);
  if (unnamed >= 0) {
    const count = ROWS.filter(row => row.user_action === "relabel" && !row.new_label).length;
    document.getElementById("status").textContent = "not exported: " + count
      + " relabel decision(s) without a new label (type one, or change the action)";
    if (!matches.includes(unnamed)) {
      ["filter-tag", "filter-flag", "filter-action"]
        .forEach(id => { document.getElementById(id).value = ""; });
      applyFilters();
    }
    reveal(unnamed);
    select(unnamed);
    return;
  }
  const name = reviewerInput.value.trim() || null;
  const lines = [DATA.columns.join(",")];
  ROWS.forEach(row => {
    if (!row.user_tags.length && !row.user_action && !row.new_label) return;
    const label = row.user_action === "relabel" ? row.new_label : null;
    lines.push([row.image_id, row.user_tags.join(TAGSEP), row.user_action, label, row.reviewer || name]
      .map(csvField).join(","));
  });
  const blob = new Blob([lines.join("\n") + "\n"], {type: "text/csv;charset=utf-8"});
  const link = document.createElement("a");
  link.href = URL.createObjectURL(blob);
  link.download = "review_decisions.csv";
  document.body.appendChild(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 10000);
  dirty = false;
  document.getElementById("status").textContent = "exported " + (lines.length - 1) + " decisions";
}

document.addEventListener("keydown", event => {
  const target = event.target;
  const typing = target instanceof HTMLInputElement || target instanceof HTMLSelectElement
    || target instanceof HTMLTextAreaElement;
  if (typing) { if (event.key === "Escape") target.blur(); return; }
  if (event.ctrlKey || event.metaKey || event.altKey) return;
  const key = event.key;
  if (key === "j" || key === "ArrowDown" || key === "ArrowRight") { move(1); event.preventDefault(); return; }
  if (key === "k" || key === "ArrowUp" || key === "ArrowLeft") { move(-1); event.preventDefault(); return; }
  if (current < 0) return;
  const slot = KEYS.indexOf(key);
  if (slot >= 0 && slot < KEY_TAGS.length) { toggleTag(current, KEY_TAGS[slot]); return; }
  const actions = {a: "keep", x: "remove", r: "relabel"};
  if (key in actions) {
    setAction(current, ROWS[current].user_action === actions[key] ? null : actions[key]);
    // A relabel with nothing to suggest needs the new name typed in: go straight there.
    if (ROWS[current].user_action === "relabel" && !ROWS[current].new_label) {
      cardFor(current).querySelector(".new-label").focus();
      event.preventDefault();
    }
    return;
  }
  if (key === "u") { setAction(current, null); return; }
  if (key === "n") { cardFor(current).querySelector(".new-label").focus(); event.preventDefault(); }
});

function fillSelect(id, values) {
  const select = document.getElementById(id);
  values.forEach(v => { const o = el("option", null, v); o.value = v; select.appendChild(o); });
  select.addEventListener("change", () => applyFilters());
}

ROWS.forEach(row => { row.user_tags = row.user_tags || []; });
fillSelect("filter-tag", TAGS);
fillSelect("filter-flag", Array.from(new Set(ROWS.flatMap(r => r.flags))).sort());
document.getElementById("filter-action").addEventListener("change", () => applyFilters());
document.getElementById("export").addEventListener("click", exportDecisions);
more.addEventListener("click", () => { limit += PAGE; render(); });
window.addEventListener("beforeunload", event => {
  if (dirty) { event.preventDefault(); event.returnValue = ""; }
});
applyFilters();
document.body.dataset.ready = "1";
</script>
</body>
</html>
"""
