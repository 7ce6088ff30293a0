"""The review manifest, human decisions, and the static review page driven in headless Chromium."""

from __future__ import annotations

import csv
import os
import shutil
import tarfile
from pathlib import Path

import polars as pl
import pytest

from curation_assets.core.labeled.review import (
    MANIFEST_SCHEMA,
    TAGS,
    build_review_manifest,
    machine_tag,
    merge_human_decisions,
    write_review_page,
)
from curation_assets_tests.conftest import write_photo

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
NASTY_ID = 'train.x/e</script><script>window.__pwned=2</script>"&.jpg'
NASTY_LABEL = '<img src=x onerror="window.__pwned=1">'
FLAG_COLUMNS = ["image_id", "source", "flag", "detail", "confidence", "suggested_label"]


def make_images(tmp_path: Path) -> pl.DataFrame:
    """Six plain files, one tar member and one unreadable file; ids sort in the listed order."""
    root = tmp_path / "data"
    rows = []
    for i, (stem, label) in enumerate(
        [("a", "cat"), ("b", "dog"), ("c", "dog"), ("d", "owl"), ("e", NASTY_LABEL), ("f", "cat")]
    ):
        path = write_photo(root / f"{stem}.jpg", seed=i, size=(200, 120))
        image_id = NASTY_ID if stem == "e" else f"train.x/{stem}.jpg"
        rows.append((image_id, "train", label, str(path), None, None))
    write_photo(tmp_path / "member.png", seed=99, size=(90, 300))
    tar_path = root / "shard.tar"
    with tarfile.open(tar_path, "w") as tar:
        tar.add(tmp_path / "member.png", arcname="g.png")
    with tarfile.open(tar_path) as tar:
        info = tar.getmember("g.png")
        rows.append(("test.shard/g.png", "test", "cat", str(tar_path), info.offset_data, info.size))
    broken = root / "h.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    rows.append(("train.x/h.jpg", "train", "dog", str(broken), None, None))
    return pl.DataFrame(
        rows, schema=["image_id", "split", "label", "source_path", "offset", "size_bytes"], orient="row"
    )


def make_flags() -> pl.DataFrame:
    rows = [
        ("train.x/a.jpg", "duplicate", "exact", "same bytes as train.x/f.jpg", None, None),
        ("train.x/b.jpg", "label", "mislabel", "7/10 neighbours disagree", 0.6, "cat"),
        ("train.x/b.jpg", "external", "Mislabels", None, 0.95, "owl"),
        ("train.x/c.jpg", "label", "outlier", None, 0.8, None),
        ("train.x/d.jpg", "quality", "blurry", None, None, None),
        (NASTY_ID, "label", "ambiguous", "cat vs dog", 0.5, "dog"),
        ("train.x/f.jpg", "duplicate", "near", None, None, None),
        ("test.shard/g.png", "leak", "perceptual", "hamming 3 to train.x/a.jpg", None, None),
        ("train.x/h.jpg", "quality", "corrupt", "truncated", None, None),
    ]
    return pl.DataFrame(rows, schema=FLAG_COLUMNS, orient="row")


@pytest.mark.parametrize(
    ("source", "flag", "confidence", "tag"),
    [
        ("leak", "exact", None, "train_test_leak"),
        ("external", "train-test leak", None, "train_test_leak"),
        ("label", "mislabel", 0.95, "mislabel_confirmed"),
        ("label", "mislabel", 0.5, "mislabel_uncertain"),
        ("external", "Label Issue", None, "mislabel_uncertain"),
        ("label", "outlier", 0.9, "outlier_invalid"),
        ("external", "outlier_valid", None, "outlier_valid"),
        ("label", "ambiguous", None, "ambiguous_class"),
        ("duplicate", "exact", None, "duplicate_exact"),
        ("duplicate", "near", None, "duplicate_near"),
        ("external", "near-duplicates", None, "duplicate_near"),
        ("quality", "blurry", None, "low_quality_blur"),
        ("quality", "truncated", None, "low_quality_corrupt"),
        ("quality", "dark", None, None),
    ],
)
def test_machine_flags_map_to_the_tag_taxonomy(source: str, flag: str, confidence, tag) -> None:
    assert machine_tag(source, flag, confidence) == tag
    assert tag is None or tag in TAGS


def test_manifest_has_one_row_per_flagged_image(tmp_path: Path) -> None:
    images = make_images(tmp_path)
    extra = pl.DataFrame(
        [("train.x/z.jpg", "train", "cat", "/nowhere/z.jpg", None, None)], schema=images.schema, orient="row"
    )
    manifest = build_review_manifest(make_flags(), pl.concat([images, extra]))
    assert dict(manifest.schema) == MANIFEST_SCHEMA
    assert manifest["image_id"].to_list() == sorted(images["image_id"])  # z is not flagged
    rows = {r["image_id"]: r for r in manifest.iter_rows(named=True)}
    b = rows["train.x/b.jpg"]
    assert b["flags"] == ["external/Mislabels", "label/mislabel"]
    assert b["machine_tags"] == ["mislabel_confirmed", "mislabel_uncertain"]
    assert (b["confidence"], b["suggested_label"]) == (0.95, "owl")  # from the most confident flag
    assert "7/10 neighbours disagree" in b["details"]
    assert b["machine_action"] == "relabel"
    assert rows["train.x/a.jpg"]["machine_action"] == "remove"  # exact copy
    assert rows["train.x/h.jpg"]["machine_action"] == "remove"  # undecodable
    assert rows["train.x/c.jpg"]["machine_action"] is None  # an outlier waits for a human
    assert rows["test.shard/g.png"]["machine_tags"] == ["train_test_leak"]
    assert all(r["user_tags"] == [] and r["user_action"] is None for r in rows.values())
    # A project that trusts its leak detector removes leaks without a review.
    strict = build_review_manifest(make_flags(), images, auto_remove=["train_test_leak"], auto_relabel=[])
    actions = dict(zip(strict["image_id"], strict["machine_action"], strict=True))
    assert actions["test.shard/g.png"] == "remove"
    assert actions["train.x/a.jpg"] is None and actions["train.x/b.jpg"] is None
    with pytest.raises(ValueError, match="unknown tag"):
        build_review_manifest(make_flags(), images, auto_remove=["leak"])
    # Flags naming images the dataset does not have cannot be reviewed: a clear error.
    stray = pl.DataFrame(
        [("train.x/q.jpg", "external", "blur", None, None, None)], schema=FLAG_COLUMNS, orient="row"
    )
    with pytest.raises(ValueError, match=r"not in the images table.*train.x/q.jpg"):
        build_review_manifest(stray, images)
    with pytest.raises(ValueError, match="missing column"):
        build_review_manifest(make_flags().drop("source"), images)
    empty = build_review_manifest(make_flags().clear(), images)
    assert empty.is_empty() and dict(empty.schema) == MANIFEST_SCHEMA


def write_csv(
    path: Path, rows: list[list[str]], header: str = "image_id,user_tags,user_action,new_label,reviewer"
):
    with path.open("w", newline="", encoding="utf-8") as handle:
        handle.write(header + "\n")
        csv.writer(handle).writerows(rows)
    return path


def test_merge_applies_decisions_and_names_the_bad_line(tmp_path: Path) -> None:
    manifest = build_review_manifest(make_flags(), make_images(tmp_path))
    assert merge_human_decisions(manifest, None).equals(manifest)
    good = write_csv(
        tmp_path / "good.csv",
        [
            ["train.x/a.jpg", "duplicate_exact;keep", "", "", "ann"],  # the action comes from the tag
            ["train.x/b.jpg", "", "relabel", "", "ann"],  # relabel takes the suggested label
            ["train.x/c.jpg", "outlier_valid", "", "fox", ""],  # a new label alone means relabel
        ],
    )
    merged = {r["image_id"]: r for r in merge_human_decisions(manifest, good).iter_rows(named=True)}
    assert (merged["train.x/a.jpg"]["user_tags"], merged["train.x/a.jpg"]["user_action"]) == (
        ["duplicate_exact", "keep"],
        "keep",
    )
    assert merged["train.x/a.jpg"]["machine_action"] == "remove"  # kept: the human wins downstream
    assert (merged["train.x/b.jpg"]["user_action"], merged["train.x/b.jpg"]["new_label"]) == (
        "relabel",
        "owl",
    )
    assert merged["train.x/b.jpg"]["reviewer"] == "ann"
    assert (merged["train.x/c.jpg"]["user_action"], merged["train.x/c.jpg"]["new_label"]) == (
        "relabel",
        "fox",
    )
    assert merged["train.x/c.jpg"]["reviewer"] is None
    assert merged["train.x/d.jpg"]["user_action"] is None  # not in the CSV: untouched

    bad_cases = [
        ([["train.x/nope.jpg", "", "keep", "", ""]], r"line 2: image_id 'train.x/nope.jpg' is not in"),
        (
            [["train.x/a.jpg", "", "keep", "", ""], ["train.x/d.jpg", "blurry", "", "", ""]],
            r"line 3.*unknown tag",
        ),
        ([["train.x/a.jpg", "", "delete", "", ""]], r"line 2.*unknown user_action 'delete'"),
        ([["train.x/a.jpg", "remove", "keep", "", ""]], r"line 2.*contradicting"),
        (
            [["train.x/a.jpg", "", "keep", "", ""], ["train.x/a.jpg", "", "remove", "", ""]],
            r"line 3.*on line 2",
        ),
        ([["train.x/d.jpg", "", "relabel", "", ""]], r"line 2.*no suggested_label"),
        ([["train.x/d.jpg", "", "remove", "fox", ""]], r"line 2.*new_label 'fox'"),
    ]
    for i, (rows, message) in enumerate(bad_cases):
        with pytest.raises(ValueError, match=message):
            merge_human_decisions(manifest, write_csv(tmp_path / f"bad{i}.csv", rows))
    with pytest.raises(ValueError, match=r"missing column\(s\) \['reviewer'\]"):
        merge_human_decisions(
            manifest, write_csv(tmp_path / "cols.csv", [], "image_id,user_tags,user_action,new_label")
        )
    with pytest.raises(FileNotFoundError):
        merge_human_decisions(manifest, tmp_path / "absent.csv")


# ----------------------------------------------------------------------------- the page in Chromium


@pytest.fixture(scope="module")
def browser():
    # CI sets CURATION_REQUIRE_BROWSER=1: there a missing browser fails instead of skipping
    required = os.environ.get("CURATION_REQUIRE_BROWSER") == "1"
    if required:
        import playwright.sync_api as sync_api
    else:
        sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    if shutil.which(CHROMIUM) is None:
        if required:
            pytest.fail(f"{CHROMIUM} not installed (make browser, or apt-get install chromium)")
        pytest.skip(f"{CHROMIUM} not installed (apt-get install chromium)")
    with sync_api.sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield instance
        instance.close()


def open_page(browser, path: Path):
    context = browser.new_context(accept_downloads=True, viewport={"width": 1500, "height": 1800})
    page = context.new_page()
    page.goto(path.as_uri())
    page.wait_for_selector("body[data-ready='1']")
    return context, page


def visible_ids(page) -> list[str]:
    return page.eval_on_selector_all(".card:not([hidden])", "cards => cards.map(c => c.dataset.imageId)")


def card(page, index: int):
    """The card of manifest row ``index`` (cards are built as they are shown)."""
    return page.locator(f".card[data-index='{index}']")


def export(page, target: Path) -> Path:
    with page.expect_download(timeout=10_000) as download:
        page.click("#export")
    download.value.save_as(target)
    return target


def test_review_page_shows_filters_tags_and_exports_decisions(browser, tmp_path: Path) -> None:
    manifest = build_review_manifest(make_flags(), make_images(tmp_path))
    out = tmp_path / "review"
    page_path = write_review_page(manifest, out, thumb_side=64, title='Review <b>&</b> "demo"')
    thumbs = sorted((out / "thumbs").glob("*.jpg"))
    assert len(thumbs) == len(manifest) - 1  # all but the unreadable file, never the originals
    context, page = open_page(browser, page_path)
    try:
        assert page.title() == 'Review <b>&</b> "demo"'
        ids = manifest["image_id"].to_list()
        assert visible_ids(page) == ids
        # Every readable flagged image shows its thumbnail; the broken one says why.
        page.wait_for_function("Array.from(document.images).every(i => i.complete)")
        widths = page.eval_on_selector_all(".card img", "imgs => imgs.map(i => i.naturalWidth)")
        assert len(widths) == len(ids) - 1 and all(0 < w <= 64 for w in widths)
        assert "cannot read" in card(page, ids.index("train.x/h.jpg")).locator(".broken").inner_text()
        # Markup in ids and labels stays text.
        assert card(page, ids.index(NASTY_ID)).locator(".id").inner_text() == NASTY_ID
        assert NASTY_LABEL in card(page, ids.index(NASTY_ID)).locator(".meta").inner_text()
        assert page.evaluate("window.__pwned") is None

        # Filtering by tag and by flag hides the other rows.
        page.select_option("#filter-tag", "duplicate_exact")
        assert visible_ids(page) == [
            r["image_id"] for r in manifest.iter_rows(named=True) if "duplicate_exact" in r["machine_tags"]
        ]
        page.select_option("#filter-tag", "")
        page.select_option("#filter-flag", "leak/perceptual")
        assert visible_ids(page) == ["test.shard/g.png"]
        page.select_option("#filter-flag", "")
        assert visible_ids(page) == ids

        # Keyboard tagging: the first card (g) starts selected; j/k move.
        assert ids[:4] == ["test.shard/g.png", "train.x/a.jpg", "train.x/b.jpg", "train.x/c.jpg"]
        page.fill("#reviewer", "alice")
        page.keyboard.press("Escape")
        for key in ("j", "j", "j", "k"):  # -> a, b, c, back to b
            page.keyboard.press(key)
        page.keyboard.press("2")  # mislabel_uncertain
        page.keyboard.press("x")  # remove
        b = card(page, ids.index("train.x/b.jpg"))
        assert b.get_attribute("data-user-tags") == "mislabel_uncertain;remove"
        assert b.get_attribute("data-action") == "remove"
        assert card(page, ids.index("train.x/a.jpg")).get_attribute("data-user-tags") == ""
        page.keyboard.press("j")  # -> c
        page.keyboard.press("3")  # outlier_valid
        page.keyboard.press("3")  # toggled off again
        page.keyboard.press("4")  # outlier_invalid
        page.keyboard.press("j")  # -> d, which has no suggested label
        page.keyboard.press("r")  # relabel: the cursor goes to the new-label field
        assert page.evaluate("document.activeElement.classList.contains('new-label')")
        page.keyboard.press("Escape")
        page.click("#export")  # a relabel without a label would not merge: refused on the page
        assert "not exported: 1 relabel" in page.inner_text("#status")
        page.keyboard.press("a")  # keep
        page.keyboard.press("u")  # changed my mind: no decision
        assert card(page, ids.index("train.x/d.jpg")).get_attribute("data-user-tags") == ""
        page.keyboard.press("j")  # -> e (the nasty one, suggested "dog")
        page.keyboard.press("r")
        assert card(page, ids.index(NASTY_ID)).locator(".new-label").input_value() == "dog"
        f = card(page, ids.index("train.x/f.jpg"))
        f.locator(".new-label").fill("zebra")  # typing a label means relabel
        page.keyboard.press("Escape")
        assert f.get_attribute("data-action") == "relabel"
        page.select_option("#filter-action", "relabel")
        assert visible_ids(page) == [NASTY_ID, "train.x/f.jpg"]  # b's machine relabel is overruled by remove
        page.select_option("#filter-action", "")

        exported = export(page, tmp_path / "decisions.csv")
    finally:
        context.close()

    merged = merge_human_decisions(manifest, exported)
    got = {
        r["image_id"]: (r["user_tags"], r["user_action"], r["new_label"], r["reviewer"])
        for r in merged.iter_rows(named=True)
        if r["user_tags"] or r["user_action"]
    }
    assert got == {
        "train.x/b.jpg": (["mislabel_uncertain", "remove"], "remove", None, "alice"),
        "train.x/c.jpg": (["outlier_invalid"], None, None, "alice"),
        NASTY_ID: (["relabel"], "relabel", "dog", "alice"),
        "train.x/f.jpg": (["relabel"], "relabel", "zebra", "alice"),
    }
    assert merged.drop("user_tags", "user_action", "new_label", "reviewer").equals(
        manifest.drop("user_tags", "user_action", "new_label", "reviewer")
    )

    # The page rewritten from the merged manifest starts from those decisions and exports them again.
    stamps = {p.name: p.stat().st_mtime_ns for p in thumbs}
    write_review_page(merged, out, thumb_side=64)
    assert {p.name: p.stat().st_mtime_ns for p in (out / "thumbs").glob("*.jpg")} == stamps  # reused
    context, page = open_page(browser, page_path)
    try:
        assert card(page, ids.index("train.x/b.jpg")).get_attribute("data-action") == "remove"
        again = export(page, tmp_path / "again.csv")
    finally:
        context.close()
    assert merge_human_decisions(manifest, again).equals(merged)


def test_review_page_shows_long_manifests_a_page_at_a_time(browser, tmp_path: Path) -> None:
    n = 450
    images = pl.DataFrame({"image_id": [f"train.x/{i:04d}.jpg" for i in range(n)], "source_path": None})
    flags = pl.DataFrame(
        {"image_id": images["image_id"], "source": "quality", "flag": ["blur", "corrupt", "dark"] * (n // 3)}
    ).with_columns(detail=None, confidence=None, suggested_label=None)
    manifest = build_review_manifest(flags, images)
    context, page = open_page(browser, write_review_page(manifest, tmp_path / "review"))
    try:
        assert len(visible_ids(page)) == 200
        assert "450 of 450 images (first 200 shown)" in page.inner_text("#shown")
        card(page, 199).click()
        page.keyboard.press("j")  # moving past the last card shown brings the next page
        assert len(visible_ids(page)) == 400
        assert "current" in card(page, 200).get_attribute("class")
        page.click("#more")
        assert visible_ids(page) == manifest["image_id"].to_list()
        page.select_option("#filter-tag", "low_quality_corrupt")
        assert len(visible_ids(page)) == n // 3
        assert "no source path" in page.locator(".card .broken").first.inner_text()
    finally:
        context.close()
