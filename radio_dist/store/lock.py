"""The writer lock: one caching job writes a store at a time; a second one is refused, naming the holder."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from typing import Any

from radio_dist.store.errors import StoreLockedError
from radio_dist.store.feature_store import FeatureStore

LOCK_REL = "locks/writer.json"


class WriterLock:
    """One caching job writes a store at a time; a second one is refused with who holds it.

    The lock is an object created exclusively (``O_EXCL`` locally, a conditional PUT — If-None-Match — on
    object stores) holding owner, host, pid and a heartbeat the holder refreshes every ``ttl_s / 4``. A lock
    whose holder is gone (same host and its pid is dead, or a heartbeat older than ``ttl_s``) is taken over,
    so a job killed with SIGKILL can be re-run at once on the same machine, and after ``ttl_s`` elsewhere.
    """

    def __init__(self, store: FeatureStore, job: str = "cache-teachers", ttl_s: float = 120.0) -> None:
        self.store, self.job, self.ttl_s = store, job, ttl_s
        self.owner = uuid.uuid4().hex
        self._made: list[str] = []  # local folders the lock created (the store's, its locks/)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> bytes:
        now = time.time()
        return json.dumps(
            {"owner": self.owner, "job": self.job, "host": socket.gethostname(), "pid": os.getpid(),
             "started": getattr(self, "_started", now), "heartbeat": now}
        ).encode()  # fmt: skip

    def _create(self) -> bool:
        path = self.store.path(LOCK_REL)
        data = self._record()
        if self.store.is_local:
            folders = [os.path.dirname(path), self.store.path("")]
            self._made = [d for d in folders if not os.path.isdir(d)]  # removed again if no store came of it
            os.makedirs(os.path.dirname(path), exist_ok=True)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
            except OSError as e:  # a full disk, say: no empty lock file left behind, and the path named
                with contextlib.suppress(OSError):
                    os.remove(path)
                raise OSError(e.errno, e.strerror, path) from e
            return True
        try:
            self.store.fs.pipe_file(path, data, mode="create")
        except (FileExistsError, OSError) as e:
            if isinstance(e, FileExistsError) or "PreconditionFailed" in str(e) or "412" in str(e):
                return False
            raise
        return True

    def holder(self) -> dict[str, Any] | None:
        path = self.store.fresh(self.store.path(LOCK_REL))
        try:
            return dict(json.loads(self.store.fs.cat_file(path)))
        except FileNotFoundError:
            return None
        except ValueError:  # a torn lock file (its writer died mid-write): treat as stale
            return {"heartbeat": 0.0}

    def _stale(self, info: dict[str, Any]) -> bool:
        if time.time() - float(info.get("heartbeat", 0.0)) > self.ttl_s:
            return True
        if info.get("host") == socket.gethostname() and isinstance(info.get("pid"), int):
            try:
                os.kill(info["pid"], 0)
            except ProcessLookupError:
                return True
            except PermissionError:
                return False
        return False

    def acquire(self) -> WriterLock:
        self._started = time.time()
        for _ in range(3):
            if self._create():
                break
            info = self.holder()
            if info is None:
                continue  # released meanwhile
            if not self._stale(info):
                age = time.time() - float(info.get("heartbeat", 0.0))
                raise StoreLockedError(
                    f"store {self.store.url} is being written by another {info.get('job', 'job')}: host "
                    f"{info.get('host')} pid {info.get('pid')}, started "
                    f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(float(info.get('started', 0))))}, "
                    f"heartbeat {age:.0f} s ago. Wait for it to finish (re-running then resumes where it "
                    f"stopped); if it is dead, its lock expires {self.ttl_s:.0f} s after its last heartbeat "
                    f"(or delete {self.store.path(LOCK_REL)})."
                )
            self.store.fs.rm_file(self.store.path(LOCK_REL))  # a dead holder's lock: take it over
        else:
            raise StoreLockedError(f"store {self.store.url}: could not take the writer lock (contended)")
        self._thread = threading.Thread(target=self._beat, name="radio-dist-store-lock", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            info = self.holder()
            if info is None or info.get("owner") != self.owner:
                return  # taken over (we were presumed dead): the other job owns the store now
            self.store.put_atomic(LOCK_REL, self._record())

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        info = self.holder()
        if info is not None and info.get("owner") == self.owner:
            self.store.fs.rm_file(self.store.path(LOCK_REL))
        if self.store.is_local and not self.store.exists():  # a job that stopped before creating the store
            for d in self._made:  # leaves no directory it made (only empty ones go)
                with contextlib.suppress(OSError):
                    os.rmdir(d)

    def __enter__(self) -> WriterLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
