"""A running job's progress for the person who started it: done / total, rate and ETA.

In: the counts the job's workers leave in a progress folder
(:mod:`transforms.progress`), read every :data:`POLL_S` seconds while the pipeline runs.
Out: on a terminal, a live bar on stderr (``rich``); otherwise one line on the
``beam_jobs.progress`` logger every :data:`LINE_EVERY_S` seconds or 10 % of the work,
and a last one at the end::

    convert: 1,200/4,000 images (30%), 310 images/s, ETA 9.0 s

Nothing is polled or shown when that logger does not show INFO records (``-q``, or a
program that calls the jobs without configuring logging).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator

from s3tfr import storage
from s3tfr.s3 import S3Config
from transforms.progress import ProgressFolder

__all__ = ["LOGGER", "Bar", "temporary_folder", "use_terminal", "watch"]

LOGGER = logging.getLogger("beam_jobs.progress")
POLL_S = 2.0
LINE_EVERY_S = 10.0
_LINE_EVERY_FRACTION = 0.1

# Set by the command line (beam_jobs.logs) when stderr is a terminal: the live bar
# draws there. Unset, progress goes to LOGGER as lines.
_terminal: dict[str, object] = {}


def use_terminal(enabled: bool) -> None:
    """Draws progress as a live bar on stderr (``True``) or logs it as lines."""
    _terminal.clear()
    if enabled:
        from rich.console import Console

        _terminal["console"] = Console(stderr=True)


def _seconds(value: float) -> str:
    value = max(value, 0)
    if value < 10:
        return f"{value:.1f} s"
    if value < 90:
        return f"{value:.0f} s"
    if value < 5400:
        return f"{value / 60:.0f} min"
    return f"{value / 3600:.1f} h"


class Bar:
    """One job's progress: a live bar on ``console`` (a ``rich`` Console), else lines
    on :data:`LOGGER`.

    Args:
        job: the name lines start with (``convert``).
        unit: what is counted (``images``).
        total: the planned amount, when known from the start.
        total_bytes: the planned bytes, when a second count is bytes: the rate and ETA
            are then by bytes (files of very different sizes).
        console: draw a live bar on this console; ``None`` for lines.
        clock: seconds, monotonic (tests pass their own).
    """

    def __init__(
        self,
        job: str,
        unit: str,
        total: int | None = None,
        total_bytes: int | None = None,
        console=None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.job, self.unit = job, unit
        self.total, self.total_bytes = total, total_bytes
        self.done = self.done_bytes = 0
        self._clock = clock
        self._started = clock()
        self._logged_at: float | None = None
        self._logged_step = -1
        self._rich = None
        if console is not None:
            from rich.progress import BarColumn, Progress, TextColumn

            self._rich = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                TextColumn("{task.fields[stats]}"),
                console=console,
                # Printed lines go above the bar: stdout's only when it is the
                # terminal too (otherwise the summary belongs in its own file).
                redirect_stdout=sys.stdout.isatty(),
                redirect_stderr=True,
                refresh_per_second=4,
            )
            self._rich.start()
            self._task = self._rich.add_task(job, total=total, stats=self.stats())
        elif total is not None:
            self._log()

    def update(self, done: int, done_bytes: int = 0, total: int | None = None) -> None:
        """New counts (never going back: a marker read late does not undo progress)."""
        if total is not None and self.total is None:
            self.total = total
        self.done = max(self.done, done)
        self.done_bytes = max(self.done_bytes, done_bytes)
        if self._rich is not None:
            self._rich.update(
                self._task, total=self.total, completed=self.done, stats=self.stats()
            )
        elif self.total is not None:
            self._log()

    def close(self, complete: bool = False) -> None:
        """Ends the display; ``complete``: the job finished, so all planned work is done."""
        if complete and self.total is not None:
            self.done = max(self.done, self.total)
            if self.total_bytes is not None:
                self.done_bytes = max(self.done_bytes, self.total_bytes)
        if self._rich is not None:
            if self.total is None:
                self._rich.remove_task(self._task)
            else:
                self._rich.update(
                    self._task, completed=self.done, stats=self.stats(final=complete)
                )
            self._rich.stop()
        elif self.total is not None and complete:
            LOGGER.info("%s: %s", self.job, self.stats(final=True))

    def stats(self, final: bool = False) -> str:
        """The counts, rate and ETA as text (``1,200/4,000 images (30%), …``)."""
        if self.total is None:
            return "starting"
        text = f"{self.done:,}/{self.total:,} {self.unit}"
        if self.total:
            text += f" ({100 * self.done // self.total}%)"
        if self.total_bytes is not None:
            text += f", {self.done_bytes / 1e6:,.1f}/{self.total_bytes / 1e6:,.1f} MB"
        if not self.done and not final:
            return text
        elapsed = max(self._clock() - self._started, 1e-9)
        rate = f"{self.done / elapsed:,.0f} {self.unit}/s"
        if self.total_bytes is not None:
            rate += f", {self.done_bytes / 1e6 / elapsed:,.1f} MB/s"
        if final:
            return f"{text} in {_seconds(elapsed)}, {rate}"
        if self.total_bytes is not None:
            left, speed = self.total_bytes - self.done_bytes, self.done_bytes / elapsed
        else:
            left, speed = self.total - self.done, self.done / elapsed
        eta = _seconds(left / speed) if speed > 0 else "?"
        return f"{text}, {rate}, ETA {eta}"

    def _log(self) -> None:
        now = self._clock()
        step = int(self.done / self.total / _LINE_EVERY_FRACTION) if self.total else 0
        due = self._logged_at is None or now - self._logged_at >= LINE_EVERY_S
        if (due or step > self._logged_step) and self.done < (self.total or 1):
            self._logged_at, self._logged_step = now, step
            LOGGER.info("%s: %s", self.job, self.stats())


def _poll(folder: ProgressFolder, bar: Bar, stop: threading.Event) -> None:
    while not stop.wait(POLL_S):
        _read_into(folder, bar)


def _read_into(folder: ProgressFolder, bar: Bar) -> None:
    try:
        total, done = folder.read()
    except Exception as e:  # noqa: BLE001 - a failed listing only delays the display
        logging.getLogger(__name__).debug("progress folder not read: %s", e)
        return
    bar.update(done[0], done[1] if len(done) > 1 else 0, total)


@contextlib.contextmanager
def watch(
    job: str,
    folder: ProgressFolder | None,
    unit: str,
    total: int | None = None,
    total_bytes: int | None = None,
    lines: bool = False,
) -> Iterator[ProgressFolder | None]:
    """Shows the progress of the work run in the block, as its workers report it to
    ``folder``, and removes their markers at the end. ``lines``: as log lines even on a
    terminal (a second watch inside another one: a terminal draws one live bar).

    Yields:
        ``folder``, for the workers; ``None`` when nobody would see the progress (the
        workers then write no markers).
    """
    if folder is None or not LOGGER.isEnabledFor(logging.INFO):
        yield None
        return
    console = None if lines else _terminal.get("console")
    bar = Bar(job, unit, total, total_bytes, console=console)
    stop = threading.Event()
    poller = threading.Thread(
        target=_poll, args=(folder, bar, stop), name="s3tfr-progress", daemon=True
    )
    poller.start()
    complete = False
    try:
        yield folder
        complete = True
    finally:
        stop.set()
        poller.join()
        if complete:
            _read_into(folder, bar)
        bar.close(complete)
        try:
            folder.remove()
        except Exception as e:  # noqa: BLE001 - markers left behind are only clutter
            logging.getLogger(__name__).debug("progress markers not removed: %s", e)


@contextlib.contextmanager
def temporary_folder(
    temp_location: str | None = None, config: S3Config | None = None
) -> Iterator[ProgressFolder | None]:
    """A fresh progress folder for :func:`watch`, under ``temp_location`` (Beam's
    ``--temp_location``, which a cluster's workers reach) or else this machine's
    temporary directory (which the workers of a local runner share). ``None`` when
    nobody would see the progress."""
    if not LOGGER.isEnabledFor(logging.INFO):
        yield None
    elif temp_location:
        name = f"s3tfr-progress-{uuid.uuid4().hex[:16]}"
        yield ProgressFolder(storage.join(temp_location, name), config)
    else:
        with tempfile.TemporaryDirectory(prefix="s3tfr-progress-") as path:
            yield ProgressFolder(path)
