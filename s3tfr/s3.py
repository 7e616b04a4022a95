"""S3 access shared by the jobs, the reader, the tests and the benchmarks (no Beam import).

In: ``s3://bucket/key`` URIs and an optional :class:`S3Config` (Beam's ``S3Options`` values,
or nothing for the standard AWS chain). Out: boto3 clients with explicit retries, paged
listings, whole-object reads that survive truncated bodies, and atomic uploads.

Why not Beam's S3 filesystem for everything: it builds its client without a retry config,
does not retry ``CreateMultipartUpload`` and fails on empty objects. boto3's transfer manager aborts failed multipart uploads and retries parts.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import boto3
import botocore.config
import botocore.exceptions
import botocore.session
import botocore.utils
from boto3.s3.transfer import TransferConfig

__all__ = [
    "S3Config",
    "S3Object",
    "body_retries",
    "client",
    "error_code",
    "get_bytes",
    "is_s3",
    "iter_objects",
    "list_prefixes",
    "parse",
    "put_bytes",
    "upload_file",
]

# botocore's "standard" mode retries throttling (503 SlowDown), 500s and connection errors
# with jittered backoff; the default of 3 attempts is too few for long jobs.
DEFAULT_MAX_ATTEMPTS = 10
# A body cut mid-stream (a reset after the headers) is outside botocore's retry loop.
BODY_RETRIES = 5
# Until an endpoint has answered once, a connection to it that is refused or times out is
# tried this many times, not max_attempts: it is most likely the wrong endpoint or down,
# and the user should hear so in seconds. Once it has answered, connection errors get
# max_attempts like throttling and 5xx errors (a blip in a long job).
FIRST_CONTACT_ATTEMPTS = 3
CONNECT_TIMEOUT_S = 3
MULTIPART_THRESHOLD = 64 * 1024 * 1024
MULTIPART_CHUNKSIZE = 16 * 1024 * 1024

TRANSIENT_BODY_ERRORS = (
    botocore.exceptions.ResponseStreamingError,
    botocore.exceptions.IncompleteReadError,
    botocore.exceptions.ReadTimeoutError,
    botocore.exceptions.ConnectionClosedError,
    ConnectionError,
)
# No connection at all (botocore retries these itself; nothing was cut).
_CONNECT_ERRORS = (
    botocore.exceptions.EndpointConnectionError,
    botocore.exceptions.ConnectTimeoutError,
    botocore.exceptions.ProxyConnectionError,
    botocore.exceptions.SSLError,
)


@dataclasses.dataclass(frozen=True)
class S3Config:
    """Client settings; every field left ``None`` falls back to the standard AWS chain.

    The field names match Beam's ``S3Options`` so a job passes its options straight in.
    """

    s3_endpoint_url: str | None = None
    s3_region_name: str | None = None
    s3_access_key_id: str | None = None
    s3_secret_access_key: str | None = None
    s3_session_token: str | None = None
    s3_verify: str | None = None
    s3_disable_ssl: bool = False
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    max_pool_connections: int = 64

    def __post_init__(self) -> None:
        if bool(self.s3_access_key_id) != bool(self.s3_secret_access_key):
            given, missing = (
                ("--s3_access_key_id", "--s3_secret_access_key")
                if self.s3_access_key_id
                else ("--s3_secret_access_key", "--s3_access_key_id")
            )
            raise ValueError(
                f"{given} was given without {missing}: give both, or neither to use the "
                "standard AWS chain (environment, config files, instance role)"
            )

    @classmethod
    def from_options(cls, options: Any) -> S3Config:
        """Builds a config from any object with Beam ``S3Options`` attributes."""
        names = [f.name for f in dataclasses.fields(cls)]
        values = {n: getattr(options, n) for n in names if getattr(options, n, None)}
        return cls(**values)

    def __repr__(self) -> str:
        # Never print a secret: only say whether one was given.
        shown = {
            f.name: ("<set>" if "secret" in f.name or "token" in f.name else v)
            for f in dataclasses.fields(self)
            if (v := getattr(self, f.name)) not in (None, False)
        }
        return f"S3Config({shown})"


@dataclasses.dataclass(frozen=True)
class S3Object:
    key: str
    size: int
    etag: str = ""


_USER_AGENT = f"s3-tfrecords Boto3/{boto3.__version__}"
# botocore asks for "100 Continue" before every PUT body; AWS's Go SDK does so only
# above 2 MiB (its ContinueHeaderThresholdBytes). Below that the handshake only costs:
# a round trip per PUT against S3, and ~0.1 ms of client CPU per PUT (7% of a small
# PUT's). A refused small PUT just sends its few bytes for nothing.
EXPECT_CONTINUE_MIN_BYTES = 2 * 1024 * 1024


def _expect_continue_only_for_large_bodies(params: dict, **_kwargs: Any) -> None:
    """Drops the ``Expect: 100-continue`` botocore set when the body is small (the
    header is not signed, so removing it keeps the signature valid)."""
    headers = params.get("headers", {})
    if "Expect" in headers:
        size = botocore.utils.determine_content_length(params.get("body"))
        if size is not None and size < EXPECT_CONTINUE_MIN_BYTES:
            del headers["Expect"]


def _parse_timestamp(value: Any) -> Any:
    """botocore's timestamp parser, minus dateutil for the ISO 8601 form S3 writes
    in XML (``2024-05-01T12:00:00.000Z``): dateutil took most of the client's CPU for a
    listing page (``LastModified`` of every key). Anything else goes to botocore's."""
    if isinstance(value, str) and value.endswith("Z"):
        try:
            return datetime.datetime.fromisoformat(value)
        except ValueError:
            pass
    return botocore.utils.parse_timestamp(value)


class _FirstContact:
    """A ``needs-retry`` handler: connection errors end the request after
    ``FIRST_CONTACT_ATTEMPTS`` until the endpoint has answered once.

    botocore's retry config has one attempt count for every retryable error; raising the
    caught error from this event ends the request with it, as running out of attempts
    does, and leaves every other error to botocore's standard mode.
    """

    def __init__(self) -> None:
        self.reached = False

    def __call__(
        self,
        attempts: int,
        response: Any = None,
        caught_exception: Any = None,
        **_: Any,
    ) -> None:
        if response is not None:
            self.reached = True
        elif (
            not self.reached
            and isinstance(caught_exception, _CONNECT_ERRORS)
            and attempts >= FIRST_CONTACT_ATTEMPTS
        ):
            raise caught_exception


# A client is rebuilt when any of these change (tests and the demo re-point the endpoint).
_CHAIN_VARIABLES = (
    "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_PROFILE",
    "AWS_DEFAULT_REGION", "AWS_REGION",
)  # fmt: skip
_clients: dict[tuple, Any] = {}
_clients_lock = threading.Lock()


def client(config: S3Config | None = None) -> Any:
    """Returns a boto3 S3 client, one per process and config.

    boto3 clients are thread-safe and costly to build (~0.1 s of CPU each), so every
    thread of a process shares one, with a connection pool sized for many in flight.
    ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` and the rest of the AWS chain are honoured
    by boto3 itself when the config leaves them unset.
    """
    config = config or S3Config()
    cache_key = (os.getpid(), config, tuple(os.environ.get(v) for v in _CHAIN_VARIABLES))
    if cache_key in _clients:
        return _clients[cache_key]
    with _clients_lock:
        if cache_key in _clients:
            return _clients[cache_key]
        verify: Any = None
        if config.s3_verify is not None:
            verify = False if config.s3_verify.lower() in ("false", "0") else config.s3_verify
        core = botocore.session.get_session()
        core.get_component("response_parser_factory").set_parser_defaults(
            timestamp_parser=_parse_timestamp
        )
        session = boto3.session.Session(
            aws_access_key_id=config.s3_access_key_id,
            aws_secret_access_key=config.s3_secret_access_key,
            aws_session_token=config.s3_session_token,
            region_name=config.s3_region_name,
            botocore_session=core,
        )
        built = session.client(
            "s3",
            endpoint_url=config.s3_endpoint_url,
            use_ssl=not config.s3_disable_ssl,
            verify=verify,
            config=botocore.config.Config(
                # botocore's "max_attempts" counts retries; "total_max_attempts" counts
                # attempts, as --max_attempts and AWS_MAX_ATTEMPTS do.
                retries={"mode": "standard", "total_max_attempts": config.max_attempts},
                max_pool_connections=config.max_pool_connections,
                connect_timeout=CONNECT_TIMEOUT_S,
                read_timeout=60,
                # Some S3-compatible servers reject boto3's newer default checksums.
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
                # A fixed user agent: otherwise botocore rebuilds the whole string on
                # every request, about a tenth of the client's CPU per small PUT.
                user_agent=_USER_AGENT,
            ),
        )
        # Last: after botocore's own handler has added the header.
        built.meta.events.register_last(
            "before-call.s3", _expect_continue_only_for_large_bodies
        )
        built.meta.events.register_first("needs-retry.s3", _FirstContact())
        _clients[cache_key] = built
    return _clients[cache_key]


def error_code(error: Exception) -> str:
    """The S3 error code of a botocore ``ClientError`` (``NoSuchKey``, ``404``, …);
    ``""`` for anything else."""
    return getattr(error, "response", {}).get("Error", {}).get("Code", "")


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def parse(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")``.

    Raises:
        ValueError: if ``uri`` is not an ``s3://`` URI with a bucket.
    """
    if not is_s3(uri):
        raise ValueError(f"not an s3:// URI: {uri!r}")
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not bucket:
        raise ValueError(f"no bucket in {uri!r}")
    return bucket, key


def iter_objects(
    bucket: str, prefix: str, config: S3Config | None = None
) -> Iterator[S3Object]:
    """Streams every object under ``prefix`` page by page (1,000 keys per request)."""
    paginator = client(config).get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", ()):
            yield S3Object(item["Key"], item["Size"], item.get("ETag", "").strip('"'))


def list_prefixes(
    bucket: str, prefix: str, config: S3Config | None = None
) -> Iterator[str | S3Object]:
    """One level below ``prefix``: yields sub-prefixes (``str``) and direct objects."""
    paginator = client(config).get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix, Delimiter="/"):
        for common in page.get("CommonPrefixes", ()):
            yield common["Prefix"]
        for item in page.get("Contents", ()):
            yield S3Object(item["Key"], item["Size"], item.get("ETag", "").strip('"'))


def body_retries(fn, *args, attempts: int = BODY_RETRIES, **kwargs):
    """Calls ``fn`` again when a response body is cut mid-stream (jittered backoff)."""
    for attempt in range(attempts):
        try:
            return fn(*args, **kwargs)
        except TRANSIENT_BODY_ERRORS:
            if attempt == attempts - 1:
                raise
            time.sleep(min(2.0, 0.05 * 2**attempt))
    raise AssertionError("unreachable")


def get_bytes(bucket: str, key: str, config: S3Config | None = None) -> bytes:
    """Reads a whole object; a truncated body is detected by botocore and retried here."""

    def _get() -> bytes:
        return client(config).get_object(Bucket=bucket, Key=key)["Body"].read()

    return body_retries(_get)


def put_bytes(
    bucket: str, key: str, data: bytes, config: S3Config | None = None, **extra: Any
) -> None:
    """Single-request PUT; retried by botocore (the body is seekable bytes)."""
    client(config).put_object(Bucket=bucket, Key=key, Body=data, **extra)


def upload_file(
    path: str,
    bucket: str,
    key: str,
    config: S3Config | None = None,
    multipart_threshold: int = MULTIPART_THRESHOLD,
    **extra: Any,
) -> None:
    """Uploads a local file; multipart above ``multipart_threshold`` (default 64 MiB; a
    failed multipart upload is aborted, nothing orphaned).

    The object becomes visible atomically when the upload completes.
    """
    transfer = TransferConfig(
        multipart_threshold=multipart_threshold,
        multipart_chunksize=max(min(MULTIPART_CHUNKSIZE, multipart_threshold), 5 * 1024 * 1024),
        max_concurrency=4,
    )
    client(config).upload_file(path, bucket, key, ExtraArgs=extra or None, Config=transfer)
