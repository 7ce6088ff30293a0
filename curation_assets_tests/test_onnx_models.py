"""The onnx model kind: tiny graphs built here with onnx.helper, loaded and run as users would."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from curation_assets.config import ModelEntry, ProjectConfigError, load_project_dict
from curation_assets.core.embed.embed import ComputeSettings, embed_images
from curation_assets.core.embed.models import (
    LoadedModel,
    ModelFileError,
    ModelLoadError,
    check_model_file,
    load_model,
)
from curation_assets.core.embed.preprocess import IMAGENET_MEAN, IMAGENET_STD
from curation_assets.core.ingest.images import ImageRef, load_rgb
from curation_assets_tests.conftest import write_photo

# opset 17 keeps ReduceMean's axes an attribute; IR 8 is what every onnxruntime >= 1.17 reads.
OPSET = 17
IR_VERSION = 8
# Mixed aspect ratios: the shorter-side rule gives several shapes, so several shape buckets.
SIZES = [(160, 120), (120, 160), (200, 100), (160, 120), (90, 90)]


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _weights(rows: int, cols: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)


W_UINT8 = _weights(3, 8, 1)
B_UINT8 = _weights(1, 8, 2)[0]
W_FLOAT = _weights(3, 6, 3)
W_LOGITS = _weights(3, 5, 4)
W_EMBED = _weights(3, 7, 5)
FLOAT_SIDE = 32


def uint8_graph(path: Path) -> Path:
    """uint8 N x H x W x 3 (any H, W) -> Cast -> mean over H, W -> MatMul + bias: 8-d."""
    nodes = [
        helper.make_node("Cast", ["pixels"], ["as_float"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMean", ["as_float"], ["channel_mean"], axes=[1, 2], keepdims=0),
        helper.make_node("MatMul", ["channel_mean", "w"], ["projected"]),
        helper.make_node("Add", ["projected", "b"], ["embedding"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_uint8",
        [helper.make_tensor_value_info("pixels", TensorProto.UINT8, ["n", "h", "w", 3])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["n", 8])],
        initializer=[numpy_helper.from_array(W_UINT8, "w"), numpy_helper.from_array(B_UINT8, "b")],
    )
    return _save(graph, path)


def float_graph(path: Path) -> Path:
    """float N x 3 x 32 x 32 -> GlobalAveragePool -> Flatten -> MatMul: 6-d."""
    nodes = [
        helper.make_node("GlobalAveragePool", ["x"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "w"], ["embedding"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_float",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, FLOAT_SIDE, FLOAT_SIDE])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["n", 6])],
        initializer=[numpy_helper.from_array(W_FLOAT, "w")],
    )
    return _save(graph, path)


def two_output_graph(path: Path) -> Path:
    """float N x 3 x H x W (any size) -> pooled -> 5-d ``logits`` first, then a unit-norm 7-d
    ``embedding`` (the graph normalises it itself: LpNormalization)."""
    nodes = [
        helper.make_node("GlobalAveragePool", ["x"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "w_logits"], ["logits"]),
        helper.make_node("MatMul", ["flat", "w_embed"], ["raw_embedding"]),
        helper.make_node("LpNormalization", ["raw_embedding"], ["embedding"], axis=-1, p=2),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_two_outputs",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, "h", "w"])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 5]),
            helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["n", 7]),
        ],
        initializer=[
            numpy_helper.from_array(W_LOGITS, "w_logits"),
            numpy_helper.from_array(W_EMBED, "w_embed"),
        ],
    )
    return _save(graph, path)


def entry(**fields: object) -> ModelEntry:
    return ModelEntry.model_validate({"kind": "onnx", **fields})


def settings(threads: int = 0) -> ComputeSettings:
    return ComputeSettings(
        device=torch.device("cpu"),
        autocast=None,
        batch_size=4,
        min_batch_size=1,
        num_workers=0,
        channels_last=False,
        compile=False,
        threads=threads,
    )


@pytest.fixture(scope="module")
def refs(tmp_path_factory: pytest.TempPathFactory) -> list[ImageRef]:
    # PNG: lossless and no JPEG draft decoding, so the reference below sees the very same pixels.
    folder = tmp_path_factory.mktemp("images")
    out = []
    for i, (w, h) in enumerate(SIZES):
        path = write_photo(folder / f"{i:02d}.png", 10 + i, size=(w, h))
        out.append(ImageRef(f"s/{i:02d}.png", str(path), None, None, w, h))
    return out


def run(model: LoadedModel, refs: list[ImageRef], threads: int = 0) -> np.ndarray:
    result = embed_images(
        model.module, model.preprocessing, model.dim, refs, settings(threads), dtype=np.float32
    )
    assert result.errors == [] and result.image_ids == [r.image_id for r in refs]
    return result.vectors


def pixels(model: LoadedModel, ref: ImageRef) -> np.ndarray:
    """The model input of one image as the decode workers make it: uint8 3 x H x W."""
    image = load_rgb(Path(ref.source_path).read_bytes())
    return model.preprocessing.to_tensor(image).numpy()


def unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=-1, keepdims=True)


def normalised(chw: np.ndarray) -> np.ndarray:
    mean = np.asarray(IMAGENET_MEAN, dtype=np.float64).reshape(3, 1, 1)
    std = np.asarray(IMAGENET_STD, dtype=np.float64).reshape(3, 1, 1)
    return (chw.astype(np.float64) / 255.0 - mean) / std


def test_nhwc_uint8_graph_gets_raw_pixels_of_any_shape(tmp_path: Path, refs: list[ImageRef]):
    path = uint8_graph(tmp_path / "tiny_uint8.onnx")
    model = load_model("copy", entry(path=str(path), input_layout="nhwc_uint8", input_size=48))
    assert (model.kind, model.dim, model.output, model.normalized) == ("onnx", 8, "embedding", True)
    pre = model.preprocessing
    assert (pre.resize, pre.size, pre.center_crop) == ("shorter_side", 48, False)
    shapes = {pixels(model, ref).shape for ref in refs}
    assert len(shapes) >= 3  # several shape buckets, each its own batch

    vectors = run(model, refs)
    expected = np.stack(
        [pixels(model, ref).astype(np.float64).mean(axis=(1, 2)) @ W_UINT8 + B_UINT8 for ref in refs]
    )
    np.testing.assert_allclose(vectors, unit(expected), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_nhwc_uint8_defaults_to_a_bounded_shorter_side(tmp_path: Path):
    model = load_model("copy", entry(path=str(uint8_graph(tmp_path / "u.onnx")), input_layout="nhwc_uint8"))
    pre = model.preprocessing
    assert (pre.resize, pre.size, pre.center_crop) == ("shorter_side", 512, False)


def test_nchw_float_graph_matches_numpy_and_records_the_file_hash(tmp_path: Path, refs: list[ImageRef]):
    path = float_graph(tmp_path / "tiny_float.onnx")
    model = load_model("sscd", entry(path=str(path), input_layout="nchw_float"))
    assert model.dim == 6 and model.normalized
    pre = model.preprocessing
    # A fixed 32 x 32 graph: shorter side to 32, then the centre square, ImageNet mean/std.
    assert (pre.resize, pre.size, pre.center_crop, pre.mean) == (
        "shorter_side",
        FLOAT_SIDE,
        True,
        IMAGENET_MEAN,
    )

    vectors = run(model, refs, threads=1)
    # The run's compute settings reach the session: its intra-op pool has the resource's threads.
    assert model.module.session.get_session_options().intra_op_num_threads == 1
    expected = np.stack([normalised(pixels(model, ref)).mean(axis=(1, 2)) @ W_FLOAT for ref in refs])
    np.testing.assert_allclose(vectors, unit(expected), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)

    record = model.identity
    assert record["file"]["xxh3_128"] and record["file"]["size"] == path.stat().st_size
    assert record["input_layout"] == "nchw_float" and record["graph_output"] == "embedding"
    # Another graph in a file of the same name is another model: the hash decides, not the path.
    before = model.fingerprint
    two_output_graph(path)
    changed = load_model("sscd", entry(path=str(path), input_layout="nchw_float", input_size=32))
    assert changed.fingerprint != before


def test_square_resize_on_a_fixed_graph(tmp_path: Path, refs: list[ImageRef]):
    path = float_graph(tmp_path / "tiny_float.onnx")
    model = load_model("sscd", entry(path=str(path), input_layout="nchw_float", resize="square"))
    assert (model.preprocessing.resize, model.preprocessing.size) == ("square", FLOAT_SIDE)
    assert run(model, refs).shape == (len(refs), 6)
    with pytest.raises(ModelLoadError, match=r"models\.sscd\.input_size: .* takes 32x32 inputs, not 64"):
        load_model("sscd", entry(path=str(path), input_layout="nchw_float", input_size=64))
    with pytest.raises(ModelLoadError, match=r"models\.sscd: .* use resize: square or center_crop: true"):
        load_model("sscd", entry(path=str(path), input_layout="nchw_float", center_crop=False))


def test_output_picks_one_of_several_outputs(tmp_path: Path, refs: list[ImageRef]):
    path = two_output_graph(tmp_path / "two.onnx")
    first = load_model("m", entry(path=str(path), input_layout="nchw_float", input_size=40))
    assert first.dim == 5 and first.identity["graph_output"] == "logits"

    model = load_model(
        "m",
        entry(path=str(path), input_layout="nchw_float", input_size=40, output="embedding", normalized=True),
    )
    assert model.dim == 7 and model.identity["normalized_by_graph"] is True
    assert model.preprocessing.center_crop is False  # any-size graph: shorter side only, shapes bucketed
    vectors = run(model, refs)
    expected = np.stack([normalised(pixels(model, ref)).mean(axis=(1, 2)) @ W_EMBED for ref in refs])
    np.testing.assert_allclose(vectors, unit(expected), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)

    with pytest.raises(
        ModelLoadError, match=r"models\.m\.output: .* no output 'features' \(outputs: logits, embedding\)"
    ):
        load_model("m", entry(path=str(path), input_layout="nchw_float", input_size=40, output="features"))


def test_any_size_float_graph_needs_input_size(tmp_path: Path):
    path = two_output_graph(tmp_path / "two.onnx")
    with pytest.raises(ModelLoadError, match=r"models\.m\.input_size: .* takes any image size"):
        load_model("m", entry(path=str(path), input_layout="nchw_float"))


def test_layout_that_does_not_fit_the_graph_names_the_key(tmp_path: Path):
    path = float_graph(tmp_path / "tiny_float.onnx")
    with pytest.raises(ModelLoadError, match=r"models\.m\.input_layout: nhwc_uint8 .* tensor\(float\)"):
        load_model("m", entry(path=str(path), input_layout="nhwc_uint8"))


def test_missing_and_corrupt_files_fail_before_any_image_is_read(tmp_path: Path):
    missing = tmp_path / "sscd_disc_mixup.onnx"
    bad = entry(path=str(missing), input_layout="nchw_float")
    # check_model_file is the cheap check a run makes before reading images; load_model repeats it.
    with pytest.raises(ModelFileError, match=r"models\.sscd\.path: .*sscd_disc_mixup\.onnx does not exist"):
        check_model_file("sscd", bad, allow_download=False)
    with pytest.raises(ModelFileError, match=r"models\.sscd\.path: .*sscd_disc_mixup\.onnx does not exist"):
        load_model("sscd", bad)

    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"this is not an onnx protobuf\x00\xff" * 8)
    with pytest.raises(
        ModelFileError, match=r"models\.sscd\.path: .*corrupt\.onnx could not be loaded as an ONNX model"
    ):
        load_model("sscd", entry(path=str(corrupt), input_layout="nchw_float"))


def _project(model: dict[str, object]) -> None:
    load_project_dict(
        {"name": "p", "dataset": {"roots": "/data"}, "models": {"copy": model}}, source="broken.yaml"
    )


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        (
            {"kind": "onnx", "path": "/m.onnx", "input_layout": "nchw"},
            "models.copy.input_layout: got 'nchw'; allowed values: 'nhwc_uint8' or 'nchw_float'",
        ),
        ({"kind": "onnx", "input_layout": "nchw_float"}, "models.copy: kind 'onnx' needs `path`"),
        ({"kind": "onnx", "path": "/m.onnx"}, "models.copy: kind 'onnx' needs `input_layout`"),
        (
            {"kind": "onnx", "path": "/m.onnx", "input_layout": "nhwc_uint8", "mean": [0.5, 0.5, 0.5]},
            "models.copy: input_layout 'nhwc_uint8' feeds raw uint8 pixels (the graph normalises)",
        ),
        (
            {"kind": "onnx", "path": "/m.onnx", "input_layout": "nchw_float", "normalized": "maybe"},
            "models.copy.normalized",
        ),
        (
            {"kind": "sscd_torchscript", "path": "/m.pt", "input_layout": "nchw_float"},
            "models.copy: input_layout: for kind 'onnx' only",
        ),
        (
            {"kind": "timm", "name": "resnet18", "path": "/m.pth", "output": "features"},
            "models.copy: kind 'timm' takes output 'embedding' or 'logits' (got 'features')",
        ),
    ],
)
def test_config_validation_names_the_key(model: dict[str, object], expected: str):
    with pytest.raises(ProjectConfigError) as info:
        _project(model)
    assert expected in str(info.value)


def test_config_accepts_an_sscd_export_entry():
    _project(
        {
            "kind": "onnx",
            "path": "/models/sscd_disc_mixup.onnx",
            "input_layout": "nchw_float",
            "input_size": 288,
            "resize": "shorter_side",
            "output": "embeddings",
            "normalized": False,
        }
    )


# ------------------------------------------------------------------------------ rotation and aesthetic heads

ROT_SIDE = 16


def _bright_top(side: int) -> np.ndarray:
    """side x side template: +1 on the upper half, -1 on the lower half."""
    template = np.ones((side, side), dtype=np.float32)
    template[side // 2 :] = -1.0
    return template


def rotation_graph(path: Path) -> Path:
    """float N x 3 x 16 x 16 -> Flatten -> MatMul: 4 logits, class k scoring how well the image
    matches a bright-top pattern turned k quarter turns clockwise (a toy upright detector)."""
    templates = [np.rot90(_bright_top(ROT_SIDE), -k) for k in range(4)]  # -k: clockwise
    weights = np.stack([np.broadcast_to(t, (3, ROT_SIDE, ROT_SIDE)).reshape(-1) for t in templates], 1)
    nodes = [
        helper.make_node("Flatten", ["x"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "w"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_rotation",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, ROT_SIDE, ROT_SIDE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 4])],
        initializer=[numpy_helper.from_array((weights * 0.05).astype(np.float32), "w")],
    )
    return _save(graph, path)


W_AESTHETIC = _weights(768, 1, 6)


def aesthetic_graph(path: Path, width: int = 768) -> Path:
    """float N x width -> MatMul + 5: one score per row (a stand-in for the LAION head's export)."""
    nodes = [
        helper.make_node("MatMul", ["embedding", "w"], ["projected"]),
        helper.make_node("Add", ["projected", "five"], ["score"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_aesthetic",
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["n", width])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["n", 1])],
        initializer=[
            numpy_helper.from_array(_weights(width, 1, 6), "w"),
            numpy_helper.from_array(np.array([5.0], dtype=np.float32), "five"),
        ],
    )
    return _save(graph, path)


def test_rotation_through_an_onnx_base_reads_the_orientation(tmp_path: Path):
    path = rotation_graph(tmp_path / "rotation.onnx")
    rotation = ModelEntry.model_validate(
        {"kind": "rotation", "base_kind": "onnx", "path": str(path), "input_layout": "nchw_float"}
    )
    model = load_model("rotation", rotation)
    assert (model.kind, model.dim, model.output) == ("rotation", 4, "probabilities")
    assert model.identity["file"]["xxh3_128"] and model.identity["base_kind"] == "onnx"
    # an upright image (bright sky, dark ground) and its three clockwise quarter turns, as files
    upright = np.where(np.arange(64)[:, None, None] < 32, 230, 25).astype(np.uint8).repeat(64, 1).repeat(3, 2)
    image = Image.fromarray(upright)
    turns = [image, *(image.transpose(t) for t in (Image.Transpose.ROTATE_270, Image.Transpose.ROTATE_180))]
    turns.append(image.transpose(Image.Transpose.ROTATE_90))
    refs = []
    for k, turned in enumerate(turns):
        turned.save(tmp_path / f"turn{k}.png")
        refs.append(ImageRef(f"s/turn{k}.png", str(tmp_path / f"turn{k}.png"), None, None, 64, 64))
    probabilities = run(model, refs)
    np.testing.assert_allclose(probabilities.sum(1), 1.0, atol=1e-5)
    assert probabilities.argmax(1).tolist() == [0, 1, 2, 3]  # the quarter turn each image has
    assert probabilities.max(1).min() > 0.9


def test_rotation_with_onnx_base_config_names_the_key():
    with pytest.raises(ProjectConfigError, match=r"models\.copy: base_kind 'onnx' needs `input_layout`"):
        _project({"kind": "rotation", "base_kind": "onnx", "path": "/r.onnx"})
    with pytest.raises(ProjectConfigError, match=r"models\.copy: normalized: a rotation model"):
        _project(
            {
                "kind": "rotation",
                "base_kind": "onnx",
                "path": "/r.onnx",
                "input_layout": "nchw_float",
                "normalized": True,
            }
        )


def test_aesthetic_head_may_be_an_onnx_graph(tmp_path: Path):
    path = aesthetic_graph(tmp_path / "aesthetic.onnx")
    model = load_model("aesthetic", ModelEntry.model_validate({"kind": "aesthetic_mlp", "path": str(path)}))
    assert (model.dim, model.output, model.preprocessing) == (1, "score", None)
    assert model.identity["file"]["size"] == path.stat().st_size
    embeddings = np.random.default_rng(0).standard_normal((5, 768)).astype(np.float32) * 3.0
    with torch.no_grad():
        scores = model.module(torch.from_numpy(embeddings)).numpy()
    # the head sees unit-norm embeddings, as the LAION head was trained on
    np.testing.assert_allclose(scores, unit(embeddings.astype(np.float64)) @ W_AESTHETIC + 5.0, rtol=1e-4)

    wrong = aesthetic_graph(tmp_path / "clip_b32_head.onnx", width=512)
    with pytest.raises(
        ModelLoadError, match=r"models\.aesthetic\.path: an ONNX aesthetic head takes one B x 768"
    ):
        load_model("aesthetic", ModelEntry.model_validate({"kind": "aesthetic_mlp", "path": str(wrong)}))


def test_an_onnx_export_can_be_the_copy_model_of_near_dedup():
    project = load_project_dict(
        {
            "name": "p",
            "dataset": {"roots": "/data"},
            "models": {
                "sscd": {
                    "kind": "onnx",
                    "path": "/m/sscd.onnx",
                    "input_layout": "nchw_float",
                    "input_size": 288,
                }
            },
            "stages": {
                "embeddings": {"enabled": True, "copy_model": "sscd", "semantic_model": "descriptor_content"},
                "near_dedup": {"enabled": True, "model": "sscd"},
            },
        },
        source="p.yaml",
    )
    assert project.stages.near_dedup.model == "sscd"
