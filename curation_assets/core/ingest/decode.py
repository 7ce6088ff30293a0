"""The decode pipeline: kept images -> uint8 tensors in model-ready sizes, in worker processes.

Workers read the bytes themselves (plain files or tar members, by offset), decode with
JPEG draft mode close to the model's input size, apply EXIF orientation and mode
normalisation (``load_rgb``), then resize / crop (``Preprocessing.apply``). Pixels stay
uint8 until they reach the device, where they are normalised (4x less to copy).

With a preprocessing whose output size varies (SSCD's shorter side to 288), a bucketing
batch sampler groups images whose model input has the same size, using the width and
height sanitize recorded, so batches need no padding and vectors do not depend on batch
neighbours.
"""

from __future__ import annotations

import multiprocessing
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from curation_assets.core.embed.preprocess import Preprocessing
from curation_assets.core.ingest.images import ImageRef, load_rgb, read_bytes

# One decoded sample: (index into refs, CHW uint8 tensor) or (index, error message).
Sample = tuple[int, torch.Tensor | None, str | None]


class ImageDataset(Dataset):
    """Decodes ``refs[i]`` to a uint8 CHW tensor; a failure becomes an error string, not a crash."""

    def __init__(self, refs: Sequence[ImageRef], preprocessing: Preprocessing):
        self.refs = list(refs)
        self.preprocessing = preprocessing

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, index: int) -> Sample:
        ref = self.refs[index]
        try:
            data = read_bytes(ref.source_path, ref.offset, ref.size)
            image = load_rgb(data, draft_size=self.preprocessing.draft_size(ref.width, ref.height))
            return index, self.preprocessing.to_tensor(image), None
        except Exception as exc:  # a file changed or broke since sanitize: recorded, not fatal
            return index, None, f"{type(exc).__name__}: {exc}"


@dataclass
class Batch:
    """Images of one shape stacked, plus the images that failed to decode."""

    groups: list[tuple[torch.Tensor, torch.Tensor]]  # (indices, N x 3 x H x W uint8)
    errors: list[tuple[int, str]]

    def pin_memory(self) -> Batch:  # DataLoader calls this when pin_memory=True
        return Batch([(idx, x.pin_memory()) for idx, x in self.groups], self.errors)


def collate_by_shape(samples: list[Sample]) -> Batch:
    """Stack samples of equal shape together (a mismatch never mixes sizes in one tensor)."""
    by_shape: dict[tuple[int, ...], list[tuple[int, torch.Tensor]]] = defaultdict(list)
    errors: list[tuple[int, str]] = []
    for index, tensor, error in samples:
        if tensor is None:
            errors.append((index, error or "decode failed"))
        else:
            by_shape[tuple(tensor.shape)].append((index, tensor))
    groups = [
        (torch.tensor([i for i, _ in items], dtype=torch.long), torch.stack([t for _, t in items]))
        for items in by_shape.values()
    ]
    return Batch(groups, errors)


class ShapeBucketSampler(Sampler[list[int]]):
    """Batches of indices whose model input has the same size, in a stable order."""

    def __init__(self, refs: Sequence[ImageRef], preprocessing: Preprocessing, batch_size: int):
        buckets: dict[tuple[int, int], list[int]] = defaultdict(list)
        for index, ref in enumerate(refs):
            buckets[preprocessing.output_size(ref.width, ref.height)].append(index)
        self.batches = [
            members[start : start + batch_size]
            for _, members in sorted(buckets.items())
            for start in range(0, len(members), batch_size)
        ]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def make_loader(
    refs: Sequence[ImageRef],
    preprocessing: Preprocessing,
    batch_size: int,
    num_workers: int,
    pin_memory: bool,
    prefetch_factor: int = 4,
) -> DataLoader:
    """A DataLoader that decodes in ``num_workers`` processes while the model computes."""
    dataset = ImageDataset(refs, preprocessing)
    sampler = ShapeBucketSampler(refs, preprocessing, batch_size)
    workers = max(0, min(num_workers, len(sampler)))
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=workers,
        collate_fn=collate_by_shape,
        pin_memory=pin_memory,
        prefetch_factor=prefetch_factor if workers else None,
        persistent_workers=False,
        multiprocessing_context=loader_start_method() if workers else None,
    )


def loader_start_method() -> str:
    """How decode workers start: fork where the platform has it, whatever started this process.

    Without a context the loader takes the process's default start method, and a Dagster run
    worker is a *spawned* process (the code server spawns it), so its default is spawn: every
    decode worker would start an interpreter and import torch again, about 2.5 s per loader,
    twice a shard run. PyTorch's loader is built for fork (each worker resets its torch threads
    and seeds and only decodes: no logging, no CUDA), which costs milliseconds.
    """
    return "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
