"""The review manifest and its static review page: machine flags in, human decisions back.

Pure library, no Dagster. Three steps, each a plain function:

- :func:`build_review_manifest` folds the long table of machine flags (leaks, label issues,
  duplicates, quality, external tools) into one row per flagged image, maps every flag to
  the standard tag taxonomy (:data:`TAGS`) and proposes a machine action;
- :func:`write_review_page` writes ``review.html`` (the package-data template
  ``templates/review.html.j2``) plus small thumbnails: a reviewer filters, tags with the
  keyboard and exports a decisions CSV;
- :func:`merge_human_decisions` reads that CSV back into the manifest. Human decisions win
  over machine flags; anything the CSV says that the manifest cannot hold (an unknown
  image, tag or action) is an error naming the CSV line, never a silent drop.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import polars as pl
from markupsafe import Markup
from PIL import Image

from curation_assets.core.atomic import atomic_path, write_text
from curation_assets.core.ingest.images import describe_error, load_rgb, read_bytes
from curation_assets.templates import render as render_template

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
    # The JSON is escaped for a <script> element by _script_json, so it goes in as markup;
    # the title is text and the template escapes it.
    page = render_template(
        "review.html.j2", title=title, count=len(rows), data_json=Markup(_script_json(data))
    )
    return write_text(out_dir / "review.html", page)


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
            # no fsync: thumbnails are many and only previews; a sync each would slow the page down
            with atomic_path(target, fsync=False) as tmp:
                image.save(tmp, "JPEG", quality=THUMB_QUALITY)
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
