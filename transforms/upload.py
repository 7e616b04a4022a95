"""The upload stages: a local folder tree in, its files as S3 objects out, one
:class:`FileResult` per file (uploaded, unchanged, would upload, not an image, failed).

``ListLocalFiles`` walks the tree (class folders in parallel), following symlinked folders
but refusing loops; ``ListObjects`` lists what the destination already holds (size and
ETag, 1,000 keys per request, sub-prefixes in parallel); ``UploadFiles`` joins the two by
relative path and, per worker, keeps many PUTs in flight from a thread pool.

"Unchanged" means same size and same MD5: the ETag of a single-part object is its MD5;
for multipart (or SSE-KMS) objects the MD5 stored in the object's metadata at upload time
is compared instead. Timestamps are never used.
"""

from __future__ import annotations

import base64
import collections
import concurrent.futures
import errno
import fnmatch
import hashlib
import io
import mimetypes
import os
import stat
import sys
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import apache_beam as beam
import boto3.exceptions
import botocore.exceptions
from apache_beam import pvalue
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import MIN_TIMESTAMP
from apache_beam.utils.windowed_value import WindowedValue
from PIL import Image

from transforms import s3
from transforms.s3 import S3Config

__all__ = [
    "FAILED",
    "MD5_METADATA",
    "METRICS_NAMESPACE",
    "FileResult",
    "ListLocalFiles",
    "ListObjects",
    "LocalFile",
    "Progress",
    "RemoteObject",
    "Summarize",
    "UploadFiles",
    "UploadSettings",
    "content_type",
    "selected",
]

METRICS_NAMESPACE = "upload"
FAILED = "failed"
# Stored on every object this job writes; the only checksum a multipart object keeps.
MD5_METADATA = "s3tfr-md5"
# Files up to this size are read once into memory (MD5 and PUT body from one read);
# larger ones stream from disk through the transfer manager.
IN_MEMORY_MAX = 8 * 1024 * 1024
# 5xx and throttling answers that botocore's retries already gave up on are worth one
# more whole-object attempt later; anything else (AccessDenied, NoSuchBucket) is final.
_TRANSIENT_CODES = {
    "SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout", "Throttling",
    "RequestTimeTooSkewed", "500", "502", "503", "504",
}  # fmt: skip
_TRANSIENT_ERRORS = (
    botocore.exceptions.ConnectionError,
    botocore.exceptions.HTTPClientError,
    botocore.exceptions.ResponseStreamingError,
    boto3.exceptions.S3UploadFailedError,
    ConnectionError,
)


class LocalFile(NamedTuple):
    rel: str  # path relative to the source root, "/"-separated: the key suffix
    size: int


class RemoteObject(NamedTuple):
    size: int
    etag: str


class FileResult(NamedTuple):
    rel: str
    status: str  # uploaded | unchanged | would_upload | not_image | failed
    size: int = 0
    reason: str = ""


class UploadSettings(NamedTuple):
    """What a worker needs to upload one file (plain values: pickles cheaply)."""

    source: str
    bucket: str
    prefix: str
    config: S3Config | None = None
    concurrency: int = 32
    multipart_threshold: int = s3.MULTIPART_THRESHOLD
    object_attempts: int = 3
    images_only: bool = False
    dry_run: bool = False
    sse: str = ""
    sse_kms_key_id: str = ""
    storage_class: str = ""
    run_id: str = ""  # progress restarts when it changes (several runs in one process)

    def extra_args(self) -> dict[str, str]:
        extra = {}
        if self.sse:
            extra["ServerSideEncryption"] = self.sse
        if self.sse_kms_key_id:
            extra["SSEKMSKeyId"] = self.sse_kms_key_id
        if self.storage_class:
            extra["StorageClass"] = self.storage_class
        return extra


def selected(rel: str, include: Sequence[str], exclude: Sequence[str]) -> bool:
    """Whether a relative path passes the globs (``*`` also matches ``/``, as in awscli).

    A path must match one ``include`` pattern (when any are given) and no ``exclude``.
    """
    if include and not any(fnmatch.fnmatchcase(rel, p) for p in include):
        return False
    return not any(fnmatch.fnmatchcase(rel, p) for p in exclude)


def content_type(head: bytes, name: str) -> tuple[str, bool]:
    """The MIME type of a file from its first bytes, and whether it is an image.

    Pillow identifies the image format from the header without decoding pixels; anything
    it does not recognise falls back to the extension, then ``application/octet-stream``.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with Image.open(io.BytesIO(head)) as image:
                mime = image.get_format_mimetype()
        except Exception:  # noqa: BLE001 - any failure to identify means "not an image"
            mime = None
    if mime:
        return mime, True
    guessed, _ = mimetypes.guess_type(name)
    return guessed or "application/octet-stream", False


# Enough for Pillow to identify every format it knows (JPEG markers may precede SOF).
_HEAD_BYTES = 64 * 1024


class _Changed(Exception):
    """The file changed while it was read: retried as a whole, then reported."""


def _walk(
    root: str, rel_dir: str, ancestors: frozenset
) -> Iterator[LocalFile | FileResult | tuple[str, frozenset]]:
    """One folder level: files, failures, and ``(sub_folder, ancestors)`` to descend into.

    Symlinked folders are followed; a folder that is its own ancestor (a symlink loop)
    is reported instead of descended into, so the walk always ends.
    """
    folder = os.path.join(root, rel_dir) if rel_dir else root
    try:
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError as e:
        yield FileResult(rel_dir + "/", FAILED, 0, f"cannot list folder: {e.strerror or e}")
        return
    for entry in entries:
        rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
        try:
            st = os.stat(entry.path)
        except OSError as e:
            if e.errno == errno.ELOOP:
                reason = "symlink loop (the link resolves to itself)"
            elif entry.is_symlink() and e.errno == errno.ENOENT:
                reason = f"dangling symlink to {os.readlink(entry.path)!r}"
            else:
                reason = f"cannot stat: {e.strerror or e}"
            yield FileResult(rel, FAILED, 0, reason)
            continue
        if stat.S_ISDIR(st.st_mode):
            identity = (st.st_dev, st.st_ino)
            if identity in ancestors:
                yield FileResult(
                    rel + "/", FAILED, 0, "symlink loop: links back to a folder above it"
                )
            else:
                yield rel, ancestors | {identity}
        elif stat.S_ISREG(st.st_mode):
            yield LocalFile(rel, st.st_size)
        else:
            kind = "FIFO" if stat.S_ISFIFO(st.st_mode) else "socket or device"
            yield FileResult(rel, FAILED, 0, f"not a regular file ({kind})")


class _ListLocalFn(beam.DoFn):
    """(rel_folder, ancestors) -> LocalFile per file below it that passes the globs;
    FileResult (failed) per entry that cannot be uploaded."""

    def __init__(
        self, root: str, include: Sequence[str], exclude: Sequence[str], recursive: bool
    ) -> None:
        self._root = root
        self._include = tuple(include)
        self._exclude = tuple(exclude)
        self._recursive = recursive
        self._listed = beam.metrics.Metrics.counter(METRICS_NAMESPACE, "files_listed")
        self._excluded = beam.metrics.Metrics.counter(METRICS_NAMESPACE, "files_excluded")

    def process(self, task: tuple[str, frozenset]):
        stack = [task]
        while stack:
            rel_dir, ancestors = stack.pop()
            for item in _walk(self._root, rel_dir, ancestors):
                if isinstance(item, FileResult):
                    yield pvalue.TaggedOutput(FAILED, item)
                elif isinstance(item, LocalFile):
                    self._listed.inc()
                    if selected(item.rel, self._include, self._exclude):
                        yield item
                    else:
                        self._excluded.inc()
                elif self._recursive:
                    stack.append(item)
                else:
                    # The root level: hand sub-folders to other workers.
                    yield pvalue.TaggedOutput("folders", item)


class ListLocalFiles(beam.PTransform):
    """Lists a local folder tree, class folders in parallel.

    Args:
        root: the source directory.
        include: globs on the relative path; when given, a file must match one.
        exclude: globs on the relative path; a matching file is left out.

    Returns:
        A dict: ``"files"`` (:class:`LocalFile`) and ``"failed"`` (:class:`FileResult`).
    """

    def __init__(self, root: str, include: Sequence[str] = (), exclude: Sequence[str] = ()) -> None:
        super().__init__()
        self._root = root
        self._include = include
        self._exclude = exclude

    def expand(self, pbegin):
        root_identity = os.stat(self._root)
        top = (
            pbegin
            | "Root"
            >> beam.Create([("", frozenset({(root_identity.st_dev, root_identity.st_ino)}))])
            | "ListRoot"
            >> beam.ParDo(
                _ListLocalFn(self._root, self._include, self._exclude, recursive=False)
            ).with_outputs(FAILED, "folders", main="files")
        )
        # (rel_folder, ancestors): spread so that class folders are walked in parallel.
        below = (
            top.folders
            | "SpreadFolders" >> beam.Reshuffle()
            | "WalkFolders"
            >> beam.ParDo(
                _ListLocalFn(self._root, self._include, self._exclude, recursive=True)
            ).with_outputs(FAILED, main="files")
        )
        return {
            "files": (top.files, below.files) | "AllFiles" >> beam.Flatten(),
            "failed": (top[FAILED], below[FAILED]) | "ListFailures" >> beam.Flatten(),
        }


class _ListObjectsFn(beam.DoFn):
    """(prefix, recursive) -> (rel, RemoteObject) per object; sub-prefixes when not
    recursive, to list them in parallel."""

    def __init__(self, bucket: str, root_prefix: str, config: S3Config | None) -> None:
        self._bucket = bucket
        self._root = root_prefix
        self._config = config

    def process(self, task: tuple[str, bool]):
        prefix, recursive = task
        if recursive:
            items = s3.iter_objects(self._bucket, prefix, self._config)
        else:
            items = s3.list_prefixes(self._bucket, prefix, self._config)
        for item in items:
            if isinstance(item, str):
                yield pvalue.TaggedOutput("prefixes", (item, True))
            else:
                yield item.key[len(self._root) :], RemoteObject(item.size, item.etag)


class ListObjects(beam.PTransform):
    """Lists what ``s3://bucket/prefix`` holds, sub-prefixes in parallel.

    Returns:
        ``(rel, RemoteObject)`` per object, ``rel`` relative to ``prefix``.
    """

    def __init__(self, bucket: str, prefix: str, config: S3Config | None = None) -> None:
        super().__init__()
        self._bucket = bucket
        self._prefix = prefix
        self._config = config

    def expand(self, pbegin):
        fn = _ListObjectsFn(self._bucket, self._prefix, self._config)
        top = (
            pbegin
            | "Prefix" >> beam.Create([(self._prefix, False)])
            | "ListTop" >> beam.ParDo(fn).with_outputs("prefixes", main="objects")
        )
        below = (
            top.prefixes | "SpreadPrefixes" >> beam.Reshuffle() | "ListPrefixes" >> beam.ParDo(fn)
        )
        return (top.objects, below) | "AllObjects" >> beam.Flatten()


class Progress:
    """Files and bytes done against the listed totals, printed to stderr every few
    seconds. One per process: every DoFn instance of a worker adds to it."""

    _instance: Progress | None = None
    _instance_lock = threading.Lock()

    def __init__(self, interval_s: float = 2.0, stream=None) -> None:
        self._lock = threading.Lock()
        self._interval = interval_s
        self._stream = stream
        self.reset("", (0, 0))

    @classmethod
    def shared(cls) -> Progress:
        with cls._instance_lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def reset(self, run_id: str, totals: tuple[int, int]) -> None:
        with self._lock:
            self.run_id = run_id
            self.totals = tuple(totals)
            self.files = self.bytes = 0
            self.started = self._last = time.monotonic()

    def set_totals(self, run_id: str, totals: tuple[int, int]) -> None:
        if (run_id, tuple(totals)) != (self.run_id, self.totals):
            self.reset(run_id, totals)

    def add(self, size: int) -> None:
        with self._lock:
            self.files += 1
            self.bytes += size
            now = time.monotonic()
            if now - self._last < self._interval and self.files != self.totals[0]:
                return
            self._last = now
            line = self.line(now)
        print(line, file=self._stream or sys.stderr, flush=True)

    def line(self, now: float) -> str:
        total_files, total_bytes = self.totals
        elapsed = max(now - self.started, 1e-9)
        rate = self.bytes / elapsed
        left = max(total_bytes - self.bytes, 0)
        eta = f"{left / rate:.0f} s" if rate > 0 else "?"
        return (
            f"[upload] {self.files:,}/{total_files:,} files, "
            f"{self.bytes / 1e6:,.1f}/{total_bytes / 1e6:,.1f} MB, "
            f"{rate / 1e6:.1f} MB/s, {self.files / elapsed:.0f} files/s, ETA {eta}"
        )


def _read_whole(path: str) -> bytes:
    """Reads a file, checking that its size did not change while it was read."""
    with open(path, "rb") as f:
        before = os.fstat(f.fileno()).st_size
        data = f.read()
        after = os.fstat(f.fileno()).st_size
    if not before == after == len(data):
        raise _Changed(
            f"file changed size while being read (stat said {before} bytes, read "
            f"{len(data)}, now {after})"
        )
    return data


def _md5_of_file(path: str) -> tuple[str, bytes, os.stat_result]:
    """Streams a file's MD5; returns it, the first bytes and the stat it belongs to."""
    digest = hashlib.md5()
    with open(path, "rb") as f:
        before = os.fstat(f.fileno())
        head = f.read(_HEAD_BYTES)
        digest.update(head)
        read = len(head)
        while chunk := f.read(1 << 20):
            digest.update(chunk)
            read += len(chunk)
        after = os.fstat(f.fileno())
    if (before.st_size, before.st_mtime_ns) != (after.st_size, after.st_mtime_ns) or (
        read != after.st_size
    ):
        raise _Changed(
            f"file changed while being read (stat said {before.st_size} bytes, read {read})"
        )
    return digest.hexdigest(), head, after


def _error_code(error: Exception) -> str:
    return getattr(error, "response", {}).get("Error", {}).get("Code", "")


class _UploadFn(beam.DoFn):
    """(LocalFile, RemoteObject | None) -> FileResult, many files in flight per worker.

    Each element is handed to a thread pool as it arrives; results are emitted as the
    oldest finish, so a bundle keeps ``concurrency`` uploads running until its end.
    """

    def __init__(self, settings: UploadSettings) -> None:
        self._s = settings
        counter = beam.metrics.Metrics.counter
        self._counters = {
            status: counter(METRICS_NAMESPACE, f"files_{status}")
            for status in ("uploaded", "unchanged", "would_upload", "not_image", FAILED)
        }
        self._bytes_uploaded = counter(METRICS_NAMESPACE, "bytes_uploaded")
        self._retried = counter(METRICS_NAMESPACE, "object_retries")

    def setup(self) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(self._s.concurrency)
        self._progress = Progress.shared()
        self._retries_lock = threading.Lock()

    def teardown(self) -> None:
        self._pool.shutdown()

    def start_bundle(self) -> None:
        self._pending: collections.deque = collections.deque()
        self._retries = 0

    def process(self, item, totals: tuple[int, int]):
        self._progress.set_totals(self._s.run_id, totals)
        self._pending.append(self._pool.submit(self._one, *item))
        window = 4 * self._s.concurrency
        while self._pending and (len(self._pending) >= window or self._pending[0].done()):
            yield self._finish(self._pending.popleft().result())

    def finish_bundle(self):
        while self._pending:
            result = self._finish(self._pending.popleft().result())
            yield WindowedValue(result, MIN_TIMESTAMP, [GlobalWindow()])
        self._retried.inc(self._retries)

    def _finish(self, result: FileResult) -> FileResult:
        self._counters[result.status].inc()
        if result.status == "uploaded":
            self._bytes_uploaded.inc(result.size)
        self._progress.add(result.size)
        return result

    def _one(self, local: LocalFile, remote: RemoteObject | None) -> FileResult:
        """One file, retried as a whole on transient errors; never raises."""
        last = ""
        for attempt in range(self._s.object_attempts):
            if attempt:
                with self._retries_lock:
                    self._retries += 1
                time.sleep(min(5.0, 0.2 * 2**attempt))
            try:
                return self._attempt(local, remote)
            except _Changed as e:
                last = str(e)
            except _TRANSIENT_ERRORS as e:
                last = f"{type(e).__name__}: {e}"
            except botocore.exceptions.ClientError as e:
                if _error_code(e) not in _TRANSIENT_CODES:
                    return FileResult(local.rel, FAILED, local.size, f"S3 refused: {e}")
                last = str(e)
            except OSError as e:
                return FileResult(local.rel, FAILED, local.size, f"{e.strerror or e}")
            except Exception as e:  # noqa: BLE001 - reported per file; the job goes on
                return FileResult(local.rel, FAILED, local.size, f"{type(e).__name__}: {e}")
        attempts = self._s.object_attempts
        return FileResult(local.rel, FAILED, local.size, f"after {attempts} attempts: {last}")

    def _unchanged(self, key: str, size: int, md5: str, remote: RemoteObject | None) -> bool:
        if remote is None or remote.size != size:
            return False
        if remote.etag == md5:
            return True
        # Multipart and SSE-KMS ETags are not MD5s: compare the checksum stored at upload.
        head = s3.client(self._s.config).head_object(Bucket=self._s.bucket, Key=key)
        return head.get("Metadata", {}).get(MD5_METADATA) == md5

    def _attempt(self, local: LocalFile, remote: RemoteObject | None) -> FileResult:
        s = self._s
        path = os.path.join(s.source, *local.rel.split("/"))
        key = s.prefix + local.rel
        size = os.stat(path).st_size
        data = None
        if size <= min(IN_MEMORY_MAX, s.multipart_threshold):
            data = _read_whole(path)
            md5, head, size = hashlib.md5(data).hexdigest(), data[:_HEAD_BYTES], len(data)
        else:
            md5, head, st = _md5_of_file(path)
            size = st.st_size
        mime, is_image = content_type(head, local.rel)
        if s.images_only and not is_image:
            return FileResult(local.rel, "not_image", size)
        if self._unchanged(key, size, md5, remote):
            return FileResult(local.rel, "unchanged", size)
        if s.dry_run:
            return FileResult(local.rel, "would_upload", size)
        extra = {"ContentType": mime, "Metadata": {MD5_METADATA: md5}, **s.extra_args()}
        if data is not None:
            # Content-MD5 makes S3 reject a body damaged on the way.
            content_md5 = base64.b64encode(bytes.fromhex(md5)).decode()
            s3.client(s.config).put_object(
                Bucket=s.bucket, Key=key, Body=data, ContentMD5=content_md5, **extra
            )
        else:
            s3.upload_file(path, s.bucket, key, s.config, s.multipart_threshold, **extra)
            after = os.stat(path)
            if (after.st_size, after.st_mtime_ns) != (st.st_size, st.st_mtime_ns):
                # The object may hold a mix of old and new bytes: never leave it behind.
                s3.client(s.config).delete_object(Bucket=s.bucket, Key=key)
                raise _Changed("file changed while being uploaded")
        return FileResult(local.rel, "uploaded", size)


def _pair(joined) -> Iterator[tuple[LocalFile, RemoteObject | None]]:
    _rel, grouped = joined
    remote = next(iter(grouped["remote"]), None)
    for local in grouped["local"]:
        yield local, remote


class _Totals(beam.CombineFn):
    def create_accumulator(self):
        return 0, 0

    def add_input(self, acc, file: LocalFile):
        return acc[0] + 1, acc[1] + file.size

    def merge_accumulators(self, accs):
        files, size = zip(*accs)
        return sum(files), sum(size)

    def extract_output(self, acc):
        return acc


class UploadFiles(beam.PTransform):
    """Uploads listed files that the destination lacks or holds with other content.

    Args:
        settings: where to, how many in flight, filters, encryption, dry run.
        remote: ``(rel, RemoteObject)`` for what the destination already holds.

    Returns:
        A :class:`FileResult` per file.
    """

    def __init__(self, settings: UploadSettings, remote) -> None:
        super().__init__()
        self._settings = settings
        self._remote = remote

    def expand(self, files):
        totals = files | "Totals" >> beam.CombineGlobally(_Totals())
        keyed = files | "KeyByPath" >> beam.Map(lambda f: (f.rel, f))
        # (LocalFile, RemoteObject | None): only references are grouped, never file bytes.
        pairs = (
            {"local": keyed, "remote": self._remote}
            | "JoinDestination" >> beam.CoGroupByKey()
            | "PairWithObject" >> beam.FlatMap(_pair)
        )
        return pairs | "Upload" >> beam.ParDo(_UploadFn(self._settings), pvalue.AsSingleton(totals))


class _SummaryFn(beam.CombineFn):
    """FileResult -> {"counts", "bytes", "failed": [{key, reason}], "would_upload": [rel]}."""

    def create_accumulator(self):
        return collections.Counter(), collections.Counter(), [], []

    def add_input(self, acc, result: FileResult):
        counts, sizes, failed, would = acc
        counts[result.status] += 1
        sizes[result.status] += result.size
        if result.status == FAILED:
            failed.append({"key": result.rel, "reason": result.reason})
        elif result.status == "would_upload":
            would.append(result.rel)
        return acc

    def merge_accumulators(self, accs):
        counts, sizes, failed, would = self.create_accumulator()
        for c, s, f, w in accs:
            counts.update(c)
            sizes.update(s)
            failed.extend(f)
            would.extend(w)
        return counts, sizes, failed, would

    def extract_output(self, acc):
        counts, sizes, failed, would = acc
        return {
            "counts": dict(sorted(counts.items())),
            "bytes": dict(sorted(sizes.items())),
            "failed": sorted(failed, key=lambda f: f["key"]),
            "would_upload": sorted(would),
        }


class Summarize(beam.PTransform):
    """FileResults -> one summary dict (counts and bytes by status, failures with reasons,
    the files a dry run would upload)."""

    def expand(self, results):
        return results | "Combine" >> beam.CombineGlobally(_SummaryFn())
