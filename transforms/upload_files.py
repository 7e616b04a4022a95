"""The upload stages: planned files in (:class:`~transforms.uploader.LocalFile`, largest
first), one :class:`~transforms.uploader.FileResult` per file out, then one summary.

Listing and comparing happen before the pipeline, in :func:`transforms.uploader.plan`;
``UploadFiles`` spreads the planned files over workers and, per worker, keeps many PUTs
in flight from a thread pool.
"""

from __future__ import annotations

import concurrent.futures
import queue
import threading
import uuid

import apache_beam as beam
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import MIN_TIMESTAMP
from apache_beam.utils.windowed_value import WindowedValue

from transforms.progress import ProgressFolder
from transforms.uploader import (
    FAILED,
    FileResult,
    LocalFile,
    Summary,
    Uploader,
    UploadSettings,
)

__all__ = ["METRICS_NAMESPACE", "Summarize", "UploadFiles"]

METRICS_NAMESPACE = "upload"


class _UploadFn(beam.DoFn):
    """LocalFile -> FileResult, many files in flight per worker.

    Each element is handed to a thread pool as it arrives; results are emitted as the
    oldest finish, so a bundle keeps ``concurrency`` uploads running until its end.
    Files and bytes done are reported per bundle to the progress folder, if any.
    """

    def __init__(self, settings: UploadSettings, progress: ProgressFolder | None) -> None:
        self._s = settings
        self._progress_folder = progress
        counter = beam.metrics.Metrics.counter
        self._counters = {
            status: counter(METRICS_NAMESPACE, f"files_{status}")
            for status in ("uploaded", "not_image", FAILED)
        }
        self._bytes_uploaded = counter(METRICS_NAMESPACE, "bytes_uploaded")
        self._retried = counter(METRICS_NAMESPACE, "object_retries")

    def setup(self) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(self._s.concurrency)
        self._id = uuid.uuid4().hex[:16]
        self._bundles = 0
        self._retries_lock = threading.Lock()
        self._uploader = Uploader(self._s, on_retry=self._count_retry)

    def teardown(self) -> None:
        self._pool.shutdown()

    def start_bundle(self) -> None:
        # Futures land here as they finish, whatever order they were submitted in.
        self._finished: queue.SimpleQueue = queue.SimpleQueue()
        self._in_flight = 0
        self._retries = 0
        self._bundles += 1
        self._progress = None
        if self._progress_folder is not None:
            self._progress = self._progress_folder.task(f"{self._id}-{self._bundles}")

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
        if self._progress is not None:
            self._progress.finish()

    def _finish(self, result: FileResult) -> FileResult:
        self._counters[result.status].inc()
        if result.status == "uploaded":
            self._bytes_uploaded.inc(result.size)
        if self._progress is not None:
            self._progress.add(1, result.size)
        return result


class UploadFiles(beam.PTransform):
    """Uploads planned files, spread over workers, many in flight per worker.

    Args:
        settings: where to, how many in flight, filters, encryption.
        progress: where to report the files and bytes done, if anywhere.

    Returns:
        A :class:`~transforms.uploader.FileResult` per file.
    """

    def __init__(
        self, settings: UploadSettings, progress: ProgressFolder | None = None
    ) -> None:
        super().__init__()
        self._settings = settings
        self._progress = progress

    def expand(self, files):
        return files | "Upload" >> beam.ParDo(_UploadFn(self._settings, self._progress))


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
