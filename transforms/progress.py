"""Progress markers: how far a job's workers got, for the process that launched the job
(no Beam import).

In: counts of finished work per task (a shard, a bundle of files) from workers on any
runner. Out: empty files in a folder that the workers and the launching process both
reach, whose names carry the counts: ``total@<n>``, the planned amount, and
``done/<task>@<n>[@<m>]``, a task's count so far (and a second quantity, such as
bytes). The launching process lists the folder every couple of seconds: names rather
than contents, so one listing request reads a thousand markers on S3.

Why not the runner's metrics: the DirectRunner reports them only once the pipeline has
finished, and each runner that reports them earlier does so through its own interface.
A task's marker is replaced as its count grows, so the folder holds about one marker per
task; a task that runs again (a retried bundle) counts once, by its name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time

from s3tfr import s3, storage
from s3tfr.s3 import S3Config

__all__ = ["UPDATE_S", "ProgressFolder", "TaskProgress"]

_LOG = logging.getLogger(__name__)

# A running task's marker is rewritten at most this often (one small write and one
# delete; on S3 two requests).
UPDATE_S = 2.0
_TOTAL = "total"
_DONE = "done"


@dataclasses.dataclass(frozen=True)
class ProgressFolder:
    """A folder of progress markers (``s3://`` or local); pickles as two plain values."""

    uri: str
    config: S3Config | None = None

    def set_total(self, total: int) -> None:
        """Records the planned amount (written once per worker; the same name each time)."""
        _write(storage.join(self.uri, f"{_TOTAL}@{int(total)}"), self.config)

    def task(self, name: str) -> TaskProgress:
        """The marker writer of one task; ``name`` must be unique within the job."""
        return TaskProgress(self, name)

    def read(self) -> tuple[int | None, tuple[int, ...]]:
        """The planned total (``None`` until a worker wrote it) and the done counts
        summed over tasks, each task counted at its highest marker."""
        total = None
        tasks: dict[str, tuple[int, ...]] = {}
        for rel, _size in storage.walk(self.uri, self.config):
            name, _, counts = rel.partition("@")
            try:
                values = tuple(int(v) for v in counts.split("@"))
            except ValueError:
                continue  # a write's temporary file, or not a marker
            if name == _TOTAL and len(values) == 1:
                total = values[0]
            elif name.startswith(f"{_DONE}/"):
                tasks[name] = max(tasks.get(name, values), values)
        width = max((len(v) for v in tasks.values()), default=1)
        done = tuple(
            sum(v[i] for v in tasks.values() if len(v) > i) for i in range(width)
        )
        return total, done

    def remove(self) -> None:
        """Deletes every marker (the folder, when it is local and then empty)."""
        for rel, _size in list(storage.walk(self.uri, self.config)):
            storage.delete(storage.join(self.uri, rel), self.config)
        for folder in (storage.join(self.uri, _DONE), self.uri):
            if not s3.is_s3(folder):
                with contextlib.suppress(OSError):
                    os.rmdir(folder.removeprefix("file://"))


class TaskProgress:
    """Counts one task's work and keeps its marker current, at most every
    :data:`UPDATE_S` seconds and once more at :meth:`finish`.

    A marker that cannot be written is logged and skipped: progress never fails a job.
    """

    def __init__(self, folder: ProgressFolder, name: str) -> None:
        self._folder = folder
        self._prefix = storage.join(folder.uri, f"{_DONE}/{name}")
        self._written = ""
        self._last = time.monotonic()
        self.counts = [0]

    def add(self, *amounts: int) -> None:
        """Adds to the task's counts (one amount per quantity: items, then bytes)."""
        if len(amounts) > len(self.counts):
            self.counts += [0] * (len(amounts) - len(self.counts))
        for i, amount in enumerate(amounts):
            self.counts[i] += amount
        if time.monotonic() - self._last >= UPDATE_S:
            self._update()

    def finish(self) -> None:
        """Writes the final counts."""
        self._update()

    def _update(self) -> None:
        self._last = time.monotonic()
        uri = self._prefix + "".join(f"@{c}" for c in self.counts)
        if uri == self._written or not _write(uri, self._folder.config):
            return
        if self._written:
            try:
                storage.delete(self._written, self._folder.config)
            except Exception as e:  # noqa: BLE001 - the reader takes the highest marker
                _LOG.debug("progress marker %s not deleted: %s", self._written, e)
        self._written = uri


def _write(uri: str, config: S3Config | None) -> bool:
    try:
        storage.write_bytes(uri, b"", config)
    except Exception as e:  # noqa: BLE001 - progress is never worth failing a job
        _LOG.debug("progress marker %s not written: %s", uri, e)
        return False
    return True
