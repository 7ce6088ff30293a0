"""Embedding throughput against the decode floor, on ~1 MP RGB JPEGs (CPU; GPU when present).

    python benchmarks/embed.py [--images N] [--workers W] [--sscd-images M] [--device auto|cpu|cuda]
        [--no-onnx]

Generates N distinct 1200x850 JPEGs (the sanitize benchmark's generator), then times
with the same decode workers:

- ``bare_decode``: a process pool running ``Image.open(path).load()`` (full decode);
- ``decode_only``: the embedding pipeline's DataLoader (draft decode, EXIF/mode
  normalisation, resize) feeding a model that does nothing: the floor of every model;
- ``descriptor``: the built-in weight-free descriptor end to end;
- ``sscd_resnet50``: a ResNet-50 + GeM + 512-d projection (SSCD's shape, random weights)
  saved as TorchScript and loaded through the real ``sscd_torchscript`` loader, SSCD's
  shorter-side-288 preprocessing; on CUDA with bf16 autocast when a GPU is present;
- ``onnx_fp32`` / ``onnx_int8``: the same network (same random weights) exported with
  ``torch.onnx.export`` (any batch and image size) and run through the real ``onnx`` loader
  (``input_layout: nchw_float``, the same shorter-side-288 preprocessing, the graph's own L2
  normalisation), first as exported (float32), then quantised with
  ``onnxruntime.quantization.quantize_dynamic`` (int8 weights, activations quantised at
  run time: how copy detectors are often served on CPU). The same images as the TorchScript
  path, and the same number of intra-op threads as torch uses. The CUDA provider needs
  onnxruntime-gpu; with the CPU package the graphs run on the CPU, also on a GPU machine.

Each rate comes with its ratio to ``decode_only`` measured in the same run (for the SSCD-shaped
models: to the decode-only rate of their preprocessing), and the ONNX rates also with their
ratio to the TorchScript rate. Prints one
JSON object to stdout; logs go to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the package and the sibling benchmark importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.path.insert(0, str(Path(__file__).resolve().parent))


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main() -> dict:
    import torch
    import torchvision
    from PIL import Image
    from sanitize import floor_run, generate  # the sibling sanitize benchmark

    from curation_assets.config import ModelEntry
    from curation_assets.core.embed.embed import ComputeSettings, embed_images, resolve_device
    from curation_assets.core.embed.models import load_model
    from curation_assets.core.ingest.decode import ImageRef

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--sscd-images", type=int, default=48, help="fewer on CPU: ResNet-50 is slow there")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-onnx", action="store_true", help="skip the ONNX Runtime path")
    args = parser.parse_args()
    device = resolve_device(args.device)
    on_gpu = device.type == "cuda"

    class GeM(torch.nn.Module):
        def __init__(self, p: float = 3.0):
            super().__init__()
            self.p = p

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.clamp(min=1e-6).pow(self.p).mean(dim=(2, 3)).pow(1.0 / self.p)

    class SSCDShaped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            trunk = torchvision.models.resnet50(weights=None)
            self.trunk = torch.nn.Sequential(*list(trunk.children())[:-2])
            self.pool = GeM()
            self.project = torch.nn.Linear(2048, 512)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.normalize(self.project(self.pool(self.trunk(x))), dim=1)

    class Nothing(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x[:, :1, 0, 0]

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        log(f"generating {args.images} JPEGs ...")
        paths = generate(folder, args.images)
        for path in paths:  # warm the page cache
            path.read_bytes()
        with Image.open(paths[0]) as im:
            width, height = im.size
        refs = [ImageRef(p.name, str(p), None, None, width, height) for p in paths]
        sscd_file = folder / "sscd_shaped.torchscript.pt"
        torch.jit.script(SSCDShaped().eval()).save(str(sscd_file))

        settings = ComputeSettings(
            device=device,
            autocast=torch.bfloat16 if on_gpu else None,
            batch_size=args.batch_size,
            min_batch_size=1,
            num_workers=args.workers,
            channels_last=on_gpu,
            compile=False,
        )
        from curation_assets.config import load_project_dict

        rules = load_project_dict({"name": "b", "dataset": {"roots": tmp}}).stages.sanitize.model_copy(
            update={"workers": args.workers}
        )
        floor_run([str(p) for p in paths], rules)  # warm the pool
        bare_s = min(floor_run([str(p) for p in paths], rules) for _ in range(3))

        descriptor = load_model("descriptor", ModelEntry(kind="descriptor"), device=device)
        sscd = load_model("sscd", ModelEntry(kind="sscd_torchscript", path=str(sscd_file)), device=device)

        def rate(module, preprocessing, dim, subset, run_settings=settings) -> float:
            embed_images(module, preprocessing, dim, subset[: args.batch_size], run_settings)  # warm-up
            result = embed_images(module, preprocessing, dim, subset, run_settings)
            assert not result.errors, result.errors[:3]
            return len(subset) / result.seconds

        sscd_refs = refs if on_gpu else refs[: args.sscd_images]
        decode_only = rate(Nothing(), descriptor.preprocessing, 1, refs)
        # The floor of each preprocessing over every file (a short run would time worker start-up).
        decode_only_sscd = rate(Nothing(), sscd.preprocessing, 1, refs)
        descriptor_rate = rate(descriptor.module, descriptor.preprocessing, descriptor.dim, refs)
        sscd_rate = rate(sscd.module, sscd.preprocessing, sscd.dim, sscd_refs)
        onnx_figures = {} if args.no_onnx else onnx_rates(folder, sscd, settings, rate, sscd_refs)

    figures = {
        "images": args.images,
        "megapixels_per_image": round(width * height / 1e6, 2),
        "workers": args.workers,
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "bare_decode_images_per_s": round(len(paths) / bare_s, 1),
        "decode_only_images_per_s": round(decode_only, 1),
        "descriptor_images_per_s": round(descriptor_rate, 1),
        "descriptor_ratio_to_decode_only": round(descriptor_rate / decode_only, 3),
        "sscd_resnet50_images": len(sscd_refs),
        "sscd_preprocessing": sscd.preprocessing.summary(),
        "sscd_decode_only_images_per_s": round(decode_only_sscd, 1),
        "sscd_resnet50_images_per_s": round(sscd_rate, 1),
        "sscd_ratio_to_decode_only": round(sscd_rate / decode_only_sscd, 3),
    }
    for name, onnx_rate in onnx_figures.items():
        figures[f"{name}_images_per_s"] = round(onnx_rate, 1)
        figures[f"{name}_ratio_to_decode_only"] = round(onnx_rate / decode_only_sscd, 3)
        figures[f"{name}_ratio_to_torchscript"] = round(onnx_rate / sscd_rate, 3)
    if on_gpu:
        figures["gpu"] = torch.cuda.get_device_name(device)
        figures["sscd_target_images_per_s"] = 1500
        figures["meets_decode_bound_target"] = figures["sscd_ratio_to_decode_only"] >= 0.8
    print(json.dumps(figures))
    return figures


def onnx_rates(folder: Path, sscd, settings, rate, refs) -> dict[str, float]:
    """Images/s of the SSCD-shaped network as ONNX, float32 and dynamic int8, through the onnx loader."""
    import dataclasses
    import warnings

    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from curation_assets.config import ModelEntry
    from curation_assets.core.embed.models import load_model

    fp32 = folder / "sscd_shaped.onnx"
    int8 = folder / "sscd_shaped.int8.onnx"
    # The TorchScript file's module is the same network with the same weights: export that.
    network = torch.jit.load(str(folder / "sscd_shaped.torchscript.pt"), map_location="cpu").eval()
    with warnings.catch_warnings():  # the TorchScript-based exporter is deprecated but takes dynamic_axes
        warnings.simplefilter("ignore")
        torch.onnx.export(
            network,
            (torch.randn(1, 3, 288, 352),),
            str(fp32),
            input_names=["image"],
            output_names=["embedding"],
            dynamic_axes={"image": {0: "n", 2: "h", 3: "w"}, "embedding": {0: "n"}},
            opset_version=17,
            dynamo=False,
        )
    quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8)
    log(f"onnx: fp32 {fp32.stat().st_size / 1e6:.0f} MB, dynamic int8 {int8.stat().st_size / 1e6:.0f} MB")
    # as many intra-op threads as torch uses, so the comparison is between runtimes, not thread counts
    onnx_settings = dataclasses.replace(settings, threads=torch.get_num_threads())
    out = {}
    for name, path in (("onnx_fp32", fp32), ("onnx_int8", int8)):
        entry = ModelEntry(
            kind="onnx",
            path=str(path),
            input_layout="nchw_float",
            input_size=sscd.preprocessing.size,
            resize="shorter_side",
            normalized=True,
        )
        model = load_model(name, entry, device=settings.device)
        assert model.preprocessing == sscd.preprocessing, (model.preprocessing, sscd.preprocessing)
        out[name] = rate(model.module, model.preprocessing, model.dim, refs, onnx_settings)
    return out


if __name__ == "__main__":
    started = time.perf_counter()
    main()
    log(f"done in {time.perf_counter() - started:.1f} s")
