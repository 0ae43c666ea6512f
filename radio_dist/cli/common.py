"""What every `radio-dist` command shares: the consoles, the --json contract, errors, option types."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from radio_dist.config import ConfigError

err = Console(stderr=True, soft_wrap=True)
out = Console()

JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]
StoreArg = Annotated[str, typer.Argument(help="Store root: local path or fsspec URL (s3://bucket/prefix).")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Config override key.path=value (repeatable; the value is YAML)."),
]
ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML job file (see jobs/configs/).")]

_json_fd: int | None = None


def json_only_stdout() -> None:
    """`--json` on a command that runs Ray: from here on the process's stdout (fd 1) is stderr, and only the JSON
    document goes to the real stdout. Ray's core worker writes notices (a killed actor, a retried task) to fd 1 at
    any time, even after the summary is printed, so turning off log forwarding is not enough."""
    global _json_fd
    if _json_fd is not None:
        return
    try:
        if sys.stdout.fileno() != 1:
            return
    except (AttributeError, OSError, ValueError):  # in-process test runners swap stdout for a buffer
        return
    sys.stdout.flush()
    _json_fd = os.dup(1)
    os.dup2(2, 1)


def print_json(doc: Any) -> None:
    text = json.dumps(doc, indent=1, default=str) + "\n"
    if _json_fd is None:
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    os.write(_json_fd, text.encode())


def fail(msg: str) -> NoReturn:
    """Stop the command for bad input: ``error: msg``, exit code 2, a JSON error object for ``--json`` (told by
    ``failing.ReportingGroup``; an exception being handled stays the cause, so it is classified first)."""
    raise ConfigError(msg)


def fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def source_from_arg(arg: str) -> dict[str, Any]:
    """`--source` shorthand: 'sample-photos', a .parquet/.csv list of URIs, or a folder / s3:// prefix."""
    if arg == "sample-photos":
        return {"kind": "sample-photos"}
    if arg.lower().endswith((".parquet", ".csv")):
        return {"kind": "list", "path": arg}
    return {"kind": "folder", "path": arg}


def print_result(title: str, res: dict[str, Any], as_json: bool) -> None:
    """A benchmark's result: JSON on stdout, or a two-column table."""
    if as_json:
        print_json(res)
        return
    t = Table(title=title, show_header=False)
    for k, v in res.items():
        t.add_row(k, f"{v:.3f}" if isinstance(v, float) else str(v))
    out.print(t)
