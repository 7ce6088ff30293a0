"""The model registry: tiny random-weight models of each real family, loaded as users would."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing here may reach a model hub

import torch
from pydantic import ValidationError
from torch import nn
from torch.nn import functional

from curation_assets.config import ModelEntry
from curation_assets.core.embed import models
from curation_assets.core.embed.models import (
    AestheticMLP,
    LoadedModel,
    ModelFileError,
    ModelLoadError,
    check_model_file,
    load_model,
)
from curation_assets.core.embed.preprocess import CLIP_MEAN, IMAGENET_MEAN, IMAGENET_STD

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")  # tests write TorchScript


def entry(**fields) -> ModelEntry:
    return ModelEntry.model_validate(fields)


def images(batch: int, size: int, seed: int = 0) -> torch.Tensor:
    """A normalised-looking float batch, as the embed runner hands to a module."""
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def assert_json_identity(model: LoadedModel) -> None:
    record = json.loads(json.dumps(model.identity))
    assert record["kind"] == model.kind and record["dim"] == model.dim and record["output"] == model.output
    if model.preprocessing is not None:
        assert record["preprocessing"] == model.preprocessing.describe()


# ----------------------------------------------------------------------------- SSCD


class TinySSCD(nn.Module):
    """SSCD's shape: a ResNet trunk (Bottleneck blocks, 2048 channels out), GeM pooling (p=3),
    a 2048 -> 512 projection and L2 normalisation; narrow and one block per stage."""

    def __init__(self) -> None:
        super().__init__()
        from torchvision.models.resnet import Bottleneck, ResNet

        trunk = ResNet(Bottleneck, [1, 1, 1, 1], width_per_group=8)
        self.trunk = nn.Sequential(*list(trunk.children())[:-2])
        self.project = nn.Linear(2048, 512)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.trunk(x).clamp(min=1e-6).pow(3.0).mean(dim=(2, 3)).pow(1.0 / 3.0)
        return functional.normalize(self.project(features), dim=-1)


@pytest.fixture(scope="module")
def sscd_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sscd") / "sscd_disc_mixup.torchscript.pt"
    torch.jit.save(torch.jit.script(TinySSCD().eval()), str(path))
    return path


def test_sscd_torchscript_loads_with_the_authors_preprocessing(sscd_file: Path):
    model = load_model("sscd", entry(kind="sscd_torchscript", path=str(sscd_file)))
    assert (model.dim, model.output, model.normalized, model.encode_text) == (512, "embedding", False, None)
    pre = model.preprocessing
    assert (pre.resize, pre.size, pre.center_crop, pre.interpolation) == (
        "shorter_side",
        288,
        False,
        "bilinear",
    )
    assert (pre.mean, pre.std) == (IMAGENET_MEAN, IMAGENET_STD)
    assert not model.module.training and not any(p.requires_grad for p in model.module.parameters())

    square = load_model("sscd", entry(kind="sscd_torchscript", path=str(sscd_file), resize="square"))
    assert (square.preprocessing.resize, square.preprocessing.size) == ("square", 320)
    sized = entry(
        kind="sscd_torchscript", path=str(sscd_file), resize="square", input_size=256, mean=[0.5] * 3
    )
    custom = load_model("sscd", sized)
    assert (custom.preprocessing.size, custom.preprocessing.mean) == (256, (0.5, 0.5, 0.5))
    assert custom.fingerprint != square.fingerprint  # preprocessing is part of the identity

    batch = images(16, 96)
    with torch.no_grad():
        out = model.module(batch)
        again = model.module(batch)
        singles = torch.cat([model.module(batch[i : i + 1]) for i in range(4)])
    assert out.shape == (16, 512) and out.dtype == torch.float32
    assert torch.equal(out, again)  # deterministic
    torch.testing.assert_close(singles, out[:4], atol=1e-5, rtol=1e-4)  # batch-size independent
    with torch.no_grad():  # shorter_side keeps the aspect: non-square inputs are fine
        assert model.module(torch.randn(2, 3, 96, 144)).shape == (2, 512)


def test_sscd_identity_follows_the_weights_not_the_path(sscd_file: Path, tmp_path: Path):
    model = load_model("sscd", entry(kind="sscd_torchscript", path=str(sscd_file)))
    assert_json_identity(model)
    file = model.identity["file"]
    assert file["path"] == str(sscd_file.resolve()) and file["size"] == sscd_file.stat().st_size
    assert len(file["xxh3_128"]) == 32 and file["mtime_ns"] > 0
    copy = shutil.copy(sscd_file, tmp_path / "elsewhere.pt")
    moved = load_model("copy", entry(kind="sscd_torchscript", path=str(copy)))
    assert moved.fingerprint == model.fingerprint  # same bytes, other place and key
    other = tmp_path / "retrained.pt"
    torch.jit.save(torch.jit.script(TinySSCD().eval()), str(other))
    assert (
        load_model("sscd", entry(kind="sscd_torchscript", path=str(other))).fingerprint != model.fingerprint
    )


def test_a_state_dict_is_not_an_sscd_torchscript_file(tmp_path: Path):
    path = tmp_path / "sscd.pth"
    torch.save(TinySSCD().state_dict(), path)
    with pytest.raises(ModelFileError, match=r"models\.sscd\.path: .*could not be loaded as TorchScript"):
        load_model("sscd", entry(kind="sscd_torchscript", path=str(path)))


# ----------------------------------------------------------------------------- open_clip

TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, nn.Module]:
    """(config JSON, checkpoint, the model) of a tiny CLIP of random weights."""
    import open_clip

    folder = tmp_path_factory.mktemp("clip")
    config = folder / "tiny-clip-config.json"
    config.write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(config)
    model = open_clip.create_model("tiny-clip-config", pretrained=None).eval()
    checkpoint = folder / "open_clip_pytorch_model.bin"
    torch.save(model.state_dict(), checkpoint)
    return config, checkpoint, model


def test_open_clip_from_a_config_json_and_a_local_checkpoint(tiny_clip):
    config, checkpoint, reference = tiny_clip
    model = load_model(
        "clip", entry(kind="open_clip", name="TinyCLIP", path=str(checkpoint), config=str(config))
    )
    assert (model.dim, model.output, model.normalized) == (32, "embedding", True)
    pre = model.preprocessing
    assert (pre.resize, pre.size, pre.center_crop, pre.interpolation) == ("shorter_side", 64, True, "bicubic")
    assert pre.mean == CLIP_MEAN
    batch = images(5, 64)
    with torch.no_grad():
        out = model.module(batch)
        expected = functional.normalize(reference.encode_image(batch), dim=-1)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)  # the file's weights, not a fresh init
    torch.testing.assert_close(out.norm(dim=1), torch.ones(5))
    assert model.identity["config_file"]["size"] == config.stat().st_size
    assert_json_identity(model)

    text = model.encode_text(["a photo of a beetle", "a hand-drawn map"])
    assert text.shape == (2, 32)
    torch.testing.assert_close(text.norm(dim=1), torch.ones(2))


def test_open_clip_wrapped_checkpoint_and_hf_style_config(tiny_clip, tmp_path: Path):
    _, _, reference = tiny_clip
    wrapped = tmp_path / "epoch_3.pt"
    state = {f"module.{k}": v for k, v in reference.state_dict().items()}
    torch.save({"epoch": 3, "state_dict": state}, wrapped)
    hf_config = tmp_path / "open_clip_config.json"
    preprocess = {"mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bilinear", "resize_mode": "squash"}
    hf_config.write_text(json.dumps({"model_cfg": TINY_CLIP, "preprocess_cfg": preprocess}))
    model = load_model("pe", entry(kind="open_clip", name="TinyPE", path=str(wrapped), config=str(hf_config)))
    pre = model.preprocessing
    assert (pre.resize, pre.center_crop, pre.interpolation, pre.mean) == (
        "square",
        False,
        "bilinear",
        (0.5,) * 3,
    )
    batch = images(2, 64)
    with torch.no_grad():
        torch.testing.assert_close(
            model.module(batch), functional.normalize(reference.encode_image(batch), dim=-1)
        )


def test_open_clip_checkpoint_of_another_architecture_fails_clearly(tiny_clip, tmp_path: Path):
    _, checkpoint, _ = tiny_clip
    wider = dict(TINY_CLIP, vision_cfg=dict(TINY_CLIP["vision_cfg"], width=96))
    config = tmp_path / "wider.json"
    config.write_text(json.dumps(wider))
    with pytest.raises(
        ModelLoadError, match=r"models\.clip: the file .* does not fit the open_clip architecture"
    ):
        load_model(
            "clip", entry(kind="open_clip", name="TinyWider", path=str(checkpoint), config=str(config))
        )
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(
        ModelFileError, match=r"models\.clip\.path: the open_clip weights file .* could not be"
    ):
        load_model("clip", entry(kind="open_clip", name="TinyWider", path=str(garbage), config=str(config)))
    with pytest.raises(
        ModelLoadError, match=r"models\.clip\.name: open_clip has no architecture 'NoSuchNet'"
    ):
        load_model("clip", entry(kind="open_clip", name="NoSuchNet", path=str(checkpoint)))


def test_open_clip_torchscript_release_loads_with_quick_gelu(tmp_path: Path):
    """OpenAI's own .pt files are TorchScript archives of QuickGELU models."""
    import open_clip

    config = tmp_path / "tiny-jit.json"
    config.write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(config)
    reference = open_clip.create_model("tiny-jit", pretrained=None, force_quick_gelu=True).eval()
    archive = tmp_path / "ViT-tiny.pt"
    torch.jit.save(torch.jit.script(reference), str(archive))
    model = load_model("clip", entry(kind="open_clip", name="TinyJit", path=str(archive), config=str(config)))
    assert model.identity["quick_gelu"] is True
    batch = images(2, 64)
    with torch.no_grad():
        torch.testing.assert_close(
            model.module(batch), functional.normalize(reference.encode_image(batch), dim=-1)
        )


def test_open_clip_release_tags_give_preprocessing_without_downloading(monkeypatch):
    import open_clip

    monkeypatch.setattr(open_clip.pretrained, "download_pretrained", _no_network)
    pe, quick = models._open_clip_tag_cfg(
        "pe", entry(kind="open_clip", name="PE-Core-L-14-336", path="/x.pt")
    )
    assert pe["mean"] == (0.5, 0.5, 0.5) and pe["resize_mode"] == "squash" and not quick
    openai = entry(kind="open_clip", name="ViT-L-14", path="/x.pt", pretrained="openai")
    assert models._open_clip_tag_cfg("clip", openai)[1] is True  # QuickGELU
    assert models._open_clip_tag_cfg("clip", entry(kind="open_clip", name="ViT-L-14", path="/x.pt")) == (
        {},
        False,
    )
    with pytest.raises(ModelLoadError, match=r"models\.clip\.pretrained: open_clip knows no release 'nope'"):
        models._open_clip_tag_cfg("clip", openai.model_copy(update={"pretrained": "nope"}))


def _no_network(*args, **kwargs):
    raise AssertionError("a download was attempted")


def test_open_clip_pretrained_tag_without_allow_download_is_refused(monkeypatch):
    import open_clip

    monkeypatch.setattr(open_clip, "create_model", _no_network)
    monkeypatch.setattr(open_clip.pretrained, "download_pretrained", _no_network)
    clip = entry(kind="open_clip", name="ViT-B-32", pretrained="openai")
    with pytest.raises(ModelFileError, match=r"models\.clip\.path: .*allow_download: true"):
        check_model_file("clip", clip, allow_download=False)
    with pytest.raises(ModelFileError, match=r"models\.clip\.path: .*ViT-B-32 has no local checkpoint"):
        load_model("clip", clip)
    check_model_file("clip", clip, allow_download=True)  # nothing to check: it would be fetched


# ----------------------------------------------------------------------------- timm


@pytest.fixture(scope="module")
def timm_resnet(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, nn.Module]:
    import timm

    model = timm.create_model("test_resnet", pretrained=False).eval()
    path = tmp_path_factory.mktemp("timm") / "test_resnet.pth"
    torch.save(model.state_dict(), path)
    return path, model


def test_timm_embedding_and_logits_from_a_state_dict(timm_resnet):
    path, reference = timm_resnet
    embedding = load_model("net", entry(kind="timm", name="test_resnet", path=str(path)))
    assert (embedding.dim, embedding.output, embedding.normalized) == (
        reference.num_features,
        "embedding",
        False,
    )
    pre = embedding.preprocessing  # from timm's pretrained_cfg of test_resnet, nothing downloaded
    assert (pre.resize, pre.size, pre.center_crop, pre.interpolation) == (
        "shorter_side",
        160,
        True,
        "bilinear",
    )
    assert (pre.mean, pre.std) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    logits = load_model(
        "net", entry(kind="timm", name="test_resnet", path=str(path), output="logits", input_size=96)
    )
    assert (logits.dim, logits.output, logits.preprocessing.size) == (1000, "logits", 96)
    batch = images(3, 96)
    with torch.no_grad():
        torch.testing.assert_close(logits.module(batch), reference(batch))
        pooled = reference.forward_head(reference.forward_features(batch), pre_logits=True)
        torch.testing.assert_close(embedding.module(batch), pooled)
    assert_json_identity(embedding)


def test_timm_headless_checkpoint_and_bad_names(tmp_path: Path):
    import timm

    vit = timm.create_model("test_vit", pretrained=False, num_classes=0).eval()
    path = tmp_path / "model.pth"
    torch.save(vit.state_dict(), path)
    model = load_model("vit", entry(kind="timm", name="test_vit", path=str(path)))
    assert model.dim == vit.num_features and model.preprocessing.interpolation == "bicubic"
    with pytest.raises(ModelLoadError, match=r"models\.vit: output logits needs classifier weights"):
        load_model("vit", entry(kind="timm", name="test_vit", path=str(path), output="logits"))
    with pytest.raises(ModelLoadError, match=r"models\.vit\.name: timm cannot build 'no_such_net'"):
        load_model("vit", entry(kind="timm", name="no_such_net", path=str(path)))
    with pytest.raises(ModelLoadError, match=r"does not fit the timm architecture 'test_resnet'"):
        load_model("vit", entry(kind="timm", name="test_resnet", path=str(path)))


# ----------------------------------------------------------------------------- torchscript and rotation


class TinyClassifier(nn.Module):
    def __init__(self, classes: int) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        self.fc = nn.Linear(8, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).flatten(1))


def scripted(tmp_path: Path, classes: int, name: str = "net.torchscript.pt") -> Path:
    path = tmp_path / name
    torch.jit.save(torch.jit.script(TinyClassifier(classes).eval()), str(path))
    return path


def test_generic_torchscript_logits(tmp_path: Path):
    path = scripted(tmp_path, 10)
    model = load_model("cls", entry(kind="torchscript", path=str(path), input_size=32, output="logits"))
    assert (model.dim, model.output) == (10, "logits")
    pre = model.preprocessing
    assert (pre.size, pre.resize, pre.center_crop, pre.mean) == (32, "shorter_side", True, IMAGENET_MEAN)
    assert model.module(images(4, 32)).shape == (4, 10)
    with pytest.raises(ValidationError, match="needs `input_size`"):
        entry(kind="torchscript", path=str(path))


def test_rotation_returns_probabilities_and_refuses_other_widths(tmp_path: Path):
    path = scripted(tmp_path, 4, "rotnet.torchscript.pt")
    rotation = entry(kind="rotation", base_kind="torchscript", path=str(path), input_size=32, resize="square")
    model = load_model("rotation", rotation)
    assert (model.dim, model.output, model.identity["classes_degrees"]) == (
        4,
        "probabilities",
        [0, 90, 180, 270],
    )
    assert model.preprocessing.resize == "square"
    with torch.no_grad():
        probabilities = model.module(images(6, 32))
    assert probabilities.shape == (6, 4) and bool((probabilities >= 0).all())
    torch.testing.assert_close(probabilities.sum(dim=1), torch.ones(6))

    five = scripted(tmp_path, 5, "five.torchscript.pt")
    with pytest.raises(
        ModelLoadError, match=r"models\.rotation: a rotation model outputs 4 values .* outputs 5"
    ):
        load_model("rotation", rotation.model_copy(update={"path": str(five)}))


def test_rotation_on_a_timm_classifier(tmp_path: Path):
    import timm

    net = timm.create_model("test_resnet", pretrained=False, num_classes=4).eval()
    path = tmp_path / "rot.pth"
    torch.save(net.state_dict(), path)
    model = load_model(
        "rotation", entry(kind="rotation", base_kind="timm", name="test_resnet", path=str(path))
    )
    batch = images(2, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.module(batch), net(batch).softmax(dim=-1))


# ----------------------------------------------------------------------------- aesthetic


def test_aesthetic_mlp_with_the_laion_layout(tmp_path: Path):
    head = AestheticMLP().eval()
    assert [k for k in head.state_dict() if k.endswith("weight")] == [
        f"layers.{i}.weight" for i in (0, 2, 4, 6, 7)
    ]
    path = tmp_path / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save(head.state_dict(), path)
    model = load_model("aesthetic", entry(kind="aesthetic_mlp", path=str(path)))
    assert (model.dim, model.output, model.preprocessing, model.identity["preprocessing"]) == (
        1,
        "score",
        None,
        None,
    )
    embeddings = torch.randn(5, 768)
    with torch.no_grad():
        scores = model.module(embeddings)
        assert scores.shape == (5, 1)
        torch.testing.assert_close(scores, head.layers(functional.normalize(embeddings, dim=-1)))
        torch.testing.assert_close(model.module(embeddings * 7.0), scores)  # inputs are normalised first

    wrapped = tmp_path / "wrapped.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in head.state_dict().items()}}, wrapped)
    assert load_model("aesthetic", entry(kind="aesthetic_mlp", path=str(wrapped))).dim == 1

    wrong = tmp_path / "wrong.pth"
    torch.save(nn.Sequential(nn.Linear(512, 1024), nn.Linear(1024, 1)).state_dict(), wrong)
    with pytest.raises(
        ModelLoadError, match=r"models\.aesthetic: .* LAION aesthetic-MLP layout .*missing layers\.2"
    ):
        load_model("aesthetic", entry(kind="aesthetic_mlp", path=str(wrong)))


# ----------------------------------------------------------------------------- files and entries


def test_missing_file_names_the_key_and_loads_nothing(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(torch.jit, "load", _no_network)
    missing = tmp_path / "sscd_disc_mixup.torchscript.pt"
    sscd = entry(kind="sscd_torchscript", path=str(missing))
    with pytest.raises(
        ModelFileError, match=r"models\.sscd\.path: the sscd_torchscript weights file"
    ) as caught:
        check_model_file("sscd", sscd, allow_download=False)
    assert str(missing) in str(caught.value) and "does not exist" in str(caught.value)
    assert "official SSCD TorchScript file" in str(caught.value)
    with pytest.raises(ModelFileError, match=r"models\.sscd\.path"):
        load_model("sscd", sscd)
    empty = tmp_path / "empty.pt"
    empty.touch()
    with pytest.raises(ModelFileError, match="is empty"):
        check_model_file("sscd", sscd.model_copy(update={"path": str(empty)}), allow_download=False)
    rotation = entry(kind="rotation", base_kind="torchscript", path=str(missing), input_size=32)
    with pytest.raises(ModelFileError, match=r"models\.rot\.path: the rotation \(base_kind torchscript\)"):
        check_model_file("rot", rotation, allow_download=False)
    clip = entry(kind="open_clip", name="ViT-B-32", path=str(tmp_path), config=str(tmp_path / "none.json"))
    with pytest.raises(ModelFileError, match=r"models\.clip\.config: the open_clip model-config file"):
        check_model_file("clip", clip, allow_download=False)
    check_model_file("descriptor", entry(kind="descriptor"), allow_download=False)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"kind": "timm", "name": "test_resnet"}, "needs `path`"),
        ({"kind": "rotation", "base_kind": "timm", "path": "/r.pth"}, "base_kind 'timm' needs `name`"),
        (
            {"kind": "rotation", "base_kind": "timm", "name": "n", "path": "/r.pth", "num_classes": 5},
            "4 classes",
        ),
        ({"kind": "aesthetic_mlp", "path": "/a.pth", "input_size": 224}, "remove input_size"),
        ({"kind": "descriptor", "mean": [0, 0, 0]}, "is built in"),
        ({"kind": "sscd_torchscript", "path": "/s.pt", "output": "logits"}, "takes output none"),
        (
            {"kind": "sscd_torchscript", "path": "/s.pt", "resize": "square", "center_crop": True},
            "center_crop",
        ),
        (
            {"kind": "timm", "name": "n", "path": "/t.pth", "pretrained": "openai"},
            "`pretrained` is an open_clip",
        ),
        ({"kind": "sscd_torchscript", "path": "/s.pt", "std": [0.2, 0, 0.2]}, "std value must be positive"),
        ({"kind": "descriptor", "base_kind": "timm"}, "`base_kind` is for kind 'rotation' only"),
    ],
)
def test_entry_validation(fields, message):
    with pytest.raises(ValidationError, match=message):
        entry(**fields)


def test_descriptor_kind():
    pytest.importorskip("curation_assets.core.embed.descriptor")
    from curation_assets.core.embed.descriptor import DESCRIPTOR_DIM, descriptor_preprocessing

    model = load_model("descriptor", entry(kind="descriptor"))
    assert (model.dim, model.output, model.normalized, model.identity["file"]) == (
        DESCRIPTOR_DIM,
        "embedding",
        True,
        None,
    )
    assert model.preprocessing == descriptor_preprocessing()
    size = model.preprocessing.size
    with torch.no_grad():
        out = model.module(torch.rand(3, 3, size, size))
    torch.testing.assert_close(out.norm(dim=1), torch.ones(3))
