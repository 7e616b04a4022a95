"""The small values that flow between the convert job's stages (no Beam import).

Only references travel through grouping steps; image bytes never do, so a worker's
memory is bounded by its in-flight window, not by the dataset (docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import Iterable
from typing import NamedTuple

__all__ = [
    "Compaction",
    "ImageRef",
    "IndexRow",
    "KeyIndexError",
    "Rejection",
    "ShardItem",
    "content_split_key",
    "decode_index",
    "encode_index",
    "key_hash",
]


class ImageRef(NamedTuple):
    """A listed object: ``key`` is relative to the input root, ``/``-separated."""

    key: str
    size: int
    label: str  # the class folder name
    split: str = ""  # set only with --split_from_dirs
    sha256: str = ""  # the content's hex SHA-256, set only when sources are hashed
    phash: int = -1  # its perceptual hash, set only with --dedupe near (-1: none)
    stamp: str = ""  # changes when the source is rewritten: S3 ETag, local mtime (ns)


class ShardItem(NamedTuple):
    """An image assigned to a split; ``order`` fixes its shard and its place in it."""

    order: int
    key: str
    size: int
    label: int
    label_text: str
    sha256: str = ""  # the content it was assigned by, if any: checked when written
    stamp: str = ""  # the listing's stamp (ImageRef.stamp), for the key index


class IndexRow(NamedTuple):
    """One record of a committed shard, as its key index holds it (``convert --append``
    compares it with the listing); ``file`` is the shard's name."""

    key: str
    size: int
    stamp: str
    sha256: str
    file: str = ""


class KeyIndexError(RuntimeError):
    """A shard's key index is missing, damaged, or disagrees with the shard: an append
    cannot trust what the dataset holds."""


class Compaction(NamedTuple):
    """A committed shard to copy, less the records of ``drop`` (keys whose source was
    changed or deleted since): the shard writer's work for a group of this alone."""

    file: str
    drop: frozenset[str]


def encode_index(rows: Iterable[IndexRow]) -> bytes:
    """A shard's key index: gzip'd JSON lines in record order (no time stamp in the
    gzip header, so the same records give the same bytes)."""
    lines = "".join(
        json.dumps({"key": r.key, "size": r.size, "stamp": r.stamp, "sha256": r.sha256},
                   ensure_ascii=False, sort_keys=True) + "\n"
        for r in rows
    )  # fmt: skip
    return gzip.compress(lines.encode(), mtime=0)


def decode_index(data: bytes, file: str) -> list[IndexRow]:
    """The rows of the key index of the shard ``file`` (as :func:`encode_index` wrote).

    Raises:
        KeyIndexError: the bytes are not such an index.
    """
    rows = []
    try:
        for line in gzip.decompress(data).decode().splitlines():
            row = json.loads(line)
            rows.append(IndexRow(str(row["key"]), int(row["size"]), str(row["stamp"]),
                                 str(row["sha256"]), file))  # fmt: skip
    except (OSError, EOFError, ValueError, KeyError, TypeError) as e:
        raise KeyIndexError(
            f"the key index of {file} is damaged ({type(e).__name__}): run a full convert "
            "to rewrite the dataset"
        ) from None
    return rows


class Rejection(NamedTuple):
    """An input that was not written, with a reason a person can act on."""

    key: str
    stage: str  # list, assign, fetch, decode
    code: str  # short stable category, also a counter name
    reason: str

    def to_json(self) -> str:
        return json.dumps(self._asdict(), ensure_ascii=False, sort_keys=True)


def content_split_key(sha256: str) -> str:
    """What :func:`key_hash` hashes to pick the split of an image by its content: the
    same bytes under any name get the same split."""
    return f"sha256:{sha256}"


def key_hash(salt: str, key: str) -> tuple[float, int]:
    """A salted hash of a key: ``(u in [0, 1) for the split, 64-bit int for the shard)``.

    Depends only on the salt and the key, so an image's split and order never change
    when other images are added.
    """
    digest = hashlib.sha256(f"{salt}\0{key}".encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64, int.from_bytes(digest[8:16], "big")
