"""Destructive apply with backup and journal, crash recovery, and an exact restore."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image

from curation_assets.core.outputs.apply import (
    FIX,
    REMOVE,
    ApplyRefused,
    SimulatedCrash,
    actions_frame,
    apply_actions,
    journal_restored,
    plan_actions,
    read_registry,
    record_apply,
    record_restore,
    restore_journal,
    unrestored_applies,
)
from curation_assets_tests.test_export import build_dataset, pixels, plan_frame, tree_hashes

REMOVED = ("a", "c", "v2", "d")
FIXED = ("cmyk", "exif", "turned", "named", "big")


@pytest.fixture
def setup(tmp_path: Path):
    """A two-split dataset, the actions that remove 4 files and fix 5, and where backups go."""
    roots, rows = build_dataset(tmp_path / "ds")
    (roots["train"] / "notes.txt").write_text("not an image, never touched")
    removed = plan_frame([rows[k] for k in REMOVED])
    fixed = plan_frame([rows[k] for k in (*FIXED, "b")])  # "b" has no fix: nothing to do
    actions = plan_actions(removed, fixed, roots)
    return {
        "roots": roots,
        "rows": rows,
        "actions": actions,
        "backup": tmp_path / "backup",
        "journal": tmp_path / "journal" / "apply.jsonl",
        "tmp": tmp_path,
    }


def dataset_state(s) -> dict[str, str]:
    return {f"{split}/{rel}": h for split, root in s["roots"].items() for rel, h in tree_hashes(root).items()}


def run_apply(s, **kwargs):
    return apply_actions(
        s["actions"],
        roots=s["roots"],
        backup_root=s["backup"],
        journal_path=s["journal"],
        confirm=True,
        **kwargs,
    )


def assert_nothing_lost(s, original: dict[str, str]) -> None:
    """Every original file is in place or in the backup, bit-identical."""
    in_place = dataset_state(s)
    backed_up = tree_hashes(s["backup"]) if s["backup"].exists() else {}
    for path, digest in original.items():
        assert in_place.get(path) == digest or backed_up.get(path) == digest, path


def test_plan_actions_orders_removals_first_and_skips_rows_without_fixes(setup) -> None:
    actions = setup["actions"]
    assert [a.kind for a in actions] == [REMOVE] * len(REMOVED) + [FIX] * len(FIXED)
    named = next(a for a in actions if a.rel_path == "odd/named.jpg")
    assert named.target.endswith("odd/named.png")
    table = actions_frame(actions)
    assert table.height == len(actions) and set(table["kind"]) == {REMOVE, FIX}


def test_apply_then_restore_gives_back_the_original_tree(setup) -> None:
    s = setup
    original = dataset_state(s)
    summary = run_apply(s)
    assert summary.failed == []
    assert (summary.removed, summary.fixed) == (len(REMOVED), len(FIXED))

    after = dataset_state(s)
    backup = tree_hashes(s["backup"])
    for key in REMOVED:  # moved out, into a backup that mirrors split/rel_path
        row = s["rows"][key]
        path = f"{row['split']}/{row['rel_path']}"
        assert path not in after and backup[path] == original[path]
    for key in FIXED:  # originals in the backup, fixed images in place
        path = f"train/{s['rows'][key]['rel_path']}"
        assert backup[path] == original[path]
    fixed_root = s["roots"]["train"] / "odd"
    with Image.open(fixed_root / "cmyk.jpg") as im:
        assert im.mode == "RGB"
    with Image.open(fixed_root / "exif.jpg") as im:
        assert im.size == (40, 80) and im.getexif().get(0x0112) is None
    assert np.array_equal(pixels(fixed_root / "turned.png"), pixels(s["tmp"] / "ds/scratch/upright.png"))
    assert max(Image.open(fixed_root / "big.png").size) == 100
    assert not (fixed_root / "named.jpg").exists() and (fixed_root / "named.png").is_file()
    assert after["train/notes.txt"] == original["train/notes.txt"]
    assert after["train/birds/b.jpg"] == original["train/birds/b.jpg"]

    restored = restore_journal(s["journal"])
    assert restored.conflicts == [] and restored.restored == len(s["actions"])
    assert dataset_state(s) == original  # bit-identical, nothing extra (named.png is gone)
    assert tree_hashes(s["backup"]) == {}  # every backup went home

    again = restore_journal(s["journal"])  # restoring twice is harmless
    assert (again.restored, again.skipped, again.conflicts) == (0, len(s["actions"]), [])
    assert dataset_state(s) == original


@pytest.mark.parametrize("kill_after", [2, len(REMOVED) + 1])  # during the removals, during the fixes
def test_a_killed_apply_rerun_finishes_without_loss(setup, kill_after: int) -> None:
    s = setup
    original = dataset_state(s)
    with pytest.raises(SimulatedCrash):
        run_apply(s, _fail_after=kill_after)
    assert_nothing_lost(s, original)
    records = [json.loads(line) for line in s["journal"].read_text().splitlines()]
    assert sum(r["type"] == "begin" for r in records) == kill_after + 1  # journaled before the kill
    assert sum(r["type"] == "done" for r in records) == kill_after

    finished = run_apply(s)
    assert finished.failed == [] and finished.skipped == kill_after
    assert finished.removed + finished.fixed == len(s["actions"]) - kill_after
    assert_nothing_lost(s, original)
    assert not (s["roots"]["train"] / "odd/named.jpg").exists()

    assert restore_journal(s["journal"]).conflicts == []
    assert dataset_state(s) == original


def test_a_move_cut_between_link_and_unlink_is_finished(setup) -> None:
    """Killed after the backup name was made but before the source was removed: both names hold the file."""
    s = setup
    original = dataset_state(s)
    with pytest.raises(SimulatedCrash):
        run_apply(s, _fail_after=1)
    pending = s["actions"][1]
    backup = s["backup"] / pending.split / pending.rel_path
    backup.parent.mkdir(parents=True, exist_ok=True)
    backup.hardlink_to(pending.source)

    assert run_apply(s).failed == []
    assert not Path(pending.source).exists()
    assert tree_hashes(s["backup"])[pending.key] == original[pending.key]
    assert restore_journal(s["journal"]).conflicts == []
    assert dataset_state(s) == original


def test_restore_straight_after_a_kill_returns_the_original_tree(setup) -> None:
    s = setup
    original = dataset_state(s)
    with pytest.raises(SimulatedCrash):
        run_apply(s, _fail_after=len(REMOVED) + 2)
    summary = restore_journal(s["journal"])
    assert summary.conflicts == []
    assert dataset_state(s) == original


def test_apply_without_confirm_refuses_and_touches_nothing(setup) -> None:
    s = setup
    original = dataset_state(s)
    with pytest.raises(ApplyRefused, match="confirm"):
        apply_actions(
            s["actions"], roots=s["roots"], backup_root=s["backup"], journal_path=s["journal"], confirm=False
        )
    assert dataset_state(s) == original and not s["journal"].exists() and not s["backup"].exists()


def test_a_backup_root_inside_the_dataset_is_refused(setup) -> None:
    s = setup
    original = dataset_state(s)
    inside = s["roots"]["val"] / "backup"
    with pytest.raises(ApplyRefused, match="inside the dataset root"):
        run_apply({**s, "backup": inside})
    around = s["tmp"]  # a backup root holding the dataset roots is as bad
    with pytest.raises(ApplyRefused, match="inside the backup root"):
        run_apply({**s, "backup": around})
    assert dataset_state(s) == original and not inside.exists()


def test_webdataset_sources_are_refused_with_a_pointer_to_export(setup) -> None:
    s = setup
    with pytest.raises(ApplyRefused, match=r"[Ee]xport"):
        run_apply(s, input_kind="webdataset")
    member = {**s["rows"]["a"], "offset": 512}
    with pytest.raises(ApplyRefused, match="tar member"):
        plan_actions(plan_frame([member]), plan_frame([]), s["roots"])


def test_plan_actions_refuses_inconsistent_plans(setup) -> None:
    s = setup
    row = s["rows"]["a"]
    with pytest.raises(ApplyRefused, match="both"):
        plan_actions(plan_frame([row]), plan_frame([{**row, "fixes": ["convert_rgb"]}]), s["roots"])
    with pytest.raises(ApplyRefused, match="disagree"):
        plan_actions(plan_frame([{**row, "rel_path": "birds/b.jpg"}]), plan_frame([]), s["roots"])
    with pytest.raises(ApplyRefused, match="no dataset root"):
        plan_actions(plan_frame([{**row, "split": "test"}]), plan_frame([]), s["roots"])


def test_an_existing_different_backup_file_is_never_overwritten(setup) -> None:
    s = setup
    original = dataset_state(s)
    a = next(x for x in s["actions"] if x.rel_path == "birds/a.jpg")
    cmyk = next(x for x in s["actions"] if x.rel_path == "odd/cmyk.jpg")
    squatters = {}
    for action in (a, cmyk):
        path = s["backup"] / action.split / action.rel_path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"someone else's file " + action.rel_path.encode())
        squatters[path] = path.read_bytes()
    identical = next(x for x in s["actions"] if x.rel_path == "birds/c.png")  # same bytes: accepted
    (s["backup"] / "train/birds/c.png").write_bytes(Path(identical.source).read_bytes())

    summary = run_apply(s)
    assert sorted(image_id for image_id, _ in summary.failed) == sorted([a.image_id, cmyk.image_id])
    assert all("never overwritten" in why for _, why in summary.failed)
    for path, data in squatters.items():
        assert path.read_bytes() == data
    assert dataset_state(s)["train/birds/a.jpg"] == original["train/birds/a.jpg"]  # left in place
    assert dataset_state(s)["train/odd/cmyk.jpg"] == original["train/odd/cmyk.jpg"]  # not fixed
    assert not Path(identical.source).exists()
    assert summary.removed + summary.fixed == len(s["actions"]) - 2

    assert restore_journal(s["journal"]).conflicts == []
    assert dataset_state(s) == original
    for path, data in squatters.items():
        assert path.read_bytes() == data


def test_a_file_changed_since_the_plan_is_left_alone(setup) -> None:
    s = setup
    changed = Path(s["actions"][0].source)
    changed.write_bytes(changed.read_bytes() + b"edited")
    summary = run_apply(s)
    assert [image_id for image_id, _ in summary.failed] == [s["actions"][0].image_id]
    assert "changed since the plan" in summary.failed[0][1]
    assert changed.exists()


def test_restore_never_overwrites_a_file_put_back_by_someone_else(setup) -> None:
    s = setup
    original = dataset_state(s)
    run_apply(s)
    a = next(x for x in s["actions"] if x.rel_path == "birds/a.jpg")
    Path(a.source).write_bytes(b"a new file with the old name")
    summary = restore_journal(s["journal"])
    assert [image_id for image_id, _ in summary.conflicts] == [a.image_id]
    assert Path(a.source).read_bytes() == b"a new file with the old name"
    assert tree_hashes(s["backup"])[a.key] == original[a.key]  # the original is kept in the backup
    state = dataset_state(s)
    assert {k: v for k, v in state.items() if k != a.key} == {k: v for k, v in original.items() if k != a.key}


def test_a_new_apply_after_a_restore_starts_a_fresh_journal(setup) -> None:
    s = setup
    original = dataset_state(s)
    run_apply(s)
    restore_journal(s["journal"])
    second = run_apply(s)
    assert second.skipped == 0 and second.removed == len(REMOVED)
    assert s["journal"].with_name("apply.jsonl.restored-1").is_file()
    assert restore_journal(s["journal"]).conflicts == []
    assert dataset_state(s) == original


def test_progress_is_reported(setup) -> None:
    s = setup
    seen: list[tuple[int, int]] = []
    run_apply(s, progress=lambda done, total: seen.append((done, total)))
    assert seen[-1] == (len(s["actions"]), len(s["actions"]))
    assert pl.Series([d for d, _ in seen]).is_sorted()


def test_without_hardlinks_files_move_by_verified_copy(setup, monkeypatch: pytest.MonkeyPatch) -> None:
    """A backup on another filesystem (no hardlinks across it): copy, verify, then remove the source."""
    s = setup
    original = dataset_state(s)

    def no_hardlinks(self: Path, target: Path) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link", str(self))

    monkeypatch.setattr(Path, "hardlink_to", no_hardlinks)
    summary = run_apply(s)
    assert summary.failed == [] and summary.removed == len(REMOVED)
    assert_nothing_lost(s, original)
    assert not (s["roots"]["train"] / "birds/a.jpg").exists()
    assert restore_journal(s["journal"]).conflicts == []
    assert dataset_state(s) == original


def test_a_torn_last_journal_line_does_not_swallow_the_next_record(setup) -> None:
    s = setup
    original = dataset_state(s)
    with pytest.raises(SimulatedCrash):
        run_apply(s, _fail_after=3)
    with open(s["journal"], "a") as handle:  # killed half-way through writing a record
        handle.write('{"type": "begin", "seq": 99, "act')
    assert run_apply(s).failed == []
    lines = s["journal"].read_text().splitlines()
    records = [json.loads(line) for line in lines if not line.endswith('"act')]
    assert len(records) == len(lines) - 1  # only the torn line is lost
    begun = {r["seq"] for r in records if r["type"] == "begin"}
    assert begun == {r["seq"] for r in records if r["type"] == "done"} and len(begun) == len(s["actions"])
    assert restore_journal(s["journal"]).conflicts == []
    assert dataset_state(s) == original


def test_a_second_run_on_a_journal_in_use_is_refused(setup) -> None:
    fcntl = pytest.importorskip("fcntl")
    s = setup
    s["journal"].parent.mkdir(parents=True)
    with open(s["journal"], "a") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        with pytest.raises(ApplyRefused, match="another apply or restore"):
            run_apply(s)
        with pytest.raises(ApplyRefused, match="another apply or restore"):
            restore_journal(s["journal"])
    assert run_apply(s).failed == []


# ------------------------------------------------------------------ issue 13: the registry of applies


def test_the_registry_finds_the_latest_unrestored_apply_and_marks_restores(setup) -> None:
    s = setup
    original = dataset_state(s)
    registry = s["tmp"] / "store" / "apply_journals" / "applies.json"
    assert read_registry(registry) == [] and unrestored_applies([]) == []
    half = len(s["actions"]) // 2
    first = apply_actions(
        s["actions"][:half],
        roots=s["roots"],
        backup_root=s["tmp"] / "backup_a",
        journal_path=s["tmp"] / "backup_a" / "p.journal.jsonl",
        confirm=True,
    )
    record_apply(registry, first, run_id="run-a")
    second = apply_actions(
        s["actions"][half:],
        roots=s["roots"],
        backup_root=s["tmp"] / "backup_b",
        journal_path=s["tmp"] / "backup_b" / "p.journal.jsonl",
        confirm=True,
    )
    record_apply(registry, second, run_id="run-b")

    pending = unrestored_applies(read_registry(registry))
    assert [r.journal for r in pending] == [second.journal, first.journal]  # latest first
    assert pending[0].backup_root == second.backup_root and pending[0].run_id == "run-b"
    assert (pending[1].removed, pending[1].fixed) == (first.removed, first.fixed)
    assert json.loads(registry.read_text())["version"] == 1
    assert not journal_restored(Path(second.journal))

    for record in pending:
        restored = restore_journal(Path(record.journal))
        assert record_restore(registry, restored) is not None
        assert journal_restored(Path(record.journal))
    assert unrestored_applies(read_registry(registry)) == []
    assert all(r.restored for r in read_registry(registry))
    assert dataset_state(s) == original


def test_a_restored_journal_archived_by_a_new_apply_keeps_its_record(setup) -> None:
    s = setup
    registry = s["tmp"] / "applies.json"
    record_apply(registry, run_apply(s))
    record_restore(registry, restore_journal(s["journal"]))
    again = run_apply(s)
    assert again.archived_journal.endswith(".restored-1")
    record_apply(registry, again)
    old, new = read_registry(registry)
    assert old.journal == again.archived_journal and old.restored
    assert new.journal == str(s["journal"].absolute()) and not new.restored
    assert unrestored_applies([old, new]) == [new]


def test_a_restore_with_conflicts_leaves_the_apply_unrestored(setup) -> None:
    s = setup
    registry = s["tmp"] / "applies.json"
    record_apply(registry, run_apply(s))
    squatted = Path(next(x for x in s["actions"] if x.kind == REMOVE).source)
    squatted.write_bytes(b"someone put a file here")
    record = record_restore(registry, restore_journal(s["journal"]))
    assert record is not None and record.restore_conflicts == 1 and not record.restored
    assert unrestored_applies(read_registry(registry)) == [record]
