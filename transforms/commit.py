"""Who may write a dataset prefix, and which files the dataset owns (no Beam import).

In: an output prefix (``s3://bucket/prefix`` or a local directory). Out: a lease that one
convert run at a time holds on the prefix, the record of the files the dataset owns, and
the manifest's commit, which fails rather than overwrite another run's.

A convert run goes through these steps (everything it keeps lives under ``OUT/.s3tfr/``):

1. :meth:`Lease.acquire` creates ``OUT/.s3tfr/lock.json`` exclusively (S3: a PUT with
   ``If-None-Match: *``; locally a hard link, which fails when the name exists) and a
   thread renews it while the run lasts. A second run finds it held and stops before it
   writes anything (:class:`OutputBusy`). A lease whose holder is gone (on this host: its
   process is dead; anywhere: not renewed for :data:`LEASE_S`) is taken over with a
   conditional write, so one of several waiting runs gets it.
2. :meth:`Lease.prepare` records what the dataset owns before anything changes: the
   shards its committed manifest lists, plus what interrupted runs recorded; then it
   removes the manifest, so the prefix no longer looks complete, and TensorFlow
   Datasets' metadata (:mod:`transforms.tfds_metadata`), so TFDS does not read shards
   that are being replaced.
3. The shard writer marks each shard's name (:func:`mark_written`) before it moves the
   shard in, so the shards of a run that dies are recognisably this tool's; a run that
   lost its lease stops there.
4. :func:`finish` deletes the stale files (owned or marked, and not in the new manifest),
   writes the metadata files (labels, rejections, TFDS's), creates the manifest
   exclusively (``If-None-Match: *`` / a hard link: it was removed in step 2, so another
   run's manifest makes the create fail), checks the lease once more, and removes the
   run's records. The job then releases the lease.

Nothing else under ``OUT`` is ever deleted: a file that merely looks like a shard is the
user's. Conditional writes need an S3 that honours ``If-None-Match`` and ``If-Match`` on
PUT (AWS since 2024, MinIO, moto); on a store that ignores them two runs started within
the same moment could both take the lease.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import functools
import hashlib
import json
import logging
import os
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator

import botocore.exceptions

from s3tfr import s3, storage
from s3tfr.contract import LEGACY_MANIFEST, MANIFEST, SHARD_NAME_RE, index_name
from s3tfr.manifest import is_manifest
from s3tfr.s3 import S3Config
from transforms.tfds_metadata import TFDS_FILES

__all__ = [
    "LEASE_S",
    "RENEW_S",
    "ForeignFile",
    "Lease",
    "LeaseLost",
    "ManifestConflict",
    "OutputBusy",
    "OutputRun",
    "create_exclusive",
    "finish",
    "mark_written",
]

_LOG = logging.getLogger(__name__)

STATE_DIR = ".s3tfr"
LOCK = f"{STATE_DIR}/lock.json"
RUNS = f"{STATE_DIR}/runs"
# A lease not renewed for this long is taken over (its holder's clock and the taker's
# must agree to well within it); it is renewed every RENEW_S while its run lasts.
LEASE_S = 300
RENEW_S = 30
_CONFLICT_CODES = ("PreconditionFailed", "ConditionalRequestConflict", "412", "409")


class OutputBusy(Exception):
    """Another live run holds the output prefix."""


class LeaseLost(RuntimeError):
    """This run's lease was taken over (it stalled beyond the lease): it must not commit."""


@dataclasses.dataclass(frozen=True)
class OutputRun:
    """What the pipeline's workers need to know of the run that writes ``output``."""

    output: str
    run_id: str
    config: S3Config | None = None
    # convert --append: the committed manifest stays until this run replaces it (no
    # committed shard changes before then), and is replaced only if it is still the one
    # this run started from.
    append: bool = False

    def uri(self, name: str) -> str:
        return storage.join(self.output, name)

    @property
    def records(self) -> str:
        """This run's records: ``owned.json`` and the ``written/`` markers."""
        return self.uri(f"{RUNS}/{self.run_id}")

    @property
    def progress(self) -> str:
        """Where this run's workers report progress (:mod:`transforms.progress`): beside
        its records, so that it outlives their removal at the commit until the job has
        read it, and a later run removes what an interrupted one left (as it removes
        every other run's folder)."""
        return self.uri(f"{RUNS}/{self.run_id}.progress")


def create_exclusive(uri: str, data: bytes, config: S3Config | None = None) -> str:
    """Writes ``data`` at ``uri`` only if nothing is there; complete or not at all.

    Returns:
        The new object's ETag (S3) or ``""`` (local).

    Raises:
        FileExistsError: something is already at ``uri``.
    """
    if s3.is_s3(uri):
        bucket, key = s3.parse(uri)
        try:
            reply = s3.client(config).put_object(
                Bucket=bucket, Key=key, Body=data, IfNoneMatch="*"
            )
        except botocore.exceptions.ClientError as e:
            if s3.error_code(e) in _CONFLICT_CODES:
                raise FileExistsError(uri) from None
            raise
        return reply["ETag"]
    path = uri.removeprefix("file://")
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    # Written in full under a private name, then linked in: a link fails when the name
    # exists, and a reader never sees a partial file.
    with tempfile.NamedTemporaryFile(dir=folder, prefix=".s3tfr-", delete=False) as f:
        f.write(data)
    try:
        os.chmod(f.name, 0o644)
        os.link(f.name, path)
    finally:
        os.remove(f.name)
    return ""


def _read(uri: str, config: S3Config | None) -> tuple[bytes, str] | None:
    """(bytes, ETag) of ``uri``, or ``None`` when it does not exist."""
    if s3.is_s3(uri):
        bucket, key = s3.parse(uri)

        def _get() -> tuple[bytes, str]:
            reply = s3.client(config).get_object(Bucket=bucket, Key=key)
            return reply["Body"].read(), reply["ETag"]

        try:
            return s3.body_retries(_get)
        except botocore.exceptions.ClientError as e:
            if s3.error_code(e) in ("NoSuchKey", "404", "NotFound"):
                return None
            raise
    try:
        return storage.read_bytes(uri), ""
    except FileNotFoundError:
        return None


def _replace_if(uri: str, data: bytes | None, etag: str, config: S3Config | None) -> str:
    """Replaces (or, with ``data`` None, deletes) ``uri`` if it still has ``etag``.

    Locally the caller holds :func:`_guard`, which makes read-then-write one step.

    Raises:
        LeaseLost: the object changed since it was read with ``etag``.
    """
    if not s3.is_s3(uri):
        if data is None:
            storage.delete(uri)
        else:
            storage.write_bytes(uri, data)
        return ""
    bucket, key = s3.parse(uri)
    try:
        if data is None:
            s3.client(config).delete_object(Bucket=bucket, Key=key, IfMatch=etag)
            return ""
        reply = s3.client(config).put_object(Bucket=bucket, Key=key, Body=data, IfMatch=etag)
    except botocore.exceptions.ClientError as e:
        if s3.error_code(e) in (*_CONFLICT_CODES, "NoSuchKey", "404"):
            raise LeaseLost(f"{uri} changed under this run") from None
        raise
    return reply["ETag"]


@contextlib.contextmanager
def _guard(run: OutputRun) -> Iterator[None]:
    """Locally, an exclusive ``flock`` on the output folder around a read-then-write of
    the lease (not on ``OUT/.s3tfr``, which a finished run removes: a lock on a removed
    folder excludes no one); S3 needs none (its writes are conditional)."""
    if s3.is_s3(run.output):
        yield
        return
    output = run.output.removeprefix("file://")
    folder = run.uri(STATE_DIR).removeprefix("file://")
    os.makedirs(folder, exist_ok=True)
    # Records are deleted under these folders: a link would point the deletes elsewhere.
    for path in (folder, os.path.join(folder, "runs")):
        if os.path.islink(path):
            raise OSError(f"{path} is a symbolic link, not this tool's folder: remove it")
    fd = os.open(output, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _process_start(pid: int) -> str:
    """The start time of a process on this host (Linux), to tell a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError):
        return ""


def _holder(data: bytes) -> dict | None:
    """A lease file's fields, or ``None`` when it is not one this tool wrote (garbage,
    wrong types): such a lease is taken over like an expired one."""
    try:
        holder = json.loads(data)
        valid = (
            isinstance(holder, dict)
            and all(isinstance(holder.get(k), int | float) and abs(holder[k]) < 1e12
                    for k in ("started", "renewed", "expires"))
            and isinstance(holder.get("pid"), int) and 0 < holder["pid"] < 2**31
            and all(isinstance(holder.get(k), str) for k in ("run_id", "host", "pid_start"))
        )  # fmt: skip
    except ValueError:
        return None
    return holder if valid else None


def _holder_gone(holder: dict | None) -> bool:
    """Whether a lease's holder certainly no longer runs: on this host, its process is
    gone (or its pid now names another process); anywhere, the lease expired."""
    if holder is None or time.time() > holder["expires"]:
        return True
    if holder["host"] != socket.gethostname():
        return False
    pid = holder["pid"]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # alive, someone else's
    return bool(holder["pid_start"]) and holder["pid_start"] != _process_start(pid)


def _when(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


class Lease:
    """One convert run's hold on an output prefix (see the module docstring).

    Use as a context manager: ``with Lease(output, config) as run:`` acquires, renews in
    the background, and releases at the end, whether the run succeeded or not.
    """

    def __init__(
        self, output: str, config: S3Config | None = None, append: bool = False
    ) -> None:
        self.run = OutputRun(output, uuid.uuid4().hex[:16], config, append)
        self._etag = ""
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None
        self._started = time.time()
        self._acquired = False
        self.lost = False

    def _content(self) -> bytes:
        now, pid = time.time(), os.getpid()
        return json.dumps({
            "run_id": self.run.run_id, "host": socket.gethostname(), "pid": pid,
            "pid_start": _process_start(pid), "started": self._started, "renewed": now,
            "expires": now + LEASE_S,
        }).encode()  # fmt: skip

    def acquire(self) -> OutputRun:
        """Takes the lease, then records what the dataset owns (:meth:`prepare`).

        Raises:
            OutputBusy: another live run holds it; nothing was written.
        """
        run, lock = self.run, self.run.uri(LOCK)
        with _guard(run):
            try:
                self._etag = create_exclusive(lock, self._content(), run.config)
            except FileExistsError:
                self._take_over(lock)
        self._acquired = True
        self._renewer = threading.Thread(target=self._renew, name="s3tfr-lease", daemon=True)
        self._renewer.start()
        try:
            self.prepare()
        except BaseException:
            self.release()  # taken, but the records could not be written
            raise
        return run

    def _take_over(self, lock: str) -> None:
        found = _read(lock, self.run.config)
        if found is None:  # released since: try once more
            try:
                self._etag = create_exclusive(lock, self._content(), self.run.config)
            except FileExistsError:
                raise OutputBusy(
                    f"another convert run took the lease on {self.run.output} first"
                ) from None
            return
        data, etag = found
        holder = _holder(data)
        if holder is not None and not _holder_gone(holder):
            age = time.time() - holder["renewed"]
            raise OutputBusy(
                f"another convert run is writing {self.run.output} (run "
                f"{holder['run_id']} on {holder['host']}, pid {holder['pid']}, "
                f"started {_when(holder['started'])}, lease renewed {age:.0f} s ago): "
                f"wait for it to finish; if it is gone, its lease is taken over "
                f"{LEASE_S} s after its last renewal (or delete {lock})"
            )
        _LOG.warning(
            "taking over the lease of run %s on %s (gone or expired)",
            holder["run_id"] if holder else "?",
            holder["host"] if holder else "?",
        )
        try:
            self._etag = _replace_if(lock, self._content(), etag, self.run.config)
        except LeaseLost:
            raise OutputBusy(
                f"another convert run took over the lease on {self.run.output} first"
            ) from None

    def _renew(self) -> None:
        while not self._stop.wait(RENEW_S):
            try:
                with _guard(self.run):
                    if not held(self.run):
                        raise LeaseLost(self.run.output)
                    self._etag = _replace_if(
                        self.run.uri(LOCK), self._content(), self._etag, self.run.config
                    )
            except LeaseLost:
                self.lost = True
                _LOG.error("lost the lease on %s: this run will not commit", self.run.output)
                return
            except Exception as e:  # noqa: BLE001 - transient: the next renewal tries again
                _LOG.warning("could not renew the lease on %s: %s", self.run.output, e)

    def prepare(self) -> None:
        """Records what the dataset owns in this run's ``owned.json``, folds in the
        records of interrupted runs, then removes the manifest and TFDS's metadata (in the
        older layout, ``dataset_info.json`` was the manifest)."""
        run = self.run
        owned = set(_manifest_shards(run))
        runs_root = run.uri(RUNS)
        others = set()
        for rel, _size in storage.walk(runs_root, run.config):
            other, _, rest = rel.partition("/")
            if other == run.run_id:
                continue
            others.add(other)
            if rest == "owned.json":
                owned.update(_names(storage.read_bytes(storage.join(runs_root, rel), run.config)))
            elif rest.startswith("written/"):
                owned.add(rest.removeprefix("written/"))
        storage.write_bytes(
            storage.join(run.records, "owned.json"),
            json.dumps(sorted(owned)).encode(),
            run.config,
        )
        for other in sorted(others):
            _delete_tree(storage.join(runs_root, other), run.config)
        if run.append:
            # What the commit replaces: the manifest as this run found it.
            found = _read(run.uri(MANIFEST), run.config)
            base = {"etag": found[1], "sha256": hashlib.sha256(found[0]).hexdigest()} if found else {}
            storage.write_bytes(
                storage.join(run.records, "base.json"), json.dumps(base).encode(), run.config
            )
            return
        storage.delete(run.uri(MANIFEST), run.config)
        for name in TFDS_FILES:
            storage.delete(run.uri(name), run.config)

    def release(self) -> None:
        """Stops renewing and deletes the lease if it is still this run's."""
        if not self._acquired:
            return
        self._acquired = False
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        with _guard(self.run):
            if not self.lost and held(self.run):
                try:
                    _replace_if(self.run.uri(LOCK), None, self._etag, self.run.config)
                except LeaseLost:
                    pass
            if not s3.is_s3(self.run.output):
                with contextlib.suppress(OSError):  # only when empty
                    os.rmdir(self.run.uri(RUNS).removeprefix("file://"))
                    os.rmdir(self.run.uri(STATE_DIR).removeprefix("file://"))

    def __enter__(self) -> OutputRun:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def held(run: OutputRun) -> bool:
    """Whether ``run`` still holds the lease on its output."""
    found = _read(run.uri(LOCK), run.config)
    if found is None:
        return False
    try:
        return json.loads(found[0]).get("run_id") == run.run_id
    except (ValueError, AttributeError):
        return False


def _names(data: bytes) -> list[str]:
    try:
        names = json.loads(data)
    except ValueError:
        return []
    return [n for n in names if isinstance(n, str)] if isinstance(names, list) else []


def _manifest_shards(run: OutputRun) -> list[str]:
    """The shard files the committed manifest lists (none when there is none); in the
    older layout the manifest is ``dataset_info.json``, now TFDS's name."""
    found, legacy = _read(run.uri(MANIFEST), run.config), False
    if found is None:
        found, legacy = _read(run.uri(LEGACY_MANIFEST), run.config), True
    if found is None:
        return []
    try:
        manifest = json.loads(found[0])
        if legacy and not is_manifest(manifest):
            return []  # TFDS's metadata, left by a run that did not commit
        splits = manifest.get("splits", {})
        files = [s.get("file") for split in splits.values() for s in split.get("shards", [])]
    except (ValueError, AttributeError, TypeError):
        return []
    return [f for f in files if isinstance(f, str) and SHARD_NAME_RE.fullmatch(f)]


def _delete_tree(uri: str, config: S3Config | None) -> None:
    for rel, _size in list(storage.walk(uri, config)):
        storage.delete(storage.join(uri, rel), config)
    if not s3.is_s3(uri):
        local = uri.removeprefix("file://")
        for dirpath, _dirs, _files in sorted(os.walk(local), reverse=True):
            with contextlib.suppress(OSError):
                os.rmdir(dirpath)


class ManifestConflict(FileExistsError):
    """Another run committed a manifest while this one ran."""


class ForeignFile(RuntimeError):
    """A file this run would replace is not the dataset's (the user's own)."""


def _check_held(run: OutputRun) -> None:
    if not held(run):
        raise LeaseLost(
            f"this run no longer holds the lease on {run.output} (it stalled and another "
            "run took it over): stopping without writing; rerun the convert job"
        )


@functools.lru_cache(maxsize=8)
def _owned(run: OutputRun) -> frozenset[str]:
    found = _read(storage.join(run.records, "owned.json"), run.config)
    return frozenset(_names(found[0])) if found else frozenset()


def mark_written(run: OutputRun, name: str) -> None:
    """Records that this run is about to put ``name`` under the output.

    Raises:
        LeaseLost: the run no longer holds the output (it stalled beyond its lease and
            another run took over): it must not write there any more.
        ForeignFile: a file named ``name`` is there that neither the dataset owned nor
            this run wrote: the user's own, which is never replaced.
    """
    _check_held(run)
    marker = storage.join(run.records, f"written/{name}")
    if (
        name not in _owned(run)
        and storage.exists(run.uri(name), run.config)
        and not storage.exists(marker, run.config)
    ):
        raise ForeignFile(
            f"{run.uri(name)} exists and is not a file of this dataset: the convert job "
            "never replaces files it did not write; move it, or choose another --output "
            "or --num_shards"
        )
    storage.write_bytes(marker, b"", run.config)


def stale_files(run: OutputRun, keep: set[str]) -> list[str]:
    """Files the dataset owned or this run wrote that the new manifest does not list."""
    found = _read(storage.join(run.records, "owned.json"), run.config)
    owned = set(_names(found[0])) if found else set()
    written = storage.join(run.records, "written")
    owned.update(rel for rel, _size in storage.walk(written, run.config))
    # Only plain shard names: nothing recorded can point outside the prefix.
    return sorted(n for n in owned - keep if SHARD_NAME_RE.fullmatch(n))


def finish(
    run: OutputRun, keep: set[str], files: dict[str, bytes], manifest: bytes
) -> None:
    """Deletes stale files, writes ``files`` (name -> bytes: labels, rejections), commits
    ``manifest`` and removes this run's records. An append (``run.append``) replaces the
    manifest it started from, and only then writes ``files`` and deletes the shards it
    replaced, so the dataset stays readable and consistent throughout.

    Raises:
        LeaseLost: another run holds the prefix now; nothing was written.
        ManifestConflict: another run committed a manifest meanwhile.
    """
    _check_held(run)
    stale = stale_files(run, keep)
    if not run.append:
        _delete_shards(run, stale)
        _write_files(run, files)
    _check_held(run)
    manifest_uri = run.uri(MANIFEST)
    if run.append:
        etag = _replace_base(run, manifest)
    else:
        try:
            etag = create_exclusive(manifest_uri, manifest, run.config)
        except FileExistsError:
            raise ManifestConflict(
                f"another run committed {manifest_uri} while this one ran: not overwriting it"
            ) from None
    if not held(run):
        # Taken over between the check and the create: the new holder may already be
        # rewriting shards, so this manifest must not stand.
        with _guard(run), contextlib.suppress(LeaseLost):
            _replace_if(manifest_uri, None, etag, run.config)
        raise LeaseLost(f"lost the lease on {run.output} while committing; rerun the job")
    if run.append:
        # After the manifest: until it is replaced, TFDS's files and rejected.jsonl
        # describe the committed dataset, whose shards are all still there.
        _write_files(run, files)
        _delete_shards(run, stale)
    _delete_tree(run.records, run.config)


def _write_files(run: OutputRun, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        _check_held(run)  # a run that lost the prefix must not touch another's files
        storage.write_bytes(run.uri(name), data, run.config)


def _delete_shards(run: OutputRun, names: list[str]) -> None:
    """Deletes shards, each with its key index."""
    for name in names:
        storage.delete(run.uri(name), run.config)
        storage.delete(run.uri(index_name(name)), run.config)


def _replace_base(run: OutputRun, manifest: bytes) -> str:
    """Replaces the manifest an append started from with ``manifest``; creates it where
    there was none. Returns the new manifest's ETag (S3) or ``""``.

    Raises:
        ManifestConflict: the manifest is no longer the one the run started from.
    """
    uri = run.uri(MANIFEST)
    found = _read(storage.join(run.records, "base.json"), run.config)
    base = json.loads(found[0]) if found else {}
    conflict = ManifestConflict(
        f"{uri} changed while this append ran (another run committed): not overwriting it"
    )
    if not base.get("sha256"):
        try:
            return create_exclusive(uri, manifest, run.config)
        except FileExistsError:
            raise conflict from None
    with _guard(run):
        current = _read(uri, run.config)
        if current is None or hashlib.sha256(current[0]).hexdigest() != base["sha256"]:
            raise conflict
        try:
            return _replace_if(uri, manifest, base["etag"], run.config)
        except LeaseLost:
            raise conflict from None
