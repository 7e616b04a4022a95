"""The upload job: a local folder of ``<class>/<file>`` images in; the same tree as S3
objects under ``--output`` out (keys mirror relative paths), plus a JSON report of what was
uploaded, skipped as unchanged and failed, with reasons.

    python -m beam_jobs.upload --source ./images --output s3://bucket/images/

A rerun uploads only what is missing or changed (size + MD5). Exit status: 0 when every
file is in place, 1 when some failed (the rest stay uploaded; rerun to finish), 2 for a
problem found before starting (missing folder or bucket, bad option). Any Beam runner
option works alongside (``--runner``, ``--direct_num_workers``, ``--s3_endpoint_url`` …).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile
import time

import apache_beam as beam
import botocore.exceptions
from apache_beam.options.pipeline_options import PipelineOptions, TestOptions

from beam_jobs.common import UserError, add_shared_argument, cli_main, pipeline_options, s3_config
from transforms import s3, storage
from transforms.s3 import S3Config
from transforms.upload import (
    ListLocalFiles,
    ListObjects,
    Summarize,
    UploadFiles,
    UploadSettings,
)

__all__ = ["UploadOptions", "main", "run"]

DEFAULT_CONCURRENCY = 32
DEFAULT_MULTIPART_THRESHOLD_MB = 64
DEFAULT_OBJECT_ATTEMPTS = 3
DEFAULT_MAX_ATTEMPTS = 10
DEFAULT_REPORT = os.path.join(tempfile.gettempdir(), "s3tfr-upload-report.json")
SSE_CHOICES = ("AES256", "aws:kms")
STORAGE_CLASSES = (
    "STANDARD", "REDUCED_REDUNDANCY", "STANDARD_IA", "ONEZONE_IA", "INTELLIGENT_TIERING",
    "GLACIER", "DEEP_ARCHIVE", "GLACIER_IR",
)  # fmt: skip
_FAILURES_SHOWN = 20


class UploadOptions(PipelineOptions):
    @classmethod
    def _add_argparse_args(cls, parser) -> None:
        parser.add_argument("--source", help="local folder to upload (e.g. <class>/<file>)")
        add_shared_argument(parser, "--output", help="s3://bucket/prefix/ that mirrors the folder")
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
            default=DEFAULT_MAX_ATTEMPTS,
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
        parser.add_argument("--storage_class", choices=STORAGE_CLASSES, help="S3 storage class")
        add_shared_argument(
            parser,
            "--report",
            default=DEFAULT_REPORT,
            help="where the JSON report goes (local path or s3:// URI)",
        )


def _options(argv: list[str] | None) -> tuple[PipelineOptions, UploadOptions, bool]:
    """Parses argv; ``--dry_run`` is Beam's own flag (it takes a value), so a bare
    ``--dry_run`` is read as ``--dry_run=true``."""
    args = [
        "--dry_run=true" if a == "--dry_run" else a
        for a in (sys.argv[1:] if argv is None else argv)
    ]
    options = pipeline_options(args)
    dry_run = str(options.view_as(TestOptions).dry_run).lower() in ("true", "1", "yes")
    return options, options.view_as(UploadOptions), dry_run


def _validate(opts: UploadOptions) -> None:
    if not opts.source or not opts.output:
        raise UserError("--source DIR and --output s3://bucket/prefix/ are required")
    if not s3.is_s3(opts.output):
        raise UserError(f"--output must be an s3:// URI, got {opts.output!r}")
    for flag in ("concurrency", "multipart_threshold_mb", "max_attempts", "object_attempts"):
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


def _raise(error: OSError) -> None:
    raise error


def _check_bucket(bucket: str, config: S3Config) -> None:
    try:
        s3.client(config).head_bucket(Bucket=bucket)
    except botocore.exceptions.ClientError as e:
        code = e.response.get("Error", {}).get("Code", "")
        if code in ("404", "NoSuchBucket", "NotFound"):
            raise UserError(f"bucket {bucket} does not exist: create it first") from None
        if code in ("403", "AccessDenied", "Forbidden"):
            raise UserError(f"no access to bucket {bucket}: check your AWS credentials") from None
        raise UserError(f"cannot reach bucket {bucket}: {code or e}") from None
    except botocore.exceptions.BotoCoreError as e:
        raise UserError(f"cannot reach S3 for bucket {bucket}: {e}") from None


def _settings(opts: UploadOptions, config: S3Config, dry_run: bool) -> UploadSettings:
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
        dry_run=dry_run,
        sse=opts.sse or "",
        sse_kms_key_id=opts.sse_kms_key_id or "",
        storage_class=opts.storage_class or "",
        run_id=f"{os.getpid()}-{time.time_ns()}",
    )


def _client_config(options: PipelineOptions, opts: UploadOptions) -> S3Config:
    config = s3_config(options)
    # The pool must hold every request in flight: files at once, plus parts of big ones.
    return dataclasses.replace(
        config,
        max_attempts=opts.max_attempts,
        max_pool_connections=max(config.max_pool_connections, 2 * opts.concurrency),
    )


def _write_report(summary: dict, uri: str, header: dict, config: S3Config) -> None:
    storage.write_bytes(uri, json.dumps({**header, **summary}, indent=1).encode(), config)


def run(argv: list[str] | None = None) -> beam.runners.runner.PipelineResult:
    """Runs the upload job; returns the finished pipeline's result.

    Raises:
        UserError: for source, bucket or option problems found before the pipeline starts.
    """
    options, opts, dry_run = _options(argv)
    _validate(opts)
    _check_source(opts.source)
    config = _client_config(options, opts)
    settings = _settings(opts, config, dry_run)
    _check_bucket(settings.bucket, config)
    storage.delete(opts.report, config)  # a stale report must never read as this run's
    header = {"source": settings.source, "output": opts.output, "dry_run": dry_run}
    print(f"[upload] {settings.source} -> {opts.output} …", file=sys.stderr, flush=True)

    with beam.Pipeline(options=options) as p:
        local = p | "ListLocalFiles" >> ListLocalFiles(settings.source, opts.include, opts.exclude)
        remote = p | "ListObjects" >> ListObjects(settings.bucket, settings.prefix, config)
        uploaded = local["files"] | "UploadFiles" >> UploadFiles(settings, remote)
        _ = (
            (uploaded, local["failed"])
            | "AllResults" >> beam.Flatten()
            | "Summarize" >> Summarize()
            | "WriteReport" >> beam.Map(_write_report, opts.report, header, config)
        )
    return p.result


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
        print("some files failed: fix them and rerun; what is uploaded stays", file=sys.stderr)
    return len(failed)


def main(argv: list[str] | None = None) -> None:
    failed = 0

    def _job(args):
        nonlocal failed
        started = time.monotonic()
        run(args)
        options, opts, _ = _options(args)
        report = json.loads(storage.read_bytes(opts.report, s3_config(options)))
        failed = print_summary(report, time.monotonic() - started, opts.report)

    cli_main("upload", _job, argv)
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
