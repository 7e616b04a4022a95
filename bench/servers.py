"""The benchmarks' S3: moto's server and the project's proxy, each in its own process.

Real S3 runs on other machines; here the server shares the cores with the client, but
not the client's interpreter. Run as threads of the benchmark's own process, moto and
the proxy would share one GIL, and that one interpreter, not the client under test,
would cap the request rate. Measured: moto used 9.7 s of CPU for 2,000 set-up PUTs plus
a 2,000-image convert job's requests; that job took 11.8-15.4 s with the server in
threads and 10.9-12.2 s with it in processes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import subprocess
import sys
import time
from collections.abc import Iterator

from devtools import local_s3
from s3tfr import s3


@dataclasses.dataclass(frozen=True)
class ProxiedS3:
    """A running server and the proxy in front of it."""

    server: subprocess.Popen
    proxy: subprocess.Popen
    endpoint: str  # the server itself
    proxy_endpoint: str  # the server with ``latency_ms`` added to every request

    def environment(self) -> dict[str, str]:
        """The AWS chain variables that point boto3 and Beam at the server."""
        return local_s3.environment(self.endpoint)


@contextlib.contextmanager
def proxied_s3(latency_ms: float, bucket: str) -> Iterator[ProxiedS3]:
    """Starts both for the block, with ``bucket`` created, and exports the server's
    environment (:func:`devtools.local_s3.environment`) meanwhile."""
    endpoint = f"http://127.0.0.1:{local_s3.free_port()}"
    saved = dict(os.environ)
    os.environ.update(local_s3.environment(endpoint))
    os.environ.pop("AWS_ENDPOINT_URL", None)
    server = subprocess.Popen(
        [os.path.join(os.path.dirname(sys.executable), "moto_server"), "-H", "127.0.0.1",
         "-p", endpoint.rsplit(":", 1)[1]],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,  # one log line per request
    )  # fmt: skip
    proxy = subprocess.Popen(
        [sys.executable, "-m", "devtools.s3proxy", endpoint, "--latency_ms", str(latency_ms)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        proxy_endpoint = proxy.stdout.readline().strip()
        for attempt in range(100):
            try:
                s3.client().create_bucket(Bucket=bucket)
                break
            except Exception:  # the server is still starting
                if attempt == 99:
                    raise
                time.sleep(0.1)
        yield ProxiedS3(server, proxy, endpoint, proxy_endpoint)
    finally:
        proxy.terminate()
        server.terminate()
        proxy.wait()
        server.wait()
        os.environ.clear()
        os.environ.update(saved)
