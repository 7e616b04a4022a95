"""Upload work without Beam: a local folder tree and an S3 prefix in; a plan of what must
go, one :class:`FileResult` per file and a report summary out.

The upload job plans in the launching process before it imports Beam: it lists the tree
and the destination, and compares every file that has a same-size object by checksum. A
rerun with nothing to do then never starts a pipeline (importing Beam and starting a
runner cost seconds, far more than the comparison). The pipeline's workers upload the
planned files through :class:`Uploader`.

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
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import boto3.exceptions
import botocore.exceptions
from PIL import Image

from s3tfr import s3, storage
from s3tfr.s3 import S3Config

__all__ = [
    "FAILED",
    "MD5_METADATA",
    "FileResult",
    "LocalFile",
    "Plan",
    "RemoteObject",
    "Summary",
    "UploadSettings",
    "Uploader",
    "content_type",
    "plan",
    "selected",
]

FAILED = "failed"
# Stored on every object this job writes; the only checksum a multipart object keeps.
MD5_METADATA = "s3tfr-md5"
# Files up to this size are read once into memory (MD5 and PUT body from one read);
# larger ones stream from disk through the transfer manager.
IN_MEMORY_MAX = 8 * 1024 * 1024
# Threads that list folders and prefixes and compare checksums while planning: enough to
# keep S3 requests (HEAD, listing pages) overlapping, while MD5 uses every core.
PLAN_THREADS = 16
# Same-size files are compared in batches of up to this many files and bytes per task:
# one task per small file spent more CPU handing 16 threads the GIL than hashing it,
# while large files (an MD5 each, and a HEAD when multipart) still go in parallel.
CHECK_BATCH_FILES = 64
CHECK_BATCH_BYTES = 8 * 1024 * 1024
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
# Enough for Pillow to identify every format it knows (JPEG markers may precede SOF).
_HEAD_BYTES = 64 * 1024


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
    sse: str = ""
    sse_kms_key_id: str = ""
    storage_class: str = ""

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
        yield FileResult(
            rel_dir + "/", FAILED, 0, f"cannot list folder: {e.strerror or e}"
        )
        return
    for entry in entries:
        rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
        if not storage.is_utf8(entry.name):
            # S3 keys are UTF-8: no key can mirror this name (a folder: nothing in it).
            shown = storage.printable(rel) + ("/" if entry.is_dir() else "")
            yield FileResult(shown, FAILED, 0, "name is not valid UTF-8: rename it")
            continue
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
                    rel + "/",
                    FAILED,
                    0,
                    "symlink loop: links back to a folder above it",
                )
            else:
                yield rel, ancestors | {identity}
        elif stat.S_ISREG(st.st_mode):
            yield LocalFile(rel, st.st_size)
        else:
            kind = "FIFO" if stat.S_ISFIFO(st.st_mode) else "socket or device"
            yield FileResult(rel, FAILED, 0, f"not a regular file ({kind})")


def _walk_below(root: str, task: tuple[str, frozenset]) -> list[LocalFile | FileResult]:
    """Every file and failure below one folder (depth first, one thread)."""
    found, stack = [], [task]
    while stack:
        for item in _walk(root, *stack.pop()):
            if isinstance(item, (LocalFile, FileResult)):
                found.append(item)
            else:
                stack.append(item)
    return found


def _top_folder(rel: str) -> str:
    """``"cat/a.jpg"`` -> ``"cat"``; ``""`` for a file at the top of the tree."""
    folder, slash, _rest = rel.partition("/")
    return folder if slash else ""


def _remote_objects(
    bucket: str, prefix: str, folder: str, config: S3Config | None
) -> dict[str, RemoteObject]:
    """What the destination holds below one top-level folder of the source (all levels,
    1,000 keys per request), or, for ``folder == ""``, directly under ``prefix``.

    Raises:
        botocore.exceptions.ClientError: the bucket is missing or not readable.
    """
    if folder:
        items = s3.iter_objects(bucket, f"{prefix}{folder}/", config)
    else:
        items = (
            i
            for i in s3.list_prefixes(bucket, prefix, config)
            if not isinstance(i, str)
        )
    return {
        item.key[len(prefix) :]: RemoteObject(item.size, item.etag) for item in items
    }


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


class Uploader:
    """Uploads files of one source tree to one prefix; thread-safe, one per process.

    Args:
        settings: where to, filters, encryption, attempts per file.
        on_retry: called before each repeated whole-file attempt (for a counter).
    """

    def __init__(
        self, settings: UploadSettings, on_retry: Callable[[], None] = lambda: None
    ):
        self._s = settings
        self._on_retry = on_retry

    def path(self, rel: str) -> str:
        return os.path.join(self._s.source, *rel.split("/"))

    def key(self, rel: str) -> str:
        return self._s.prefix + rel

    def upload(self, local: LocalFile) -> FileResult:
        """One file, retried as a whole on transient errors; never raises."""
        last = ""
        for attempt in range(self._s.object_attempts):
            if attempt:
                self._on_retry()
                time.sleep(min(5.0, 0.2 * 2**attempt))
            try:
                return self._attempt(local)
            except _Changed as e:
                last = str(e)
            except _TRANSIENT_ERRORS as e:
                last = f"{type(e).__name__}: {e}"
            except botocore.exceptions.ClientError as e:
                if s3.error_code(e) not in _TRANSIENT_CODES:
                    return FileResult(local.rel, FAILED, local.size, f"S3 refused: {e}")
                last = str(e)
            except OSError as e:
                return FileResult(local.rel, FAILED, local.size, f"{e.strerror or e}")
            except Exception as e:  # noqa: BLE001 - reported per file; the job goes on
                return FileResult(
                    local.rel, FAILED, local.size, f"{type(e).__name__}: {e}"
                )
        attempts = self._s.object_attempts
        return FileResult(
            local.rel, FAILED, local.size, f"after {attempts} attempts: {last}"
        )

    def unchanged(
        self, local: LocalFile, remote: RemoteObject | None
    ) -> FileResult | None:
        """The result for a file the destination already holds with the same size and MD5
        (or, with ``images_only``, a file that is not an image); ``None`` when it must go.

        Any error reading the file also answers ``None``: the upload then retries and
        reports it.
        """
        if remote is None or remote.size != local.size:
            return None
        try:
            md5, head, st = _md5_of_file(self.path(local.rel))
            if self._s.images_only and not content_type(head, local.rel)[1]:
                return FileResult(local.rel, "not_image", st.st_size)
            if st.st_size != remote.size:
                return None
            if remote.etag != md5:
                # Multipart and SSE-KMS ETags are not MD5s: compare the one stored at upload.
                head_object = s3.client(self._s.config).head_object(
                    Bucket=self._s.bucket, Key=self.key(local.rel)
                )
                if head_object.get("Metadata", {}).get(MD5_METADATA) != md5:
                    return None
        except (
            _Changed,
            OSError,
            botocore.exceptions.BotoCoreError,
            botocore.exceptions.ClientError,
        ):
            return None
        return FileResult(local.rel, "unchanged", st.st_size)

    def would_upload(self, local: LocalFile) -> FileResult:
        """A dry run's answer for a file that is to be uploaded (content checked only for
        ``images_only``)."""
        if self._s.images_only:
            try:
                with open(self.path(local.rel), "rb") as f:
                    head = f.read(_HEAD_BYTES)
            except OSError as e:
                return FileResult(local.rel, FAILED, local.size, f"{e.strerror or e}")
            if not content_type(head, local.rel)[1]:
                return FileResult(local.rel, "not_image", local.size)
        return FileResult(local.rel, "would_upload", local.size)

    def _attempt(self, local: LocalFile) -> FileResult:
        s = self._s
        path = self.path(local.rel)
        key = self.key(local.rel)
        size = os.stat(path).st_size
        data = None
        if size <= min(IN_MEMORY_MAX, s.multipart_threshold):
            data = _read_whole(path)
            md5, head, size = (
                hashlib.md5(data).hexdigest(),
                data[:_HEAD_BYTES],
                len(data),
            )
        else:
            md5, head, st = _md5_of_file(path)
            size = st.st_size
        mime, is_image = content_type(head, local.rel)
        if s.images_only and not is_image:
            return FileResult(local.rel, "not_image", size)
        extra = {"ContentType": mime, "Metadata": {MD5_METADATA: md5}, **s.extra_args()}
        if data is not None:
            # Content-MD5 makes S3 reject a body damaged on the way.
            content_md5 = base64.b64encode(bytes.fromhex(md5)).decode()
            s3.client(s.config).put_object(
                Bucket=s.bucket, Key=key, Body=data, ContentMD5=content_md5, **extra
            )
        else:
            s3.upload_file(
                path, s.bucket, key, s.config, s.multipart_threshold, **extra
            )
            after = os.stat(path)
            if (after.st_size, after.st_mtime_ns) != (st.st_size, st.st_mtime_ns):
                # The object may hold a mix of old and new bytes: never leave it behind.
                s3.client(s.config).delete_object(Bucket=s.bucket, Key=key)
                raise _Changed("file changed while being uploaded")
        return FileResult(local.rel, "uploaded", size)


class Summary:
    """Counts and bytes by status, failures with reasons, the files a dry run would
    upload; summaries of parts of a run merge into the run's."""

    def __init__(self, results: Sequence[FileResult] = ()) -> None:
        self.counts: collections.Counter[str] = collections.Counter()
        self.sizes: collections.Counter[str] = collections.Counter()
        self.failed: list[dict[str, str]] = []
        self.would_upload: list[str] = []
        for result in results:
            self.add(result)

    def add(self, result: FileResult) -> Summary:
        self.counts[result.status] += 1
        self.sizes[result.status] += result.size
        if result.status == FAILED:
            self.failed.append({"key": result.rel, "reason": result.reason})
        elif result.status == "would_upload":
            self.would_upload.append(result.rel)
        return self

    def merge(self, other: Summary) -> Summary:
        self.counts.update(other.counts)
        self.sizes.update(other.sizes)
        self.failed.extend(other.failed)
        self.would_upload.extend(other.would_upload)
        return self

    def to_dict(self) -> dict:
        """{"counts", "bytes", "failed": [{key, reason}], "would_upload": [rel]}."""
        return {
            "counts": dict(sorted(self.counts.items())),
            "bytes": dict(sorted(self.sizes.items())),
            "failed": sorted(self.failed, key=lambda f: f["key"]),
            "would_upload": sorted(self.would_upload),
        }


def _batches(
    pairs: list[tuple[LocalFile, RemoteObject]],
) -> Iterator[list[tuple[LocalFile, RemoteObject]]]:
    """Consecutive runs of ``pairs`` within the batch limits (a large file alone)."""
    batch, size = [], 0
    for local, held in pairs:
        if batch and (
            len(batch) == CHECK_BATCH_FILES or size + local.size > CHECK_BATCH_BYTES
        ):
            yield batch
            batch, size = [], 0
        batch.append((local, held))
        size += local.size
    if batch:
        yield batch


def _check_batch(
    uploader: Uploader, batch: list[tuple[LocalFile, RemoteObject]]
) -> list[tuple[LocalFile, FileResult | None]]:
    """:meth:`Uploader.unchanged` for each ``(file, object)`` of a batch."""
    return [(local, uploader.unchanged(local, held)) for local, held in batch]


class Plan(NamedTuple):
    """What a run must upload, and the results already known without uploading."""

    # Largest first: long uploads then overlap the many short ones.
    to_upload: list[LocalFile]
    done: Summary  # unchanged, not images (``images_only``), listing failures, dry run

    @property
    def totals(self) -> tuple[int, int]:
        """Files and bytes to upload, for progress."""
        return len(self.to_upload), sum(f.size for f in self.to_upload)


def plan(
    settings: UploadSettings,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    dry_run: bool = False,
    on_first_upload: Callable[[], None] = lambda: None,
) -> Plan:
    """Lists the source tree and the destination and compares them.

    Each top-level folder of the source is walked, and its counterpart in the
    destination listed, in parallel; objects outside them are never listed (the job
    deletes nothing). Files that have a same-size object are read and compared by MD5 as
    soon as their folder's listing arrives (MD5 runs outside the GIL, on every core). In
    a dry run every other file is answered ``would_upload``.

    Args:
        settings: source, destination and filters.
        include: globs on the relative path; when given, a file must match one.
        exclude: globs on the relative path; a matching file is left out.
        dry_run: answer every file without uploading.
        on_first_upload: called once, as soon as a file is found that must be uploaded
            (not in a dry run), while the rest of the plan goes on.

    Raises:
        botocore.exceptions.ClientError: the bucket is missing or not readable.
    """
    root = settings.source
    uploader = Uploader(settings)
    root_stat = os.stat(root)
    items, folders = [], []
    for item in _walk(root, "", frozenset({(root_stat.st_dev, root_stat.st_ino)})):
        (items if isinstance(item, (LocalFile, FileResult)) else folders).append(item)
    done = Summary()
    to_upload = []

    def must_upload(local: LocalFile) -> None:
        if not to_upload and not dry_run:
            on_first_upload()
        to_upload.append(local)

    with concurrent.futures.ThreadPoolExecutor(PLAN_THREADS) as pool:

        def list_remote(folder: str) -> concurrent.futures.Future:
            return pool.submit(
                _remote_objects,
                settings.bucket,
                settings.prefix,
                folder,
                settings.config,
            )

        listings = {list_remote(rel): rel for rel, _ancestors in folders}
        for found in pool.map(lambda task: _walk_below(root, task), folders):
            items.extend(found)
        by_folder = collections.defaultdict(list)
        for item in items:
            if isinstance(item, FileResult):
                done.add(item)
            elif selected(item.rel, include, exclude):
                by_folder[_top_folder(item.rel)].append(item)
        if by_folder[""]:  # objects directly under the prefix: listed only when needed
            listings[list_remote("")] = ""
        checks = []
        for listing in concurrent.futures.as_completed(listings):
            remote = listing.result()
            same_size = []
            for local in by_folder[listings[listing]]:
                held = remote.get(local.rel)
                if held is not None and held.size == local.size:
                    same_size.append((local, held))
                else:
                    must_upload(local)
            for batch in _batches(same_size):
                checks.append(pool.submit(_check_batch, uploader, batch))
        for check in checks:
            for local, result in check.result():
                if result is None:
                    must_upload(local)
                else:
                    done.add(result)
    if dry_run:
        for local in to_upload:
            done.add(uploader.would_upload(local))
        to_upload = []
    to_upload.sort(key=lambda f: (-f.size, f.rel))
    return Plan(to_upload, done)
