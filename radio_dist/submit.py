"""`radio-dist submit`: run a radio-dist job on a Ray cluster through the Ray Job Submission API.

The config is validated here first (a typo fails on the laptop, not after an upload), then shipped to the
job as YAML in the ``RADIO_DIST_CONFIG`` environment variable of its runtime_env; the entrypoint is the same
thin module a user would pass to ``ray job submit`` (``python -m jobs.<job> --config env:RADIO_DIST_CONFIG``).
The working directory is uploaded (minus virtualenvs, stores and runs), logs are followed, and the command's
exit code is the job's.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from radio_dist.config import ConfigError, apply_overrides, read_yaml, validate
from radio_dist.ray_setup import ALLOCATOR_ENV


class JobName(str, Enum):
    cache_teachers = "cache_teachers"
    featsharp = "featsharp"
    distill = "distill"


DEFAULT_EXCLUDES = [".venv", ".git", "store", "stores", "runs", "*.egg-info", "__pycache__", ".pytest_cache"]
CONFIG_ENV = "RADIO_DIST_CONFIG"


def job_model(job: JobName) -> type[BaseModel]:
    if job is JobName.cache_teachers:
        from radio_dist.cache.config import CacheJobConfig

        return CacheJobConfig
    if job is JobName.featsharp:
        from radio_dist.featsharp.train import FeatSharpConfig

        return FeatSharpConfig
    from radio_dist.train.config import DistillConfig

    return DistillConfig


def build_submission(
    job: JobName,
    config: Path,
    overrides: list[str],
    working_dir: Path | None,
    runtime_env_file: Path | None = None,
) -> dict[str, Any]:
    """The arguments of ``JobSubmissionClient.submit_job`` for one radio-dist job (validated).

    ``working_dir`` (when given) wins over the runtime_env file's; otherwise the file's, else ".".
    """
    data = read_yaml(config)
    apply_overrides(data, overrides, job_model(job))
    cfg = validate(job_model(job), data, str(config))
    runtime_env: dict[str, Any] = read_yaml(runtime_env_file) if runtime_env_file is not None else {}
    if working_dir is None:
        working_dir = Path(runtime_env.get("working_dir") or ".")
    if not working_dir.is_dir():
        raise ConfigError(f"--working-dir {working_dir} is not a directory")
    if not (working_dir / "jobs" / f"{job.value}.py").is_file():
        raise ConfigError(
            f"--working-dir {working_dir} has no jobs/{job.value}.py — submit from the radio-dist checkout"
        )
    runtime_env["working_dir"] = str(working_dir)
    runtime_env.setdefault("excludes", DEFAULT_EXCLUDES)
    env_vars = dict(runtime_env.get("env_vars") or {})
    env_vars[CONFIG_ENV] = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
    env_vars.setdefault("HF_HUB_OFFLINE", "1")
    for key, value in ALLOCATOR_ENV.items():  # the job's workers keep freed memory (as a local instance's do)
        env_vars.setdefault(key, value)
    runtime_env["env_vars"] = env_vars
    return {
        "entrypoint": f"python -m jobs.{job.value} --config env:{CONFIG_ENV}",
        "runtime_env": runtime_env,
        "metadata": {"radio_dist_job": job.value},
    }


def default_address() -> str:
    return os.environ.get("RAY_ADDRESS") or "http://127.0.0.1:8265"


TOKEN_PLACES = "RAY_AUTH_TOKEN, a file named by RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token"


class ClusterAuthError(ConfigError):
    """The Ray cluster wants a token this machine does not have (or has another one)."""


def find_auth_token() -> tuple[str | None, str | None]:
    """(token, where it came from), looked up as Ray's own clients do: ``RAY_AUTH_TOKEN``, the file named by
    ``RAY_AUTH_TOKEN_PATH``, ``~/.ray/auth_token`` (what ``ray start --head`` writes); (None, None) if none."""
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return os.environ["RAY_AUTH_TOKEN"].strip(), "RAY_AUTH_TOKEN"
    named = os.environ.get("RAY_AUTH_TOKEN_PATH")
    path = Path(named).expanduser() if named else Path.home() / ".ray" / "auth_token"
    if not path.is_file():
        if named:
            raise ClusterAuthError(
                f"RAY_AUTH_TOKEN_PATH={named} names no file: point it at the cluster's token"
            )
        return None, None
    token = path.read_text().strip()
    return (token or None), str(path)


def auth_headers() -> dict[str, str]:
    """The ``Authorization`` header for a cluster with token authentication (sent whenever a token is found:
    a cluster without authentication ignores it)."""
    token, _ = find_auth_token()
    return {"Authorization": f"Bearer {token}"} if token else {}


def _auth_problem(address: str, error: BaseException) -> ClusterAuthError | None:
    """A refusal for want of the right token, told in one line with where to put it."""
    text = str(error)
    if not any(
        k in text for k in ("Authentication required", "authentication token", "Authentication failed")
    ):
        return None
    _, where = find_auth_token()
    if where is None:
        why = "it requires a token and none was found here"
    else:
        why = f"it rejected the token from {where}"
    return ClusterAuthError(
        f"the Ray cluster at {address} refused the request: {why} — copy the token the head wrote "
        f"(~/.ray/auth_token on the head node) into {TOKEN_PLACES} on this machine"
    )


def job_client(address: str) -> Any:
    """A Job Submission client for ``address`` with the cluster's token if there is one; a refused token
    (or none where one is needed) is a ``ClusterAuthError``."""
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address, headers=auth_headers())
    except Exception as e:  # Ray's AuthenticationError, or a RuntimeError carrying the HTTP 401/403
        problem = _auth_problem(address, e)
        if problem is not None:
            raise problem from None
        raise


def submit_and_follow(
    address: str,
    submission: dict[str, Any],
    follow: bool = True,
    log: Callable[[str], None] = print,
    timeout_s: float | None = None,
) -> tuple[str, str]:
    """Submit, stream the job's logs while it runs (if ``follow``), and return (job id, final status)."""
    from ray.job_submission import JobStatus

    client = job_client(address)
    job_id = None
    submit_deadline = time.monotonic() + 120
    while job_id is None:
        try:
            job_id = client.submit_job(**submission)
        except RuntimeError as e:  # a head that just started has no job agent yet: retry for a while
            problem = _auth_problem(address, e)
            if problem is not None:
                raise problem from None
            if "No available agent" not in str(e) or time.monotonic() > submit_deadline:
                raise
            log("the cluster's job agent is not up yet; retrying ...")
            time.sleep(2.0)
    log(f"submitted {job_id} to {address}: {submission['entrypoint']}")
    if not follow:
        return job_id, str(client.get_job_status(job_id).value)

    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            for line in lines.rstrip("\n").split("\n"):
                log(line)

    asyncio.run(tail())
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    terminal = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}
    while True:
        status = client.get_job_status(job_id)
        if status in terminal:
            return job_id, str(status.value)
        if deadline is not None and time.monotonic() > deadline:
            client.stop_job(job_id)
            return job_id, "TIMEOUT"
        time.sleep(1.0)
