"""The one-decode shard pass (core/shard_pass.py): what it gives each stage is what that stage
computes from the same picture on its own, bad files get their sanitize rows, and a pass run
for one output alone gives that output unchanged."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from curation_assets.config import ModelEntry, SanitizeStage, load_project_dict
from curation_assets.core.embed.embed import BatchRunner, ComputeSettings
from curation_assets.core.embed.models import load_model
from curation_assets.core.filters.quality import score_image
from curation_assets.core.ingest.images import load_rgb
from curation_assets.core.ingest.sanitize import check_image, plain_rules
from curation_assets.core.labeled.phash import hash_row
from curation_assets.core.shard_pass import PassItem, PassModel, PassPlan, model_input, run_pass, working_copy
from curation_assets_tests.conftest import write_photo

PER_IMAGE = (("quality", score_image), ("phash", hash_row))


def _rules() -> SanitizeStage:
    return load_project_dict({"name": "x", "dataset": {"roots": "/tmp"}}).stages.sanitize


def _settings(batch_size: int = 3) -> ComputeSettings:
    return ComputeSettings(
        device=torch.device("cpu"),
        autocast=None,
        batch_size=batch_size,
        min_batch_size=1,
        num_workers=0,
        channels_last=False,
        compile=False,
    )


def _files(tmp_path: Path) -> list[Path]:
    sizes = [(320, 240), (240, 320), (640, 480), (200, 200), (500, 300), (300, 500), (1024, 768)]
    files = [write_photo(tmp_path / f"photo_{i}.jpg", i, size=size) for i, size in enumerate(sizes)]
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(files[2].read_bytes()[:4000])
    text = tmp_path / "notes.jpg"
    text.write_bytes(b"this is not a picture at all\n" * 20)
    return [*files, truncated, text]


def _items(files: list[Path]) -> list[PassItem]:
    return [PassItem(f"s/{f.name}", str(f), None, f.stat().st_size, f.name) for f in files]


def test_one_pass_gives_each_stage_what_it_computes_alone(tmp_path: Path):
    files = _files(tmp_path)
    rules = _rules()
    copy = load_model("copy", ModelEntry(kind="descriptor"))
    content = load_model("content", ModelEntry(kind="descriptor", variant="content"))
    models = [
        PassModel(name, m.module, m.preprocessing, m.dim, "float32")
        for name, m in (("copy", copy), ("content", content))
    ]
    plan = PassPlan(plain_rules(rules), PER_IMAGE, tuple(dict.fromkeys(m.preprocessing for m in models)))
    out = run_pass(_items(files), plan, models, _settings(), workers=2, chunk_size=2)

    for index, path in enumerate(files):
        data = path.read_bytes()
        image_id = f"s/{path.name}"
        assert out.sanitize[index] == check_image(data, path.name, rules), path.name
        kept = out.sanitize[index]["status"] != "rejected"
        if not kept:
            assert out.rows["quality"][index] is None and out.rows["phash"][index] is None
            assert not any(o.done[index] for o in out.models.values())
            continue
        work = working_copy(load_rgb(data))
        assert out.rows["quality"][index] == score_image(image_id, work)
        assert out.rows["phash"][index] == hash_row(image_id, work)
        for model, loaded in zip(models, (copy, content), strict=True):
            # the model alone on this one image, resized from the full decode as the pass does
            pixels = model_input(load_rgb(data), loaded.preprocessing)
            alone = BatchRunner(loaded.module, loaded.preprocessing, _settings())(pixels[None])[0].numpy()
            assert out.models[model.name].done[index]
            np.testing.assert_allclose(out.models[model.name].vectors[index], alone, atol=1e-5)

    reasons = {Path(f).name: row["reasons"] for f, row in zip(files, out.sanitize, strict=True)}
    assert "truncated" in reasons["truncated.jpg"]
    assert reasons["notes.jpg"] and out.sanitize[-1]["status"] == "rejected"


def test_a_pass_for_one_output_alone_gives_the_same_output(tmp_path: Path):
    """Re-running one stage (sanitize current) decodes the kept images the same way: same rows."""
    files = _files(tmp_path)[:7]
    copy = load_model("copy", ModelEntry(kind="descriptor"))
    model = PassModel("copy", copy.module, copy.preprocessing, copy.dim)
    full = run_pass(
        _items(files),
        PassPlan(plain_rules(_rules()), PER_IMAGE, (copy.preprocessing,)),
        [model],
        _settings(),
        workers=2,
    )
    alone = run_pass(_items(files), PassPlan(None, PER_IMAGE[:1]), workers=1)
    assert alone.rows["quality"] == full.rows["quality"]
    assert all(row is None for row in alone.sanitize)
    vectors_alone = run_pass(_items(files), PassPlan(None, (), (copy.preprocessing,)), [model], _settings(7))
    np.testing.assert_allclose(vectors_alone.models["copy"].vectors, full.models["copy"].vectors, atol=1e-3)
    assert vectors_alone.models["copy"].done.all()


def test_without_sanitize_an_unreadable_kept_file_gets_an_error_not_a_crash(tmp_path: Path):
    files = _files(tmp_path)[:2]
    items = [*_items(files), PassItem("s/gone.jpg", str(tmp_path / "gone.jpg"), None, 10, "gone.jpg")]
    copy = load_model("copy", ModelEntry(kind="descriptor"))
    out = run_pass(
        items,
        PassPlan(None, PER_IMAGE, (copy.preprocessing,)),
        [PassModel("copy", copy.module, copy.preprocessing, copy.dim)],
        _settings(),
        workers=2,
        chunk_size=1,
    )
    assert out.errors[:2] == [None, None] and "gone.jpg" in (out.errors[2] or "")
    assert out.models["copy"].done.tolist() == [True, True, False]
    assert out.rows["quality"][2] is None
