"""Failures told plainly: an exception — however deep inside Ray, fsspec or botocore — as one line that names
the resource and what to do.

``explain(exc)`` finds the root cause (through ``raise ... from``, Ray's task and actor errors, Ray Train's
per-worker failures) and classifies it:

- radio-dist's own errors (bad config, store, source, weights, resume, non-finite training) keep their message;
- the file system: no space left, permission denied, read-only, a missing file;
- S3 and other object stores: no credentials, access denied, no such bucket, an unreachable endpoint;
- Ray: a task or actor that died, a Ray instance that cannot start.

Anything else is ``unexpected``: its type and first line, and the pointer to the full traceback. The CLI
prints ``error: <message>`` (or a JSON object for ``--json``) and keeps the traceback in a log file.
"""

from __future__ import annotations

import errno
import re
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Explained:
    """One failure in words: ``kind`` (a stable tag for scripts), ``message`` (one line) and the exit code."""

    kind: str
    message: str
    code: int = 1

    def as_json(self, log: str | None) -> dict[str, Any]:
        return {"error": {"kind": self.kind, "message": self.message, "log": log}}


KEPT = "nothing already committed is lost; rerun the same command to resume"


def causes(exc: BaseException) -> list[BaseException]:
    """``exc`` and everything behind it, outermost first: ``__cause__`` / ``__context__``, Ray's ``cause`` of
    a task error, Ray Train's ``worker_failures`` / ``controller_failure``. Each exception once."""
    seen: set[int] = set()
    order: list[BaseException] = []
    todo = [exc]
    while todo:
        e = todo.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        order.append(e)
        behind: list[Any] = [getattr(e, "cause", None), getattr(e, "controller_failure", None)]
        failures = getattr(e, "worker_failures", None)
        if isinstance(failures, dict):
            behind += list(failures.values())
        behind += [e.__cause__, e.__context__]
        todo += [b for b in behind if isinstance(b, BaseException)]
    return order


def _own(e: BaseException) -> Explained | None:
    """radio-dist's own errors already say what and what to do (a config error exits 2, like a usage error)."""
    from radio_dist.config import ConfigError
    from radio_dist.sources import SourceError
    from radio_dist.store.errors import StoreError
    from radio_dist.weights import WeightsError

    kinds: list[tuple[type[BaseException], str]] = [
        (ConfigError, "config"),
        (SourceError, "source"),
        (StoreError, "store"),
        (WeightsError, "weights"),
    ]
    for cls, kind in kinds:
        if isinstance(e, cls):
            # the inputs are wrong: exit 2, as for a usage error — but an object store that fails is not an
            # input (its kind says which: s3-access, ...)
            kind = str(getattr(e, "kind", kind))
            return Explained(kind, _own_text(e), 1 if kind.startswith("s3-") else 2)
    # the rest by name (OWN_NAMES): they live in modules that import torch and Ray, which a failing CLI need not load
    for c in type(e).__mro__:
        named = OWN_NAMES.get(c.__name__)
        if named is not None:
            return Explained(named, _own_text(e), 2 if named in INPUT_KINDS else 1)
    return None


def _os(e: BaseException) -> Explained | None:
    if not isinstance(e, OSError) or e.errno is None:
        return None
    where = e.filename or "a file"
    if e.errno == errno.ENOSPC:
        return Explained(
            "no-space",
            f"no space left on the device holding {where}: free space there or write "
            f"elsewhere (--store / --out); {KEPT}",
        )
    if e.errno == errno.EDQUOT:
        return Explained(
            "no-space", f"disk quota exceeded writing {where}: raise the quota or write elsewhere; {KEPT}"
        )
    if e.errno == errno.EROFS:
        return Explained(
            "read-only",
            f"{where} is on a read-only file system: write the store / run directory somewhere writable",
        )
    if e.errno in (errno.EACCES, errno.EPERM):
        return Explained(
            "permission", f"permission denied: {where} — give this user write access (or choose another path)"
        )
    if e.errno == errno.ENOENT and e.filename:
        return Explained("missing", f"{where} does not exist — check the path")
    return None


def _s3(e: BaseException) -> Explained | None:
    """botocore / aiobotocore errors (fsspec's s3fs), recognised by class name and error code: importing
    botocore here is not needed to tell them apart."""
    names = {c.__name__ for c in type(e).__mro__}
    endpoint = getattr(e, "kwargs", {}).get("endpoint_url") if hasattr(e, "kwargs") else None
    if "NoCredentialsError" in names or "PartialCredentialsError" in names:
        return Explained(
            "s3-credentials",
            "no S3 credentials found: set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), or pass them in the store's storage_options",
        )
    if names & {
        "EndpointConnectionError",
        "ConnectTimeoutError",
        "ConnectionClosedError",
        "ReadTimeoutError",
    }:
        where = endpoint or _line(e)
        return Explained(
            "s3-unreachable",
            f"cannot reach the object store endpoint {where}: check the URL "
            "(storage_options.endpoint_url / AWS_ENDPOINT_URL) and the network",
        )
    if "ClientError" in names:
        response = getattr(e, "response", {}) or {}
        code = str(response.get("Error", {}).get("Code", ""))
        bucket = response.get("Error", {}).get("BucketName") or ""
        if code in ("NoSuchBucket",):
            return Explained(
                "s3-no-bucket",
                f"the bucket {bucket or '(named in the URL)'} does not exist: create it or fix the URL",
            )
        if code in (
            "AccessDenied",
            "403",
            "InvalidAccessKeyId",
            "SignatureDoesNotMatch",
            "AllAccessDisabled",
        ):
            return Explained(
                "s3-access",
                f"the object store refused access ({code}): check the credentials "
                "and that they may read and write this bucket and prefix",
            )
    return None


def _ray(e: BaseException) -> Explained | None:
    names = {c.__name__ for c in type(e).__mro__}
    if names & {"ActorDiedError", "RayActorError", "WorkerCrashedError", "NodeDiedError", "OutOfMemoryError"}:
        return Explained(
            "ray",
            f"a Ray worker died: {_line(e)} — if it ran out of memory, lower the batch size "
            "or the actors' pool size; the job resumes from its last commit when rerun",
        )
    if "RaySystemError" in names or ("ConnectionError" in names and "ray" in type(e).__module__):
        return Explained(
            "ray",
            f"Ray could not start or be reached: {_line(e)} — check `ray status` (or "
            "ray.address in the config)",
        )
    return None


INPUT_KINDS = {"config", "source", "store", "weights"}  # exit 2: what the user gave is wrong
OWN_NAMES = {
    "ConfigError": "config",
    "ResumeError": "config",
    "SourceError": "source",
    "ImageError": "source",
    "StoreError": "store",
    "StoreMismatchError": "store",
    "StoreLockedError": "store",
    "WeightsError": "weights",
    "NonFiniteError": "training",
    "CheckpointContentError": "checkpoint",
    "RayUnreachableError": "ray",
}
_EXC_LINE = re.compile(r"^(?:[A-Za-z_][\w]*\.)*([A-Za-z_]\w*(?:Error|Exception)): (.+)$")
_ERRNO = re.compile(r"\[Errno (\d+)\] ([^:']+)(?:: '([^']+)')?")


def _embedded(e: BaseException) -> Explained | None:
    """Ray keeps only the text of some causes (an actor that died in its constructor): the innermost
    ``module.SomeError: message`` line of that text, classified like the exception it names."""
    if "RayError" not in {c.__name__ for c in type(e).__mro__}:
        return None
    for line in reversed(str(e).splitlines()):
        m = _EXC_LINE.match(line.strip())
        if not m:
            continue
        name, message = m.group(1), m.group(2).strip()
        if name in OWN_NAMES:
            kind = OWN_NAMES[name]
            return Explained(kind, message, 2 if kind in INPUT_KINDS else 1)
        errno_m = _ERRNO.search(message)
        if errno_m:
            return _os(OSError(int(errno_m.group(1)), errno_m.group(2).strip(), errno_m.group(3)))
    return None


def explain(exc: BaseException) -> Explained:
    """The most telling cause of ``exc`` in one line (see the module's docstring)."""
    chain = causes(exc)
    # the root first (the innermost cause names the resource), but an OS error that names its file before
    # one that does not (radio-dist re-raises a bare write error with the path it was writing)
    order = sorted(reversed(chain), key=lambda e: isinstance(e, OSError) and not e.filename)
    for classify in (_own, _os, _s3, _embedded, _ray):
        for e in order:
            found = classify(e)
            if found is not None:
                return found
    root = chain[-1]
    return Explained("unexpected", f"{type(root).__name__}: {_line(root)}")


def _own_text(e: BaseException) -> str:
    """A radio-dist error's whole message (a config's list of problems spans lines); one that Ray re-raised
    carries Ray's header and traceback, so only its message line."""
    if "RayError" in {c.__name__ for c in type(e).__mro__}:
        return _line(e)
    return str(e).strip() or type(e).__name__


def _line(e: BaseException) -> str:
    """The exception's own first line (Ray prefixes task errors with a header and a traceback)."""
    text = str(e).strip()
    if not text:
        return type(e).__name__
    lines = [x for x in text.splitlines() if x.strip()]
    for x in reversed(lines):  # Ray's "... Traceback ... ValueError: msg": the last line is the message
        if not x.startswith((" ", "\t", "Traceback", "File ")):
            return x.strip()[:600]
    return lines[0][:600]
