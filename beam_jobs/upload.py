"""The upload job: a local folder of ``<class>/<file>`` images in; the same tree as S3
objects under ``--output`` out (keys mirror relative paths), plus a JSON report of what was
uploaded, skipped as unchanged and failed, with reasons.

    python -m beam_jobs.upload --source ./images --output s3://bucket/images/

The launching process first plans (lists the folder and the destination, compares
same-size files by MD5); the Beam pipeline then uploads what is missing or changed. A
rerun with nothing to upload, and a dry run, finish after the plan without starting a
pipeline, so this module imports Beam only when a pipeline runs or a set-up error is
reported; it starts importing Beam in a thread as soon as the plan finds a file to
upload, so the import overlaps the rest of the plan. Exit status: 0 when every file is
in place, 1 when some failed (the rest stay uploaded; rerun to finish), 2 for a problem
found before starting (missing folder or bucket, bad option). Any Beam runner option
works alongside (``--runner``, ``--direct_num_workers``, ``--s3_endpoint_url`` …).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import os
import sys
import tempfile
import threading
import time
from typing import TYPE_CHECKING, NoReturn

import botocore.exceptions

from beam_jobs import progress
from beam_jobs.common import UserError, add_verbosity_help, cli_main, pool_for
from s3tfr import s3, storage
from s3tfr.s3 import S3Config
from transforms import uploader
from transforms.uploader import Plan, UploadSettings

if TYPE_CHECKING:
    from apache_beam.runners.runner import PipelineResult

__all__ = ["main", "run"]

DEFAULT_CONCURRENCY = 64
DEFAULT_MULTIPART_THRESHOLD_MB = 64
DEFAULT_OBJECT_ATTEMPTS = 3
SSE_CHOICES = ("AES256", "aws:kms")
STORAGE_CLASSES = (
    "STANDARD", "REDUCED_REDUNDANCY", "STANDARD_IA", "ONEZONE_IA", "INTELLIGENT_TIERING",
    "GLACIER", "DEEP_ARCHIVE", "GLACIER_IR",
)  # fmt: skip
_FAILURES_SHOWN = 20


def _add_arguments(parser: argparse.ArgumentParser, add_shared) -> None:
    """The job's own flags, for Beam's parser and for the plan's Beam-free one."""
    parser.add_argument("--source", help="local folder to upload (e.g. <class>/<file>)")
    add_shared(parser, "--output", help="s3://bucket/prefix/ that mirrors the folder")
    parser.add_argument(
        "--include",
        action="append",
        default=[],
        help="glob on the relative path (repeatable); when given, only matches go",
    )
    parser.add_argument(
        "--exclude",
        action="append",
        default=[],
        help="glob on the relative path (repeatable); matches are left out",
    )
    parser.add_argument(
        "--images_only",
        action="store_true",
        help="upload only files whose content is an image (by content, not extension)",
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=DEFAULT_CONCURRENCY,
        help="files uploading at once per worker",
    )
    parser.add_argument(
        "--multipart_threshold_mb",
        type=float,
        default=DEFAULT_MULTIPART_THRESHOLD_MB,
        help="files above this size are uploaded in parts",
    )
    parser.add_argument(
        "--max_attempts",
        type=int,
        default=s3.DEFAULT_MAX_ATTEMPTS,
        help="attempts per S3 request (botocore standard retry mode)",
    )
    parser.add_argument(
        "--object_attempts",
        type=int,
        default=DEFAULT_OBJECT_ATTEMPTS,
        help="attempts per file when a request fails after all its retries",
    )
    parser.add_argument("--sse", choices=SSE_CHOICES, help="server-side encryption")
    parser.add_argument("--sse_kms_key_id", help="KMS key for --sse aws:kms")
    parser.add_argument(
        "--storage_class", choices=STORAGE_CLASSES, help="S3 storage class"
    )
    add_shared(
        parser,
        "--report",
        default=None,
        help="where the JSON report goes (local path or s3:// URI); by default "
        "report.json in a new private folder s3tfr-upload-* of the temporary directory "
        "($TMPDIR, else /tmp), one per run; its path is printed at the end",
    )


@functools.cache
def _options_class() -> type:
    """The job's ``PipelineOptions`` subclass, defined when a pipeline is about to run."""
    from apache_beam.options.pipeline_options import PipelineOptions

    from beam_jobs.common import add_shared_argument

    class UploadOptions(PipelineOptions):
        @classmethod
        def _add_argparse_args(cls, parser) -> None:
            _add_arguments(parser, add_shared_argument)

    return UploadOptions


def _parse(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """The job's flags, ``--dry_run`` and Beam's ``--s3_*`` flags, read without Beam;
    returns them and the arguments for the pipeline (runner options pass through)."""
    args = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="upload", description=__doc__.split("\n\n")[0]
    )
    _add_arguments(parser, lambda p, flag, **kwargs: p.add_argument(flag, **kwargs))
    add_verbosity_help(parser)
    # Beam's DirectRunner flag, read for the connection pool's size (_client_config).
    parser.add_argument("--direct_num_workers", type=int, help=argparse.SUPPRESS)
    # Beam's TestOptions flag takes a value; a bare --dry_run means true.
    parser.add_argument(
        "--dry_run",
        nargs="?",
        const="true",
        default="false",
        help="list what would be uploaded, upload nothing",
    )
    # Beam's S3Options flags (the pipeline's parser defines them), read by S3Config name.
    for field in dataclasses.fields(S3Config):
        if field.name.startswith("s3_"):
            if isinstance(field.default, bool):
                parser.add_argument(
                    f"--{field.name}", action="store_true", help="see Beam"
                )
            else:
                parser.add_argument(f"--{field.name}", help="see Beam's S3Options")
    opts, beam_only = parser.parse_known_args(args)
    if beam_only:
        # Runner options or a misspelling: only Beam's parser tells them apart (importing
        # Beam, which a plain rerun with nothing to upload never needs).
        from beam_jobs.common import _reject_unknown

        _options_class()  # its flags are the suggestions for a misspelt one
        _reject_unknown(beam_only)
    opts.dry_run = opts.dry_run.lower() in ("true", "1", "yes")
    return opts, args


def _validate(opts: argparse.Namespace) -> None:
    if not opts.source or not opts.output:
        raise UserError("--source DIR and --output s3://bucket/prefix/ are required")
    if not s3.is_s3(opts.output):
        raise UserError(f"--output must be an s3:// URI, got {opts.output!r}")
    for flag in (
        "concurrency",
        "multipart_threshold_mb",
        "max_attempts",
        "object_attempts",
    ):
        if getattr(opts, flag) <= 0:
            raise UserError(f"--{flag} must be positive")
    if opts.sse_kms_key_id and opts.sse != "aws:kms":
        raise UserError("--sse_kms_key_id needs --sse aws:kms")


def _check_source(source: str) -> None:
    """Fails early on a missing, unreadable or empty source folder."""
    if not os.path.exists(source):
        raise UserError(f"source {source} does not exist")
    if not os.path.isdir(source):
        raise UserError(f"source {source} is not a directory")
    try:
        for _dirpath, _dirs, files in os.walk(source, onerror=_raise, followlinks=True):
            if files:
                return
    except OSError as e:
        raise UserError(f"cannot read source {source}: {e.strerror or e}") from None
    raise UserError(f"source {source} holds no files: nothing to upload")


def _raise(error: BaseException, *_unused) -> NoReturn:
    raise error


def _bucket_error(bucket: str, error: Exception) -> Exception:
    """What to tell the user when listing the destination bucket fails."""
    if isinstance(error, botocore.exceptions.ClientError):
        code = s3.error_code(error)
        if code in ("404", "NoSuchBucket", "NotFound"):
            return UserError(f"bucket {bucket} does not exist: create it first")
        if code in ("403", "AccessDenied", "Forbidden"):
            return UserError(
                f"no access to bucket {bucket}: check your AWS credentials"
            )
        return UserError(f"cannot reach bucket {bucket}: {code or error}")
    return UserError(f"cannot reach S3 for bucket {bucket}: {error}")


def _settings(opts: argparse.Namespace, config: S3Config) -> UploadSettings:
    bucket, key = s3.parse(opts.output)
    prefix = key.rstrip("/") + "/" if key.strip("/") else ""
    return UploadSettings(
        source=os.path.abspath(opts.source),
        bucket=bucket,
        prefix=prefix,
        config=config,
        concurrency=opts.concurrency,
        multipart_threshold=int(opts.multipart_threshold_mb * 1024 * 1024),
        object_attempts=opts.object_attempts,
        images_only=opts.images_only,
        sse=opts.sse or "",
        sse_kms_key_id=opts.sse_kms_key_id or "",
        storage_class=opts.storage_class or "",
    )


def _client_config(opts: argparse.Namespace) -> S3Config:
    try:
        config = S3Config.from_options(opts)
    except ValueError as e:
        raise UserError(str(e)) from None
    # Per DoFn instance: files at once, plus parts of big ones.
    return pool_for(config, 2 * opts.concurrency, opts.direct_num_workers)


def _write_report(summary: dict, uri: str, header: dict, config: S3Config) -> None:
    storage.write_bytes(
        uri, json.dumps({**header, **summary}, indent=1).encode(), config
    )


def _import_pipeline_modules() -> None:
    """Imports what :func:`_run_pipeline` needs (about a second of CPU, mostly Beam)."""
    # A failure here is raised again, with its traceback, by the pipeline's own import.
    with contextlib.suppress(Exception):
        import apache_beam  # noqa: F401

        import transforms.upload_files  # noqa: F401


@dataclasses.dataclass(frozen=True)
class _Job:
    """What the launching process decided before any pipeline."""

    args: list[str]  # for the pipeline's options
    settings: UploadSettings
    plan: Plan
    report: str
    header: dict
    # Started by the plan when it finds the first file to upload: the import then
    # overlaps the plan's listing requests and MD5s (which wait on the network or run
    # outside the GIL). A rerun with nothing to upload never imports Beam.
    beam_import: threading.Thread


def _prepare(argv: list[str] | None) -> _Job:
    """Parses and checks the options, then plans against the destination's listing."""
    opts, args = _parse(argv)
    _validate(opts)
    _check_source(opts.source)
    config = _client_config(opts)
    settings = _settings(opts, config)
    if opts.report:
        storage.delete(opts.report, config)  # a stale report must never read as this run's
        report = opts.report
    else:
        report = os.path.join(tempfile.mkdtemp(prefix="s3tfr-upload-"), "report.json")
    beam_import = threading.Thread(target=_import_pipeline_modules, name="import-beam")
    try:
        plan = uploader.plan(
            settings,
            opts.include,
            opts.exclude,
            opts.dry_run,
            on_first_upload=beam_import.start,
        )
    except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as e:
        raise _bucket_error(settings.bucket, e) from None
    if opts.dry_run:
        files, size = plan.done.counts["would_upload"], plan.done.sizes["would_upload"]
        what = "dry run: {} files would be uploaded"
    else:
        (files, size), what = plan.totals, "{} files to upload"
    progress.LOGGER.info(
        "upload: %s -> %s: %s (%s MB), %s unchanged",
        settings.source, opts.output, what.format(f"{files:,}"), f"{size / 1e6:,.1f}",
        f"{plan.done.counts['unchanged']:,}",
    )  # fmt: skip
    header = {"source": settings.source, "output": opts.output, "dry_run": opts.dry_run}
    return _Job(args, settings, plan, report, header, beam_import)


def _run_pipeline(job: _Job) -> PipelineResult:
    job.beam_import.join()
    import apache_beam as beam
    from apache_beam.options.pipeline_options import GoogleCloudOptions

    from beam_jobs.common import local_runner, pipeline_options
    from transforms.upload_files import Summarize, UploadFiles

    _options_class()  # Beam's parser then knows this job's flags
    options = pipeline_options(job.args)
    files, size = job.plan.totals
    temp_location = options.view_as(GoogleCloudOptions).temp_location
    with (
        progress.temporary_folder(temp_location, job.settings.config) as folder,
        progress.watch("upload", folder, "files", files, size) as folder,
        beam.Pipeline(runner=local_runner(options), options=options) as p,
    ):
        _ = (
            p
            # Create keeps the plan's order on DirectRunner: largest files start first.
            | "PlannedFiles" >> beam.Create(job.plan.to_upload)
            | "UploadFiles" >> UploadFiles(job.settings, folder)
            | "Summarize" >> Summarize(job.plan.done)
            | "WriteReport"
            >> beam.Map(_write_report, job.report, job.header, job.settings.config)
        )
    return p.result


def run(argv: list[str] | None = None) -> PipelineResult | None:
    """Runs the upload job: plans, then uploads in a pipeline what is missing or changed.

    Returns:
        The finished pipeline's result, or ``None`` when the plan left nothing to upload
        (nothing new since the last run, or a dry run) and no pipeline ran. Either way
        the report is written.

    Raises:
        UserError: for source, bucket or option problems found before anything uploads.
    """
    return _execute(_prepare(argv))


def _execute(job: _Job) -> PipelineResult | None:
    if not job.plan.to_upload:
        _write_report(
            job.plan.done.to_dict(), job.report, job.header, job.settings.config
        )
        return None
    return _run_pipeline(job)


def print_summary(report: dict, elapsed_s: float, report_uri: str) -> int:
    """Prints the final summary and failures; returns the number of failed files."""
    counts, sizes = report["counts"], report["bytes"]
    failed = report["failed"]
    moved = sizes.get("uploaded", 0)
    verb = "would upload" if report["dry_run"] else "uploaded"
    done = "would_upload" if report["dry_run"] else "uploaded"
    print(
        f"\n{verb} {counts.get(done, 0):,} files ({sizes.get(done, 0) / 1e6:,.1f} MB), "
        f"skipped {counts.get('unchanged', 0):,} unchanged, "
        f"{counts.get('not_image', 0):,} not images, failed {len(failed):,} "
        f"in {elapsed_s:.1f} s ({moved / 1e6 / max(elapsed_s, 1e-9):.1f} MB/s)"
    )
    for path in report["would_upload"][:_FAILURES_SHOWN]:
        print(f"  would upload {path}")
    for failure in failed[:_FAILURES_SHOWN]:
        print(f"  FAILED {failure['key']}: {failure['reason']}")
    if len(failed) > _FAILURES_SHOWN:
        print(f"  … and {len(failed) - _FAILURES_SHOWN} more")
    print(f"report: {report_uri}")
    if failed:
        print(
            "some files failed: fix them and rerun; what is uploaded stays",
            file=sys.stderr,
        )
    return len(failed)


def _upload(argv: list[str] | None) -> None:
    started = time.monotonic()
    job = _prepare(argv)
    _execute(job)
    report = json.loads(storage.read_bytes(job.report, job.settings.config))
    if print_summary(report, time.monotonic() - started, job.report):
        sys.exit(1)


def main(argv: list[str] | None = None) -> None:
    """The console entry point: exit status 0, 1 when some files failed, 2 for a set-up
    problem (one line on stderr)."""
    cli_main("upload", _upload, argv)


if __name__ == "__main__":
    main()
