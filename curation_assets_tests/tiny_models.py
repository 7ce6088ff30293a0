"""Tiny models of the real families, written as the files a project's `models` entries name.

Random weights from explicit seeds, except where a test needs known outputs: a rotation
network that returns fixed probabilities, and an aesthetic head whose last layer is set so
that its scores of given embeddings spread over a chosen range (a random head scores the
nearly identical embeddings of a random CLIP all alike, so no threshold would cut them).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional

from curation_assets.core.embed.models import AESTHETIC_INPUT_DIM, AestheticMLP

# open_clip ViT shape, shrunk; embed_dim stays 768 because the LAION aesthetic head reads
# CLIP ViT-L/14 embeddings of that width.
TINY_CLIP_L14 = {
    "embed_dim": AESTHETIC_INPUT_DIM,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
}


def write_tiny_clip(folder: Path, seed: int = 0) -> tuple[Path, Path]:
    """(model-config JSON, state-dict checkpoint) of a random-weight open_clip model of TINY_CLIP_L14."""
    import open_clip

    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "tiny-clip-l14.json"
    config.write_text(json.dumps(TINY_CLIP_L14))
    with torch.random.fork_rng():  # the seed must not leak into the caller's global RNG
        torch.manual_seed(seed)
        # built from the config directly: registering it would change open_clip's global model list
        model = open_clip.CLIP(**TINY_CLIP_L14).eval()
    checkpoint = folder / "open_clip_pytorch_model.bin"
    torch.save(model.state_dict(), checkpoint)
    return config, checkpoint


class TinyRotationNet(nn.Module):
    """A 4-way classifier (conv, pool, linear): logits of 0/90/180/270 degrees."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).flatten(1))


class FixedProbabilities(nn.Module):
    """Ignores the pixels: every image gets the same four class probabilities."""

    def __init__(self, probabilities: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("probabilities", torch.tensor(list(probabilities), dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.probabilities.unsqueeze(0).expand(x.shape[0], -1).clone()


def write_torchscript(module: nn.Module, path: Path) -> Path:
    """``module`` scripted and saved with torch.jit.save (what a `torchscript` base_kind loads)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # newer torch flags TorchScript as deprecated; the loader reads it
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(module.eval()), str(path))
    return path


def write_rotation_net(path: Path, seed: int = 0) -> Path:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = TinyRotationNet()
    return write_torchscript(net, path)


def spread_aesthetic_head(embeddings: np.ndarray, low: float, high: float, seed: int = 0) -> AestheticMLP:
    """A LAION-layout head: random layers, with the last one set so that the scores of
    ``embeddings`` run from exactly ``low`` (the lowest) to ``high`` (the highest).

    The head has no activations, so its last layer is a linear read-out of a 16-d affine
    image of the input; it reads the direction along which the embeddings vary most.
    """
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        head = AestheticMLP().eval()
    with torch.no_grad():
        x = functional.normalize(torch.as_tensor(np.asarray(embeddings, dtype=np.float32)), dim=-1)
        hidden = head.layers[:-1](x).double()
        _, _, vt = torch.linalg.svd(hidden - hidden.mean(dim=0), full_matrices=False)
        z = hidden @ vt[0]
        scale = (high - low) / float(z.max() - z.min())
        head.layers[-1].weight.copy_((vt[0] * scale).float().unsqueeze(0))
        head.layers[-1].bias.fill_(low - scale * float(z.min()))
    return head
