"""A fault-injecting HTTP proxy for S3 tests: sits on loopback in front of a real S3-compatible server.

It forwards every request unchanged (same method, path, headers and body, so SigV4 signatures still
match) and, for a seeded random fraction of them, instead

* answers ``503 SlowDown`` with S3's XML error body (what S3 sends when a prefix is over its request
  rate), without forwarding — the request did not happen;
* drops the connection (TCP reset) — either before forwarding (the request did not happen), or after
  the upstream server handled it (it *did* happen: a PUT is stored, but the client never hears so);
* for a GET, sends the status line, the headers and half of the body, then drops the connection (the
  client sees a short read).

``hold`` picks requests to park instead (e.g. the manifest PUT that commits a shard): they are never
forwarded; the proxy records that one arrived and, once ``release()`` is called, drops the connection.
A test uses that to SIGKILL a writer between a shard's data upload and its commit.
"""

from __future__ import annotations

import http.client
import random
import socket
import struct
import threading
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

SLOWDOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message><RequestId>fault-proxy</RequestId></Error>"
)
HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "expect",
}


class FaultProxy:
    """Loopback proxy to ``upstream`` (``http://host:port``) injecting 503s and dropped connections.

    Each request draws once from a seeded generator: 503 with probability ``p_503``, a dropped connection
    (before or after forwarding) with ``p_drop``, and, for a GET, a response cut short with ``p_drop_body``.

    ``counts`` tallies what happened: ``requests`` (all seen), ``forwarded``, ``503``, ``drop_before``,
    ``drop_after``, ``drop_body`` and ``held``. ``faults`` is the total of injected faults; ``log`` lists
    (method, path) of every request in arrival order.
    """

    def __init__(
        self,
        upstream: str,
        p_503: float = 0.0,
        p_drop: float = 0.0,
        p_drop_body: float = 0.0,
        seed: int = 0,
        hold: Callable[[str, str], bool] | None = None,
    ) -> None:
        up = urlsplit(upstream)
        assert up.hostname and up.port, upstream
        self.upstream = (up.hostname, up.port)
        self.p_503, self.p_drop, self.p_drop_body = p_503, p_drop, p_drop_body
        self.hold = hold
        self.counts: Counter[str] = Counter()
        self.log: list[tuple[str, str]] = []
        self.held = threading.Event()  # set when a held request arrived
        self._release = threading.Event()
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fault-proxy", daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def faults(self) -> int:
        return sum(self.counts[k] for k in ("503", "drop_before", "drop_after", "drop_body"))

    @property
    def dropped(self) -> int:
        return sum(self.counts[k] for k in ("drop_before", "drop_after", "drop_body"))

    def release(self) -> None:
        self._release.set()

    def _pick(self, method: str) -> str:
        with self._lock:
            self.counts["requests"] += 1
            x = self._rng.random()
            if x < self.p_503:
                return "503"
            if x < self.p_503 + self.p_drop:
                return self._rng.choice(("drop_before", "drop_after"))
            if method == "GET" and x < self.p_503 + self.p_drop + self.p_drop_body:
                return "drop_body"
            return "forward"

    def _count(self, key: str) -> None:
        with self._lock:
            self.counts[key] += 1

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._release.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)


def _handler_for(proxy: FaultProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, like a real endpoint: drops hit pooled connections

        def log_message(self, format: str, *args: object) -> None:  # quiet
            pass

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                out = bytearray()
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass  # trailers
                        return bytes(out)
                    out += self.rfile.read(size)
                    self.rfile.readline()
            n = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(n) if n else b""

        def _reset(self) -> None:
            """Close with a TCP RST (SO_LINGER 0): the client sees the connection die, not a clean EOF."""
            self.close_connection = True
            try:
                self.wfile.flush()
            except OSError:
                pass
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()

        def _forward(self, body: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
            conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
            try:
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                if body or self.command in ("PUT", "POST"):
                    headers["Content-Length"] = str(len(body))
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                return resp.status, resp.reason, resp.getheaders(), data
            finally:
                conn.close()
                proxy._count("forwarded")

        def _handle(self) -> None:
            body = self._body()
            with proxy._lock:
                proxy.log.append((self.command, self.path))
            if proxy.hold is not None and proxy.hold(self.command, self.path):
                proxy._count("held")
                proxy.held.set()
                proxy._release.wait(timeout=120)
                self._reset()
                return
            action = proxy._pick(self.command)
            if action == "503":
                proxy._count("503")
                self.send_response(503, "Slow Down")
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(SLOWDOWN)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(SLOWDOWN)
                return
            if action == "drop_before":
                proxy._count(action)
                self._reset()
                return
            status, reason, headers, data = self._forward(body)
            if action == "drop_body" and not data:
                action = "drop_after"  # nothing to cut short: drop before the response instead
            if action == "drop_after":
                proxy._count(action)
                self._reset()
                return
            self.send_response(status, reason)
            for k, v in headers:
                if k.lower() not in HOP_BY_HOP and k.lower() != "content-length":
                    self.send_header(k, v)
            length = headers_length(headers, data)
            self.send_header("Content-Length", str(length))
            self.end_headers()
            if action == "drop_body":
                proxy._count(action)
                self.wfile.write(data[: len(data) // 2])
                self._reset()
                return
            if self.command != "HEAD":
                self.wfile.write(data)

        def do_GET(self) -> None:
            self._handle()

        do_PUT = do_POST = do_DELETE = do_HEAD = do_GET

    return Handler


def headers_length(headers: list[tuple[str, str]], data: bytes) -> int:
    """Content-Length to send: the body's, except for HEAD-style answers that announce a length they lack."""
    for k, v in headers:
        if k.lower() == "content-length" and not data:
            return int(v)
    return len(data)
