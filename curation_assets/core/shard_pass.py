"""One pass per shard: every image read once, decoded once, and fed to every per-shard stage.

Decoding is the floor of every image pass, so the per-shard stages share one. A worker
process reads a file's bytes, runs the sanitize checks with their one full decode (the
decode that catches truncation), and from that decoded picture computes what the plan
asks for: the quality scores and the perceptual hash (both on one small working copy),
and the input pixels of every model, each resized from the picture by its own
preprocessing. The main process batches those pixels per model and shape and runs the
models while the workers decode ahead.

Why the call-scoped pool runner (:func:`~curation_assets.core.pool.map_chunks`) and not a
DataLoader: a decoder that crashes its process must cost one image (a recorded reason), not
the shard; the pool runner finds such an image and goes on, which a DataLoader cannot. Its
in-flight bound is the queue bound, so workers run at most ``workers * in_flight`` chunks
ahead of the models. Batching by shape, autocast, pinned memory and the out-of-memory
back-off are those of :class:`~curation_assets.core.embed.embed.BatchRunner`.

When sanitize is not part of a pass (its table is current and only, say, one model
changed), the kept images are decoded the same way, in full: an output is the same whether
it was made with the others or alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

# Imported here, not lazily: the fork server preloads this module, so its workers start with
# torch (their resize kernels) already imported instead of importing it once per pool.
import torch
from PIL import Image

from curation_assets.core.embed.preprocess import Preprocessing
from curation_assets.core.filters.quality import working_image, working_size
from curation_assets.core.ingest.images import describe_error, load_rgb, read_bytes
from curation_assets.core.ingest.sanitize import (
    _Rules,
    inspect_image,
    rejected_row,
    unreadable_row,
)
from curation_assets.core.ingest.sources import ByteFeed, needs_feed
from curation_assets.core.outputs.reasons import Reason, Status
from curation_assets.core.pool import map_chunks

if TYPE_CHECKING:
    from curation_assets.core.embed.embed import ComputeSettings

Progress = Callable[[int, int, float], None]
# A per-image stage: ``function(image_id, working copy) -> row``, module level (workers import it),
# never raising for one image (a failure goes into its row). The working copy is the upright RGB
# picture reduced by area averaging to 256 px on its longer side (quality's working image: the
# quality scores and the perceptual hash are computed on it).
PerImage = Callable[[str, Image.Image], Any]


@dataclass(frozen=True, slots=True)
class PassItem:
    """One file of the shard: where its bytes are."""

    image_id: str
    source_path: str
    offset: int | None = None
    size: int | None = None
    name: str = ""  # file or member name, for the extension the sanitize checks read
    data: bytes | None = None  # the bytes, when the main process read them (core.ingest.sources)


@dataclass(frozen=True)
class PassPlan:
    """What the workers compute per image (it pickles: plain rules, preprocessing dataclasses).

    ``inputs`` are the distinct preprocessings of the models of the pass; two models with one
    preprocessing share their pixels.
    """

    sanitize: _Rules | None
    per_image: tuple[tuple[str, PerImage], ...] = ()  # (stage name, function) on the working copy
    inputs: tuple[Preprocessing, ...] = ()


@dataclass(slots=True)
class ItemOutput:
    """What a worker sends back for one file."""

    sanitize: dict[str, Any] | None = None  # the sanitize row (None when sanitize is not in the pass)
    rows: dict[str, Any] = field(default_factory=dict)  # per-image stage name -> its row, kept images
    pixels: tuple[np.ndarray, ...] = ()  # per plan input: 3 x H x W uint8, for kept images
    error: str | None = None  # why a kept image has no pixels (read or decode failed)


# ----------------------------------------------------------------------------- the workers

_THREADS_SET = False


def _single_threaded_torch() -> None:
    """Worker processes resize with torch: one thread each, the pool is the parallelism."""
    global _THREADS_SET
    if not _THREADS_SET:
        torch.set_num_threads(1)
        _THREADS_SET = True


def _derived(image_id: str, image: Image.Image, plan: PassPlan) -> ItemOutput:
    """Scores, hash and model inputs of one decoded upright RGB picture."""
    out = ItemOutput()
    pyramid = Pyramid(image)
    if plan.per_image:
        # One small copy serves every per-image stage: resizing a megapixel picture once per
        # stage would cost about as much as its decode.
        work = working_copy(pyramid)
        for name, function in plan.per_image:
            out.rows[name] = function(image_id, work)
    if plan.inputs:
        _single_threaded_torch()
        try:
            out.pixels = tuple(model_input(pyramid, prep).numpy() for prep in plan.inputs)
        except Exception as exc:  # recorded for this image, never a failed chunk
            out.error = f"preprocessing: {describe_error(exc)}"
    return out


class Pyramid:
    """A decoded picture and its power-of-two box reductions, each made once, from the finer one.

    Every consumer starts from the smallest reduction still at least the size it needs (what
    JPEG draft decoding gave each stage when each decoded on its own): the working copy and
    each model's antialiased resize then read a few times their output, not a megapixel
    picture each. Box reductions by 2 are Pillow's cheapest resampling.
    """

    def __init__(self, image: Image.Image):
        self.levels = {1: image}

    def at_least(self, width: int, height: int) -> Image.Image:
        full = self.levels[1]
        factor = min(full.width // max(width, 1), full.height // max(height, 1))
        factor = 1 << (max(factor, 1).bit_length() - 1)
        return self._level(factor)

    def _level(self, factor: int) -> Image.Image:
        if factor not in self.levels:
            # Levels 2 and 4 are reduced from the full picture (one pass each: the working copy
            # needs level 4 of a megapixel photo), coarser ones halve the level above. Fixed
            # rules, so a level is the same whatever was asked first and an output made alone
            # equals one made with the others.
            source = 1 if factor <= 4 else factor // 2
            self.levels[factor] = self._level(source).reduce(factor // source)
        return self.levels[factor]


def working_copy(image: Image.Image | Pyramid) -> Image.Image:
    """The 256 px working copy the per-image stages read, as the pass makes it."""
    pyramid = image if isinstance(image, Pyramid) else Pyramid(image)
    full = pyramid.levels[1]
    return working_image(pyramid.at_least(*working_size(full.width, full.height)))


def model_input(image: Image.Image | Pyramid, prep: Preprocessing) -> torch.Tensor:
    """A model's uint8 input (3 x H x W) made from a decoded picture, as the pass makes it."""
    pyramid = image if isinstance(image, Pyramid) else Pyramid(image)
    return prep.to_tensor(pyramid.at_least(*prep.draft_size(*pyramid.levels[1].size)))


def _process(item: PassItem, plan: PassPlan) -> ItemOutput:
    try:
        data = item.data if item.data is not None else read_bytes(item.source_path, item.offset, item.size)
    except Exception as exc:  # OSError mostly; a bad offset gives ValueError
        if plan.sanitize is not None:
            return ItemOutput(sanitize=unreadable_row(exc, item.size or 0))
        return ItemOutput(error=describe_error(exc))
    if plan.sanitize is None:
        try:
            image = load_rgb(data)
        except Exception as exc:  # the file changed or broke since sanitize: recorded, not fatal
            return ItemOutput(error=describe_error(exc))
        row = None
    else:
        row, image = inspect_image(data, item.name or item.source_path, plan.sanitize)
        if image is None:
            return ItemOutput(sanitize=row)
    try:
        out = _derived(item.image_id, image, plan)
    finally:
        image.close()
    out.sanitize = row
    return out


def process_chunk(items: tuple[PassItem, ...], plan: PassPlan) -> list[ItemOutput]:
    """Worker entry point (module level so that forkserver workers import it by name)."""
    return [_process(item, plan) for item in items]


def _failed(item: PassItem, what: str, exc: BaseException, plan: PassPlan) -> ItemOutput:
    detail = f"{what} ({describe_error(exc)})"
    if plan.sanitize is not None:
        return ItemOutput(sanitize=rejected_row(Reason.DECODE_ERROR, detail, item.size or 0))
    return ItemOutput(error=detail)


# ----------------------------------------------------------------------------- the models


@dataclass
class PassModel:
    """A model of the pass: its module, which plan input feeds it, and its output rows."""

    name: str
    module: Any  # torch.nn.Module
    preprocessing: Preprocessing
    dim: int
    dtype: Any = np.float16  # rotation probabilities keep float32 for exact threshold comparisons


@dataclass
class ModelOutput:
    vectors: np.ndarray  # rows in item order; only rows with done=True are meaningful
    done: np.ndarray  # bool per item
    seconds: float = 0.0  # time in the model itself
    final_batch_size: int = 0
    backoffs: list[int] = field(default_factory=list)


@dataclass
class PassOutput:
    """Every stage's results for the items of a pass, in item order."""

    sanitize: list[dict[str, Any] | None]
    rows: dict[str, list[Any]]  # per-image stage name -> its row per item (None: not kept)
    errors: list[str | None]  # per item: why a kept image has no pixels
    models: dict[str, ModelOutput]
    seconds: float

    @property
    def images_per_second(self) -> float:
        return len(self.errors) / max(self.seconds, 1e-9)

    def select(self, positions: Sequence[int]) -> PassOutput:
        """The results of the items at ``positions``, in that order (sanitize rows left out)."""
        at = np.asarray(positions, dtype=np.int64)
        return PassOutput(
            sanitize=[],
            rows={name: [rows[i] for i in at] for name, rows in self.rows.items()},
            errors=[self.errors[i] for i in at],
            models={
                name: ModelOutput(
                    out.vectors[at], out.done[at], out.seconds, out.final_batch_size, out.backoffs
                )
                for name, out in self.models.items()
            },
            seconds=self.seconds,
        )


class _Batcher:
    """Gathers each model's pixels by shape and runs full batches while the workers decode.

    Images of one shape wait for their batch; when more than ``max_waiting`` images wait in
    all (many aspect ratios with a shorter-side rule), the fullest group runs early, so the
    memory held stays bounded. Vectors do not depend on batch neighbours.
    """

    def __init__(self, models: Sequence[PassModel], inputs: tuple[Preprocessing, ...], total: int, settings):
        from curation_assets.core.embed.embed import BatchRunner

        self.settings = settings
        self.models = list(models)
        self.input_of = [inputs.index(model.preprocessing) for model in self.models]
        self.runners = [BatchRunner(m.module, m.preprocessing, settings) for m in self.models]
        self.outputs = {
            m.name: ModelOutput(np.zeros((total, m.dim), dtype=m.dtype), np.zeros(total, dtype=bool))
            for m in self.models
        }
        self.waiting: dict[tuple[int, tuple[int, ...]], list[tuple[int, np.ndarray]]] = defaultdict(list)
        self.count = 0
        self.max_waiting = max(4 * settings.batch_size * max(1, len(self.models)), 256)

    def add(self, index: int, pixels: tuple[np.ndarray, ...]) -> None:
        for m, source in enumerate(self.input_of):
            group = self.waiting[(m, pixels[source].shape)]
            group.append((index, pixels[source]))
            self.count += 1
            if len(group) >= self.settings.batch_size:
                self._run((m, pixels[source].shape))
        while self.count > self.max_waiting:
            self._run(max(self.waiting, key=lambda key: len(self.waiting[key])))

    def finish(self) -> dict[str, ModelOutput]:
        for key in list(self.waiting):
            self._run(key)
        for runner, model in zip(self.runners, self.models, strict=True):
            self.outputs[model.name].final_batch_size = runner.batch_size
            self.outputs[model.name].backoffs = runner.backoffs
        return self.outputs

    def _run(self, key: tuple[int, tuple[int, ...]]) -> None:
        group = self.waiting.pop(key, [])
        if not group:
            return
        self.count -= len(group)
        m = key[0]
        model = self.models[m]
        indices = np.fromiter((i for i, _ in group), dtype=np.int64, count=len(group))
        pixels = torch.from_numpy(np.stack([p for _, p in group]))
        if self.settings.pin_memory:  # a pinned batch copies to the GPU asynchronously
            pixels = pixels.pin_memory()
        start = time.perf_counter()
        vectors = self.runners[m](pixels)
        output = self.outputs[model.name]
        output.seconds += time.perf_counter() - start
        if vectors.shape[1] != model.dim:
            raise ValueError(
                f"model {model.name!r} returned {vectors.shape[1]}-d vectors, {model.dim} expected"
            )
        output.vectors[indices] = vectors.numpy().astype(model.dtype)
        output.done[indices] = True


def run_pass(
    items: Sequence[PassItem],
    plan: PassPlan,
    models: Sequence[PassModel] = (),
    settings: ComputeSettings | None = None,
    workers: int = 1,
    chunk_size: int = 16,
    progress: Progress | None = None,
) -> PassOutput:
    """Run ``plan`` over ``items`` in ``workers`` processes and ``models`` on the results.

    Bytes on object storage or in parquet shards are read here, chunk by chunk as the workers
    take them (core.ingest.sources.ByteFeed): a tar on a bucket is streamed once, not fetched
    member by member.

    Every model's preprocessing must be one of ``plan.inputs``. Nothing an image does fails
    the pass: an unreadable or undecodable file gets its sanitize row (or, without sanitize,
    an error), and a file that kills its worker is found and recorded as the pool runner
    does. The worker processes live for this call only.
    """
    start = time.perf_counter()
    if models and settings is None:
        raise ValueError("a pass with models needs compute settings")
    pooled = workers if len(items) > chunk_size else 0  # one chunk runs in this process
    feed = ByteFeed(items) if any(needs_feed(item.source_path) for item in items) else None
    try:
        with _model_threads(settings, pooled) as model_settings:
            return _run(feed or items, plan, models, model_settings, workers, chunk_size, progress, start)
    finally:
        if feed is not None:
            feed.close()


@contextlib.contextmanager
def _model_threads(settings: ComputeSettings | None, workers: int) -> Iterator[ComputeSettings | None]:
    """CPU models run in this process with the cores the decode workers leave free (at least one).

    Torch's (and ONNX Runtime's) thread pools default to one thread per core and spin while
    they wait: next to ``workers`` busy decode processes that oversubscribes the cores, and
    measured on 2 cores the models ran 5x slower. Restored afterwards.
    """
    if settings is None or settings.device.type != "cpu":
        yield settings
        return
    from curation_assets.core.pool import usable_cores

    threads = settings.threads or max(1, usable_cores() - workers)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield dataclasses.replace(settings, threads=threads)
    finally:
        torch.set_num_threads(before)


def _run(
    items: Sequence[PassItem],
    plan: PassPlan,
    models: Sequence[PassModel],
    settings: ComputeSettings | None,
    workers: int,
    chunk_size: int,
    progress: Progress | None,
    start: float,
) -> PassOutput:
    total = len(items)
    sanitize: list[dict[str, Any] | None] = [None] * total
    rows: dict[str, list[Any]] = {name: [None] * total for name, _ in plan.per_image}
    errors: list[str | None] = [None] * total
    batcher = _Batcher(models, plan.inputs, total, settings) if models else None

    def take(first: int, outputs: list[ItemOutput]) -> None:
        for offset, out in enumerate(outputs):
            index = first + offset
            sanitize[index] = out.sanitize
            for name, row in out.rows.items():
                rows[name][index] = row
            kept = out.sanitize is None or out.sanitize["status"] != str(Status.REJECTED)
            if kept and out.error is not None:
                errors[index] = out.error
            elif kept and batcher is not None and out.pixels:
                batcher.add(index, out.pixels)

    map_chunks(
        items,
        process_chunk,
        (plan,),
        workers=workers,
        chunk_size=chunk_size,
        failed_row=lambda item, exc: _failed(item, "the worker could not return this image", exc, plan),
        died_row=lambda item, exc: _failed(item, "the worker process died reading this image", exc, plan),
        progress=progress,
        sink=take,
    )
    outputs = batcher.finish() if batcher is not None else {}
    return PassOutput(sanitize, rows, errors, outputs, time.perf_counter() - start)
