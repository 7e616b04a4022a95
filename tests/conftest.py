"""Shared fixtures: a real local S3 server (moto server mode on 127.0.0.1, started once per
session), a fresh bucket per test and the network-conditions proxy.

Everything reaches the server over real HTTP through the standard AWS chain
(``AWS_ENDPOINT_URL_S3``), exactly as the product reaches AWS.
"""

from __future__ import annotations

import os
import uuid

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest

from devtools import local_s3
from devtools.s3proxy import S3Proxy
from s3tfr import s3


@pytest.fixture(scope="session")
def s3_server():
    """The session's local S3 server; its endpoint is exported to the AWS chain."""
    server = local_s3.LocalS3().start()
    with pytest.MonkeyPatch.context() as mp:
        for name, value in local_s3.environment(server.endpoint).items():
            mp.setenv(name, value)
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
            mp.delenv(name, raising=False)
        yield server
    server.stop()


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A fresh, empty bucket for one test."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    s3.client().create_bucket(Bucket=name)
    return name


@pytest.fixture
def s3_proxy(s3_server):
    """Factory: ``s3_proxy(latency_s=…, faults={…})`` starts a proxy in front of the server.

    Point a client at ``proxy.endpoint`` (or set ``AWS_ENDPOINT_URL_S3`` to it).
    """
    proxies = []

    def _start(latency_s: float = 0.0, faults: dict | None = None, seed: int = 0) -> S3Proxy:
        proxy = S3Proxy(s3_server.endpoint, latency_s, faults, seed).start()
        proxies.append(proxy)
        return proxy

    yield _start
    for proxy in proxies:
        proxy.stop()
