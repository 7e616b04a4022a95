"""What a job says on stderr: ``-q``/``-v``/``--debug`` in; logging set up for one run out.

At the default verbosity stderr carries the job's own progress and summary lines and
warnings; ``-q`` leaves only errors (the result still goes to stdout); ``-v`` adds INFO records
(Beam's from WARNING up) and the traceback behind a one-line error; ``--debug`` adds
Beam's INFO records and this project's DEBUG records. The chatter of the libraries underneath
is held back below ``-v``: TensorFlow's C++ log (``TF_CPP_MIN_LOG_LEVEL``, when the user
has not set it), TensorFlow's and absl's Python loggers, Python warnings, and Beam's
loggers, which also log a failed worker's traceback before the job reports the failure
in one line.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator, Sequence

from beam_jobs import progress

__all__ = [
    "DEBUG",
    "DEFAULT",
    "FLAGS_HELP",
    "QUIET",
    "VERBOSE",
    "configured",
    "split_verbosity",
]

QUIET, DEFAULT, VERBOSE, DEBUG = range(4)
_FLAGS = {
    "-q": QUIET,
    "--quiet": QUIET,
    "-v": VERBOSE,
    "--verbose": VERBOSE,
    "--debug": DEBUG,
}
# (flags, help) for each job's --help.
FLAGS_HELP = (
    (("-q", "--quiet"), "print only errors and the result (no progress)"),
    (("-v", "--verbose"), "also print INFO logs and the traceback behind an error"),
    (("--debug",), "as -v, with Beam's INFO logs and this tool's DEBUG logs"),
)
_OURS = ("beam_jobs", "transforms", "tfdata_reader", "s3tfr")
# Loggers whose records below the given level are held back at the default verbosity
# and with -q. Beam's: its INFO/WARNING notes about options and workers, and at ERROR
# the traceback of a failed worker, which the job then reports in one line.
_CHATTY = {
    "apache_beam": logging.CRITICAL,
    "tensorflow": logging.ERROR,
    "absl": logging.ERROR,
    "py.warnings": logging.ERROR,
}
# TF_CPP_MIN_LOG_LEVEL per verbosity: 3 drops TensorFlow's C++ errors too (the "failed
# call to cuInit" of a machine without a GPU); a real failure raises in Python anyway.
_TF_CPP_LEVEL = {QUIET: "3", DEFAULT: "3", VERBOSE: "1", DEBUG: "0"}


def split_verbosity(args: Sequence[str]) -> tuple[int, list[str]]:
    """The verbosity that ``-q``/``-v``/``--debug`` ask for (the most verbose one given
    wins), and the arguments without them."""
    given = [_FLAGS[arg] for arg in args if arg in _FLAGS]
    rest = [arg for arg in args if arg not in _FLAGS]
    return (max(given) if given else DEFAULT), rest


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (a live progress bar replaces it
    to print lines above itself)."""

    def __init__(self) -> None:
        logging.Handler.__init__(self)

    @property
    def stream(self):
        return sys.stderr


class _Formatter(logging.Formatter):
    """The job's own INFO lines as they are; anything else as ``job: level: message``
    (with the logger's name from ``-v`` on)."""

    def __init__(self, job: str, verbosity: int) -> None:
        super().__init__()
        self._job = job
        self._verbosity = verbosity

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if record.levelno <= logging.INFO and record.name.startswith("beam_jobs"):
            return text
        level = record.levelname.lower()
        if self._verbosity >= VERBOSE:
            return f"{self._job}: {level} [{record.name}]: {text}"
        return f"{self._job}: {level}: {text}"


@contextlib.contextmanager
def configured(job: str, verbosity: int = DEFAULT) -> Iterator[None]:
    """Sets up logging for one run of ``job``, and puts back what was there after it."""
    root = logging.getLogger()
    levels = {name: logging.getLogger(name).level for name in ("", *_OURS, *_CHATTY)}
    tf_level = os.environ.get("TF_CPP_MIN_LOG_LEVEL")
    if tf_level is None:
        # Read by TensorFlow when it is imported, here and in worker processes.
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = _TF_CPP_LEVEL[verbosity]
    handler = _StderrHandler()
    handler.setFormatter(_Formatter(job, verbosity))
    root.addHandler(handler)
    root.setLevel(logging.ERROR if verbosity == QUIET else
                  logging.WARNING if verbosity == DEFAULT else logging.INFO)  # fmt: skip
    logging.getLogger("beam_jobs").setLevel(
        {QUIET: logging.ERROR, DEFAULT: logging.INFO, VERBOSE: logging.INFO}.get(
            verbosity, logging.DEBUG
        )
    )
    for name in _OURS[1:]:
        logging.getLogger(name).setLevel(
            logging.DEBUG if verbosity == DEBUG else logging.NOTSET
        )
    for name, level in _CHATTY.items():
        logging.getLogger(name).setLevel(
            level if verbosity < VERBOSE else logging.NOTSET
        )
    if verbosity == VERBOSE:  # Beam's INFO records are hundreds of lines per job
        logging.getLogger("apache_beam").setLevel(logging.WARNING)
    logging.captureWarnings(True)
    progress.use_terminal(verbosity > QUIET and sys.stderr.isatty())
    try:
        yield
    finally:
        progress.use_terminal(False)
        logging.captureWarnings(False)
        root.removeHandler(handler)
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        if tf_level is None:
            os.environ.pop("TF_CPP_MIN_LOG_LEVEL", None)
