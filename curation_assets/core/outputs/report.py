"""The curation report: one self-contained HTML page with the figures a user tunes thresholds from.

Pure library, no Dagster. The caller gathers the numbers and a few example images per
section into :class:`ReportData`; :func:`render_report` writes

- ``out_dir/report.html``: CSS inline and every image embedded as a ``data:`` URI, so the file
  alone can be mailed or copied and still shows its pictures. Thumbnails are capped (side and
  JPEG quality, stated in the report) and all embedded images share a byte budget; an image past
  the budget falls back to its relative link below, and the report says how many did;
- ``out_dir/plots/*.png``: the funnel, the near-duplicate distance histogram, one score
  histogram per filter, the samples per cluster;
- ``out_dir/thumbs/*.jpg``: small re-encoded thumbnails (never the originals, which may be
  huge or sit inside tar shards), EXIF orientation honoured.

This module prepares what the page shows (the numbers in words, the plots, each image as a
``data:`` URI or a link); the package-data template ``templates/report.html.j2`` lays it out.

Every part except the funnel is optional: a stage that is off in the project (``None``)
gets a one-line "off" section instead of empty plots. An example image that cannot be
read becomes a placeholder carrying the error in its tooltip; it never stops the report.
"""

from __future__ import annotations

import base64
import hashlib
import io
import math
import re
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from curation_assets.core.atomic import write_bytes, write_text, write_with
from curation_assets.core.filters.rotation import upright
from curation_assets.core.ingest.images import describe_error, load_rgb, read_bytes
from curation_assets.templates import render as render_template

# matplotlib (and core.plots, which imports it) is imported inside the functions that plot:
# assets/outputs/report.py imports this module, and loading the Definitions must stay cheap (issue 12).

TURNS = (0, 90, 180, 270)
REMOVES = ("below", "above")
SECTION_TITLES = {
    "funnel": "Funnel",
    "near_duplicates": "Near duplicates",
    "decontamination": "Decontamination",
    "filters": "Filters",
    "rotation": "Rotation",
    "clusters": "Clusters",
}
THUMB_QUALITY = 85  # thumbnails are for eyes, not for training: small files matter more
# Embedded thumbnails inflate the page by 4/3 (base64): a hard cap on their side keeps a report
# with a few hundred examples to a few MB, whatever thumb_side a project asks for.
MAX_THUMB_SIDE = 256
EMBED_BUDGET_BYTES = 24 * 1024 * 1024  # base64 bytes of all embedded images together
# Histograms clip their long tails here (values beyond pile into the edge bin, and the page says
# how many): one blur score of 10,000 would otherwise squeeze the threshold region into one bar.
TAIL_PERCENTILES = (0.5, 99.5)
_BAR_CHART_MAX_CLUSTERS = 60  # above this, per-cluster bars become unreadable: plot sorted ranks


# ----------------------------------------------------------------------------- input


@dataclass(frozen=True)
class ImageLoc:
    """Where to read one image: a plain file (offset None) or ``size_bytes`` at ``offset`` in a tar.

    ``rotate`` is the clockwise turn (0/90/180/270) of the stored pixels that display undoes,
    the same convention as :mod:`curation_assets.core.filters.rotation` (its ``correction``): a thumbnail
    shows the image upright. ``final``: the image's action in the curation decisions (keep,
    keep_with_fix, remove), badged apart from a section's own verdict, since an image one filter
    keeps may still be removed by another stage; None when unknown.
    """

    image_id: str
    source_path: str
    offset: int | None = None
    size_bytes: int | None = None
    rotate: int = 0
    final: str | None = None

    def __post_init__(self) -> None:
        if self.rotate not in TURNS:
            raise ValueError(
                f"ImageLoc {self.image_id!r}: rotate must be one of {TURNS}, got {self.rotate!r}"
            )


@dataclass(frozen=True)
class FunnelStep:
    """One stage of the funnel: images that reached it, removed by it, left after it."""

    stage: str
    images_in: int
    removed: int
    kept: int

    def __post_init__(self) -> None:
        if min(self.images_in, self.removed, self.kept) < 0:
            raise ValueError(f"funnel step {self.stage!r}: counts must not be negative: {self}")
        if self.images_in - self.removed != self.kept:
            raise ValueError(
                f"funnel step {self.stage!r}: images_in {self.images_in:,} - removed {self.removed:,}"
                f" != kept {self.kept:,}"
            )


@dataclass
class DuplicateGroupExample:
    """A duplicate group: the image kept and the members it replaces, each with its distance to it."""

    keeper: ImageLoc
    members: list[tuple[ImageLoc, float]]


@dataclass
class NearPair:
    """Two images and their copy-detection distance: a pair near the near-duplicate threshold."""

    a: ImageLoc
    b: ImageLoc
    distance: float


@dataclass
class ContaminationMatch:
    """A pool image and the nearest image of an evaluation (reference) set, at their copy-detection
    distance: one match near the decontamination threshold."""

    image: ImageLoc  # the pool image
    reference_set: str
    reference_image: str  # its name in the set: path under the set's folder, or <tar path>/<member>
    reference: ImageLoc | None  # where the reference image's bytes are; None: the set holds vectors only
    distance: float


@dataclass
class ReferenceSetCount:
    """What decontamination did with one reference set: pool images removed as near-copies of it."""

    name: str
    kind: str  # directory | webdataset | vectors
    removed: int
    reference_images: int | None = None  # the set's images with a vector, when known


@dataclass
class DecontaminationSection:
    """Pool images removed as near-copies of evaluation images (``references.sets``, role
    decontaminate): per-set counts and the matches closest to the threshold on each side.

    ``below``: matches at or under the threshold (removed), ``above``: the closest past it (kept),
    each in ascending distance, so reading one then the other walks across the threshold.
    """

    threshold: float
    sets: list[ReferenceSetCount]
    below: list[ContaminationMatch] = field(default_factory=list)
    above: list[ContaminationMatch] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not math.isfinite(self.threshold):
            raise ValueError(f"decontamination: threshold must be a finite number, got {self.threshold!r}")


@dataclass
class FilterSection:
    """One score filter: every score, its threshold, which side it removes, and images at the edge.

    ``removes="below"`` removes scores strictly below the threshold (a low aesthetic score),
    ``"above"`` removes scores strictly above it (a small distance is written as its
    similarity, or a high "unwanted" score). Non-finite scores count as unscored.
    ``below`` / ``above``: the images just below / at or above the threshold with their
    scores (see :func:`select_threshold_examples`).
    """

    name: str
    values: np.ndarray
    threshold: float
    removes: str
    below: list[tuple[ImageLoc, float]] = field(default_factory=list)
    above: list[tuple[ImageLoc, float]] = field(default_factory=list)
    # True where the image is still in when the filters run (not removed as a duplicate first);
    # None: every scored image is. The funnel charges the filters only with those.
    still_in: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.removes not in REMOVES:
            raise ValueError(f"filter {self.name!r}: removes must be one of {REMOVES}, got {self.removes!r}")
        if not math.isfinite(self.threshold):
            raise ValueError(
                f"filter {self.name!r}: threshold must be a finite number, got {self.threshold!r}"
            )
        self.values = np.asarray(self.values, dtype=np.float64).ravel()
        if self.still_in is not None:
            self.still_in = np.asarray(self.still_in, dtype=bool).ravel()
            if self.still_in.shape != self.values.shape:
                raise ValueError(
                    f"filter {self.name!r}: still_in has {self.still_in.size} entries for"
                    f" {self.values.size} scores"
                )

    def removed_mask(self, values: np.ndarray) -> np.ndarray:
        """True where a (finite) score is removed by this filter."""
        return values < self.threshold if self.removes == "below" else values > self.threshold


@dataclass
class RotationExample:
    """An image the rotation stage turns: ``angle`` is the clockwise turn of the stored pixels
    (``predicted_angle`` / ``correction`` of :func:`~.rotation.rotation_decisions`)."""

    image: ImageLoc
    angle: int
    probability: float

    def __post_init__(self) -> None:
        if self.angle not in TURNS:
            raise ValueError(f"rotation of {self.image.image_id!r}: angle must be one of {TURNS}")


@dataclass
class ClusterSection:
    """Balanced sampling over clusters: samples drawn per cluster, cluster sizes, example images.

    ``samples_per_cluster`` and ``sizes`` are either a dict cluster id -> count or an array
    indexed by cluster id.
    """

    samples_per_cluster: dict[int, int] | np.ndarray
    sizes: dict[int, int] | np.ndarray | None = None
    examples: dict[int, list[ImageLoc]] = field(default_factory=dict)


@dataclass
class ReportData:
    """Everything the report shows. ``None`` (or no filters) marks a stage that is off.

    ``notes``: free text shown in a section, keyed by section id ("funnel",
    "near_duplicates", "decontamination", "filters", "rotation", "clusters") or by a filter's name; any other
    key is listed under the summary.
    """

    project: str
    funnel: list[FunnelStep]
    near_dup_distances: np.ndarray | None = None
    near_dup_threshold: float | None = None
    duplicate_groups: list[DuplicateGroupExample] = field(default_factory=list)
    # the pairs just under the threshold (grouped) and the closest at or above it (not grouped,
    # so both are kept by this stage): what a user moving the threshold would change
    near_pairs_below: list[NearPair] = field(default_factory=list)
    near_pairs_above: list[NearPair] = field(default_factory=list)
    # None: the project names no evaluation set, and the page has no such section (not even "off":
    # decontamination is not a stage every project has and turned off, it exists only with references)
    decontamination: DecontaminationSection | None = None
    filters: list[FilterSection] | None = None
    rotations: list[RotationExample] | None = None
    clusters: ClusterSection | None = None
    notes: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.funnel:
            raise ValueError(f"report of {self.project!r}: the funnel needs at least one step")


@dataclass
class ReportFiles:
    """What :func:`render_report` wrote."""

    html: Path
    plots: dict[str, Path]  # "funnel", "near_duplicates", "filter:<name>", "clusters"
    thumbnails: int  # thumbnail files written
    sections: list[str]  # section titles rendered with content, in page order
    stages_off: list[str] = field(default_factory=list)  # section titles shown as "off"
    broken_thumbnails: list[tuple[str, str]] = field(default_factory=list)  # (image_id, error)
    embedded_bytes: int = 0  # base64 bytes of the images inside report.html
    linked_images: int = 0  # images past the embedding budget, linked from plots/ or thumbs/


def steps_from_funnel(steps: Sequence[tuple[str, int]]) -> list[FunnelStep]:
    """FunnelSteps from ``[("images in", n0), ("after sanitize", n1), ...]`` (:attr:`Funnel.steps`).

    The first entry is the input count; each later entry is what is left after a stage.
    """
    if not steps:
        raise ValueError("funnel: no steps")
    result = []
    previous = steps[0][1]
    for label, left in steps[1:]:
        stage = label.removeprefix("after ").strip()
        result.append(FunnelStep(stage=stage, images_in=previous, removed=previous - left, kept=left))
        previous = left
    if not result:  # only an input count: a funnel with nothing run yet
        result.append(FunnelStep(stage=steps[0][0], images_in=previous, removed=0, kept=previous))
    return result


def select_threshold_examples(
    ids: Sequence[Any], values: np.ndarray, threshold: float, n: int = 8
) -> tuple[list[tuple[Any, float]], list[tuple[Any, float]]]:
    """The ``n`` scores just below ``threshold`` and the ``n`` at or above it, as (id, score) pairs.

    Both lists are in ascending score order, so reading ``below`` then ``above`` walks across
    the threshold. Non-finite scores are skipped. ``ids`` may be a list, array or polars
    Series aligned with ``values``; only the chosen rows are read from it.
    """
    values = np.asarray(values, dtype=np.float64).ravel()
    if len(ids) != len(values):
        raise ValueError(f"ids ({len(ids):,}) and values ({len(values):,}) differ in length")
    finite = np.isfinite(values)
    below_rows = np.flatnonzero(finite & (values < threshold))
    above_rows = np.flatnonzero(finite & (values >= threshold))
    below_rows = _extreme_rows(below_rows, values, n, largest=True)
    above_rows = _extreme_rows(above_rows, values, n, largest=False)
    return (
        [(ids[int(i)], float(values[i])) for i in below_rows],
        [(ids[int(i)], float(values[i])) for i in above_rows],
    )


def _extreme_rows(rows: np.ndarray, values: np.ndarray, n: int, largest: bool) -> np.ndarray:
    """The ``n`` rows with the largest (or smallest) values, ascending by value, ties by row."""
    if n <= 0 or len(rows) == 0:
        return rows[:0]
    keys = -values[rows] if largest else values[rows]
    if len(rows) > n:  # partial selection: millions of scores, a handful of examples
        rows = rows[np.argpartition(keys, n - 1)[:n]]
    order = np.lexsort((rows, values[rows]))
    return rows[order]


# ----------------------------------------------------------------------------- rendering


def render_report(
    data: ReportData,
    out_dir: Path,
    *,
    thumb_side: int = 128,
    progress: Callable[[int, int], None] | None = None,
    workers: int = 4,
    embed_budget_bytes: int = EMBED_BUDGET_BYTES,
) -> ReportFiles:
    """Write the report folder (see the module docstring) and say what was written.

    ``progress(done, total)`` is called as thumbnails are made (the slow part: each one
    decodes an original). ``workers`` threads decode them; Pillow releases the GIL while
    decoding. Files from an earlier render are overwritten, never deleted. ``thumb_side`` is
    capped at :data:`MAX_THUMB_SIDE`; ``embed_budget_bytes`` bounds the images inside the page.
    """
    import matplotlib

    matplotlib.use("Agg")  # headless: the report is written by workers without a display

    if thumb_side < 16:
        raise ValueError(f"thumb_side must be at least 16 pixels, got {thumb_side}")
    thumb_side = min(thumb_side, MAX_THUMB_SIDE)
    out_dir = Path(out_dir)
    plots_dir, thumbs_dir = out_dir / "plots", out_dir / "thumbs"
    plots_dir.mkdir(parents=True, exist_ok=True)
    thumbs_dir.mkdir(parents=True, exist_ok=True)

    thumbs = _Thumbnails(thumbs_dir, thumb_side)
    _request_thumbnails(data, thumbs)
    thumbs.make_all(progress, workers)

    plots: dict[str, Path] = {}
    page = _Page(data, plots_dir, plots, thumbs, _Embedder(out_dir, embed_budget_bytes))
    body = page.render()
    html_path = out_dir / "report.html"
    write_text(html_path, body)
    return ReportFiles(
        html=html_path,
        plots=plots,
        thumbnails=thumbs.written,
        sections=page.sections,
        stages_off=page.stages_off,
        broken_thumbnails=sorted(thumbs.broken.items()),
        embedded_bytes=page.embed.used,
        linked_images=page.embed.linked,
    )


def _request_thumbnails(data: ReportData, thumbs: _Thumbnails) -> None:
    """Register every image the page shows, so they are decoded once each, up front."""
    for group in data.duplicate_groups:
        thumbs.want(group.keeper)
        for member, _ in group.members:
            thumbs.want(member)
    for pair in [*data.near_pairs_below, *data.near_pairs_above]:
        thumbs.want(pair.a)
        thumbs.want(pair.b)
    if data.decontamination is not None:
        for match in [*data.decontamination.below, *data.decontamination.above]:
            thumbs.want(match.image)
            if match.reference is not None:
                thumbs.want(match.reference)
    for section in data.filters or []:
        for loc, _ in [*section.below, *section.above]:
            thumbs.want(loc)
    for example in data.rotations or []:
        thumbs.want(example.image, turn=0)  # before: the stored image as it is
        thumbs.want(example.image, turn=example.angle)  # after: turned upright
    if data.clusters is not None:
        for locs in data.clusters.examples.values():
            for loc in locs:
                thumbs.want(loc)


@dataclass
class _Thumb:
    file: str | None = None  # relative link from report.html
    data: bytes = b""  # the JPEG itself, for embedding
    width: int = 0
    height: int = 0
    error: str | None = None


class _Thumbnails:
    """Small JPEGs of the example images, one file per (image, turn), named by a hash of the key."""

    def __init__(self, folder: Path, side: int) -> None:
        self.folder = folder
        self.side = side
        self._wanted: dict[tuple, ImageLoc] = {}
        self._done: dict[tuple, _Thumb] = {}
        self.broken: dict[str, str] = {}
        self.written = 0

    @staticmethod
    def _key(loc: ImageLoc, turn: int) -> tuple:
        return (loc.image_id, loc.source_path, loc.offset, loc.size_bytes, turn)

    def want(self, loc: ImageLoc, turn: int | None = None) -> None:
        self._wanted.setdefault(self._key(loc, loc.rotate if turn is None else turn), loc)

    def get(self, loc: ImageLoc, turn: int | None = None) -> _Thumb:
        return self._done[self._key(loc, loc.rotate if turn is None else turn)]

    def make_all(self, progress: Callable[[int, int], None] | None, workers: int) -> None:
        keys = list(self._wanted)
        total = len(keys)
        if progress:
            progress(0, total)
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            results = pool.map(lambda key: self._make(self._wanted[key], key[-1], key), keys)
            for done, (key, thumb) in enumerate(zip(keys, results, strict=True), start=1):
                self._done[key] = thumb
                if thumb.error is not None:
                    self.broken[self._wanted[key].image_id] = thumb.error
                else:
                    self.written += 1
                if progress:
                    progress(done, total)

    def _make(self, loc: ImageLoc, turn: int, key: tuple) -> _Thumb:
        name = hashlib.sha1(repr(key).encode()).hexdigest()[:20] + ".jpg"
        try:
            data = read_bytes(loc.source_path, loc.offset, loc.size_bytes)
            image = load_rgb(data, draft_size=(self.side, self.side))
            image = upright(image, turn)  # the same lossless turn export applies
            image.thumbnail((self.side, self.side), Image.Resampling.LANCZOS)
            buffer = io.BytesIO()
            image.save(buffer, "JPEG", quality=THUMB_QUALITY)
            encoded = buffer.getvalue()
            write_bytes(self.folder / name, encoded, fsync=False)  # many, and remade by any re-render
        except Exception as exc:  # one bad example must not cost the whole report
            return _Thumb(error=f"cannot read {loc.source_path}: {describe_error(exc)}")
        return _Thumb(file=f"{self.folder.name}/{name}", data=encoded, width=image.width, height=image.height)


class _Embedder:
    """Turns an image into a ``data:`` URI while the byte budget lasts, else into its relative link."""

    def __init__(self, out_dir: Path, budget: int) -> None:
        self.out_dir = out_dir
        self.budget = budget
        self.used = 0
        self.embedded = 0
        self.linked = 0

    def src(self, data: bytes, mime: str, relative: str) -> str:
        encoded = base64.b64encode(data).decode("ascii")
        if self.used + len(encoded) > self.budget:
            self.linked += 1
            return relative
        self.used += len(encoded)
        self.embedded += 1
        return f"data:{mime};base64,{encoded}"


# ----------------------------------------------------------------------------- page


def _count(n: int | float) -> str:
    return f"{int(n):,}"


def _percent(part: float, whole: float) -> str:
    if whole <= 0:
        return "–"
    share = 100.0 * part / whole
    if 0 < share < 0.1:
        return "<0.1%"
    return f"{share:.1f}%"


def _plural(n: int, noun: str) -> str:
    return f"{n:,} {noun}" if n == 1 else f"{n:,} {noun}s"


def _dist(value: float) -> str:
    """A distance: three decimals (1 - cos of near copies is 1e-7, not worth an exponent)."""
    return f"{value:.3f}" if math.isfinite(value) else str(value)


def clip_tails(values: np.ndarray, threshold: float | None) -> tuple[np.ndarray, str]:
    """Values with the tails beyond :data:`TAIL_PERCENTILES` clipped onto the edge, and a note.

    A side is clipped only where its tail is long (it would stretch the axis by more than half
    the percentile span: a well-spread distribution is drawn whole), and only where its
    percentile lies beyond the threshold, so a clipped value stays on its side of it and the
    removed/kept shading is unchanged.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.size < 2:
        return values, ""
    low, high = (float(v) for v in np.percentile(values, TAIL_PERCENTILES))
    long_tail = 0.5 * (high - low)
    notes = []
    if (threshold is None or low < threshold) and low - values.min() > long_tail:
        n_low = int((values < low).sum())
        if n_low:
            values = np.maximum(values, low)
            notes.append(f"{n_low:,} below {_num(low)} drawn at {_num(low)}")
    if (threshold is None or high > threshold) and values.max() - high > long_tail:
        n_high = int((values > high).sum())
        if n_high:
            values = np.minimum(values, high)
            notes.append(f"{n_high:,} above {_num(high)} drawn at {_num(high)}")
    note = f"histogram tails clipped at the {TAIL_PERCENTILES[0]:g}th/{TAIL_PERCENTILES[1]:g}th percentiles: "
    return values, (note + ", ".join(notes)) if notes else ""


def _num(value: float) -> str:
    """A score or distance: four significant digits, enough to tell neighbours of a threshold apart."""
    return f"{value:.4g}" if math.isfinite(value) else str(value)


def _score(value: float, threshold: float) -> str:
    """A score beside its threshold: enough digits that a score just under it does not print as it."""
    for digits in range(4, 10):
        text = f"{value:.{digits}g}"
        if value == threshold or text != f"{threshold:.{digits}g}":
            return text
    return repr(value)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").lower()[:40] or "x"


@dataclass
class _Figure:
    """One thumbnail as the page shows it: the picture (or why there is none) and its caption."""

    image_id: str
    side: int  # the figure's width: every thumbnail of a page sits in a box this wide
    caption: str
    src: str | None = None  # data: URI or relative link; None when the image could not be read
    width: int = 0
    height: int = 0
    error: str | None = None
    badge: str = ""  # this section's verdict ("removed" / "kept"), its CSS class
    verdict: str = ""  # the badge's words
    final: str | None = None  # the image's fate in the decisions ("removed" / "kept"), when known
    placeholder: str = "unreadable"  # the words in the box shown instead of a picture (src None)

    @property
    def short(self) -> str:
        return self.image_id.rsplit("/", 1)[-1]

    @property
    def lazy(self) -> bool:
        # lazy loading only saves work for a linked file; an embedded one is already in the page
        return self.src is not None and not self.src.startswith("data:")


@dataclass
class _Plot:
    src: str
    alt: str


@dataclass
class _Section:
    """One section of the page. ``off``: the stage is off in the project (a one-line section)."""

    key: str
    title: str
    note: str | None = None
    off: bool = False
    facts: list[str] = field(default_factory=list)  # one paragraph, joined by "; "
    plot: _Plot | None = None
    parts: dict[str, Any] = field(default_factory=dict)  # what only this kind of section shows


class _Page:
    """Prepares what the page shows, section by section (drawing the plots on the way); the
    template ``report.html.j2`` lays it out."""

    def __init__(
        self, data: ReportData, plots_dir: Path, plots: dict[str, Path], thumbs: _Thumbnails, embed: _Embedder
    ) -> None:
        self.embed = embed
        self.data = data
        self.plots_dir = plots_dir
        self.plots = plots
        self.thumbs = thumbs
        self.sections: list[str] = []
        self.stages_off: list[str] = []
        self._used_notes: set[str] = set()

    # -- page frame

    def render(self) -> str:
        # In page order: images are embedded while the budget lasts, so the first ones seen win.
        sections = [
            self._funnel(),
            self._near_duplicates(),
            self._decontamination(),
            self._filters(),
            self._rotation(),
            self._clusters(),
        ]
        shown = [section for section in sections if section is not None]
        # after the sections: the summary lists which were off and which notes they did not show
        return render_template(
            "report.html.j2",
            title=f"Curation report: {self.data.project}",
            nav={section.key: section.title for section in shown},
            summary=self._summary(),
            embed_note=self._embedding_note(),
            sections=shown,
            count=_count,
            percent=_percent,
        )

    def _embedding_note(self) -> str:
        side = self.thumbs.side
        text = (
            f"Images are embedded in this file ({self.embed.used / 2**20:.1f} MiB of a"
            f" {self.embed.budget / 2**20:.0f} MiB budget); thumbnails at most {side}px"
            f" (cap {MAX_THUMB_SIDE}px), JPEG quality {THUMB_QUALITY}."
        )
        if self.embed.linked:
            text += (
                f" {_plural(self.embed.linked, 'image')} past the budget are linked from the plots/ and"
                " thumbs/ folders next to this file: keep the folder with it to see them."
            )
        return text

    def _summary(self) -> dict[str, Any]:
        funnel = self.data.funnel
        biggest = max(funnel, key=lambda step: step.removed)
        broken = len(self.thumbs.broken)
        return {
            "first": funnel[0].images_in,
            "last": funnel[-1].kept,
            "biggest": biggest if biggest.removed else None,
            "stages_off": ", ".join(self.stages_off),
            "broken": _plural(broken, "example image") if broken else "",
            "notes": [(key, text) for key, text in self.data.notes.items() if key not in self._used_notes],
        }

    def _open(self, key: str) -> _Section:
        self.sections.append(SECTION_TITLES[key])
        return _Section(key, SECTION_TITLES[key], note=self._note(key))

    def _off(self, key: str) -> _Section:
        title = SECTION_TITLES[key]
        self.stages_off.append(title)
        return _Section(key, title, note=self._note(key), off=True)

    def _note(self, key: str) -> str | None:
        if key not in self.data.notes:
            return None
        self._used_notes.add(key)
        return self.data.notes[key]

    def _plot(self, key: str, name: str, draw: Callable[[Path], None], alt: str) -> _Plot:
        path = self.plots_dir / name
        # plots are rebuilt by the next render: no fsync, as for the thumbnails
        write_with(path, draw, fsync=False)
        self.plots[key] = path
        return _Plot(self.embed.src(path.read_bytes(), "image/png", f"{self.plots_dir.name}/{name}"), alt)

    def _figure(
        self, loc: ImageLoc, caption: str, turn: int | None = None, badge: str = "", verdict: str = ""
    ) -> _Figure:
        """A thumbnail; ``badge`` ("removed"/"kept") is this section's verdict, labelled ``verdict``
        (default: the badge itself); the final decision, when known, gets its own outlined badge."""
        thumb = self.thumbs.get(loc, turn)
        figure = _Figure(loc.image_id, self.thumbs.side, caption, badge=badge, verdict=verdict or badge)
        if loc.final is not None:
            figure.final = "removed" if loc.final == "remove" else "kept"
        if thumb.file is None:
            figure.error = thumb.error
        else:
            figure.src = self.embed.src(thumb.data, "image/jpeg", thumb.file)
            figure.width, figure.height = thumb.width, thumb.height
        return figure

    # -- sections

    def _funnel(self) -> _Section:
        steps = self.data.funnel
        section = self._open("funnel")
        section.parts = {
            "chain": " → ".join([_count(steps[0].images_in), *(_count(step.kept) for step in steps)]),
            "steps": steps,
            "first": steps[0].images_in,
        }
        section.plot = self._plot(
            "funnel", "funnel.png", lambda p: _funnel_plot(steps, p), "images left after each stage"
        )
        return section

    def _near_duplicates(self) -> _Section:
        data = self.data
        if data.near_dup_distances is None and not (
            data.duplicate_groups or data.near_pairs_below or data.near_pairs_above
        ):
            return self._off("near_duplicates")
        section = self._open("near_duplicates")
        threshold = data.near_dup_threshold
        if data.near_dup_distances is not None:
            distances = np.asarray(data.near_dup_distances, dtype=np.float64).ravel()
            distances = distances[np.isfinite(distances)]
            facts = [f"{_count(len(distances))} candidate pairs"]
            if len(distances):
                facts.append(
                    f"distance min {_dist(distances.min())}, median {_dist(float(np.median(distances)))},"
                    f" max {_dist(distances.max())}"
                )
            if threshold is not None:
                under = int((distances < threshold).sum())
                facts.append(
                    f"threshold {_dist(threshold)}: {_count(under)} pairs under it"
                    f" ({_percent(under, len(distances))}) make the groups"
                )
            drawn, clipped = clip_tails(distances, threshold)
            if clipped:
                facts.append(clipped)
            section.facts = facts
            section.plot = self._plot(
                "near_duplicates",
                "near_duplicates.png",
                # Pairs under the threshold are grouped; removal happens per group, not per pair.
                lambda p: _distance_histogram(drawn, threshold, p),
                "histogram of pair distances with the threshold",
            )
        groups = []
        for number, group in enumerate(data.duplicate_groups, start=1):
            figures = [self._figure(group.keeper, "keeper", badge="kept")]
            figures += [
                self._figure(member, f"d = {_dist(distance)}", badge="removed")
                for member, distance in group.members
            ]
            groups.append(
                {"label": f"group {number}: {_plural(len(group.members), 'duplicate')}", "figures": figures}
            )
        section.parts = {"groups": groups, "pairs": self._near_pairs()}
        return section

    def _near_pairs(self) -> dict[str, Any] | None:
        data = self.data
        if not (data.near_pairs_below or data.near_pairs_above):
            return None
        sides = []
        for label, pairs, badge, verdict in (
            ("Just under it: grouped, one of each group kept", data.near_pairs_below, "removed", "grouped"),
            (
                "At or just above it: not grouped, both kept by this stage",
                data.near_pairs_above,
                "kept",
                "kept",
            ),
        ):
            figures = [
                [
                    self._figure(loc, f"d = {_dist(pair.distance)}", badge=badge, verdict=verdict)
                    for loc in (pair.a, pair.b)
                ]
                for pair in pairs
            ]
            sides.append({"label": label, "pairs": figures})
        threshold = data.near_dup_threshold
        return {"threshold": "" if threshold is None else f" {_dist(threshold)}", "sides": sides}

    def _decontamination(self) -> _Section | None:
        section_data = self.data.decontamination
        if section_data is None:
            return None  # no evaluation set named: no section at all (see ReportData)
        section = self._open("decontamination")
        threshold = section_data.threshold
        section.facts = [
            f"{_plural(len(section_data.sets), 'evaluation set')}",
            f"a pool image is removed when the nearest image of a set lies within copy-detection"
            f" distance {_dist(threshold)} of it",
        ]
        sides = []
        for label, matches, badge in (
            ("At or under it: removed", section_data.below, "removed"),
            ("Just past it: kept by this stage", section_data.above, "kept"),
        ):
            pairs = [
                [
                    self._figure(match.image, f"d = {_dist(match.distance)}", badge=badge),
                    self._reference_figure(match),
                ]
                for match in matches
            ]
            sides.append({"label": label, "pairs": pairs})
        section.parts = {
            "sets": section_data.sets,
            "threshold": _dist(threshold),
            "sides": sides,
        }
        return section

    def _reference_figure(self, match: ContaminationMatch) -> _Figure:
        """The matched evaluation image, captioned with its set; a set of vectors alone has no
        picture to show, only the name its benchmark gives the image."""
        caption = f"{match.reference_set} image"
        if match.reference is not None:
            return self._figure(match.reference, caption)
        return _Figure(
            match.reference_image,
            self.thumbs.side,
            caption,
            error=f"reference set {match.reference_set} holds vectors only",
            placeholder="vectors only",
        )

    def _filters(self) -> _Section:
        filters = self.data.filters
        if not filters:
            return self._off("filters")
        section = self._open("filters")
        section.parts = {"filters": [self._filter(number, one) for number, one in enumerate(filters)]}
        return section

    def _filter(self, number: int, section: FilterSection) -> dict[str, Any]:
        from curation_assets.core.outputs.plots import histogram_plot

        values = section.values
        finite = values[np.isfinite(values)]
        removed = int(section.removed_mask(finite).sum())
        rule = f"{'<' if section.removes == 'below' else '>'} {_num(section.threshold)}"
        facts = [
            f"{_count(len(finite))} images scored",
            f"threshold {_num(section.threshold)}, removes scores {section.removes} it (score {rule})",
            f"would remove {_count(removed)} of all {_count(len(finite))} scored, duplicates included"
            f" ({_percent(removed, len(finite))})",
        ]
        if section.still_in is not None:
            # the funnel's count: duplicates were removed before the filters ran
            reaching = values[section.still_in]
            here = int(section.removed_mask(reaching[np.isfinite(reaching)]).sum())
            facts.append(
                f"removed here {_count(here)} of {_count(len(reaching))} still in at this stage"
                f" ({_percent(here, len(reaching))})"
            )
        if len(finite):
            facts.append(
                f"score min {_num(finite.min())}, median {_num(float(np.median(finite)))},"
                f" max {_num(finite.max())}"
            )
        if len(finite) < len(values):
            facts.append(f"{_count(len(values) - len(finite))} without a score")
        drawn, clipped = clip_tails(finite, section.threshold)
        if clipped:
            facts.append(clipped)
        note = self._note(section.name)
        plot = self._plot(
            f"filter:{section.name}",
            f"filter_{number}_{_slug(section.name)}.png",
            lambda p: histogram_plot(drawn, section.threshold, p, section.name, "score", section.removes),
            f"histogram of {section.name} scores with the threshold",
        )
        sides = []
        for label, examples in (
            ("Just below the threshold", section.below),
            ("At or just above the threshold", section.above),
        ):
            figures = [
                self._figure(
                    loc,
                    f"score {_score(score, section.threshold)}",
                    **_filter_badge(section.removed_mask(np.array([score]))[0]),
                )
                for loc, score in examples
            ]
            sides.append({"label": label, "figures": figures})
        return {"name": section.name, "note": note, "facts": facts, "plot": plot, "sides": sides}

    def _rotation(self) -> _Section:
        examples = self.data.rotations
        if examples is None:
            return self._off("rotation")
        section = self._open("rotation")
        by_angle: dict[int, int] = {}
        for example in examples:
            by_angle[example.angle] = by_angle.get(example.angle, 0) + 1
        counts = ", ".join(f"{_count(n)} turned {angle}°" for angle, n in sorted(by_angle.items()))
        pairs = [
            (
                self._figure(example.image, "as stored", turn=0),
                self._figure(
                    example.image,
                    f"turned back {example.angle}°, p = {example.probability:.3f}",
                    turn=example.angle,
                ),
            )
            for example in examples
        ]
        section.parts = {"examples": _plural(len(examples), "example"), "counts": counts, "pairs": pairs}
        return section

    def _clusters(self) -> _Section:
        clusters = self.data.clusters
        if clusters is None:
            return self._off("clusters")
        section = self._open("clusters")
        samples = _as_counts(clusters.samples_per_cluster)
        sizes = _as_counts(clusters.sizes) if clusters.sizes is not None else None
        sampled = np.array(list(samples.values()), dtype=np.int64)
        facts = [f"{_count(len(samples))} clusters", f"{_count(sampled.sum())} images sampled"]
        if len(sampled):
            facts.append(
                f"samples per cluster min {_count(sampled.min())}, median {_num(float(np.median(sampled)))},"
                f" max {_count(sampled.max())}"
            )
        if sizes is not None:
            sizes_arr = np.array(list(sizes.values()), dtype=np.int64)
            full = sum(1 for c, n in samples.items() if sizes.get(c) is not None and n >= sizes[c])
            facts.append(f"{_count(sizes_arr.sum())} images clustered")
            facts.append(
                f"cluster size min {_count(sizes_arr.min() if len(sizes_arr) else 0)},"
                f" max {_count(sizes_arr.max() if len(sizes_arr) else 0)}"
            )
            facts.append(f"{_plural(full, 'cluster')} taken whole")
        section.facts = facts
        section.plot = self._plot(
            "clusters", "clusters.png", lambda p: _cluster_plot(samples, sizes, p), "samples per cluster"
        )
        groups = []
        for cluster in sorted(clusters.examples):
            size = "" if sizes is None else f"{_count(sizes.get(cluster, 0))} images, "
            groups.append(
                {
                    "label": f"cluster {cluster}: {size}{_count(samples.get(cluster, 0))} sampled",
                    "figures": [self._figure(loc, "") for loc in clusters.examples[cluster]],
                }
            )
        section.parts = {"groups": groups}
        return section


def _filter_badge(removes: bool) -> dict[str, str]:
    # the filter's own verdict, worded so it is not read as the image's fate (the "final" badge)
    return (
        {"badge": "removed", "verdict": "filter: removes"}
        if removes
        else {"badge": "kept", "verdict": "filter: keeps"}
    )


def _as_counts(counts: dict[int, int] | np.ndarray) -> dict[int, int]:
    """Cluster id -> count, from a dict or an array indexed by cluster id."""
    if isinstance(counts, dict):
        return {int(k): int(v) for k, v in counts.items()}
    array = np.asarray(counts).ravel()
    return {i: int(v) for i, v in enumerate(array)}


# ----------------------------------------------------------------------------- plots


def _funnel_plot(steps: list[FunnelStep], path: Path) -> None:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    labels = ["input", *(step.stage for step in steps)]
    left = [steps[0].images_in, *(step.kept for step in steps)]
    removed = [0, *(step.removed for step in steps)]
    figure, axes = plt.subplots(figsize=(9, 0.5 * len(labels) + 1.2), dpi=100)
    y = np.arange(len(labels))[::-1]  # the input on top, reading down like the funnel table
    axes.barh(y, left, color="steelblue", label="left")
    axes.barh(y, removed, left=left, color="lightcoral", label="removed by this stage")
    total = max(left[0], 1)
    for row, count, cut in zip(y, left, removed, strict=True):
        axes.text(count + cut, row, f" {count:,} ({100 * count / total:.1f}%)", va="center", fontsize=8)
    axes.set_yticks(y, labels)
    axes.set_xlabel("images")
    axes.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:,.0f}"))
    axes.set_xlim(0, total * 1.3)  # room for the labels right of the bars
    axes.set_title("images left after each stage")
    # Below the axes: inside it would cover the labels at the bar ends.
    axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, fontsize=8, frameon=False)
    _save(figure, path)


def _distance_histogram(distances: np.ndarray, threshold: float | None, path: Path) -> None:
    """Pair distances with the threshold; pairs under it are grouped, and removal happens per group
    (not per pair), so unlike a score histogram the shaded side is "grouped", counted in pairs."""
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 3.5), dpi=100)
    if len(distances):
        axes.hist(distances, bins=60, color="steelblue")
    if threshold is not None:
        low, high = axes.get_xlim()
        low, high = min(low, threshold), max(high, threshold)  # the line stays in view
        under = int((distances < threshold).sum())
        axes.axvspan(low, threshold, color="crimson", alpha=0.08, label=f"grouped: {under:,} pairs")
        axes.axvline(threshold, color="crimson", linestyle="--", label=f"threshold {threshold:g}")
        axes.set_xlim(low, high)
        axes.legend(fontsize=8)
    axes.set_title("near-duplicate pair distances")
    axes.set_xlabel("distance")
    axes.set_ylabel("pairs")
    _save(figure, path)


def _cluster_plot(samples: dict[int, int], sizes: dict[int, int] | None, path: Path) -> None:
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(9, 3.5), dpi=100)
    clusters = sorted(samples)
    if len(clusters) <= _BAR_CHART_MAX_CLUSTERS:
        x = np.arange(len(clusters))
        if sizes is not None:
            axes.bar(x, [sizes.get(c, 0) for c in clusters], color="lightgray", label="cluster size")
        axes.bar(x, [samples[c] for c in clusters], color="steelblue", width=0.6, label="sampled")
        axes.set_xticks(x, [str(c) for c in clusters], fontsize=7, rotation=90 if len(clusters) > 20 else 0)
        axes.set_xlabel("cluster")
    else:
        # Thousands of clusters: sorted curves show the balance (flat samples, long-tailed sizes).
        order = sorted(clusters, key=lambda c: (sizes or samples).get(c, 0), reverse=True)
        rank = np.arange(1, len(order) + 1)
        if sizes is not None:
            axes.plot(rank, [sizes.get(c, 0) for c in order], color="gray", label="cluster size")
        axes.plot(rank, [samples[c] for c in order], color="steelblue", label="sampled")
        axes.set_xlabel("cluster rank (largest first)")
        values = [v for v in [*samples.values(), *(sizes or {}).values()] if v > 0]
        if values and max(values) > 100 * min(values):
            axes.set_yscale("log")
    axes.set_ylabel("images")
    axes.set_title("samples per cluster")
    axes.legend(fontsize=8)
    _save(figure, path)


def _save(figure: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    figure.tight_layout()
    figure.savefig(path, format="png", bbox_inches="tight")  # keeps a legend placed outside the axes
    plt.close(figure)
