"""A torch ``Dataset`` over an image folder with the curation's removal list and relabel map applied.

For training code: ``from curation_assets.torch_dataset import CuratedImageFolder``. It imports
only torch and Pillow (no torchvision, no Dagster), so it drops into any training script::

    train = CuratedImageFolder(
        "/data/imagenet/train",
        removal_list="curation/cleaning/removal_list.txt",
        relabel_map="curation/cleaning/relabel_map.json",
        split="train",
        transform=my_transform,
    )

The layout is the usual one: one subfolder per class, images anywhere below it. Entries of
the removal list and keys of the relabel map are paths relative to ``root`` (posix
separators), prefixed with ``<split>/`` as :func:`curation_assets.core.labeled.cleaning.cleaning_outputs`
writes them; with ``split=None`` they are taken as root-relative paths as they are.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch.utils.data
from PIL import Image, ImageOps

IMG_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def load_rgb_image(path: str) -> Image.Image:
    """Upright RGB: the EXIF orientation applied, like the curation stages see the image."""
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image)
        return image.convert("RGB")


class CuratedImageFolder(torch.utils.data.Dataset):
    """(image, class index) samples of an image folder, without removed images and with new labels.

    Attributes: ``classes`` (sorted class folder names plus every new label name from the
    relabel map, so a relabel may introduce a class), ``class_to_idx``, ``samples`` (list of
    (path, index)), ``targets``, ``removed`` and ``relabeled`` (the root-relative paths each
    applied to) and ``unmatched`` (entries for this split that name no file). A class folder
    whose images were all removed keeps its index, so indices match the folder layout.

    ``strict`` (default) makes unmatched entries an error: they usually mean the wrong root
    or split, and silently training on uncleaned data is worse than stopping.
    """

    def __init__(
        self,
        root: str | Path,
        removal_list: str | Path | Iterable[str] | None = None,
        relabel_map: str | Path | Mapping[str, str] | None = None,
        *,
        split: str | None = None,
        transform: Callable[[Image.Image], Any] | None = None,
        target_transform: Callable[[int], Any] | None = None,
        extensions: Iterable[str] = IMG_EXTENSIONS,
        loader: Callable[[str], Any] = load_rgb_image,
        strict: bool = True,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.root}")
        self.transform = transform
        self.target_transform = target_transform
        self.loader = loader
        prefix = f"{split}/" if split else ""
        removals = _for_split(_read_removals(removal_list), prefix)
        relabels = _for_split(_read_relabels(relabel_map), prefix)
        files = _scan(self.root, tuple(e.lower() for e in extensions))
        if not files:
            raise FileNotFoundError(f"no images in class subfolders of {self.root}")
        folder_classes = {cls for _, cls in files.values()}
        self.classes: list[str] = sorted(folder_classes | set(relabels.values()))
        self.class_to_idx: dict[str, int] = {name: i for i, name in enumerate(self.classes)}
        self.unmatched: list[str] = sorted(
            prefix + key for key in set(removals) | set(relabels) if key not in files
        )
        if strict and self.unmatched:
            hint = "" if split else " (the entries start with a split name? pass split=)"
            raise ValueError(
                f"{len(self.unmatched)} removal/relabel entries name no image under {self.root}{hint}, "
                f"e.g. {self.unmatched[:3]}; pass strict=False to ignore them"
            )
        self.removed: list[str] = sorted(key for key in removals if key in files)
        # A removal beats a relabel of the same file: a removed image has no label to fix.
        self.relabeled: dict[str, str] = {
            key: label for key, label in sorted(relabels.items()) if key in files and key not in removals
        }
        self.samples: list[tuple[str, int]] = [
            (path, self.class_to_idx[self.relabeled.get(key, cls)])
            for key, (path, cls) in sorted(files.items())
            if key not in removals
        ]
        self.targets: list[int] = [target for _, target in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        path, target = self.samples[index]
        image = self.loader(path)
        if self.transform is not None:
            image = self.transform(image)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return image, target


def _scan(root: Path, extensions: tuple[str, ...]) -> dict[str, tuple[str, str]]:
    """{root-relative posix path: (path, class folder name)} of every image in a class subfolder."""
    found: dict[str, tuple[str, str]] = {}
    with os.scandir(root) as entries:
        class_dirs = sorted(e.name for e in entries if e.is_dir(follow_symlinks=True))
    for name in class_dirs:
        for folder, dirs, filenames in os.walk(root / name, followlinks=True):
            dirs.sort()
            for filename in filenames:
                if filename.lower().endswith(extensions):
                    path = Path(folder) / filename
                    found[path.relative_to(root).as_posix()] = (str(path), name)
    return found


def _read_removals(source: str | Path | Iterable[str] | None) -> set[str]:
    if source is None:
        return set()
    if isinstance(source, str | Path):
        lines = Path(source).read_text(encoding="utf-8").splitlines()
    else:
        lines = list(source)
    # Blank lines and '#' comments let people annotate a list by hand.
    return {line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")}


def _read_relabels(source: str | Path | Mapping[str, str] | None) -> dict[str, str]:
    if source is None:
        return {}
    if isinstance(source, str | Path):
        mapping = json.loads(Path(source).read_text(encoding="utf-8"))
        if not isinstance(mapping, dict):
            raise ValueError(f"{source}: a relabel map is a JSON object {{path: new label}}")
    else:
        mapping = dict(source)
    bad = [key for key, label in mapping.items() if not isinstance(label, str) or not label]
    if bad:
        raise ValueError(f"relabel map: entries without a label name, e.g. {bad[:3]}")
    return {str(key).strip(): label for key, label in mapping.items()}


def _for_split(entries: Iterable[str] | Mapping[str, str], prefix: str) -> Any:
    """Only this split's entries, without the split prefix (a dict stays a dict)."""
    if not prefix:
        return entries
    if isinstance(entries, Mapping):
        return {key[len(prefix) :]: value for key, value in entries.items() if key.startswith(prefix)}
    return {key[len(prefix) :] for key in entries if key.startswith(prefix)}
