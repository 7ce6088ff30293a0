"""Vector identity: which model and preprocessing made a set of vectors, and refusing a mix."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class VectorMismatchError(ValueError):
    """Vectors made by another model or preprocessing than the one a step is configured with."""


def identity_differences(found: Mapping[str, Any], expected: Mapping[str, Any]) -> list[str]:
    """Human-readable differences between two model identities (empty when compatible).

    An identity (from the model registry) holds everything that changes what a vector
    means: kind, architecture, weights file with its size and time, dimension, output and
    preprocessing; so a retrained checkpoint at the same path is a different model.
    """
    return [
        f"{key}: vectors have {found.get(key)!r}, config says {expected.get(key)!r}"
        for key in sorted(set(found) | set(expected))
        if found.get(key) != expected.get(key)
    ]


def assert_compatible(shard: str, found: Mapping[str, Any], expected: Mapping[str, Any]) -> None:
    """Raise when shard vectors were made by a different model or preprocessing."""
    differences = identity_differences(found, expected)
    if differences:
        raise VectorMismatchError(
            f"shard {shard!r}: vectors were made by a different model or preprocessing than configured "
            f"({'; '.join(differences)}); re-materialize the shard's embeddings"
        )
