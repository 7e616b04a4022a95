"""AssignShards: lists of image references in, references grouped by output shard out.

Split and shard membership come from a salted hash of the key (never from bundle order),
so the output is the same on every runner and worker count, and an image keeps its split
when others are added; with ``split_by="content"`` the split comes from a salted hash of
the source's bytes instead (``transforms.content``). Only references are grouped; image bytes never are.
"""

from __future__ import annotations

import collections
import dataclasses
import math

import apache_beam as beam
from apache_beam import pvalue

from s3tfr.contract import SPLIT_NAME_RE, shard_name
from transforms.listing import REJECTED, count_rejection
from transforms.references import (
    ImageRef,
    Rejection,
    ShardItem,
    content_split_key,
    key_hash,
)

__all__ = [
    "COMPACTION_BUCKET",
    "AssignShards",
    "ShardConfig",
    "ShardNaming",
    "assign_problem",
    "num_shards",
]

# Shard groups of ``convert --append`` that copy a committed shard (``Compaction``) have
# buckets from here on, after every bucket of new images: they are named after them.
COMPACTION_BUCKET = 1 << 48

# Shards are the unit of parallelism for the writer and for readers on many hosts, so a
# split gets at least ``min_shards`` of them when each still holds this many images.
MIN_EXAMPLES_PER_SHARD = 100


def num_shards(
    examples: int, estimated_bytes: int, shard_bytes: int, fixed: int = 0, min_shards: int = 1
) -> int:
    """Shards for a split: ``fixed`` if given, else enough for ``shard_bytes`` each.

    Without ``fixed``, at least ``min_shards`` while each keeps ``MIN_EXAMPLES_PER_SHARD``
    images. Never more shards than examples.
    """
    if fixed:
        wanted = fixed
    else:
        by_size = math.ceil(estimated_bytes / shard_bytes)
        wanted = max(by_size, min(min_shards, examples // MIN_EXAMPLES_PER_SHARD))
    return max(1, min(wanted, examples))


def assign_problem(ref: ImageRef, labels) -> tuple[str, str] | None:
    """Why AssignShards rejects ``ref`` (code, reason), or ``None`` if it takes it;
    ``labels``: the class names (any container)."""
    if ref.label not in labels:
        return "unknown_class", f"class {ref.label!r} is not in --labels_file"
    if ref.split and not SPLIT_NAME_RE.fullmatch(ref.split):
        return "bad_split_name", f"split folder {ref.split!r} is not [A-Za-z0-9_]+"
    return None


class _AssignFn(beam.DoFn):
    """[ImageRef] -> (split, [ShardItem]) per split; a Rejection per unknown or invalid name."""

    def __init__(self, validation_fraction: float, salt: str, by_content: bool) -> None:
        self._fraction = validation_fraction
        self._salt = salt
        self._by_content = by_content
        self._labels: list[str] | None = None
        self._index: dict[str, int] = {}

    def process(self, refs: list[ImageRef], labels: list[str], near_roots: dict | None = None):
        if labels is not self._labels:  # side inputs are the same object per bundle
            self._labels, self._index = labels, {n: i for i, n in enumerate(labels)}
        by_split = collections.defaultdict(list)
        for ref in refs:
            rejection = assign_problem(ref, self._index)
            if rejection:
                yield pvalue.TaggedOutput(
                    REJECTED, count_rejection(Rejection(ref.key, "assign", *rejection))
                )
                continue
            u, order = key_hash(self._salt, ref.key)
            if self._by_content:
                content = (near_roots or {}).get(ref.key, ref.sha256)
                u, _ = key_hash(self._salt, content_split_key(content))
            split = ref.split or ("validation" if u < self._fraction else "train")
            by_split[split].append(
                ShardItem(
                    order, ref.key, ref.size, self._index[ref.label], ref.label, ref.sha256,
                    ref.stamp,
                )
            )
        yield from by_split.items()


def _buckets(assigned: tuple[str, list[ShardItem]], counts: dict[str, int]):
    """(split, [ShardItem]) -> ((split, bucket), [ShardItem]) per bucket they fall in."""
    split, items = assigned
    by_bucket = collections.defaultdict(list)
    for item in items:
        by_bucket[item.order % counts[split]].append(item)
    for bucket, members in by_bucket.items():
        yield (split, bucket), members


def _add_pairs(pairs):
    examples = estimated = 0
    for n, b in pairs:
        examples += n
        estimated += b
    return examples, estimated


@dataclasses.dataclass(frozen=True)
class ShardConfig:
    """How references become splits and shards (the convert job's options, parsed once).

    Attributes:
        validation_fraction: share of images (by key hash) in ``validation``; ignored for
            references whose split came from the folder layout.
        salt: the hash salt; changing it reshuffles splits and shards.
        shard_bytes: target shard size.
        fixed_shards: a fixed shard count per split (0: from ``shard_bytes``).
        min_shards: the fewest shards per split when it has enough images.
        split_by: ``"key"`` (the salted key hash) or ``"content"`` (the salted hash of
            the source's SHA-256, which the references then carry: exact duplicates
            share a split).
    """

    validation_fraction: float
    salt: str
    shard_bytes: int
    fixed_shards: int = 0
    min_shards: int = 1
    split_by: str = "key"


@dataclasses.dataclass(frozen=True)
class ShardNaming:
    """Where a run's shard names start, per split: a full conversion numbers each split's
    shards ``0 .. N-1`` of ``N``; an append continues after the committed shards
    (``first``), in the split's series (``series``: the count its names carry).

    Attributes:
        first: split -> the first index this run gives (0 when absent).
        series: split -> the count in the names (absent: this run's shard count).
    """

    first: dict = dataclasses.field(default_factory=dict)
    series: dict = dataclasses.field(default_factory=dict)

    def name(self, split: str, index: int, count: int) -> str:
        """The name of this run's shard ``index`` (from 0) of ``count`` in ``split``."""
        return shard_name(
            split, self.first.get(split, 0) + index, self.series.get(split) or count
        )


class AssignShards(beam.PTransform):
    """Assigns every reference to a split and a shard bucket.

    Args:
        labels: a one-element PCollection holding the sorted class names.
        config: the split and shard settings.
        estimate_bytes: source size -> estimated encoded size, to size shards.
        near_roots: with ``split_by="content"``, an optional one-element PCollection:
            key -> the content whose split the key takes (``transforms.content.GroupNear``).

    Returns:
        A dict: ``"groups"`` (``((split, bucket), lists of [ShardItem])``: a shard's
        references, in lists as they were assigned) and ``"rejected"``.
    """

    def __init__(self, labels, config: ShardConfig, estimate_bytes, near_roots=None) -> None:
        super().__init__()
        self._labels = labels
        self._near_roots = near_roots
        self._config = config
        self._estimate = estimate_bytes

    def expand(self, refs):
        assigned = refs | "Assign" >> beam.ParDo(
            _AssignFn(
                self._config.validation_fraction,
                self._config.salt,
                self._config.split_by == "content",
            ),
            pvalue.AsSingleton(self._labels),
            *([pvalue.AsSingleton(self._near_roots)] if self._near_roots is not None else []),
        ).with_outputs(REJECTED, main="items")
        estimate, config = self._estimate, self._config
        # (split, (examples, estimated bytes)) -> (split, shard count)
        shard_counts = (
            assigned.items
            | "Sizes"
            >> beam.MapTuple(
                lambda split, items: (split, (len(items), sum(estimate(i.size) for i in items)))
            )
            | "SumSizes" >> beam.CombinePerKey(_add_pairs)
            | "ShardCounts"
            >> beam.MapTuple(
                lambda split, s: (
                    split,
                    num_shards(
                        s[0], s[1], config.shard_bytes, config.fixed_shards, config.min_shards
                    ),
                )
            )
        )
        groups = (
            assigned.items
            | "Bucket" >> beam.FlatMap(_buckets, pvalue.AsDict(shard_counts))
            # ((split, bucket), lists of [ShardItem]): references only, never image bytes.
            | "GroupReferences" >> beam.GroupByKey()
        )
        return {"groups": groups, "rejected": assigned[REJECTED]}
