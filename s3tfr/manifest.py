"""The reader's view of a converted dataset: ``s3tfr_manifest.json`` in, a validated dict out.

In: a dataset URI (``s3://bucket/prefix`` or a local path). Out: the manifest written by the
convert job (README, "What it writes"), checked before any shard is fetched: the schema and
types, the format version, shard names that are plain ``<split>-NNNNN-of-NNNNN.tfrecord``
file names (so no entry can point outside the dataset or the local cache), sha256 digests,
and counts that add up. ``s3tfr_manifest.json`` is the commit marker of a complete dataset:
a prefix without one is refused.

A dataset in the older layout keeps its manifest as ``dataset_info.json``, the name that
TensorFlow Datasets' metadata has in the present one; that file is read as the manifest
only when its content is the manifest's (it has ``format_version``, which TFDS's lacks).
"""

from __future__ import annotations

import json
import re
import urllib.parse
from typing import Any

import botocore.exceptions

from s3tfr import storage
from s3tfr.contract import (
    FORMAT_VERSION,
    LEGACY_MANIFEST,
    MANIFEST,
    SHARD_NAME_RE,
    SPLIT_NAME_RE,
)
from s3tfr.s3 import S3Config

__all__ = [
    "DatasetError",
    "is_manifest",
    "load_info",
    "s3_error",
    "shard_uris",
    "validate_info",
]

_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_COMPRESSIONS = ("", "GZIP", "ZLIB")
_MAX_MANIFEST_BYTES = 256 * 1024 * 1024


class DatasetError(Exception):
    """A dataset that cannot be read as it is; the message says what to do about it."""


_CREDENTIAL_HINTS = {
    "InvalidAccessKeyId": "S3 does not know the access key ID in use: check "
    "AWS_ACCESS_KEY_ID or AWS_PROFILE (or --s3_access_key_id) and the endpoint",
    "SignatureDoesNotMatch": "the secret access key does not belong to the access key ID: "
    "check AWS_SECRET_ACCESS_KEY or AWS_PROFILE (or --s3_secret_access_key)",
    "ExpiredToken": "the session token has expired: refresh the credentials",
    "InvalidToken": "the session token is not valid: refresh the credentials",
    "AccessDenied": "these credentials may not read it: check the IAM policy "
    "(s3:GetObject, s3:ListBucket) or use another profile",
}
_CREDENTIAL_HINTS["403"] = _CREDENTIAL_HINTS["Forbidden"] = _CREDENTIAL_HINTS["AccessDenied"]
_UNREACHABLE = (
    botocore.exceptions.EndpointConnectionError,
    botocore.exceptions.ConnectTimeoutError,
    botocore.exceptions.ProxyConnectionError,
    botocore.exceptions.SSLError,
)


def s3_error(error: Exception, uri: str) -> DatasetError:
    """A one-line ``DatasetError`` that says what to check, for a failed S3 request.

    Args:
        error: what botocore raised (``ClientError`` or ``BotoCoreError``).
        uri: what was being read, for the message.

    Returns:
        The error to raise: missing or refused credentials, access denied, no such
        bucket and an unreachable endpoint each name the setting to check; anything else
        keeps botocore's words, on one line.
    """
    if isinstance(error, botocore.exceptions.NoCredentialsError | botocore.exceptions.PartialCredentialsError):
        return DatasetError(
            f"no AWS credentials to read {uri}: set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, or run where an instance role gives them"
        )
    if isinstance(error, _UNREACHABLE):
        url = urllib.parse.urlsplit(getattr(error, "kwargs", {}).get("endpoint_url", ""))
        where = f"{url.scheme}://{url.netloc}" if url.netloc else "the S3 endpoint"
        return DatasetError(
            f"cannot reach {where} to read {uri} ({type(error).__name__}): check "
            "AWS_ENDPOINT_URL_S3 (or --s3_endpoint_url), the network and any proxy"
        )
    if isinstance(error, botocore.exceptions.ClientError):
        details = error.response.get("Error", {})
        code = str(details.get("Code", ""))
        if code in _CREDENTIAL_HINTS:
            return DatasetError(f"{code} reading {uri}: {_CREDENTIAL_HINTS[code]}")
        if code == "NoSuchBucket":
            return DatasetError(f"no such bucket reading {uri}: check the URI and the endpoint")
        message = " ".join(str(details.get("Message", "")).split())
        return DatasetError(f"S3 refused a request for {uri} ({code}: {message})")
    return DatasetError(f"S3 request for {uri} failed: {' '.join(str(error).split())}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _require(condition: bool, uri: str, what: str) -> None:
    if not condition:
        raise DatasetError(
            f"invalid {MANIFEST} under {uri}: {what}; rerun the convert job to rewrite it"
        )


def validate_info(info: Any, uri: str = "<dataset>") -> dict:
    """Checks a parsed manifest against the data contract.

    Args:
        info: the parsed ``s3tfr_manifest.json``.
        uri: the dataset URI, only for messages.

    Returns:
        ``info`` itself.

    Raises:
        DatasetError: naming the first field that is wrong.
    """
    _require(isinstance(info, dict), uri, "the top level is not a JSON object")
    version = info.get("format_version")
    if version != FORMAT_VERSION:
        raise DatasetError(
            f"{MANIFEST} under {uri} has format_version {version!r}; this reader reads "
            f"version {FORMAT_VERSION}: upgrade the reader or reconvert the dataset"
        )
    labels = info.get("labels")
    _require(
        isinstance(labels, list) and all(isinstance(x, str) and x for x in labels),
        uri,
        "'labels' must be a list of non-empty strings",
    )
    _require(len(set(labels)) == len(labels), uri, "'labels' has duplicates")
    _require(
        info.get("num_classes", len(labels)) == len(labels),
        uri,
        "'num_classes' differs from the number of labels",
    )
    _require(
        info.get("compression", "") in _COMPRESSIONS,
        uri,
        f"'compression' must be one of {_COMPRESSIONS}",
    )
    splits = info.get("splits")
    _require(isinstance(splits, dict), uri, "'splits' must be an object")
    seen: set[str] = set()
    for split, entry in splits.items():
        where = f"splits[{split!r}]"
        _require(
            isinstance(split, str) and bool(SPLIT_NAME_RE.fullmatch(split)),
            uri,
            f"split name {split!r} must be letters, digits and underscores",
        )
        _require(isinstance(entry, dict), uri, f"{where} must be an object")
        shards = entry.get("shards")
        _require(isinstance(shards, list), uri, f"{where}.shards must be a list")
        for key in ("examples", "bytes", "num_shards"):
            _require(_is_int(entry.get(key)), uri, f"{where}.{key} must be an int >= 0")
        _require(
            entry["num_shards"] == len(shards),
            uri,
            f"{where}.num_shards is {entry['num_shards']} but {len(shards)} shards are listed",
        )
        class_counts = entry.get("class_counts", {})
        _require(
            isinstance(class_counts, dict)
            and all(k in labels and _is_int(v) for k, v in class_counts.items()),
            uri,
            f"{where}.class_counts must map labels to ints >= 0",
        )
        total = 0
        series: set[str] = set()
        for i, shard in enumerate(shards):
            at = f"{where}.shards[{i}]"
            _require(isinstance(shard, dict), uri, f"{at} must be an object")
            name = shard.get("file")
            match = SHARD_NAME_RE.fullmatch(name) if isinstance(name, str) else None
            _require(
                match is not None,
                uri,
                f"{at}.file {name!r} is not a plain '{split}-NNNNN-of-NNNNN.tfrecord' name",
            )
            _require(match["split"] == split, uri, f"{at}.file {name!r} is not of split {split}")
            # One count per split: the series every shard of it is numbered in (shards
            # an append added run past it).
            series.add(match["count"])
            _require(len(series) == 1, uri, f"{where} mixes shard counts in its names")
            _require(name not in seen, uri, f"shard {name!r} is listed twice")
            seen.add(name)
            for key in ("examples", "bytes"):
                _require(_is_int(shard.get(key)), uri, f"{at}.{key} must be an int >= 0")
            digest = shard.get("sha256")
            _require(
                isinstance(digest, str) and bool(_SHA256_RE.fullmatch(digest)),
                uri,
                f"{at}.sha256 must be 64 lowercase hex digits",
            )
            total += shard["examples"]
        _require(
            total == entry["examples"],
            uri,
            f"{where}.examples is {entry['examples']} but its shards hold {total}",
        )
    return info


def is_manifest(document: object) -> bool:
    """Whether a parsed JSON document is this tool's manifest rather than TensorFlow
    Datasets' ``dataset_info.json`` (whose DatasetInfo proto has no ``format_version``)."""
    return isinstance(document, dict) and "format_version" in document


def load_info(uri: str, config: S3Config | None = None) -> dict:
    """Reads and validates ``<uri>/s3tfr_manifest.json``.

    A dataset without one whose ``dataset_info.json`` is the manifest (an older layout)
    is read from there; TensorFlow Datasets' ``dataset_info.json`` alone is no manifest.

    Args:
        uri: the dataset prefix, ``s3://bucket/prefix`` or a local directory.
        config: S3 client settings; ``None`` uses the standard AWS chain.

    Returns:
        The manifest dict (labels, counts, splits with their shards, ...).

    Raises:
        DatasetError: when there is no manifest (an unfinished conversion) or it is invalid.
    """
    rerun = "rerun the convert job to rewrite it"
    info = read_json(uri, MANIFEST, config, missing=None, rerun=rerun)
    if info is None:
        legacy = read_json(uri, LEGACY_MANIFEST, config, missing=None, rerun=rerun)
        if not is_manifest(legacy):
            raise DatasetError(
                f"no {MANIFEST} under {uri}: the convert job did not finish (or this is "
                "not a converted dataset); rerun it, or point at the convert job's --output"
            )
        info = legacy
    return validate_info(info, uri)


def read_json(
    uri: str, name: str, config: S3Config | None, missing: str | None, rerun: str
) -> object:
    """Reads and parses the JSON document ``name`` under ``uri`` (not yet validated).

    Args:
        uri: the dataset prefix, ``s3://bucket/prefix`` or a local directory.
        name: the document's file name (``s3tfr_manifest.json``, ``analysis.json``).
        config: S3 client settings; ``None`` uses the standard AWS chain.
        missing: what to tell the user when the document does not exist; ``None``
            returns ``None`` then instead.
        rerun: what to tell the user when it is not valid JSON.

    Raises:
        DatasetError: the document is missing, unreadable, too large or not JSON.
    """
    path = storage.join(uri, name)
    try:
        data = storage.read_bytes(path, config)
    except (FileNotFoundError, NotADirectoryError):
        if missing is None:
            return None
        raise DatasetError(f"no {name} under {uri}: {missing}") from None
    except PermissionError:
        raise DatasetError(
            f"AccessDenied reading {path}: {_CREDENTIAL_HINTS['AccessDenied']}"
        ) from None
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as e:
        raise s3_error(e, path) from None
    if len(data) > _MAX_MANIFEST_BYTES:
        raise DatasetError(f"{path} is {len(data)} bytes: not a manifest")
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetError(f"{path} is not valid JSON ({e}); {rerun}") from None


def shard_uris(info: dict, uri: str, split: str) -> list[tuple[str, dict]]:
    """The shards of ``split`` as ``(shard URI, manifest entry)``, in manifest order.

    Raises:
        DatasetError: if the dataset has no such split.
    """
    splits = info["splits"]
    if split not in splits:
        raise DatasetError(
            f"no split {split!r} in {uri}; it has {sorted(splits)}"
            + (" (convert with --validation_fraction to get one)" if split != "train" else "")
        )
    return [(storage.join(uri, shard["file"]), shard) for shard in splits[split]["shards"]]
