"""The decode + compute pipeline: OOM back-off, decode failures, shape buckets, vector storage."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from curation_assets.core.embed.embed import ComputeSettings, embed_images, resolve_device
from curation_assets.core.embed.preprocess import Preprocessing
from curation_assets.core.embed.vectors import VectorMismatchError, assert_compatible
from curation_assets.core.ingest.decode import ImageRef
from curation_assets.resources.store import ProjectStore
from curation_assets_tests.conftest import write_photo


class MeanColour(torch.nn.Module):
    """A tiny deterministic 'model': per-channel means and stds (6-d)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1)


class FailsAbove(MeanColour):
    """Raises CUDA's out-of-memory error for batches larger than ``limit`` (a simulated small GPU)."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit = limit
        self.calls: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(len(x))
        if len(x) > self.limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return super().forward(x)


def _settings(batch_size: int = 16, workers: int = 0, min_batch: int = 1) -> ComputeSettings:
    return ComputeSettings(
        device=torch.device("cpu"),
        autocast=None,
        batch_size=batch_size,
        min_batch_size=min_batch,
        num_workers=workers,
        channels_last=False,
        compile=False,
    )


def _refs(tmp_path: Path, sizes: list[tuple[int, int]]) -> list[ImageRef]:
    refs = []
    for i, (w, h) in enumerate(sizes):
        path = write_photo(tmp_path / f"{i:03d}.jpg", i, size=(w, h))
        refs.append(ImageRef(f"s/{i:03d}.jpg", str(path), None, None, w, h))
    return refs


SQUARE = Preprocessing(resize="square", size=64)


def test_oom_halves_the_batch_and_writes_every_vector_once(tmp_path: Path):
    refs = _refs(tmp_path, [(120, 90)] * 37)
    reference = embed_images(MeanColour(), SQUARE, 6, refs, _settings(batch_size=4))
    flaky = FailsAbove(limit=4)
    result = embed_images(flaky, SQUARE, 6, refs, _settings(batch_size=16))
    assert result.backoffs == [8, 4] and result.final_batch_size == 4
    assert result.image_ids == [r.image_id for r in refs]  # each image once, in order
    np.testing.assert_allclose(
        result.vectors.astype(np.float32), reference.vectors.astype(np.float32), atol=1e-3
    )
    assert max(flaky.calls[-3:]) <= 4


def test_oom_at_the_floor_fails_loudly(tmp_path: Path):
    refs = _refs(tmp_path, [(100, 100)] * 4)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        embed_images(FailsAbove(limit=0), SQUARE, 6, refs, _settings(batch_size=4, min_batch=2))


def test_a_broken_file_is_an_error_row_not_a_crash(tmp_path: Path):
    refs = _refs(tmp_path, [(100, 80)] * 3)
    Path(refs[1].source_path).write_bytes(b"\xff\xd8\xff gone bad")
    refs.append(ImageRef("s/missing.jpg", str(tmp_path / "missing.jpg"), None, None, 100, 80))
    result = embed_images(MeanColour(), SQUARE, 6, refs, _settings(batch_size=2))
    assert result.image_ids == ["s/000.jpg", "s/002.jpg"]
    assert [image_id for image_id, _ in result.errors] == ["s/001.jpg", "s/missing.jpg"]
    assert "FileNotFoundError" in dict(result.errors)["s/missing.jpg"]


def test_shorter_side_batches_by_shape_and_matches_batch_one(tmp_path: Path):
    sizes = [(160, 120), (120, 160), (200, 100), (160, 120), (90, 90), (120, 160)] * 3
    refs = _refs(tmp_path, sizes)
    shorter = Preprocessing(resize="shorter_side", size=48)
    one = embed_images(MeanColour(), shorter, 6, refs, _settings(batch_size=1))
    many = embed_images(MeanColour(), shorter, 6, refs, _settings(batch_size=16, workers=2))
    assert one.image_ids == many.image_ids == [r.image_id for r in refs]
    np.testing.assert_allclose(one.vectors.astype(np.float32), many.vectors.astype(np.float32), atol=1e-3)
    assert not many.errors


def test_preprocessing_sizes():
    sscd = Preprocessing(resize="shorter_side", size=288)
    assert sscd.output_size(640, 480) == (384, 288)
    clip = Preprocessing(resize="shorter_side", size=224, center_crop=True)
    assert clip.output_size(640, 480) == (224, 224) and clip.fixed_shape
    assert Preprocessing(resize="square", size=320).output_size(50, 900) == (320, 320)


def test_device_resolution_is_clear():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in ("cpu", "cuda")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no usable CUDA device"):
            resolve_device("cuda:0")
    with pytest.raises(RuntimeError, match="not supported"):
        resolve_device("tpu")


def test_vectors_are_written_as_one_unit(tmp_path: Path):
    store = ProjectStore(tmp_path, "p")
    ids = pl.DataFrame({"image_id": ["a", "b"], "row": [0, 1]})
    store.write_vectors("emb", "s", ids, np.ones((2, 4), np.float16), {"dim": 4})
    store.write_vectors("emb", "s", ids, np.full((2, 4), 2, np.float16), {"dim": 4})
    arrays = sorted(p.name for p in store.asset_dir("emb").glob("*.npy"))
    assert len(arrays) == 1  # the older array is gone
    table, vectors, meta = store.read_vectors("emb", "s")
    assert table["image_id"].to_list() == ["a", "b"] and float(vectors[0, 0]) == 2.0 and meta["dim"] == 4
    assert store.shards_written("emb") == ["s"]


def test_vectors_from_another_model_are_refused():
    made = {"kind": "sscd_torchscript", "dim": 512, "preprocessing": {"resize": "square", "size": 320}}
    assert_compatible("s", made, dict(made))
    with pytest.raises(VectorMismatchError, match="preprocessing"):
        assert_compatible("s", made, {**made, "preprocessing": {"resize": "shorter_side", "size": 288}})
