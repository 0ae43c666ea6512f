"""A training job's run directory (``out``, local or on an object store) and its append-only logs.

``OUT/metrics.jsonl`` holds one JSON line per logged step (``read_metrics``); other logs (the distillation's
sample audit) use the same ``RunLog``.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import fsspec


class RunDir:
    """A run directory (``out``): a local path or an fsspec URL with its storage options."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        self.url = url
        self.storage_options = dict(storage_options or {})
        self.fs, root = fsspec.core.url_to_fs(url, **self.storage_options)
        self.root = root.rstrip("/")
        self.is_local = isinstance(self.fs, fsspec.implementations.local.LocalFileSystem)

    def path(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def open(self, rel: str, mode: str) -> Any:
        if "w" in mode or "a" in mode:
            self.fs.makedirs(self.path(rel).rsplit("/", 1)[0], exist_ok=True)
        return self.fs.open(self.path(rel), mode)

    def exists(self, rel: str) -> bool:
        return bool(self.fs.exists(self.path(rel)))

    def touch(self, rel: str) -> None:
        with self.open(rel, "w") as f:
            f.write(str(time.time()))

    def upload_dir(self, local: str, rel: str) -> None:
        """Copy a local directory's files to ``rel`` in the run directory (for run directories on object stores)."""
        root = Path(local)
        for f in sorted(root.rglob("*")):
            if f.is_file():
                self.fs.makedirs(self.path(f"{rel}/{f.relative_to(root).parent}").rstrip("/."), exist_ok=True)
                self.fs.put_file(str(f), self.path(f"{rel}/{f.relative_to(root)}"))

    def read_lines(self, rel: str) -> list[str]:
        if not self.exists(rel):
            return []
        return bytes(self.fs.cat_file(self.path(rel))).decode().splitlines()


class RunLog:
    """An append-only JSON-lines log in a run directory.

    Local: appended and flushed line by line. Object stores cannot append, so the log is kept in a local file
    (seeded with what the store already holds) and uploaded whole by ``sync()`` — the training loop syncs at
    every checkpoint, so what an object store holds is exactly what the last checkpoint covers; lines after it
    belong to steps a restart rolls back anyway.
    """

    def __init__(self, run: RunDir, rel: str) -> None:
        self.run, self.rel = run, rel
        if run.is_local:
            self._f = run.open(rel, "a")
            self._tmp = None
        else:
            self._tmp = tempfile.NamedTemporaryFile("w+", suffix=".jsonl", delete=False)  # noqa: SIM115
            for line in run.read_lines(rel):
                self._tmp.write(line + "\n")
            self._f = self._tmp

    def write(self, record: dict[str, Any]) -> None:
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()

    def sync(self) -> None:
        if self._tmp is not None:
            self._tmp.flush()
            self.run.fs.makedirs(self.run.path(self.rel).rsplit("/", 1)[0], exist_ok=True)
            self.run.fs.put_file(self._tmp.name, self.run.path(self.rel))

    def close(self) -> None:
        self.sync()
        self._f.close()
        if self._tmp is not None:
            os.unlink(self._tmp.name)


def read_metrics(
    out: str | RunDir, storage_options: dict[str, Any] | None = None, step_key: str = "global_step"
) -> list[dict[str, Any]]:
    """The run's metrics, one dict per logged step; steps re-run after a restart keep their latest line."""
    run = out if isinstance(out, RunDir) else RunDir(out, storage_options)
    lines = [json.loads(line) for line in run.read_lines("metrics.jsonl") if line.strip()]
    latest = {line[step_key]: line for line in lines}
    return [latest[k] for k in sorted(latest)]
