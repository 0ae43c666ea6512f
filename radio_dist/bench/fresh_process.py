"""Running a measurement in a fresh process with a given environment (glibc reads its malloc settings once,
at process start, so they cannot be given to a running process)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any


def in_fresh_process(env: dict[str, str], fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` in a spawned process started with ``env`` added to its environment (glibc reads its
    malloc settings once, at process start, so they cannot be given to a running process)."""
    import multiprocessing as mp

    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        with mp.get_context("spawn").Pool(1) as pool:
            return pool.apply(fn, args)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
