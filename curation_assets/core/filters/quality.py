"""Weight-free technical-quality scores: blur, darkness, over-exposure, low information, grayscale.

Pure library, no Dagster. Every score is computed on a *working image*: the decoded,
upright RGB image reduced (area average) so that its longer side is :data:`WORK_SIDE`
pixels. A fixed working size makes the scores independent of resolution, so one
threshold fits a pool of mixed sizes, and lets JPEGs decode in draft mode (DCT
scaling), which is what makes this pass cheap. Images smaller than the working size are
scored as they are: enlarging them would only add blur.

The checks are small named units in :data:`QUALITY_CHECKS` (cleanvision style): each
names the score column it reads, which side of its threshold is bad, and a documented
default. :func:`quality_flags` applies them to a score table; ``filter_decisions`` in the
assets builds the same comparisons as :class:`~curation_assets.core.filters.rules.FilterRule`
objects (:func:`quality_rules`), so a flag and a removal always agree.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import polars as pl
from PIL import Image

from curation_assets.core.filters.rules import FilterRule
from curation_assets.core.ingest.images import describe_error
from curation_assets.core.pool import usable_cores

if TYPE_CHECKING:  # decode.py imports torch: workers must not pay for that
    from curation_assets.core.ingest.images import ImageRef

# Bump when a score's definition changes: stored scores are recomputed. 2: scored from the shard
# pass's one full decode and its box reductions, not from a JPEG draft decode.
QUALITY_VERSION = 2

WORK_SIDE = 256  # longer side of the working image every score is computed on
# The blur score's denominator (rms of the 2-4 px detail, luminance in [0, 1]) is held
# at least this (a quarter of a grey level): a flat image must not divide noise by zero.
MIN_STRUCTURE = 1e-3
# Colourfulness (Hasler & Suesstrunk, on RGB in [0, 1]) below which an image counts as
# grayscale: exact greys score 0; this leaves room for the chroma noise of a grey picture
# saved as colour JPEG. On the demo, colour photos score >= 0.06 and the palest drawings
# (near-grey documents) >= 0.014.
GRAYSCALE_COLORFULNESS = 0.01

QUALITY_COLUMNS: dict[str, Any] = {
    "image_id": pl.String,
    "blur": pl.Float64,  # fine-to-coarse detail ratio of the grey working image: higher = sharper
    "brightness_p99": pl.Float64,  # 99th percentile of luminance in [0, 1]: low = dark
    "brightness_p5": pl.Float64,  # 5th percentile of luminance in [0, 1]: high = over-exposed
    "entropy": pl.Float64,  # Shannon entropy of the 256-bin grey histogram, bits (0-8)
    "colorfulness": pl.Float64,  # Hasler-Suesstrunk colourfulness on [0, 1] RGB: 0 = grey
    "error": pl.String,  # why an image has no scores (null when scored)
}
SCORE_NAMES: tuple[str, ...] = ("blur", "brightness_p99", "brightness_p5", "entropy", "colorfulness")


# ----------------------------------------------------------------------------- the metrics


def working_size(width: int, height: int, side: int = WORK_SIDE) -> tuple[int, int]:
    """(width, height) of the working copy of a width x height image (never enlarged)."""
    scale = min(1.0, side / max(width, height, 1))
    return max(1, round(width * scale)), max(1, round(height * scale))


def working_image(image: Image.Image, side: int = WORK_SIDE) -> Image.Image:
    """``image`` as RGB reduced by area averaging so that its longer side is ``side`` (never enlarged)."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    size = working_size(image.width, image.height, side)
    if size == image.size:
        return image
    # BOX is a true area average: no ringing, and cheap for the large reductions this needs.
    return image.resize(size, Image.Resampling.BOX)


def blur_score(grey: np.ndarray) -> float:
    """Fine-to-coarse detail ratio of a grey image in [0, 1]: higher = sharper.

    ``rms(grey - G1(grey)) / rms(G1(half) - G2(half))``, with ``Gs`` a Gaussian blur of
    sigma ``s`` pixels and ``half`` the image averaged over 2x2 blocks: the detail finer
    than about a pixel over the structure at the 2-4 pixel scale (measured at half
    resolution, where it costs a quarter). Blur empties the fine band long before the
    coarse one, while exposure and contrast scale both alike, so a dark or flat-lit but
    sharp photo is not blurry, and a photo with little texture is judged by the texture
    it has. On the working image (longer side :data:`WORK_SIDE`) the scale is fixed
    relative to the picture, not to its pixel count. An image with no structure at all
    (a flat colour) scores 0. NaN for images under 3x3 pixels.
    """
    from scipy import ndimage  # here, not at the top: listing and signatures stay light

    if grey.shape[0] < 3 or grey.shape[1] < 3:
        return float("nan")
    grey = grey.astype(np.float32, copy=False)
    fine = grey - ndimage.gaussian_filter(grey, 1.0)
    rows, cols = grey.shape[0] // 2 * 2, grey.shape[1] // 2 * 2
    block = grey[:rows, :cols]
    half = 0.25 * (block[0::2, 0::2] + block[1::2, 0::2] + block[0::2, 1::2] + block[1::2, 1::2])
    coarse = ndimage.gaussian_filter(half, 1.0) - ndimage.gaussian_filter(half, 2.0)
    return _rms(fine) / max(_rms(coarse), MIN_STRUCTURE)


def _rms(values: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(values, dtype=np.float64))))


def grey_entropy(grey_u8: np.ndarray) -> float:
    """Shannon entropy, in bits, of the 256-bin histogram of an 8-bit grey image."""
    counts = np.bincount(grey_u8.ravel(), minlength=256).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum()) + 0.0  # + 0.0: a flat image gives 0.0, not -0.0


def colorfulness(rgb: np.ndarray) -> float:
    """Hasler & Suesstrunk (2003) colourfulness of RGB values in [0, 1]; 0 for any grey image."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    rg = r - g
    yb = 0.5 * (r + g) - b
    spread = np.sqrt(rg.var() + yb.var())
    mean = np.sqrt(rg.mean() ** 2 + yb.mean() ** 2)
    return float(spread + 0.3 * mean)


def quality_metrics(image: Image.Image) -> dict[str, float]:
    """The scores of :data:`SCORE_NAMES` for one (upright) image, on its working image."""
    work = working_image(image)
    grey_u8 = np.asarray(work.convert("L"))  # ITU-R 601 luma, as cleanvision and most viewers
    grey = grey_u8.astype(np.float32) / 255.0
    counts = np.bincount(grey_u8.ravel(), minlength=256)
    p5, p99 = percentiles_u8(counts, (5, 99))
    rgb = np.asarray(work, dtype=np.float32) / 255.0
    return {
        "blur": blur_score(grey),
        "brightness_p99": p99 / 255.0,
        "brightness_p5": p5 / 255.0,
        "entropy": grey_entropy(grey_u8),
        "colorfulness": colorfulness(rgb),
    }


def percentiles_u8(counts: np.ndarray, qs: tuple[float, ...]) -> list[float]:
    """``np.percentile`` (linear interpolation) of 8-bit values, read from their 256-bin histogram.

    The same values as sorting the pixels, without the sort: the two order statistics around
    each rank are found in the cumulative counts.
    """
    cumulative = np.cumsum(counts)
    last = int(cumulative[-1]) - 1
    out = []
    for q in qs:
        position = q / 100.0 * last
        low = int(np.floor(position))
        value_low = int(np.searchsorted(cumulative, low, side="right"))
        value_high = int(np.searchsorted(cumulative, min(low + 1, last), side="right"))
        out.append(float(value_low + (value_high - value_low) * (position - low)))
    return out


# ----------------------------------------------------------------------------- one image


def _empty_row(image_id: str, error: str) -> dict[str, Any]:
    return {"image_id": image_id, **dict.fromkeys(SCORE_NAMES), "error": error}


def score_image(image_id: str, image: Image.Image) -> dict[str, Any]:
    """One row of :data:`QUALITY_COLUMNS` for a decoded upright image (or its working image)."""
    try:
        scores = quality_metrics(image)
    except Exception as exc:  # an exotic image must not stop a shard: recorded, not fatal
        return _empty_row(image_id, describe_error(exc))
    row: dict[str, Any] = {"image_id": image_id}
    for name in SCORE_NAMES:
        value = scores[name]
        row[name] = value if np.isfinite(value) else None
    row["error"] = None
    return row


# ----------------------------------------------------------------------------- many images

Progress = Callable[[int, "int | None", "float | None"], None]


def score_images(
    refs: Sequence[ImageRef],
    workers: int = 0,
    chunk_size: int = 64,
    progress: Progress | None = None,
) -> pl.DataFrame:
    """Quality scores of ``refs`` as a :data:`QUALITY_COLUMNS` frame, one row per ref in ``refs`` order.

    The scores the ``quality_scores`` asset stores, computed the same way: each image read and
    decoded by the shard pass (:mod:`~curation_assets.core.shard_pass`) and scored on its
    working copy. ``workers``: decode processes; 0 = one per CPU core, 1 = in this process.
    An image that fails, or that kills its worker process, gets null scores and an ``error``.
    ``progress(done, total, images_per_second)`` is called after each chunk.
    """
    from curation_assets.core.shard_pass import PassItem, PassPlan, run_pass

    out = run_pass(
        [PassItem(ref.image_id, ref.source_path, ref.offset, ref.size) for ref in refs],
        PassPlan(None, (("quality", score_image),)),
        workers=int(workers) if workers > 0 else usable_cores(),
        chunk_size=chunk_size,
        progress=progress,
    )
    rows = [
        row if row is not None else _empty_row(ref.image_id, error or "not processed")
        for ref, row, error in zip(refs, out.rows["quality"], out.errors, strict=True)
    ]
    return scores_frame(rows)


def scores_frame(rows: Sequence[dict[str, Any]]) -> pl.DataFrame:
    """Rows of :func:`score_image` as the stored :data:`QUALITY_COLUMNS` table."""
    return pl.DataFrame(rows, schema=QUALITY_COLUMNS)


# ----------------------------------------------------------------------------- the checks


@dataclass(frozen=True)
class QualityCheck:
    """A named quality check: ``column`` is bad when ``removes`` ("below"/"above") its threshold."""

    name: str  # the issue name in quality_issues; the flag column is is_<name>
    column: str
    removes: Literal["below", "above"]
    default: float
    doc: str


QUALITY_CHECKS: dict[str, QualityCheck] = {
    check.name: check
    for check in (
        QualityCheck(
            "dark",
            "brightness_p99",
            "below",
            0.32,
            "even the brightest 1% of pixels are darker than the threshold (cleanvision: 0.32)",
        ),
        QualityCheck(
            "light",
            "brightness_p5",
            "above",
            0.95,
            "even the darkest 5% of pixels are brighter than the threshold (cleanvision: 0.95)",
        ),
        QualityCheck(
            "low_information",
            "entropy",
            "below",
            3.0,
            "the grey histogram holds fewer than the threshold's bits (cleanvision: 3 bits)",
        ),
        QualityCheck(
            "blurry",
            "blur",
            "below",
            0.35,
            "fine detail under 0.35 x the 2-4 px structure (blur_score); separates the demo blur",
        ),
        QualityCheck(
            "grayscale",
            "colorfulness",
            "below",
            GRAYSCALE_COLORFULNESS,
            "no colour (off unless the project enables the grayscale check)",
        ),
    )
}


@dataclass(frozen=True)
class QualityThresholds:
    """Thresholds of the quality checks (defaults: :data:`QUALITY_CHECKS`); grayscale is on/off."""

    dark: float = QUALITY_CHECKS["dark"].default
    light: float = QUALITY_CHECKS["light"].default
    low_information: float = QUALITY_CHECKS["low_information"].default
    blur: float = QUALITY_CHECKS["blurry"].default
    grayscale: bool = False

    @classmethod
    def from_stage(cls, stage: Any) -> QualityThresholds:
        """From a config ``QualityStage`` (dark_threshold, light_threshold, ...)."""
        return cls(
            dark=stage.dark_threshold,
            light=stage.light_threshold,
            low_information=stage.low_information_threshold,
            blur=stage.blur_threshold,
            grayscale=stage.grayscale,
        )

    def threshold(self, check: str) -> float:
        values = {
            "dark": self.dark,
            "light": self.light,
            "low_information": self.low_information,
            "blurry": self.blur,
            "grayscale": GRAYSCALE_COLORFULNESS,
        }
        return float(values[check])

    def enabled(self, check: str) -> bool:
        return check != "grayscale" or self.grayscale


def quality_rules(thresholds: QualityThresholds) -> list[FilterRule]:
    """The enabled checks as filter rules named ``quality:<issue>`` (for ``filters.decide``)."""
    return [
        FilterRule(f"quality:{check.name}", check.column, thresholds.threshold(check.name), check.removes)
        for check in QUALITY_CHECKS.values()
        if thresholds.enabled(check.name)
    ]


def quality_flags(scores: pl.DataFrame, thresholds: QualityThresholds) -> pl.DataFrame:
    """``scores`` plus ``is_<issue>`` booleans and ``quality_issues`` (list of the issues that apply).

    A flag is null where its score is null (an image that could not be scored is not
    flagged; its ``error`` says why). ``is_grayscale`` always reports whether the image
    has no colour; "grayscale" enters ``quality_issues`` only when ``thresholds.grayscale``
    is on. The comparisons are strict, as in ``filters.decide``: a score equal to its
    threshold is not flagged.
    """
    missing = [c.column for c in QUALITY_CHECKS.values() if c.column not in scores.columns]
    if missing:
        raise ValueError(f"quality_flags: the score table has no column {', '.join(missing)}")
    flags = []
    issues = []
    for check in QUALITY_CHECKS.values():
        value = pl.col(check.column).cast(pl.Float64).fill_nan(None)
        threshold = thresholds.threshold(check.name)
        flag = value < threshold if check.removes == "below" else value > threshold
        flags.append(flag.alias(f"is_{check.name}"))
        if thresholds.enabled(check.name):
            issues.append(pl.when(flag.fill_null(False)).then(pl.lit(check.name)).otherwise(None))
    listed = pl.concat_list(issues).list.drop_nulls() if issues else pl.lit([], dtype=pl.List(pl.String))
    return scores.with_columns(*flags, listed.alias("quality_issues"))


__all__ = [
    "GRAYSCALE_COLORFULNESS",
    "QUALITY_CHECKS",
    "QUALITY_COLUMNS",
    "QUALITY_VERSION",
    "SCORE_NAMES",
    "WORK_SIDE",
    "QualityCheck",
    "QualityThresholds",
    "blur_score",
    "colorfulness",
    "grey_entropy",
    "quality_flags",
    "quality_metrics",
    "quality_rules",
    "score_images",
    "working_image",
]
