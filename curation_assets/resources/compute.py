"""The compute device resource: where and how models run (embeddings now, k-means later)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Literal

import dagster as dg
from pydantic import Field

# torch (and core.embed, which imports it) is imported in `settings`: every asset module
# names this resource, and loading the Definitions must stay cheap (issue 12).
if TYPE_CHECKING:
    from curation_assets.core.embed.embed import ComputeSettings


class ComputeResource(dg.ConfigurableResource):
    """Device, precision and batching for GPU-capable steps (which run in the pool "gpu").

    Defaults suit both a laptop and a GPU node: ``auto`` picks CUDA when present; autocast
    applies on CUDA only (CPU runs float32); decode workers default to the cores less one.
    """

    device: str = Field(default="auto", description="auto | cpu | cuda | cuda:N")
    dtype: Literal["bf16", "fp16", "fp32"] = Field(default="bf16", description="autocast dtype on CUDA")
    batch_size: int = Field(default=128, ge=1, description="images per model call (halved on CUDA OOM)")
    min_batch_size: int = Field(default=1, ge=1, description="the floor of the OOM back-off")
    num_workers: int = Field(default=-1, description="decode processes; -1 = CPU cores less one, 0 = inline")
    channels_last: bool = Field(default=True, description="channels-last memory format on CUDA")
    compile: bool = Field(default=False, description="torch.compile the model (pays off on long runs)")
    tf32: bool = Field(default=True, description="allow TF32 matmuls and convolutions on Ampere+ GPUs")
    threads: int = Field(
        default=0, ge=0, description="CPU threads of torch and onnxruntime (intra-op); 0 = their defaults"
    )

    def settings(self) -> ComputeSettings:
        import torch

        from curation_assets.core.embed.embed import AUTOCAST_DTYPES, ComputeSettings, resolve_device

        device = resolve_device(self.device)
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = self.tf32
            torch.backends.cudnn.allow_tf32 = self.tf32
            torch.backends.cudnn.benchmark = True
        if self.threads:
            torch.set_num_threads(self.threads)
        workers = self.num_workers if self.num_workers >= 0 else max(0, (os.cpu_count() or 1) - 1)
        return ComputeSettings(
            device=device,
            autocast=AUTOCAST_DTYPES[self.dtype],
            batch_size=self.batch_size,
            min_batch_size=min(self.min_batch_size, self.batch_size),
            num_workers=workers,
            channels_last=self.channels_last,
            compile=self.compile,
            threads=self.threads,
        )
