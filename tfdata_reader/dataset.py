"""make_dataset: a converted dataset (local or S3) in, ``(images, labels)`` batches out.

Pipeline (one epoch per iteration; Keras ``fit(epochs=N)`` iterates it again, reshuffled)::

    shard indices of this worker, shuffled per iteration (seeded)
    -> schedule the fetch (S3: background pool, ``prefetch_shards`` ahead)
    -> parallel interleave over shards, each:
         wait for a verified local path, held until the shard is read (S3 cache or the
         local file); check its first record's framing against the manifest's compression
         -> TFRecordDataset -> chunks of up to 32 records -> parse_example
         -> records read counted against the manifest at the shard's end: any difference
            is an error naming the shard
    -> records, each with its augmentation seed (the shard's seed, its index)
    -> assert the record count the manifest gives this worker
    -> record shuffle buffer (for records larger than a uint8 image: after the decode)
    -> parallel map: decode -> resize / augment (stateless, seeded) -> whole pixel
       values -> normalise to the output dtype (a record that fails ends the iteration)
    -> batch (a ``normalize`` callable: per batch), one-hot -> prefetch (AUTOTUNE)

With ``skip_bad_records`` records are decoded inside the interleave instead, where a
record that fails is skipped, counted and logged with its shard; the shuffle buffer then
holds uint8 images, normalised per batch, and the cardinality is unknown.

Only shards listed in ``s3tfr_manifest.json`` are read. Every stage is a tf.data stage, so the
iterator can be saved with ``tf.train.Checkpoint`` and resumed mid-epoch.
"""

from __future__ import annotations

import atexit
import collections
import dataclasses
import functools
import gc
import inspect
import logging
import os
import struct
import sys
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from typing import ParamSpec, TypeVar

import botocore.exceptions
import google_crc32c
import tensorflow as tf

from s3tfr import s3, storage
from s3tfr.contract import MANIFEST
from s3tfr.host import usable_cpus
from s3tfr.manifest import DatasetError, load_info, s3_error, shard_uris
from s3tfr.s3 import S3Config
from tfdata_reader import ops
from tfdata_reader.cache import ShardCache
from tfdata_reader.options import (
    DEFAULT_PREFETCH_SHARDS,
    DEFAULT_SHUFFLE_BUFFER,
    ReaderOptions,
    ResolvedOptions,
)

__all__ = ["ReaderOptions", "ReaderStats", "make_dataset"]

log = logging.getLogger("tfdata_reader")

_FEATURES = {
    "image/encoded": tf.io.FixedLenFeature([], tf.string),
    "image/class/label": tf.io.FixedLenFeature([], tf.int64),
}
# With skip_bad_records, records are decoded in groups, each its own small dataset under
# ignore_errors(), so that a record that fails is dropped alone while a failing read (a
# missing file, broken framing) still ends the iteration: ignore_errors() over the
# TFRecordDataset itself retries a failed open forever. Each group costs an instantiation
# of the decode function (tens of ms), hence groups rather than single records.
_GROUP = 64
_EXAMPLE, _TALLY, _END = 0, 1, 2
_CHUNK = 32
# Enough of a shard's head to find its first record header, also when compressed.
_HEAD_BYTES = 64 * 1024
_COMPRESSIONS = ("", "GZIP", "ZLIB")


@dataclasses.dataclass
class ReaderStats:
    """What a reader skipped and what its cache did, filled in while it runs (pass one to
    ``make_dataset``).

    Attributes:
        skipped: records skipped per shard URI (``skip_bad_records=True``: a malformed
            example or an undecodable image).
        cache: the shard cache's counters: ``hits``, ``downloads``, ``downloaded_bytes``,
            ``damaged`` (cached copies that failed their check and were fetched again),
            ``mismatches`` (downloads that did not match the manifest), ``evicted``,
            ``raced`` (copies another process published first).
    """

    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    cache: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False)

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())


class _Calls:
    """Counts the reader's py_function calls running now, in every dataset."""

    running = 0
    lock = threading.Lock()

    @classmethod
    def tracked(cls, fn):
        @functools.wraps(fn)
        def call(*args):
            with cls.lock:
                cls.running += 1
            try:
                return fn(*args)
            finally:
                with cls.lock:
                    cls.running -= 1

        return call


def _exit_after_failure() -> None:
    """Lets a process whose reader failed exit.

    The traceback of an uncaught exception keeps the failed iterator alive until the
    interpreter finalizes; TF then destroys it holding the GIL and waits for its threads,
    and a thread inside a py_function never gets the GIL back: the process hangs for good
    (TF 2.21). Here, at exit (the shard caches are closed by then, so no call waits on a
    fetch), once no reader call has run for 0.1 s, the traceback is dropped and the
    iterator destroyed while its threads are idle.
    """
    if getattr(sys, "last_value", None) is None:
        return
    deadline, quiet = time.monotonic() + 10, 0
    while quiet < 5 and time.monotonic() < deadline:
        quiet = quiet + 1 if _Calls.running == 0 else 0
        time.sleep(0.02)
    for name in ("last_exc", "last_value", "last_traceback", "last_type"):
        if getattr(sys, name, None) is not None:
            setattr(sys, name, None)
    gc.collect()


atexit.register(_exit_after_failure)


def _masked_crc(data: bytes) -> int:
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _starts_records(head: bytes, compression: str, size: int) -> bool:
    """Whether a shard's first bytes begin TFRecords (or no records) so compressed."""
    data = head
    if compression:
        try:
            # GZIP: a gzip header (wbits 16 + 15); ZLIB: TF writes a zlib header.
            data = zlib.decompressobj(31 if compression == "GZIP" else 15).decompress(head, 12)
        except zlib.error:
            return False
    if len(data) < 12:
        return not data and len(head) == size  # the whole file holds no records
    return _masked_crc(data[:8]) == struct.unpack("<I", data[8:12])[0]


def _framing_problem(uri: str, head: bytes, compression: str, size: int) -> str | None:
    """Why a shard cannot be read with the manifest's compression, or ``None``."""
    if _starts_records(head, compression, size):
        return None
    claimed = compression or "uncompressed"
    actual = next(
        (c or "uncompressed" for c in _COMPRESSIONS if c != compression
         and _starts_records(head, c, size)),
        None,
    )  # fmt: skip
    if actual:
        return (
            f"shard {uri} holds {actual} TFRecords, not {claimed} ones as {MANIFEST}'s "
            "'compression' says: the manifest does not match its shards; rerun the convert "
            "job (or correct 'compression')"
        )
    return (
        f"shard {uri} does not start with a {claimed} TFRecord: its first record header "
        "is broken; rerun the convert job"
    )


def _head(uri: str, entry: dict, config: S3Config | None) -> bytes:
    if not s3.is_s3(uri):
        with open(uri, "rb") as f:
            return f.read(_HEAD_BYTES)
    if not entry["bytes"]:
        return b""
    bucket, key = s3.parse(uri)

    def _get() -> bytes:
        return (
            s3.client(config)
            .get_object(Bucket=bucket, Key=key, Range=f"bytes=0-{_HEAD_BYTES - 1}")["Body"]
            .read()
        )

    try:
        return s3.body_retries(_get)
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as e:
        raise s3_error(e, uri) from None


def _worker_shards(n_shards: int, num_workers: int, worker_index: int) -> tuple[list[int], bool]:
    """Shard indices this worker reads, and whether records must be split instead.

    By file when there are at least as many shards as workers; otherwise every worker reads
    every shard and keeps every ``num_workers``-th record. Either way each example is read by
    exactly one worker per epoch. ``worker_index`` is in ``[0, num_workers)``
    (``ReaderOptions.resolve`` checks it).
    """
    if n_shards >= num_workers:
        return list(range(worker_index, n_shards, num_workers)), False
    log.warning(
        "%d shards for %d workers: splitting by record (every worker reads every shard); "
        "convert with --num_shards >= %d to split by file",
        n_shards,
        num_workers,
        num_workers,
    )
    return list(range(n_shards)), True


def _check_present(uri: str, shards: list[tuple[str, dict]], config: S3Config | None) -> None:
    """Refuses a dataset whose listed shards are not all there, before anything is read.

    S3: one paged LIST of the prefix, not a HEAD per shard.
    """
    if s3.is_s3(uri):
        try:
            found = dict(storage.walk(uri, config))
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as e:
            raise s3_error(e, uri) from None
    else:
        found = {}
        for shard_uri, entry in shards:
            if os.path.exists(shard_uri):
                found[entry["file"]] = os.path.getsize(shard_uri)
    for shard_uri, entry in shards:
        if entry["file"] not in found:
            raise DatasetError(
                f"shard {shard_uri} is listed in {MANIFEST} but missing: the dataset "
                "was modified after conversion; rerun the convert job"
            )
        if found[entry["file"]] != entry["bytes"]:
            raise DatasetError(
                f"shard {shard_uri} is {found[entry['file']]} bytes but {MANIFEST} "
                f"says {entry['bytes']}: it was modified or damaged; rerun the convert job"
            )


_OPTION_NAMES = frozenset(field.name for field in dataclasses.fields(ReaderOptions))
_P = ParamSpec("_P")
_R = TypeVar("_R")


def _with_options(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """Hands ``fn`` (``make_dataset``) its reading options as one ``ReaderOptions`` in
    ``options``: built from the call's option keywords when none is passed; else the one
    passed, with the option keywords the call names (positionally or by keyword, whatever
    their value) replacing its fields."""
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def call(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        bound = signature.bind(*args, **kwargs)
        given = {k: v for k, v in bound.arguments.items() if k in _OPTION_NAMES}
        options = bound.arguments.get("options")
        if options is None:
            options = ReaderOptions(**given)
        elif isinstance(options, ReaderOptions):
            options = dataclasses.replace(options, **given)
        else:
            raise TypeError(f"options must be a ReaderOptions, not {options!r}")
        bound.arguments["options"] = options
        return fn(*bound.args, **bound.kwargs)

    return call


@_with_options
def make_dataset(
    uri: str,
    split: str = "train",
    batch_size: int = 32,
    image_size: Sequence[int] = (224, 224),
    training: bool = True,
    *,
    seed: int | None = None,
    deterministic: bool | None = None,
    shuffle: bool | None = None,
    shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
    resize: str = "crop",
    augment: ops.Augment | bool | None = None,
    normalize: ops.Normalize = "unit",
    dtype: tf.DType = tf.float32,
    one_hot: bool = False,
    drop_remainder: bool | None = None,
    num_workers: int = 1,
    worker_index: int = 0,
    input_context: tf.distribute.InputContext | None = None,
    skip_bad_records: bool = False,
    cache: ShardCache | None = None,
    cache_dir: str | None = None,
    cache_max_bytes: int | None = None,
    prefetch_shards: int = DEFAULT_PREFETCH_SHARDS,
    cycle_length: int | None = None,
    verify: str = "sha256",
    stats: ReaderStats | None = None,
    config: S3Config | None = None,
    options: ReaderOptions | None = None,
) -> tf.data.Dataset:
    """Streams one split of a converted dataset as ``(images, labels)`` batches.

    Args:
        uri: dataset prefix, ``s3://bucket/prefix`` or a local directory.
        split: ``"train"``, ``"validation"``, ...
        batch_size: examples per batch (global when ``input_context`` is given).
        image_size: ``(height, width)`` of the output images.
        training: turns on shuffling, augmentation and ``drop_remainder`` by default.
        seed: makes shard order, shuffle and augmentation reproducible.
        deterministic: element order independent of thread timing (default: ``seed`` set
            or no shuffling, so an evaluation pass reads the records in manifest order).
        shuffle: shard-order and record shuffle (default: ``training``).
        shuffle_buffer: records in the shuffle buffer (held as stored, or as uint8
            ``image_size`` images where those are smaller).
        resize: ``"crop"``, ``"pad"`` or ``"stretch"`` (see ``ops.to_image``).
        augment: ``ops.Augment`` settings, ``True`` for the defaults, ``False`` for none;
            default: ``Augment()`` when training.
        normalize: ``"unit"`` (0..1), ``None`` (0..255), ``(mean, std)`` on the 0..1 scale,
            a callable on float32 0..255 batches, or ``"transform_fn"``: the analyze
            job's per-channel mean/std, exactly as its transform graph applies them
            (``tfdata_reader.transform``; needs ``analysis.json`` under ``uri``).
        dtype: image dtype, ``tf.float32`` (default) or ``tf.uint8`` (not normalised).
        one_hot: float32 one-hot labels of ``num_classes`` instead of int64 indices.
        drop_remainder: drop the last partial batch (default: ``training``).
        num_workers: input pipelines in the job (multi-host), with ``worker_index``.
        worker_index: this pipeline's index in ``[0, num_workers)``.
        input_context: ``tf.distribute.InputContext``; overrides the two above.
        skip_bad_records: skip a record whose example or image cannot be parsed or
            decoded, count it in ``stats.skipped`` and log a warning per shard (records
            are then decoded in groups of 64, each group its own small dataset: slower);
            by default such a record fails the iteration with TensorFlow's error.
        cache: a ``ShardCache`` to share between datasets; else one is made from
            ``cache_dir`` / ``cache_max_bytes``.
        prefetch_shards: S3 shards fetched ahead of the reader.
        cycle_length: shards read at once (default: ``min(shards, max(4, CPUs))``).
        verify: check fetched shards by ``"sha256"``, ``"size"`` or ``"none"``.
        stats: filled with the records skipped per shard and the cache's counters.
        config: S3 client settings; ``None`` uses the standard AWS chain.
        options: a ``ReaderOptions`` holding the reading options (every argument above
            except ``uri``, ``split``, ``input_context``, ``cache``, ``stats`` and
            ``config``), in place of their keywords. Option keywords given beside it
            override its fields, as ``dataclasses.replace(options, **keywords)`` would:
            ``make_dataset(uri, "validation", options=train_options, training=False)``.

    Returns:
        A ``tf.data.Dataset`` of ``(images, labels)``: images ``(batch, h, w, 3)``, labels
        ``(batch,)`` int64 or ``(batch, num_classes)`` float32. Its ``cardinality()`` is
        the number of batches this worker yields per iteration, from the manifest's
        record counts (so Keras knows the steps per epoch); unknown with
        ``skip_bad_records``, since the records to skip are not known ahead. Its
        ``class_names`` attribute is the manifest's labels in label order.

    Raises:
        TypeError, ValueError: an option of the wrong type or out of range, naming it.
        DatasetError: no or invalid ``s3tfr_manifest.json``, unknown split, a listed shard
            missing or of the wrong size, shards that do not match the manifest's
            ``compression``, or S3 refusing the credentials or out of reach. While
            iterating, a shard that does not match the manifest after the cache's
            ``attempts`` or holds fewer or more records than listed fails the iteration
            with a ``tf.errors.OpError`` whose message is the ``DatasetError``'s.
    """
    # _with_options has folded the option keywords into `options`.
    opts = options.resolve(input_context, uri=uri, config=config)
    plan = _plan(uri, split, opts, config)
    if cache is None:
        kwargs = {"max_bytes": opts.cache_max_bytes} if opts.cache_max_bytes else {}
        cache = ShardCache(opts.cache_dir, verify=opts.verify, config=config, **kwargs)
    stats = stats if stats is not None else ReaderStats()
    stats.cache = cache.stats
    reader = _ShardReader(plan, opts, cache, stats)
    ds = _shard_order(plan, opts, reader).interleave(
        reader.read,
        cycle_length=plan.cycle,
        block_length=1,
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=opts.deterministic,
    )
    ds = _batches(ds, plan, opts)
    tf_options = tf.data.Options()
    tf_options.deterministic = opts.deterministic
    # The py_function stages hold no iterator state (a path is a function of the shard
    # index), so saving the iterator without them resumes exactly.
    tf_options.experimental_external_state_policy = (
        tf.data.experimental.ExternalStatePolicy.IGNORE
    )
    ds = ds.with_options(tf_options)
    # As tf.keras.utils.image_dataset_from_directory sets it (a transformed dataset, such
    # as ds.map(...), does not carry it over).
    ds.class_names = list(plan.labels)
    return ds


@dataclasses.dataclass(frozen=True)
class _Plan:
    """What one ``make_dataset`` call reads: the split's shards and this worker's share.

    Attributes:
        uris, entries: every shard of the split, its URI and its manifest entry.
        indices: the shards this worker reads, in manifest order.
        by_record: every worker reads every shard, keeping every ``num_workers``-th record.
        expected: records this worker reads per shard (indexed like ``uris``).
        cycle: shards read at once.
    """

    uri: str
    labels: list[str]
    compression: str
    uris: list[str]
    entries: list[dict]
    indices: list[int]
    by_record: bool
    expected: list[int]
    cycle: int


def _plan(uri: str, split: str, opts: ResolvedOptions, config: S3Config | None) -> _Plan:
    """Reads and checks the manifest and the split's shards; raises ``DatasetError``."""
    info = load_info(uri, config)
    shards = shard_uris(info, uri, split)
    if not shards:
        raise DatasetError(f"split {split!r} of {uri} has no shards")
    _check_present(uri, shards, config)
    indices, by_record = _worker_shards(len(shards), opts.num_workers, opts.worker_index)
    compression = info.get("compression", "")
    # One shard's head, before anything is cached: a manifest whose 'compression' does not
    # match the shards is refused here (each shard is checked again when opened).
    first_uri, first = shards[indices[0]]
    if problem := _framing_problem(
        first_uri, _head(first_uri, first, config), compression, first["bytes"]
    ):
        raise DatasetError(problem)
    entries = [e for _, e in shards]
    expected = [
        len(range(opts.worker_index, e["examples"], opts.num_workers))
        if by_record
        else e["examples"]
        for e in entries
    ]
    return _Plan(
        uri=uri,
        labels=list(info["labels"]),
        compression=compression,
        uris=[u for u, _ in shards],
        entries=entries,
        indices=indices,
        by_record=by_record,
        expected=expected,
        cycle=opts.cycle_length or min(len(indices), max(4, usable_cpus())),
    )


def _shard_order(plan: _Plan, opts: ResolvedOptions, reader: _ShardReader) -> tf.data.Dataset:
    """This worker's shard indices, shuffled per iteration when shuffling, each with the
    root of its records' augmentation seeds; on S3 each shard's fetch is scheduled here,
    ``prefetch_shards`` ahead of the reader."""
    order = tf.data.Dataset.from_tensor_slices(tf.constant(plan.indices, tf.int64))
    if opts.shuffle:
        order = order.shuffle(len(plan.indices), seed=opts.seed, reshuffle_each_iteration=True)
    # One random int64 per shard per iteration: the root of its records' augmentation seeds.
    roots = tf.data.Dataset.random(seed=opts.seed, rerandomize_each_iteration=True)
    order = tf.data.Dataset.zip(order, roots)
    if s3.is_s3(plan.uri):
        order = order.map(
            lambda i, r: (tf.py_function(_Calls.tracked(reader.schedule), [i], tf.int64), r),
            num_parallel_calls=None,
        ).prefetch(opts.prefetch_shards)
    return order


class _ShardReader:
    """Reads one shard for the interleave (``read``), with the py_function calls that hold
    its file in the cache and count its records against the manifest."""

    def __init__(
        self, plan: _Plan, opts: ResolvedOptions, cache: ShardCache, stats: ReaderStats
    ) -> None:
        self.plan, self.opts, self.cache, self.stats = plan, opts, cache, stats
        # What one iteration holds at most: shards fetched ahead, and the interleave's
        # current and next inputs; twice that, so only an abandoned iteration's shards
        # are let go.
        self.owner = cache.new_owner(2 * (opts.prefetch_shards + 2 * plan.cycle) + 4)

    def schedule(self, i):
        i = int(i)
        self.cache.schedule(self.plan.uris[i], self.plan.entries[i], self.owner)
        return i

    def _open(self, i):
        i = int(i)
        uri, entry = self.plan.uris[i], self.plan.entries[i]
        path, ticket = self.cache.get(uri, entry, self.owner)
        try:
            with open(path, "rb") as f:
                head = f.read(_HEAD_BYTES)
            if problem := _framing_problem(uri, head, self.plan.compression, entry["bytes"]):
                raise DatasetError(problem)
        except BaseException:
            self.cache.release(ticket)
            raise
        return path, ticket

    def _report(self, i, ticket, decoded, read, first_bad):
        i, decoded, read, first_bad = int(i), int(decoded), int(read), int(first_bad)
        self.cache.release(int(ticket))
        uri, expected, by_record = self.plan.uris[i], self.plan.expected[i], self.plan.by_record
        where = f"this worker's share of shard {uri}" if by_record else f"shard {uri}"
        if read != expected:
            raise DatasetError(
                f"{where} holds {read} records but {MANIFEST} lists {expected}: "
                "the manifest does not match its shards; rerun the convert job"
            )
        if bad := read - decoded:
            with self.stats._lock:
                self.stats.skipped[uri] += bad
            log.warning(
                "skipped %d of %d records of shard %s (malformed example or undecodable "
                "image; the first is record %d)",
                bad,
                read,
                uri,
                first_bad * self.opts.num_workers + self.opts.worker_index
                if by_record
                else first_bad,
            )
        return decoded

    def read(self, i, root):
        # Here, not in a map before the interleave: a restored iterator makes its current
        # shards again through this function, and so holds their files again.
        path, ticket = tf.py_function(_Calls.tracked(self._open), [i], [tf.string, tf.int64])
        path.set_shape([])
        records = tf.data.TFRecordDataset(path, compression_type=self.plan.compression)
        if self.plan.by_record:
            records = records.shard(self.opts.num_workers, self.opts.worker_index)
        if self.opts.skip_bad_records:
            return self._decoded_shard(records, i, ticket, root)
        return self._shard_chunks(records, i, ticket, root)

    def _shard_chunks(self, records, i, ticket, root):
        """A shard's records in parsed chunks of up to ``_CHUNK``: ``(encoded, labels,
        seeds)``, counted against the manifest at the end.

        Counted, parsed and interleaved in chunks, those stages cost once per chunk, not
        per record (per record they took 5 % of an evaluation pass); the decode comes
        after the interleave, in one parallel map.
        """

        def _count(read, element):
            chunk, end = element
            # The end unholds the shard's file and checks the count (raising if wrong).
            reported = tf.cond(
                end,
                lambda: tf.py_function(
                    _Calls.tracked(self._report), [i, ticket, read, read, -1], tf.int64
                ),
                lambda: read,
            )
            return read + tf.size(chunk, tf.int64), (chunk, read, end, reported)

        def _parse(chunk, first, end, _):
            examples = tf.io.parse_example(chunk, _FEATURES)
            js = first + tf.range(tf.size(chunk, tf.int64))
            seeds = tf.stack([tf.fill(tf.shape(js), root), js], axis=1)
            return examples["image/encoded"], examples["image/class/label"], seeds

        chunks = records.batch(_CHUNK).map(lambda chunk: (chunk, False))
        end = tf.data.Dataset.from_tensors((tf.zeros([0], tf.string), True))
        counted = chunks.concatenate(end).scan(tf.constant(0, tf.int64), _count)
        return counted.filter(lambda chunk, first, end, _: not end).map(_parse)

    def _decoded_shard(self, records, i, ticket, root):
        """``skip_bad_records``: a shard's records decoded one at a time, in groups each
        under ``ignore_errors()``, followed by a tally of how far the group got; the
        records read and decoded counted against the manifest at the end."""
        opts = self.opts
        nothing = tf.zeros([0, 0, 3], tf.uint8)

        def _record(j, record):
            example = tf.io.parse_single_example(record, _FEATURES)
            seed_pair = tf.stack([root, tf.cast(j, tf.int64)])
            image = ops.to_image(
                example["image/encoded"], opts.image_size, opts.resize, opts.augment, seed_pair
            )
            return image, example["image/class/label"]

        def _decode(js, group):
            examples = tf.data.Dataset.from_tensor_slices((js, group)).map(
                lambda j, record: (*_record(j, record), j, _EXAMPLE)
            )
            # After the group's examples, how far it reached, decoded or not.
            tally = (nothing, tf.constant(-1, tf.int64), js[-1] + 1, _TALLY)
            return examples.ignore_errors().concatenate(tf.data.Dataset.from_tensors(tally))

        end = (nothing, tf.constant(-1, tf.int64), tf.constant(0, tf.int64), _END)
        elements = records.enumerate().batch(_GROUP).flat_map(_decode)
        elements = elements.concatenate(tf.data.Dataset.from_tensors(end))

        def _count(state, element):
            decoded, read, next_j, first_bad = state
            image, label, j, kind = element
            reached = tf.where(kind == _END, next_j, j)
            first_bad = tf.where((first_bad < 0) & (reached > next_j), next_j, first_bad)
            decoded += tf.cast(kind == _EXAMPLE, tf.int64)
            read = tf.where(kind == _TALLY, j, read + tf.cast(kind == _EXAMPLE, tf.int64))
            next_j = tf.where(kind == _EXAMPLE, j + 1, tf.where(kind == _TALLY, j, next_j))
            # The end unholds the shard's file and checks the counts (raising if wrong).
            reported = tf.cond(
                kind == _END,
                lambda: tf.py_function(
                    _Calls.tracked(self._report),
                    [i, ticket, decoded, read, first_bad],
                    tf.int64,
                ),
                lambda: decoded,
            )
            return (decoded, read, next_j, first_bad), (image, label, kind, reported)

        zero = tf.constant(0, tf.int64)
        counted = elements.scan((zero, zero, zero, tf.constant(-1, tf.int64)), _count)
        return counted.filter(lambda image, label, kind, _: kind == _EXAMPLE).map(
            lambda image, label, kind, _: (tf.ensure_shape(image, [*opts.image_size, 3]), label)
        )


def _batches(ds: tf.data.Dataset, plan: _Plan, opts: ResolvedOptions) -> tf.data.Dataset:
    """The interleave's output (parsed chunks, or decoded records with
    ``skip_bad_records``) -> shuffle, decode, batch, normalise, one-hot, prefetch."""
    # The shuffle buffer holds the records as stored (before the decode) or uint8
    # images (after it), whichever is smaller by the manifest's mean record size. Before
    # it, the decode goes straight to the output dtype and scale, one image at a time:
    # passes over a whole batch run out of the CPU's caches (normalising uint8 batches
    # took a sixth of an evaluation pass's time).
    image_size, normalize, dtype = opts.image_size, opts.normalize, opts.dtype
    mean_record = sum(e["bytes"] for e in plan.entries) / max(
        1, sum(e["examples"] for e in plan.entries)
    )
    images_shuffled = opts.shuffle and (
        opts.skip_bad_records or mean_record > image_size[0] * image_size[1] * 3
    )
    per_image = not (opts.skip_bad_records or images_shuffled or callable(normalize))
    pixels = tf.uint8 if images_shuffled or dtype == tf.uint8 else tf.float32

    def _image(encoded, label, seed):
        image = ops.to_image(encoded, image_size, opts.resize, opts.augment, seed, dtype=pixels)
        if per_image:
            image = ops.normalize_batch(image, normalize, dtype)
        return image, label

    if not opts.skip_bad_records:
        ds = ds.unbatch()
        # Exact, so Keras knows the steps per epoch: every shard's records are counted
        # against the manifest at its end, and any difference fails the iteration there,
        # so this worker yields exactly this many records or raises first. Skipped
        # records cannot be known ahead: then the cardinality stays unknown.
        records = sum(plan.expected[i] for i in plan.indices)
        ds = ds.apply(tf.data.experimental.assert_cardinality(records))
        if opts.shuffle and not images_shuffled:
            ds = ds.shuffle(opts.shuffle_buffer, seed=opts.seed, reshuffle_each_iteration=True)
        ds = ds.map(
            _image, num_parallel_calls=tf.data.AUTOTUNE, deterministic=opts.deterministic
        )
    if images_shuffled:
        ds = ds.shuffle(opts.shuffle_buffer, seed=opts.seed, reshuffle_each_iteration=True)
    ds = ds.batch(opts.batch_size, drop_remainder=opts.drop_remainder)

    def _finish(images, labels):
        if not per_image:
            images = ops.normalize_batch(images, normalize, dtype)
        if opts.one_hot:
            labels = tf.one_hot(labels, len(plan.labels), dtype=tf.float32)
        return images, labels

    if opts.one_hot or not per_image:
        ds = ds.map(
            _finish, num_parallel_calls=tf.data.AUTOTUNE, deterministic=opts.deterministic
        )
    return ds.prefetch(tf.data.AUTOTUNE)
