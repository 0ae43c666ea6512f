"""Thin Ray job entrypoints: parse a config, build, run. Usable with `ray job submit -- python -m jobs.<name>`."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from radio_dist.cli.failing import report
from radio_dist.config import load_model

C = TypeVar("C")


def run_job(doc: str, config: type[C], run: Callable[[C], Any], argv: list[str] | None) -> None:
    """``--config JOB.yaml [--set key.path=value ...]``, validated as ``config``; ``run`` it and print its summary
    as JSON. A failure ends as every radio-dist command's does: one ``error:`` line, the traceback in a log."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--config", required=True, help="YAML job file")
    ap.add_argument("--set", action="append", default=[], help="override key.path=value (repeatable)")
    args = ap.parse_args(argv)
    try:
        summary = run(load_model(config, args.config, args.set))  # type: ignore[type-var]
    except Exception as e:
        report(e, sys.argv[1:] if argv is None else argv)
    print(json.dumps(summary.to_dict() if hasattr(summary, "to_dict") else summary, default=str))
