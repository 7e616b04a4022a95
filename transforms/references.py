"""The small values that flow between the convert job's stages (no Beam import).

Only references travel through grouping steps; image bytes never do, so a worker's
memory is bounded by its in-flight window, not by the dataset (docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import hashlib
import json
from typing import NamedTuple

__all__ = ["ImageRef", "Rejection", "ShardItem", "content_split_key", "key_hash"]


class ImageRef(NamedTuple):
    """A listed object: ``key`` is relative to the input root, ``/``-separated."""

    key: str
    size: int
    label: str  # the class folder name
    split: str = ""  # set only with --split_from_dirs
    sha256: str = ""  # the content's hex SHA-256, set only when sources are hashed
    phash: int = -1  # its perceptual hash, set only with --dedupe near (-1: none)


class ShardItem(NamedTuple):
    """An image assigned to a split; ``order`` fixes its shard and its place in it."""

    order: int
    key: str
    size: int
    label: int
    label_text: str
    sha256: str = ""  # the content it was assigned by, if any: checked when written


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
