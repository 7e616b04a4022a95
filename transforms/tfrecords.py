"""WriteShards: shard groups of references in, one TFRecord file per shard out.

One DoFn call per shard: it fetches the shard's images with many GETs in flight, converts
them with :func:`transforms.examples.convert_record` (Pillow releases the GIL while it
decodes and resizes, so one conversion per core runs in parallel), and streams the
records, in hash order, into a local file that is then moved to its final name in one
atomic step, in the background while the next shard converts. Memory per call is bounded
by the in-flight window, not by the shard.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import gc
import os
import sys
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator

import apache_beam as beam
from apache_beam import pvalue
from apache_beam.transforms.window import GlobalWindows

from s3tfr import s3, storage
from s3tfr.contract import FILENAME_KEY, LABEL_TEXT_KEY, file_sha256, index_name
from s3tfr.host import keep_freed_heap, usable_cpus
from s3tfr.s3 import S3Config
from transforms.commit import OutputRun, mark_written
from transforms.examples import (
    ConvertSettings,
    TFRecordFile,
    convert_record,
    example_strings,
)
from transforms.images import ConvertedImage
from transforms.listing import METRICS_NAMESPACE, REJECTED, count_rejection
from transforms.progress import ProgressFolder
from transforms.references import (
    Compaction,
    IndexRow,
    KeyIndexError,
    Rejection,
    ShardItem,
    decode_index,
    encode_index,
)
from transforms.sharding import ShardNaming
from transforms.sources import read_source

__all__ = ["WriteShards"]


def _in_order(
    pool: concurrent.futures.Executor, fn: Callable, items: Iterable, window: int
) -> Iterator:
    """``pool.map`` with at most ``window`` calls in flight, so results never pile up."""
    pending: collections.deque = collections.deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


class _Stats:
    """Per-shard counts and source image size statistics, folded into the manifest."""

    def __init__(self) -> None:
        self.examples = 0
        self.class_counts: collections.Counter[str] = collections.Counter()
        self.source_formats: collections.Counter[str] = collections.Counter()
        self.source_bytes = 0
        self.height = [sys.maxsize, 0, 0]  # min, max, sum
        self.width = [sys.maxsize, 0, 0]

    def add(self, item: ShardItem, image: ConvertedImage) -> None:
        self.examples += 1
        self.class_counts[item.label_text] += 1
        self.source_formats[image.source_format] += 1
        self.source_bytes += item.size
        for acc, value in ((self.height, image.source_height), (self.width, image.source_width)):
            acc[0], acc[1], acc[2] = min(acc[0], value), max(acc[1], value), acc[2] + value


# Finished shards are hashed and moved to the output (an S3 upload: a round trip plus the
# shard's bytes) while the next shard converts, instead of the decoders waiting for
# them; at most this many per DoFn instance, each a local file until its move ends.
_MAX_PENDING_MOVES = 2

# One conversion per core in this process, shared by every DoFn instance in it (worker
# threads run one each): more only contend for the cores and hold more decoded images.
_DECODE_SLOTS = threading.BoundedSemaphore(usable_cpus())


@functools.cache
def _freeze_imports() -> None:
    """Takes what a worker holds at its first shard out of the garbage collector's view.

    Beam's imports leave ~200k long-lived objects in every worker process; each full
    collection walks them all, and so does the one at interpreter exit, which took
    ~0.7 s per worker, one worker after another, at the end of every job.
    """
    gc.freeze()


class _WriteShardFn(beam.DoFn):
    """((split, bucket), lists of [ShardItem]) -> shard info dict; Rejection per bad image.

    Side input: every shard group's key and number of references.
    """

    def __init__(
        self,
        input_root: str,
        output_root: str,
        settings: ConvertSettings,
        compression: str,
        max_concurrent_gets: int,
        config: S3Config | None,
        run: OutputRun | None,
        progress: ProgressFolder | None,
        naming: ShardNaming | None = None,
    ) -> None:
        self._run = run
        self._naming = naming or ShardNaming()
        self._progress = progress
        self._planned_for: object = None
        self._input = input_root
        self._output = output_root
        self._settings = settings
        self._compression = compression
        self._gets = max_concurrent_gets
        self._config = config
        self._names: dict = {}
        self._names_of: object = None
        self._converted = beam.metrics.Metrics.counter(METRICS_NAMESPACE, "converted")
        self._bytes_written = beam.metrics.Metrics.counter(METRICS_NAMESPACE, "bytes_written")
        self._bytes_read = beam.metrics.Metrics.counter(METRICS_NAMESPACE, "bytes_read")
        self._shards = beam.metrics.Metrics.counter(METRICS_NAMESPACE, "shards_written")

    def setup(self) -> None:
        _freeze_imports()
        keep_freed_heap()
        # Many GETs wait on the network at once, but only one conversion per core runs
        # (_DECODE_SLOTS), so memory holds at most one decoded image per core whatever
        # the GET concurrency. Local reads do not wait: more threads than cores only
        # contend for the GIL.
        self._threads = self._gets if s3.is_s3(self._input) else usable_cpus()
        self._pool = concurrent.futures.ThreadPoolExecutor(self._threads)
        self._moves = concurrent.futures.ThreadPoolExecutor(_MAX_PENDING_MOVES)

    def start_bundle(self) -> None:
        # (move's future or None, shard info) of this bundle's shards, oldest first; a
        # failed bundle's are dropped with it.
        self._pending: collections.deque = collections.deque()

    def teardown(self) -> None:
        self._pool.shutdown()
        self._moves.shutdown()

    def _name(self, split: str, bucket: int, all_groups: list) -> str:
        if all_groups is not self._names_of:
            by_split = collections.defaultdict(list)
            for (s, b), _count in all_groups:
                by_split[s].append(b)
            self._names = {
                (s, b): self._naming.name(s, i, len(bs))
                for s, bs in by_split.items()
                for i, b in enumerate(sorted(bs))
            }
            self._names_of = all_groups
        return self._names[(split, bucket)]

    def _fetch_convert(self, item: ShardItem):
        """ShardItem -> (framed record, source size, image minus its bytes) or Rejection.

        Everything per image happens here, on the pool's threads, so the thread that
        writes the shard does one ``write`` per image and does not hold the GIL against
        the decoders.
        """
        data = read_source(self._input, item.key, self._config)
        if isinstance(data, Rejection):
            return data
        with _DECODE_SLOTS:
            return convert_record(self._settings, item, data)

    def process(self, group, all_groups: list):
        (split, bucket), batches = group
        batches = list(batches)
        name = self._name(split, bucket, all_groups)
        if isinstance(batches[0], Compaction):
            yield from self._compact(split, name, batches[0])
            return
        task = None
        if self._progress is not None:
            if all_groups is not self._planned_for:  # the same object per bundle
                self._progress.set_total(sum(count for _key, count in all_groups))
                self._planned_for = all_groups
            task = self._progress.task(name)
        stats = _Stats()
        rows: list[IndexRow] = []
        fd, tmp = tempfile.mkstemp(suffix=".tfrecord")
        os.close(fd)
        ordered = sorted(item for batch in batches for item in batch)
        with TFRecordFile(tmp, self._compression) as writer:
            window = 2 * self._threads
            results = _in_order(self._pool, self._fetch_convert, ordered, window)
            for item, result in zip(ordered, results):
                if task:
                    task.add(1)
                if isinstance(result, Rejection):
                    yield pvalue.TaggedOutput(REJECTED, count_rejection(result))
                    continue
                framed, size, image, digest = result
                writer.write_framed(framed)
                stats.add(item, image)
                rows.append(IndexRow(item.key, size, item.stamp, digest))
                self._bytes_read.inc(size)
        info = {"split": split, "file": name, "examples": stats.examples}
        move = None
        if stats.examples:
            info["bytes"] = os.path.getsize(tmp)
            move = self._moves.submit(self._digest_and_move, tmp, name, encode_index(rows))
        else:
            os.remove(tmp)  # every image was rejected: the manifest renumbers the rest
        info["stats"] = {
            "class_counts": dict(stats.class_counts),
            "source_formats": dict(stats.source_formats),
            "source_bytes": stats.source_bytes,
            "height": stats.height,
            "width": stats.width,
        }
        if task:
            task.finish()
        self._pending.append((move, info))
        yield from self._moved(keep=_MAX_PENDING_MOVES)

    def _compact(self, split: str, name: str, job: Compaction):
        """Copies the committed shard ``job.file`` as ``name``, less the records of the
        keys in ``job.drop``, record bytes unchanged; with its key index likewise."""
        from transforms.verify import (  # reads records: TF's proto
            iter_records,
        )

        source = storage.join(self._output, job.file)
        index = decode_index(storage.read_bytes(storage.join(self._output, index_name(job.file)),
                                                self._config), job.file)  # fmt: skip
        kept_rows = [row for row in index if row.key not in job.drop]
        kept: collections.Counter[str] = collections.Counter()
        dropped: collections.Counter[str] = collections.Counter()
        keys = []
        fd, tmp = tempfile.mkstemp(suffix=".tfrecord")
        os.close(fd)
        with TFRecordFile(tmp, self._compression) as writer:
            for record in iter_records(source, self._compression, self._config):
                fields = example_strings(record, (FILENAME_KEY, LABEL_TEXT_KEY))
                key = fields.get(FILENAME_KEY, b"").decode("utf-8", "surrogateescape")
                label = fields.get(LABEL_TEXT_KEY, b"").decode("utf-8", "surrogateescape")
                if key in job.drop:
                    dropped[label] += 1
                    continue
                writer.write(record)
                kept[label] += 1
                keys.append(key)
        if keys != [row.key for row in kept_rows] or sum(dropped.values()) != len(job.drop):
            raise KeyIndexError(
                f"{job.file} and its key index disagree ({len(keys)} records kept against "
                f"{len(kept_rows)} index rows): run a full convert to rewrite the dataset"
            )
        info = {"split": split, "file": name, "examples": len(keys), "replaces": job.file,
                "dropped": sum(dropped.values()),
                "stats": {"class_counts": dict(kept), "dropped_class_counts": dict(dropped)}}  # fmt: skip
        move = None
        if keys:
            info["bytes"] = os.path.getsize(tmp)
            move = self._moves.submit(
                self._digest_and_move, tmp, name, encode_index(kept_rows)
            )
        else:
            os.remove(tmp)
        self._pending.append((move, info))
        yield from self._moved(keep=_MAX_PENDING_MOVES)

    def finish_bundle(self):
        for info in self._moved(keep=0):
            yield GlobalWindows.windowed_value(info)

    def _digest_and_move(self, path: str, name: str, index: bytes) -> str:
        """Moves a finished shard to the output as ``name`` (:func:`storage.put_file`),
        marked first as this run's, after its key index; returns the hex SHA-256 of its
        bytes."""
        digest = file_sha256(path)
        if self._run is not None:
            mark_written(self._run, name)
        storage.write_bytes(storage.join(self._output, index_name(name)), index, self._config)
        storage.put_file(path, storage.join(self._output, name), self._config)
        return digest

    def _moved(self, keep: int) -> Iterator[dict]:
        """Infos of the shards now at their final names, oldest first: all that have
        arrived, then, waiting, until at most ``keep`` are still moving. A failed move
        raises here, failing the bundle."""
        while self._pending and (len(self._pending) > keep or _done(self._pending[0][0])):
            move, info = self._pending.popleft()
            if move is not None:
                info["sha256"] = move.result()
                if "replaces" not in info:  # a copy converts nothing
                    self._converted.inc(info["examples"])
                self._bytes_written.inc(info["bytes"])
                self._shards.inc()
            yield info


def _images(lists) -> int:
    """The images a shard group converts (a copy, ``Compaction``, converts none)."""
    return sum(len(batch) for batch in lists if not isinstance(batch, Compaction))


def _done(move: concurrent.futures.Future | None) -> bool:
    return move is None or move.done()


class WriteShards(beam.PTransform):
    """Converts and writes every shard group straight to its final name.

    Args:
        input_root: the listed root that the references' keys are relative to.
        output_root: where the shards go (``s3://`` or local).
        settings: image conversion settings.
        compression: ``""`` or ``"GZIP"``.
        max_concurrent_gets: GETs in flight per worker (decodes: one per core).
        config: S3 client settings.
        run: the run holding the output's lease: each shard is marked as its own
            before it is moved in (:func:`transforms.commit.mark_written`).
        progress: where to report the planned images and, per shard, those done
            (converted or rejected), if anywhere.
        naming: where this run's shard names start (``convert --append``).

    A group whose value is one ``Compaction`` copies a committed shard less some
    records instead (``convert --append``); its info names the shard it ``replaces``.

    Returns:
        A dict: ``"shards"`` (info dicts: split, file, examples, bytes, sha256, stats;
        a copy's also ``replaces`` and ``dropped``) and
        ``"rejected"`` (``Rejection`` for images that could not be fetched or decoded).
    """

    def __init__(
        self,
        input_root: str,
        output_root: str,
        settings: ConvertSettings,
        compression: str = "",
        max_concurrent_gets: int = 16,
        config: S3Config | None = None,
        run: OutputRun | None = None,
        progress: ProgressFolder | None = None,
        naming: ShardNaming | None = None,
    ) -> None:
        super().__init__()
        self._fn = _WriteShardFn(
            input_root, output_root, settings, compression, max_concurrent_gets, config, run,
            progress, naming,
        )  # fmt: skip

    def expand(self, groups):
        # [((split, bucket), references)]: the non-empty shard groups, to number shards
        # without gaps, and their sizes, the planned total for progress.
        sizes = (
            groups
            | "GroupSizes" >> beam.MapTuple(lambda key, lists: (key, _images(lists)))
            | "AllGroupSizes" >> beam.combiners.ToList()
        )
        written = groups | "ConvertAndWrite" >> beam.ParDo(
            self._fn, pvalue.AsSingleton(sizes)
        ).with_outputs(REJECTED, main="shards")
        return {"shards": written.shards, "rejected": written[REJECTED]}
