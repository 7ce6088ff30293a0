"""Running a model over a shard's images: device placement, autocast, OOM back-off.

Decode (DataLoader workers) overlaps with compute: the loader prefetches while the
device runs the model. Pixels arrive as uint8 and are normalised on the device. A CUDA
out-of-memory error halves the batch and retries it, down to ``min_batch_size``, so one
oversized batch never fails a shard.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from curation_assets.core.embed.preprocess import Preprocessing
from curation_assets.core.ingest.decode import ImageRef, make_loader

log = logging.getLogger(__name__)

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


@dataclass(frozen=True)
class ComputeSettings:
    """Resolved compute choices (the Dagster ComputeResource builds one)."""

    device: torch.device
    autocast: torch.dtype | None  # None: full float32
    batch_size: int
    min_batch_size: int
    num_workers: int
    channels_last: bool
    compile: bool
    prefetch_factor: int = 4
    threads: int = 0  # CPU intra-op threads for runtimes that take them (onnxruntime); 0 = default

    @property
    def pin_memory(self) -> bool:
        return self.device.type == "cuda"

    def describe(self) -> dict[str, object]:
        return {
            "device": str(self.device),
            "autocast": str(self.autocast).removeprefix("torch.") if self.autocast else "fp32",
            "batch_size": self.batch_size,
            "num_workers": self.num_workers,
            "channels_last": self.channels_last,
            "compile": self.compile,
            "threads": self.threads,
        }


def resolve_device(spec: str) -> torch.device:
    """``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda`` or ``cuda:N``; clear error otherwise."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"device {spec!r} is not supported; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {spec!r} asked for, but this machine has no usable CUDA device")
        if device.index is not None and device.index >= torch.cuda.device_count():
            count = torch.cuda.device_count()
            raise RuntimeError(f"device {spec!r} asked for, but only {count} GPU(s) exist")
    return device


def is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


@dataclass
class EmbedResult:
    vectors: np.ndarray  # float16, one row per embedded image, in ``image_ids`` order
    image_ids: list[str]
    errors: list[tuple[str, str]]  # (image_id, why it has no vector)
    seconds: float
    final_batch_size: int
    backoffs: list[int] = field(default_factory=list)  # batch sizes fallen back to

    @property
    def images_per_second(self) -> float:
        return (len(self.image_ids) + len(self.errors)) / max(self.seconds, 1e-9)


class BatchRunner:
    """Runs ``module`` on normalised batches with autocast, halving the batch on OOM."""

    def __init__(self, module: torch.nn.Module, preprocessing: Preprocessing, settings: ComputeSettings):
        self.settings = settings
        self.batch_size = settings.batch_size
        self.backoffs: list[int] = []
        device = settings.device
        self.mean = torch.tensor(preprocessing.mean, device=device).view(1, 3, 1, 1) * 255.0
        self.std = torch.tensor(preprocessing.std, device=device).view(1, 3, 1, 1) * 255.0
        module = module.to(device).eval()
        # A module backed by another runtime (an ONNX Runtime session) fixes its device and thread
        # pool when its session is made, so it is told this run's settings; torch.compile cannot
        # trace into such a runtime, so it is left uncompiled.
        configure = getattr(module, "configure_runtime", None)
        if callable(configure):
            configure(device, settings.threads)
        if settings.channels_last and device.type == "cuda":
            module = module.to(memory_format=torch.channels_last)
        self.module = torch.compile(module) if settings.compile and not callable(configure) else module

    def _autocast(self) -> contextlib.AbstractContextManager:
        dtype = self.settings.autocast
        if dtype is None or self.settings.device.type != "cuda":
            return contextlib.nullcontext()  # CPU runs in float32: CPU autocast is slower on most CPUs
        return torch.autocast(device_type="cuda", dtype=dtype)

    def _forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.to(self.settings.device, non_blocking=True).float()
        x = (x - self.mean) / self.std
        if self.settings.channels_last and x.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), self._autocast():
            out = self.module(x)
        return out.float().reshape(len(pixels), -1)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        """Outputs for a uint8 batch, split into chunks of the current batch size."""
        while True:
            try:
                return torch.cat(
                    [self._forward(chunk) for chunk in torch.split(pixels, self.batch_size)]
                ).cpu()
            except (torch.cuda.OutOfMemoryError, RuntimeError) as exc:
                if not is_out_of_memory(exc) or self.batch_size <= self.settings.min_batch_size:
                    raise
                self.batch_size = max(self.settings.min_batch_size, self.batch_size // 2)
                self.backoffs.append(self.batch_size)
                log.warning("out of memory: batch size halved to %d, retrying the batch", self.batch_size)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()


def embed_images(
    module: torch.nn.Module,
    preprocessing: Preprocessing,
    dim: int,
    refs: Sequence[ImageRef],
    settings: ComputeSettings,
    progress: Callable[[int, int, float], None] | None = None,
    dtype: np.dtype | type = np.float16,
) -> EmbedResult:
    """Vectors for ``refs`` (float16 unless ``dtype`` says otherwise: probabilities compared with a
    threshold keep float32), with every image that failed to decode listed in errors."""
    start = time.perf_counter()
    runner = BatchRunner(module, preprocessing, settings)
    out = np.zeros((len(refs), dim), dtype=dtype)
    done = np.zeros(len(refs), dtype=bool)
    errors: dict[int, str] = {}
    loader = make_loader(
        refs,
        preprocessing,
        settings.batch_size,
        settings.num_workers,
        settings.pin_memory,
        settings.prefetch_factor,
    )
    finished = 0
    for batch in loader:
        for index, error in batch.errors:
            errors[index] = error
        for indices, pixels in batch.groups:
            vectors = runner(pixels)
            if vectors.shape[1] != dim:
                raise ValueError(f"the model returned {vectors.shape[1]}-d vectors, {dim} expected")
            out[indices.numpy()] = vectors.numpy().astype(dtype)
            done[indices.numpy()] = True
        finished += sum(len(i) for i, _ in batch.groups) + len(batch.errors)
        if progress:
            progress(finished, len(refs), finished / max(time.perf_counter() - start, 1e-9))
    kept = np.flatnonzero(done)
    return EmbedResult(
        vectors=out[kept],
        image_ids=[refs[i].image_id for i in kept],
        errors=[(refs[i].image_id, errors.get(i, "not processed")) for i in np.flatnonzero(~done)],
        seconds=time.perf_counter() - start,
        final_batch_size=runner.batch_size,
        backoffs=runner.backoffs,
    )
