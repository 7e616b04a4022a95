"""The S3 network-conditions proxy: faults really happen, and the project's clients survive them."""

from __future__ import annotations

import os

import botocore.exceptions
import pytest

from s3tfr import s3
from s3tfr.s3 import S3Config


def _config(proxy, attempts: int) -> S3Config:
    return S3Config(s3_endpoint_url=proxy.endpoint, max_attempts=attempts)


def test_forwards_put_with_expect_100_continue_and_get(s3_bucket, s3_proxy):
    proxy = s3_proxy(latency_s=0.001)
    config = _config(proxy, 1)
    sent = []
    s3.client(config).meta.events.register(
        "before-send.s3.PutObject", lambda request, **_: sent.append(request.headers)
    )
    large = os.urandom(s3.EXPECT_CONTINUE_MIN_BYTES + 1)
    s3.put_bytes(s3_bucket, "a/b.bin", large, config)
    s3.put_bytes(s3_bucket, "a/c.bin", b"small", config)
    # Only the large body waits for "100 Continue" (as AWS's Go SDK does).
    assert [headers.get("Expect") for headers in sent] == [b"100-continue", None]
    assert s3.get_bytes(s3_bucket, "a/b.bin", config) == large
    assert s3.get_bytes(s3_bucket, "a/c.bin", config) == b"small"
    keys = [o.key for o in s3.iter_objects(s3_bucket, "a/", config)]
    assert keys == ["a/b.bin", "a/c.bin"]
    assert proxy.requests >= 5 and not proxy.injected


@pytest.mark.parametrize("size", [10, s3.EXPECT_CONTINUE_MIN_BYTES + 1])
def test_put_error_comes_before_or_after_the_body(s3_bucket, s3_proxy, size):
    """With ``Expect: 100-continue`` the error replaces "100 Continue" (the body is
    never sent); without it, the error follows the body. The client sees it either way."""
    proxy = s3_proxy(faults={"slowdown": 1.0})
    with pytest.raises(botocore.exceptions.ClientError) as excinfo:
        s3.put_bytes(s3_bucket, "k", os.urandom(size), _config(proxy, 1))
    assert excinfo.value.response["Error"]["Code"] == "SlowDown"
    assert proxy.injected["slowdown"] >= 1
    assert not list(s3.iter_objects(s3_bucket, ""))


@pytest.mark.parametrize(
    "kind, error",
    [
        ("slowdown", botocore.exceptions.ClientError),
        ("internal_error", botocore.exceptions.ClientError),
        (
            "reset",
            (
                botocore.exceptions.ConnectionError,
                botocore.exceptions.ConnectionClosedError,
            ),
        ),
    ],
)
def test_each_fault_kind_reaches_a_client_without_retries(
    s3_bucket, s3_proxy, kind, error
):
    s3.put_bytes(s3_bucket, "k", b"payload")
    proxy = s3_proxy(faults={kind: 1.0})
    with pytest.raises(error) as excinfo:
        s3.client(_config(proxy, 1)).get_object(Bucket=s3_bucket, Key="k")
    if kind == "slowdown":
        assert excinfo.value.response["Error"]["Code"] == "SlowDown"
    assert proxy.injected[kind] == 1  # one attempt: --max_attempts counts attempts


def test_truncated_body_is_detected_and_retried(s3_bucket, s3_proxy):
    data = os.urandom(200_000)
    s3.put_bytes(s3_bucket, "big", data)
    proxy = s3_proxy(faults={"truncate": 1.0})
    config = _config(proxy, 1)
    with pytest.raises(
        (
            botocore.exceptions.IncompleteReadError,
            botocore.exceptions.ResponseStreamingError,
        )
    ):
        s3.client(config).get_object(Bucket=s3_bucket, Key="big")["Body"].read()
    proxy.set_conditions(faults={"truncate": 0.5})
    for _ in range(5):
        assert s3.get_bytes(s3_bucket, "big", config) == data
    assert proxy.injected["truncate"] >= 2


def test_project_client_survives_mixed_faults(s3_bucket, s3_proxy):
    faults = {"slowdown": 0.1, "internal_error": 0.1, "reset": 0.1, "truncate": 0.1}
    proxy = s3_proxy(faults=faults, seed=7)
    config = _config(proxy, 10)
    blobs = {f"obj/{i}": os.urandom(1000 + i) for i in range(30)}
    for key, data in blobs.items():
        s3.put_bytes(s3_bucket, key, data, config)
    for key, data in blobs.items():
        assert s3.get_bytes(s3_bucket, key, config) == data
    assert sum(proxy.injected.values()) >= 10
    assert set(proxy.injected) == set(faults)


def test_rejects_unknown_fault_kinds(s3_proxy):
    with pytest.raises(ValueError, match="unknown fault"):
        s3_proxy(faults={"gremlins": 0.1})
