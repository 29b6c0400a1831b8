"""Code maps that follow their files without a restart.

Each worker process polls `config/codemaps/<source>/` (the files are the shared truth, so N workers
converge within one interval). A pass only stats the folder; when a source's stat fingerprint moves,
only that source is read, and if its content is new it is loaded with the same checks as at start.
Valid maps replace the source's entry in one assignment; refused ones leave the old maps serving.

Polling, not a watcher (watchfiles/inotify): a handful of small files, checked every few seconds, costs
a few stat calls; inotify misses the symlink swap of Kubernetes ConfigMap volumes and bind-mounted or
network folders, needs a native dependency and a thread per process, and still needs this same
"is it complete and valid" logic since editors and deploys write files in several steps.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from gateway.booking.codemaps import EMPTY, CodeMapError, SourceMaps, load_all, load_source_maps
from gateway.logs import log

MAP_SUFFIXES = frozenset({".json", ".yaml", ".yml"})  # what load_source_maps reads
# A file rewritten within the filesystem's timestamp granularity (up to 2 s on FAT and some network
# mounts) can keep its stat; while a file is that fresh its content is hashed again each pass.
_RACY_NS = 2_000_000_000

Fingerprint = tuple[tuple[str, int, int, int, int], ...] | None
OnReload = Callable[[str, bool, str | None], None]
_NEVER = object()


def _snapshot(folder: Path) -> tuple[Fingerprint, int]:
    """(name, size, mtime, ctime, inode) per map file, and the newest mtime; stat only. ctime and
    inode catch a copy that kept an old mtime (cp -p) and a rename over the file (rsync, editors).
    stat follows symlinks, so a ConfigMap's swapped `..data` link changes the fingerprint."""
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return None, 0
    out: list[tuple[str, int, int, int, int]] = []
    newest = 0
    for entry in entries:
        if Path(entry.name).suffix not in MAP_SUFFIXES:
            continue
        try:
            st = entry.stat()
        except FileNotFoundError:
            continue  # deleted since the listing (or a dangling link): the load will say which
        out.append((entry.name, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino))
        newest = max(newest, st.st_mtime_ns)
    return tuple(sorted(out)), newest


def _digest(folder: Path) -> str:
    """What the folder says, byte for byte: decides whether a stat change is a content change."""
    h = hashlib.sha256()
    if folder.is_dir():
        for path in sorted(p for p in folder.iterdir() if p.suffix in MAP_SUFFIXES):
            h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


@dataclass(slots=True)
class _State:
    seen: object = _NEVER  # the fingerprint last acted on; a racy one is not kept
    content: str | None = None  # digest of the content last loaded or refused
    problems: list[str] = field(default_factory=list)  # why the files on disk are not the maps in use
    failing: str | None = None  # exception type of an ongoing failure, so it is logged once


class LiveMaps(Mapping[str, SourceMaps]):
    """`{source: SourceMaps}` for the Booker, kept in step with the map files by `run()`."""

    def __init__(
        self,
        config_dir: Path,
        sources: list[str],
        *,
        interval_seconds: float = 2.0,
        on_reload: OnReload | None = None,
    ) -> None:
        self._config_dir = config_dir
        self._root = config_dir / "codemaps"
        self._sources = list(sources)
        self._interval = interval_seconds
        self._on_reload = on_reload
        self._lock = threading.Lock()  # check_now may also come from an admin handler's thread
        self._state = {s: _State() for s in self._sources}
        # fingerprints before the load, so an edit made during it is seen on the first pass
        for source, state in self._state.items():
            fp, newest = _snapshot(self._root / source)
            state.seen = _NEVER if _racy(newest) else fp
            state.content = _digest(self._root / source)
        self._maps: dict[str, SourceMaps] = load_all(config_dir, self._sources)  # a bad map stops the start

    # --- reads: plain dict lookups, no I/O ---

    def get(self, source: str, default: SourceMaps | None = None) -> SourceMaps | None:  # type: ignore[override]
        return self._maps.get(source, default)

    def __getitem__(self, source: str) -> SourceMaps:
        return self._maps[source]

    def __iter__(self) -> Iterator[str]:
        return iter(self._maps)

    def __len__(self) -> int:
        return len(self._maps)

    def versions(self) -> dict[str, str]:
        return {source: maps.version for source, maps in self._maps.items()}

    def files(self, source: str) -> list[str]:
        return list(self._maps.get(source, EMPTY).files)

    def problems(self, source: str) -> list[str]:
        """Why the source's files on disk were refused; [] when the maps in use are what is on disk."""
        state = self._state.get(source)
        return list(state.problems) if state else []

    # --- following the files ---

    async def run(self) -> None:
        """Check every `interval_seconds` until cancelled; never raises otherwise."""
        while True:
            await asyncio.sleep(self._interval)
            try:
                self.check_now()
            except Exception as exc:  # check_now guards each source; this is the last net
                log.error("codemaps_check_failed", error=type(exc).__name__)

    def check_now(self) -> dict[str, bool]:
        """One pass over every source: `{source: True}` for maps swapped in, `{source: False}` for a
        refused or unreadable change; sources with nothing new are absent."""
        events: dict[str, bool] = {}
        with self._lock:
            for source in self._sources:
                state = self._state[source]
                try:
                    outcome = self._check(source, state)
                    state.failing = None
                except Exception as exc:  # an I/O error or a bug: keep serving the old maps
                    outcome = None  # state.seen is left as it was, so the next pass tries again
                    if state.failing != type(exc).__name__:
                        state.failing = type(exc).__name__
                        log.error("codemaps_check_failed", source=source, error=state.failing)
                        outcome = (False, None)
                if outcome is not None:
                    events[source] = outcome[0]
                    self._notify(source, *outcome)
        return events

    def _check(self, source: str, state: _State) -> tuple[bool, str | None] | None:
        folder = self._root / source
        fp, newest = _snapshot(folder)
        if fp == state.seen:
            return None
        content = _digest(folder)
        # a racy fingerprint is not kept, so the next pass hashes the content again
        keep = _NEVER if _racy(newest) else fp
        if content == state.content:
            state.seen = keep
            return None
        current = self._maps.get(source, EMPTY)
        try:
            maps = load_source_maps(folder, self._config_dir)
        except CodeMapError as exc:
            state.seen, state.content, state.problems = keep, content, list(exc.problems)
            # config file names and element paths only: a map holds no patient data
            log.warning("codemaps_refused", source=source, problems=state.problems, serving=current.version)
            return False, None
        was_refused = bool(state.problems)
        state.seen, state.content, state.problems = keep, content, []
        if maps.version == current.version and not was_refused:
            return None  # same maps (e.g. a file rewritten with what it held)
        self._maps[source] = maps  # one assignment: a booking sees the old maps or the new, never a mix
        log.info("codemaps_reloaded", source=source, version=maps.version, previous=current.version,
                 files=len(maps.files))
        return True, maps.version

    def _notify(self, source: str, ok: bool, version: str | None) -> None:
        if self._on_reload is None:
            return
        try:
            self._on_reload(source, ok, version)
        except Exception as exc:  # a metrics hook must not stop the reloads
            log.error("codemaps_hook_failed", source=source, error=type(exc).__name__)


def _racy(newest_ns: int) -> bool:
    return newest_ns >= time.time_ns() - _RACY_NS
