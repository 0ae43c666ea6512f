"""An S3-compatible server on loopback for the benchmarks' ``--s3`` runs (moto's, from the dev extra)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def loopback_s3(command: str, bucket: str = "bench") -> Iterator[tuple[str, dict[str, Any]]]:
    """``(s3://BUCKET, storage_options)`` of a fresh moto server on 127.0.0.1, stopped on exit. ``command``
    names the benchmark in the error when moto is not installed."""
    try:
        import boto3
        from moto.server import ThreadedMotoServer
    except ImportError as e:
        raise RuntimeError(
            f"{command} runs moto's S3 server on loopback, which is not installed ({e}): pip install -e '.[dev]'"
        ) from None
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # a log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    try:
        boto3.client(
            "s3", endpoint_url=endpoint, aws_access_key_id="bench", aws_secret_access_key="bench",
            region_name="us-east-1",
        ).create_bucket(Bucket=bucket)  # fmt: skip
        yield (
            f"s3://{bucket}",
            {
                "key": "bench",
                "secret": "bench",
                "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
            },
        )
    finally:
        server.stop()
