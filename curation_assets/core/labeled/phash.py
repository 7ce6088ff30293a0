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

from curation_assets.core.ingest.images import describe_error

if TYPE_CHECKING:  # decode imports torch: hashing workers should not pay for it
    from curation_assets.core.ingest.images import ImageRef

HASH_BITS = 64
HASH_SIZE = 32  # side of the grey thumbnail the DCT is taken of
HASH_BLOCK = 8  # the lowest 8 x 8 frequencies give the 64 bits

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


def hash_row(image_id: str, image: Image.Image) -> tuple[str, int | None, str | None]:
    """(image_id, phash, error) of a decoded image; a failure is recorded, never raised."""
    try:
        return image_id, perceptual_hash(image), None
    except Exception as exc:
        return image_id, None, describe_error(exc)


def hash_images(
    refs: Sequence[ImageRef],
    workers: int = 0,
    progress: Callable[[int, int], None] | None = None,
    batch_size: int = 256,
) -> pl.DataFrame:
    """image_id, phash (UInt64, null on failure), error: the perceptual hash of every ref.

    The hashes the ``perceptual_hashes`` asset stores, computed the same way: each image read
    and decoded by the shard pass (:mod:`~curation_assets.core.shard_pass`, EXIF orientation
    applied, RGB) and hashed from its 256 px working copy, in ``workers`` processes started
    for this call (0 or 1: in this process); the rows are in the order of ``refs``. An image
    that cannot be read, or that kills its worker process, gets a null hash and an error.
    ``progress(done, total)`` is called first with 0, then as batches finish.
    """
    from curation_assets.core.shard_pass import PassItem, PassPlan, run_pass

    if progress:
        progress(0, len(refs))
    out = run_pass(
        [PassItem(ref.image_id, ref.source_path, ref.offset, ref.size) for ref in refs],
        PassPlan(None, (("phash", hash_row),)),
        workers=max(1, workers),
        chunk_size=batch_size,
        progress=(lambda done, total, _rate: progress(done, total)) if progress else None,
    )
    rows = [
        row if row is not None else (ref.image_id, None, error or "not processed")
        for ref, row, error in zip(refs, out.rows["phash"], out.errors, strict=True)
    ]
    return hashes_frame(rows)


def hashes_frame(rows: Sequence[tuple[str, int | None, str | None]]) -> pl.DataFrame:
    """Rows of :func:`hash_row` as the stored perceptual-hash table."""
    return pl.DataFrame(rows, schema=HASHES_SCHEMA, orient="row")
