"""Before a process first uses an object store: is its endpoint reachable, are there credentials, may they
read the store, does the bucket exist — each answered within a bound and told as a ``StoreError`` that names
the store URL and the endpoint, instead of minutes of retries and a botocore traceback.

The bound is ``RADIO_DIST_CONNECT_TIMEOUT_S`` (seconds, default 20): connection attempts to the endpoint are
repeated until then (a restarting server comes back), then the job stops. Behind an HTTP(S) proxy (the
standard ``HTTPS_PROXY`` / ``NO_PROXY`` variables) the direct connection is not tried; the requests below then
wait at most botocore's ``connect_timeout`` per attempt. Transient errors after that point
(503 SlowDown, a dropped connection) are still retried by botocore and s3fs, as configured in
``feature_store.S3_RETRIES``. Each (store, endpoint, access key) is checked once per process.
"""

from __future__ import annotations

import os
import threading
from typing import Any
from urllib.parse import urlsplit

from radio_dist.config import CONNECT_TIMEOUT_ENV, connect_timeout_s, wait_for_port
from radio_dist.store.errors import ObjectStoreError

_checked: set[tuple[str, str, str]] = set()
_lock = threading.Lock()


def endpoint_of(options: dict[str, Any]) -> str:
    """The S3 endpoint URL these fsspec options reach (AWS's own when none is named)."""
    client = options.get("client_kwargs") or {}
    named = (
        client.get("endpoint_url")
        or options.get("endpoint_url")
        or os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL")
    )
    if named:
        return str(named)
    region = client.get("region_name") or os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
    return f"https://s3.{region}.amazonaws.com" if region else "https://s3.amazonaws.com"


def behind_proxy(endpoint: str) -> bool:
    """Whether requests to ``endpoint`` go through an HTTP(S) proxy (the standard environment variables, as
    botocore reads them), so a direct TCP connection says nothing about them."""
    host = urlsplit(endpoint).hostname or ""
    scheme = urlsplit(endpoint).scheme or "https"
    proxy = os.environ.get(f"{scheme}_proxy") or os.environ.get(f"{scheme.upper()}_PROXY")
    proxy = proxy or os.environ.get("all_proxy") or os.environ.get("ALL_PROXY")
    if not proxy:
        return False
    skip = (os.environ.get("no_proxy") or os.environ.get("NO_PROXY") or "").split(",")
    return not any(h.strip() and (host == h.strip().lstrip(".") or host.endswith(h.strip())) for h in skip)


def wait_reachable(endpoint: str, url: str, bound_s: float) -> None:
    """Open a TCP connection to ``endpoint`` within ``bound_s`` seconds (retrying once a second), else a
    ``StoreError`` naming the store and the endpoint."""
    parts = urlsplit(endpoint)
    host = parts.hostname or endpoint
    port = parts.port or (443 if parts.scheme == "https" else 80)
    e = wait_for_port(host, port, bound_s)
    if e is not None:
        raise ObjectStoreError(
            "s3-unreachable",
            f"cannot reach the object store endpoint {endpoint} of {url} ({e.strerror or e}; tried for "
            f"{bound_s:.0f} s): check the endpoint URL (storage_options.client_kwargs.endpoint_url or "
            f"AWS_ENDPOINT_URL), that the server is up, and the network; {CONNECT_TIMEOUT_ENV} sets how "
            "long to wait",
        ) from None


def check_object_store(fs: Any, url: str, root: str, options: dict[str, Any]) -> None:
    """The checks above for an s3:// store at ``root`` (its path in ``fs``); a no-op once passed."""
    endpoint = endpoint_of(options)
    key = (url, endpoint, str(options.get("key") or os.environ.get("AWS_ACCESS_KEY_ID") or ""))
    with _lock:
        if key in _checked:
            return
    if not behind_proxy(endpoint):  # through a proxy the endpoint need not be reachable directly
        wait_reachable(endpoint, url, connect_timeout_s())
    probe = f"{root.rstrip('/')}/store.json"
    try:
        fs.info(probe)
    except FileNotFoundError:
        _check_bucket(fs, url, root, endpoint)
    except PermissionError:
        raise ObjectStoreError(
            "s3-access",
            f"{endpoint} refused access to {url}: check the credentials (AWS_ACCESS_KEY_ID / "
            "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or storage_options key/secret) and that they may read and "
            "write this bucket and prefix",
        ) from None
    except Exception as e:
        if {"NoCredentialsError", "PartialCredentialsError"} & {c.__name__ for c in type(e).__mro__}:
            raise ObjectStoreError(
                "s3-credentials",
                f"no S3 credentials for {url}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), "
                "or put key/secret in the store's storage_options",
            ) from None
        raise
    with _lock:
        _checked.add(key)


def _check_bucket(fs: Any, url: str, root: str, endpoint: str) -> None:
    """A new store's bucket must exist (a store's prefix need not). Credentials that may not look at the
    bucket itself (prefix-only policies) are let through: the store's own reads and writes will tell."""
    bucket = root.split("/", 1)[0]
    try:
        fs.info(bucket)
    except FileNotFoundError:
        raise ObjectStoreError(
            "s3-no-bucket",
            f"bucket {bucket!r} of {url} does not exist at {endpoint}: create it (e.g. `aws s3 mb s3://{bucket}`) "
            "or fix the store URL",
        ) from None
    except PermissionError:
        return
