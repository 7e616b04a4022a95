"""What every job shares: option handling, user-facing errors, and the summary output."""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import difflib
import functools
import gc
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from beam_jobs import logs
from s3tfr.errors import JobFailed, UserError
from s3tfr.host import usable_cpus
from s3tfr.s3 import DEFAULT_MAX_ATTEMPTS, S3Config

if TYPE_CHECKING:
    from apache_beam.options.pipeline_options import PipelineOptions

# Beam is imported inside the functions that need it, so that a job can use this module
# before it decides to import Beam (the upload job plans without it).

__all__ = [
    "JobFailed",
    "UserError",
    "add_shared_argument",
    "cli_main",
    "counters",
    "failure_in",
    "local_runner",
    "pipeline_options",
    "pool_for",
    "print_help",
    "s3_config",
    "tune_garbage_collector",
]

# Beam knows DaskRunner only by its module path, and its own DaskRunner mixes a ParDo's
# tagged outputs (every job has some) and reports no metrics: both names run the fixed
# subclass in runners/dask.py.
DASK_RUNNER = "runners.dask.DaskRunner"
RUNNER_ALIASES = {
    "DaskRunner": DASK_RUNNER,
    "apache_beam.runners.dask.dask_runner.DaskRunner": DASK_RUNNER,
}


def failure_in(error: BaseException, kinds: tuple[type, ...]) -> JobFailed | None:
    """The job-stopping error of one of ``kinds`` that a runner wrapped into ``error``.

    Runners re-raise a worker's exception as their own, with the original's class name
    and message in the text (``…ForeignFile: <message> [while running 'Step']``), so
    it is found there as well as in the exception chain.
    """
    if isinstance(error, UserError):
        return None
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, kinds):
            return JobFailed(_first_line(str(seen)))
        seen = seen.__cause__ or (None if seen.__suppress_context__ else seen.__context__)
    text = str(error)
    for kind in kinds:
        marker = f"{kind.__name__}: "
        if marker in text:
            return JobFailed(_first_line(text.rsplit(marker, 1)[1]))
    return None


def _first_line(message: str) -> str:
    """A message without the step Beam appends (`` [while running 'Step']``)."""
    return message.split(" [while running", 1)[0].strip().splitlines()[0]


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
            work that waits on the network and releases the GIL (S3 requests, Pillow's
            decode, resize and encode), threads overlap the waits without what worker
            processes cost: seconds to start, each importing Beam, and a copy of every
            element crossing a process boundary.
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
    # Beam builds its own S3 filesystem's client without a retry config (botocore's
    # legacy mode, 5 attempts), so botocore reads these instead; processes a runner
    # starts inherit them. A user's own settings win.
    os.environ.setdefault("AWS_RETRY_MODE", "standard")
    os.environ.setdefault("AWS_MAX_ATTEMPTS", str(DEFAULT_MAX_ATTEMPTS))
    _reject_unknown(args)
    options = PipelineOptions(args)
    if (
        local_threads
        and options.view_as(StandardOptions).runner in _DIRECT_RUNNERS
        and not _given(args, "--direct_running_mode")
    ):
        direct = options.view_as(DirectOptions)
        direct.direct_running_mode = "multi_threading"
        if not _given(args, "--direct_num_workers"):
            direct.direct_num_workers = usable_cpus()
    return options


def _beam_parser() -> argparse.ArgumentParser:
    """The parser Beam itself parses options with: every PipelineOptions class's flags
    (the jobs' own classes included, once their modules are imported)."""
    from apache_beam.options.pipeline_options import (
        PipelineOptions,
        _BeamArgumentParser,
    )

    parser = _BeamArgumentParser(allow_abbrev=False)
    classes = {str(cls): cls for cls in PipelineOptions.__subclasses__()}
    for cls in classes.values():
        cls._add_argparse_args(parser)
    return parser


def _reject_unknown(args: Sequence[str]) -> None:
    """Beam only warns about an option no options class defines, and runs on with its
    default; a misspelt ``--valdation_fraction`` must stop the job instead.

    Raises:
        UserError: naming the unknown options and the closest known ones.
    """
    if any("dask" in arg.lower() for arg in args):
        import apache_beam.runners.dask.dask_runner  # noqa: F401 - defines DaskOptions

    parser = _beam_parser()
    _known, unknown = parser.parse_known_args(list(args))
    if not unknown:
        return
    flags = [f for action in parser._actions for f in action.option_strings]
    problems = []
    for i, arg in enumerate(unknown):
        if not arg.startswith("-"):
            if not (i and unknown[i - 1].startswith("-") and "=" not in unknown[i - 1]):
                problems.append(f"unexpected argument {arg!r}")  # not an option's value
            continue
        flag = arg.split("=", 1)[0]
        close = difflib.get_close_matches(flag, flags, n=1, cutoff=0.75)
        problems.append(f"unknown option {flag}" + (f" (did you mean {close[0]}?)" if close else ""))
    raise UserError("; ".join(problems) + "; see --help")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Defaults shown after each option; the description printed as written."""


def print_help(prog: str, description: str, options: type) -> None:
    """The job's own options with their defaults and meaning, then how to see Beam's."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        formatter_class=_HelpFormatter,
        epilog="Any Apache Beam pipeline option is accepted too (--runner, "
        "--direct_num_workers, --s3_endpoint_url, ...); --help_beam lists them all.",
    )
    options._add_argparse_args(parser)
    add_verbosity_help(parser)
    parser.print_help()


def add_verbosity_help(parser: argparse.ArgumentParser) -> None:
    """Lists ``-q``/``-v``/``--debug`` (read by :func:`cli_main`, never by Beam)."""
    group = parser.add_argument_group("output")
    for flags, text in logs.FLAGS_HELP:
        group.add_argument(*flags, action="store_true", help=text)


def local_runner(options: PipelineOptions):
    """Beam's FnApiRunner when the options leave the runner to Beam's DirectRunner.

    The DirectRunner runs a pipeline like these on the FnApiRunner (``in_memory``,
    ``multi_threading`` or ``multi_processing``, as ``--direct_running_mode`` says), but
    first offers it to the Prism runner, which converts the pipeline to a portable one
    and then needs a binary downloaded from GitHub: offline that costs 0.1-0.3 s of CPU
    for nothing, online it moves the job to an engine nothing here tests. This builds
    the FnApiRunner as the DirectRunner does, workers' options included.

    Returns:
        The runner for ``beam.Pipeline(runner=…)``, or ``None`` when the options name
        another runner.
    """
    from apache_beam.options.pipeline_options import StandardOptions

    if options.view_as(StandardOptions).runner not in _DIRECT_RUNNERS:
        return None
    from apache_beam.portability.api import beam_provision_api_pb2
    from apache_beam.runners.portability.fn_api_runner import fn_runner
    from apache_beam.runners.portability.portable_runner import JobServiceHandle

    encoded = JobServiceHandle.encode_pipeline_options(options.get_all_options())
    return fn_runner.FnApiRunner(
        provision_info=fn_runner.ExtendedProvisionInfo(
            beam_provision_api_pb2.ProvisionInfo(pipeline_options=encoded)
        )
    )


def _given(args: Sequence[str], flag: str) -> bool:
    """Whether the command line sets ``flag`` (even to its default value)."""
    return any(arg == flag or arg.startswith(f"{flag}=") for arg in args)


def s3_config(options: PipelineOptions) -> S3Config:
    """The project's S3 client settings from Beam's own ``S3Options`` flags."""
    from apache_beam.options.pipeline_options import S3Options

    try:
        return S3Config.from_options(options.view_as(S3Options))
    except ValueError as e:
        raise UserError(str(e)) from None


def pool_for(
    config: S3Config, requests_per_worker: int, direct_num_workers: int | None = None
) -> S3Config:
    """``config`` with a connection pool for every S3 request a worker process may
    have in flight: ``requests_per_worker`` per DoFn instance, and an instance per core
    (or per DirectRunner worker thread, when more are asked for) sharing the process's
    client. urllib3 keeps at most the pool's size of connections: it would open the
    others, then discard them with a "Connection pool is full" warning.
    """
    instances = max(usable_cpus(), direct_num_workers or 0)
    wanted = instances * requests_per_worker
    return dataclasses.replace(
        config, max_pool_connections=max(config.max_pool_connections, wanted)
    )


def counters(result, namespace: str) -> dict[str, int]:
    """The committed (or attempted) values of a job's counters, by name."""
    from apache_beam.metrics.metric import MetricsFilter

    values = {}
    for counter in result.metrics().query(MetricsFilter().with_namespace(namespace))["counters"]:
        value = counter.committed if counter.committed is not None else counter.attempted
        values[counter.key.metric.name] = values.get(counter.key.metric.name, 0) + value
    return dict(sorted(values.items()))


# Python's default is (700, 10, 10): see tune_garbage_collector().
GC_THRESHOLD = (10_000, 10, 10)


@functools.cache
def tune_garbage_collector() -> None:
    """Keeps Python's garbage collector off the objects that live as long as the job.

    Importing Beam (and TensorFlow for analyze) leaves hundreds of thousands of objects
    alive for the whole run: they are frozen (later full collections skip them); young
    cycles are collected every 10,000 allocations instead of 700 (at 700 the collector
    walked the imports some 1,200 times, 1 s of CPU in a 5 s analysis, 0.5-0.8 s in an
    upload of 2,003 files); and the interpreter's last collection at exit, 0.3-0.4 s
    after the work is done, is skipped (the process's memory goes back to the system
    anyway; other exit handlers and the flushing of output streams still run).
    """
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLD)
    atexit.register(gc.freeze)


def cli_main(
    name: str,
    job: Callable[[list[str] | None], object],
    argv=None,
    options: type | None = None,
    description: str = "",
) -> None:
    """Runs ``job`` with the arguments minus ``-q``/``-v``/``--debug``, which set what
    it logs (:mod:`beam_jobs.logs`); a :class:`UserError` becomes one line on stderr
    and exit status 2, a :class:`JobFailed` one line and exit status 1 (with ``-v`` or
    ``--debug``, after its traceback).

    With ``options`` (the job's PipelineOptions class), ``-h``/``--help`` prints the
    job's own options and ``--help_beam`` every Beam option, instead of running it.
    """
    verbosity, args = logs.split_verbosity(sys.argv[1:] if argv is None else argv)
    if options is not None and ("-h" in args or "--help" in args):
        print_help(f"s3tfr-{name}", description, options)
        sys.exit(0)
    if options is not None and "--help_beam" in args:
        _beam_parser().print_help()
        sys.exit(0)
    tune_garbage_collector()
    with logs.configured(name, verbosity):
        try:
            job(args)
        except UserError as e:
            _exit(name, "error", e, 2, verbosity)
        except JobFailed as e:
            _exit(name, "failed", e, 1, verbosity)
        except KeyboardInterrupt as e:
            _exit(name, "interrupted", e, 130, verbosity)


def _exit(name: str, what: str, error: BaseException, status: int, verbosity: int):
    if verbosity >= logs.VERBOSE:
        traceback.print_exception(error)
    message = str(error)
    print(f"{name}: {what}: {message}" if message else f"{name}: {what}", file=sys.stderr)
    sys.exit(status)
