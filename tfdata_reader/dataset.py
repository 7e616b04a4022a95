"""make_dataset: a converted dataset (local or S3) in, ``(images, labels)`` batches out.

Pipeline (one epoch per iteration; Keras ``fit(epochs=N)`` iterates it again, reshuffled)::

    shard indices of this worker, shuffled per iteration (seeded)
    -> schedule the fetch (S3: background pool, ``prefetch_shards`` ahead)
    -> wait for a verified local path (S3 cache or the local file)
    -> parallel interleave of TFRecordDataset over shards
         -> parse_single_example -> decode -> resize / augment (stateless, seeded) -> uint8
         -> bad records skipped and counted per shard (unless strict)
    -> shuffle buffer -> batch -> normalise, one-hot -> prefetch (AUTOTUNE)

Only shards listed in ``dataset_info.json`` are read. Every stage is a tf.data stage, so the
iterator can be saved with ``tf.train.Checkpoint`` and resumed mid-epoch.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import threading
from collections.abc import Sequence

import tensorflow as tf

from tfdata_reader import ops, transform
from tfdata_reader.cache import ShardCache
from tfdata_reader.manifest import DatasetError, load_info, shard_uris
from transforms import s3, storage
from transforms.host import usable_cpus
from transforms.s3 import S3Config

__all__ = ["ReaderStats", "make_dataset"]

log = logging.getLogger("tfdata_reader")

DEFAULT_SHUFFLE_BUFFER = 1024
DEFAULT_PREFETCH_SHARDS = 8
_FEATURES = {
    "image/encoded": tf.io.FixedLenFeature([], tf.string),
    "image/class/label": tf.io.FixedLenFeature([], tf.int64),
}


@dataclasses.dataclass
class ReaderStats:
    """What a reader skipped, filled in while it runs (pass one to ``make_dataset``).

    Attributes:
        skipped: records skipped per shard URI (corrupt record or undecodable image).
    """

    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False)

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())


def _worker_shards(n_shards: int, num_workers: int, worker_index: int) -> tuple[list[int], bool]:
    """Shard indices this worker reads, and whether records must be split instead.

    By file when there are at least as many shards as workers; otherwise every worker reads
    every shard and keeps every ``num_workers``-th record. Either way each example is read by
    exactly one worker per epoch.
    """
    if not 0 <= worker_index < num_workers:
        raise ValueError(f"worker_index {worker_index} not in [0, {num_workers})")
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
        found = dict(storage.walk(uri, config))
    else:
        found = {}
        for shard_uri, entry in shards:
            if os.path.exists(shard_uri):
                found[entry["file"]] = os.path.getsize(shard_uri)
    for shard_uri, entry in shards:
        if entry["file"] not in found:
            raise DatasetError(
                f"shard {shard_uri} is listed in dataset_info.json but missing: the dataset "
                "was modified after conversion; rerun the convert job"
            )
        if found[entry["file"]] != entry["bytes"]:
            raise DatasetError(
                f"shard {shard_uri} is {found[entry['file']]} bytes but dataset_info.json "
                f"says {entry['bytes']}: it was modified or damaged; rerun the convert job"
            )


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
    strict: bool = False,
    cache: ShardCache | None = None,
    cache_dir: str | None = None,
    cache_max_bytes: int | None = None,
    prefetch_shards: int = DEFAULT_PREFETCH_SHARDS,
    cycle_length: int | None = None,
    verify: str = "sha256",
    stats: ReaderStats | None = None,
    config: S3Config | None = None,
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
        shuffle_buffer: records in the shuffle buffer (held as uint8 ``image_size``).
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
        strict: raise on the first bad record instead of skipping and counting it.
        cache: a ``ShardCache`` to share between datasets; else one is made from
            ``cache_dir`` / ``cache_max_bytes``.
        prefetch_shards: S3 shards fetched ahead of the reader.
        cycle_length: shards read at once (default: ``min(shards, max(4, CPUs))``).
        verify: check fetched shards by ``"sha256"``, ``"size"`` or ``"none"``.
        stats: filled with the records skipped per shard.
        config: S3 client settings; ``None`` uses the standard AWS chain.

    Returns:
        A ``tf.data.Dataset`` of ``(images, labels)``: images ``(batch, h, w, 3)``, labels
        ``(batch,)`` int64 or ``(batch, num_classes)`` float32.

    Raises:
        DatasetError: no or invalid ``dataset_info.json``, unknown split, or a listed shard
            missing or of the wrong size. A checksum mismatch found while fetching fails
            the iteration with the shard's URI in the message.
    """
    if isinstance(normalize, str) and normalize == "transform_fn":
        normalize = transform.pixel_normalizer(transform.load_analysis(uri, config))
    ops.check_options(resize, normalize, dtype)
    if input_context is not None:
        num_workers = input_context.num_input_pipelines
        worker_index = input_context.input_pipeline_id
        batch_size = input_context.get_per_replica_batch_size(batch_size)
    shuffle = training if shuffle is None else shuffle
    drop_remainder = training if drop_remainder is None else drop_remainder
    if deterministic is None:
        deterministic = seed is not None or not shuffle
    if augment is None or augment is True:
        augment = ops.Augment() if training else None
    elif augment is False:
        augment = None
    image_size = tuple(int(v) for v in image_size)

    info = load_info(uri, config)
    shards = shard_uris(info, uri, split)
    if not shards:
        raise DatasetError(f"split {split!r} of {uri} has no shards")
    _check_present(uri, shards, config)
    indices, by_record = _worker_shards(len(shards), num_workers, worker_index)
    if cache is None:
        kwargs = {"max_bytes": cache_max_bytes} if cache_max_bytes else {}
        cache = ShardCache(cache_dir, verify=verify, config=config, **kwargs)
    stats = stats if stats is not None else ReaderStats()
    uris = [u for u, _ in shards]
    entries = [e for _, e in shards]
    expected = [
        len(range(worker_index, e["examples"], num_workers)) if by_record else e["examples"]
        for e in entries
    ]
    num_classes = len(info["labels"])
    compression = info.get("compression", "")

    def _schedule(i):
        i = int(i)
        cache.schedule(uris[i], entries[i])
        return i

    def _local_path(i):
        i = int(i)
        return cache.get(uris[i], entries[i])

    def _report(i, count):
        i, count = int(i), int(count)
        cache.release(uris[i], entries[i])
        if count < expected[i]:
            with stats._lock:
                stats.skipped[uris[i]] += expected[i] - count
            log.warning(
                "skipped %d of %d records of shard %s (corrupt record or undecodable image)",
                expected[i] - count,
                expected[i],
                uris[i],
            )
        return count

    order = tf.data.Dataset.from_tensor_slices(tf.constant(indices, tf.int64))
    if shuffle:
        order = order.shuffle(len(indices), seed=seed, reshuffle_each_iteration=True)
    # One random int64 per shard per iteration: the root of its records' augmentation seeds.
    roots = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)
    order = tf.data.Dataset.zip(order, roots)
    if s3.is_s3(uri):
        order = order.map(
            lambda i, r: (tf.py_function(_schedule, [i], tf.int64), r),
            num_parallel_calls=None,
        ).prefetch(prefetch_shards)
    order = order.map(
        lambda i, r: (i, r, tf.py_function(_local_path, [i], tf.string)),
        num_parallel_calls=None,
    )

    def _record(j, record, root):
        example = tf.io.parse_single_example(record, _FEATURES)
        seed_pair = tf.stack([root, tf.cast(j, tf.int64)])
        image = ops.to_image(example["image/encoded"], image_size, resize, augment, seed_pair)
        return image, example["image/class/label"]

    def _read_shard(i, root, path):
        records = tf.data.TFRecordDataset(path, compression_type=compression)
        if by_record:
            records = records.shard(num_workers, worker_index)
        examples = records.enumerate().map(lambda j, rec: _record(j, rec, root))
        if not strict:
            examples = examples.ignore_errors()
        # A sentinel after the shard's last record unpins its cache file and reports how
        # many records were skipped.
        end = tf.data.Dataset.from_tensors(
            (tf.zeros([*image_size, 3], tf.uint8), tf.constant(-1, tf.int64))
        )

        def _count(n, element):
            image, label = element
            n = n + tf.cast(label >= 0, tf.int64)
            reported = tf.cond(
                label < 0,
                lambda: tf.py_function(_report, [i, n], tf.int64),
                lambda: n,
            )
            return n, (image, label, reported)

        counted = examples.concatenate(end).scan(tf.constant(0, tf.int64), _count)
        return counted.filter(lambda image, label, _: label >= 0).map(
            lambda image, label, _: (image, label)
        )

    cycle = cycle_length or min(len(indices), max(4, usable_cpus()))
    ds = order.interleave(
        _read_shard,
        cycle_length=cycle,
        block_length=1,
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=deterministic,
    )
    if shuffle:
        ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)

    def _finish(images, labels):
        images = ops.normalize_batch(images, normalize, dtype)
        if one_hot:
            labels = tf.one_hot(labels, num_classes, dtype=tf.float32)
        return images, labels

    ds = ds.map(_finish, num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)
    ds = ds.prefetch(tf.data.AUTOTUNE)
    options = tf.data.Options()
    options.deterministic = deterministic
    # The py_function stages hold no iterator state (a path is a function of the shard
    # index), so saving the iterator without them resumes exactly.
    options.experimental_external_state_policy = tf.data.experimental.ExternalStatePolicy.IGNORE
    return ds.with_options(options)
