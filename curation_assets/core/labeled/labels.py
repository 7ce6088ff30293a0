"""Labels and label issues: where labels come from, and which of them look wrong.

Inputs:

- :func:`labels_from_layout`: the class folder of each file (ImageNet style:
  ``<split root>/<class>/<file>``).
- :func:`read_labels_file`: a CSV / TSV / parquet file of (image path or id, label,
  optional caption); :func:`match_labels` ties its rows to inventory image ids.
- :func:`read_external_flags`: another tool's findings (for example a Visual Layer
  export), its columns named through a mapping; :func:`match_flags` ties them to ids.

Issues (:func:`label_issues`): k nearest neighbours in the semantic embedding space
vote for a label, weighted by their cosine similarity. An image whose own label gets
little of the vote while another label wins is a mislabel candidate; one whose
neighbours are much farther than usual for its class is an outlier; one where two
labels nearly tie is ambiguous. cleanlab is not installed here; this k-NN vote is the
"neighbour agreement" idea behind its label-quality scores, computed directly.

Pure library: no Dagster import.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

# faiss (and core.index, which imports it) is imported inside the functions that search:
# reading labels must stay cheap for the steps that only join them (issue 12).

EXTERNAL_FLAG_FIELDS: tuple[str, ...] = (
    "image_id",
    "image_path",
    "label",
    "issue_type",
    "confidence",
    "suggested_label",
    "reason",
)
EXTERNAL_FLAGS_SCHEMA: dict[str, pl.DataType] = {
    field: (pl.Float64() if field == "confidence" else pl.String()) for field in EXTERNAL_FLAG_FIELDS
}
# How a reference in a labels or flags file was tied to an inventory row.
MATCHED_BY: tuple[str, ...] = ("image_id", "path", "path_suffix", "ambiguous", "unmatched")

DEFAULT_K = 10
DEFAULT_MISLABEL_THRESHOLD = 0.5
DEFAULT_OUTLIER_FACTOR = 4.0
DEFAULT_AMBIGUITY_MARGIN = 0.25  # k = 10: a 6-4 split of the vote is ambiguous, 7-3 is not
MIN_CLASS_FOR_STATS = 10  # smaller classes judge outliers against the whole split's distances
MAD_TO_SIGMA = 1.4826  # MAD of a normal distribution times this is its standard deviation
MIN_SPREAD = 1e-3  # cosine distance: keeps a class of near-identical images from flagging everything

LABEL_ISSUES_SCHEMA: dict[str, pl.DataType] = {
    "image_id": pl.String(),
    "given_label": pl.String(),
    "suggested_label": pl.String(),
    "label_confidence": pl.Float64(),
    "suggested_confidence": pl.Float64(),
    "runner_up_label": pl.String(),
    "runner_up_confidence": pl.Float64(),
    "knn_distance": pl.Float64(),
    "outlier_score": pl.Float64(),
    "is_mislabel": pl.Boolean(),
    "is_outlier": pl.Boolean(),
    "is_ambiguous": pl.Boolean(),
    "issue": pl.List(pl.String()),
}

_CHUNK_KEY = re.compile(r"(^|\.)chunk-\d+$")
_ROOT_FILES_KEY = re.compile(r"(^|\.)_root$")


# ----------------------------------------------------------------------------- metadata labels


def labels_from_metadata(images: pl.DataFrame, label_key: str, caption_key: str | None) -> pl.DataFrame:
    """image_id, label, caption from each image's inventory ``metadata`` (JSON): a parquet row's
    other columns, or a WebDataset sample's ``.json`` fields / ``.cls`` / ``.txt`` members.

    A missing key is a null label, not an error (a partly labeled pool is usual).
    """

    def value(text: str | None, key: str | None) -> str | None:
        if text is None or key is None:
            return None
        found = json.loads(text).get(key)
        return None if found is None else str(found)

    texts = images["metadata"].to_list() if "metadata" in images.columns else [None] * images.height
    return pl.DataFrame(
        {
            "image_id": images["image_id"],
            "label": [value(t, label_key) for t in texts],
            "caption": [value(t, caption_key) for t in texts],
        },
        schema={"image_id": pl.String(), "label": pl.String(), "caption": pl.String()},
    )


# ----------------------------------------------------------------------------- layout labels


def labels_from_layout(inventory: pl.DataFrame, roots: Mapping[str, str] | None = None) -> pl.DataFrame:
    """image_id, split, label: the class folder of each inventory row (null when there is none).

    The class is the first folder below the split's root. With ``roots`` (split -> root
    folder, the project's dataset.roots) it is read from ``source_path``. Without them
    it is inferred from the shard rule: a ``subfolder`` shard is the class folder (the
    folder that holds ``rel_path``); a ``chunks`` shard's ``rel_path`` starts with it.
    Files lying directly in a root, and tar members (WebDataset keeps labels in a labels
    file or ``.cls`` members, not folders), get no label.
    """
    needed = ["image_id", "split", "rel_path", "source_path", "offset", "shard"]
    missing = [c for c in needed if c not in inventory.columns]
    if missing:
        raise ValueError(f"inventory lacks column(s) {missing}; found: {inventory.columns}")
    frame = inventory.select(needed)
    in_file = pl.col("offset").is_null()  # tar members have an offset into their tar
    if roots is not None:
        unknown = sorted(set(frame["split"].drop_nulls().unique()) - set(roots))
        if unknown:
            raise ValueError(f"split(s) {unknown} have no root in {dict(roots)}")
        root_of = {split: str(Path(root)).rstrip("/") + "/" for split, root in roots.items()}
        inside = pl.col("source_path").str.strip_prefix(pl.col("split").replace_strict(root_of, default=""))
        parts = inside.str.split("/")
        label = (
            pl.when(in_file & (parts.list.len() >= 2) & (inside != pl.col("source_path")))
            .then(parts.list.first())
            .otherwise(None)
        )
    else:
        depth = pl.col("rel_path").str.count_matches("/").cast(pl.Int64) + 1  # components of rel_path
        folder_of_shard = pl.col("source_path").str.split("/").list.get(-(depth + 1), null_on_oob=True)
        rel_first = pl.col("rel_path").str.split("/").list.first()
        label = (
            pl.when(~in_file | pl.col("shard").str.contains(_ROOT_FILES_KEY.pattern))
            .then(None)
            .when(pl.col("shard").str.contains(_CHUNK_KEY.pattern))
            .then(pl.when(depth >= 2).then(rel_first).otherwise(None))
            .otherwise(folder_of_shard)
        )
    return frame.select("image_id", "split", label=label.cast(pl.String))


# ----------------------------------------------------------------------------- files


def _read_table(path: str | Path) -> pl.DataFrame:
    """A CSV / TSV / parquet file with every column as text (ids like 0001 stay as written)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist or is not a file")
    if suffix in (".parquet", ".pq"):
        frame = pl.read_parquet(path)
    elif suffix in (".csv", ".tsv", ".txt"):
        frame = pl.read_csv(path, separator="\t" if suffix == ".tsv" else ",", infer_schema=False)
    else:
        raise ValueError(f"{path}: unsupported file type {suffix!r}; use .csv, .tsv or .parquet")
    return frame


def _missing_columns_error(path: str | Path, wanted: Mapping[str, str], found: Sequence[str]) -> ValueError:
    missing = {field: column for field, column in wanted.items() if column not in found}
    listed = ", ".join(f"{column!r} (for {field})" for field, column in missing.items())
    return ValueError(
        f"{path}: column(s) {listed} not found; the file has columns {list(found)}; "
        f"mapping expected (our field -> your column): {dict(wanted)}"
    )


def read_labels_file(
    path: str | Path,
    *,
    id_column: str = "image_id",
    label_column: str = "label",
    caption_column: str | None = None,
) -> pl.DataFrame:
    """ref, label (and caption): one row per image of a labels file.

    ``id_column`` holds an image id or a path (absolute, or relative to a split root or
    the dataset: :func:`match_labels` tries each). Empty labels become null. The same
    reference given two different labels is an error listing some of them; repeated
    identical rows are kept once.
    """
    frame = _read_table(path)
    wanted = {"id": id_column, "label": label_column}
    if caption_column is not None:
        wanted["caption"] = caption_column
    if any(column not in frame.columns for column in wanted.values()):
        raise _missing_columns_error(path, wanted, frame.columns)
    out = frame.select(
        ref=pl.col(id_column).cast(pl.String).str.strip_chars(),
        label=pl.col(label_column).cast(pl.String).str.strip_chars().replace("", None),
        **({"caption": pl.col(caption_column).cast(pl.String)} if caption_column else {}),
    ).filter(pl.col("ref").is_not_null() & (pl.col("ref") != ""))
    out = out.unique(maintain_order=True)
    conflicts = out.filter(pl.col("ref").is_duplicated())
    if conflicts.height:
        examples = conflicts.group_by("ref", maintain_order=True).agg("label").head(5).rows()
        raise ValueError(
            f"{path}: {conflicts['ref'].n_unique()} image(s) have more than one label, e.g. {examples}"
        )
    return out


def read_external_flags(path: str | Path, mapping: Mapping[str, str] | None = None) -> pl.DataFrame:
    """Another tool's flags with our column names (``EXTERNAL_FLAGS_SCHEMA``), one row per flag.

    ``mapping`` is our field -> the file's column (e.g. ``{"image_id": "id", "image_path":
    "path", "label": "class", "issue_type": "flag", "confidence": "score"}``); fields left
    out are null. ``None`` means the file already uses our names. ``issue_type`` and one
    of ``image_id`` / ``image_path`` are required. A mapped column that is not in the file
    raises an error listing the columns found and the mapping expected; a confidence that
    is not a number raises an error naming the rows.
    """
    frame = _read_table(path)
    if mapping is None:
        mapping = {field: field for field in EXTERNAL_FLAG_FIELDS if field in frame.columns}
    unknown = sorted(set(mapping) - set(EXTERNAL_FLAG_FIELDS))
    if unknown:
        raise ValueError(
            f"unknown external flag field(s) {unknown} in the mapping; fields: {list(EXTERNAL_FLAG_FIELDS)}"
        )
    if "issue_type" not in mapping or not ({"image_id", "image_path"} & set(mapping)):
        raise ValueError(
            f"{path}: the mapping must name issue_type and image_id or image_path; got {dict(mapping)}; "
            f"the file has columns {frame.columns}"
        )
    if any(column not in frame.columns for column in mapping.values()):
        raise _missing_columns_error(path, mapping, frame.columns)
    columns = []
    for field in EXTERNAL_FLAG_FIELDS:
        if field in mapping:
            columns.append(
                pl.col(mapping[field]).cast(pl.String).str.strip_chars().replace("", None).alias(field)
            )
        else:
            columns.append(pl.lit(None, pl.String).alias(field))
    out = frame.select(columns).with_row_index("_row")
    confidence = out["confidence"].cast(pl.Float64, strict=False)
    bad = out.filter(out["confidence"].is_not_null() & confidence.is_null())
    if bad.height:
        examples = list(zip(bad["_row"].head(5).to_list(), bad["confidence"].head(5).to_list(), strict=True))
        raise ValueError(
            f"{path}: column {mapping['confidence']!r} (confidence) has {bad.height} value(s) that are not "
            f"numbers, e.g. (row, value) {examples}"
        )
    return out.with_columns(confidence=confidence).drop("_row").cast(EXTERNAL_FLAGS_SCHEMA)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- matching


def _normalise_path(expr: pl.Expr) -> pl.Expr:
    return expr.str.replace_all("\\", "/", literal=True).str.strip_prefix("./")


def resolve_refs(refs: Sequence[str | None] | pl.Series, inventory: pl.DataFrame) -> pl.DataFrame:
    """ref, image_id, matched_by: each reference tied to an inventory row, in ``refs`` order.

    Tried in turn: the image_id itself; the file's full path (``source_path``, or
    ``<tar>/<member>`` for a tar member); the last components of that path (a path
    relative to a split root or the dataset root, e.g. ``train/n01440764/x.JPEG`` or
    ``n01440764/x.JPEG``). A suffix shared by several files is ``ambiguous`` and left
    unmatched (image_id null), like a reference that matches nothing (``unmatched``).
    """
    needed = ["image_id", "source_path", "rel_path", "offset"]
    missing = [c for c in needed if c not in inventory.columns]
    if missing:
        raise ValueError(f"inventory lacks column(s) {missing}; found: {inventory.columns}")
    frame = pl.DataFrame({"ref": pl.Series(refs, dtype=pl.String)}).with_row_index("_order")
    frame = frame.with_columns(_norm=_normalise_path(pl.col("ref")))
    files = inventory.select(
        "image_id",
        _full=_normalise_path(
            pl.when(pl.col("offset").is_null())
            .then(pl.col("source_path"))
            .otherwise(pl.col("source_path") + "/" + pl.col("rel_path"))
        ),
    )
    by_id = frame.join(files.select("image_id"), left_on="ref", right_on="image_id", how="inner").select(
        "_order", image_id=pl.col("ref"), matched_by=pl.lit("image_id")
    )
    rest = frame.join(by_id.select("_order"), on="_order", how="anti")
    by_path = rest.join(files.unique("_full", keep="none"), left_on="_norm", right_on="_full", how="inner")
    by_path = by_path.select("_order", "image_id", matched_by=pl.lit("path"))
    rest = rest.join(by_path.select("_order"), on="_order", how="anti")
    found = [by_id, by_path]
    rest = rest.with_columns(
        _depth=pl.col("_norm").str.strip_chars("/").str.count_matches("/").cast(pl.Int64) + 1
    )
    for depth in sorted(rest["_depth"].drop_nulls().unique().to_list()):
        part = rest.filter(pl.col("_depth") == depth).with_columns(_key=pl.col("_norm").str.strip_chars("/"))
        suffixes = files.select(
            "image_id", _key=pl.col("_full").str.split("/").list.slice(-depth).list.join("/")
        ).with_columns(_n=pl.len().over("_key"))
        joined = part.join(suffixes, on="_key", how="inner").unique("_order")
        found.append(
            joined.select(
                "_order",
                image_id=pl.when(pl.col("_n") == 1).then(pl.col("image_id")).otherwise(None),
                matched_by=pl.when(pl.col("_n") == 1)
                .then(pl.lit("path_suffix"))
                .otherwise(pl.lit("ambiguous")),
            )
        )
    matched = pl.concat(found)
    return (
        frame.join(matched, on="_order", how="left")
        .sort("_order")
        .select("ref", "image_id", matched_by=pl.col("matched_by").fill_null("unmatched"))
    )


def match_labels(labels: pl.DataFrame, inventory: pl.DataFrame) -> pl.DataFrame:
    """The rows of :func:`read_labels_file` with image_id and matched_by in front.

    Unmatched and ambiguous references stay, with a null image_id, so a report can list
    them; filter on ``image_id`` to use the labels.
    """
    resolved = resolve_refs(labels["ref"], inventory)
    return pl.concat([resolved.select("image_id", "matched_by"), labels], how="horizontal")


def match_flags(flags: pl.DataFrame, inventory: pl.DataFrame) -> pl.DataFrame:
    """External flags with image_id filled from image_id or image_path, plus matched_by."""
    refs = flags.select(ref=pl.coalesce("image_id", "image_path"))["ref"]
    resolved = resolve_refs(refs, inventory)
    return flags.with_columns(image_id=resolved["image_id"], matched_by=resolved["matched_by"])


# ----------------------------------------------------------------------------- label issues


def _label_codes(labels: Sequence[Any] | np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Integer codes (-1 for a missing label) and the sorted class names."""
    text = [
        None if v is None or (isinstance(v, float) and np.isnan(v)) or v == "" else str(v) for v in labels
    ]
    classes = sorted({v for v in text if v is not None})
    lookup = {name: i for i, name in enumerate(classes)}
    return np.array([lookup[v] if v is not None else -1 for v in text], dtype=np.int64), classes


def _neighbours(
    vectors: np.ndarray, k: int, index_kind: str, use_gpu: bool, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(similarities, rows) of each row's k nearest other rows (cosine; vectors are unit)."""
    import faiss

    from curation_assets.core.dedup.index import VectorIndex

    vindex = VectorIndex.build(index_kind, vectors, seed=seed, use_gpu=use_gpu)
    gpu = vindex.gpu_index()
    index = gpu if gpu is not None else vindex.index
    if vindex.kind == "hnsw":
        faiss.downcast_index(vindex.index).hnsw.efSearch = max(int(vindex.params["ef_search"]), k + 1)
    sims = np.empty((len(vectors), k), np.float32)
    rows = np.empty((len(vectors), k), np.int64)
    for start in range(0, len(vectors), 16384):
        block = vectors[start : start + 16384]
        dist, ids = index.search(block, k + 1)
        own = np.arange(start, start + len(block))[:, None]
        # drop the row itself; when ties hide it (exact copies), drop the last result instead
        is_self = ids == own
        drop = np.where(is_self.any(axis=1), is_self.argmax(axis=1), k)
        keep = np.ones_like(is_self)
        keep[np.arange(len(block)), drop] = False
        sims[start : start + len(block)] = dist[keep].reshape(len(block), k)
        rows[start : start + len(block)] = ids[keep].reshape(len(block), k)
    return sims, rows


def _class_votes(
    sims: np.ndarray, neighbour_codes: np.ndarray, own: np.ndarray, n_classes: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per row: support of its own label, best label and its support, runner-up and support.

    Votes are weighted by similarity (negative similarities count as nothing; a tiny
    floor keeps a row whose neighbours are all dissimilar from dividing by zero).
    Sparse: only the (row, class) pairs that occur among the neighbours are summed, so
    1000 classes cost no n x 1000 matrix.
    """
    n, k = sims.shape
    weights = np.clip(sims.astype(np.float64), 0.0, None) + 1e-9
    valid = neighbour_codes >= 0  # unlabeled neighbours do not vote
    weights = np.where(valid, weights, 0.0)
    total = weights.sum(axis=1)
    total[total == 0] = 1.0
    row_ids = np.repeat(np.arange(n, dtype=np.int64), k)
    keys = row_ids * n_classes + np.where(valid, neighbour_codes, 0).reshape(-1)
    unique, inverse = np.unique(keys[valid.reshape(-1)], return_inverse=True)
    sums = np.bincount(inverse, weights=weights.reshape(-1)[valid.reshape(-1)], minlength=len(unique))
    pair_rows, pair_classes = unique // n_classes, unique % n_classes
    support = sums / total[pair_rows]
    own_support = np.zeros(n)
    is_own = pair_classes == own[pair_rows]
    own_support[pair_rows[is_own]] = support[is_own]
    # best and runner-up per row: sort by (row, -support, not-own, class); ties favour the given label
    order = np.lexsort((pair_classes, ~is_own, -support, pair_rows))
    sorted_rows = pair_rows[order]
    first = np.ones(len(order), dtype=bool)
    first[1:] = sorted_rows[1:] != sorted_rows[:-1]
    best_label = np.full(n, -1, np.int64)
    best_support = np.zeros(n)
    best_label[sorted_rows[first]] = pair_classes[order][first]
    best_support[sorted_rows[first]] = support[order][first]
    second = np.zeros(len(order), dtype=bool)
    second[1:] = (~first[1:]) & first[:-1]
    second_label = np.full(n, -1, np.int64)
    second_support = np.zeros(n)
    second_label[sorted_rows[second]] = pair_classes[order][second]
    second_support[sorted_rows[second]] = support[order][second]
    return own_support, best_label, best_support, second_label, second_support


def _robust_z(distance: np.ndarray, codes: np.ndarray, n_classes: int) -> np.ndarray:
    """How far each row's k-NN distance lies above its class's median, in robust sigmas (MAD)."""

    def stats(values: np.ndarray) -> tuple[float, float]:
        median = float(np.median(values))
        spread = MAD_TO_SIGMA * float(np.median(np.abs(values - median)))
        return median, max(spread, MIN_SPREAD)

    score = np.full(len(distance), np.nan)
    if not len(distance):
        return score
    overall = stats(distance)
    for code in range(-1, n_classes):
        members = np.flatnonzero(codes == code)
        if not len(members):
            continue
        median, spread = stats(distance[members]) if len(members) >= MIN_CLASS_FOR_STATS else overall
        score[members] = (distance[members] - median) / spread
    return score


def label_issues(
    vectors: np.ndarray,
    labels: Sequence[str | None] | np.ndarray,
    *,
    image_ids: Sequence[str] | None = None,
    k: int = DEFAULT_K,
    mislabel_threshold: float = DEFAULT_MISLABEL_THRESHOLD,
    outlier_factor: float = DEFAULT_OUTLIER_FACTOR,
    ambiguity_margin: float = DEFAULT_AMBIGUITY_MARGIN,
    index_kind: str = "auto",
    use_gpu: bool = False,
    seed: int = 0,
) -> pl.DataFrame:
    """One row per image (in input order) with its label scores and flags (``LABEL_ISSUES_SCHEMA``).

    ``vectors`` are semantic embeddings (cosine: they are L2-normalised here, not
    centred); ``labels[i]`` is image i's given label (None or "" = unlabeled).

    - k-NN: the ``k`` most similar other images (faiss through :class:`VectorIndex`:
      exact up to 65k images on the CPU, IVF above, GPU when asked).
    - ``label_confidence``: the similarity-weighted share of the neighbours' votes that
      the given label gets; ``suggested_label`` the label with the largest share (the
      given one on a tie), ``suggested_confidence`` its share; the runner-up likewise.
    - ``is_mislabel``: another label wins and the given one has less than
      ``mislabel_threshold`` of the vote.
    - ``is_outlier``: ``knn_distance`` (1 - mean cosine to the k neighbours) above its
      class's median by more than ``outlier_factor`` robust sigmas (1.4826 x MAD;
      classes under 10 images use the whole split's statistics). ``outlier_score`` is
      that number of sigmas.
    - ``is_ambiguous``: the two best labels' shares within ``ambiguity_margin``.

    Unlabeled images are searched and get an outlier score but no label flags and do not
    vote. An image without a usable vector (zero or not finite) gets null scores and the
    issue ``no_vector``.
    """
    vectors = np.asarray(vectors)
    if vectors.ndim != 2:
        raise ValueError(f"vectors must be 2-d (images x dimensions), got shape {vectors.shape}")
    n = len(vectors)
    if len(labels) != n:
        raise ValueError(f"{len(labels)} labels for {n} vectors")
    if image_ids is not None and len(image_ids) != n:
        raise ValueError(f"{len(image_ids)} image ids for {n} vectors")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if not 0.0 < mislabel_threshold <= 1.0 or ambiguity_margin < 0.0 or outlier_factor <= 0.0:
        raise ValueError(
            "need 0 < mislabel_threshold <= 1, ambiguity_margin >= 0 and outlier_factor > 0; got "
            f"{mislabel_threshold}, {ambiguity_margin}, {outlier_factor}"
        )
    from curation_assets.core.dedup.index import prepare

    codes, classes = _label_codes(labels)
    prepared = prepare(vectors, np.zeros(vectors.shape[1], np.float32))
    usable = np.flatnonzero(np.abs(prepared).sum(axis=1) > 0)

    own = np.full(n, np.nan)
    best = np.full(n, -1, np.int64)
    best_share = np.full(n, np.nan)
    second = np.full(n, -1, np.int64)
    second_share = np.full(n, np.nan)
    distance = np.full(n, np.nan)
    z = np.full(n, np.nan)
    kk = min(k, len(usable) - 1)
    if kk >= 1:
        sims, rows = _neighbours(np.ascontiguousarray(prepared[usable]), kk, index_kind, use_gpu, seed)
        sub_codes = codes[usable]
        votes = _class_votes(sims, sub_codes[rows], sub_codes, max(len(classes), 1))
        own[usable], best[usable], best_share[usable], second[usable], second_share[usable] = votes
        distance[usable] = 1.0 - sims.astype(np.float64).mean(axis=1)
        z[usable] = _robust_z(distance[usable], sub_codes, len(classes))

    labeled = (codes >= 0) & ~np.isnan(own)
    voted = labeled & (best >= 0)
    is_mislabel = voted & (best != codes) & (own < mislabel_threshold)
    is_outlier = ~np.isnan(z) & (z > outlier_factor)
    is_ambiguous = voted & (second >= 0) & (best_share - second_share <= ambiguity_margin)

    def names(values: np.ndarray) -> list[str | None]:
        return [classes[v] if v >= 0 else None for v in values]

    no_vector = np.ones(n, dtype=bool)
    no_vector[usable] = False
    issues = [
        [
            name
            for name, flag in (
                ("mislabel", is_mislabel[i]),
                ("outlier", is_outlier[i]),
                ("ambiguous", is_ambiguous[i]),
                ("no_vector", no_vector[i]),
            )
            if flag
        ]
        for i in range(n)
    ]
    own_out = np.where(labeled, own, np.nan)
    return pl.DataFrame(
        {
            "image_id": list(image_ids) if image_ids is not None else [str(i) for i in range(n)],
            "given_label": names(codes),
            "suggested_label": names(best),
            "label_confidence": own_out,
            "suggested_confidence": best_share,
            "runner_up_label": names(second),
            "runner_up_confidence": np.where(second >= 0, second_share, np.nan),
            "knn_distance": distance,
            "outlier_score": z,
            "is_mislabel": is_mislabel,
            "is_outlier": is_outlier,
            "is_ambiguous": is_ambiguous,
            "issue": issues,
        },
        schema=LABEL_ISSUES_SCHEMA,
        nan_to_null=True,
    )


def label_issue_summary(issues: pl.DataFrame) -> dict[str, Any]:
    """Counts for metadata: images, mislabel / outlier / ambiguous candidates, per-class mislabels."""
    n = issues.height

    def share(count: int) -> float:
        return round(100.0 * count / n, 3) if n else 0.0

    counts = {flag: int(issues[f"is_{flag}"].sum()) for flag in ("mislabel", "outlier", "ambiguous")}
    per_class = (
        issues.filter(pl.col("is_mislabel"))
        .group_by("given_label")
        .len()
        .sort("len", descending=True)
        .head(20)
    )
    return {
        "images": n,
        **{f"{flag}_candidates": count for flag, count in counts.items()},
        **{f"percent_{flag}": share(count) for flag, count in counts.items()},
        "top_mislabel_classes": {row[0]: int(row[1]) for row in per_class.iter_rows()},
    }


__all__ = [
    "EXTERNAL_FLAGS_SCHEMA",
    "EXTERNAL_FLAG_FIELDS",
    "LABEL_ISSUES_SCHEMA",
    "MATCHED_BY",
    "label_issue_summary",
    "label_issues",
    "labels_from_layout",
    "match_flags",
    "match_labels",
    "read_external_flags",
    "read_labels_file",
    "resolve_refs",
]
