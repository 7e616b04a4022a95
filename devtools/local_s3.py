"""A real local S3 endpoint: moto's server mode on 127.0.0.1, on a free port.

Used by ``run_local.sh``, the pytest fixtures and the benchmarks. Clients reach it over
real HTTP through the standard AWS chain: :func:`environment` gives the variables
(``AWS_ENDPOINT_URL_S3`` and dummy credentials) that point boto3 and Beam at it.

``python -m devtools.local_s3`` runs one in the foreground and prints its endpoint.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import io
import logging
import os
import socket
import sys
import threading
from collections.abc import Iterator

__all__ = ["LocalS3", "environment", "free_port", "put_tree", "running"]

# moto accepts any credentials; these only have to exist so the AWS chain resolves.
_DUMMY_ENV = {
    "AWS_ACCESS_KEY_ID": "local-test-key",
    "AWS_SECRET_ACCESS_KEY": "local-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalS3:
    """moto's ThreadedMotoServer bound to 127.0.0.1:``port``."""

    def __init__(self, port: int | None = None) -> None:
        from moto.server import ThreadedMotoServer

        self.port = port or free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port)

    def start(self) -> LocalS3:
        # One log line per request would drown the tools' own output.
        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        # moto prints "Starting a new Thread with MotoServer running on …" to stdout.
        with contextlib.redirect_stdout(io.StringIO()):
            self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop()


def environment(endpoint: str) -> dict[str, str]:
    """The AWS chain variables that point boto3 and Beam's S3 filesystem at ``endpoint``."""
    return {**_DUMMY_ENV, "AWS_ENDPOINT_URL_S3": endpoint}


@contextlib.contextmanager
def running(set_environ: bool = True) -> Iterator[LocalS3]:
    """Starts a server for the block; optionally exports its environment meanwhile."""
    server = LocalS3().start()
    saved = dict(os.environ)
    try:
        if set_environ:
            os.environ.update(environment(server.endpoint))
        yield server
    finally:
        if set_environ:
            os.environ.clear()
            os.environ.update(saved)
        server.stop()


def put_tree(root: str, bucket: str, prefix: str = "", threads: int = 32) -> list[str]:
    """Copies a local tree to ``s3://bucket/prefix`` with plain PUTs, many in flight.

    Set-up for the demo, tests and benchmarks (the upload job is the product's way).

    Returns:
        The keys written, sorted.
    """
    from s3tfr import s3, storage

    def put(name: str) -> str:
        s3.put_bytes(bucket, prefix + name, storage.read_bytes(storage.join(root, name)))
        return prefix + name

    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        return sorted(pool.map(put, (name for name, _size in storage.walk(root))))


def main() -> None:
    server = LocalS3(int(sys.argv[1]) if len(sys.argv) > 1 else None).start()
    print(server.endpoint, flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


if __name__ == "__main__":
    main()
