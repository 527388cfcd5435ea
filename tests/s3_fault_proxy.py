"""A fault-injecting HTTP proxy on 127.0.0.1 in front of an S3 endpoint (moto), for tests.

Rules match a method and a regular expression on the request path (``/bucket/key``) and inject
one kind of fault into a bounded number of matching requests, then pass them through:

    503      an S3 ``ServiceUnavailable`` answer (body read, nothing forwarded)
    reset    the connection is closed with a TCP RST before any answer
    slow     the answer is delayed by ``delay_s`` seconds, then forwarded

``times=None`` injects forever (a shard that keeps failing). Every injection is counted per rule.
"""

from __future__ import annotations

import http.client
import re
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

__all__ = ["Fault", "FaultProxy"]

_503 = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>ServiceUnavailable</Code>'
        b"<Message>injected by the test proxy</Message></Error>")


@dataclass
class Fault:
    method: str
    path: str  # regular expression searched in the request path
    kind: str  # "503" | "reset" | "slow"
    times: int | None = 1  # None: every matching request
    delay_s: float = 2.0
    per_path: bool = False  # count `times` per distinct path instead of over all matches
    injected: int = 0
    _seen: dict[str, int] = field(default_factory=dict)

    def take(self, method: str, path: str) -> bool:
        if method != self.method or not re.search(self.path, path):
            return False
        key = path if self.per_path else ""
        n = self._seen.get(key, 0)
        if self.times is not None and n >= self.times:
            return False
        self._seen[key] = n + 1
        self.injected += 1
        return True


class FaultProxy:
    """``with FaultProxy(upstream) as proxy: proxy.endpoint``; ``proxy.faults`` may change any time."""

    def __init__(self, upstream: str, faults: list[Fault] | None = None):
        self.upstream = urlparse(upstream)
        self.faults: list[Fault] = list(faults or [])
        self.requests = 0
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass  # trailers
                            return out
                        out += self.rfile.read(size)
                        self.rfile.readline()
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else b""

            def _handle(self) -> None:
                body = self._body()
                path = urlparse(self.path).path
                with proxy._lock:
                    proxy.requests += 1
                    fault = next((f for f in proxy.faults if f.take(self.command, path)), None)
                if fault is not None and fault.kind == "503":
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(_503)))
                    self.end_headers()
                    self.wfile.write(_503)
                    return
                if fault is not None and fault.kind == "reset":
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.close_connection = True
                    self.connection.close()
                    return
                if fault is not None and fault.kind == "slow":
                    time.sleep(fault.delay_s)
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("transfer-encoding", "connection", "expect", "content-length")}
                headers["Content-Length"] = str(len(body))
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=120)
                try:
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                finally:
                    conn.close()
                self.send_response(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length", "server", "date"):
                        self.send_header(k, v)
                # HEAD answers carry the object's size, not the (empty) body's
                length = resp.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> "FaultProxy":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def injected(self, kind: str | None = None) -> int:
        return sum(f.injected for f in self.faults if kind in (None, f.kind))
