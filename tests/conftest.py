"""Shared test set-up: one real local Ray instance and one real S3-compatible server per test session.

Ray start-up costs seconds, so one instance serves every test that asks for ``ray_local``. ``s3_server``
runs moto's S3 server on loopback (the real HTTP API: s3fs, Zarr and pyarrow talk to it as to S3).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may reach a hub

# Fake AWS credentials for the loopback S3 server, set before anything (Ray workers included) starts, so
# every process of the session inherits them — the standard variables, as on a cluster. Forced, never
# defaulted: a developer's real credentials (or profile) must not be used by, or sent from, a test.
os.environ.update(
    AWS_ACCESS_KEY_ID="testing",
    AWS_SECRET_ACCESS_KEY="testing",
    AWS_SESSION_TOKEN="testing",
    AWS_DEFAULT_REGION="us-east-1",
)
os.environ.pop("AWS_PROFILE", None)

S3_BUCKET = "radio-dist-test"


@pytest.fixture(scope="session")
def ray_local():
    import ray

    from radio_dist.ray_setup import ALLOCATOR_ENV

    # the workers' environment of a local instance radio-dist starts itself (ray_setup.local_ray_options)
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        logging_level="warning",
        runtime_env={"env_vars": dict(ALLOCATOR_ENV)},
    )
    yield ray
    ray.shutdown()


@dataclass(frozen=True)
class S3Server:
    """A running S3-compatible server: ``endpoint`` (http://127.0.0.1:port) and one empty ``bucket``."""

    endpoint: str
    bucket: str

    def storage_options(self, endpoint: str | None = None) -> dict[str, Any]:
        """fsspec/s3fs options reaching this server (or a proxy in front of it); credentials: from env."""
        return {"client_kwargs": {"endpoint_url": endpoint or self.endpoint}}

    def url(self, name: str = "") -> str:
        """A fresh, unique ``s3://bucket/...`` prefix, so that tests sharing the server never collide."""
        return f"s3://{self.bucket}/{name or 'test'}-{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    from radio_dist.testing import loopback_s3_server

    with loopback_s3_server(S3_BUCKET) as endpoint:  # credentials: the AWS_* variables set above
        yield S3Server(endpoint, S3_BUCKET)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """The fault corpus's tally (``faultkit.TALLY``), when this session ran fault tests."""
    import sys

    kit = sys.modules.get("faultkit")  # imported by every test that records; none did if it is not
    lines = kit.TALLY.lines() if kit is not None else []
    if lines:
        terminalreporter.write_sep("-", "fault corpus")
        for line in lines:
            terminalreporter.write_line(line)
