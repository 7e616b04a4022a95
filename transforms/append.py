"""``convert --append``: the committed dataset's key index against today's listing.

Every shard has a key index beside it (``s3tfr_index/<shard>.jsonl.gz``: key, size,
listing stamp and SHA-256 of each record's source). :class:`Reconcile` joins those rows
with the listed references by key, in buckets of keys (lists travel, not one element
per key), and sorts each key into one of:

- **held**: listed with the size and stamp (S3 ETag, local modification time) its row
  records; its record stays where it is. A source whose stamp changed but whose size did
  not is read once and hashed: the same bytes are held too.
- **fresh**: not in the dataset (a new key, or one rejected before: it is tried again),
  or changed (another size, or other bytes): converted into new shards like any image.
- **dropped**: a row whose key is no longer listed, or whose source changed. Its shard is
  copied, less those records (:class:`transforms.references.Compaction`), under a new
  name; the committed shard is deleted only after the new manifest is committed.

Only the shards holding dropped records are copied (record bytes as they are, nothing
decoded); no other committed shard, and no key index, is read beyond its index or
touched.
"""

from __future__ import annotations

import collections
import concurrent.futures
import hashlib
import zlib

import apache_beam as beam
from apache_beam import pvalue

from s3tfr import s3, storage
from s3tfr.contract import SHARD_NAME_RE, index_name
from s3tfr.host import usable_cpus
from s3tfr.s3 import S3Config
from transforms.listing import METRICS_NAMESPACE, REJECTED, count_rejection
from transforms.references import (
    Compaction,
    ImageRef,
    IndexRow,
    KeyIndexError,
    Rejection,
    decode_index,
)
from transforms.sharding import COMPACTION_BUCKET, ShardNaming
from transforms.sources import read_source

__all__ = ["Compactions", "HeldCount", "Reconcile", "naming_after", "shard_files"]

# Keys are joined in this many buckets: enough that none is large (a million keys: ~4,000
# references a bucket), few enough that a runner's cost per element does not count.
_BUCKETS = 256
_LISTED, _INDEXED = 0, 1
HELD, DROPPED = "held", "dropped"


def shard_files(info: dict) -> list[str]:
    """Every shard file a manifest lists."""
    return [s["file"] for split in info["splits"].values() for s in split["shards"]]


def naming_after(info: dict) -> ShardNaming:
    """Where an append's shard names start: after each split's highest number, in the
    count its names carry."""
    first, series = {}, {}
    for split, entry in info["splits"].items():
        numbered = [SHARD_NAME_RE.fullmatch(s["file"]) for s in entry["shards"]]
        first[split] = max(int(m["index"]) for m in numbered) + 1
        series[split] = int(numbered[0]["count"])
    return ShardNaming(first, series)


def _bucket(key: str) -> int:
    return zlib.crc32(key.encode("utf-8", "surrogateescape")) % _BUCKETS


class _ReadIndexFn(beam.DoFn):
    """A committed shard's name -> (bucket, (_INDEXED, [IndexRow])) per bucket."""

    def __init__(self, output: str, config: S3Config | None) -> None:
        self._output = output
        self._config = config

    def process(self, file: str):
        uri = storage.join(self._output, index_name(file))
        try:
            data = storage.read_bytes(uri, self._config)
        except FileNotFoundError:
            raise KeyIndexError(
                f"{uri} is gone: the dataset cannot be appended to; run a full convert"
            ) from None
        by_bucket = collections.defaultdict(list)
        for row in decode_index(data, file):
            by_bucket[_bucket(row.key)].append(row)
        for bucket, rows in by_bucket.items():
            yield bucket, (_INDEXED, rows)


def _listed_buckets(refs: list[ImageRef]):
    by_bucket = collections.defaultdict(list)
    for ref in refs:
        by_bucket[_bucket(ref.key)].append(ref)
    for bucket, members in by_bucket.items():
        yield bucket, (_LISTED, members)


class _ReconcileFn(beam.DoFn):
    """(bucket, its listed references and index rows) -> lists of fresh ImageRef;
    HELD: lists of (held ImageRef with the SHA-256 of its row, its shard); DROPPED:
    (shard, key); "suspect": (ImageRef, IndexRow) whose bytes decide."""

    def __init__(self) -> None:
        self._held = beam.metrics.Metrics.counter(METRICS_NAMESPACE, "append_held")
        self._dropped = beam.metrics.Metrics.counter(METRICS_NAMESPACE, "append_dropped")

    def process(self, element):
        _bucket_id, parts = element
        rows: dict[str, IndexRow] = {}
        refs: list[ImageRef] = []
        for tag, members in parts:
            if tag == _INDEXED:
                rows.update((row.key, row) for row in members)
            else:
                refs.extend(members)
        fresh, held, dropped = [], [], []
        for ref in refs:
            row = rows.pop(ref.key, None)
            if row is None:
                fresh.append(ref)
            elif ref.size != row.size:
                fresh.append(ref)
                dropped.append(row)
            elif ref.stamp and ref.stamp == row.stamp:
                held.append((ref._replace(sha256=row.sha256), row.file))
            else:
                yield pvalue.TaggedOutput("suspect", (ref, row))
        dropped.extend(rows.values())  # no longer listed
        for row in dropped:
            yield pvalue.TaggedOutput(DROPPED, (row.file, row.key))
        self._held.inc(len(held))
        self._dropped.inc(len(dropped))
        if fresh:
            yield fresh
        if held:
            yield pvalue.TaggedOutput(HELD, held)


class _RecheckFn(beam.DoFn):
    """(ImageRef, IndexRow) of a source rewritten at the same size -> held if its bytes
    are the row's, else fresh and its record DROPPED; unreadable now: REJECTED, and its
    record DROPPED."""

    def __init__(self, input_root: str, max_concurrent_gets: int, config) -> None:
        self._input = input_root
        self._gets = max_concurrent_gets
        self._config = config
        self._held = beam.metrics.Metrics.counter(METRICS_NAMESPACE, "append_held")
        self._dropped = beam.metrics.Metrics.counter(METRICS_NAMESPACE, "append_dropped")

    def setup(self) -> None:
        threads = self._gets if s3.is_s3(self._input) else 2 * usable_cpus()
        self._pool = concurrent.futures.ThreadPoolExecutor(threads)

    def teardown(self) -> None:
        self._pool.shutdown()

    def _check(self, pair: tuple[ImageRef, IndexRow]):
        ref, _row = pair
        data = read_source(self._input, ref.key, self._config)
        if isinstance(data, Rejection):
            return pair, data
        return pair, ref._replace(sha256=hashlib.sha256(data).hexdigest())

    def process(self, pairs: list):
        for (ref, row), result in self._pool.map(self._check, pairs):
            if isinstance(result, ImageRef) and result.sha256 == row.sha256:
                self._held.inc()
                yield pvalue.TaggedOutput(HELD, [(result, row.file)])
                continue
            self._dropped.inc()
            yield pvalue.TaggedOutput(DROPPED, (row.file, row.key))
            if isinstance(result, Rejection):
                yield pvalue.TaggedOutput(REJECTED, count_rejection(result))
            else:
                yield [result]


def _compaction(group):
    """(shard, keys to drop) -> the shard group that copies it less those records."""
    file, keys = group
    match = SHARD_NAME_RE.fullmatch(file)
    return (match["split"], COMPACTION_BUCKET + int(match["index"])), [
        Compaction(file, frozenset(keys))
    ]


class Compactions(beam.PTransform):
    """(shard, key) pairs, the records to drop -> a shard group per shard holding any
    (``((split, bucket), [Compaction])``, for ``WriteShards``)."""

    def expand(self, dropped):
        return (
            dropped
            | "DroppedByShard" >> beam.GroupByKey()
            | "Compactions" >> beam.Map(_compaction)
        )


class HeldCount(beam.PTransform):
    """Lists of held (ImageRef, shard), and optionally the (shard, key) of held records
    that an append drops after all (``Deduplicate``) -> one element: the records held."""

    def __init__(self, demoted=None) -> None:
        super().__init__()
        self._demoted = demoted

    def expand(self, held):
        counts = held | "HeldCounts" >> beam.Map(len)
        if self._demoted is not None:
            minus = self._demoted | "DemotedCounts" >> beam.Map(lambda _pair: -1)
            counts = (counts, minus) | "BothCounts" >> beam.Flatten()
        return counts | "HeldCount" >> beam.CombineGlobally(sum)


class Reconcile(beam.PTransform):
    """Lists of listed ``ImageRef`` -> what an append converts, holds and drops.

    Args:
        info: the committed manifest.
        output: the dataset prefix (its key indexes are read from there).
        input_root: the listed root, to read sources whose stamp changed.
        max_concurrent_gets: reads in flight for those.
        config: S3 client settings.

    Returns:
        A dict: ``"fresh"`` (lists of ``ImageRef`` to convert), ``"held"`` (lists of
        ``(ImageRef, shard)`` whose records stay, each with its content's SHA-256; see
        :class:`HeldCount`), ``"dropped"`` (``(shard, key)`` of the records to drop; see
        :class:`Compactions`) and ``"rejected"``.
    """

    def __init__(
        self, info: dict, output: str, input_root: str, max_concurrent_gets: int, config
    ) -> None:
        super().__init__()
        self._files = shard_files(info)
        self._output = output
        self._recheck = _RecheckFn(input_root, max_concurrent_gets, config)
        self._config = config

    def expand(self, refs):
        indexed = (
            refs.pipeline
            | "Shards" >> beam.Create(self._files)
            | "SpreadShards" >> beam.Reshuffle()
            | "ReadIndex" >> beam.ParDo(_ReadIndexFn(self._output, self._config))
        )
        listed = refs | "ListedBuckets" >> beam.FlatMap(_listed_buckets)
        joined = (
            (indexed, listed)
            | "Both" >> beam.Flatten()
            | "ByBucket" >> beam.GroupByKey()
            | "Reconcile"
            >> beam.ParDo(_ReconcileFn()).with_outputs(HELD, DROPPED, "suspect", main="fresh")
        )
        rechecked = (
            joined.suspect
            | "SuspectLists" >> beam.BatchElements(min_batch_size=1, max_batch_size=256)
            | "Recheck"
            >> beam.ParDo(self._recheck).with_outputs(HELD, DROPPED, REJECTED, main="fresh")
        )
        held = (joined[HELD], rechecked[HELD]) | "AllHeld" >> beam.Flatten()
        dropped = (joined[DROPPED], rechecked[DROPPED]) | "AllDropped" >> beam.Flatten()
        fresh = (joined.fresh, rechecked.fresh) | "AllFresh" >> beam.Flatten()
        return {"fresh": fresh, "held": held, "dropped": dropped, "rejected": rechecked[REJECTED]}
