"""Example images of unwanted categories: find them, and turn them into reference vectors.

Tree of Life removed maps, charts, drawings and notebook pages by their similarity to a
handful of example images per category. A category's examples are the images in
``<examples_root>/<category>/`` (or the folder the project names for it); the vectors
come from the same model as the pool's semantic embeddings, so distances compare like
with like.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xxhash
from PIL import Image

from curation_assets.core.ingest.formats import IMAGE_EXTENSIONS
from curation_assets.core.ingest.images import ImageRef

MAX_EXAMPLES_PER_CATEGORY = 10_000  # examples are a handful to a few hundred; more is a wrong folder


class ExamplesError(ValueError):
    """The example folders cannot be used (missing, empty, unreadable)."""


@dataclass(frozen=True)
class ExampleSet:
    """Every example file, grouped by category, in a stable order."""

    files: dict[str, list[Path]]

    @property
    def categories(self) -> list[str]:
        return list(self.files)

    def fingerprint(self) -> str:
        """Changes when a file is added, removed or rewritten (path, size, mtime)."""
        digest = xxhash.xxh3_128()
        for category, paths in self.files.items():
            digest.update(category.encode() + b"\0")
            for path in paths:
                stat = path.stat()
                digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        return digest.hexdigest()


def category_folders(examples_root: str | None, folders: Mapping[str, str | None]) -> dict[str, Path]:
    """Category -> its folder: the category's own ``folder``, else ``<examples_root>/<category>``."""
    resolved = {}
    for category, folder in folders.items():
        if folder:
            resolved[category] = Path(folder)
        elif examples_root:
            resolved[category] = Path(examples_root) / category
        else:
            raise ExamplesError(f"category {category!r}: no folder and no examples_root")
    return resolved


def find_examples(folders: Mapping[str, Path]) -> ExampleSet:
    """List the image files of every category folder (recursively), failing clearly when one is unusable."""
    problems, files = [], {}
    for category, folder in folders.items():
        if not folder.is_dir():
            problems.append(f"{category}: folder {folder} does not exist")
            continue
        found = sorted(
            p for p in folder.rglob("*") if p.is_file() and p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS
        )
        if not found:
            problems.append(f"{category}: no image files in {folder}")
        elif len(found) > MAX_EXAMPLES_PER_CATEGORY:
            problems.append(f"{category}: {len(found)} files in {folder}; examples are a few hundred at most")
        files[category] = found
    if problems:
        raise ExamplesError("example images: " + "; ".join(problems))
    return ExampleSet(files)


def example_refs(examples: ExampleSet) -> tuple[list[ImageRef], list[str], list[str]]:
    """(refs to embed, their category, files that could not be opened with the reason)."""
    refs, categories, unreadable = [], [], []
    for category, paths in examples.files.items():
        for path in paths:
            try:
                with Image.open(path) as im:
                    width, height = im.size
            except Exception as exc:  # a broken example is reported, the others still count
                unreadable.append(f"{path}: {type(exc).__name__}: {exc}")
                continue
            refs.append(ImageRef(str(path), str(path), None, path.stat().st_size, width, height))
            categories.append(category)
    return refs, categories, unreadable


def vectors_by_category(
    categories: np.ndarray | list[str], vectors: np.ndarray, wanted: list[str]
) -> dict[str, np.ndarray]:
    """Split an example table back into one (m, d) array per category, in ``wanted`` order."""
    labels = np.asarray(categories)
    return {name: np.asarray(vectors)[labels == name] for name in wanted}
