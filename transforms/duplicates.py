"""Duplicates in a converted dataset, found while ``inspect --verify`` reads it.

Every record gives a fingerprint: its source's SHA-256 (``image/source_sha256``) and a
64-bit perceptual hash of its decoded image (the signs of its lowest DCT frequencies).
Records with the same source bytes are exact duplicates; records of different sources
whose perceptual hashes are within ``NEAR_BITS`` bits are near-duplicates (resized,
re-encoded or lightly edited copies). Groups that straddle splits (leakage between
training and evaluation) are listed first, then groups across classes (label
conflicts). Only fingerprints are grouped; near pairs are found by bands: two hashes
within ``NEAR_BITS`` bits agree exactly on at least one of ``NEAR_BITS + 1`` bands.
"""

from __future__ import annotations

import collections
import io
import json
from typing import NamedTuple

import apache_beam as beam
import numpy as np

__all__ = [
    "NEAR_BITS",
    "DuplicateReport",
    "FindDuplicates",
    "Fingerprint",
    "NearPairs",
    "conflicts",
    "converted_hash",
    "groups_of",
    "image_fingerprint",
    "perceptual_hash",
    "straddles",
]

# Measured on generated photos, an original against a resized and re-encoded copy, both
# converted: at most 6 bits apart at 32x32, 4 at 64x64, 2 at 224x224; unrelated images
# at least 18 apart (24 at the 5th percentile).
NEAR_BITS = 6
_BANDS = NEAR_BITS + 1
_BAND_EDGES = [round(64 * i / _BANDS) for i in range(_BANDS + 1)]
# Groups listed per kind; the counts cover all of them.
_MAX_LISTED = 20


class Fingerprint(NamedTuple):
    sha256: str
    phash: int
    split: str
    label: str
    name: str


def _dct_matrix(n: int) -> np.ndarray:
    k, i = np.mgrid[0:n, 0:n]
    return np.cos(np.pi * (2 * i + 1) * k / (2 * n))


_DCT32 = _dct_matrix(32)


def perceptual_hash(image) -> int:
    """The 64-bit perceptual hash (pHash) of a Pillow image: the 8x8 lowest frequencies
    (the constant one left out) of its 32x32 gray version's DCT, one bit each for being
    above their median. Resizing, re-encoding and small edits move few bits."""
    from PIL import Image

    gray = np.asarray(image.convert("L").resize((32, 32), Image.Resampling.BOX), np.float64)
    low = (_DCT32 @ gray @ _DCT32.T)[:8, :8].flatten()[1:]
    bits = np.append(low > np.median(low), False)
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def converted_hash(data: bytes, settings) -> int:
    """The perceptual hash of the record a source file becomes under ``settings`` (a
    ``ConvertSettings``: every limit and check of the conversion), the same value
    ``inspect --verify`` computes from that record; -1 if it does not convert (the
    writer rejects it, with its reason)."""
    from transforms.images import ImageError

    try:
        converted = settings.convert(data)
    except ImageError:
        return -1
    return image_fingerprint(converted.encoded)


def image_fingerprint(encoded: bytes) -> int:
    from PIL import Image

    with Image.open(io.BytesIO(encoded)) as image:
        return perceptual_hash(image)


def _bands(item):
    for i in range(_BANDS):
        lo, hi = _BAND_EDGES[i], _BAND_EDGES[i + 1]
        yield (i, (item.phash >> (64 - hi)) & ((1 << (hi - lo)) - 1)), item


def _near_pairs(bucket):
    """The pairs of different sources within ``NEAR_BITS`` in one band's bucket (each
    item against all after it, vectorised: a bucket holds ~N / 2**9 items)."""
    _band, members = bucket
    members = sorted(set(members))
    hashes = np.array([fp.phash for fp in members], np.uint64)
    for i in range(len(members) - 1):
        close = np.nonzero(np.bitwise_count(hashes[i] ^ hashes[i + 1 :]) <= NEAR_BITS)[0]
        for j in close + i + 1:
            if members[i].sha256 != members[j].sha256:
                yield (members[i], members[j])


class NearPairs(beam.PTransform):
    """Items with ``phash`` and ``sha256`` (fingerprints, references) -> every pair of
    different sources whose hashes are within ``NEAR_BITS``, once."""

    def expand(self, items):
        return (
            items
            | "Bands" >> beam.FlatMap(_bands)
            | "GroupByBand" >> beam.GroupByKey()
            | "Pairs" >> beam.FlatMap(_near_pairs)
            | "Distinct" >> beam.Distinct()
        )


class FindDuplicates(beam.PTransform):
    """Fingerprints -> one ``DuplicateReport``'s raw material: exact groups (lists of
    fingerprints with the same source bytes) and near pairs."""

    def expand(self, fingerprints):
        exact = (
            fingerprints
            | "BySource" >> beam.Map(lambda fp: (fp.sha256, fp))
            | "GroupBySource" >> beam.GroupByKey()
            | "Repeated" >> beam.FlatMap(lambda kv: [list(kv[1])] if len(kv[1]) > 1 else [])
            | "AllExact" >> beam.combiners.ToList()
        )
        near = (
            fingerprints
            | "NearPairs" >> NearPairs()
            | "AllNear" >> beam.combiners.ToList()
        )
        return {"exact": exact, "near": near}


def groups_of(pairs) -> list[list]:
    """Connected groups of items from pairs (union-find)."""
    parent: dict = {}

    def root(x):
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in pairs:
        parent[root(a)] = root(b)
    groups = collections.defaultdict(list)
    for x in parent:
        groups[root(x)].append(x)
    return [sorted(g) for g in groups.values()]


class DuplicateReport(NamedTuple):
    exact: list[list[Fingerprint]]
    near: list[list[Fingerprint]]

    @classmethod
    def build(cls, exact, near_pairs) -> DuplicateReport:
        return cls(_ordered(exact), _ordered(groups_of(near_pairs)))

    def to_json(self) -> bytes:
        return json.dumps({"exact": self.exact, "near": self.near}).encode()

    @classmethod
    def from_json(cls, data: bytes) -> DuplicateReport:
        parsed = json.loads(data)
        return cls(*([[Fingerprint(*fp) for fp in group] for group in parsed[kind]]
                     for kind in ("exact", "near")))  # fmt: skip

    def summary(self) -> list[tuple[str, int, int, int, int]]:
        """(kind, groups, records, groups straddling splits, groups across classes)."""
        return [
            (kind, len(groups), sum(map(len, groups)), sum(map(straddles, groups)),
             sum(map(conflicts, groups)))
            for kind, groups in (("exact", self.exact), ("near", self.near))
        ]  # fmt: skip

    def lines(self) -> list[str]:
        out = []
        near = (
            f"near-duplicates (perceptual hash within {NEAR_BITS} of 64 bits, "
            "different sources)"
        )
        names = ("exact duplicates (same source bytes)", near)
        for kind, groups, (_, count, records, straddle, across) in zip(
            names, (self.exact, self.near), self.summary()
        ):
            out.append(
                f"{kind}: {count} groups, {records} records; "
                f"straddling splits {straddle}, across classes {across}"
            )
            for group in groups[:_MAX_LISTED]:
                tags = [t for t, f in (("splits", straddles), ("classes", conflicts)) if f(group)]
                members = ", ".join(f"{fp.name} ({fp.split}, {fp.label})" for fp in group)
                out.append(f"  {'across ' + ' and '.join(tags) + ': ' if tags else ''}{members}")
            if len(groups) > _MAX_LISTED:
                out.append(f"  … and {len(groups) - _MAX_LISTED} more groups")
        return out


def straddles(group) -> bool:
    """Whether a duplicate group has records in more than one split."""
    return len({fp.split for fp in group}) > 1


def conflicts(group) -> bool:
    """Whether a duplicate group has records of more than one class."""
    return len({fp.label for fp in group}) > 1


def _ordered(groups) -> list[list[Fingerprint]]:
    """Groups straddling splits first, then across classes, then the rest; by name."""
    return sorted(
        (sorted(g, key=lambda fp: fp.name) for g in groups),
        key=lambda g: (not straddles(g), not conflicts(g), g[0].name),
    )
