"""Project files: pydantic models, the packaged defaults, deep merge and clear errors.

A project file is YAML deep-merged over ``projects/defaults.yaml`` (the one place where
defaults are written down) and validated here. Models forbid unknown keys; a wrong key or
value raises :class:`ProjectConfigError` naming the key's path and what is allowed.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from functools import cache
from itertools import pairwise
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

PROJECTS_DIR = Path(__file__).parent / "projects"
DEFAULTS_FILE = PROJECTS_DIR / "defaults.yaml"
PROJECTS_ENV = "CURATION_PROJECTS"  # extra project files or folders, os.pathsep-separated
HOME_ENV = "CURATION_HOME"

_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class ProjectConfigError(ValueError):
    """A project file that cannot be used, with every problem listed by key path."""


def curation_home() -> Path:
    """Where ${CURATION_HOME} points: the env var, else ./.curation under the working dir."""
    return Path(os.environ.get(HOME_ENV) or Path.cwd() / ".curation").expanduser().resolve()


def expand_path(value: str, base_dir: Path | None) -> str:
    """Expand ${VAR}, ${VAR:-default} and ~; make a relative path absolute against base_dir."""

    def substitute(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name == HOME_ENV:
            return str(curation_home())
        found = os.environ.get(name)
        if found is None and default is None:
            raise ValueError(f"environment variable ${{{name}}} is not set (write ${{{name}:-default}})")
        return found if found is not None else default

    expanded = _ENV_RE.sub(substitute, value)
    if "://" in expanded:
        # object storage (s3://, gs://...) stays a URL; file:// becomes a plain path
        scheme = expanded.split("://", 1)[0].lower()
        if scheme not in ("file", "local"):
            return expanded.rstrip("/")
        expanded = expanded.split("://", 1)[1]
    path = Path(expanded).expanduser()
    if not path.is_absolute():
        path = (base_dir or Path.cwd()) / path
    return str(path.resolve())


def _path_field(value: Any, info: ValidationInfo) -> Any:
    if value is None or not isinstance(value, str):
        return value
    base = (info.context or {}).get("base_dir")
    return expand_path(value, Path(base) if base else None)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ----------------------------------------------------------------------------- dataset


class ShardRule(_Strict):
    kind: Literal["subfolder", "chunks", "tar", "parquet"]
    chunk_size: int = Field(gt=0)


class ParquetInput(_Strict):
    """Where a parquet shard keeps its images (input_kind parquet)."""

    # the defaults of projects/defaults.yaml, repeated for a DatasetConfig built in code
    image_column: str = "image"  # a struct of bytes/path (Hugging Face datasets) or a plain binary column
    path_column: str | None = None  # a column naming each image (None: the struct's path, else the row)
    metadata_columns: tuple[str, ...] | None = None  # carried into the inventory (None: every other column)


class DatasetConfig(_Strict):
    roots: dict[str, str]
    input_kind: Literal["directory", "webdataset", "parquet"]
    shard_rule: ShardRule
    follow_symlinks: bool
    parquet: ParquetInput = ParquetInput()

    @field_validator("roots", mode="before")
    @classmethod
    def _plain_root(cls, value: Any) -> Any:
        return {"data": value} if isinstance(value, str) else value

    @field_validator("roots")
    @classmethod
    def _check_roots(cls, roots: dict[str, str], info: ValidationInfo) -> dict[str, str]:
        if not roots:
            raise ValueError("at least one root is required (split name -> folder)")
        for split in roots:
            if not _NAME_RE.match(split):
                raise ValueError(f"split name {split!r} must match {_NAME_RE.pattern}")
        return {split: _path_field(path, info) for split, path in roots.items()}

    @model_validator(mode="after")
    def _kind_matches_rule(self) -> DatasetConfig:
        for kind, rule in (("webdataset", "tar"), ("parquet", "parquet")):
            if (self.input_kind == kind) != (self.shard_rule.kind == rule):
                raise ValueError(
                    f"input_kind {kind!r} goes with shard_rule.kind {rule!r} and only with it "
                    f"(got input_kind={self.input_kind!r}, shard_rule.kind={self.shard_rule.kind!r})"
                )
        return self


class DiscoveryConfig(_Strict):
    sensor_running: bool
    sensor_interval_seconds: int = Field(ge=5)
    refresh_cron: str
    refresh_running: bool
    # New shard keys added (and run) per sensor tick; the rest wait for the next ticks, so one tick
    # over a freshly mounted pool of 10,000 shards stays well inside Dagster's sensor timeout.
    max_new_shards_per_tick: int = Field(default=500, ge=1)

    @field_validator("refresh_cron")
    @classmethod
    def _cron(cls, value: str) -> str:
        if len(value.split()) != 5:
            raise ValueError(f"a cron string has 5 fields (got {value!r})")
        return value


class RunsConfig(_Strict):
    """How the project's jobs execute when launched (UI, sensor, schedule, backfill, `curate`)."""

    executor: Literal["in_process", "multiprocess", "celery", "k8s"]  # $CURATION_EXECUTOR overrides
    max_concurrent_steps: int = Field(ge=0)  # multiprocess only; 0 = one per CPU core
    shard_max_runtime_seconds: int = Field(ge=0)  # 0 = no limit
    global_max_runtime_seconds: int = Field(ge=0)


# ----------------------------------------------------------------------------- models

ModelKind = Literal[
    "descriptor", "sscd_torchscript", "open_clip", "timm", "torchscript", "aesthetic_mlp", "rotation", "onnx"
]
_NEEDS_FILE = {"sscd_torchscript", "torchscript", "aesthetic_mlp", "onnx"}


class ModelEntry(_Strict):
    """A model the stages refer to by name. Weights always come from a local file.

    Preprocessing keys (input_size, resize, center_crop, interpolation, mean, std) override
    what the loader would pick for the kind (see curation_assets/core/embed/models.py); they do
    not apply to the built-in descriptor nor to aesthetic_mlp (its input is an embedding).
    """

    kind: ModelKind
    path: str | None = None  # local weights / TorchScript file
    name: str | None = None  # open_clip or timm architecture name
    # open_clip release tag (openai, laion2b_s32b_b82k, meta, ...). With `path`: says which release
    # the local file is (its mean/std, resize rule and QuickGELU are taken from the tag; nothing
    # downloads). Without `path`: downloaded, and only with allow_download: true.
    pretrained: str | None = None
    config: str | None = None  # open_clip: a model-config JSON for an architecture open_clip lacks
    base_kind: Literal["torchscript", "timm", "open_clip", "onnx"] | None = None  # for kind: rotation
    num_classes: int | None = Field(default=None, gt=0)  # timm: classifier width (default: from the file)
    input_size: int | None = Field(default=None, gt=0)
    resize: Literal["shorter_side", "square"] | None = None
    center_crop: bool | None = None  # with resize: shorter_side, crop the centre input_size square
    interpolation: Literal["bilinear", "bicubic"] | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    # timm / torchscript: embedding (default) or logits; rotation: logits (default) or probabilities
    # (the model already ends in a softmax); onnx: the name of the graph output to use (a free
    # string, as graphs name outputs as they like; default: the first output)
    output: str | None = None
    # onnx: how pixels reach the graph. nhwc_uint8: B x H x W x 3 uint8, the graph preprocesses
    # itself; nchw_float: B x 3 x H x W float32 normalised with mean/std (the torch kinds' input)
    input_layout: Literal["nhwc_uint8", "nchw_float"] | None = None
    # onnx: whether the chosen output is already L2-normalised (else the loader normalises it)
    normalized: bool | None = None
    # descriptor: copy (layout-weighted, for near-duplicates; the default) or content
    # (global statistics weigh more, for grouping and example filters); see core/embed/descriptor.py
    variant: Literal["copy", "content"] | None = None

    _path = field_validator("path", "config")(_path_field)

    @field_validator("std")
    @classmethod
    def _positive_std(cls, value: tuple[float, float, float] | None) -> tuple[float, float, float] | None:
        if value is not None and min(value) <= 0:
            raise ValueError(f"every std value must be positive (got {list(value)})")
        return value

    @model_validator(mode="after")
    def _kind_fields(self) -> ModelEntry:
        kind, base = self.kind, self.base_kind
        if kind == "rotation" and not base:
            raise ValueError("kind 'rotation' needs `base_kind`: torchscript, timm, open_clip or onnx")
        file_kind = base if kind == "rotation" else kind
        if (kind in _NEEDS_FILE or file_kind in ("timm", "torchscript", "onnx")) and not self.path:
            raise ValueError(f"kind {self.kind!r} needs `path`: the local weights file")
        if file_kind in ("open_clip", "timm") and not self.name:
            what = f"base_kind {base!r}" if kind == "rotation" else f"kind {kind!r}"
            raise ValueError(f"{what} needs `name`: the architecture name")
        if file_kind == "torchscript" and self.input_size is None:
            what = "base_kind 'torchscript'" if kind == "rotation" else "kind 'torchscript'"
            raise ValueError(f"{what} needs `input_size`: the side of the square the network takes")
        if kind != "rotation" and base:
            raise ValueError(f"`base_kind` is for kind 'rotation' only (kind is {kind!r})")
        if self.pretrained and file_kind != "open_clip":
            raise ValueError(f"`pretrained` is an open_clip tag; kind {kind!r} takes its weights from `path`")
        if self.config and file_kind != "open_clip":
            raise ValueError(f"`config` is an open_clip model-config JSON; kind {kind!r} takes none")
        if self.num_classes is not None and file_kind != "timm":
            raise ValueError("`num_classes` is for timm models only")
        if kind == "rotation" and self.num_classes not in (None, 4):
            raise ValueError(
                f"a rotation model has 4 classes (0/90/180/270), not num_classes={self.num_classes}"
            )
        if self.variant is not None and kind != "descriptor":
            raise ValueError("`variant` (copy or content) is for kind descriptor only")
        if kind in ("descriptor", "aesthetic_mlp"):
            set_keys = [
                key
                for key in ("input_size", "resize", "center_crop", "interpolation", "mean", "std")
                if getattr(self, key) is not None
            ]
            if set_keys:
                why = "is built in" if kind == "descriptor" else "scores embeddings, not images"
                raise ValueError(f"kind {kind!r} {why}: remove {', '.join(set_keys)}")
        if self.center_crop and self.resize == "square":
            raise ValueError(
                "center_crop goes with resize: shorter_side (a square resize leaves nothing to crop)"
            )
        if file_kind != "onnx":
            onnx_only = [key for key in ("input_layout", "normalized") if getattr(self, key) is not None]
            if onnx_only:
                raise ValueError(f"{', '.join(onnx_only)}: for kind 'onnx' only (kind is {kind!r})")
        elif self.input_layout == "nhwc_uint8":
            # The graph normalises uint8 pixels itself; mean/std would never be applied.
            ignored = [key for key in ("mean", "std") if getattr(self, key) is not None]
            if ignored:
                raise ValueError(
                    f"input_layout 'nhwc_uint8' feeds raw uint8 pixels (the graph normalises): "
                    f"remove {', '.join(ignored)}"
                )
        if file_kind == "onnx" and kind == "rotation":
            # a rotation graph's `output` keeps the rotation meaning (logits or probabilities);
            # its first graph output is used
            if self.input_layout is None:
                raise ValueError("base_kind 'onnx' needs `input_layout`: nhwc_uint8 or nchw_float")
            if self.normalized is not None:
                raise ValueError("normalized: a rotation model's outputs are class scores, not embeddings")
        if kind == "onnx":
            if self.input_layout is None:
                raise ValueError("kind 'onnx' needs `input_layout`: nhwc_uint8 or nchw_float")
            if self.output is not None and not self.output.strip():
                raise ValueError("output: the graph output name must not be empty")
            return self
        allowed_outputs = {
            "timm": ("embedding", "logits"),
            "torchscript": ("embedding", "logits"),
            "rotation": ("logits", "probabilities"),
        }.get(kind, ())
        if self.output is not None and self.output not in allowed_outputs:
            allowed = " or ".join(repr(o) for o in allowed_outputs) or "none (the kind fixes it)"
            raise ValueError(f"kind {kind!r} takes output {allowed} (got {self.output!r})")
        return self


# ----------------------------------------------------------------------------- stages

Keeper = Literal["quality", "alphabetical", "random"]


class SanitizeStage(_Strict):
    """File and pixel validity checks; defaults match VDC's sanitize_images."""

    min_width: int = Field(ge=1)
    min_height: int = Field(ge=1)
    max_width: int = Field(ge=1)
    max_height: int = Field(ge=1)
    min_aspect_ratio: float = Field(gt=0)
    max_aspect_ratio: float = Field(gt=0)
    max_file_size_mb: float = Field(gt=0)
    allowed_formats: tuple[str, ...]
    max_pixels: int = Field(gt=0)
    too_large_action: Literal["resize", "reject"]
    file_too_large_action: Literal["recompress", "reject"]
    recompress_quality: int = Field(ge=1, le=100)
    workers: int = Field(ge=0)
    chunk_size: int = Field(ge=1)
    max_in_flight: int = Field(ge=1)

    @field_validator("allowed_formats")
    @classmethod
    def _formats(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        from curation_assets.core.ingest.formats import ALLOWABLE_EXTENSIONS  # the one list

        known = ALLOWABLE_EXTENSIONS
        lowered = tuple(v.lower().lstrip(".") for v in value)
        unknown = sorted(set(lowered) - known)
        if unknown:
            raise ValueError(f"unknown formats {unknown}; allowed values: {sorted(known)}")
        return lowered

    @model_validator(mode="after")
    def _ranges(self) -> SanitizeStage:
        if self.min_width > self.max_width or self.min_height > self.max_height:
            raise ValueError("min_width/min_height must not exceed max_width/max_height")
        if self.min_aspect_ratio >= self.max_aspect_ratio:
            raise ValueError("min_aspect_ratio must be below max_aspect_ratio")
        return self

    @property
    def max_file_bytes(self) -> int:
        return int(self.max_file_size_mb * 1024 * 1024)


class ExactDedupStage(_Strict):
    enabled: bool
    keeper: Keeper
    seed: int


class RotationStage(_Strict):
    enabled: bool
    model: str
    threshold: float = Field(ge=0, le=1)


class EmbeddingsStage(_Strict):
    enabled: bool
    copy_model: str
    semantic_model: str


class NearDedupStage(_Strict):
    enabled: bool
    model: str
    threshold: float = Field(ge=0, le=2)
    report_threshold: float = Field(ge=0, le=2)
    index: Literal["auto", "flat", "ivf", "hnsw", "lsh"]
    linkage: Literal["representative", "single"]
    keeper: Keeper
    seed: int

    @model_validator(mode="after")
    def _report_covers_threshold(self) -> NearDedupStage:
        if self.report_threshold < self.threshold:
            raise ValueError("report_threshold must be at least threshold (pairs are found up to it)")
        return self


class ExampleCategory(_Strict):
    threshold: float = Field(ge=0, le=2)
    folder: str | None = None

    _folder = field_validator("folder")(_path_field)


class ExampleFiltersStage(_Strict):
    enabled: bool
    model: str
    examples_root: str | None
    categories: dict[str, ExampleCategory]

    _root = field_validator("examples_root")(_path_field)

    @model_validator(mode="after")
    def _has_examples(self) -> ExampleFiltersStage:
        if self.enabled and not self.categories:
            raise ValueError("enabled example filters need at least one category")
        if (
            self.enabled
            and not self.examples_root
            and any(c.folder is None for c in self.categories.values())
        ):
            raise ValueError("set examples_root, or a folder for every category")
        return self


class AestheticStage(_Strict):
    enabled: bool
    model: str
    clip_model: str
    threshold: float = Field(ge=0, le=10)


class QualityStage(_Strict):
    enabled: bool
    dark_threshold: float = Field(ge=0, le=1)
    light_threshold: float = Field(ge=0, le=1)
    low_information_threshold: float = Field(ge=0, le=8)
    blur_threshold: float = Field(ge=0)
    grayscale: bool
    # No longer read: quality scores come from the shard pass, whose decode processes are
    # stages.sanitize.workers. Accepted (and ignored) so that older project files still load.
    workers: int | None = Field(default=None, ge=0, description="ignored: see stages.sanitize.workers")


class ClusterLevel(_Strict):
    n_clusters: int = Field(gt=0)
    n_samples: int = Field(ge=0)


class ClusteringStage(_Strict):
    enabled: bool
    model: str
    levels: tuple[ClusterLevel, ...]
    n_resamples: int = Field(ge=0)
    max_iters: int = Field(gt=0)
    tol: float = Field(ge=0)
    metric: Literal["cosine", "l2"]
    seed: int

    @model_validator(mode="after")
    def _levels(self) -> ClusteringStage:
        if self.enabled and not self.levels:
            raise ValueError("enabled clustering needs at least one level")
        sizes = [level.n_clusters for level in self.levels]
        if any(a <= b for a, b in pairwise(sizes)):
            raise ValueError(f"n_clusters must shrink level by level (got {sizes})")
        return self


class SamplingStage(_Strict):
    enabled: bool
    budget: int | None = Field(gt=0)
    strategy: Literal["random", "closest"]
    multiplier: int = Field(ge=1)
    seed: int
    # with seed sets: the part of the budget given to retrieval_selection (its best first); the
    # balanced sample fills the rest, and whatever retrieval leaves of its part
    retrieval_share: float = Field(default=0.5, ge=0, le=1)

    @model_validator(mode="after")
    def _budget(self) -> SamplingStage:
        if self.enabled and self.budget is None:
            raise ValueError("enabled sampling needs a budget")
        return self


class TrainTestLeaksStage(_Strict):
    enabled: bool
    methods: tuple[Literal["exact", "perceptual", "semantic"], ...]
    max_hamming: int = Field(ge=0, le=32)
    min_similarity: float = Field(ge=0, le=1)
    # No longer read: perceptual hashes come from the shard pass (stages.sanitize.workers).
    workers: int | None = Field(default=None, ge=0, description="ignored: see stages.sanitize.workers")


class LabelIssuesStage(_Strict):
    enabled: bool
    k: int = Field(ge=1, le=1000)
    mislabel_threshold: float = Field(ge=0, le=1)
    outlier_factor: float = Field(gt=0)
    ambiguity_margin: float = Field(ge=0, le=1)


class Stages(_Strict):
    sanitize: SanitizeStage
    exact_dedup: ExactDedupStage
    rotation: RotationStage
    embeddings: EmbeddingsStage
    near_dedup: NearDedupStage
    example_filters: ExampleFiltersStage
    aesthetic: AestheticStage
    quality: QualityStage
    clustering: ClusteringStage
    sampling: SamplingStage
    train_test_leaks: TrainTestLeaksStage
    label_issues: LabelIssuesStage


class ExportConfig(_Strict):
    """How `curated_dataset` writes the curated subset (it never modifies the source)."""

    enabled: bool
    root: str | None  # None: <storage_root>/<name>/curated_dataset/export
    layout: Literal["manifest", "symlink", "hardlink", "copy", "webdataset"]
    jpeg_quality: int = Field(ge=1, le=100)
    shard_max_count: int = Field(gt=0)
    shard_max_mb: float = Field(gt=0)

    _root = field_validator("root")(_path_field)


class ApplyConfig(_Strict):
    """Where the destructive apply job moves removed files and originals of fixed ones."""

    backup_root: str | None
    include_not_sampled: bool  # also move out images removed only because sampling did not pick them

    _backup = field_validator("backup_root")(_path_field)


class ReportConfig(_Strict):
    enabled: bool
    examples_per_section: int = Field(ge=1, le=200)
    thumb_side: int = Field(ge=32, le=512)
    clusters_shown: int = Field(ge=1, le=500)


class LabelsConfig(_Strict):
    """Where an image's class comes from (labeled datasets: leaks, label issues, review, subsets)."""

    source: Literal["none", "layout", "file", "column"]
    file: str | None  # CSV / TSV / parquet with an id-or-path column and a label column
    id_column: str
    label_column: str
    caption_column: str | None

    _file = field_validator("file")(_path_field)

    @model_validator(mode="after")
    def _file_given(self) -> LabelsConfig:
        if self.source == "file" and not self.file:
            raise ValueError("labels.source 'file' needs labels.file")
        return self


class ExternalFlagsConfig(_Strict):
    path: str | None  # another tool's flags export (e.g. Visual Layer), read as review input
    mapping: dict[str, str]  # our field -> their column

    _path = field_validator("path")(_path_field)


class ReviewConfig(_Strict):
    enabled: bool
    decisions_csv: str | None  # the reviewer's exported CSV, placed here, is merged on re-materialize
    confirm_at: float = Field(ge=0, le=1)
    auto_remove: tuple[str, ...]
    auto_relabel: tuple[str, ...]
    thumb_side: int = Field(ge=32, le=512)

    _csv = field_validator("decisions_csv")(_path_field)


class SubsetSpec(_Strict):
    kind: Literal["count", "classes", "trim_tail", "frequency"]
    n: int | None = Field(default=None, gt=0)
    k: int | None = Field(default=None, gt=0)
    classes: tuple[str, ...] | None = None
    ceil: int | None = Field(default=None, gt=0)
    target: str | None = None  # class -> weight/count file (CSV or JSON) for kind frequency
    seed: int = 0
    split: str | None = None  # the split whose images form the pool (None: every split together)

    _target = field_validator("target")(_path_field)

    @model_validator(mode="after")
    def _needs(self) -> SubsetSpec:
        need = {"count": ["n"], "trim_tail": ["k", "ceil"], "frequency": ["n", "target"], "classes": []}
        missing = [f for f in need[self.kind] if getattr(self, f) is None]
        if self.kind == "classes" and self.k is None and not self.classes:
            missing.append("k or classes")
        if missing:
            raise ValueError(f"subset kind {self.kind!r} needs {', '.join(missing)}")
        return self


class CaptionFilterConfig(_Strict):
    enabled: bool
    text_model: str  # an open_clip models entry: its text encoder scores captions vs class definitions
    class_definitions: str | None  # CSV/JSON: class -> definition text
    threshold: float = Field(ge=-1, le=1)

    _defs = field_validator("class_definitions")(_path_field)


class ClassSubsetsConfig(_Strict):
    enabled: bool
    subsets: dict[str, SubsetSpec]
    caption_filter: CaptionFilterConfig


# ----------------------------------------------------------------------------- references


class ReferenceSet(_Strict):
    """A named set of images the pool is compared with: an evaluation set to decontaminate
    against, or a seed set to retrieve the pool's neighbours of."""

    role: Literal["decontaminate", "seed"]
    # a folder tree of images, or of WebDataset .tar shards (read in place, never modified), or
    # (kind vectors) a parquet file of precomputed vectors: columns path, vector; footer curation.model
    path: str
    kind: Literal["directory", "webdataset", "vectors"] = "directory"

    _path = field_validator("path")(_path_field)


class DecontaminationConfig(_Strict):
    # None: stages.near_dedup.threshold, so "a copy" means the same thing in dedup and here
    threshold: float | None = Field(ge=0, lt=2)
    report_margin: float = Field(ge=0, le=2)  # the report shows matches this far past the threshold
    closest_shown: int = Field(ge=0, le=1000)  # closest matches kept either side of the threshold


class RetrievalConfig(_Strict):
    mode: Literal["sample", "cluster"]
    k: int = Field(ge=1, le=10_000)  # sample: nearest pool images per seed image
    min_similarity: float = Field(ge=-1, le=1)  # cosine similarity floor (semantic vectors)
    cluster_max_distance: float = Field(ge=0, le=2)  # cluster: centroid within this cosine distance of a seed
    per_cluster_cap: int = Field(ge=1)  # cluster: at most this many images per cluster (nearest first)
    budget: int | None = Field(gt=0)  # at most this many images (the most similar first); None: all


class ReferencesConfig(_Strict):
    sets: dict[str, ReferenceSet]
    decontamination: DecontaminationConfig
    retrieval: RetrievalConfig

    @field_validator("sets")
    @classmethod
    def _names(cls, sets: dict[str, ReferenceSet]) -> dict[str, ReferenceSet]:
        bad = [name for name in sets if not _NAME_RE.match(name)]
        if bad:
            raise ValueError(f"reference set names {bad} must match {_NAME_RE.pattern} (they name reasons)")
        return sets

    def of_role(self, role: str) -> dict[str, ReferenceSet]:
        return {name: ref for name, ref in self.sets.items() if ref.role == role}


# Which model kinds each stage's model reference accepts.
_EMBEDDING_KINDS = frozenset({"descriptor", "sscd_torchscript", "open_clip", "timm", "torchscript", "onnx"})
_MODEL_REFS: dict[tuple[str, str], frozenset[str]] = {
    ("rotation", "model"): frozenset({"rotation"}),
    ("embeddings", "copy_model"): _EMBEDDING_KINDS,
    ("embeddings", "semantic_model"): _EMBEDDING_KINDS,
    ("near_dedup", "model"): _EMBEDDING_KINDS,
    ("example_filters", "model"): _EMBEDDING_KINDS,
    ("aesthetic", "model"): frozenset({"aesthetic_mlp"}),
    ("aesthetic", "clip_model"): frozenset({"open_clip"}),
    ("clustering", "model"): _EMBEDDING_KINDS,
}


class CacheConfig(_Strict):
    """The local folder where steps stage objects they must read as files (memory-mapped vectors,
    faiss indexes) when the store is on object storage."""

    folder: str
    max_gb: float = Field(gt=0)

    _folder = field_validator("folder")(_path_field)


class ProjectConfig(_Strict):
    name: str
    description: str
    allow_download: bool
    storage_root: str
    storage_options: dict[str, Any]  # extra fsspec options for s3:// / gs:// locations
    cache: CacheConfig
    dataset: DatasetConfig
    discovery: DiscoveryConfig
    runs: RunsConfig
    models: dict[str, ModelEntry]
    stages: Stages
    export: ExportConfig
    apply: ApplyConfig
    report: ReportConfig
    labels: LabelsConfig
    external_flags: ExternalFlagsConfig
    review: ReviewConfig
    class_subsets: ClassSubsetsConfig
    references: ReferencesConfig
    source: str | None = None  # the project file it came from (set by the loader)

    _storage = field_validator("storage_root")(_path_field)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME_RE.match(value):
            raise ValueError(f"name {value!r} must match {_NAME_RE.pattern} (it prefixes asset keys)")
        return value

    @model_validator(mode="after")
    def _references(self) -> ProjectConfig:
        problems = []
        for (stage_name, field), kinds in _MODEL_REFS.items():
            stage = getattr(self.stages, stage_name)
            if not stage.enabled:
                continue
            ref = getattr(stage, field)
            entry = self.models.get(ref)
            if entry is None:
                problems.append(
                    f"stages.{stage_name}.{field}: model {ref!r} is not defined in models "
                    f"(defined: {', '.join(sorted(self.models)) or 'none'})"
                )
            elif entry.kind not in kinds:
                problems.append(
                    f"stages.{stage_name}.{field}: model {ref!r} has kind {entry.kind!r}; "
                    f"allowed kinds: {', '.join(sorted(kinds))}"
                )
        for name, entry in self.models.items():
            if (
                entry.kind == "open_clip"
                and not entry.path
                and not (entry.pretrained and self.allow_download)
            ):
                problems.append(
                    f"models.{name}.path: kind 'open_clip' needs a local checkpoint `path` "
                    "(or `pretrained` together with allow_download: true)"
                )
        near, embeddings = self.stages.near_dedup, self.stages.embeddings
        if near.enabled and not (embeddings.enabled and near.model == embeddings.copy_model):
            problems.append(
                f"stages.near_dedup.model: {near.model!r} must be the model of the copy-detection "
                f"embeddings it searches (stages.embeddings.copy_model: {embeddings.copy_model!r}, "
                f"enabled: {embeddings.enabled})"
            )
        for stage_name in ("example_filters", "clustering"):
            stage = getattr(self.stages, stage_name)
            if stage.enabled and not (embeddings.enabled and stage.model == embeddings.semantic_model):
                problems.append(
                    f"stages.{stage_name}.model: {stage.model!r} must be the model of the semantic "
                    f"embeddings it reads (stages.embeddings.semantic_model: {embeddings.semantic_model!r}, "
                    f"enabled: {embeddings.enabled})"
                )
        problems += self._labeled_problems()
        if self.stages.sampling.enabled and not self.stages.clustering.enabled:
            problems.append("stages.sampling: balanced sampling needs stages.clustering enabled")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @model_validator(mode="after")
    def _reference_sets(self) -> ProjectConfig:
        # decontamination compares copy-detection vectors, retrieval semantic ones: both read the
        # pool's stored embeddings, so the embeddings stage must run
        roles = {ref.role for ref in self.references.sets.values()}
        if roles and not self.stages.embeddings.enabled:
            raise ValueError(
                "references.sets: reference sets are compared with the pool's embeddings; "
                "enable stages.embeddings"
            )
        if (
            "seed" in roles
            and self.references.retrieval.mode == "cluster"
            and not self.stages.clustering.enabled
        ):
            raise ValueError(
                "references.retrieval.mode: cluster takes hierarchical_clusters' level-1 clusters; "
                "enable stages.clustering (or use mode: sample)"
            )
        return self

    def _labeled_problems(self) -> list[str]:
        stages, problems = self.stages, []
        labeled = self.labels.source != "none"
        if stages.label_issues.enabled and not labeled:
            problems.append("stages.label_issues: needs labels (labels.source: layout, file or column)")
        if self.class_subsets.enabled and not labeled:
            problems.append("class_subsets: needs labels (labels.source: layout, file or column)")
        needs_vectors = stages.label_issues.enabled or (
            stages.train_test_leaks.enabled and "semantic" in stages.train_test_leaks.methods
        )
        if needs_vectors and not self.stages.embeddings.enabled:
            problems.append(
                "stages.embeddings: label_issues and semantic leak detection read the semantic embeddings; "
                "enable stages.embeddings"
            )
        if stages.train_test_leaks.enabled and len(self.dataset.roots) < 2:
            problems.append("stages.train_test_leaks: needs two or more splits in dataset.roots")
        for name, spec in self.class_subsets.subsets.items() if self.class_subsets.enabled else ():
            if spec.split is not None and spec.split not in self.dataset.roots:
                problems.append(
                    f"class_subsets.subsets.{name}.split: {spec.split!r} is not a split of dataset.roots "
                    f"({', '.join(sorted(self.dataset.roots))})"
                )
        caption = self.class_subsets.caption_filter
        if self.class_subsets.enabled and caption.enabled:
            entry = self.models.get(caption.text_model)
            if entry is None or entry.kind != "open_clip":
                problems.append(
                    f"class_subsets.caption_filter.text_model: {caption.text_model!r} must be an open_clip "
                    "model entry (its text encoder scores the captions)"
                )
            if not caption.class_definitions or not self.labels.caption_column:
                problems.append(
                    "class_subsets.caption_filter: needs class_definitions and labels.caption_column"
                )
        return problems

    @property
    def project_storage(self) -> Path:
        from curation_assets.core.storage import as_location

        return as_location(self.storage_root, self.storage_options) / self.name


# ----------------------------------------------------------------------------- loading


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Mappings merge key by key; any other value in ``override`` replaces the base value."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


@cache
def _defaults() -> dict[str, Any]:
    return yaml.safe_load(DEFAULTS_FILE.read_text())


def packaged_defaults() -> dict[str, Any]:
    """A copy of the packaged defaults (projects/defaults.yaml) as a dict."""
    return deep_merge({}, _defaults())


def _field_model(model: type[BaseModel], loc: Iterable[Any]) -> type[BaseModel] | None:
    """The model class found by walking ``loc`` (field names and dict keys) from ``model``."""
    current: Any = model
    for part in loc:
        if isinstance(current, type) and issubclass(current, BaseModel):
            field = current.model_fields.get(str(part))
            if field is None:
                return None
            current = field.annotation
            if get_origin(current) in (Union, UnionType):  # X | None: the model member
                current = next((a for a in get_args(current) if a is not type(None)), None)
        else:  # a dict[str, Model] value or a tuple[Model, ...] item
            args = [a for a in get_args(current) if a is not Ellipsis]
            current = args[-1] if args else None
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _format_error(err: Mapping[str, Any]) -> str:
    loc = tuple(part for part in err["loc"] if not str(part).startswith(("function-", "str", "tagged")))
    path = ".".join(str(p) for p in loc)
    if not path:  # a cross-key check: its message names the keys itself
        return err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        parent = _field_model(ProjectConfig, loc[:-1])
        allowed = ", ".join(parent.model_fields) if parent else "?"
        allowed = allowed.replace(", source", "") if parent is ProjectConfig else allowed
        return f"{path}: unknown key; allowed keys: {allowed}"
    message = err["msg"].removeprefix("Value error, ")
    if err["type"] in ("literal_error", "enum"):
        return f"{path}: got {err['input']!r}; allowed values: {message.removeprefix('Input should be ')}"
    if err["type"] == "missing":
        return f"{path}: required key is missing"
    shown = err.get("input")
    if err["type"].endswith(("_type", "_parsing")) or err["type"].startswith(("greater", "less")):
        return f"{path}: {message} (got {shown!r})"
    return f"{path}: {message}"


def load_project_dict(
    data: Mapping[str, Any], *, base_dir: Path | None = None, source: str | None = None
) -> ProjectConfig:
    """Merge ``data`` over the packaged defaults and validate it."""
    if not isinstance(data, Mapping):
        raise ProjectConfigError(f"{source or 'project'}: the file must hold a mapping of keys")
    if "source" in data:
        raise ProjectConfigError(f"{source or 'project'}: source: unknown key")
    merged = deep_merge(_defaults(), data)
    merged["source"] = source
    try:
        return ProjectConfig.model_validate(merged, context={"base_dir": str(base_dir) if base_dir else None})
    except ValidationError as exc:
        lines = "\n".join(f"  - {_format_error(e)}" for e in exc.errors())
        raise ProjectConfigError(f"invalid project file {source or '<dict>'}:\n{lines}") from None


def load_project(path: str | os.PathLike[str]) -> ProjectConfig:
    """Load one project file (YAML)."""
    file = Path(path).expanduser().resolve()
    try:
        data = yaml.safe_load(file.read_text()) or {}
    except OSError as exc:
        raise ProjectConfigError(f"cannot read project file {file}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ProjectConfigError(f"project file {file} is not valid YAML: {exc}") from None
    return load_project_dict(data, base_dir=file.parent, source=str(file))


def packaged_project_files() -> list[Path]:
    return sorted(p for p in PROJECTS_DIR.glob("*.yaml") if p.name != DEFAULTS_FILE.name)


def project_files() -> list[Path]:
    """Packaged project files plus those named by $CURATION_PROJECTS (files or folders)."""
    files = packaged_project_files()
    for entry in filter(None, os.environ.get(PROJECTS_ENV, "").split(os.pathsep)):
        path = Path(entry).expanduser()
        files.extend(sorted(path.glob("*.y*ml")) if path.is_dir() else [path])
    return files


def load_projects(files: Iterable[Path] | None = None) -> list[ProjectConfig]:
    """Load every project; two projects with one name is an error (their assets would collide)."""
    projects = [load_project(f) for f in (project_files() if files is None else files)]
    seen: dict[str, str | None] = {}
    for project in projects:
        if project.name in seen:
            raise ProjectConfigError(
                f"project name {project.name!r} is used by both {seen[project.name]} and {project.source}"
            )
        seen[project.name] = project.source
    return projects


def find_project(name: str) -> ProjectConfig:
    for project in load_projects():
        if project.name == name:
            return project
    names = ", ".join(p.name for p in load_projects())
    raise ProjectConfigError(f"no project named {name!r}; known projects: {names}")
