"""`radio-dist submit`: a job on a Ray cluster through Ray Job Submission."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from radio_dist.cli.common import SetOpt, err, fail, out
from radio_dist.config import ConfigError


def submit_cmd(
    job: Annotated[str, typer.Argument(help="Which job: cache_teachers | distill.")],
    config: Annotated[Path, typer.Option("--config", "-c", help="YAML job file (validated before upload).")],
    address: Annotated[
        str | None,
        typer.Option(help="Ray dashboard address (default: $RAY_ADDRESS or http://127.0.0.1:8265)."),
    ] = None,
    working_dir: Annotated[
        Path | None,
        typer.Option(help="Uploaded as the job's working_dir (default: the runtime_env's, else '.')."),
    ] = None,
    runtime_env: Annotated[
        Path | None, typer.Option(help="A runtime_env YAML (e.g. deploy/runtime_env.yaml) to start from.")
    ] = None,
    set_: SetOpt = None,
    follow: Annotated[bool, typer.Option(help="Stream the job's logs until it ends.")] = True,
) -> None:
    """Submit a radio-dist job to a Ray cluster; exits with the job's outcome (0 = SUCCEEDED)."""
    from radio_dist.submit import JobName, build_submission, default_address, submit_and_follow

    try:
        name = JobName(job)
    except ValueError:
        fail(f"unknown job {job!r}: choose one of {[j.value for j in JobName]}")
    try:
        submission = build_submission(name, config, set_ or [], working_dir, runtime_env)
    except ConfigError as e:
        fail(str(e))
    addr = address or default_address()
    try:
        job_id, status = submit_and_follow(
            addr, submission, follow=follow, log=lambda m: err.print(m, highlight=False, markup=False)
        )
    except ConnectionError as e:
        fail(f"cannot reach the Ray cluster at {addr}: {e} — is the head running (`ray start --head`)?")
    out.print(f"{job_id} {status}")
    if follow and status != "SUCCEEDED":
        raise typer.Exit(1)
