"""How an image becomes a model input: resize / crop on the CPU, normalise on the device.

A :class:`Preprocessing` is part of a vector's identity: it is recorded next to every
embedding, and a global step refuses vectors made with another one.

Steps that must see the decoded image before it is resized (cropping uniform borders) live
here too, in :meth:`Preprocessing.apply` and :meth:`Preprocessing.to_tensor`, because every
decode path calls one of them on the image it decoded: no step decodes an image twice.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch.nn import functional

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


@dataclass(frozen=True)
class Preprocessing:
    """Resize rule and normalisation of one model.

    ``shorter_side``: the shorter side becomes ``size``, aspect kept (SSCD's rule), then
    an optional centre crop to ``size`` x ``size`` (CLIP's rule). ``square``: the image is
    resized to ``size`` x ``size`` (aspect not kept; lets any images share a batch).
    Pixels reach the device as uint8 and are normalised there: ``(x / 255 - mean) / std``.
    """

    resize: Literal["shorter_side", "square"]
    size: int
    center_crop: bool = False
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: Literal["bilinear", "bicubic"] = "bilinear"
    # Crop uniform bars (letterbox, pillarbox, padding, frames) off the decoded image before the
    # resize: a copy padded with bars then describes the same pixels as its original.
    crop_borders: bool = False

    def __post_init__(self) -> None:
        if self.size <= 0:
            raise ValueError(f"preprocessing size must be positive (got {self.size})")

    @property
    def fixed_shape(self) -> bool:
        """True when every image comes out the same size (any images can share a batch)."""
        return self.resize == "square" or self.center_crop

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) right after the resize step."""
        if self.resize == "square":
            return self.size, self.size
        scale = self.size / min(width, height)
        return max(1, round(width * scale)), max(1, round(height * scale))

    def output_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) of the model input made from a width x height image."""
        if self.fixed_shape:
            return self.size, self.size
        return self.resized_size(width, height)

    def draft_size(self, width: int, height: int) -> tuple[int, int]:
        """The smallest size JPEG draft decoding may go down to without losing detail."""
        # Also with crop_borders: JPEG scales are powers of two, so the decoded picture is
        # usually 1-2x this size, and what a typical letterbox leaves (10-20% bars) is still at
        # least the output size; decoding larger for the rare deep bar would slow every image.
        return self.resized_size(width, height)

    def apply(self, image: Image.Image) -> Image.Image:
        """Resize (and crop) an RGB image on the CPU."""
        if self.crop_borders:
            image = crop_uniform_borders(image)
        target = self.resized_size(*image.size)
        if image.size != target:
            image = image.resize(target, _RESAMPLE[self.interpolation], reducing_gap=3.0)
        if self.center_crop and image.size != (self.size, self.size):
            left = (image.width - self.size) // 2
            top = (image.height - self.size) // 2
            image = image.crop((left, top, left + self.size, top + self.size))
        return image

    def to_tensor(self, image: Image.Image) -> torch.Tensor:
        """The model input as a uint8 3 x H x W tensor: what the decode workers send.

        Same geometry as :meth:`apply`, but resized by torch's antialiased uint8 kernels on
        the CPU, about 5x faster than Pillow's for SSCD-sized inputs (values within 1). They
        are the kernels torchvision's resize calls; torchvision itself is not imported, as
        its import costs every run worker about 1.7 s.
        """
        if self.crop_borders:
            image = crop_uniform_borders(image)
        tensor = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).permute(2, 0, 1)
        width, height = self.resized_size(*image.size)
        if (width, height) != image.size:
            batch = functional.interpolate(
                tensor.unsqueeze(0), size=(height, width), mode=self.interpolation, antialias=True
            )
            tensor = batch[0]
        if self.center_crop:
            top = round((tensor.shape[1] - self.size) / 2.0)
            left = round((tensor.shape[2] - self.size) / 2.0)
            tensor = tensor[:, top : top + self.size, left : left + self.size]
        return tensor.contiguous()

    def describe(self) -> dict[str, Any]:
        """A JSON-able record for metadata and compatibility checks."""
        record = asdict(self)
        record["mean"], record["std"] = list(self.mean), list(self.std)
        if not self.crop_borders:
            # recorded only when set, so the records (and vector identities) of every model
            # made before the option existed stay what they were
            del record["crop_borders"]
        return record

    def summary(self) -> str:
        crop = f" crop {self.size}" if self.center_crop else ""
        borders = "borders cropped, " if self.crop_borders else ""
        return (
            f"{borders}{self.resize} {self.size}{crop}, {self.interpolation}, "
            f"mean {self.mean}, std {self.std}"
        )


# ----------------------------------------------------------------------------- borders

BORDER_MAX_SHARE = 0.35  # at most this share of a side is cropped from each end
_BORDER_TOLERANCE = 6  # per-channel distance (0-255) of a bar pixel from the bar's colour
_BORDER_FILL = 0.98  # share of a line's pixels that must be bar-coloured


def _bar_depth(lines: np.ndarray, limit: int) -> int:
    """How many leading lines (axis 0 of lines: N x L x 3 uint8) form a uniform bar."""
    if limit <= 0:
        return 0
    first = lines[0].astype(np.int16)
    # Cheap necessary test first (most images have no bar): if 98% of a line lies within T of
    # a colour, its mean lies within T + 2% x 255 of that colour, so 98% lies within
    # 2 T + 2% x 255 of the mean.
    loose = 2 * _BORDER_TOLERANCE + 0.02 * 255
    if (np.abs(first - first.mean(axis=0)).max(axis=1) <= loose).mean() < _BORDER_FILL:
        return 0
    # the bar's colour: the first line's median (every 4th pixel is plenty and 4x cheaper)
    colour = np.median(first[::4], axis=0).astype(np.int16)
    depth = 0
    chunk = 1  # most images have no bar: their first line alone settles it
    while depth < limit:
        head = lines[depth : min(depth + chunk, limit)].astype(np.int16)
        close = np.abs(head - colour).max(axis=2) <= _BORDER_TOLERANCE
        misses = np.flatnonzero(close.mean(axis=1) < _BORDER_FILL)
        if len(misses):
            return depth + int(misses[0])
        depth += len(head)
        chunk = 32  # bounded temporaries on large images
    return limit


def border_box(image: Image.Image) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the image without uniform bars along its edges.

    A bar is a run of whole rows (or columns) from an edge whose pixels are, nearly all, within
    a small distance of one colour: black or white letterboxing and pillarboxing, padding, a
    plain frame. JPEG ringing at the bar's inner edge ends the run up to a block (8 lines)
    early, which the descriptor's margin absorbs. At most :data:`BORDER_MAX_SHARE` of a side
    goes from each end, so a nearly uniform image (a plain sky, a blank page) keeps its middle.
    """
    pixels = np.asarray(image.convert("RGB") if image.mode != "RGB" else image)  # uint8; lines cast on use
    height, width = pixels.shape[:2]
    limit_y, limit_x = int(height * BORDER_MAX_SHARE), int(width * BORDER_MAX_SHARE)
    top = _bar_depth(pixels, limit_y)
    bottom = _bar_depth(pixels[::-1], limit_y)
    columns = pixels[top : height - bottom].transpose(1, 0, 2)
    left = _bar_depth(columns, limit_x)
    right = _bar_depth(columns[::-1], limit_x)
    return left, top, width - right, height - bottom


def crop_uniform_borders(image: Image.Image) -> Image.Image:
    """The image without the uniform bars along its edges (itself when it has none)."""
    box = border_box(image)
    if box == (0, 0, *image.size):
        return image
    return image.crop(box)
