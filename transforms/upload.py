"""The upload stages: planned files in (:class:`~transforms.uploader.LocalFile`, largest
first), one :class:`~transforms.uploader.FileResult` per file out, then one summary.

Listing and comparing happen before the pipeline, in :func:`transforms.uploader.plan`;
``UploadFiles`` spreads the planned files over workers and, per worker, keeps many PUTs
in flight from a thread pool.
"""

from __future__ import annotations

import concurrent.futures
import queue
import sys
import threading
import time

import apache_beam as beam
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import MIN_TIMESTAMP
from apache_beam.utils.windowed_value import WindowedValue

from transforms.uploader import (
    FAILED,
    FileResult,
    LocalFile,
    Summary,
    Uploader,
    UploadSettings,
)

__all__ = ["METRICS_NAMESPACE", "Progress", "Summarize", "UploadFiles"]

METRICS_NAMESPACE = "upload"


class Progress:
    """Files and bytes done against the planned totals, printed to stderr every few
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


class _UploadFn(beam.DoFn):
    """LocalFile -> FileResult, many files in flight per worker.

    Each element is handed to a thread pool as it arrives; results are emitted as the
    oldest finish, so a bundle keeps ``concurrency`` uploads running until its end.
    """

    def __init__(self, settings: UploadSettings, totals: tuple[int, int]) -> None:
        self._s = settings
        self._totals = totals
        counter = beam.metrics.Metrics.counter
        self._counters = {
            status: counter(METRICS_NAMESPACE, f"files_{status}")
            for status in ("uploaded", "not_image", FAILED)
        }
        self._bytes_uploaded = counter(METRICS_NAMESPACE, "bytes_uploaded")
        self._retried = counter(METRICS_NAMESPACE, "object_retries")

    def setup(self) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(self._s.concurrency)
        self._progress = Progress.shared()
        self._retries_lock = threading.Lock()
        self._uploader = Uploader(self._s, on_retry=self._count_retry)

    def teardown(self) -> None:
        self._pool.shutdown()

    def start_bundle(self) -> None:
        # Futures land here as they finish, whatever order they were submitted in.
        self._finished: queue.SimpleQueue = queue.SimpleQueue()
        self._in_flight = 0
        self._retries = 0
        self._progress.set_totals(self._s.run_id, self._totals)

    def _count_retry(self) -> None:
        # Called from pool threads, where Beam's metrics container is not set: counted
        # here and added to the counter on the bundle's thread.
        with self._retries_lock:
            self._retries += 1

    def process(self, local: LocalFile):
        self._pool.submit(self._uploader.upload, local).add_done_callback(
            self._finished.put
        )
        self._in_flight += 1
        # Results leave as they finish, so a long upload (a big file goes first) never
        # holds back the window; past the window, wait for the next one to finish.
        while self._in_flight >= 4 * self._s.concurrency or not self._finished.empty():
            self._in_flight -= 1
            yield self._finish(self._finished.get().result())

    def finish_bundle(self):
        while self._in_flight:
            self._in_flight -= 1
            result = self._finish(self._finished.get().result())
            yield WindowedValue(result, MIN_TIMESTAMP, [GlobalWindow()])
        with self._retries_lock:
            if self._retries:  # a zero would show as a counter on some runners only
                self._retried.inc(self._retries)

    def _finish(self, result: FileResult) -> FileResult:
        self._counters[result.status].inc()
        if result.status == "uploaded":
            self._bytes_uploaded.inc(result.size)
        self._progress.add(result.size)
        return result


class UploadFiles(beam.PTransform):
    """Uploads planned files, spread over workers, many in flight per worker.

    Args:
        settings: where to, how many in flight, filters, encryption.
        totals: files and bytes planned, for progress.

    Returns:
        A :class:`~transforms.uploader.FileResult` per file.
    """

    def __init__(self, settings: UploadSettings, totals: tuple[int, int]) -> None:
        super().__init__()
        self._settings = settings
        self._totals = totals

    def expand(self, files):
        return files | "Upload" >> beam.ParDo(_UploadFn(self._settings, self._totals))


class _SummaryFn(beam.CombineFn):
    """FileResult -> the report's summary dict, merged with what the plan decided."""

    def __init__(self, planned: Summary) -> None:
        self._planned = planned

    def create_accumulator(self) -> Summary:
        return Summary()

    def add_input(self, acc: Summary, result: FileResult) -> Summary:
        return acc.add(result)

    def merge_accumulators(self, accs) -> Summary:
        merged = Summary()
        for acc in accs:
            merged.merge(acc)
        return merged

    def extract_output(self, acc: Summary) -> dict:
        return Summary().merge(acc).merge(self._planned).to_dict()


class Summarize(beam.PTransform):
    """FileResults -> one summary dict (counts and bytes by status, failures with reasons,
    the files a dry run would upload), including the results the plan already knew.

    Args:
        planned: the plan's summary (unchanged files, listing failures …).
    """

    def __init__(self, planned: Summary) -> None:
        super().__init__()
        self._planned = planned

    def expand(self, results):
        return results | "Combine" >> beam.CombineGlobally(_SummaryFn(self._planned))
