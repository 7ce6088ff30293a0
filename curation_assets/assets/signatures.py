"""Input signatures: how a per-shard output knows it is current.

Every per-shard output records, in its parquet footer, the signature of the inputs it was
made from (the kept images, the model and its weights file, the recipe's version). When
today's inputs give the same signature the output is kept, so re-running a shard after a
threshold change costs nothing; the assets and the headless runner ask the same functions.
"""

import dagster as dg
import xxhash

from curation_assets.assets.keys import SANITIZED
from curation_assets.resources.store import ProjectStore

SIGNATURE = "input_signature"


def signature_of(*parts: str | bytes) -> str:
    digest = xxhash.xxh3_128()
    for part in parts:
        digest.update(part if isinstance(part, bytes) else part.encode())
        digest.update(b"\0")
    return digest.hexdigest()


def sanitized_bytes(store: ProjectStore, shard: str) -> bytes:
    path = store.shard_path(SANITIZED, shard)
    if not path.is_file():
        raise dg.Failure(f"no {SANITIZED} for shard {shard!r}: materialize it first")
    return path.read_bytes()


def stored_signature(store: ProjectStore, asset: str, shard: str) -> str | None:
    path = store.shard_path(asset, shard)
    return store.parquet_metadata(path).get(SIGNATURE) if path.is_file() else None


def vectors_signature(store: ProjectStore, asset: str, shard: str) -> str:
    """The signature a vector table was written with (it names its images and its model)."""
    signature = stored_signature(store, asset, shard)
    if signature is None:
        raise dg.Failure(f"no {asset} for shard {shard!r}: materialize it first")
    return signature
