"""Destructive apply of curation decisions, with a backup, a journal and an exact restore.

``apply`` moves every removed file of a directory dataset into a backup tree that mirrors
``<split>/<rel_path>``, and fixes images in place after copying the original to the same
backup path. Every action is written to a journal (JSON lines, flushed and fsync'd)
*before* it touches a file and marked done after, so a run killed at any point can be
re-run to finish, or restored, without losing a byte:

- a file is only ever moved by hardlink + unlink (or verified copy + unlink across
  filesystems), so at every instant at least one complete copy exists;
- an existing backup file is never overwritten; one that is byte-identical to the file
  being backed up is the trace of an interrupted move and is accepted as the backup;
- each file is hashed before it is touched and must still be the file the plan decided on.

``restore_journal`` walks the journal backwards and puts every original back, verifying
its hash; it never overwrites a file it did not write.

``record_apply`` / ``record_restore`` keep a registry of the journals (JSON, rewritten
atomically) so that a restore finds the latest unrestored apply without being told where
its backup root was.

Pure library: no Dagster import.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import polars as pl
import xxhash

from curation_assets.core.atomic import atomic_path, fsync_dir, temp_beside
from curation_assets.core.ingest.images import describe_error
from curation_assets.core.outputs.export import (
    check_plan,
    copy_verified,
    hash_file,
    output_name,
    parse_recipe,
    render_fixed,
    safe_rel_path,
)

REMOVE = "remove"
FIX = "fix"
JOURNAL_VERSION = 1
ProgressFn = Callable[[int, int], None]  # progress(done, total)


class ApplyRefused(RuntimeError):  # noqa: N818 - the name the jobs and the CLI report
    """Apply or restore will not run as asked; the message says why and what to do instead."""


class SimulatedCrash(BaseException):  # a kill, not an error: no `except Exception` catches it
    """Raised by ``apply_actions(_fail_after=n)`` to stand for the process being killed."""


class _ActionFailed(Exception):  # noqa: N818 - internal: one action is skipped with this message
    pass


@dataclass(frozen=True)
class Action:
    """One file to move out (``remove``) or to fix in place (``fix``)."""

    kind: str  # "remove" | "fix"
    image_id: str
    split: str
    rel_path: str  # relative to the split root; the backup mirrors it
    source: str  # the file now (absolute)
    target: str  # where the fixed image goes (another extension where a fix says); == source for remove
    content_hash: str  # xxh3_128 of the bytes the decision was made on
    size_bytes: int
    fixes: tuple[str, ...] = ()
    rotate: int = 0

    @property
    def key(self) -> str:
        """One action per file: the journal matches re-runs by this."""
        return f"{self.split}/{self.rel_path}"

    def backup_path(self, backup_root: Path) -> Path:
        return backup_root / self.split / self.rel_path

    def to_json(self) -> dict[str, Any]:
        record = asdict(self)
        record["fixes"] = list(self.fixes)
        return record

    @classmethod
    def from_json(cls, record: Mapping[str, Any]) -> Action:
        return cls(**{**record, "fixes": tuple(record.get("fixes") or ())})


@dataclass
class ApplySummary:
    removed: int = 0  # files moved into the backup
    fixed: int = 0  # files rewritten in place (original in the backup)
    skipped: int = 0  # already done by an earlier run of this journal
    failed: list[tuple[str, str]] = field(default_factory=list)  # (image_id, why); nothing was lost
    bytes_backed_up: int = 0
    seconds: float = 0.0
    journal: str = ""
    backup_root: str = ""
    archived_journal: str = ""  # where a fully restored journal at the same path was moved aside

    def as_metadata(self) -> dict[str, Any]:
        return {
            "removed": self.removed,
            "fixed": self.fixed,
            "skipped": self.skipped,
            "failed": len(self.failed),
            "bytes_backed_up": self.bytes_backed_up,
            "seconds": round(self.seconds, 3),
            "journal": self.journal,
            "backup_root": self.backup_root,
        }


@dataclass
class RestoreSummary:
    restored: int = 0  # originals put back this run, hashes verified
    skipped: int = 0  # restored by an earlier run
    conflicts: list[tuple[str, str]] = field(default_factory=list)  # (image_id, why); left untouched
    seconds: float = 0.0
    journal: str = ""

    def as_metadata(self) -> dict[str, Any]:
        return {
            "restored": self.restored,
            "skipped": self.skipped,
            "conflicts": len(self.conflicts),
            "seconds": round(self.seconds, 3),
            "journal": self.journal,
        }


# ----------------------------------------------------------------------------- planning


def plan_actions(removed: pl.DataFrame, fixed: pl.DataFrame, roots: Mapping[str, Path]) -> list[Action]:
    """The actions for plan rows to remove and plan rows to fix, removals first.

    Removals go first so that a fix renaming ``a.jpg`` (PNG data) to ``a.png`` can use the
    name of a removed ``a.png``. Fix rows with no fix and no rotation are left out.
    Raises :class:`ApplyRefused` for tar members (WebDataset), a split without a root, a
    path outside its root, an image listed for both, or a fix it cannot apply.
    """
    for frame in (removed, fixed):
        check_plan(frame)
        members = frame.filter(pl.col("offset").is_not_null())
        if members.height:
            raise ApplyRefused(_webdataset_message(f"{members.height} plan row(s) are tar members"))
    both = set(removed["image_id"].to_list()) & set(fixed["image_id"].to_list())
    if both:
        raise ApplyRefused(
            f"{len(both)} image(s) are listed both to remove and to fix, e.g. {sorted(both)[:3]}"
        )
    actions: list[Action] = []
    for kind, frame in ((REMOVE, removed), (FIX, fixed)):
        for row in frame.sort("split", "rel_path").iter_rows(named=True):
            action = _action(kind, row, roots)
            if action is not None:
                actions.append(action)
    return actions


def _action(kind: str, row: Mapping[str, Any], roots: Mapping[str, Path]) -> Action | None:
    split, rel = row["split"], row["rel_path"] or ""
    if split not in roots:
        raise ApplyRefused(f"{row['image_id']}: split {split!r} has no dataset root (roots: {sorted(roots)})")
    problem = safe_rel_path(rel)
    if problem:
        raise ApplyRefused(f"{row['image_id']}: {problem}")
    root = Path(roots[split]).absolute()
    source = root / rel
    if Path(os.path.normpath(Path(row["source_path"]).absolute())) != Path(os.path.normpath(source)):
        raise ApplyRefused(
            f"{row['image_id']}: source_path {row['source_path']} is not {source} (its split root joined "
            "with rel_path); the plan and the project's roots disagree"
        )
    target = source
    fixes: tuple[str, ...] = ()
    rotate = 0
    if kind == FIX:
        try:
            recipe = parse_recipe(row["fixes"], row["rotate"])
        except ValueError as exc:
            raise ApplyRefused(f"{row['image_id']}: {exc}") from exc
        if recipe.is_identity:
            return None
        fixes, rotate = recipe.fixes, recipe.rotate
        target = root / output_name(rel, recipe)[0]
    return Action(
        kind=kind,
        image_id=row["image_id"],
        split=split,
        rel_path=rel,
        source=str(source),
        target=str(target),
        content_hash=row["content_hash"] or "",
        size_bytes=int(row["size_bytes"] or 0),
        fixes=fixes,
        rotate=rotate,
    )


def actions_frame(actions: Sequence[Action]) -> pl.DataFrame:
    """The actions as a table (a dry run to show before ``confirm``)."""
    schema = {
        "kind": pl.String,
        "image_id": pl.String,
        "split": pl.String,
        "rel_path": pl.String,
        "source": pl.String,
        "target": pl.String,
        "content_hash": pl.String,
        "size_bytes": pl.Int64,
        "fixes": pl.List(pl.String),
        "rotate": pl.Int64,
    }
    return pl.DataFrame([a.to_json() for a in actions], schema=schema)


def _webdataset_message(what: str) -> str:
    return (
        f"{what}: WebDataset sources are never modified in place. Export the curated subset instead "
        "(curated_dataset with export mode 'webdataset' writes new shards with the fixes applied)."
    )


# ----------------------------------------------------------------------------- the journal


@dataclass
class _Entry:
    seq: int
    action: Action
    backup: Path
    done: bool = False
    fixed_hash: str | None = None
    restored: bool = False


class _Journal:
    """JSON lines: a header, then ``begin``/``done``/``error``/``restored`` records per action."""

    def __init__(self, path: Path):
        self.path = path
        self.header: dict[str, Any] | None = None
        self.entries: dict[int, _Entry] = {}
        self.fully_restored = False
        self._handle: TextIO | None = None

    @classmethod
    def locked(cls, path: Path) -> _Journal:
        """The journal at ``path``, locked for this run, then read (so no other run can append meanwhile)."""
        journal = cls(path)
        journal.lock()
        journal._load()
        journal._end_torn_line()
        return journal

    def _end_torn_line(self) -> None:
        # A kill in the middle of a write leaves a last line without its newline; the next
        # record must start on a line of its own or it would be lost with the torn one.
        with open(self.path, "rb") as handle:
            if handle.seek(0, os.SEEK_END) == 0:
                return
            handle.seek(-1, os.SEEK_END)
            torn = handle.read(1) != b"\n"
        if torn and self._handle is not None:
            self._handle.write("\n")
            self._handle.flush()

    def _load(self) -> None:
        for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a torn last line: the action it began is treated as not begun
            kind = rec.get("type")
            if kind == "header":
                self.header = rec
            elif kind == "begin":
                action = Action.from_json(rec["action"])
                self.entries[rec["seq"]] = _Entry(rec["seq"], action, Path(rec["backup"]))
                self.fully_restored = False
            elif kind == "done" and rec["seq"] in self.entries:
                self.entries[rec["seq"]].done = True
                self.entries[rec["seq"]].fixed_hash = rec.get("fixed_hash")
            elif kind == "restored" and rec["seq"] in self.entries:
                self.entries[rec["seq"]].restored = True
            elif kind == "restored_all":
                self.fully_restored = True

    def by_key(self) -> dict[str, _Entry]:
        """The live (not restored) entry of each file; a restored one is history, not work done."""
        live = (e for e in sorted(self.entries.values(), key=lambda e: e.seq) if not e.restored)
        return {entry.action.key: entry for entry in live}

    def next_seq(self) -> int:
        return max(self.entries, default=-1) + 1

    def write(self, record: Mapping[str, Any], *, durable: bool = True) -> None:
        """Append one record; ``durable`` ones are on disk before the caller touches any file.

        Only ``begin`` must be durable: a lost ``done`` or ``restored`` line just makes a re-run
        look at that file again, and every step is safe to repeat. ``close`` syncs the rest.
        """
        if self._handle is None:
            self.lock()
        assert self._handle is not None
        self._handle.write(json.dumps(record, sort_keys=True) + "\n")
        self._handle.flush()
        if durable:
            os.fsync(self._handle.fileno())

    def lock(self) -> None:
        """Open the journal for appending and hold an exclusive lock on it until ``close``.

        Two runs working on one journal would interleave their records and race for the
        same files; the second one is refused instead.
        """
        if self._handle is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        created = not self.path.exists()
        self._handle = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - kept open for the run
        if created:
            fsync_dir(self.path.parent)
        try:
            import fcntl  # POSIX only; elsewhere the run goes unlocked
        except ImportError:
            return
        try:
            fcntl.flock(self._handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            self.close()
            raise ApplyRefused(
                f"another apply or restore is running on journal {self.path}; wait for it to finish"
            ) from exc

    def begin(self, action: Action, backup: Path) -> _Entry:
        entry = _Entry(self.next_seq(), action, backup)
        self.write({"type": "begin", "seq": entry.seq, "action": action.to_json(), "backup": str(backup)})
        self.entries[entry.seq] = entry
        return entry

    def close(self) -> None:
        if self._handle is not None:
            os.fsync(self._handle.fileno())
            self._handle.close()
            self._handle = None


# ----------------------------------------------------------------------------- guard rails


def check_backup_root(backup_root: Path, roots: Mapping[str, Path], journal_path: Path | None = None) -> None:
    """Refuse a backup root inside a dataset root or containing one, and a journal inside a root.

    A backup inside the dataset would be read back as dataset files by the next inventory
    (and a move into it could collide with a real file); paths are compared after
    resolving symlinks.
    """
    backup = Path(backup_root).resolve()
    for split, root in roots.items():
        real_root = Path(root).resolve()
        if backup == real_root or backup.is_relative_to(real_root):
            raise ApplyRefused(
                f"backup root {backup} lies inside the dataset root of split {split!r} ({real_root}); "
                "choose a backup folder outside every dataset root"
            )
        if real_root.is_relative_to(backup):
            raise ApplyRefused(
                f"dataset root of split {split!r} ({real_root}) lies inside the backup root {backup}; "
                "choose a backup folder outside every dataset root"
            )
        if journal_path is not None and Path(journal_path).resolve().is_relative_to(real_root):
            raise ApplyRefused(
                f"journal {journal_path} lies inside the dataset root of split {split!r}; keep it outside"
            )


def _open_journal(
    journal_path: Path, backup_root: Path, roots: Mapping[str, Path]
) -> tuple[_Journal, Path | None]:
    """The journal to append to, and where a fully restored one at that path was archived (if it was)."""
    journal = _Journal.locked(journal_path)
    archived = None
    if journal.header is not None and journal.fully_restored:
        # A restored journal is history: keep it beside the new one instead of appending to it.
        journal.close()
        archived = _free_name(journal_path)
        journal_path.rename(archived)
        journal = _Journal.locked(journal_path)
    if journal.header is None:
        journal.write(
            {
                "type": "header",
                "version": JOURNAL_VERSION,
                "created": datetime.now(UTC).isoformat(timespec="seconds"),
                "backup_root": str(backup_root),
                "roots": {split: str(Path(root).absolute()) for split, root in roots.items()},
            }
        )
        journal.header = {"backup_root": str(backup_root)}
    elif journal.header.get("backup_root") != str(backup_root):
        journal.close()
        raise ApplyRefused(
            f"journal {journal_path} belongs to backup root {journal.header.get('backup_root')}, "
            f"not {backup_root}; re-run with that backup root, or restore it first"
        )
    return journal, archived


def _free_name(path: Path) -> Path:
    n = 1
    while (candidate := path.with_name(f"{path.name}.restored-{n}")).exists():
        n += 1
    return candidate


# ----------------------------------------------------------------------------- apply


def apply_actions(
    actions: Sequence[Action],
    *,
    roots: Mapping[str, Path],
    backup_root: Path,
    journal_path: Path,
    confirm: bool,
    input_kind: str = "directory",
    jpeg_quality: int = 95,
    progress: ProgressFn | None = None,
    _fail_after: int | None = None,
) -> ApplySummary:
    """Carry out ``actions``: journal, back up, then move or fix, one file at a time.

    Re-running with the same journal after a crash finishes what was begun and skips what
    is done. An action whose file changed since the plan, whose backup path holds a
    different file, or whose fix fails is skipped and listed in ``summary.failed``; nothing
    of it is lost. ``_fail_after=n`` (tests) raises :class:`SimulatedCrash` after n actions,
    just after the journal records the next one and before any file is touched.
    """
    if not confirm:
        raise ApplyRefused(
            f"apply moves {len(actions)} file(s) out of the dataset and rewrites fixed ones in place; "
            "it runs only with confirm=True (run config `confirm: true`, or `curate apply --confirm`)"
        )
    if input_kind != "directory":
        raise ApplyRefused(_webdataset_message(f"the dataset's input kind is {input_kind!r}"))
    start = time.perf_counter()
    backup_root = Path(backup_root).resolve()
    journal_path = Path(journal_path).absolute()
    check_backup_root(backup_root, roots, journal_path)
    for action in actions:
        _check_inside(action, roots)
    journal, archived = _open_journal(journal_path, backup_root, roots)
    summary = ApplySummary(journal=str(journal_path), backup_root=str(backup_root))
    summary.archived_journal = str(archived) if archived else ""
    previous = journal.by_key()
    finished = 0
    try:
        for done, action in enumerate(actions, 1):
            entry = previous.get(action.key)
            try:
                if entry is not None and entry.action != action:
                    raise _ActionFailed(
                        f"the journal has a different action for {action.key}: {entry.action}"
                    )
                if entry is not None and entry.done:
                    summary.skipped += 1
                else:
                    verified = entry is None
                    if entry is None:
                        _precheck(action, action.backup_path(backup_root))
                        entry = journal.begin(action, action.backup_path(backup_root))
                        if _fail_after is not None and finished >= _fail_after:
                            raise SimulatedCrash(f"simulated kill after {finished} action(s)")
                    fixed_hash = _carry_out(entry, jpeg_quality, summary, verified=verified)
                    journal.write({"type": "done", "seq": entry.seq, "fixed_hash": fixed_hash}, durable=False)
                    finished += 1
            except _ActionFailed as exc:
                summary.failed.append((action.image_id, str(exc)))
            except Exception as exc:  # a fix that cannot be decoded, an I/O error: skip, keep going
                message = describe_error(exc)
                if entry is not None:
                    journal.write({"type": "error", "seq": entry.seq, "message": message}, durable=False)
                summary.failed.append((action.image_id, message))
            if progress is not None:
                progress(done, len(actions))
    finally:
        journal.close()
    summary.seconds = time.perf_counter() - start
    return summary


def _check_inside(action: Action, roots: Mapping[str, Path]) -> None:
    """Every path an action touches lies inside its split's root (a journal cannot be aimed elsewhere)."""
    root = Path(os.path.normpath(Path(roots[action.split]).absolute())) if action.split in roots else None
    for path in (action.source, action.target):
        if root is None or not Path(os.path.normpath(path)).is_relative_to(root):
            raise ApplyRefused(
                f"{action.image_id}: {path} is outside the dataset root of split {action.split!r}"
            )


def _precheck(action: Action, backup: Path) -> None:
    """Before journaling: the file is still the planned one and its backup path is free (or identical)."""
    source = Path(action.source)
    if source.is_symlink():
        raise _ActionFailed(f"{source} is a symlink; apply moves and fixes real files only")
    if not source.is_file():
        raise _ActionFailed(f"{source} does not exist (already moved, or removed outside this tool)")
    if action.content_hash and hash_file(source) != action.content_hash:
        raise _ActionFailed(f"{source} changed since the plan was made; re-run the decisions first")
    if (backup.exists() or backup.is_symlink()) and not _holds(backup, action.content_hash):
        raise _ActionFailed(f"backup path {backup} already holds a different file; it is never overwritten")
    target = Path(action.target)
    if target != source and (target.exists() or target.is_symlink()):
        raise _ActionFailed(f"the fixed image's name {target} is taken by another file")


def _carry_out(entry: _Entry, jpeg_quality: int, summary: ApplySummary, *, verified: bool) -> str | None:
    """Do (or finish) one journaled action; idempotent, so a re-run after a kill may repeat it.

    ``verified``: the precheck has just hashed the source (a fresh action, not a recovery).
    """
    action, backup = entry.action, entry.backup
    source, h = Path(action.source), action.content_hash
    if action.kind == REMOVE:
        if source.exists():
            if not verified and not _holds(source, h):
                raise _ActionFailed(f"{source} changed since the plan was made; left in place")
            if backup.exists():
                if not _holds(backup, h):
                    raise _ActionFailed(
                        f"backup path {backup} holds a different file; it is never overwritten"
                    )
                source.unlink()  # the backup already holds these bytes: a move cut short
                fsync_dir(source.parent)
            else:
                move_no_overwrite(source, backup, h)
                summary.bytes_backed_up += action.size_bytes
        elif not _holds(backup, h):
            raise _ActionFailed(f"{source} is gone and the backup {backup} does not hold it")
        summary.removed += 1
        return None
    # A fix: the original goes to the backup first, and the fixed image is always made from
    # the backup, so a re-run after a kill rebuilds it from the verified original.
    if not backup.exists():
        _copy_no_overwrite(source, backup, h)  # verifies the bytes against h while copying
        summary.bytes_backed_up += action.size_bytes
    original = backup.read_bytes()
    if xxhash.xxh3_128_hexdigest(original) != h:
        raise _ActionFailed(f"backup path {backup} holds a different file; it is never overwritten")
    recipe = parse_recipe(action.fixes, action.rotate)
    _, fmt = output_name(action.rel_path, recipe)
    data = original if fmt is None else render_fixed(original, recipe, fmt, jpeg_quality=jpeg_quality)
    target = Path(action.target)
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)
    if target != source and source.exists() and _holds(source, h):
        source.unlink()
    fsync_dir(target.parent)
    summary.fixed += 1
    return xxhash.xxh3_128_hexdigest(data)


# ----------------------------------------------------------------------------- restore


def restore_journal(journal_path: Path, *, progress: ProgressFn | None = None) -> RestoreSummary:
    """Undo every action of a journal, last first; each original comes back with its hash verified.

    A file the apply did not write is never overwritten: such an action is listed in
    ``summary.conflicts`` and its backup stays where it is. Restoring twice is harmless.
    """
    journal_path = Path(journal_path).absolute()
    if not journal_path.is_file():
        raise ApplyRefused(f"no journal at {journal_path}; nothing was applied there")
    start = time.perf_counter()
    journal = _Journal.locked(journal_path)
    summary = RestoreSummary(journal=str(journal_path))
    entries = sorted(journal.entries.values(), key=lambda e: e.seq, reverse=True)
    try:
        for done, entry in enumerate(entries, 1):
            if entry.restored:
                summary.skipped += 1
            else:
                try:
                    _restore_one(entry)
                    journal.write({"type": "restored", "seq": entry.seq}, durable=False)
                    summary.restored += 1
                except Exception as exc:  # one stuck file never stops the others coming back
                    message = str(exc) if isinstance(exc, _ActionFailed) else describe_error(exc)
                    summary.conflicts.append((entry.action.image_id, message))
            if progress is not None:
                progress(done, len(entries))
        if not summary.conflicts and not journal.fully_restored:
            journal.write({"type": "restored_all", "at": datetime.now(UTC).isoformat(timespec="seconds")})
    finally:
        journal.close()
    summary.seconds = time.perf_counter() - start
    return summary


def _restore_one(entry: _Entry) -> None:
    action, backup = entry.action, entry.backup
    source, target, h = Path(action.source), Path(action.target), action.content_hash
    ours = _written_by_apply(entry)
    if backup.exists() and not _holds(backup, h):
        raise _ActionFailed(f"backup {backup} no longer holds the original; left as it is")
    if source.exists():
        if _holds(source, h):
            if backup.exists():
                backup.unlink()  # the original is back already: a restore cut short
        elif action.kind == FIX and target == source and ours(source) and backup.exists():
            move_over(backup, source)  # the fixed image goes, the original comes back
        else:
            raise _ActionFailed(f"{source} now holds a file this tool did not write; backup kept at {backup}")
    elif backup.exists():
        move_no_overwrite(backup, source, h)
    else:
        raise _ActionFailed(f"neither {source} nor its backup {backup} exists")
    if not _holds(source, h):
        raise _ActionFailed(f"{source} does not hash to {h} after the restore")
    if action.kind == FIX and target != source and target.exists():
        if not ours(target):
            raise _ActionFailed(f"{target} was changed after the fix; the original is back, {target} kept")
        target.unlink()
        fsync_dir(target.parent)


def _written_by_apply(entry: _Entry) -> Callable[[Path], bool]:
    """Whether a file is the fixed image apply wrote (when the journal never saw 'done', any file is:
    before journaling, apply checked the target was free or was the original itself)."""

    def check(path: Path) -> bool:
        return entry.fixed_hash is None or _holds(path, entry.fixed_hash)

    return check


# ----------------------------------------------------------------------------- the registry of applies
#
# The journal lives in the backup root, which `curate apply --backup-root` may choose for one
# run only; restore must not depend on the user repeating it. So every apply is also entered
# in a small JSON registry in the project's store, which restore reads to find the journal.

REGISTRY_VERSION = 1


@dataclass
class AppliedRecord:
    """One apply journal as the registry knows it (a re-run on the same journal updates its record)."""

    journal: str
    backup_root: str
    applied_at: str  # UTC, the latest run that wrote to this journal
    seq: int  # registry-wide order of the latest run: sorts applies made within one clock tick
    removed: int = 0  # over every run on this journal
    fixed: int = 0
    failed: int = 0  # in the latest run
    runs: int = 1
    run_id: str | None = None  # the latest run's id, where a job ran it
    restored_at: str | None = None
    restore_conflicts: int = 0  # files the latest restore left alone (the apply then stays unrestored)

    @property
    def restored(self) -> bool:
        return self.restored_at is not None

    def describe(self) -> str:
        state = f"restored {self.restored_at}" if self.restored else "not restored"
        failed = f", {self.failed} failed" if self.failed else ""
        return (
            f"{self.applied_at}: {self.removed} removed, {self.fixed} fixed{failed}, "
            f"backup {self.backup_root}, journal {self.journal} ({state})"
        )


def read_registry(path: Path) -> list[AppliedRecord]:
    """Every apply recorded at ``path``, oldest first; none when the file does not exist yet."""
    path = Path(path)
    if not path.is_file():
        return []
    data = json.loads(path.read_text(encoding="utf-8"))
    return sorted((AppliedRecord(**record) for record in data.get("applies", [])), key=lambda r: r.seq)


def unrestored_applies(records: Sequence[AppliedRecord]) -> list[AppliedRecord]:
    """The applies not yet restored, latest first: the first is the one a bare restore reverses."""
    return sorted((r for r in records if not r.restored), key=lambda r: r.seq, reverse=True)


def record_apply(path: Path, summary: ApplySummary, *, run_id: str | None = None) -> AppliedRecord | None:
    """Enter an apply run in the registry at ``path``; returns its record (None: nothing was journaled).

    A run on a journal that is still unrestored (a re-run after a crash, or a second apply to
    the same backup root, which appends to the same journal) updates that journal's record,
    since one restore reverses both. A journal that apply archived because it was fully
    restored keeps its record under the archived name.
    """
    with _registry_update(Path(path)) as records:
        if summary.archived_journal:
            for record in records:
                if record.journal == summary.journal:
                    record.journal = summary.archived_journal
                    record.restored_at = record.restored_at or _now()  # the journal said so itself
        if not (summary.removed or summary.fixed or summary.skipped or summary.failed):
            return None  # an empty journal: nothing a restore could reverse
        seq = max((r.seq for r in records), default=0) + 1
        record = next((r for r in records if r.journal == summary.journal and not r.restored), None)
        if record is None:
            record = AppliedRecord(
                journal=summary.journal, backup_root=summary.backup_root, applied_at=_now(), seq=seq, runs=0
            )
            records.append(record)
        record.applied_at, record.seq, record.run_id = _now(), seq, run_id
        record.removed += summary.removed
        record.fixed += summary.fixed
        record.failed = len(summary.failed)
        record.runs += 1
        return record


def record_restore(path: Path, summary: RestoreSummary) -> AppliedRecord | None:
    """Mark the journal ``summary`` restored, when nothing was left in conflict; None if unrecorded."""
    with _registry_update(Path(path)) as records:
        record = next((r for r in records if r.journal == summary.journal and not r.restored), None)
        if record is not None:
            record.restore_conflicts = len(summary.conflicts)
            if not summary.conflicts:  # files left alone: a bare restore must come back to this one
                record.restored_at = _now()
        return record


def journal_restored(journal_path: Path) -> bool:
    """Whether every action of the journal at ``journal_path`` has been restored (read without locking)."""
    journal = _Journal(Path(journal_path))
    journal._load()
    return journal.fully_restored or all(e.restored for e in journal.entries.values())


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@contextlib.contextmanager
def _registry_update(path: Path) -> Iterator[list[AppliedRecord]]:
    """Read, let the body change, and atomically rewrite the registry, under an exclusive lock.

    The lock is a separate file: the registry itself is replaced by rename, and a lock on a
    replaced file would not stop a second writer that opened the new one.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "a", encoding="utf-8") as lock:
        try:
            import fcntl  # POSIX only; elsewhere updates go unlocked
        except ImportError:
            fcntl = None
        if fcntl is not None:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)  # updates take milliseconds: wait, don't refuse
        records = read_registry(path)
        yield records
        document = {"version": REGISTRY_VERSION, "applies": [asdict(r) for r in records]}
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        fsync_dir(path.parent)


# ----------------------------------------------------------------------------- file moves


def _holds(path: Path, content_hash: str) -> bool:
    """True when ``path`` is a regular file whose bytes hash to ``content_hash``."""
    try:
        return path.is_file() and not path.is_symlink() and hash_file(path) == content_hash
    except OSError:
        return False


def move_no_overwrite(source: Path, dest: Path, content_hash: str | None) -> None:
    """Move ``source`` to ``dest``, failing if ``dest`` exists; one complete copy exists at every instant.

    A hardlink makes the new name (link creation fails rather than replace an existing file),
    then the old name goes. Across filesystems the bytes are copied to a temporary file,
    verified against ``content_hash``, linked into place, and only then is the source removed.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        dest.hardlink_to(source)
    except FileExistsError as exc:
        raise _ActionFailed(f"{dest} exists; it is never overwritten") from exc
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.ENOTSUP, errno.EMLINK, errno.EOPNOTSUPP):
            raise
        _copy_no_overwrite(source, dest, content_hash)
    fsync_dir(dest.parent)  # the new name is on disk before the old one goes
    # No fsync after the unlink: if a crash brings the source back, the re-run finds it
    # identical to its backup and removes it then.
    source.unlink()


def _copy_no_overwrite(source: Path, dest: Path, content_hash: str | None) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    with temp_beside(dest) as tmp:  # linked into place below, never renamed over a file
        copy_verified(source, tmp, content_hash)
        try:
            dest.hardlink_to(tmp)
        except FileExistsError as exc:
            raise _ActionFailed(f"{dest} exists; it is never overwritten") from exc
        except OSError:
            if dest.exists():  # no hardlinks here: a checked rename, the best this filesystem allows
                raise _ActionFailed(f"{dest} exists; it is never overwritten") from None
            tmp.rename(dest)
    fsync_dir(dest.parent)


def move_over(source: Path, dest: Path) -> None:
    """Replace ``dest`` by ``source`` atomically (a restore of a fixed file), then drop ``source``."""
    try:
        source.replace(dest)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        with atomic_path(dest) as tmp:
            copy_verified(source, tmp, None)
        source.unlink()
    fsync_dir(dest.parent)
    fsync_dir(source.parent)
