"""How a failed command ends: one ``error:`` line (a JSON object for ``--json``), the traceback kept in a log
file whose path is printed, the traceback on screen only with ``--debug`` / ``RADIO_DIST_DEBUG=1``."""

from __future__ import annotations

import os
import sys
import time
import traceback
import uuid
from pathlib import Path
from typing import Any, NoReturn

from typer.core import TyperGroup

from radio_dist.cli.common import err, print_json
from radio_dist.config import DEBUG_ENV, debugging
from radio_dist.failures import KEPT, Explained, explain

LOG_DIR_ENV = "RADIO_DIST_LOG_DIR"  # where failure logs go (default: ~/.cache/radio-dist/errors)


def log_dir() -> Path:
    if os.environ.get(LOG_DIR_ENV):
        return Path(os.environ[LOG_DIR_ENV])
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "radio-dist" / "errors"


def keep_traceback(exc: BaseException, argv: list[str]) -> str | None:
    """Write the command line and the full traceback to a new log file; its path, or None if it could not be
    written (the disk that failed may be this one too)."""
    try:
        d = log_dir()
        d.mkdir(parents=True, exist_ok=True)
        path = d / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{uuid.uuid4().hex[:6]}.log"
        text = "radio-dist " + " ".join(argv) + "\n\n" + "".join(traceback.format_exception(exc))
        path.write_text(text)
        return str(path)
    except OSError:
        return None


class ReportingGroup(TyperGroup):
    """The top-level command group: whatever a command raises ends as ``report`` says (the console script and
    typer's test runner alike)."""

    def main(self, args: Any = None, *rest: Any, **kwargs: Any) -> Any:
        argv = list(args) if args is not None else sys.argv[1:]
        try:
            return super().main(argv, *rest, **kwargs)
        except Exception as e:  # click's own exits (usage errors, --help) are SystemExit and pass through
            report(e, argv)


def report(exc: BaseException, argv: list[str]) -> NoReturn:
    """End the process for ``exc``: explained in one line; exit code 2 when the inputs are wrong (config,
    store, source, weights), 1 when the run failed (file system, object store, Ray, training)."""
    try:
        explained = explain(exc)
    except Exception:  # explaining must not hide the failure (a broken install cannot import a classifier)
        explained = Explained("unexpected", f"{type(exc).__name__}: {str(exc).strip() or '(no message)'}")
    log = None if explained.kind == "config" else keep_traceback(exc, argv)
    if debugging():
        err.print("".join(traceback.format_exception(exc)), highlight=False, markup=False)
    if "--json" in argv:
        print_json(explained.as_json(log))
    where = f" (traceback: {log})" if log else ""
    err.print(f"[bold red]error:[/] {_escape(explained.message)}{where}", highlight=False, soft_wrap=True)
    raise SystemExit(explained.code)


def interrupted() -> NoReturn:
    """Ctrl-C: say what it means for the data, exit 130 as shells expect."""
    err.print(f"interrupted: {KEPT}", highlight=False)
    raise SystemExit(130)


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


__all__ = ["DEBUG_ENV", "Explained", "ReportingGroup", "interrupted", "report"]
