"""The benchmarks' ``--s3`` runs: a store root on a fresh S3 server on loopback, with the options that reach it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

from radio_dist.testing import loopback_s3_server


@contextmanager
def loopback_s3(command: str, bucket: str = "bench") -> Iterator[tuple[str, dict[str, Any]]]:
    """``(s3://BUCKET, storage_options)`` on ``testing.loopback_s3_server``; ``command`` names the benchmark in
    the error when moto is not installed."""
    with ExitStack() as stack:
        try:
            endpoint = stack.enter_context(loopback_s3_server(bucket, credentials=("bench", "bench")))
        except RuntimeError as e:  # moto missing
            raise RuntimeError(f"{command}: {e}") from None
        options = {"key": "bench", "secret": "bench"}
        yield (
            f"s3://{bucket}",
            {**options, "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}},
        )
