"""What every job shares: option handling, user-facing errors, and the summary output."""

from __future__ import annotations

import argparse
import atexit
import functools
import gc
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from transforms.s3 import DEFAULT_MAX_ATTEMPTS, S3Config

if TYPE_CHECKING:
    from apache_beam.options.pipeline_options import PipelineOptions

# Beam is imported inside the functions that need it, so that a job can use this module
# before it decides to import Beam (the upload job plans without it).

__all__ = [
    "UserError",
    "add_shared_argument",
    "cli_main",
    "counters",
    "pipeline_options",
    "s3_config",
]

# Beam knows DaskRunner only by its module path, and its own DaskRunner mixes a ParDo's
# tagged outputs (every job has some) and reports no metrics: both names run the fixed
# subclass in beam_jobs/dask_runner.py.
DASK_RUNNER = "beam_jobs.dask_runner.DaskRunner"
RUNNER_ALIASES = {
    "DaskRunner": DASK_RUNNER,
    "apache_beam.runners.dask.dask_runner.DaskRunner": DASK_RUNNER,
}


class UserError(Exception):
    """A problem with the user's input or setup: printed as one line, exit status 2."""


def add_shared_argument(parser: argparse.ArgumentParser, flag: str, **kwargs) -> None:
    """Adds a flag that more than one job's options class defines (``--output``, …).

    Beam parses the flags of every imported PipelineOptions subclass with one parser, where
    a second definition of the same flag would clash; each job's own view still parses it
    with its own help and default.
    """
    try:
        parser.add_argument(flag, **kwargs)
    except argparse.ArgumentError:
        pass  # another job's options class defined it in this shared parser


# DirectRunner's own names for itself: the default runner.
_DIRECT_RUNNERS = (None, "DirectRunner", "SwitchingDirectRunner")


def pipeline_options(
    argv: Sequence[str] | None, local_threads: bool = False
) -> PipelineOptions:
    """Parses ``argv`` into PipelineOptions, resolving runner aliases.

    Args:
        argv: the command line (``sys.argv[1:]`` when ``None``).
        local_threads: on DirectRunner, when the user chose no ``--direct_running_mode``,
            run one worker thread per core in this process (``multi_threading``). For
            jobs whose per-element work releases the GIL (Pillow's decode, resize and
            encode; network I/O), threads use every core without what worker processes
            cost: seconds to start, each importing Beam, and a copy of every element
            crossing a process boundary.
    """
    from apache_beam.options.pipeline_options import (
        DirectOptions,
        PipelineOptions,
        StandardOptions,
    )

    args = list(sys.argv[1:] if argv is None else argv)
    for i, arg in enumerate(args):
        for alias, path in RUNNER_ALIASES.items():
            if arg == f"--runner={alias}":
                args[i] = f"--runner={path}"
            elif arg == alias and i and args[i - 1] == "--runner":
                args[i] = path
    # Beam builds its own S3 filesystem's client without a retry config, so botocore
    # reads these instead (DESIGN.md, "Known traps"); processes a runner starts
    # inherit them. A user's own settings win.
    os.environ.setdefault("AWS_RETRY_MODE", "standard")
    os.environ.setdefault("AWS_MAX_ATTEMPTS", str(DEFAULT_MAX_ATTEMPTS))
    options = PipelineOptions(args)
    if (
        local_threads
        and options.view_as(StandardOptions).runner in _DIRECT_RUNNERS
        and not _given(args, "--direct_running_mode")
    ):
        direct = options.view_as(DirectOptions)
        direct.direct_running_mode = "multi_threading"
        if not _given(args, "--direct_num_workers"):
            direct.direct_num_workers = os.cpu_count() or 1
    return options


def _given(args: Sequence[str], flag: str) -> bool:
    """Whether the command line sets ``flag`` (even to its default value)."""
    return any(arg == flag or arg.startswith(f"{flag}=") for arg in args)


def s3_config(options: PipelineOptions) -> S3Config:
    """The project's S3 client settings from Beam's own ``S3Options`` flags."""
    from apache_beam.options.pipeline_options import S3Options

    return S3Config.from_options(options.view_as(S3Options))


def counters(result, namespace: str) -> dict[str, int]:
    """The committed (or attempted) values of a job's counters, by name."""
    from apache_beam.metrics.metric import MetricsFilter

    values = {}
    for counter in result.metrics().query(MetricsFilter().with_namespace(namespace))["counters"]:
        value = counter.committed if counter.committed is not None else counter.attempted
        values[counter.key.metric.name] = values.get(counter.key.metric.name, 0) + value
    return dict(sorted(values.items()))


@functools.cache
def skip_final_collection() -> None:
    """Leaves every object alive at exit out of the interpreter's last garbage collection.

    With Beam imported, hundreds of thousands of objects are alive; collecting them
    took 0.3-0.4 s after the job was done, and the process's memory goes back to the
    system anyway. The other exit handlers and the flushing of output streams still run.
    """
    atexit.register(gc.freeze)


def cli_main(name: str, job: Callable[[list[str] | None], object], argv=None) -> None:
    """Runs ``job``; a :class:`UserError` becomes one line on stderr and exit status 2."""
    skip_final_collection()
    try:
        job(argv)
    except UserError as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        sys.exit(130)
