"""Local shard cache shared by processes: manifest shard entries in, verified local paths
out, each held for its reader until the reader is done with it.

Layout under ``cache_dir`` (created 0700)::

    <sha256>.tfrecord          a shard whose bytes matched the manifest's sha256 on download
    <sha256>.json              its publish record: sha256, size, inode and mtime of the file
    <sha256>.lock              the entry's lock file (never holds data)
    unverified/<key>.*         shards fetched with verify="size" or "none", named by the
                               sha256 of (source URI, claimed sha256): never under a content
                               name, so a verifying reader cannot be handed them
    tmp/<bytes>-<id>.part      downloads in flight and damaged files set aside

Names come from 64 validated hex digits, never from the manifest's file name or the S3
key, so no entry can write outside the cache directory.

Sharing (processes on one host, or hosts on one shared filesystem):

- A process holds a shared ``flock`` on an entry's lock file from the moment it has
  verified the file until its reader has read the last record (a reader abandoned
  mid-shard lets go when its dataset's later reads push it out, see :meth:`new_owner`).
  Removing a file (eviction) and publishing one take the lock exclusively and without
  waiting: a file in use is never removed, and nobody waits on a reader. Locks go with
  their process, so a crashed reader pins nothing. On NFS, Linux implements ``flock``
  with byte-range locks that every client sees.
- A download goes to ``tmp/`` under its own exclusive lock (an unlocked, stale part file
  is a dead download and is swept), is checked against the manifest, and is published by
  rename under the entry's exclusive lock: the publish record first, then the file.
- Every hand-out is verified: size, inode and mtime against the publish record and (with
  ``recheck="sha256"``, the default) the whole file hashed again. A file that fails is set
  aside and fetched again, at most ``attempts`` times; then the shard is an error.
- The directory stays within ``max_bytes`` plus the files that readers hold: before a
  download and after a release, least recently used entries (by lock file mtime) that no
  process holds are removed.
"""

from __future__ import annotations

import atexit
import collections
import concurrent.futures
import contextlib
import dataclasses
import fcntl
import hashlib
import itertools
import json
import logging
import os
import queue
import re
import threading
import time
import uuid
import weakref

import botocore.exceptions
import s3transfer.exceptions
from boto3.s3.transfer import TransferConfig

from s3tfr import s3
from s3tfr.contract import MANIFEST, fd_sha256, file_sha256
from s3tfr.manifest import DatasetError, s3_error
from s3tfr.s3 import S3Config

__all__ = ["VERIFY_MODES", "ShardCache", "default_cache_dir"]

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 10 * 1024**3
# Shards downloading at once. The reader opens shards in order and waits for the first:
# four at a time (each with its own ranged parts above ``part_bytes``) got the first
# shard in 0.1 s where eight sharing the link took 0.5 s, and finished all 16 no later.
DEFAULT_WORKERS = 4
DEFAULT_PART_BYTES = 8 * 1024 * 1024
# Tries to get one good copy of a shard (a damaged cached copy, a download that does not
# match the manifest, a copy another process published first each use one).
DEFAULT_ATTEMPTS = 3
# Exclusive holders (publish, evict) keep an entry's lock for a few system calls; a reader
# that waits this long for it is stuck behind a hung process.
LOCK_TIMEOUT_S = 60.0
# A part file this old whose writer holds no lock is a dead download.
STALE_PART_S = 60.0
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_PART_RE = re.compile(r"(\d+)-[0-9a-f]{32}\.part")
VERIFY_MODES = ("sha256", "size", "none")
_RECHECK_MODES = ("sha256", "stat")
_UNVERIFIED = "unverified"
_TMP = "tmp"
_MISSING = "missing"
_RACED = "raced"


def default_cache_dir() -> str:
    """``$TFDATA_READER_CACHE`` or ``~/.cache/tfdata_reader``."""
    return os.environ.get("TFDATA_READER_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "tfdata_reader"
    )


def _check(path: str, entry: dict, verify: str) -> str | None:
    """Returns what is wrong with ``path`` against ``entry``, or ``None``."""
    size = os.path.getsize(path)
    if verify != "none" and size != entry["bytes"]:
        return f"size {size} != {entry['bytes']} in the manifest"
    if verify == "sha256" and (digest := file_sha256(path)) != entry["sha256"]:
        return f"sha256 {digest} != {entry['sha256']} in the manifest"
    return None


def _flock(fd: int, mode: int, timeout_s: float) -> bool:
    """``flock`` with a deadline (0: one try); ``False`` when the lock was not had."""
    deadline = time.monotonic() + timeout_s
    delay = 0.001
    while True:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(delay)
            delay = min(2 * delay, 0.05)


def _open_locked(lock_path: str, mode: int, timeout_s: float) -> int | None:
    """Opens and locks ``lock_path``: the descriptor, or ``None`` if not had in time.

    A remover unlinks the lock file while holding it; whoever opened the old one before
    that finds, once locked, that the name now means another file, and locks that one.
    """
    for _ in range(100):
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            if not _flock(fd, mode, timeout_s):
                os.close(fd)
                return None
            mine = os.fstat(fd)
            now = os.stat(lock_path)
            if (now.st_ino, now.st_dev) == (mine.st_ino, mine.st_dev):
                return fd
        except FileNotFoundError:
            pass
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    raise DatasetError(f"cache lock {lock_path} keeps being replaced: remove the cache dir")


def _close_at_exit(ref: weakref.ref) -> None:
    if (cache := ref()) is not None:
        cache.close()


def _remove(*paths: str) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


class _DaemonPool:
    """A fixed pool of daemon threads running submitted calls, with futures.

    Not ``concurrent.futures.ThreadPoolExecutor``: it joins its threads when the
    interpreter exits, and a download in flight then never ends (s3transfer can no longer
    submit its parts), so a reader that stops mid-epoch (``take(n)``, an error) would
    keep its process from exiting. Threads start with the first calls and end when the
    pool is shut down or collected.
    """

    def __init__(self, workers: int, name: str) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = False
        self._workers = workers
        self._name = name
        self._threads = 0
        self._lock = threading.Lock()
        weakref.finalize(self, _DaemonPool._stop, self._queue, workers)

    def submit(self, fn, *args) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        if self._closed:
            future.cancel()
            return future
        self._queue.put((future, fn, args))
        with self._lock:
            if self._threads < self._workers:
                self._threads += 1
                threading.Thread(
                    target=_DaemonPool._work,
                    args=(self._queue,),
                    name=f"{self._name}-{self._threads}",
                    daemon=True,
                ).start()
        return future

    @staticmethod
    def _work(calls: queue.SimpleQueue) -> None:
        while True:
            future, fn, args = calls.get()
            if future is None:
                return
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = fn(*args)
            except BaseException as e:  # noqa: BLE001 (handed to whoever waits on it)
                with contextlib.suppress(concurrent.futures.InvalidStateError):
                    future.set_exception(e)
            else:
                with contextlib.suppress(concurrent.futures.InvalidStateError):
                    future.set_result(result)
            del future, fn, args

    @staticmethod
    def _stop(calls: queue.SimpleQueue, workers: int) -> None:
        for _ in range(workers):
            calls.put((None, None, None))

    def shutdown(self) -> None:
        """Cancels what has not started; the calls running finish on their own."""
        self._closed = True
        while True:
            try:
                future, _, _ = self._queue.get_nowait()
            except queue.Empty:
                break
            if future is not None:
                future.cancel()
        _DaemonPool._stop(self._queue, self._workers)


@dataclasses.dataclass
class _Held:
    """A cache file this process holds: its lock file's descriptor, locked shared."""

    lock_fd: int
    size: int
    refs: int = 1


class ShardCache:
    """Fetches shards ahead of need into a size-bounded local directory shared by processes.

    Args:
        cache_dir: where shards are kept (created 0700 if missing).
        max_bytes: the cache's size bound; least recently used shards are evicted. Files
            that readers hold can take the directory above it, by their size.
        workers: background threads fetching (or verifying) shards ahead of need.
        part_bytes: shards above this are fetched with concurrent ranged GETs.
        verify: ``"sha256"`` (default), ``"size"`` or ``"none"``: what a download must
            match to be used. Only sha256-checked shards get content names; the others are
            kept apart, under their source URI, and never served to a verifying reader.
        config: S3 client settings; ``None`` uses the standard AWS chain.
        recheck: what each later use checks besides size, inode and mtime against the
            publish record: ``"sha256"`` (default) hashes the whole file again (the shard
            sits on local disk for days); ``"stat"`` only compares those.
        attempts: tries to get a good copy of a shard before it is an error.

    :meth:`get` returns a path and a ticket; the file stays held (never evicted or
    replaced) until :meth:`release` of that ticket.
    """

    def __init__(
        self,
        cache_dir: str | None = None,
        max_bytes: int = DEFAULT_MAX_BYTES,
        workers: int = DEFAULT_WORKERS,
        part_bytes: int = DEFAULT_PART_BYTES,
        verify: str = "sha256",
        config: S3Config | None = None,
        recheck: str = "sha256",
        attempts: int = DEFAULT_ATTEMPTS,
    ) -> None:
        if verify not in VERIFY_MODES:
            raise ValueError(f"verify must be one of {VERIFY_MODES}, not {verify!r}")
        if recheck not in _RECHECK_MODES:
            raise ValueError(f"recheck must be one of {_RECHECK_MODES}, not {recheck!r}")
        if attempts < 1:
            raise ValueError(f"attempts must be >= 1, not {attempts}")
        self.cache_dir = os.path.realpath(cache_dir or default_cache_dir())
        for sub in ("", _UNVERIFIED, _TMP):
            os.makedirs(os.path.join(self.cache_dir, sub), mode=0o700, exist_ok=True)
        self.max_bytes = max_bytes
        self.verify = verify
        self.recheck = recheck if verify == "sha256" else "stat"
        self.attempts = attempts
        self._config = config
        self._transfer = TransferConfig(
            multipart_threshold=part_bytes,
            multipart_chunksize=part_bytes,
            max_concurrency=4,
            use_threads=True,
            # Writes in 1 MiB pieces instead of 256 KiB: a quarter less client CPU per
            # shard (0.45 -> 0.34 CPU-s for 118 MB), CPU the decoders would otherwise get.
            io_chunksize=1024 * 1024,
        )
        self._pool = _DaemonPool(workers, "shard-fetch")
        self._closed = False
        # Before the interpreter finalizes: a reader thread waiting for a fetch then
        # fails at once instead of calling into Python when it no longer can.
        atexit.register(_close_at_exit, weakref.ref(self))
        # Guards the dicts below. A path's own lock is held while it is acquired, so
        # one thread fetches or checks it and eviction (which only tries) skips it.
        self._lock = threading.Lock()
        self._path_locks: dict[str, threading.Lock] = {}
        self._held: dict[str, _Held] = {}
        self._tickets: dict[int, tuple[str, int]] = {}  # ticket -> (path, owner)
        # owner -> (hold limit or None, its tickets, oldest first)
        self._owners: dict[int, tuple[int | None, dict[int, None]]] = {0: (None, {})}
        self._ahead: dict[tuple[int, str], collections.deque] = {}
        self._waiting: weakref.WeakSet = weakref.WeakSet()  # futures not yet collected
        self._parts: set[str] = set()  # this process's downloads in flight
        self._ids = itertools.count(1)
        # Local (non-S3) shards verified in this process: (path, size, mtime).
        self._verified_local: set[tuple[str, int, int]] = set()
        self.stats: collections.Counter = collections.Counter()

    def path_for(self, entry: dict, uri: str = "") -> str:
        """The cache path of a shard, always inside ``cache_dir``.

        ``<cache_dir>/<sha256>.tfrecord`` when this cache verifies sha256; otherwise
        ``<cache_dir>/unverified/<sha256 of uri and the claimed sha256>.tfrecord``.

        Raises:
            ValueError: if the entry's sha256 is not 64 lowercase hex digits.
        """
        digest = entry.get("sha256")
        if not isinstance(digest, str) or not _SHA256_RE.fullmatch(digest):
            raise ValueError(f"refusing shard entry with sha256 {digest!r}")
        if self.verify == "sha256":
            folder, name = self.cache_dir, digest
        else:
            folder = os.path.join(self.cache_dir, _UNVERIFIED)
            key = f"{uri}\n{digest}".encode("utf-8", "surrogateescape")
            name = hashlib.sha256(key).hexdigest()
        path = os.path.join(folder, f"{name}.tfrecord")
        if os.path.dirname(os.path.realpath(path)) != folder:
            raise ValueError(f"cache path {path!r} escapes {folder!r}")
        return path

    def new_owner(self, hold_limit: int) -> int:
        """Registers a reader whose tickets are capped at ``hold_limit``.

        A reader abandoned mid-epoch (``take(n)``, an interrupted loop) never releases
        the shards it was reading; past the cap, the owner's oldest tickets are released,
        so an owner never holds more than ``hold_limit`` files.
        """
        with self._lock:
            owner = next(self._ids)
            self._owners[owner] = (hold_limit, {})
        return owner

    def schedule(self, uri: str, entry: dict, owner: int = 0) -> None:
        """Starts getting ``uri`` ready in the background: fetched, or checked if cached."""
        if not s3.is_s3(uri):
            return
        path = self.path_for(entry, uri)
        future = self._submit(uri, entry, owner)
        with self._lock:
            self._ahead.setdefault((owner, path), collections.deque()).append(future)

    def get(self, uri: str, entry: dict, owner: int = 0) -> tuple[str, int]:
        """A verified local path for the shard, held until ``release(ticket)``.

        Returns:
            ``(path, ticket)``; ticket 0 (a local dataset's own file) needs no release.

        Raises:
            DatasetError: the shard is missing, does not match the manifest after
                ``attempts`` tries, or S3 refused the request.
        """
        if not s3.is_s3(uri):
            return self._local(uri, entry), 0
        path = self.path_for(entry, uri)
        while True:
            if self._closed:
                raise DatasetError(f"{self!r} was closed: cannot read {uri}")
            with self._lock:
                queue = self._ahead.get((owner, path))
                future = queue.popleft() if queue else None
                if queue is not None and not queue:
                    del self._ahead[(owner, path)]
            if future is None:
                future = self._submit(uri, entry, owner)
            ticket = future.result()
            with self._lock:
                if ticket in self._tickets:
                    return path, ticket
            # Fetched ahead for an iteration that was abandoned and since let go.

    def release(self, ticket: int) -> None:
        """Lets go of a file returned by :meth:`get`: the reader is done with it."""
        with self._lock:
            found = self._tickets.pop(ticket, None)
            if found is None:
                return
            path, owner = found
            self._owners[owner][1].pop(ticket, None)
            held = self._held[path]
            held.refs -= 1
            if held.refs:
                return
            del self._held[path]
            os.close(held.lock_fd)
        self._evict(0)

    def close(self) -> None:
        """Stops the background fetches and lets go of every file this cache holds."""
        self._closed = True
        self._pool.shutdown()
        with self._lock:
            waiting, self._waiting = list(self._waiting), weakref.WeakSet()
            self._ahead = {}
        for future in waiting:
            # A fetch may never end now (at exit s3transfer runs nothing more): whoever
            # waits on it is told at once.
            with contextlib.suppress(concurrent.futures.InvalidStateError):
                future.set_exception(DatasetError(f"{self!r} was closed"))
        with self._lock:
            held, self._held = list(self._held.values()), {}
            self._tickets.clear()
            for _, tickets in self._owners.values():
                tickets.clear()
        for item in held:
            os.close(item.lock_fd)

    def __repr__(self) -> str:
        return f"ShardCache({self.cache_dir!r}, max_bytes={self.max_bytes})"

    def _submit(self, uri: str, entry: dict, owner: int) -> concurrent.futures.Future:
        """Acquires in a pool thread: a reader only ever waits on a future, which
        :meth:`close` can end."""
        future = self._pool.submit(self._acquire, uri, entry, owner)
        with self._lock:
            self._waiting.add(future)
        return future

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.stats[name] += n

    @contextlib.contextmanager
    def _path_lock(self, path: str):
        with self._lock:
            lock = self._path_locks.setdefault(path, threading.Lock())
        with lock:
            yield

    def _ticket(self, path: str, owner: int) -> int:
        """A ticket for ``path``, which the caller has just held (one more ref)."""
        with self._lock:
            ticket = next(self._ids)
            self._tickets[ticket] = (path, owner)
            limit, tickets = self._owners[owner]
            tickets[ticket] = None
            over = []
            while limit is not None and len(tickets) > limit:
                oldest = next(iter(tickets))
                del tickets[oldest]
                over.append(oldest)
        for old in over:
            log.debug("letting go of ticket %d: held for an abandoned iteration", old)
            self.release(old)
        return ticket

    def _acquire(self, uri: str, entry: dict, owner: int) -> int:
        path = self.path_for(entry, uri)
        problems: list[str] = []
        for _ in range(self.attempts):
            if self._closed:
                raise DatasetError(f"{self!r} was closed: cannot read {uri}")
            with self._path_lock(path):
                state = self._hold_cached(path, entry)
                if state is None:
                    return self._ticket(path, owner)
                if state is not _MISSING:
                    problems.append(f"cached copy: {state}")
                state = self._fetch(uri, entry, path)
                if state is None:
                    return self._ticket(path, owner)
                if state is not _RACED:
                    problems.append(state)
        seen = "; ".join(dict.fromkeys(problems)) or "other processes kept replacing it"
        raise DatasetError(
            f"shard {uri} does not match {MANIFEST} after {self.attempts} tries "
            f"({seen}): it was modified or damaged after conversion; rerun the convert job"
        )

    def _sidecars(self, path: str) -> tuple[str, str]:
        stem = path.removesuffix(".tfrecord")
        return f"{stem}.json", f"{stem}.lock"

    def _hold_cached(self, path: str, entry: dict) -> str | None:
        """Holds the cached copy of a shard if it is there and sound.

        Returns:
            ``None`` when held, ``_MISSING``, or what was wrong with the copy (which is
            then set aside).
        """
        with self._lock:
            held = self._held.get(path)
            if held is not None:
                held.refs += 1
                self.stats["hits"] += 1
                return None
        if not os.path.exists(path):
            return _MISSING
        record_path, lock_path = self._sidecars(path)
        lock_fd = _open_locked(lock_path, fcntl.LOCK_SH, LOCK_TIMEOUT_S)
        if lock_fd is None:
            raise DatasetError(
                f"cache entry {path} has been locked by another process for "
                f"{LOCK_TIMEOUT_S:.0f} s: a process using this cache_dir is hung; stop it"
            )
        try:
            problem, size = self._check_cached(path, record_path, entry)
            if problem is None:
                os.utime(lock_path)  # the entry's last use, for eviction
                with self._lock:
                    self._held[path] = _Held(lock_fd, size)
                    self.stats["hits"] += 1
                return None
            if problem is not _MISSING:
                # Under the shared lock nobody publishes or evicts this entry, so the
                # file checked is the one moved; the sweep deletes it once unused.
                log.warning("cached shard %s is damaged (%s): fetching it again", path, problem)
                self._count("damaged")
                with contextlib.suppress(FileNotFoundError):
                    os.rename(path, self._part_path(size))
                _remove(record_path)
        except BaseException:
            os.close(lock_fd)
            raise
        os.close(lock_fd)
        return problem

    def _check_cached(self, path: str, record_path: str, entry: dict) -> tuple[str | None, int]:
        """What is wrong with a cached copy (``_MISSING`` if gone), and its size."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return _MISSING, 0
        try:
            st = os.fstat(fd)
            try:
                with open(record_path, "rb") as f:
                    record = json.loads(f.read(4096))
            except (OSError, ValueError):
                return "no valid publish record beside it", st.st_size
            published = (record.get("bytes"), record.get("ino"), record.get("mtime_ns"))
            if published != (st.st_size, st.st_ino, st.st_mtime_ns):
                return "changed since it was published (size, inode or mtime)", st.st_size
            if record.get("sha256") != entry["sha256"] or (
                self.verify == "sha256" and record.get("verified") != "sha256"
            ):
                return "its publish record is for other bytes", st.st_size
            if self.verify != "none" and st.st_size != entry["bytes"]:
                return f"size {st.st_size} != {entry['bytes']} in the manifest", st.st_size
            if self.recheck == "sha256" and (digest := fd_sha256(fd)) != entry["sha256"]:
                return f"sha256 {digest} != {entry['sha256']} in the manifest", st.st_size
            return None, st.st_size
        finally:
            os.close(fd)

    def _part_path(self, size: int) -> str:
        return os.path.join(self.cache_dir, _TMP, f"{size}-{uuid.uuid4().hex}.part")

    def _fetch(self, uri: str, entry: dict, path: str) -> str | None:
        """Downloads, checks and publishes a shard, and holds it.

        Returns:
            ``None`` when published and held, ``_RACED`` when another process published it
            first (this copy is dropped), or what was wrong with the download.
        """
        bucket, key = s3.parse(uri)
        self._evict(entry["bytes"])
        part = self._part_path(entry["bytes"])
        fd = os.open(part, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        with self._lock:
            self._parts.add(part)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # a live download, for other processes' sweeps
            with open(fd, "r+b", closefd=False) as f:
                s3.client(self._config).download_fileobj(bucket, key, f, Config=self._transfer)
            size = os.fstat(fd).st_size
            self._count("downloads")
            self._count("downloaded_bytes", size)
            problem = None
            if self.verify != "none" and size != entry["bytes"]:
                problem = f"size {size} != {entry['bytes']} in the manifest"
            elif self.verify == "sha256" and (digest := fd_sha256(fd)) != entry["sha256"]:
                problem = f"sha256 {digest} != {entry['sha256']} in the manifest"
            if problem:
                self._count("mismatches")
                return problem
            return self._publish(fd, part, path, entry, uri)
        except botocore.exceptions.ClientError as e:
            code = s3.error_code(e)
            if code in ("404", "NoSuchKey", "NotFound"):
                raise DatasetError(
                    f"shard {uri} is listed in {MANIFEST} but missing ({code}): "
                    "the dataset was modified after conversion; rerun the convert job"
                ) from None
            raise s3_error(e, uri) from None
        except botocore.exceptions.BotoCoreError as e:
            raise s3_error(e, uri) from None
        except s3transfer.exceptions.RetriesExceededError as e:
            raise s3_error(e.last_exception, uri) from None
        finally:
            os.close(fd)
            _remove(part)
            with self._lock:
                self._parts.discard(part)

    def _publish(self, fd: int, part: str, path: str, entry: dict, uri: str) -> str | None:
        record_path, lock_path = self._sidecars(path)
        deadline = time.monotonic() + LOCK_TIMEOUT_S
        while (lock_fd := _open_locked(lock_path, fcntl.LOCK_EX, 0)) is None:
            # Held shared: others are checking or reading a copy; once one is there, use it.
            if os.path.exists(path):
                self._count("raced")
                return _RACED
            if time.monotonic() > deadline:
                raise DatasetError(
                    f"cache entry {path} has been locked by another process for "
                    f"{LOCK_TIMEOUT_S:.0f} s: a process using this cache_dir is hung; stop it"
                )
            time.sleep(0.005)
        try:
            if os.path.exists(path):
                self._count("raced")
                os.close(lock_fd)
                return _RACED
            st = os.fstat(fd)
            record = {
                "sha256": entry["sha256"],
                "bytes": st.st_size,
                "verified": self.verify,
                "source": uri,
                "ino": st.st_ino,
                "mtime_ns": st.st_mtime_ns,
            }
            staged = f"{record_path}.new"
            with open(staged, "w") as f:
                json.dump(record, f)
            os.replace(staged, record_path)
            os.rename(part, path)
            # Downgraded in place: removers only ever try without waiting, so none gets
            # in between.
            fcntl.flock(lock_fd, fcntl.LOCK_SH)
            os.utime(lock_path)
            with self._lock:
                self._held[path] = _Held(lock_fd, st.st_size)
            return None
        except BaseException:
            os.close(lock_fd)
            raise

    def _local(self, path: str, entry: dict) -> str:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise DatasetError(
                f"shard {path} is listed in {MANIFEST} but missing: the dataset was "
                "modified after conversion; rerun the convert job"
            ) from None
        key = (path, st.st_size, st.st_mtime_ns)
        if key not in self._verified_local:
            if problem := _check(path, entry, self.verify):
                raise DatasetError(
                    f"shard {path} does not match {MANIFEST} ({problem}): it was "
                    "modified or damaged after conversion; rerun the convert job"
                )
            self._verified_local.add(key)
        return path

    def _scan(self) -> tuple[int, list[tuple[int, int, str]], list[str]]:
        """Bytes in the cache (parts at their final size), entries by last use, dead parts."""
        total, entries, dead = 0, [], []
        for folder in (self.cache_dir, os.path.join(self.cache_dir, _UNVERIFIED)):
            with os.scandir(folder) as items:
                for item in items:
                    if not item.name.endswith(".tfrecord"):
                        continue
                    try:
                        size = item.stat().st_size
                    except FileNotFoundError:
                        continue  # evicted meanwhile by another process
                    try:
                        used = os.stat(self._sidecars(item.path)[1]).st_mtime_ns
                    except FileNotFoundError:
                        used = 0
                    total += size
                    entries.append((used, size, item.path))
        now = time.time()
        with os.scandir(os.path.join(self.cache_dir, _TMP)) as items:
            for item in items:
                match = _PART_RE.fullmatch(item.name)
                if match is None:
                    continue
                total += int(match[1])
                with contextlib.suppress(FileNotFoundError):
                    if now - item.stat().st_mtime > STALE_PART_S:
                        dead.append(item.path)
        entries.sort()
        return total, entries, dead

    def _evict(self, incoming: int) -> None:
        """Removes least recently used entries nobody holds until ``incoming`` more fit."""
        total, entries, dead = self._scan()
        for part in dead:
            with self._lock:
                if part in self._parts:
                    continue
            try:
                fd = os.open(part, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                if _flock(fd, fcntl.LOCK_EX, 0):  # its writer is gone
                    _remove(part)
                    total -= int(_PART_RE.fullmatch(os.path.basename(part))[1])
            finally:
                os.close(fd)
        for _used, size, path in entries:
            if total + incoming <= self.max_bytes:
                break
            with self._lock:
                if path in self._held:
                    continue
                lock = self._path_locks.setdefault(path, threading.Lock())
            if not lock.acquire(blocking=False):
                continue  # being fetched or checked by another thread of this process
            try:
                record_path, lock_path = self._sidecars(path)
                lock_fd = _open_locked(lock_path, fcntl.LOCK_EX, 0)
                if lock_fd is None:
                    continue  # held by another process
                try:
                    _remove(path, record_path, lock_path)
                finally:
                    os.close(lock_fd)
                total -= size
                self._count("evicted")
            finally:
                lock.release()
