"""What the fault tests share: the corpus tally, a writer process to kill, a real tmpfs, the row count.

Every test that injects a real fault records it with ``TALLY.record``; the session's summary (conftest's
``pytest_terminal_summary``) prints one table per kind and the line
``faults injected N, rows checked M, lost L, duplicated D``. ``pytest -m faults`` (``make test-faults``) runs
every fault test, slow ones included, as one suite.

Rows are checked end to end: each id the test wrote must be committed exactly once with the checksum of the
bytes the writer was given (the manifest's checksum, which ``verify_store`` checks against the stored data).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from synthetic import PARTS, TEACHERS, expected_checksums, plan, prepared, write_missing

from radio_dist.store import FeatureStore, WriterLock, verify_store


@dataclass
class Kind:
    faults: int = 0
    rows: int = 0
    lost: int = 0
    duplicated: int = 0
    tests: set[str] = field(default_factory=set)


class Tally:
    """Faults injected and rows checked per kind of fault, over one test session."""

    def __init__(self) -> None:
        self.kinds: dict[str, Kind] = {}
        self._lock = threading.Lock()

    def record(self, kind: str, faults: int, rows: int, lost: int = 0, duplicated: int = 0) -> None:
        test = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]
        with self._lock:
            k = self.kinds.setdefault(kind, Kind())
            k.faults += faults
            k.rows += rows
            k.lost += lost
            k.duplicated += duplicated
            k.tests.add(test.rsplit("::", 1)[-1])

    def lines(self) -> list[str]:
        if not self.kinds:
            return []
        width = max(len(k) for k in self.kinds)
        out = [f"{'fault':<{width}}  faults  rows checked  lost  duplicated  tests"]
        for name, k in sorted(self.kinds.items()):
            out.append(
                f"{name:<{width}}  {k.faults:>6}  {k.rows:>12}  {k.lost:>4}  {k.duplicated:>10}  {len(k.tests)}"
            )
        total = Kind()
        for k in self.kinds.values():
            total.faults += k.faults
            total.rows += k.rows
            total.lost += k.lost
            total.duplicated += k.duplicated
        out.append(
            f"faults injected {total.faults}, rows checked {total.rows}, lost {total.lost}, "
            f"duplicated {total.duplicated}"
        )
        return out


TALLY = Tally()


def check_rows(store: FeatureStore, expected: dict[str, str]) -> tuple[int, int, int]:
    """(rows checked, lost, duplicated) of ``store`` against ``expected`` (id -> checksum as written).

    Lost: an expected id not committed, or committed with other bytes. Duplicated: an id committed twice.
    The store must also pass ``verify_store`` (the stored data matches the manifest's checksums)."""
    rows = store.manifest(columns=["id", "checksum"]).to_pylist()
    got: dict[str, str] = {}
    for r in rows:
        got.setdefault(r["id"], r["checksum"])
    lost = sum(got.get(i) != c for i, c in expected.items())
    duplicated = len(rows) - len(got)
    report = verify_store(store)
    assert report["ok"], report["problems"]
    return len(rows), lost, duplicated


# -- a writer process to kill --------------------------------------------------------------------------------
def resume_writing(url: str, options: dict[str, Any] | None, n_shards: int) -> None:
    """A caching job in miniature: open (or create) the store, take the writer lock (a killed writer's is
    taken over), write every shard of ``synthetic.plan(n_shards)`` not yet committed."""
    store = FeatureStore(url, options)
    if not store.exists() or not store.has_phis():
        prepared(store)
    else:
        store.init_or_check(PARTS, TEACHERS)
    with WriterLock(store):
        write_missing(store, plan(n_shards))


_CONTEXT: multiprocessing.context.BaseContext | None = None


def writer_context() -> multiprocessing.context.BaseContext:
    """Processes forked from a server that has already imported the store (a fresh interpreter takes ~3 s
    to import torch via PHI-S; a fork takes milliseconds), single-threaded when it forks."""
    global _CONTEXT
    if _CONTEXT is None:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["faultkit"])
        _CONTEXT = ctx
    return _CONTEXT


def expected_rows(n_shards: int) -> dict[str, str]:
    return expected_checksums(plan(n_shards))


# -- a real size-limited or read-only file system -------------------------------------------------------------
def can_mount() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("mount") is not None


@contextlib.contextmanager
def tmpfs(mnt: Path, options: str) -> Iterator[Path]:
    """A real tmpfs mounted at ``mnt`` with ``options`` (size=..., ro), unmounted after; the test is skipped
    where mounting is not allowed."""
    mnt.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mnt)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def compacting(url: str, fanout: int, started: Any) -> None:
    """`radio-dist store compact` in a process (to be killed); sets ``started`` (an Event) as it begins."""
    from radio_dist.store.compact import compact_store

    store = FeatureStore(url)
    started.set()
    compact_store(store, fanout=fanout)
