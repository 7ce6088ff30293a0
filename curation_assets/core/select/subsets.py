"""Class-aware subsets of a labeled dataset: by size, by classes, trimmed tails, matched frequencies.

Pure library, no Dagster. Every function takes ``labels`` (a frame with image_id, label and
optionally caption) and returns the chosen rows of it (same columns, sorted by image_id);
:func:`caption_filter` returns a boolean mask instead.

Randomness is explicit and order-free: each image gets a rank from ``seed`` drawn over the
image_ids in sorted order, and a class keeps its lowest-ranked images. So the same seed
gives the same subset however the input rows are ordered, and with one seed a class cut
to m images keeps a subset of what it keeps when cut to m + 1.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import polars as pl

_CHUNK = 65536  # rows per block of the caption similarity: bounded memory on millions of rows


def validate_labels(labels: pl.DataFrame) -> pl.DataFrame:
    """``labels`` checked: image_id and label present, no null label, no image twice."""
    missing = [c for c in ("image_id", "label") if c not in labels.columns]
    if missing:
        raise ValueError(f"labels: missing column(s) {missing}; found {labels.columns}")
    nulls = labels.filter(pl.col("label").is_null() | pl.col("image_id").is_null())
    if len(nulls):
        raise ValueError(
            f"labels: {len(nulls)} row(s) without an image_id or label, e.g. {nulls.head(3).to_dicts()}"
        )
    repeated = labels.filter(pl.col("image_id").is_duplicated())["image_id"].unique().sort()
    if len(repeated):
        raise ValueError(
            f"labels: {len(repeated)} image_id(s) listed twice, e.g. {repeated.head(3).to_list()}"
        )
    return labels.with_columns(pl.col("label").cast(pl.String()))


def class_counts(labels: pl.DataFrame) -> dict[str, int]:
    """{label: number of images}, sorted by label."""
    counts = labels.group_by("label").len().sort("label")
    return dict(zip(counts["label"], counts["len"], strict=True))


def _ranked(labels: pl.DataFrame, seed: int) -> pl.DataFrame:
    """Rows sorted by image_id with a seeded random ``_rank`` and the rank within the class."""
    frame = validate_labels(labels).sort("image_id")
    rank = np.random.default_rng(seed).permutation(len(frame))
    return frame.with_columns(_rank=pl.Series(rank, dtype=pl.Int64)).with_columns(
        _class_rank=pl.col("_rank").rank("ordinal").over("label") - 1
    )


def _take(ranked: pl.DataFrame, quota: Mapping[str, int]) -> pl.DataFrame:
    """The ``quota[label]`` lowest-ranked images of each class (classes absent from quota: none)."""
    table = pl.DataFrame(
        {"label": list(quota), "_quota": list(quota.values())},
        schema={"label": pl.String, "_quota": pl.Int64},
    )
    return (
        ranked.join(table, on="label", how="inner")
        .filter(pl.col("_class_rank") < pl.col("_quota"))
        .drop("_rank", "_class_rank", "_quota")
        .sort("image_id")
    )


def subset_by_count(labels: pl.DataFrame, n: int, seed: int, *, stratified: bool = True) -> pl.DataFrame:
    """Exactly ``n`` images.

    ``stratified`` (default) keeps the class distribution: every class gets its share of
    ``n`` within one image (see :func:`match_frequencies`). Otherwise a uniform draw.
    """
    total = len(labels)
    if not 0 <= n <= total:
        raise ValueError(f"n must be between 0 and the {total} labeled images, got {n}")
    if stratified:
        return match_frequencies(labels, class_counts(validate_labels(labels)), n, seed)
    ranked = _ranked(labels, seed)
    return ranked.filter(pl.col("_rank") < n).drop("_rank", "_class_rank").sort("image_id")


def subset_by_classes(
    labels: pl.DataFrame, k: int | None = None, classes: Sequence[str] | None = None, seed: int = 0
) -> pl.DataFrame:
    """All images of ``k`` classes drawn with ``seed``, or of the given ``classes`` (give one of the two)."""
    if (k is None) == (classes is None):
        raise ValueError("give exactly one of k (number of classes to draw) or classes (their names)")
    frame = validate_labels(labels)
    present = sorted(class_counts(frame))
    if classes is not None:
        unknown = sorted(set(classes) - set(present))
        if unknown:
            raise ValueError(f"{len(unknown)} class(es) not in the labels, e.g. {unknown[:5]}")
        chosen = set(classes)
    else:
        if not 0 <= k <= len(present):
            raise ValueError(f"k must be between 0 and the {len(present)} classes, got {k}")
        picks = np.random.default_rng(seed).permutation(len(present))[:k]
        chosen = {present[i] for i in picks}
    return frame.filter(pl.col("label").is_in(sorted(chosen))).sort("image_id")


def tail_classes(labels: pl.DataFrame, k: int, seed: int) -> list[str]:
    """The ``k`` least frequent classes, fewest first; ties broken by a draw from ``seed``.

    A seeded tie-break matters on balanced datasets (ImageNet: ~1300 images in most
    classes), where alphabetical order would always trim the same classes.
    """
    counts = class_counts(validate_labels(labels))
    if not 0 <= k <= len(counts):
        raise ValueError(f"k must be between 0 and the {len(counts)} classes, got {k}")
    names = sorted(counts)
    draw = np.random.default_rng(seed).permutation(len(names))
    order = sorted(range(len(names)), key=lambda i: (counts[names[i]], draw[i]))
    return [names[i] for i in order[:k]]


def trim_tail(labels: pl.DataFrame, k: int, ceil: int, seed: int) -> pl.DataFrame:
    """Every image, except that the ``k`` least frequent classes keep at most ``ceil`` images each.

    A long-tail variant of a dataset: the tail classes (see :func:`tail_classes`) are cut
    to ``ceil`` images drawn with ``seed``; the other classes are untouched.
    """
    if ceil < 0:
        raise ValueError(f"ceil must be >= 0, got {ceil}")
    tail = set(tail_classes(labels, k, seed))
    ranked = _ranked(labels, seed)
    keep = ~pl.col("label").is_in(sorted(tail)) | (pl.col("_class_rank") < ceil)
    return ranked.filter(keep).drop("_rank", "_class_rank").sort("image_id")


def read_target(target: Mapping[str, float] | str | Path) -> dict[str, float]:
    """A target class distribution: a mapping, or a JSON object / CSV file of class -> weight.

    Weights may be counts or fractions; only their ratios matter. A CSV has a header; its
    first column is the class and its second the weight (``class,weight``, ``label,count``...).
    """
    if isinstance(target, Mapping):
        weights = {str(k): v for k, v in target.items()}
        where = "target"
    else:
        path = Path(target)
        where = str(path)
        if path.suffix.lower() == ".json":
            loaded = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(loaded, dict):
                raise ValueError(f"{path}: expected a JSON object {{class: weight}}")
            weights = {str(k): v for k, v in loaded.items()}
        elif path.suffix.lower() in (".csv", ".tsv"):
            weights = _read_target_csv(path)
        else:
            raise ValueError(f"{path}: a target distribution is a .json or .csv file")
    out: dict[str, float] = {}
    for name, value in weights.items():
        try:
            weight = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: weight of class {name!r} is not a number: {value!r}") from None
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"{where}: weight of class {name!r} must be finite and >= 0, got {value!r}")
        out[name] = weight
    if not out or sum(out.values()) <= 0:
        raise ValueError(f"{where}: the target distribution has no positive weight")
    return out


def _read_target_csv(path: Path) -> dict[str, str]:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    with path.open(newline="", encoding="utf-8-sig") as handle:
        rows = list(csv.reader(handle, delimiter=delimiter))
    if not rows or len(rows[0]) < 2:
        raise ValueError(f"{path}: expected a header and two columns: class, weight")
    out: dict[str, str] = {}
    for line, row in enumerate(rows[1:], start=2):
        if not row or not any(cell.strip() for cell in row):
            continue
        if len(row) < 2:
            raise ValueError(f"{path} line {line}: expected class, weight; got {row}")
        name = row[0].strip()
        if name in out:
            raise ValueError(f"{path} line {line}: class {name!r} listed twice")
        out[name] = row[1].strip()
    return out


def frequency_quota(
    weights: Mapping[str, float], available: Mapping[str, int], n: int, seed: int = 0
) -> dict[str, int]:
    """Per-class counts summing to ``n``, each the floor or ceiling of its exact share ``n * w / sum(w)``.

    Largest remainders get the ceilings (ties by a draw from ``seed``), skipping classes
    that have no image to spare. Raises when no such counts fit the available images.
    """
    total = sum(weights.values())
    names = sorted(name for name, w in weights.items() if w > 0)
    ideal = {name: n * weights[name] / total for name in names}
    quota = {name: math.floor(ideal[name]) for name in names}
    short = [name for name in names if quota[name] > available.get(name, 0)]
    if short:
        name = short[0]
        raise ValueError(
            f"class {name!r} needs {quota[name]} images for n={n} but has {available.get(name, 0)} "
            f"({len(short)} class(es) short)"
        )
    extra = n - sum(quota.values())
    draw = np.random.default_rng(seed).permutation(len(names))
    candidates = sorted(
        (
            i
            for i, name in enumerate(names)
            if quota[name] < available.get(name, 0) and ideal[name] > quota[name]
        ),
        key=lambda i: (-(ideal[names[i]] - quota[names[i]]), draw[i]),
    )
    if extra > len(candidates):
        raise ValueError(f"n={n} does not fit: {extra - len(candidates)} class(es) lack one more image")
    for i in candidates[:extra]:
        quota[names[i]] += 1
    return quota


def max_matching_size(weights: Mapping[str, float], available: Mapping[str, int], seed: int = 0) -> int:
    """The largest n for which :func:`frequency_quota` fits the available images."""
    total = sum(weights.values())
    positive = {name: w for name, w in weights.items() if w > 0}
    # Each class caps n near (available + 1) * total / w; step down from that bound.
    bound = min(math.floor((available.get(name, 0) + 1) * total / w) for name, w in positive.items())
    for n in range(min(bound, sum(available.values())), -1, -1):
        try:
            frequency_quota(weights, available, n, seed)
        except ValueError:
            continue
        return n
    return 0


def match_frequencies(
    labels: pl.DataFrame,
    target: Mapping[str, float] | str | Path,
    n: int,
    seed: int,
    *,
    allow_smaller: bool = False,
) -> pl.DataFrame:
    """``n`` images whose class counts follow ``target`` within one image per class.

    ``target`` is {class: weight} (counts or fractions) or a JSON/CSV file of it (see
    :func:`read_target`). Classes missing from the target, or weighted 0, get no image; a
    target class that is not in the labels is an error (usually a naming mismatch). When
    some class has too few images for its share of ``n``, it is an error naming the class
    and the largest n that fits, unless ``allow_smaller``: then that largest n is used.
    """
    weights = read_target(target)
    ranked = _ranked(labels, seed)
    available = class_counts(ranked)
    absent = sorted(name for name, w in weights.items() if w > 0 and name not in available)
    if absent:
        raise ValueError(f"{len(absent)} target class(es) not in the labels, e.g. {absent[:5]}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    try:
        quota = frequency_quota(weights, available, n, seed)
    except ValueError as exc:
        largest = max_matching_size(weights, available, seed)
        if not allow_smaller:
            raise ValueError(f"{exc}; the largest n that matches the target is {largest}") from None
        quota = frequency_quota(weights, available, largest, seed)
    return _take(ranked, quota)


def caption_filter(
    caption_vectors: np.ndarray,
    class_text_vectors: Mapping[str, np.ndarray],
    labels: pl.DataFrame,
    threshold: float,
) -> np.ndarray:
    """Boolean mask, row-aligned with ``labels``: the caption is close enough to its class's definition.

    ``caption_vectors`` (N, d) are the text embeddings of each row's caption and
    ``class_text_vectors`` maps a class to the embedding of its definition text (both from
    the same text encoder, e.g. open_clip's; the caller encodes, this only scores). A row is
    kept when the cosine similarity reaches ``threshold``. Rows without a usable caption
    vector (all zeros, NaN) are not kept. A class without a definition is an error.
    """
    vectors = np.asarray(caption_vectors)
    if vectors.ndim != 2 or len(vectors) != len(labels):
        raise ValueError(f"caption_vectors must be (N, d) with N = {len(labels)} rows, got {vectors.shape}")
    if "label" not in labels.columns:
        raise ValueError(f"labels: missing column 'label'; found {labels.columns}")
    row_labels = labels["label"].cast(pl.String).to_list()
    missing = sorted({name for name in row_labels if name not in class_text_vectors})
    if missing:
        raise ValueError(f"{len(missing)} class(es) have no definition vector, e.g. {missing[:5]}")
    names = sorted(class_text_vectors)
    classes = _normalized(np.stack([np.asarray(class_text_vectors[c], dtype=np.float32) for c in names]))
    if classes.shape[1] != vectors.shape[1]:
        raise ValueError(f"caption vectors have {vectors.shape[1]} dims, class vectors {classes.shape[1]}")
    index = {name: i for i, name in enumerate(names)}
    class_of_row = np.fromiter((index[name] for name in row_labels), dtype=np.int64, count=len(row_labels))
    keep = np.zeros(len(vectors), dtype=bool)
    for start in range(0, len(vectors), _CHUNK):
        block = _normalized(vectors[start : start + _CHUNK].astype(np.float32))
        similarity = np.einsum("ij,ij->i", block, classes[class_of_row[start : start + _CHUNK]])
        keep[start : start + _CHUNK] = similarity >= threshold  # NaN compares False: not kept
    return keep


def _normalized(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length; zero or non-finite rows become NaN so they never pass a threshold."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    bad = ~np.isfinite(norms) | (norms == 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = vectors / norms
    out[bad[:, 0]] = np.nan
    return out
