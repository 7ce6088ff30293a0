"""The model registry: every model a project names, loaded from a local file into one shape.

A project's ``models`` section maps names to :class:`~curation_assets.config.ModelEntry`.
:func:`load_model` turns one entry into a :class:`LoadedModel`: an eval-mode module whose
``forward`` takes the *normalised* float batch (B x 3 x H x W; the caller turns uint8 pixels
into ``(x / 255 - mean) / std`` on the device) and returns B x dim floats, plus the
:class:`~curation_assets.core.embed.preprocess.Preprocessing` that makes its inputs and an
``identity`` record that travels with every vector it makes.

Weights always come from the entry's local file. The one exception is an open_clip entry
with a ``pretrained`` tag and no ``path``, fetched only when the project sets
``allow_download: true``. :func:`check_model_file` is the cheap check, run before any image is
read, that the file is there and readable.

Per kind:

* ``descriptor``: the built-in weight-free ImageDescriptor (unit-norm vectors).
* ``sscd_torchscript``: the SSCD authors' TorchScript export; raw descriptors (not unit-norm).
* ``open_clip``: an open_clip architecture by name (or from a ``config`` JSON) plus a local
  checkpoint; unit-norm image embeddings and, for text filters, ``encode_text``.
* ``timm``: a timm architecture by name plus a local state dict; pre-logits features
  (``output: embedding``) or classifier logits.
* ``torchscript``: any TorchScript network taking a fixed ``input_size`` square.
* ``aesthetic_mlp``: the LAION improved-aesthetic-predictor head over 768-d CLIP ViT-L/14
  image embeddings; one score per image, 0-10 as trained. Its input is an embedding, so it
  has no preprocessing. A ``path`` ending in ``.onnx`` is run by ONNX Runtime instead: any
  graph taking B x 768 floats and returning B x 1 (or B) scores.
* ``rotation``: a 4-way (0/90/180/270 degrees) classifier loaded through its ``base_kind``
  (torchscript, timm, open_clip or onnx); the module returns softmax probabilities. With
  ``base_kind: onnx`` the graph's first output is the class scores.
* ``onnx``: any ONNX graph run by ONNX Runtime (CUDA execution provider when the device is CUDA
  and onnxruntime-gpu provides it, else CPU). ``input_layout: nhwc_uint8`` feeds the uint8
  pixels (B x H x W x 3; the graph preprocesses); ``nchw_float`` feeds B x 3 x H x W floats
  normalised with mean/std, as the torch kinds get. Rows are L2-normalised here unless the
  entry says ``normalized: true`` (the graph already does it).
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import shutil
import tempfile
import threading
import warnings
import zipfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import xxhash
from torch import nn
from torch.nn import functional

from curation_assets.config import ModelEntry
from curation_assets.core.embed.preprocess import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Preprocessing,
)

log = logging.getLogger(__name__)

Output = Literal["embedding", "logits", "probabilities", "score"]

SSCD_SHORTER_SIDE = 288  # the SSCD authors' evaluation rule: shorter side to 288, aspect kept
SSCD_SQUARE = 320  # resize: square (any images share a batch)
SSCD_PROBE_SIZE = 64  # the dummy input that finds an SSCD network's output size
ONNX_UINT8_SHORTER_SIDE = 512  # nhwc_uint8 default: bounds decode memory; the graph resizes itself
# nhwc_uint8: mean 0 and std 1/255 make the runner's ``(x / 255 - mean) / std`` give back the
# pixel values themselves (std * 255 rounds to exactly 1.0 in float32), so the graph gets raw pixels.
_IDENTITY_MEAN = (0.0, 0.0, 0.0)
_IDENTITY_STD = (1.0 / 255.0,) * 3
AESTHETIC_INPUT_DIM = 768  # CLIP ViT-L/14 image embeddings
ROTATION_CLASSES = 4  # 0, 90, 180, 270 degrees, in that order
_PROBE_BATCH = 2
_PREPROCESSING_KEYS = ("input_size", "resize", "center_crop", "interpolation", "mean", "std")

_FILE_HINTS = {
    "sscd_torchscript": "the official SSCD TorchScript file, e.g. sscd_disc_mixup.torchscript.pt",
    "torchscript": "a TorchScript file written by torch.jit.save",
    "open_clip": (
        "an open_clip checkpoint of architecture {arch}: a state dict (.pt, .pth, .bin or "
        ".safetensors, e.g. open_clip_pytorch_model.bin) or OpenAI's TorchScript .pt"
    ),
    "timm": "a state dict of the timm model {arch} (.pth, .bin or .safetensors)",
    "aesthetic_mlp": (
        "the LAION improved-aesthetic-predictor head, e.g. sac+logos+ava1-l14-linearMSE.pth, "
        "or an ONNX export of it (.onnx)"
    ),
    "onnx": "an ONNX model file, e.g. an SSCD export sscd_disc_mixup.onnx",
}


class ModelFileError(FileNotFoundError):
    """A model's file is missing, unreadable or not loadable; the message names the project key."""


class ModelLoadError(ValueError):
    """A model that cannot be built from its entry (architecture, state-dict layout, output shape)."""


@dataclass
class LoadedModel:
    """One loaded model, ready for :func:`curation_assets.core.embed.embed.embed_images`.

    ``module`` is in eval mode with gradients off; ``forward(normalised B x 3 x H x W float)``
    returns B x ``dim`` floats (B x 768 embeddings in, B x 1 scores out for aesthetic_mlp).
    ``normalized`` says whether its rows are unit-norm (descriptor, open_clip). ``identity``
    is JSON-able; ``fingerprint`` hashes the parts of it that decide the vectors (weights
    content, architecture, preprocessing, output), not where the file lies.
    """

    name: str
    kind: str
    dim: int
    output: Output
    preprocessing: Preprocessing | None
    module: nn.Module
    identity: dict[str, Any]
    encode_text: Callable[[Sequence[str]], torch.Tensor] | None = None
    normalized: bool = False

    @property
    def fingerprint(self) -> str:
        record = {key: value for key, value in self.identity.items() if key != "name"}
        for key in ("file", "config_file"):
            if record.get(key):
                record[key] = {k: record[key][k] for k in ("size", "xxh3_128")}
        return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- files


def _file_kind(entry: ModelEntry) -> str:
    return entry.base_kind if entry.kind == "rotation" and entry.base_kind else entry.kind


def _what(entry: ModelEntry) -> str:
    if entry.kind == "rotation":
        return f"rotation (base_kind {entry.base_kind})"
    return entry.kind


def _hint(entry: ModelEntry) -> str:
    return _FILE_HINTS.get(_file_kind(entry), "a model file").format(arch=entry.name)


def _file_error(name: str, entry: ModelEntry, problem: str) -> ModelFileError:
    return ModelFileError(
        f"models.{name}.path: the {_what(entry)} weights file {entry.path} {problem} "
        f"(expected {_hint(entry)})"
    )


def _short(exc: BaseException, limit: int = 600) -> str:
    text = " ".join(line.strip() for line in str(exc).strip().splitlines()[:6] if line.strip())
    text = text or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _readable_problem(path: Path) -> str | None:
    """Why ``path`` cannot serve as a weights file, or None when it can."""
    if not path.exists():
        return "does not exist"
    if path.is_dir():
        return "is a directory, not a file"
    try:
        with path.open("rb") as handle:
            if not handle.read(1):
                return "is empty"
    except OSError as exc:
        return f"is not readable ({exc.strerror or exc})"
    return None


def check_model_file(name: str, entry: ModelEntry, allow_download: bool) -> None:
    """Raise :class:`ModelFileError` unless the entry's files exist and are readable.

    Cheap (no weights are read): run it before any image is. The descriptor needs no file;
    an open_clip entry with a ``pretrained`` tag and no ``path`` needs none when
    ``allow_download`` is true (the weights are fetched at load).
    """
    if entry.kind == "descriptor":
        return
    if entry.config:
        problem = _readable_problem(Path(entry.config))
        if problem:
            raise ModelFileError(
                f"models.{name}.config: the open_clip model-config file {entry.config} {problem} "
                "(expected a JSON with embed_dim, vision_cfg and text_cfg)"
            )
    if entry.path:
        problem = _readable_problem(Path(entry.path))
        if problem:
            raise _file_error(name, entry, problem)
        return
    if _file_kind(entry) == "open_clip":
        if entry.pretrained and allow_download:
            return
        if entry.pretrained:
            why = f"`pretrained: {entry.pretrained}` is downloaded only with allow_download: true"
        else:
            why = "no `pretrained` tag is set either"
        raise ModelFileError(
            f"models.{name}.path: the {_what(entry)} model {entry.name} has no local checkpoint `path` "
            f"and {why} (expected {_hint(entry)})"
        )
    raise ModelFileError(f"models.{name}.path: kind {_what(entry)} needs the local weights file `path`")


_HASH_CACHE: dict[tuple[str, int, int], str] = {}
_HASH_LOCK = threading.Lock()


def _content_hash(path: Path, size: int, mtime_ns: int) -> str:
    key = (str(path), size, mtime_ns)
    with _HASH_LOCK:
        found = _HASH_CACHE.get(key)
    if found is None:
        digest = xxhash.xxh3_128()
        with path.open("rb") as handle:
            while chunk := handle.read(8 << 20):
                digest.update(chunk)
        found = digest.hexdigest()
        with _HASH_LOCK:
            _HASH_CACHE[key] = found
    return found


def file_identity(path: str | Path) -> dict[str, Any]:
    """Path, size, mtime and the xxh3-128 of the content (cached per path, size and mtime)."""
    file = Path(path).resolve()
    stat = file.stat()
    return {
        "path": str(file),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "xxh3_128": _content_hash(file, stat.st_size, stat.st_mtime_ns),
    }


def _is_torchscript_archive(path: str) -> bool:
    """TorchScript archives are zips holding constants.pkl (a torch.save zip does not)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(n == "constants.pkl" or n.endswith("/constants.pkl") for n in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


# ----------------------------------------------------------------------------- wrappers


class _Flat(nn.Module):
    """Runs a network and returns B x D (TorchScript outputs may carry trailing 1x1 dims)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(x)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"the network returned {type(out).__name__}, a tensor expected")
        return out.flatten(1)


class _OpenClipImage(nn.Module):
    """open_clip image tower: ``encode_image``, unit-norm rows unless ``normalize`` is off."""

    def __init__(self, model: nn.Module, normalize: bool) -> None:
        super().__init__()
        self.model = model
        self.normalize = normalize

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model.encode_image(x).float()
        return functional.normalize(out, dim=-1) if self.normalize else out


class _TimmNet(nn.Module):
    """A timm model: pre-logits features (embedding) or classifier logits."""

    def __init__(self, model: nn.Module, pre_logits: bool) -> None:
        super().__init__()
        self.model = model
        self.pre_logits = pre_logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre_logits:
            return self.model.forward_head(self.model.forward_features(x), pre_logits=True).flatten(1)
        return self.model(x).flatten(1)


class AestheticMLP(nn.Module):
    """The LAION improved-aesthetic-predictor head (state-dict keys layers.0/2/4/6/7).

    Input: CLIP ViT-L/14 image embeddings (B x 768), L2-normalised here first, as the head
    was trained on normalised embeddings. Output: B x 1 scores on its 0-10 training scale.
    """

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(AESTHETIC_INPUT_DIM, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(functional.normalize(x.float(), dim=-1))


class _Probabilities(nn.Module):
    """Softmax over a classifier's logits (left as is when the network already ends in one)."""

    def __init__(self, inner: nn.Module, already_probabilities: bool) -> None:
        super().__init__()
        self.inner = inner
        self.already_probabilities = already_probabilities

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(x).float()
        return out if self.already_probabilities else out.softmax(dim=-1)


# ----------------------------------------------------------------------------- loaders


@dataclass
class _Built:
    module: nn.Module
    preprocessing: Preprocessing | None
    output: Output
    normalized: bool = False
    probe_size: int | None = None  # square side of the dummy input; default: preprocessing.size
    known_dim: int | None = (
        None  # set when the architecture fixes it: no dummy run (a ViT-L costs ~7 s on CPU)
    )
    encode_text: Callable[[Sequence[str]], torch.Tensor] | None = None
    extra: dict[str, Any] | None = None


def _pick(value: Any, default: Any) -> Any:
    return default if value is None else value


def _entry_preprocessing(
    entry: ModelEntry,
    *,
    resize: str,
    size: int,
    center_crop: bool,
    mean: Sequence[float],
    std: Sequence[float],
    interpolation: str,
) -> Preprocessing:
    """The kind's defaults, overridden by whatever preprocessing keys the entry sets."""
    resize = _pick(entry.resize, resize)
    return Preprocessing(
        resize=resize,
        size=_pick(entry.input_size, size),
        center_crop=resize == "shorter_side" and bool(_pick(entry.center_crop, center_crop)),
        mean=tuple(float(v) for v in _pick(entry.mean, mean)),
        std=tuple(float(v) for v in _pick(entry.std, std)),
        interpolation=_pick(entry.interpolation, interpolation),
    )


def _jit_load(name: str, entry: ModelEntry, device: torch.device) -> torch.jit.ScriptModule:
    try:
        with warnings.catch_warnings():  # torch 2.10+ flags TorchScript deprecated; SSCD ships only it
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.load(entry.path, map_location=device)
    except Exception as exc:  # the archive is not TorchScript, is truncated, or needs other ops
        raise _file_error(name, entry, f"could not be loaded as TorchScript: {_short(exc)}") from exc


def _load_descriptor(name: str, entry: ModelEntry, allow_download: bool, device: torch.device) -> _Built:
    from curation_assets.core.embed import descriptor  # written alongside; imported only when used

    variant = entry.variant or descriptor.DEFAULT_VARIANT
    return _Built(
        module=descriptor.ImageDescriptor(variant),
        preprocessing=descriptor.descriptor_preprocessing(variant),
        output="embedding",
        normalized=True,
        extra={
            # per variant: a changed copy variant must not mix with stored vectors of the old one,
            # while the unchanged content variant keeps its stored vectors
            "descriptor_version": descriptor.VARIANT_VERSIONS[variant],
            "variant": variant,
        },
    )


def _load_sscd(name: str, entry: ModelEntry, allow_download: bool, device: torch.device) -> _Built:
    # Raw SSCD descriptors, not L2-normalised here: for search the index step centres them with
    # the dataset mean and then L2-normalises them (the SSCD authors' recipe).
    module = _jit_load(name, entry, device)
    resize = entry.resize or "shorter_side"
    preprocessing = _entry_preprocessing(
        entry,
        resize=resize,
        size=SSCD_SQUARE if resize == "square" else SSCD_SHORTER_SIDE,
        center_crop=False,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        interpolation="bilinear",
    )
    return _Built(_Flat(module), preprocessing, "embedding", probe_size=SSCD_PROBE_SIZE)


def _load_torchscript(
    name: str, entry: ModelEntry, allow_download: bool, device: torch.device, raw: bool = False
) -> _Built:
    if entry.input_size is None:
        raise ModelLoadError(
            f"models.{name}.input_size: kind {_what(entry)} needs input_size "
            "(the side of the square the network takes)"
        )
    module = _jit_load(name, entry, device)
    preprocessing = _entry_preprocessing(
        entry,
        resize="shorter_side",
        size=entry.input_size,
        center_crop=True,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        interpolation="bilinear",
    )
    output = "logits" if raw else (entry.output or "embedding")
    return _Built(_Flat(module), preprocessing, output)


def _timm_preprocessing(name: str, entry: ModelEntry, model: nn.Module) -> Preprocessing:
    import timm.data

    config = timm.data.resolve_model_data_config(model)
    _, height, width = config["input_size"]
    if entry.input_size is None and height != width:
        raise ModelLoadError(
            f"models.{name}.input_size: {entry.name} takes {height}x{width} inputs; set input_size "
            "(inputs are square)"
        )
    interpolation = config.get("interpolation")
    # timm evaluates at crop_pct (resize to size / crop_pct, then crop size); here the shorter
    # side goes straight to size before the centre crop (crop_pct 1.0).
    return _entry_preprocessing(
        entry,
        resize="square" if config.get("crop_mode") == "squash" else "shorter_side",
        size=height,
        center_crop=True,
        mean=config.get("mean", IMAGENET_MEAN),
        std=config.get("std", IMAGENET_STD),
        interpolation=interpolation if interpolation in ("bilinear", "bicubic") else "bicubic",
    )


def _load_timm(
    name: str, entry: ModelEntry, allow_download: bool, device: torch.device, raw: bool = False
) -> _Built:
    import timm
    import timm.models

    try:
        model = timm.create_model(entry.name, pretrained=False)
    except Exception as exc:  # unknown name: timm raises RuntimeError("Unknown model ...")
        raise ModelLoadError(f"models.{name}.name: timm cannot build {entry.name!r}: {_short(exc)}") from exc
    try:
        state = timm.models.load_state_dict(entry.path, weights_only=True)
    except Exception as exc:
        raise _file_error(name, entry, f"could not be loaded as a state dict: {_short(exc)}") from exc

    classifier = model.pretrained_cfg.get("classifier") or "head"
    heads = [classifier] if isinstance(classifier, str) else list(classifier)
    head_weight = next((state[f"{h}.weight"] for h in heads if f"{h}.weight" in state), None)
    file_classes = int(head_weight.shape[0]) if head_weight is not None else None
    output: Output = "logits" if raw else (entry.output or "embedding")
    num_classes = entry.num_classes or file_classes or 0
    if file_classes is not None and num_classes != file_classes:
        raise ModelLoadError(
            f"models.{name}.num_classes: the file's classifier {heads[0]} has {file_classes} classes, "
            f"the entry asks for {num_classes}"
        )
    if output == "logits" and num_classes == 0:
        raise ModelLoadError(
            f"models.{name}: output logits needs classifier weights, and the file has no "
            f"{heads[0]}.weight (use output: embedding, or a checkpoint with its head)"
        )
    if num_classes != model.num_classes:
        model.reset_classifier(num_classes)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelLoadError(
            f"models.{name}: the file {entry.path} does not fit the timm architecture {entry.name!r}: "
            f"{_short(exc)}"
        ) from exc
    preprocessing = _timm_preprocessing(name, entry, model)
    return _Built(
        _TimmNet(model, pre_logits=output == "embedding"),
        preprocessing,
        output,
        extra={"num_classes": num_classes},
    )


# open_clip ------------------------------------------------------------------


class _QuietOpenClip(logging.Filter):
    """open_clip warns 'No pretrained weights loaded' before the local checkpoint is read."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(("No pretrained weights loaded", "Model initialized"))


@contextmanager
def _quiet_open_clip() -> Iterator[None]:
    root, quiet = logging.getLogger(), _QuietOpenClip()
    root.addFilter(quiet)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*TorchScript archive.*")
            yield
    finally:
        root.removeFilter(quiet)


_CONFIG_LOCK = threading.Lock()
_REGISTERED_CONFIGS: dict[str, str] = {}  # architecture name -> digest of the registered config
_CONFIG_DIR: Path | None = None


def _config_dir() -> Path:
    global _CONFIG_DIR
    if _CONFIG_DIR is None:
        _CONFIG_DIR = Path(tempfile.mkdtemp(prefix="curation-open-clip-configs-"))
        atexit.register(shutil.rmtree, _CONFIG_DIR, ignore_errors=True)
    return _CONFIG_DIR


def _register_open_clip_config(name: str, entry: ModelEntry) -> dict[str, Any]:
    """Register the entry's model-config JSON under ``entry.name``; its preprocess_cfg, if any.

    Accepts a plain open_clip model config (embed_dim, vision_cfg, text_cfg) or the
    ``open_clip_config.json`` of a Hugging Face repo ({"model_cfg": ..., "preprocess_cfg": ...}).
    open_clip registers a config under its file's stem, so the config is copied to a private
    folder as ``<name>.json``.
    """
    import open_clip

    source = Path(entry.config)
    try:
        data = json.loads(source.read_text())
    except OSError as exc:
        raise ModelFileError(
            f"models.{name}.config: the open_clip model-config file {source} is not readable "
            f"({exc.strerror or exc})"
        ) from exc
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"models.{name}.config: {source} is not valid JSON ({exc})") from exc
    nested = isinstance(data, dict) and isinstance(data.get("model_cfg"), dict)
    model_cfg = data["model_cfg"] if nested else data
    missing = [
        k
        for k in ("embed_dim", "vision_cfg", "text_cfg")
        if not isinstance(model_cfg, dict) or k not in model_cfg
    ]
    if missing:
        raise ModelLoadError(
            f"models.{name}.config: {source} is not an open_clip model config (missing {', '.join(missing)})"
        )
    if "/" in entry.name or "\\" in entry.name:
        raise ModelLoadError(
            f"models.{name}.name: {entry.name!r} must not contain a slash when `config` is set"
        )
    text = json.dumps(model_cfg, sort_keys=True)
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    with _CONFIG_LOCK:
        if _REGISTERED_CONFIGS.get(entry.name) != digest:
            folder = _config_dir() / digest
            folder.mkdir(exist_ok=True)
            target = folder / f"{entry.name}.json"
            target.write_text(text)
            open_clip.add_model_config(target)
            _REGISTERED_CONFIGS[entry.name] = digest
    return dict(data.get("preprocess_cfg") or {}) if nested else {}


_TAG_PREPROCESS_KEYS = ("mean", "std", "interpolation", "resize_mode")


def _open_clip_tag_cfg(name: str, entry: ModelEntry) -> tuple[dict[str, Any], bool]:
    """Preprocessing keys of the release the local file is, and whether it uses QuickGELU.

    From ``pretrained`` when set; else from the architecture's releases when they all agree
    (PE-Core: one release); else nothing (open_clip's defaults: CLIP mean/std, bicubic).
    """
    import open_clip

    if entry.pretrained:
        cfg = open_clip.get_pretrained_cfg(entry.name, entry.pretrained)
        if not cfg:
            tags = open_clip.list_pretrained_tags_by_model(entry.name)
            raise ModelLoadError(
                f"models.{name}.pretrained: open_clip knows no release {entry.pretrained!r} of "
                f"{entry.name} (known: {', '.join(tags) or 'none'})"
            )
        return {k: cfg[k] for k in _TAG_PREPROCESS_KEYS if k in cfg}, bool(cfg.get("quick_gelu"))
    found = []
    for tag in open_clip.list_pretrained_tags_by_model(entry.name):
        cfg = open_clip.get_pretrained_cfg(entry.name, tag)
        found.append({k: cfg[k] for k in _TAG_PREPROCESS_KEYS if k in cfg})
    if found and all(cfg == found[0] for cfg in found):
        return found[0], False
    return {}, False


def _open_clip_preprocessing(name: str, entry: ModelEntry, cfg: dict[str, Any]) -> Preprocessing:
    size = cfg.get("size", 224)
    if isinstance(size, (tuple, list)):
        if len(set(size)) != 1:
            raise ModelLoadError(
                f"models.{name}: {entry.name} takes {size[0]}x{size[1]} inputs; only squares"
            )
        size = size[0]
    mode = cfg.get("resize_mode", "shortest")
    if mode not in ("shortest", "squash"):
        log.warning("models.%s: open_clip resize_mode %r is not supported; using shortest + crop", name, mode)
    interpolation = cfg.get("interpolation", "bicubic")
    return _entry_preprocessing(
        entry.model_copy(update={"input_size": None}),  # already applied through force_image_size
        resize="square" if mode == "squash" else "shorter_side",
        size=int(size),
        center_crop=True,
        mean=cfg.get("mean", CLIP_MEAN),
        std=cfg.get("std", CLIP_STD),
        interpolation=interpolation if interpolation in ("bilinear", "bicubic") else "bicubic",
    )


def _text_encoder(
    name: str, entry: ModelEntry, model: nn.Module, allow_download: bool
) -> Callable[[Sequence[str]], torch.Tensor]:
    """``encode_text``: tokenizer built at first use; unit-norm text embeddings on the model's device."""
    import open_clip

    text_cfg = (open_clip.get_model_config(entry.name) or {}).get("text_cfg", {})
    hf_source = text_cfg.get("hf_tokenizer_name") or ("siglip" in entry.name.lower() and entry.name)
    state: dict[str, Any] = {}

    def encode_text(texts: Sequence[str]) -> torch.Tensor:
        if "tokenizer" not in state:
            if hf_source and not allow_download:
                raise ModelLoadError(
                    f"models.{name}: the text tokenizer of {entry.name} is a Hugging Face tokenizer "
                    f"({hf_source}) that would be downloaded; set allow_download: true to fetch it"
                )
            state["tokenizer"] = open_clip.get_tokenizer(entry.name)
        tokens = state["tokenizer"](list(texts))
        device = next(model.parameters()).device
        with torch.no_grad():
            return functional.normalize(model.encode_text(tokens.to(device)).float(), dim=-1)

    return encode_text


_OPENAI_METADATA_KEYS = ("input_resolution", "context_length", "vocab_size")


def _load_open_clip_torchscript(name: str, entry: ModelEntry, model: nn.Module) -> None:
    """Weights of a TorchScript release (OpenAI's .pt files) into the open_clip model."""
    archive = _jit_load(name, entry, torch.device("cpu"))
    state = {k: v for k, v in archive.state_dict().items() if k not in _OPENAI_METADATA_KEYS}
    expected = model.state_dict()
    transient = {k for k, _ in model.named_buffers()} - set(expected)  # non-persistent buffers
    state = {k: v for k, v in state.items() if k in expected or k not in transient}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelLoadError(
            f"models.{name}: the TorchScript file {entry.path} does not fit the open_clip architecture "
            f"{entry.name!r}: {_short(exc)}"
        ) from exc


def _load_open_clip(
    name: str, entry: ModelEntry, allow_download: bool, device: torch.device, raw: bool = False
) -> _Built:
    import open_clip

    file_cfg = _register_open_clip_config(name, entry) if entry.config else {}
    model_cfg = open_clip.get_model_config(entry.name)
    if model_cfg is None:
        known = ", ".join(m for m in open_clip.list_models() if "ViT" in m or "PE-" in m)[:300]
        raise ModelLoadError(
            f"models.{name}.name: open_clip has no architecture {entry.name!r} (give `config`: a "
            f"model-config JSON, or use a built-in name, e.g. {known}...)"
        )
    if model_cfg.get("text_cfg", {}).get("hf_model_name") and not allow_download:
        raise ModelLoadError(
            f"models.{name}.name: {entry.name} has a Hugging Face text tower whose config would be "
            "downloaded; set allow_download: true"
        )
    tag_cfg, quick_gelu = _open_clip_tag_cfg(name, entry)  # lookups only, nothing downloads
    jit_file = bool(entry.path) and _is_torchscript_archive(entry.path)
    quick_gelu = quick_gelu or jit_file  # OpenAI's own .pt releases are TorchScript, all QuickGELU
    try:
        with _quiet_open_clip():
            model = open_clip.create_model(
                entry.name,
                pretrained=None if entry.path else entry.pretrained,
                device="cpu",
                force_quick_gelu=quick_gelu,
                force_image_size=entry.input_size,
                pretrained_text=False,  # an HF text tower would fetch its own weights before ours load
            )
    except Exception as exc:
        if not entry.path:  # the download failed
            raise ModelFileError(
                f"models.{name}.pretrained: fetching open_clip weights {entry.name}/{entry.pretrained} "
                f"failed: {_short(exc)}"
            ) from exc
        raise ModelLoadError(f"models.{name}: open_clip cannot build {entry.name!r}: {_short(exc)}") from exc
    if jit_file:
        _load_open_clip_torchscript(name, entry, model)
    elif entry.path:
        try:
            with _quiet_open_clip():
                open_clip.load_checkpoint(model, entry.path, strict=True, weights_only=True)
        except RuntimeError as exc:
            if "state_dict" in str(exc) or "size mismatch" in str(exc):
                raise ModelLoadError(
                    f"models.{name}: the file {entry.path} does not fit the open_clip architecture "
                    f"{entry.name!r}: {_short(exc)}"
                ) from exc
            raise _file_error(name, entry, f"could not be loaded: {_short(exc)}") from exc
        except (KeyError, ValueError, TypeError) as exc:
            raise ModelLoadError(
                f"models.{name}: the file {entry.path} does not fit the open_clip architecture "
                f"{entry.name!r}: {_short(exc)}"
            ) from exc
        except Exception as exc:  # unpickling / zip / safetensors errors
            raise _file_error(name, entry, f"could not be loaded: {_short(exc)}") from exc
    cfg = dict(getattr(model.visual, "preprocess_cfg", {}) or {})
    cfg.update(tag_cfg)
    cfg.update({k: v for k, v in file_cfg.items() if k != "size"})
    preprocessing = _open_clip_preprocessing(name, entry, cfg)
    return _Built(
        _OpenClipImage(model, normalize=not raw),
        preprocessing,
        "logits" if raw else "embedding",
        normalized=not raw,
        encode_text=None if raw else _text_encoder(name, entry, model, allow_download),
        known_dim=None if raw else int(model_cfg["embed_dim"]),
        extra={"quick_gelu": quick_gelu},
    )


# aesthetic ------------------------------------------------------------------


def _load_aesthetic(name: str, entry: ModelEntry, allow_download: bool, device: torch.device) -> _Built:
    if str(entry.path).lower().endswith(".onnx"):
        return _load_aesthetic_onnx(name, entry, device)
    try:
        checkpoint = torch.load(entry.path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise _file_error(name, entry, f"could not be loaded as a state dict: {_short(exc)}") from exc
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict):
        raise ModelLoadError(
            f"models.{name}: {entry.path} holds a {type(checkpoint).__name__}, not a state dict "
            f"(expected {_hint(entry)})"
        )
    state = {k.removeprefix("module."): v for k, v in checkpoint.items()}
    module = AestheticMLP()
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}
    problems = [f"missing {k}" for k in expected if k not in found]
    problems += [f"unexpected {k}" for k in found if k not in expected]
    problems += [
        f"{k} is {found[k]}, {expected[k]} expected"
        for k in expected
        if k in found and found[k] != expected[k]
    ]
    if problems:
        shown = "; ".join(problems[:8]) + ("; ..." if len(problems) > 8 else "")
        raise ModelLoadError(
            f"models.{name}: {entry.path} does not have the LAION aesthetic-MLP layout "
            "(Linear 768-1024-128-64-16-1 as layers.0/2/4/6/7): " + shown
        )
    module.load_state_dict(state, strict=True)
    return _Built(module, None, "score")


# onnx -----------------------------------------------------------------------


def _onnx_session(path: str, device: torch.device, threads: int) -> Any:
    """An ONNX Runtime session: CUDA provider for a CUDA device when installed, else CPU."""
    import onnxruntime  # imported here: loading the Definitions must not pay for it

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads  # 0: onnxruntime's default (one per physical core)
    providers: list[Any] = ["CPUExecutionProvider"]
    if device.type == "cuda":
        if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": device.index or 0}))
        else:
            log.warning(
                "%s: the compute device is %s but onnxruntime has no CUDA provider (install "
                "onnxruntime-gpu); running the ONNX model on the CPU",
                path,
                device,
            )
    return onnxruntime.InferenceSession(path, sess_options=options, providers=providers)


class _OnnxNet(nn.Module):
    """An ONNX graph behind the torch module interface that :func:`~.embed.embed_images` runs.

    ``forward`` gets the runner's normalised float batch (for ``nhwc_uint8`` the identity
    mean/std leave it as pixel values) and returns B x D float rows on the input's device.
    Tensors go through numpy, as onnxruntime's Python API takes numpy arrays.
    """

    def __init__(
        self,
        path: str,
        session: Any,
        runtime: tuple[str, int],
        layout: str,
        input_name: str,
        output_name: str,
        normalize: bool,
    ) -> None:
        super().__init__()
        self.path = path
        self.session = session
        self.layout = layout
        self.input_name = input_name
        self.output_name = output_name
        self.normalize = normalize
        self._runtime = runtime  # (device, threads) the session was made for

    def configure_runtime(self, device: torch.device, threads: int) -> None:
        """Rebuild the session for the compute settings a run uses (device, intra-op threads).

        The embed runner calls this: a session's providers and thread pool are fixed when it is
        made, and the loader makes one before the run's settings are known.
        """
        wanted = (str(device), int(threads))
        if wanted != self._runtime:
            self.session = _onnx_session(self.path, device, threads)
            self._runtime = wanted

    def _feed(self, x: torch.Tensor) -> Any:
        if self.layout == "nhwc_uint8":
            pixels = x.detach().float().round().clamp(0, 255).to(torch.uint8)
            return pixels.permute(0, 2, 3, 1).contiguous().cpu().numpy()
        return x.detach().float().contiguous().cpu().numpy()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (out,) = self.session.run([self.output_name], {self.input_name: self._feed(x)})
        rows = torch.from_numpy(out).float().reshape(len(x), -1)
        if self.normalize:
            rows = functional.normalize(rows, dim=-1)
        return rows.to(x.device)


def _onnx_dims(shape: Sequence[Any]) -> list[int | None]:
    """A graph input's shape with symbolic or unknown dimensions as None."""
    return [dim if isinstance(dim, int) and dim > 0 else None for dim in shape]


def _onnx_preprocessing(name: str, entry: ModelEntry, dims: list[int | None]) -> Preprocessing:
    if entry.input_layout == "nhwc_uint8":
        return _entry_preprocessing(
            entry,
            resize="shorter_side",
            size=ONNX_UINT8_SHORTER_SIDE,
            center_crop=False,
            mean=_IDENTITY_MEAN,
            std=_IDENTITY_STD,
            interpolation="bilinear",
        )
    height, width = dims[2], dims[3]
    if height is not None and width is not None and height != width:
        raise ModelLoadError(
            f"models.{name}.path: the graph in {entry.path} takes {height}x{width} inputs; only squares"
        )
    fixed = height or width
    if fixed is not None and entry.input_size not in (None, fixed):
        raise ModelLoadError(
            f"models.{name}.input_size: the graph in {entry.path} takes {fixed}x{fixed} inputs, "
            f"not {entry.input_size}"
        )
    size = entry.input_size or fixed
    if size is None:
        raise ModelLoadError(
            f"models.{name}.input_size: the graph in {entry.path} takes any image size; set input_size "
            "(with resize: shorter_side, the shorter side; with resize: square, the side)"
        )
    preprocessing = _entry_preprocessing(
        entry,
        resize="shorter_side",
        size=size,
        center_crop=fixed is not None,  # a fixed-size graph needs every input cropped to its square
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        interpolation="bilinear",
    )
    if fixed is not None and not preprocessing.fixed_shape:
        raise ModelLoadError(
            f"models.{name}: the graph in {entry.path} takes {fixed}x{fixed} inputs only; use "
            "resize: square or center_crop: true"
        )
    return preprocessing


def _load_onnx(
    name: str, entry: ModelEntry, allow_download: bool, device: torch.device, raw: bool = False
) -> _Built:
    """An onnx entry; ``raw`` (a rotation's base): class scores from the first output, not normalised."""
    try:
        session = _onnx_session(entry.path, device, 0)
    except Exception as exc:  # not a protobuf, truncated, or ops this onnxruntime lacks
        raise _file_error(name, entry, f"could not be loaded as an ONNX model: {_short(exc)}") from exc
    inputs = session.get_inputs()
    if len(inputs) != 1:
        names = ", ".join(i.name for i in inputs)
        raise ModelLoadError(
            f"models.{name}.path: the graph in {entry.path} has {len(inputs)} inputs ({names}); one expected"
        )
    graph_input = inputs[0]
    dims = _onnx_dims(graph_input.shape)
    expected_type, channels_at = (
        ("tensor(uint8)", 3) if entry.input_layout == "nhwc_uint8" else ("tensor(float)", 1)
    )
    if graph_input.type != expected_type or len(dims) != 4 or dims[channels_at] not in (None, 3):
        shape = "x".join("?" if d is None else str(d) for d in dims)
        raise ModelLoadError(
            f"models.{name}.input_layout: {entry.input_layout} feeds a 4-d {expected_type} with 3 channels "
            f"at axis {channels_at}; the graph's input {graph_input.name!r} is a {shape} {graph_input.type}"
        )
    outputs = [o.name for o in session.get_outputs()]
    # a rotation entry's `output` says logits or probabilities, not which graph output to use
    output_name = outputs[0] if raw else (entry.output or outputs[0])
    if output_name not in outputs:
        raise ModelLoadError(
            f"models.{name}.output: the graph in {entry.path} has no output {output_name!r} "
            f"(outputs: {', '.join(outputs)})"
        )
    preprocessing = _onnx_preprocessing(name, entry, dims)
    module = _OnnxNet(
        entry.path,
        session,
        (str(device), 0),
        entry.input_layout,
        graph_input.name,
        output_name,
        normalize=not (entry.normalized or raw),
    )
    return _Built(
        module,
        preprocessing,
        "logits" if raw else "embedding",
        normalized=not raw,  # by the graph (normalized: true) or by _OnnxNet
        extra={
            "input_layout": entry.input_layout,
            "graph_output": output_name,
            "normalized_by_graph": bool(entry.normalized),
        },
    )


class _OnnxHead(nn.Module):
    """An ONNX scoring head over embeddings (B x 768 floats -> B x 1), e.g. the aesthetic MLP.

    Its input is L2-normalised first, as :class:`AestheticMLP` does: the LAION head was
    trained on unit-norm CLIP embeddings, and normalising twice changes nothing.
    """

    def __init__(self, path: str, session: Any, input_name: str, output_name: str) -> None:
        super().__init__()
        self.path = path
        self.session = session
        self.input_name = input_name
        self.output_name = output_name
        self._runtime = ("cpu", 0)

    def configure_runtime(self, device: torch.device, threads: int) -> None:
        wanted = (str(device), int(threads))
        if wanted != self._runtime:
            self.session = _onnx_session(self.path, device, threads)
            self._runtime = wanted

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feed = functional.normalize(x.detach().float(), dim=-1).contiguous().cpu().numpy()
        (out,) = self.session.run([self.output_name], {self.input_name: feed})
        return torch.from_numpy(out).float().reshape(len(x), -1).to(x.device)


def _load_aesthetic_onnx(name: str, entry: ModelEntry, device: torch.device) -> _Built:
    try:
        session = _onnx_session(entry.path, device, 0)
    except Exception as exc:  # not a protobuf, truncated, or ops this onnxruntime lacks
        raise _file_error(name, entry, f"could not be loaded as an ONNX model: {_short(exc)}") from exc
    inputs = session.get_inputs()
    dims = _onnx_dims(inputs[0].shape) if len(inputs) == 1 else []
    if (
        len(inputs) != 1
        or inputs[0].type != "tensor(float)"
        or len(dims) != 2
        or dims[1]
        not in (
            None,
            AESTHETIC_INPUT_DIM,
        )
    ):
        found = ", ".join(f"{i.name}: {i.type} {_onnx_dims(i.shape)}" for i in inputs)
        raise ModelLoadError(
            f"models.{name}.path: an ONNX aesthetic head takes one B x {AESTHETIC_INPUT_DIM} float "
            f"input (CLIP ViT-L/14 image embeddings); the graph in {entry.path} takes {found}"
        )
    output_name = session.get_outputs()[0].name
    module = _OnnxHead(entry.path, session, inputs[0].name, output_name)
    with torch.no_grad():
        out = _probe(name, module, torch.randn(_PROBE_BATCH, AESTHETIC_INPUT_DIM, generator=_generator()))
    if out.shape[1] != 1:
        raise ModelLoadError(
            f"models.{name}: an aesthetic head outputs one score per image; the graph in {entry.path} "
            f"outputs {out.shape[1]} values per row"
        )
    return _Built(module, None, "score", known_dim=1, extra={"runtime": "onnxruntime"})


# rotation -------------------------------------------------------------------


def _load_rotation(name: str, entry: ModelEntry, allow_download: bool, device: torch.device) -> _Built:
    base = {
        "torchscript": _load_torchscript,
        "timm": _load_timm,
        "open_clip": _load_open_clip,
        "onnx": _load_onnx,
    }[entry.base_kind]
    built = base(name, entry, allow_download, device, raw=True)
    inner = built.module.to(device).eval()
    size = built.preprocessing.size
    with torch.no_grad():
        out = _probe(name, inner, torch.randn(_PROBE_BATCH, 3, size, size, generator=_generator()).to(device))
    if out.shape[1] != ROTATION_CLASSES:
        raise ModelLoadError(
            f"models.{name}: a rotation model outputs {ROTATION_CLASSES} values (0/90/180/270 degrees); "
            f"this {entry.base_kind} model outputs {out.shape[1]}"
        )
    already = entry.output == "probabilities"
    looks_softmaxed = bool(
        (out >= 0).all() and torch.allclose(out.sum(dim=1), torch.ones(len(out)), atol=1e-3)
    )
    if looks_softmaxed and not already:
        log.warning(
            "models.%s: the rotation model's outputs already sum to 1; if it ends in a softmax, "
            "set output: probabilities",
            name,
        )
    extra = dict(built.extra or {})
    extra["classes_degrees"] = [0, 90, 180, 270]
    return _Built(_Probabilities(inner, already), built.preprocessing, "probabilities", extra=extra)


_LOADERS: dict[str, Callable[[str, ModelEntry, bool, torch.device], _Built]] = {
    "descriptor": _load_descriptor,
    "sscd_torchscript": _load_sscd,
    "open_clip": _load_open_clip,
    "timm": _load_timm,
    "torchscript": _load_torchscript,
    "aesthetic_mlp": _load_aesthetic,
    "rotation": _load_rotation,
    "onnx": _load_onnx,
}


def _generator() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def _probe(name: str, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Run the dummy batch once; the output must be B x D."""
    try:
        out = module(x)
    except Exception as exc:
        shape = "x".join(str(s) for s in x.shape)
        raise ModelLoadError(
            f"models.{name}: the model failed on a {shape} dummy input: {_short(exc)}"
        ) from exc
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != len(x):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelLoadError(
            f"models.{name}: the model returned {shape} for a batch of {len(x)}; B x D expected"
        )
    return out


def load_model(
    name: str, entry: ModelEntry, *, allow_download: bool = False, device: str | torch.device = "cpu"
) -> LoadedModel:
    """Load the project's model ``name`` (its ``models`` key) onto ``device``, in eval mode.

    Raises :class:`ModelFileError` for a missing, unreadable or unloadable file and
    :class:`ModelLoadError` when the file does not fit the entry (architecture name,
    state-dict layout, output width).
    """
    check_model_file(name, entry, allow_download)
    device = torch.device(device)
    built = _LOADERS[entry.kind](name, entry, allow_download, device)
    module = built.module.to(device).eval()
    module.requires_grad_(False)
    if built.known_dim is not None:
        dim = built.known_dim
    else:
        if built.preprocessing is None:
            x = torch.randn(_PROBE_BATCH, AESTHETIC_INPUT_DIM, generator=_generator())
        else:
            side = built.probe_size or built.preprocessing.size
            x = torch.randn(_PROBE_BATCH, 3, side, side, generator=_generator())
        with torch.no_grad():
            dim = int(_probe(name, module, x.to(device)).shape[1])
    identity: dict[str, Any] = {
        "kind": entry.kind,
        "name": name,
        "architecture": entry.name,
        "base_kind": entry.base_kind,
        "pretrained": entry.pretrained,
        "file": file_identity(entry.path) if entry.path else None,
        "config_file": file_identity(entry.config) if entry.config else None,
        "dim": dim,
        "output": built.output,
        "normalized": built.normalized,
        "preprocessing": built.preprocessing.describe() if built.preprocessing else None,
        **(built.extra or {}),
    }
    return LoadedModel(
        name=name,
        kind=entry.kind,
        dim=dim,
        output=built.output,
        preprocessing=built.preprocessing,
        module=module,
        identity=identity,
        encode_text=built.encode_text,
        normalized=built.normalized,
    )
