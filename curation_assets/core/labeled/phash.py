"""The 64-bit DCT perceptual hash: what `perceptual_hashes` stores and leak detection compares.

Kept apart from :mod:`~curation_assets.core.labeled.leaks` (which imports faiss) so that the
decode workers of the shard pass hash an image without importing the search libraries.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import polars as pl
from PIL import Image

from curation_assets.core.ingest.images import describe_error, load_rgb, read_bytes
from curation_assets.core.pool import map_chunks

if TYPE_CHECKING:  # decode imports torch: hashing workers should not pay for it
    from curation_assets.core.ingest.images import ImageRef

HASH_BITS = 64
HASH_SIZE = 32  # side of the grey thumbnail the DCT is taken of
HASH_BLOCK = 8  # the lowest 8 x 8 frequencies give the 64 bits
DRAFT_SIZE = (HASH_SIZE * 2, HASH_SIZE * 2)  # JPEG draft decode: plenty for a 32 px thumbnail

HASHES_SCHEMA: dict[str, pl.DataType] = {
    "image_id": pl.String(),
    "phash": pl.UInt64(),
    "error": pl.String(),
}


def perceptual_hash(image: Image.Image) -> int:
    """The 64-bit DCT perceptual hash of ``image`` (an unsigned int, bit 63 first).

    Recipe (the DCT hash of Zauner's 2010 thesis, as most pHash tools compute it):

    1. grey levels (Pillow's ITU-R 601 luma), resized to 32 x 32 with Lanczos (antialiased,
       so the thumbnail keeps the picture's low frequencies and drops noise);
    2. the 2-D type-II DCT (orthonormal) of the thumbnail;
    3. its 8 x 8 lowest frequencies, DC included, row by row;
    4. bit = coefficient above the median of those 64.

    The median makes the hash blind to brightness and contrast changes and sets half the
    bits (so distances between hashes are usually even).
    """
    from scipy.fft import dctn  # imported here: the asset module and runner load this module

    grey = image.convert("L").resize((HASH_SIZE, HASH_SIZE), Image.Resampling.LANCZOS)
    coefficients = dctn(np.asarray(grey, dtype=np.float64), type=2, norm="ortho")
    block = coefficients[:HASH_BLOCK, :HASH_BLOCK].reshape(-1)
    bits = block > np.median(block)
    return int(np.packbits(bits).view(">u8")[0])


def hamming_distance(a: int, b: int) -> int:
    """Bits that differ between two 64-bit hashes."""
    return (int(a) ^ int(b)).bit_count()


def _hash_one(ref: ImageRef) -> tuple[str, int | None, str | None]:
    try:
        data = read_bytes(ref.source_path, ref.offset, ref.size)
        image = load_rgb(data, draft_size=DRAFT_SIZE)
    except Exception as exc:  # one unreadable image is a recorded error, never a failed batch
        return ref.image_id, None, describe_error(exc)
    return hash_row(ref.image_id, image)


def hash_row(image_id: str, image: Image.Image) -> tuple[str, int | None, str | None]:
    """(image_id, phash, error) of a decoded image; a failure is recorded, never raised."""
    try:
        return image_id, perceptual_hash(image), None
    except Exception as exc:
        return image_id, None, describe_error(exc)


def _hash_batch(batch: Sequence[ImageRef]) -> list[tuple[str, int | None, str | None]]:
    """Worker entry point (module level so that forkserver/spawn workers can import it)."""
    return [_hash_one(ref) for ref in batch]


def _failed_hash(ref: ImageRef, exc: BaseException) -> tuple[str, int | None, str | None]:
    return ref.image_id, None, describe_error(exc)


def _died_hash(ref: ImageRef, exc: BaseException) -> tuple[str, int | None, str | None]:
    return ref.image_id, None, "the worker process died while hashing this image"


def hash_images(
    refs: Sequence[ImageRef],
    workers: int = 0,
    progress: Callable[[int, int], None] | None = None,
    batch_size: int = 256,
) -> pl.DataFrame:
    """image_id, phash (UInt64, null on failure), error: the perceptual hash of every ref.

    Decoding uses JPEG draft mode (a 32 px thumbnail needs no full-size decode), the same
    read path as every other stage (:func:`load_rgb`: EXIF orientation applied, RGB).
    ``workers`` > 1 hashes in that many processes started for this call
    (:func:`~curation_assets.core.pool.map_chunks`); the output is the same and in the order
    of ``refs``. An image that kills its worker process gets a null hash and an error
    saying so. ``progress(done, total)`` is called first with 0, then as batches finish.
    """

    def report(done: int, total: int, images_per_second: float) -> None:
        if progress:  # the runner also reports a rate; this callback takes (done, total)
            progress(done, total)

    report(0, len(refs), 0.0)
    rows = map_chunks(
        refs,
        _hash_batch,
        workers=max(1, workers),
        chunk_size=batch_size,
        failed_row=_failed_hash,
        died_row=_died_hash,
        progress=report,
    )
    return hashes_frame(rows)


def hashes_frame(rows: Sequence[tuple[str, int | None, str | None]]) -> pl.DataFrame:
    """Rows of :func:`hash_row` as the stored perceptual-hash table."""
    return pl.DataFrame(rows, schema=HASHES_SCHEMA, orient="row")
