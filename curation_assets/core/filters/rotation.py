"""Rotation decisions from a 4-way rotation classifier, and the pixel turn that undoes one.

Pure library, no Dagster. Convention, used everywhere in the project (the demo's
``rotation`` column too): class ``i`` of the model means the image as seen (after its
EXIF orientation) is turned by ``ANGLES[i]`` degrees **clockwise** from upright. To undo
it, the image is turned by the same number of degrees **counter-clockwise**: that is
what :func:`upright` does and what the ``correction`` column holds.

A model rotation is applied only when the top class is not 0 degrees and its probability
is at least the project threshold (GLDv2 used 0.9): a confident "upright" and an unsure
anything both leave the image alone. Decisions are recorded; pixels are turned only by
export or the apply job.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import polars as pl
from PIL import Image

ANGLES: tuple[int, ...] = (0, 90, 180, 270)  # clockwise degrees of class 0..3
# Probabilities may come out of float16 softmax a little outside [0, 1].
_PROBABILITY_SLACK = 1e-3

# Pillow's ROTATE_n turns counter-clockwise by n degrees.
_UNDO: dict[int, Image.Transpose] = {
    90: Image.Transpose.ROTATE_90,
    180: Image.Transpose.ROTATE_180,
    270: Image.Transpose.ROTATE_270,
}


def rotation_decisions(
    probabilities: np.ndarray, threshold: float, image_ids: Sequence[str] | None = None
) -> pl.DataFrame:
    """Decisions for (n, 4) class probabilities (columns in :data:`ANGLES` order).

    Columns (plus ``image_id`` first when ``image_ids`` is given):

    - ``predicted_angle`` (Int64): clockwise degrees of the top class; on a tie the
      smaller angle wins, so a tie with 0 degrees means no change;
    - ``probability`` (Float64): the top class's probability;
    - ``apply`` (bool): top class is not 0 degrees and probability >= ``threshold``;
    - ``correction`` (Int64): degrees to turn the image counter-clockwise to make it
      upright (``predicted_angle`` when applied, else 0); ``upright(image, correction)``.

    A row with a NaN or infinite probability gets null angle and probability and is not
    applied. Probabilities outside [0, 1] (logits passed by mistake) raise ValueError.
    """
    given = np.asarray(probabilities)
    # Compare at the model's own precision: a float32 0.9 is 0.8999999762 in float64 and
    # would miss a 0.9 threshold it meets.
    precision = given.dtype if np.issubdtype(given.dtype, np.floating) else np.dtype(np.float64)
    p = given.astype(np.float64)
    if p.ndim != 2 or p.shape[1] != len(ANGLES):
        raise ValueError(f"rotation_decisions: expected probabilities of shape (n, 4), got {p.shape}")
    if not 0.0 <= float(threshold) <= 1.0:
        raise ValueError(f"rotation_decisions: threshold must lie in [0, 1], got {threshold}")
    if image_ids is not None and len(image_ids) != p.shape[0]:
        raise ValueError(f"rotation_decisions: {len(image_ids)} image ids for {p.shape[0]} rows")
    valid = np.isfinite(p).all(axis=1)
    finite = p[valid]
    if finite.size and (finite.min() < -_PROBABILITY_SLACK or finite.max() > 1 + _PROBABILITY_SLACK):
        raise ValueError(
            "rotation_decisions: values outside [0, 1]; pass softmax probabilities, not logits "
            f"(min {finite.min():.3g}, max {finite.max():.3g})"
        )
    safe = np.where(valid[:, None], p, 0.0)
    top = safe.argmax(axis=1)  # argmax takes the first maximum: ties go to the smaller angle
    angle = np.asarray(ANGLES, dtype=np.int64)[top]
    probability = safe[np.arange(len(top)), top]
    confident = probability.astype(precision) >= np.asarray(threshold, dtype=precision)
    apply = valid & (angle != 0) & confident
    frame = pl.DataFrame(
        {
            "predicted_angle": pl.Series(angle, dtype=pl.Int64),
            "probability": pl.Series(probability, dtype=pl.Float64),
            "apply": pl.Series(apply, dtype=pl.Boolean),
            "correction": pl.Series(np.where(apply, angle, 0), dtype=pl.Int64),
        }
    )
    invalid = pl.Series(~valid)
    frame = frame.with_columns(
        pl.when(invalid).then(None).otherwise(pl.col("predicted_angle")).alias("predicted_angle"),
        pl.when(invalid).then(None).otherwise(pl.col("probability")).alias("probability"),
    )
    if image_ids is not None:
        frame = frame.insert_column(0, pl.Series("image_id", list(image_ids), dtype=pl.String))
    return frame


def upright(image: Image.Image, angle: int) -> Image.Image:
    """Undo a clockwise turn of ``angle`` degrees (0/90/180/270, any multiple of 90 accepted).

    Turns the image ``angle`` degrees counter-clockwise, losslessly (a transpose, no
    resampling). ``angle`` 0 returns the image itself.
    """
    if int(angle) != angle or int(angle) % 90:
        raise ValueError(f"upright: angle must be a multiple of 90 degrees, got {angle}")
    turn = int(angle) % 360
    if turn == 0:
        return image
    return image.transpose(_UNDO[turn])


__all__ = ["ANGLES", "rotation_decisions", "upright"]
