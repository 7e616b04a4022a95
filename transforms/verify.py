"""VerifyShards: a converted dataset's manifest in; one pass/fail result per shard out.

Every shard listed in ``s3tfr_manifest.json`` is re-read as a stream, once: its raw bytes go
through sha256 and a byte count (checked against the manifest), and the same bytes,
decompressed when the dataset is GZIP or ZLIB, through Beam's TFRecord framing reader (length
and data CRCs). Each record must parse as a ``tf.train.Example`` with the data contract's
keys, its image must decode completely, its label must be in range and agree with its class
name, and the shard's record count must equal the manifest's. Per-split class counts are
summed over the shards and compared with the manifest's too.

Shards are verified in parallel (one DoFn call per shard); memory per call is one record.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import gzip
import hashlib
import io
import zlib
from collections.abc import Iterator
from typing import Any, BinaryIO

import apache_beam as beam
import botocore.exceptions

# Beam's reader checks both CRCs of each record, with google-crc32c.
from apache_beam.io.tfrecordio import _TFRecordUtil

from s3tfr import s3, storage
from s3tfr.contract import index_name
from s3tfr.host import quiet_tensorflow_import
from s3tfr.s3 import S3Config
from transforms.duplicates import FindDuplicates, Fingerprint, perceptual_hash
from transforms.progress import ProgressFolder
from transforms.references import KeyIndexError, decode_index

__all__ = [
    "METRICS_NAMESPACE",
    "ShardCheck",
    "VerifyShards",
    "check_splits",
    "iter_records",
    "parse_example",
    "shard_tasks",
]

METRICS_NAMESPACE = "verify"
FINGERPRINTS = "fingerprints"
_READ_CHUNK = 1 << 20
# A shard with thousands of bad records would otherwise print thousands of lines.
_MAX_PROBLEMS = 5
_MAX_MESSAGE = 160


@dataclasses.dataclass(frozen=True)
class ShardCheck:
    """The verdict on one shard.

    ``class_counts`` counts the records read, whether or not the shard passed, so a split
    total is only meaningful when every shard of the split passed.
    """

    split: str
    file: str
    ok: bool
    examples: int
    bytes: int
    problems: tuple[str, ...]
    class_counts: tuple[tuple[str, int], ...]

    def line(self) -> str:
        verdict = "PASS" if self.ok else "FAIL"
        text = f"{verdict} {self.file}: {self.examples} records, {self.bytes} bytes"
        return text + ("" if self.ok else " - " + "; ".join(self.problems))


class _Hashing(io.RawIOBase):
    """A read-only stream that hashes and counts every byte read through it."""

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self.sha256 = hashlib.sha256()
        self.size = 0

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        data = self._raw.read() if n is None or n < 0 else self._raw.read(n)
        self.sha256.update(data)
        self.size += len(data)
        return data

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def drain(self) -> None:
        while self.read(_READ_CHUNK):
            pass


class _Inflating(io.RawIOBase):
    """ZLIB-compressed bytes in, plain bytes out, streamed (``gzip`` has no zlib-only reader)."""

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self._inflate = zlib.decompressobj()
        self._pending = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self._pending and not self._inflate.eof:
            chunk = self._raw.read(_READ_CHUNK)
            if not chunk:
                raise EOFError("compressed stream ended before the end-of-stream marker")
            self._pending = self._inflate.decompress(chunk, len(buffer))
        data, self._pending = self._pending[: len(buffer)], self._pending[len(buffer) :]
        buffer[: len(data)] = data
        return len(data)


class _ResumingBody(io.RawIOBase):
    """An S3 object's bytes, streamed; a body cut mid-stream is resumed with a ranged GET
    from where it stopped, on the same object version (``If-Match`` its ETag).

    Records already handed on from the stream cannot be taken back, so starting over (as
    botocore's retries and ``s3.body_retries`` do) would duplicate them.
    """

    def __init__(self, bucket: str, key: str, config: S3Config | None) -> None:
        self._bucket, self._key, self._config = bucket, key, config
        self._position = 0
        self._etag = ""
        self._body = self._get()

    def _get(self):
        extra = {}
        if self._etag:
            extra = {"Range": f"bytes={self._position}-", "IfMatch": self._etag}
        response = s3.client(self._config).get_object(
            Bucket=self._bucket, Key=self._key, **extra
        )
        self._etag = self._etag or response["ETag"]
        return response["Body"]

    def _read(self, size: int) -> bytes:
        if self._body is None:
            self._body = self._get()
        try:
            return self._body.read(size)
        except s3.TRANSIENT_BODY_ERRORS:  # s3.body_retries reads again
            self._body = None  # the next attempt resumes at self._position
            raise

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = s3.body_retries(self._read, len(buffer))
        buffer[: len(data)] = data
        self._position += len(data)
        return len(data)


def _open(uri: str, config: S3Config | None) -> BinaryIO:
    """A streaming reader of a file or object (``storage.read_bytes`` reads it whole)."""
    if s3.is_s3(uri):
        bucket, key = s3.parse(uri)
        try:
            return io.BufferedReader(_ResumingBody(bucket, key, config), _READ_CHUNK)
        except botocore.exceptions.ClientError as e:
            code = s3.error_code(e)
            if code in ("NoSuchKey", "404", "NoSuchBucket", "NotFound"):
                raise FileNotFoundError(f"{uri}: {code}") from None
            raise
    return open(uri.removeprefix("file://"), "rb")


def _records(stream: BinaryIO, compression: str) -> Iterator[bytes]:
    if compression == "GZIP":
        stream = gzip.GzipFile(fileobj=stream, mode="rb")
    elif compression == "ZLIB":
        stream = io.BufferedReader(_Inflating(stream), _READ_CHUNK)
    while (record := _TFRecordUtil.read_record(stream)) is not None:
        yield record


def iter_records(uri: str, compression: str = "", config: S3Config | None = None):
    """Streams the serialized records of one shard (CRC-checked).

    Args:
        uri: the shard's URI (``s3://`` or local).
        compression: ``""``, ``"GZIP"`` or ``"ZLIB"``, as in the manifest.
        config: S3 client settings.

    Yields:
        Serialized ``tf.train.Example`` bytes.

    Raises:
        FileNotFoundError: no such shard.
        ValueError: a record's framing or CRC is wrong.
    """
    with _open(uri, config) as raw:
        yield from _records(raw, compression)


def parse_example(record: bytes) -> dict[str, Any]:
    """The data contract's features of one serialized ``tf.train.Example``.

    Raises:
        ValueError: the record is not an Example or lacks a feature of the contract.
    """
    from google.protobuf.message import DecodeError

    example = _example_pb2().Example()
    try:
        example.ParseFromString(record)
    except DecodeError as e:
        raise ValueError(f"not a tf.train.Example ({e})") from None
    features = example.features.feature
    out: dict[str, Any] = {}
    for key, kind in (
        ("image/encoded", "bytes_list"),
        ("image/format", "bytes_list"),
        ("image/height", "int64_list"),
        ("image/width", "int64_list"),
        ("image/class/label", "int64_list"),
        ("image/class/text", "bytes_list"),
        ("image/filename", "bytes_list"),
    ):
        values = getattr(features[key], kind).value if key in features else ()
        if len(values) != 1:
            raise ValueError(f"feature {key} missing or not one {kind} value")
        out[key] = values[0]
    # Older datasets may lack it; only the duplicate report uses it.
    source = features["image/source_sha256"].bytes_list.value if "image/source_sha256" in features else ()
    out["image/source_sha256"] = source[0].decode("ascii", "replace") if len(source) == 1 else ""
    return out


@functools.cache
def _example_pb2():
    with quiet_tensorflow_import():
        from tensorflow.core.example import example_pb2
    return example_pb2


def _decode_image(data: bytes) -> int:
    """Decodes every pixel (``verify()`` misses truncation; ``load()`` does not);
    returns the image's perceptual hash (``transforms.duplicates``)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return perceptual_hash(image)


def _short(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}" if not isinstance(error, ValueError) else str(error)
    # Beam's framing errors append the record's bytes in hex: not for a person.
    text = text.split(": b'")[0]
    return text if len(text) <= _MAX_MESSAGE else text[: _MAX_MESSAGE - 1] + "…"


class _VerifyShardFn(beam.DoFn):
    """(split, manifest shard entry) -> ShardCheck; a ``Fingerprint`` per record decoded
    (tagged ``fingerprints``)."""

    def __init__(
        self,
        root: str,
        labels: list[str],
        compression: str,
        config,
        progress: ProgressFolder | None = None,
    ) -> None:
        self._root = root
        self._labels = labels
        self._compression = compression
        self._config = config
        self._progress = progress
        self._passed = beam.metrics.Metrics.counter(METRICS_NAMESPACE, "shards_passed")
        self._failed = beam.metrics.Metrics.counter(METRICS_NAMESPACE, "shards_failed")
        self._records = beam.metrics.Metrics.counter(METRICS_NAMESPACE, "records_read")
        self._images = beam.metrics.Metrics.counter(METRICS_NAMESPACE, "images_decoded")
        self._bytes = beam.metrics.Metrics.counter(METRICS_NAMESPACE, "bytes_read")

    def _check(self, split: str, entry: dict) -> tuple[ShardCheck, list[Fingerprint]]:
        uri = storage.join(self._root, entry["file"])
        task = self._progress.task(entry["file"]) if self._progress else None
        fingerprints: list[Fingerprint] = []
        problems: list[str] = []
        counts: collections.Counter[str] = collections.Counter()
        names: list[str] = []
        records = decoded = 0

        def problem(text: str) -> None:
            if len(problems) < _MAX_PROBLEMS:
                problems.append(text)
            elif len(problems) == _MAX_PROBLEMS:
                problems.append("more problems not shown")

        try:
            raw = _open(uri, self._config)
        except FileNotFoundError:
            missing = ShardCheck(split, entry["file"], False, 0, 0, ("missing: no such file",), ())
            return missing, []
        with raw:
            hashing = _Hashing(raw)
            try:
                for record in _records(hashing, self._compression):
                    records += 1
                    if task:
                        task.add(1)
                    try:
                        features = parse_example(record)
                        label = features["image/class/label"]
                        text = features["image/class/text"].decode("utf-8", "replace")
                        name = features["image/filename"].decode("utf-8", "replace")
                        names.append(name)
                        if not 0 <= label < len(self._labels):
                            problem(f"record {records - 1} ({name}): label {label} out of range")
                        elif self._labels[label] != text:
                            problem(
                                f"record {records - 1} ({name}): label {label} is "
                                f"{self._labels[label]!r}, class text is {text!r}"
                            )
                        counts[text] += 1
                        phash = _decode_image(features["image/encoded"])
                        decoded += 1
                        if features["image/source_sha256"]:
                            fingerprints.append(Fingerprint(
                                features["image/source_sha256"], phash, split, text, name
                            ))  # fmt: skip
                    except Exception as e:  # noqa: BLE001 - any failure is a verdict
                        problem(f"record {records - 1}: {_short(e)}")
                hashing.drain()
            except s3.TRANSIENT_BODY_ERRORS:  # s3.body_retries reads again
                raise
            except Exception as e:  # noqa: BLE001 - framing, CRC, gzip
                problem(f"unreadable after {records} records: {_short(e)}")
                hashing.drain()
        if task:
            task.finish()
        self._records.inc(records)
        self._images.inc(decoded)
        self._bytes.inc(hashing.size)
        if hashing.size != entry["bytes"]:
            problems.insert(0, f"size {hashing.size} bytes, manifest says {entry['bytes']}")
        if hashing.sha256.hexdigest() != entry["sha256"]:
            problems.insert(0, "sha256 differs from the manifest")
        if records != entry["examples"]:
            problems.append(f"{records} records, manifest says {entry['examples']}")
        index_problem = self._index_problem(entry["file"], names)
        if index_problem:
            problems.append(index_problem)
        check = ShardCheck(
            split, entry["file"], not problems, records, hashing.size, tuple(problems),
            tuple(sorted(counts.items())),
        )  # fmt: skip
        return check, fingerprints

    def _index_problem(self, file: str, names: list[str]) -> str:
        """What is wrong with the shard's key index (``convert --append`` reads it), if
        it has one: it must list the records' keys in their order. A dataset converted
        before key indexes has none, which only ``--append`` minds."""
        try:
            data = storage.read_bytes(storage.join(self._root, index_name(file)), self._config)
        except FileNotFoundError:
            return ""
        try:
            keys = [storage.printable(row.key) for row in decode_index(data, file)]
        except KeyIndexError as e:
            return str(e)
        if keys != names:
            return (
                f"its key index ({index_name(file)}) lists {len(keys)} keys that differ "
                f"from its {len(names)} records"
            )
        return ""

    def process(self, element):
        split, entry = element
        # A body cut mid-stream is retried by reading the shard again from the start.
        check, fingerprints = s3.body_retries(self._check, split, entry)
        (self._passed if check.ok else self._failed).inc()
        yield check
        for fingerprint in fingerprints:
            yield beam.pvalue.TaggedOutput(FINGERPRINTS, fingerprint)


def shard_tasks(info: dict) -> list[tuple[str, dict]]:
    """``(split, shard entry)`` for every shard the manifest lists, in manifest order."""
    return [(split, shard) for split, s in info["splits"].items() for shard in s["shards"]]


def check_splits(info: dict, checks: list[ShardCheck]) -> list[str]:
    """Split-level problems: class counts that differ from the manifest's.

    Only splits whose shards all passed are compared (a failed shard already says why).
    """
    problems = []
    for split, entry in info["splits"].items():
        mine = [c for c in checks if c.split == split]
        if len(mine) != entry["num_shards"] or not all(c.ok for c in mine):
            continue
        counts: collections.Counter[str] = collections.Counter()
        for check in mine:
            counts.update(dict(check.class_counts))
        want = {k: v for k, v in entry.get("class_counts", {}).items() if v}
        if dict(counts) != want:
            problems.append(f"split {split}: class counts {dict(sorted(counts.items()))}, "
                            f"manifest says {dict(sorted(want.items()))}")  # fmt: skip
    return problems


class VerifyShards(beam.PTransform):
    """Re-reads and checks every shard a manifest lists, in parallel.

    Args:
        root: the dataset prefix (``s3://`` or local).
        info: the validated manifest (``tfdata_reader.load_info``).
        config: S3 client settings.
        progress: where to report the records read, per shard, if anywhere.

    Returns:
        A dict: ``"checks"``, a :class:`ShardCheck` per listed shard, and
        ``"duplicates"``, what :class:`transforms.duplicates.FindDuplicates` makes of
        the records' fingerprints.
    """

    def __init__(
        self,
        root: str,
        info: dict,
        config: S3Config | None = None,
        progress: ProgressFolder | None = None,
    ) -> None:
        super().__init__()
        self._root = root
        self._info = info
        self._config = config
        self._progress = progress

    def expand(self, pbegin):
        info = self._info
        verified = (
            pbegin
            | "ListShards" >> beam.Create(shard_tasks(info))
            # (split, shard entry); spread over workers: one shard per DoFn call
            | "SpreadShards" >> beam.Reshuffle()
            | "VerifyShard"
            >> beam.ParDo(
                _VerifyShardFn(
                    self._root,
                    info["labels"],
                    info.get("compression", ""),
                    self._config,
                    self._progress,
                )
            ).with_outputs(FINGERPRINTS, main="checks")
        )
        duplicates = verified[FINGERPRINTS] | "FindDuplicates" >> FindDuplicates()
        return {"checks": verified.checks, "duplicates": duplicates}
