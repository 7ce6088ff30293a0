"""The HTML curation report: sections with real numbers, linked files that open, no crash on bad images."""

from __future__ import annotations

import base64
import html
import io
import re
import shutil
import tarfile
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image

from curation_assets.core.outputs.report import (
    ClusterSection,
    ContaminationMatch,
    DecontaminationSection,
    DuplicateGroupExample,
    FilterSection,
    FunnelStep,
    ImageLoc,
    NearPair,
    ReferenceSetCount,
    ReportData,
    RotationExample,
    render_report,
    select_threshold_examples,
    steps_from_funnel,
)
from curation_assets_tests.conftest import make_project, write_photo
from curation_assets_tests.test_review import browser  # noqa: F401  (the headless Chromium fixture)

HEADINGS = ["Funnel", "Near duplicates", "Filters", "Rotation", "Clusters"]


class _Links(HTMLParser):
    """Image links, placeholders and h2 headings of the page, by section id."""

    def __init__(self) -> None:
        super().__init__()
        self.section = ""
        self.images: list[tuple[str, str]] = []  # (section, src)
        self.alts: list[tuple[str, str, str]] = []  # (section, alt, src): which image a thumbnail shows
        self.placeholders: list[tuple[str, str]] = []  # (section, title)
        self.headings: list[str] = []
        self._in_h2 = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attr = dict(attrs)
        if tag == "section":
            self.section = attr.get("id") or ""
        elif tag == "img":
            self.images.append((self.section, attr["src"] or ""))
            self.alts.append((self.section, attr.get("alt") or "", attr["src"] or ""))
        elif tag == "div" and attr.get("class") == "placeholder":
            self.placeholders.append((self.section, attr.get("title") or ""))
        elif tag == "h2":
            self._in_h2 = True

    def handle_endtag(self, tag: str) -> None:
        if tag == "h2":
            self._in_h2 = False

    def handle_data(self, data: str) -> None:
        if self._in_h2:
            self.headings.append(data.strip())


def _parse(path: Path) -> _Links:
    parser = _Links()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


def _image(out: Path, src: str) -> Image.Image:
    """The picture an ``<img src>`` shows: an embedded data URI, or a file relative to the page."""
    if src.startswith("data:"):
        return Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
    return Image.open(out / src)


def _text(path: Path) -> str:
    """The page as a reader sees it (entities decoded), for number checks."""
    return html.unescape(path.read_text(encoding="utf-8"))


@pytest.fixture()
def images(tmp_path: Path) -> list[ImageLoc]:
    """Ten small landscape JPEGs (160x120)."""
    return [
        ImageLoc(f"shard0/img_{i:02d}.jpg", str(write_photo(tmp_path / "src" / f"img_{i:02d}.jpg", i)))
        for i in range(10)
    ]


def _full_data(images: list[ImageLoc], rng: np.random.Generator) -> ReportData:
    funnel = steps_from_funnel(
        [
            ("images in", 5_908_775),
            ("after sanitize", 5_851_002),
            ("after exact duplicates", 5_700_113),
            ("after near duplicates", 4_993_874),
            ("after sampling", 3_000_000),
        ]
    )
    aesthetic = rng.normal(5.0, 1.0, size=500)
    aesthetic[:3] = np.nan  # unscored images must not break the statistics
    ids = list(range(500))
    below, above = select_threshold_examples(ids, aesthetic, 4.5, n=3)
    pick = {i: images[k % len(images)] for k, (i, _) in enumerate(below + above)}
    return ReportData(
        project="demo",
        funnel=funnel,
        near_dup_distances=rng.uniform(0.0, 0.3, size=400),
        near_dup_threshold=0.08,
        duplicate_groups=[
            DuplicateGroupExample(images[0], [(images[1], 0.0123), (images[2], 0.0456)]),
            DuplicateGroupExample(images[3], [(images[4], 0.0789)]),
        ],
        filters=[
            FilterSection(
                name="aesthetic",
                values=aesthetic,
                threshold=4.5,
                removes="below",
                below=[(pick[i], v) for i, v in below],
                above=[(pick[i], v) for i, v in above],
            ),
            FilterSection(
                name="maps and charts",
                values=rng.uniform(0.0, 1.0, size=300),
                threshold=0.9,
                removes="above",
                above=[(images[5], 0.9311)],
            ),
        ],
        rotations=[RotationExample(images[6], 90, 0.9871)],
        clusters=ClusterSection(
            samples_per_cluster={0: 25, 1: 25, 2: 7},
            sizes={0: 310, 1: 120, 2: 7},
            examples={0: images[:3], 1: images[3:6], 2: [images[7]]},
        ),
        notes={"clusters": "two-level hierarchical k-means", "rotation": "model rot4, tol 0.9"},
    )


def test_every_section_shows_the_numbers_it_was_given(tmp_path: Path, images: list[ImageLoc]) -> None:
    data = _full_data(images, np.random.default_rng(0))
    calls: list[tuple[int, int]] = []
    files = render_report(data, tmp_path / "report", progress=lambda done, total: calls.append((done, total)))
    page = _parse(files.html)
    text = _text(files.html)

    assert [h for h in page.headings if h in HEADINGS] == HEADINGS
    assert files.sections == HEADINGS and files.stages_off == []
    # The funnel the way the walkthroughs tell it, and the per-stage removals.
    assert "5,908,775 → 5,851,002 → 5,700,113 → 4,993,874 → 3,000,000" in text
    assert "1,993,874" in text  # removed by sampling
    assert "50.8%" in text  # 3,000,000 of 5,908,775 kept
    # Near duplicates: pair count, pairs under the threshold, member distances.
    under = int((data.near_dup_distances < 0.08).sum())
    assert "400 candidate pairs" in text and f"{under} pairs under it" in text
    assert "threshold 0.08" in text
    for distance in ("0.012", "0.046", "0.079"):  # three decimals, never an exponent
        assert f"d = {distance}<" in files.html.read_text()
    # Filters: removed counts computed from the scores, the scores of the edge images.
    aesthetic = data.filters[0].values
    removed = int((aesthetic[np.isfinite(aesthetic)] < 4.5).sum())
    assert "497 images scored" in text and "3 without a score" in text
    assert f"would remove {removed} of all 497 scored" in text
    maps = data.filters[1].values
    assert f"would remove {int((maps > 0.9).sum())} of all 300" in text
    printed = [float(x) for x in re.findall(r"score (-?[0-9.]+(?:e[-+]?[0-9]+)?)", text)]
    for _, score in data.filters[0].below + data.filters[0].above:
        assert any(abs(p - score) <= 1e-3 * abs(score) for p in printed)
    assert "score 0.9311" in text
    # Rotation and clusters.
    assert "p = 0.987" in text and "turned back 90°" in text
    assert "3 clusters" in text and "57 images sampled" in text and "437 images clustered" in text
    assert "cluster 0: 310 images, 25 sampled" in text and "1 cluster taken whole" in text
    # Notes land in their sections.
    assert "two-level hierarchical k-means" in text and "model rot4, tol 0.9" in text
    # Progress counts every distinct thumbnail once, ending at the total.
    assert calls[0][0] == 0 and calls[-1][0] == calls[-1][1] == files.thumbnails


def test_every_image_is_embedded_and_opens(tmp_path: Path, images: list[ImageLoc]) -> None:
    out = tmp_path / "report"
    files = render_report(_full_data(images, np.random.default_rng(1)), out, thumb_side=64)
    page = _parse(files.html)
    sources = [src for _, src in page.images]
    plots = [src for src in sources if src.startswith("data:image/png;")]
    thumbs = [src for src in sources if src.startswith("data:image/jpeg;")]

    assert len(plots) + len(thumbs) == len(sources)  # nothing linked: the file alone is the report
    assert files.linked_images == 0 and files.embedded_bytes == sum(len(s.split(",", 1)[1]) for s in sources)
    assert set(files.plots) == {
        "funnel",
        "near_duplicates",
        "filter:aesthetic",
        "filter:maps and charts",
        "clusters",
    }
    assert len(plots) == len(files.plots)
    for key, path in files.plots.items():  # the files beside the page are the same plots
        assert path.is_file(), key
    assert len(set(thumbs)) == files.thumbnails == len(list((out / "thumbs").glob("*.jpg")))
    for src in sources:
        with _image(out, src) as im:
            im.load()
    for src in thumbs:
        with _image(out, src) as im:
            assert max(im.size) <= 64 and im.format == "JPEG"
    # Each section shows the images of its own examples.
    by_section = {section for section, src in page.images if src.startswith("data:image/jpeg;")}
    assert by_section == {"near_duplicates", "filters", "rotation", "clusters"}
    text = _text(files.html)
    assert "thumbnails at most 64px (cap 256px), JPEG quality 85" in text


def test_images_past_the_embedding_budget_are_linked_and_said_so(
    tmp_path: Path, images: list[ImageLoc]
) -> None:
    out = tmp_path / "report"
    files = render_report(
        _full_data(images, np.random.default_rng(1)), out, thumb_side=64, embed_budget_bytes=60_000
    )
    page = _parse(files.html)
    linked = [src for _, src in page.images if not src.startswith("data:")]
    assert linked and files.linked_images == len(linked) and files.embedded_bytes <= 60_000
    for src in linked:  # a fallback link still opens next to the page
        assert src.startswith(("plots/", "thumbs/"))
        with _image(out, src) as im:
            im.load()
    assert f"{len(linked)} images past the budget are linked" in _text(files.html)


def test_histogram_tails_are_clipped_on_the_far_side_of_the_threshold() -> None:
    from curation_assets.core.outputs.report import clip_tails

    values = np.concatenate([np.linspace(0.0, 2.0, 1000), [50.0, 900.0]])  # a blur score's long tail
    drawn, note = clip_tails(values, threshold=0.5)
    assert drawn.max() < 3 and "6 above" in note and "percentile" in note and "below" not in note
    assert ((drawn < 0.5) == (values < 0.5)).all()  # nothing changes side of the threshold
    same, none = clip_tails(np.linspace(0.0, 1.0, 10), threshold=0.5)
    assert none == "" and (same == np.linspace(0.0, 1.0, 10)).all()


def test_unreadable_images_become_placeholders(tmp_path: Path, images: list[ImageLoc]) -> None:
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    missing = ImageLoc("shard0/missing.jpg", str(tmp_path / "nope.jpg"))
    broken = ImageLoc("shard0/corrupt.jpg", str(corrupt))
    past_end = ImageLoc("shard1/member.jpg", str(images[0].source_path), offset=10**6, size_bytes=500)
    data = ReportData(
        project="p",
        funnel=[FunnelStep("sanitize", 10, 3, 7)],
        duplicate_groups=[DuplicateGroupExample(images[0], [(missing, 0.01), (broken, 0.02)])],
        clusters=ClusterSection(np.array([2, 1]), examples={0: [past_end, images[1]], 1: [images[2]]}),
    )
    files = render_report(data, tmp_path / "report")
    page = _parse(files.html)

    titles = {title.split(":")[0]: title for _, title in page.placeholders}
    assert set(titles) == {"shard0/missing.jpg", "shard0/corrupt.jpg", "shard1/member.jpg"}
    assert "FileNotFoundError" in titles["shard0/missing.jpg"]
    assert "cannot" in titles["shard0/corrupt.jpg"] and "short read" in titles["shard1/member.jpg"]
    assert {image_id for image_id, _ in files.broken_thumbnails} == set(titles)
    assert files.thumbnails == 3  # the readable ones still render
    assert "3 example images could not be read" in _text(files.html)


def test_rotation_before_after_and_exif_are_shown_upright(tmp_path: Path, images: list[ImageLoc]) -> None:
    # A landscape picture stored sideways through EXIF: viewers (and the report) show it portrait.
    exif_path = tmp_path / "exif.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.open(images[0].source_path).save(exif_path, exif=exif)
    # A 160x120 tar member whose pixels are turned 90° clockwise.
    tar_path = tmp_path / "shard.tar"
    with tarfile.open(tar_path, "w") as tar:
        tar.add(images[1].source_path, arcname="inner/turned.jpg")
    with tarfile.open(tar_path) as tar:
        member = tar.getmember("inner/turned.jpg")
    in_tar = ImageLoc("shard.tar/inner/turned.jpg", str(tar_path), member.offset_data, member.size)
    data = ReportData(
        project="p",
        funnel=[FunnelStep("sanitize", 2, 0, 2)],
        rotations=[RotationExample(in_tar, 90, 0.99)],
        clusters=ClusterSection({0: 2}, examples={0: [ImageLoc("exif", str(exif_path)), images[2]]}),
    )
    out = tmp_path / "report"
    files = render_report(data, out, thumb_side=80)
    page = _parse(files.html)

    rotation = [src for section, src in page.images if section == "rotation"]
    sizes = [_image(out, src).size for src in rotation]
    assert sizes == [(80, 60), (60, 80)]  # before: stored landscape; after: corrected portrait
    clusters = [
        src for section, src in page.images if section == "clusters" and src.startswith("data:image/jpeg")
    ]
    assert [_image(out, src).size for src in clusters] == [(60, 80), (80, 60)]


def test_stages_that_are_off_say_so(tmp_path: Path) -> None:
    data = ReportData(project="tol10m", funnel=[FunnelStep("sanitize", 1_000, 12, 988)])
    files = render_report(data, tmp_path / "report")
    text = _text(files.html)

    assert files.sections == ["Funnel"]
    assert files.stages_off == ["Near duplicates", "Filters", "Rotation", "Clusters"]
    for title in files.stages_off:
        assert f"{title}: off in this project." in text
    assert set(files.plots) == {"funnel"} and files.thumbnails == 0
    assert "1,000 → 988" in text
    # An empty rotation list is a stage that ran and found nothing, not a stage that is off.
    data.rotations = []
    files = render_report(data, tmp_path / "report2")
    assert "Rotation" in files.sections and "No rotated images found." in _text(files.html)


def test_a_score_just_under_the_threshold_does_not_print_as_the_threshold(
    tmp_path: Path, images: list[ImageLoc]
) -> None:
    section = FilterSection(
        "aesthetic",
        np.array([4.49996, 4.5]),
        4.5,
        "below",
        below=[(images[0], 4.49996)],
        above=[(images[1], 4.5)],
    )
    files = render_report(
        ReportData("p", [FunnelStep("aesthetic", 2, 1, 1)], filters=[section]), tmp_path / "r"
    )
    text = _text(files.html)
    assert "filter: removes</span>score 4.49996" in text and "filter: keeps</span>score 4.5<" in text


def test_text_is_escaped(tmp_path: Path, images: list[ImageLoc]) -> None:
    evil = "<script>alert(1)</script>"
    loc = ImageLoc(f"shard0/{evil}.jpg", images[0].source_path)
    data = ReportData(
        project=evil,
        funnel=[FunnelStep(evil, 5, 1, 4)],
        filters=[FilterSection(evil, np.array([0.1, 0.9]), 0.5, "below", below=[(loc, 0.1)])],
        notes={evil: evil},
    )
    files = render_report(data, tmp_path / "report")
    raw = files.html.read_text(encoding="utf-8")
    assert "<script>" not in raw and "&lt;script&gt;" in raw


def test_select_threshold_examples_takes_the_nearest_on_each_side() -> None:
    rng = np.random.default_rng(3)
    values = rng.uniform(0.0, 10.0, size=2_000)
    values[::97] = np.nan
    ids = [f"img{i}" for i in range(len(values))]
    below, above = select_threshold_examples(ids, values, 6.0, n=5)

    finite = values[np.isfinite(values)]
    assert [v for _, v in below] == sorted(finite[finite < 6.0])[-5:]
    assert [v for _, v in above] == sorted(finite[finite >= 6.0])[:5]
    assert all(values[int(i[3:])] == v for i, v in below + above)  # ids stay aligned with scores
    # Fewer candidates than asked for: all of them, nothing invented.
    small_below, small_above = select_threshold_examples(["a", "b", "c"], np.array([1.0, 2.0, 3.0]), 2.0, n=8)
    assert small_below == [("a", 1.0)] and small_above == [("b", 2.0), ("c", 3.0)]
    with pytest.raises(ValueError, match="differ in length"):
        select_threshold_examples(["a"], np.array([1.0, 2.0]), 1.5)


def test_bad_input_gets_a_clear_error() -> None:
    with pytest.raises(ValueError, match="removes must be one of"):
        FilterSection("aesthetic", np.zeros(3), 0.5, "sideways")
    with pytest.raises(ValueError, match="kept"):
        FunnelStep("sanitize", 10, 3, 8)
    with pytest.raises(ValueError, match="at least one step"):
        ReportData(project="p", funnel=[])
    with pytest.raises(ValueError, match="rotate must be one of"):
        ImageLoc("a", "a.jpg", rotate=45)


def test_a_copy_of_report_html_alone_shows_every_image_in_chromium(
    browser,  # noqa: F811
    tmp_path: Path,
    images: list[ImageLoc],
) -> None:
    """The README calls the report self-contained: the file alone, copied anywhere, shows its images."""
    files = render_report(_full_data(images, np.random.default_rng(2)), tmp_path / "report", thumb_side=64)
    alone = tmp_path / "elsewhere" / "report.html"
    alone.parent.mkdir()
    shutil.copy2(files.html, alone)  # no plots/ or thumbs/ beside it
    context = browser.new_context(viewport={"width": 1300, "height": 900})
    try:
        page = context.new_page()
        page.goto(alone.as_uri())
        # "load" waits for every image the page fetches; a lazy link off screen stays at width 0,
        # which counts as broken here too: nothing may need the folder the page was copied from
        page.wait_for_load_state("load")
        total = page.evaluate("document.images.length")
        broken = page.evaluate(
            "Array.from(document.images).filter(i => i.naturalWidth === 0)"
            ".map(i => i.alt || i.src.slice(0, 60))"
        )
    finally:
        context.close()
    assert total >= len(files.plots) + 10  # plots and thumbnails, not a vacuous page
    assert broken == []


def test_near_pairs_either_side_of_the_threshold_and_final_badges(
    tmp_path: Path, images: list[ImageLoc]
) -> None:
    """A user moving the threshold sees the pairs it would change; a filter's "keeps" is not the
    image's fate, which gets its own badge."""
    removed_later = ImageLoc(images[0].image_id, images[0].source_path, final="remove")
    kept = ImageLoc(images[1].image_id, images[1].source_path, final="keep")
    data = ReportData(
        project="p",
        funnel=[FunnelStep("near duplicates", 10, 1, 9)],
        near_dup_distances=np.array([0.02, 0.09, 0.11, 0.15]),
        near_dup_threshold=0.1,
        near_pairs_below=[NearPair(kept, removed_later, 0.09)],
        near_pairs_above=[NearPair(kept, images[2], 0.11), NearPair(images[3], images[4], 0.15)],
        filters=[
            FilterSection("aesthetic", np.array([4.0, 6.0]), 5.0, "below", above=[(removed_later, 6.0)])
        ],
    )
    files = render_report(data, tmp_path / "report", thumb_side=48)
    page = files.html.read_text()
    text = _text(files.html)
    assert "Pairs either side of the threshold 0.100" in text
    assert "Just under it: grouped, one of each group kept (1)" in text
    assert "At or just above it: not grouped, both kept by this stage (2)" in text
    assert "d = 0.090<" in page and "d = 0.110<" in page and "d = 0.150<" in page
    # the filter keeps this image, but another stage removes it: both are said, apart
    filters = page[page.index('id="filters"') :]
    assert (
        '<span class="badge kept">filter: keeps</span><span class="badge final removed">final: removed</span>'
        in (filters)
    )
    assert '<span class="badge final kept">final: kept</span>' in page


def _section_html(page: str, key: str) -> str:
    start = page.index(f'<section id="{key}"')
    return page[start : page.index("</section>", start)]


def test_decontamination_shows_each_match_beside_its_evaluation_image(tmp_path: Path) -> None:
    """A project with evaluation sets (a folder and WebDataset tars) and planted copies: the report
    counts the pool images removed per set and shows each copy's thumbnail beside the evaluation
    image it matched; the same store reported for a project without references has no such section."""
    import dagster as dg

    from curation_assets.assets.outputs.decisions import decisions_path
    from curation_assets.assets.outputs.report import build_report_data
    from curation_assets.definitions import build_definitions
    from curation_assets.resources.store import StoreResource
    from curation_assets.runner import materialize_project

    pool, folder, tars = tmp_path / "pool", tmp_path / "eval", tmp_path / "eval_wds"
    for shard, seed in (("a", 1), ("b", 2)):
        for i in range(5):
            write_photo(pool / shard / f"img_{i}.jpg", seed * 1000 + i)
    for i in range(3):
        write_photo(folder / "cls" / f"val_{i}.jpg", 9000 + i)
        write_photo(tmp_path / "members" / f"w_{i}.jpg", 9500 + i)
    (tars / "part").mkdir(parents=True)
    with tarfile.open(tars / "part" / "000.tar", "w") as archive:
        for i in range(3):
            archive.add(tmp_path / "members" / f"w_{i}.jpg", arcname=f"w_{i}.jpg")
    shutil.copy(folder / "cls" / "val_0.jpg", pool / "a" / "copy_of_val_0.jpg")
    shutil.copy(tmp_path / "members" / "w_1.jpg", pool / "b" / "copy_of_w_1.jpg")
    stages = {
        "embeddings": {"enabled": True, "copy_model": "descriptor", "semantic_model": "descriptor_content"},
        "near_dedup": {"enabled": True, "model": "descriptor", "threshold": 0.1},
    }
    sets = {
        "eval": {"role": "decontaminate", "path": str(folder)},
        "eval_tars": {"role": "decontaminate", "path": str(tars), "kind": "webdataset"},
    }
    project = make_project(tmp_path, {"train": str(pool)}, stages=stages, references={"sets": sets})
    summary = materialize_project(
        project, build_definitions([project]), dg.DagsterInstance.ephemeral(), echo=lambda _: None
    )
    assert summary.failed == []
    store = StoreResource().for_project(project)
    out = store.asset_dir("curation_report")
    html_path = out / "report.html"
    page = html_path.read_text(encoding="utf-8")
    parsed = _parse(html_path)
    assert "Decontamination" in parsed.headings and '<a href="#decontamination">' in page
    section = html.unescape(_section_html(page, "decontamination"))
    # per set: its kind, its images, the pool images removed as near-copies of them
    assert "<tr><td>eval</td><td>directory</td><td>3</td><td>1</td></tr>" in section
    assert "<tr><td>eval_tars</td><td>webdataset</td><td>3</td><td>1</td></tr>" in section
    assert "At or under it: removed (2)" in section
    shown = {alt: src for key, alt, src in parsed.alts if key == "decontamination"}
    for copy, original, source in (
        ("a/copy_of_val_0.jpg", "cls/val_0.jpg", folder / "cls" / "val_0.jpg"),
        ("b/copy_of_w_1.jpg", "part/000.tar/w_1.jpg", tmp_path / "members" / "w_1.jpg"),
    ):
        # the pool image and the evaluation image (a tar member read in place) side by side
        pair = re.search(
            rf'<div class="pair">(?:(?!</div><div class="pair">).)*alt="{re.escape(copy)}"'
            rf'(?:(?!<div class="pair">).)*alt="{re.escape(original)}"',
            section,
            re.S,
        )
        assert pair is not None, (copy, original)
        with Image.open(source) as im:
            expected = np.asarray(im.convert("RGB").resize((64, 48)), dtype=np.float32)
        for name in (copy, original):
            with _image(out, shown[name]) as im:
                thumb = np.asarray(im.convert("RGB").resize((64, 48)), dtype=np.float32)
            assert np.abs(thumb - expected).mean() < 8, name  # the copy and its original, both shown
    assert "d = 0.000" in section and "eval image" in section and "eval_tars image" in section

    # the same store, reported for a project that names no evaluation set: no section at all
    plain = make_project(tmp_path, {"train": str(pool)}, stages=stages)
    data = build_report_data(plain, store, pl.read_parquet(decisions_path(store)))
    assert data.decontamination is None
    files = render_report(data, tmp_path / "plain_report")
    plain_page = files.html.read_text(encoding="utf-8")
    assert "Decontamination" not in files.sections and "Decontamination" not in files.stages_off
    assert 'id="decontamination"' not in plain_page and "#decontamination" not in plain_page


def test_a_reference_set_of_vectors_shows_the_matched_name(tmp_path: Path, images: list[ImageLoc]) -> None:
    """A set given as vectors has no image: the match shows the pool image and the reference's name."""
    match = ContaminationMatch(images[0], "imagenet_val", "val/n01/ILSVRC_0007.JPEG", None, 0.031)
    data = ReportData(
        project="p",
        funnel=[FunnelStep("decontamination", 10, 1, 9)],
        decontamination=DecontaminationSection(
            0.1, [ReferenceSetCount("imagenet_val", "vectors", 1)], below=[match]
        ),
    )
    files = render_report(data, tmp_path / "report", thumb_side=48)
    section = html.unescape(_section_html(files.html.read_text(encoding="utf-8"), "decontamination"))
    assert "<tr><td>imagenet_val</td><td>vectors</td><td>–</td><td>1</td></tr>" in section
    assert ">vectors only</div>" in section and "ILSVRC_0007.JPEG" in section and "d = 0.031" in section
    assert "Just past it: kept by this stage (0)" in section
    assert files.sections == ["Funnel", "Decontamination"] and files.broken_thumbnails == []
