"""Where bytes live: local paths or object storage (``s3://``, ``gs://``...) through fsspec.

Pure library, no Dagster. A *location* is a local path (a plain string, or ``file://``) or a
URL. Local locations stay :class:`pathlib.Path`, so the embedded default (``make demo``)
runs exactly as it always did; URLs become :class:`upath.UPath` objects, which offer the
same ``/``, ``is_file()``, ``open()``, ``glob()`` as a Path, on top of an fsspec filesystem.

Credentials and the endpoint come from the standard environment of each backend
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``...,
``GOOGLE_APPLICATION_CREDENTIALS``) or fsspec's own config; a project's ``storage_options``
add fsspec options on top. S3 gets short connect/read timeouts and bounded retries by
default, so an unreachable endpoint fails a step in seconds with a message naming the URL
and the setting to check (:func:`access_error`), never a hang.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

LOCAL_SCHEMES = frozenset({"", "file", "local"})
# A managed logger of the instance template (curation_assets/instance/dagster.yaml): what is
# logged here shows in the run's logs in the UI.
LOG = logging.getLogger("curation_assets.storage")
# botocore's defaults (60 s connect timeout, 5 legacy retries) turn a wrong endpoint into a
# many-minute hang; these fail within ~15 s and still ride out a transient error.
# Listings are not cached: another process (a step, the sensor) may have written since.
S3_DEFAULTS: dict[str, Any] = {
    "config_kwargs": {"connect_timeout": 5, "read_timeout": 60, "retries": {"max_attempts": 3}},
    "use_listings_cache": False,
}
# What to check, per scheme, when a location cannot be reached (named in the error).
SETTINGS_HINT = {
    "s3": "AWS_ENDPOINT_URL (the endpoint), AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE "
    "(credentials), or the project's storage_options",
    "gs": "GOOGLE_APPLICATION_CREDENTIALS or the project's storage_options",
}


def scheme_of(location: str | os.PathLike[str]) -> str:
    text = str(location)
    if "://" not in text:
        return ""
    return urlsplit(text).scheme.lower()


def is_remote(location: str | os.PathLike[str]) -> bool:
    """True for object-store URLs (``s3://``, ``gs://``, ``memory://``...), False for local paths."""
    return scheme_of(location) not in LOCAL_SCHEMES


def local_path(location: str) -> str:
    """A ``file://`` URL as a plain path; other strings unchanged."""
    return urlsplit(location).path if scheme_of(location) in ("file", "local") else location


_PROJECT_OPTIONS: dict[str, Any] = {}


def use_options(options: Mapping[str, Any] | None) -> None:
    """Make ``options`` (a project's ``storage_options``) the default of this process's reads.

    The store sets them when a step opens it, so dataset listings and reads deep in the
    ingest code need not carry them through every call.
    """
    _PROJECT_OPTIONS.clear()
    _PROJECT_OPTIONS.update(options or {})


def options_for(location: str | os.PathLike[str], options: Mapping[str, Any] | None = None) -> dict:
    """The fsspec options for ``location``: the scheme's safe defaults, then the project's."""
    if options is None:
        options = _PROJECT_OPTIONS
    merged: dict[str, Any] = {}
    if scheme_of(location) in ("s3", "s3a"):
        merged = json.loads(json.dumps(S3_DEFAULTS))
    for key, value in (options or {}).items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


def as_location(location: str | os.PathLike[str], options: Mapping[str, Any] | None = None) -> Path:
    """A Path for a local location, a UPath (fsspec-backed) for a URL."""
    if not is_remote(location):
        return Path(local_path(str(location)))
    from upath import UPath  # imported only for object storage: local projects never need it

    return UPath(str(location), **options_for(location, options))


@functools.cache
def _filesystem(protocol: str, frozen_options: str) -> Any:
    import fsspec

    return fsspec.filesystem(protocol, **json.loads(frozen_options))


def reset() -> None:
    """Forget the filesystems and reachability checks of this process (after the environment's
    endpoint or credentials changed: fsspec keeps one instance per option set)."""
    _filesystem.cache_clear()
    _REACHED.clear()
    with contextlib.suppress(ImportError):
        from s3fs import S3FileSystem

        S3FileSystem.clear_instance_cache()


def filesystem(location: str, options: Mapping[str, Any] | None = None) -> Any:
    """The fsspec filesystem for a URL, one per process and option set (connections are reused)."""
    opts = options_for(location, options)
    return _filesystem(scheme_of(location), json.dumps(opts, sort_keys=True, default=str))


def strip_scheme(url: str) -> str:
    """``s3://bucket/key`` -> ``bucket/key``: the form fsspec filesystem methods take."""
    return url.split("://", 1)[1] if "://" in url else url


def read_range(
    url: str, start: int | None, size: int | None, options: Mapping[str, Any] | None = None
) -> bytes:
    """The bytes of an object (``start`` None), or ``size`` bytes at ``start`` inside it."""
    fs = filesystem(url, options)
    path = strip_scheme(url)
    if start is None:
        return fs.cat_file(path)
    end = None if size is None else start + size
    data = fs.cat_file(path, start=start, end=end)
    if size is not None and len(data) != size:
        raise OSError(f"short read: {url} holds {len(data)} of the {size} bytes at offset {start}")
    return data


def open_input(location: str, options: Mapping[str, Any] | None = None, block_size: int = 8 << 20):
    """A binary, seekable, read-only handle on a local file or an object (read ahead in big blocks)."""
    if not is_remote(location):
        return open(local_path(location), "rb")
    fs = filesystem(location, options)
    return fs.open(strip_scheme(location), "rb", block_size=block_size, cache_type="readahead")


def access_error(location: str | os.PathLike[str], exc: BaseException, what: str = "") -> OSError:
    """An error that names the location, what was being done, and the settings to check."""
    scheme = scheme_of(location)
    hint = SETTINGS_HINT.get(scheme, "the project's storage_options")
    endpoint = os.environ.get("AWS_ENDPOINT_URL") if scheme in ("s3", "s3a") else None
    where = f" (endpoint {endpoint})" if endpoint else ""
    doing = f" while {what}" if what else ""
    return OSError(f"cannot access {location}{where}{doing}: {type(exc).__name__}: {exc}. Check {hint}.")


_REACHED: set[str] = set()  # locations this process has already reached (checked once each)


def check_reachable(location: str | os.PathLike[str], options: Mapping[str, Any] | None = None) -> None:
    """Fail fast, with :func:`access_error`'s message, when a URL's store cannot be listed."""
    if not is_remote(location):
        return
    url = str(location)
    key = f"{url}\0{json.dumps(options_for(url, options), sort_keys=True, default=str)}"
    if key in _REACHED:
        return
    try:
        fs = filesystem(url, options)
        fs.exists(strip_scheme(url))
    except Exception as exc:  # botocore / gcsfs raise many types; all mean "cannot use it"
        raise access_error(url, exc, "checking it exists") from exc
    _REACHED.add(key)


def as_path(location: str | os.PathLike[str] | Path) -> Path:
    """``location`` as a Path-like object: kept when it already is one (a Path or a UPath)."""
    return as_location(location) if isinstance(location, str) else location  # type: ignore[return-value]


def move(source: Path, target: Path) -> None:
    """Rename ``source`` onto ``target`` (locally atomic; on object storage a copy, then a delete)."""
    if is_remote(str(source)):
        source.rename(target)
    else:
        source.replace(target)


def put_text(path: Path, text: str) -> None:
    """Write a small text file whole: atomically locally, one PUT on object storage."""
    if is_remote(str(path)):
        path.write_text(text, encoding="utf-8")
        return
    from curation_assets.core.atomic import write_text

    write_text(path, text)


# ----------------------------------------------------------------------------- writes


@contextlib.contextmanager
def staged_upload(final: Path) -> Iterator[Path]:
    """Yield a local temporary file; on success upload it to ``final`` as one object.

    One PUT (or one multipart upload, which S3 also makes visible only when it completes):
    a reader never sees half an object under a final key, and a step killed mid-write
    leaves nothing there at all.
    """
    suffix = "".join(final.suffixes[-1:])
    handle, name = tempfile.mkstemp(prefix=".upload-", suffix=suffix)
    os.close(handle)
    tmp = Path(name)
    try:
        yield tmp
        fs = final.fs  # type: ignore[attr-defined]
        fs.put_file(str(tmp), final.path)  # type: ignore[attr-defined]
    finally:
        tmp.unlink(missing_ok=True)


def upload_tree(local: Path, remote: Path, last: tuple[str, ...] = (), skip_same_size: bool = False) -> int:
    """Upload every file under ``local`` to ``remote`` (one object each); returns how many were sent.

    ``last``: names (relative paths) uploaded after every other file, so that a manifest that
    makes the tree visible never names an object not yet there. ``skip_same_size``: an
    object already there with the same size is kept (a resumed export sends only the rest).
    """
    fs = remote.fs  # type: ignore[attr-defined]
    base = remote.path.rstrip("/")  # type: ignore[attr-defined]
    there: dict[str, int] = {}
    if skip_same_size:
        with contextlib.suppress(FileNotFoundError):
            there = {k: int(v.get("size") or 0) for k, v in fs.find(base, detail=True).items()}
    files = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
    ordered = [f for f in files if f not in last] + [f for f in last if f in files]
    sent = 0
    for rel in ordered:
        key = f"{base}/{rel}"
        if rel not in last and there.get(key) == (local / rel).stat().st_size:
            continue
        fs.put_file(str(local / rel), key)
        sent += 1
    return sent


def remove_tree(path: Path) -> None:
    """Delete a folder (local) or every object under a prefix (remote); missing is fine."""
    if isinstance(path, Path) and not is_remote(str(path)):
        shutil.rmtree(path, ignore_errors=True)
        return
    fs = path.fs  # type: ignore[attr-defined]
    with contextlib.suppress(FileNotFoundError):
        fs.rm(path.path, recursive=True)  # type: ignore[attr-defined]


# ----------------------------------------------------------------------------- local cache


class LocalCache:
    """A size-bounded local folder of copies of remote objects, for readers that need a file.

    Memory-mapping (vectors, prepared index inputs) and faiss's reader need a local file.
    Entries are named by the object's URL and its version (ETag, else size and mtime), so
    a rewritten object is fetched again and a stale copy is never used. When the folder
    grows past ``max_bytes`` the least recently used entries go first.
    """

    def __init__(self, folder: str | os.PathLike[str], max_bytes: int):
        self.folder = Path(folder)
        self.max_bytes = max_bytes

    def _entry(self, remote: Path) -> Path:
        info = remote.fs.info(remote.path)  # type: ignore[attr-defined]
        version = info.get("ETag") or f"{info.get('size')}:{info.get('LastModified') or info.get('mtime')}"
        digest = hashlib.sha1(f"{remote}\0{version}".encode()).hexdigest()[:20]
        return self.folder / f"{digest}-{remote.name}"

    def fetch_tree(self, remote: Path, log: Any = None) -> Path:
        """A local folder with every object under the ``remote`` prefix (downloaded once per version)."""
        fs = remote.fs  # type: ignore[attr-defined]
        found = fs.find(remote.path, detail=True)  # type: ignore[attr-defined]
        stamp = "\0".join(f"{k}:{v.get('ETag') or v.get('size')}" for k, v in sorted(found.items()))
        entry = self.folder / f"{hashlib.sha1(f'{remote}{stamp}'.encode()).hexdigest()[:20]}-{remote.name}"
        if (entry / ".complete").is_file():
            os.utime(entry)
            return entry
        started = time.perf_counter()
        remove_tree(entry)
        for key in found:
            local = entry / key[len(remote.path) :].lstrip("/")  # type: ignore[attr-defined]
            local.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(key, str(local))
        (entry / ".complete").touch()  # a copy cut short by a crash is fetched again, never used
        (log or LOG.info)(
            f"staged {remote} ({len(found)} files) in the local cache {self.folder} "
            f"in {time.perf_counter() - started:.1f} s"
        )
        self.evict(keep=entry)
        return entry

    def fetch(self, remote: Path, log: Any = None) -> Path:
        """A local copy of ``remote`` (downloaded once per version)."""
        entry = self._entry(remote)
        if entry.is_file():
            os.utime(entry)  # recently used: evicted last
            return entry
        self.folder.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        from curation_assets.core.atomic import atomic_path

        with atomic_path(entry, fsync=False) as tmp:
            remote.fs.get_file(remote.path, str(tmp))  # type: ignore[attr-defined]
        size = entry.stat().st_size
        (log or LOG.info)(
            f"staged {remote} in the local cache {self.folder} "
            f"({size / 2**20:.1f} MiB in {time.perf_counter() - started:.1f} s)"
        )
        self.evict(keep=entry)
        return entry

    def evict(self, keep: Path | None = None) -> None:
        """Remove least recently used entries until the folder fits ``max_bytes``."""
        entries = [p for p in self.folder.iterdir() if not p.name.startswith(".") and p.name != "work"]
        sizes = {p: _size(p) for p in entries}
        total = sum(sizes.values())
        for path in sorted(entries, key=lambda p: p.stat().st_mtime):
            if total <= self.max_bytes:
                break
            if path == keep:
                continue
            remove_tree(path) if path.is_dir() else path.unlink(missing_ok=True)
            total -= sizes[path]


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


__all__ = [
    "LocalCache",
    "access_error",
    "as_location",
    "check_reachable",
    "filesystem",
    "is_remote",
    "open_input",
    "options_for",
    "read_range",
    "remove_tree",
    "reset",
    "scheme_of",
    "staged_upload",
    "strip_scheme",
    "upload_tree",
    "use_options",
]
