"""S3 network-conditions proxy: real S3's latency and faults in front of a local server.

In: an upstream endpoint (the local moto server). Out: an endpoint on 127.0.0.1 that
forwards every request after ``latency_s`` and, at the given rates, answers instead
with 503 SlowDown or 500 InternalError, resets the connection, or cuts the response
body short. The local server answers in under a millisecond where S3 takes tens, so
without this, benchmarks would not reward concurrency and tests would never see a fault.

``Expect: 100-continue`` (boto3 sends it on PUT) is answered the way S3 does: an
injected error is sent instead of ``100 Continue``, so the client never sends the body.

For crash-safety tests and load measurements it can also hold chosen requests (never
forwarding them: a client killed while one is held leaves S3 exactly as it was just
before that request), record the requests it forwarded, and count concurrent client
connections (``max_connections``).

``python -m beam_jobs.s3proxy UPSTREAM --latency_ms 50 --slowdown 0.05`` runs one.
"""

from __future__ import annotations

import argparse
import collections
import http.client
import http.server
import random
import socket
import socketserver
import struct
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import Self  # Python 3.11; annotations are not evaluated at run time

__all__ = ["FAULTS", "S3Proxy"]

# (method, path with query, percent-decoded) -> whether a rule applies to the request.
RequestPredicate = Callable[[str, str], bool]

FAULTS = ("slowdown", "internal_error", "reset", "truncate")

_ERROR_XML = (
    '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
    "<Message>{message}</Message><RequestId>s3proxy</RequestId></Error>"
)
_ERRORS = {
    "slowdown": (503, "SlowDown", "Please reduce your request rate."),
    "internal_error": (500, "InternalError", "We encountered an internal error."),
}
# Hop-by-hop headers are the proxy's own business, never forwarded.
_HOP_HEADERS = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "expect",
}


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, *args) -> None:  # quiet: tests and benchmarks print tables
        pass

    def handle(self) -> None:
        proxy = self.server.proxy
        proxy.connection_opened()
        try:
            super().handle()
        finally:
            proxy.connection_closed()

    def handle_expect_100(self) -> bool:
        self._fault = self.server.proxy.pick_fault(self.command, self.path)
        if self._fault in _ERRORS:
            self._send_error_response()
            self.close_connection = True
            return False
        return super().handle_expect_100()

    def _send_error_response(self) -> None:
        status, code, message = _ERRORS[self._fault]
        body = _ERROR_XML.format(code=code, message=message).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _reset(self) -> None:
        # SO_LINGER 0 makes close() send RST: the client sees "connection reset".
        self.connection.setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
        )
        self.close_connection = True

    def _proxy(self) -> None:
        proxy = self.server.proxy
        if "Expect" not in self.headers:
            self._fault = proxy.pick_fault(self.command, self.path)
        body = self._read_body()
        if proxy.hold_if_matching(self.command, self.path):
            self._reset()  # released only when the proxy stops: never forwarded
            return
        if proxy.latency_s:
            time.sleep(proxy.latency_s)
        if self._fault in _ERRORS:
            self._send_error_response()
            return
        if self._fault == "reset":
            self._reset()
            return
        headers = {
            k: v for k, v in self.headers.items() if k.lower() not in _HOP_HEADERS
        }
        if body or self.command in ("PUT", "POST"):
            headers["Content-Length"] = str(len(body))
        upstream = proxy.upstream_connection()
        try:
            upstream.request(self.command, self.path, body=body, headers=headers)
            response = upstream.getresponse()
            payload = response.read()
        except (OSError, http.client.HTTPException):
            upstream.close()
            self._reset()
            return
        self.send_response(response.status, response.reason)
        for key, value in response.getheaders():
            if key.lower() not in _HOP_HEADERS and key.lower() != "content-length":
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        proxy.record(self.command, self.path, response.status)
        if self.command == "HEAD":
            return
        if self._fault == "truncate" and len(payload) > 1:
            proxy.count_injected("truncate")
            self.wfile.write(payload[: len(payload) // 2])
            self.wfile.flush()
            self._reset()
            return
        self.wfile.write(payload)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _proxy


class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256
    proxy: S3Proxy

    def handle_error(self, request, client_address) -> None:
        # A client that goes away (killed, or done with a kept-alive connection) is
        # normal here; anything else is a bug worth its traceback.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class S3Proxy:
    """A latency- and fault-injecting HTTP proxy on 127.0.0.1 in front of ``upstream``.

    Args:
        upstream: the real endpoint, e.g. ``http://127.0.0.1:5000``.
        latency_s: added before every forwarded or injected answer.
        faults: rate per kind in ``FAULTS``, e.g. ``{"slowdown": 0.05}``.
        seed: makes the fault sequence repeatable.
        record: keep ``(method, path, status)`` of each forwarded request in
            ``forwarded``.

    ``injected`` counts the faults actually injected, so a test can show it was
    exercised; ``connections`` / ``max_connections`` are the client connections open
    now / at most.
    """

    def __init__(
        self,
        upstream: str,
        latency_s: float = 0.0,
        faults: dict[str, float] | None = None,
        seed: int = 0,
        record: bool = False,
    ) -> None:
        parsed = urllib.parse.urlsplit(upstream)
        self._upstream = (parsed.hostname, parsed.port)
        self._lock = threading.Lock()
        self._random = random.Random(seed)
        self._conns = threading.local()
        self.injected: collections.Counter[str] = collections.Counter()
        self.requests = 0
        self.connections = self.max_connections = 0
        self._record = record
        self.forwarded: list[tuple[str, str, int]] = []
        self._hold: RequestPredicate | None = None
        self._held = threading.Condition(self._lock)
        self.held = 0
        self._release = threading.Event()
        self.set_conditions(latency_s, faults)
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.proxy = self
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def set_conditions(
        self,
        latency_s: float = 0.0,
        faults: dict[str, float] | None = None,
        only: RequestPredicate | None = None,
    ) -> None:
        """Changes latency and fault rates while running.

        Args:
            latency_s: added before every answer.
            faults: rate per kind in ``FAULTS``.
            only: when given, faults are injected only into requests it accepts.
        """
        faults = dict(faults or {})
        unknown = set(faults) - set(FAULTS)
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}; known: {FAULTS}")
        if sum(faults.values()) > 1:
            raise ValueError(f"fault rates add up to more than 1: {faults}")
        with self._lock:
            self.latency_s = latency_s
            self._faults = faults
            self._only = only

    def pick_fault(self, method: str, path: str) -> str | None:
        with self._lock:
            self.requests += 1
            if self._only and not self._only(method, urllib.parse.unquote(path)):
                return None
            roll = self._random.random()
            for kind, rate in self._faults.items():
                if roll < rate:
                    if kind != "truncate":  # counted when a body is there to cut
                        self.injected[kind] += 1
                    return kind
                roll -= rate
        return None

    def hold(self, predicate: RequestPredicate | None) -> None:
        """Holds every request that ``predicate`` accepts, from now until :meth:`stop`.

        A held request is never forwarded; when the proxy stops, its connection is
        reset.
        """
        with self._lock:
            self._hold = predicate

    def hold_if_matching(self, method: str, path: str) -> bool:
        with self._lock:
            if not self._hold or not self._hold(method, urllib.parse.unquote(path)):
                return False
            self.held += 1
            self._held.notify_all()
        self._release.wait()
        return True

    def wait_held(self, count: int = 1, timeout_s: float = 60.0) -> bool:
        """Waits until ``count`` requests are held; ``False`` on timeout."""
        with self._lock:
            return self._held.wait_for(lambda: self.held >= count, timeout_s)

    def count_injected(self, kind: str) -> None:
        with self._lock:
            self.injected[kind] += 1

    def record(self, method: str, path: str, status: int) -> None:
        if self._record:
            with self._lock:
                self.forwarded.append((method, urllib.parse.unquote(path), status))

    def connection_opened(self) -> None:
        with self._lock:
            self.connections += 1
            self.max_connections = max(self.max_connections, self.connections)

    def connection_closed(self) -> None:
        with self._lock:
            self.connections -= 1

    def upstream_connection(self) -> http.client.HTTPConnection:
        conn = getattr(self._conns, "conn", None)
        if conn is None:
            conn = self._conns.conn = http.client.HTTPConnection(
                *self._upstream, timeout=60
            )
        return conn

    def start(self) -> S3Proxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._release.set()
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "upstream", help="endpoint to forward to, e.g. http://127.0.0.1:5000"
    )
    parser.add_argument(
        "--latency_ms", type=float, default=50, help="added per request"
    )
    for kind in FAULTS:
        parser.add_argument(
            f"--{kind}", type=float, default=0.0, help=f"rate of {kind}"
        )
    args = parser.parse_args()
    faults = {k: getattr(args, k) for k in FAULTS if getattr(args, k)}
    with S3Proxy(args.upstream, args.latency_ms / 1000, faults) as proxy:
        print(proxy.endpoint, flush=True)
        threading.Event().wait()


if __name__ == "__main__":
    main()
