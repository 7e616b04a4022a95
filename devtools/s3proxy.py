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

``python -m devtools.s3proxy UPSTREAM --latency_ms 50 --slowdown 0.05`` runs one.
"""

from __future__ import annotations

import argparse
import collections
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
    "slowdown": (503, "Service Unavailable", "SlowDown", "Please reduce your request rate."),
    "internal_error": (
        500, "Internal Server Error", "InternalError", "We encountered an internal error."
    ),
}  # fmt: skip
# Hop-by-hop headers are the proxy's own business, never forwarded; Content-Length is
# set again for the body as relayed.
_HOP_HEADERS = frozenset(
    (b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"expect")
)
_CONTENT_LENGTH = b"content-length"
_MAX_LINE = 65536
# Bodies up to this size leave in one send with their headers (one system call, and
# no Nagle wait between the two); larger ones are not copied to be joined.
_JOIN_BELOW = 1 << 20


class _Message:
    """The start line and headers of one HTTP/1.1 message, read from a buffered stream.

    Only the headers a relay acts on are interpreted; the others are kept as raw lines
    and forwarded byte for byte. (``http.server`` and ``http.client`` parse every header
    through the ``email`` package twice per request: most of the proxy's CPU, which on
    a small machine is taken from the server and the client it stands between.)
    """

    __slots__ = ("chunked", "close", "expect", "length", "lines", "start")

    def __init__(self, stream) -> None:
        self.start = stream.readline(_MAX_LINE)
        self.lines: list[bytes] = []
        self.length: int | None = None
        self.chunked = self.expect = False
        self.close = False
        while (line := stream.readline(_MAX_LINE)) not in (b"\r\n", b"\n", b""):
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == _CONTENT_LENGTH:
                self.length = int(value)
            elif name not in _HOP_HEADERS:
                self.lines.append(line)
            elif name == b"transfer-encoding":
                self.chunked = b"chunked" in value.lower()
            elif name == b"expect":
                self.expect = value.strip().lower() == b"100-continue"
            elif name == b"connection":
                self.close = value.strip().lower() == b"close"

    def read_body(self, stream, until_eof: bool = False) -> bytes:
        """The body that follows (de-chunked); ``until_eof`` when nothing delimits it.

        Raises:
            ConnectionError: the stream ended before the body did.
        """
        if self.chunked:
            chunks = []
            while size := int(stream.readline(_MAX_LINE).split(b";")[0].strip(), 16):
                chunks.append(_read_exactly(stream, size))
                stream.readline(_MAX_LINE)
            while stream.readline(_MAX_LINE) not in (b"\r\n", b"\n", b""):
                pass  # trailers
            return b"".join(chunks)
        if self.length is not None:
            return _read_exactly(stream, self.length) if self.length else b""
        return stream.read() if until_eof else b""

    @property
    def status(self) -> int:
        """A response's status code."""
        return int(self.start.split(None, 2)[1])

    def head(self, start: bytes, length: int | None, close: bool = False) -> bytes:
        """``start``, the kept headers, then Content-Length (when given) and Connection."""
        extra = b"Content-Length: %d\r\n" % length if length is not None else b""
        if close:
            extra += b"Connection: close\r\n"
        return b"".join((start, *self.lines, extra, b"\r\n"))


def _read_exactly(stream, size: int) -> bytes:
    data = stream.read(size)
    if len(data) != size:
        raise ConnectionError(f"stream ended after {len(data)} of {size} body bytes")
    return data


def _send(sock: socket.socket, head: bytes, body: bytes = b"") -> None:
    if len(body) < _JOIN_BELOW:
        sock.sendall(head + body)
    else:
        sock.sendall(head)
        sock.sendall(body)


class _Upstream:
    """One thread's connection to the upstream server, kept while the server keeps it
    (moto's server closes each one after its answer; other servers may not)."""

    def __init__(self, address: tuple[str, int]) -> None:
        self._address = address
        self._sock: socket.socket | None = None

    def exchange(
        self, method: str, request: bytes, body: bytes
    ) -> tuple[_Message, bytes]:
        """Sends one request, returns the response's headers and (de-chunked) body.

        A kept connection that the server closed meanwhile is replaced once, before
        any answer was read.

        Raises:
            ConnectionError: the upstream could not be reached or broke off.
        """
        for kept in (self._sock is not None, False):
            try:
                if self._sock is None:
                    self._connect()
                _send(self._sock, request, body)
                response = _Message(self._stream)
                if not response.start:
                    raise ConnectionError("upstream closed the connection")
            except OSError as e:
                self.close()
                if kept:
                    continue
                raise ConnectionError(f"upstream: {e}") from e
            try:
                status = response.status
                no_body = method == "HEAD" or status in (204, 304) or status < 200
                payload = b"" if no_body else response.read_body(self._stream, True)
            except (OSError, ValueError) as e:
                self.close()
                raise ConnectionError(f"upstream: {e}") from e
            if response.close or (response.length is None and not response.chunked):
                self.close()
            return response, payload
        raise AssertionError("unreachable")

    def _connect(self) -> None:
        self._sock = socket.create_connection(self._address, timeout=60)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._stream = self._sock.makefile("rb")

    def close(self) -> None:
        if self._sock is not None:
            self._stream.close()
            self._sock.close()
            self._sock = None


class _Handler(socketserver.StreamRequestHandler):
    """One client connection: its requests, one after the other (HTTP/1.1 keep-alive)."""

    server: _Server
    rbufsize = 64 * 1024

    def handle(self) -> None:
        proxy = self.server.proxy
        proxy.connection_opened()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            while self._one_request(proxy):
                pass
        finally:
            proxy.connection_closed()

    def _one_request(self, proxy: S3Proxy) -> bool:
        """Relays (or answers instead) one request; whether the connection stays open."""
        request = _Message(self.rfile)
        if not request.start:
            return False  # the client closed its connection
        try:
            method, target, version = request.start.decode("latin-1").split()
        except ValueError:
            self._send_error(400, "Bad Request", "BadRequest", "Malformed request.")
            return False
        close = request.close or version == "HTTP/1.0"
        fault = proxy.pick_fault(method, target)
        if request.expect:
            if fault in _ERRORS:
                # As S3 does: the error instead of "100 Continue"; the body never comes.
                self._send_error(*_ERRORS[fault], method=method, close=True)
                return False
            self.connection.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        body = request.read_body(self.rfile)
        if proxy.hold_if_matching(method, target):
            self._reset()  # released only when the proxy stops: never forwarded
            return False
        if proxy.latency_s:
            time.sleep(proxy.latency_s)
        if fault in _ERRORS:
            self._send_error(*_ERRORS[fault], method=method, close=close)
            return not close
        if fault == "reset":
            self._reset()
            return False
        length = len(body) if body or method in ("PUT", "POST") else None
        head = request.head(f"{method} {target} HTTP/1.1\r\n".encode(), length)
        try:
            response, payload = proxy.upstream_connection().exchange(method, head, body)
        except ConnectionError:
            self._reset()
            return False
        proxy.record(method, target, response.status)
        if method == "HEAD":  # the object's size, not the empty body's
            head = response.head(response.start, response.length, close)
            self.connection.sendall(head)
            return not close
        head = response.head(response.start, len(payload), close)
        if fault == "truncate" and len(payload) > 1:
            proxy.count_injected("truncate")
            _send(self.connection, head, payload[: len(payload) // 2])
            self._reset()
            return False
        _send(self.connection, head, payload)
        return not close

    def _send_error(
        self,
        status: int,
        reason: str,
        code: str,
        message: str,
        method: str = "GET",
        close: bool = False,
    ) -> None:
        body = _ERROR_XML.format(code=code, message=message).encode()
        head = (
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/xml\r\n"
            f"Content-Length: {len(body)}\r\n"
            + ("Connection: close\r\n" if close else "")
            + "\r\n"
        ).encode()
        _send(self.connection, head, b"" if method == "HEAD" else body)

    def _reset(self) -> None:
        # SO_LINGER 0 makes close() send RST: the client sees "connection reset".
        self.connection.setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
        )


class _Server(socketserver.ThreadingTCPServer):
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

    def upstream_connection(self) -> _Upstream:
        """This thread's connection to the upstream server."""
        conn = getattr(self._conns, "conn", None)
        if conn is None:
            conn = self._conns.conn = _Upstream(self._upstream)
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
