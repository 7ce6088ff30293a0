"""How an image becomes a model input: resize / crop on the CPU, normalise on the device.

A :class:`Preprocessing` is part of a vector's identity: it is recorded next to every
embedding, and a global step refuses vectors made with another one.
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
        return self.resized_size(width, height)

    def apply(self, image: Image.Image) -> Image.Image:
        """Resize (and crop) an RGB image on the CPU."""
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
        return record

    def summary(self) -> str:
        crop = f" crop {self.size}" if self.center_crop else ""
        return f"{self.resize} {self.size}{crop}, {self.interpolation}, mean {self.mean}, std {self.std}"
