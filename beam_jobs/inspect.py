"""The inspect job: a converted dataset (``s3://bucket/prefix`` or a local dir) in; a terminal
summary out, plus an HTML report (``--report DIR``) and a shard-by-shard integrity check
(``--verify``, a Beam job: shards in parallel).

    python -m beam_jobs.inspect OUT [--verify] [--report DIR] [Beam options]

It reads only the manifest, ``rejected.jsonl`` and the shards, never the source images, and
writes nothing under OUT. Exit status: 0 when all is well, 1 when ``--verify`` finds a
mismatch, 2 for a dataset that cannot be read (no or invalid ``s3tfr_manifest.json``).
"""

from __future__ import annotations

import collections
import json
import sys
import tempfile
import uuid

import apache_beam as beam
import botocore.exceptions
from apache_beam import pvalue
from apache_beam.options.pipeline_options import GoogleCloudOptions, PipelineOptions

from beam_jobs import progress
from beam_jobs.common import (
    UserError,
    add_shared_argument,
    cli_main,
    counters,
    pipeline_options,
    s3_config,
)
from s3tfr import storage
from s3tfr.contract import REJECTED_FILE, SHARD_NAME_RE
from s3tfr.host import quiet_tensorflow_import
from s3tfr.manifest import DatasetError, load_info, s3_error
from s3tfr.s3 import S3Config
from transforms.duplicates import DuplicateReport
from transforms.verify import METRICS_NAMESPACE, VerifyShards, check_splits, shard_tasks

DESCRIPTION = """\
Summarize a converted dataset (splits, shards, classes, rejected inputs); with
--verify re-read every shard and check it against the manifest; with --report DIR
write an HTML report.

example:
  s3tfr-inspect s3://bucket/tfrecords/ --verify"""

__all__ = ["InspectOptions", "main", "read_rejected", "run", "summary"]

DEFAULT_SAMPLES_PER_CLASS = 8
DEFAULT_TOP_REJECTED = 3
# Flags of this job that take no value: a word after them is the dataset, not their value.
_SWITCHES = ("--verify",)


class InspectOptions(PipelineOptions):
    @classmethod
    def _add_argparse_args(cls, parser) -> None:
        add_shared_argument(
            parser,
            "--dataset",
            default=None,
            help="the dataset (convert's --output); also positional",
        )
        parser.add_argument(
            "--verify",
            action="store_true",
            help="re-read every shard: sha256, size, records, images, labels, counts",
        )
        add_shared_argument(
            parser, "--report", default=None, help="write an HTML report (index.html) into this dir"
        )
        parser.add_argument(
            "--samples_per_class",
            type=int,
            default=DEFAULT_SAMPLES_PER_CLASS,
            help="decoded examples per class on the report's contact sheets",
        )
        parser.add_argument(
            "--top_rejected",
            type=int,
            default=DEFAULT_TOP_REJECTED,
            help="example keys shown per rejection reason in the terminal summary",
        )


def _with_dataset_flag(argv: list[str]) -> list[str]:
    """Turns the positional dataset into ``--dataset`` (Beam's parser takes flags only).

    A bare word is the dataset unless it follows a flag that takes a value
    (``--runner DirectRunner``); ``--flag=value`` forms are never ambiguous.
    """
    for i, arg in enumerate(argv):
        if arg.startswith("-"):
            continue
        before = argv[i - 1] if i else ""
        if not before.startswith("-") or "=" in before or before in _SWITCHES:
            return [*argv[:i], "--dataset", arg, *argv[i + 1 :]]
    return argv


def read_rejected(root: str, config: S3Config | None = None) -> list[dict]:
    """The convert job's rejections (``[]`` when the file is absent)."""
    try:
        data = storage.read_bytes(storage.join(root, REJECTED_FILE), config)
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()]


def _unlisted_shards(root: str, info: dict, config: S3Config | None) -> list[str]:
    """Shard-named files the manifest does not list (say, of an interrupted rerun)."""
    listed = {entry["file"] for _split, entry in shard_tasks(info)}
    names = storage.list_files(root, config)
    return sorted(n for n in names if SHARD_NAME_RE.fullmatch(n) and n not in listed)


def summary(root: str, info: dict, rejected: list[dict], top: int = DEFAULT_TOP_REJECTED) -> str:
    """The terminal summary: splits, classes, rejections by reason, options and source."""
    labels = info["labels"]
    splits = info["splits"]
    lines = [f"Dataset {root}"]
    tool = info.get("tool", {})
    if tool:
        lines.append(f"  written by {tool.get('name', '?')} {tool.get('version', '?')}, "
                     f"compression {info.get('compression') or 'none'}")  # fmt: skip
    lines.append("  splits:")
    for split, s in splits.items():
        lines.append(f"    {split:<12} {s['examples']:>9} examples {s['num_shards']:>5} shards "
                     f"{s['bytes'] / 1e6:>10.1f} MB")  # fmt: skip
    width = max([len(label) for label in labels] + [5])
    lines.append(f"  classes ({len(labels)}):")
    lines.append(f"    {'label':>5}  {'class':<{width}} " + " ".join(f"{s:>10}" for s in splits))
    for index, label in enumerate(labels):
        counts = " ".join(f"{splits[s].get('class_counts', {}).get(label, 0):>10}" for s in splits)
        lines.append(f"    {index:>5}  {label:<{width}} {counts}")
    counts = info.get("counts", {})
    lines.append(f"  listed {counts.get('listed', '?')}, converted {counts.get('converted', '?')}, "
                 f"rejected {counts.get('rejected', len(rejected))}")  # fmt: skip
    appends = info.get("appends", [])
    if appends:
        lines.append(f"  appended {len(appends)} times since its full conversion: "
                     f"{sum(a.get('added', 0) for a in appends)} records added, "
                     f"{sum(a.get('dropped', 0) for a in appends)} dropped "
                     "(changed or deleted sources)")  # fmt: skip
    by_code: dict[str, list[dict]] = collections.defaultdict(list)
    for r in rejected:
        by_code[r.get("code") or r.get("stage", "?")].append(r)
    for code, items in sorted(by_code.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        lines.append(f"    {code}: {len(items)}  ({items[0].get('reason', '')})")
        lines.extend(f"      {r.get('key')}" for r in items[:top])
        if len(items) > top:
            lines.append(f"      … and {len(items) - top} more")
    stats = info.get("image_stats", {})
    for axis in ("source_width", "source_height"):
        if axis in stats:
            a = stats[axis]
            lines.append(f"  {axis.replace('_', ' ')}: min {a['min']}, mean {a['mean']}, "
                         f"max {a['max']}")  # fmt: skip
    if stats.get("source_formats"):
        formats = ", ".join(f"{k}={v}" for k, v in stats["source_formats"].items())
        lines.append(f"  source formats: {formats}")
    options = info.get("options", {})
    if options:
        lines.append("  options: " + ", ".join(f"{k}={v}" for k, v in options.items()))
    source = info.get("source", {})
    lines.append(f"  source: {source.get('uri', '?')} ({source.get('objects_listed', '?')} "
                 "objects listed)")  # fmt: skip
    return "\n".join(lines)


def _verdict(_, checks, info: dict, exact, near_pairs, found_at=None, config=None) -> dict:
    """Prints one line per shard, the split checks and the duplicates found (and writes
    them to ``found_at``, for the HTML report); returns the totals. Duplicates do not
    fail the verdict: the dataset is what the manifest says."""
    checks = sorted(checks, key=lambda c: c.file)
    for check in checks:
        print(check.line())
    split_problems = check_splits(info, checks)
    for text in split_problems:
        print(f"FAIL {text}")
    duplicates = DuplicateReport.build(exact, near_pairs)
    for line in duplicates.lines():
        print(line)
    if found_at:
        storage.write_bytes(found_at, duplicates.to_json(), config)
    passed = sum(c.ok for c in checks)
    failed = passed != len(shard_tasks(info)) or bool(split_problems)
    # The driver's exit status comes from these: on a cluster this step runs on a worker.
    beam.metrics.Metrics.counter(METRICS_NAMESPACE, "verdicts").inc()
    beam.metrics.Metrics.counter(METRICS_NAMESPACE, "verdicts_failed").inc(int(failed))
    print(f"verify: {passed} of {len(checks)} shards passed, "
          f"{sum(c.examples for c in checks)} records read")  # fmt: skip
    return {"passed": passed, "shards": len(checks), "split_problems": split_problems}


def run(argv: list[str] | None = None) -> beam.runners.runner.PipelineResult | None:
    """Prints the summary, writes the report and runs the verify pipeline, as asked.

    Returns:
        The verify pipeline's result, or ``None`` without ``--verify``.

    Raises:
        UserError: for a missing or unreadable dataset, or bad options.
    """
    argv = _with_dataset_flag(list(sys.argv[1:] if argv is None else argv))
    options = pipeline_options(argv)
    opts = options.view_as(InspectOptions)
    if not opts.dataset:
        raise UserError("which dataset? usage: inspect OUT [--verify] [--report DIR]")
    if opts.samples_per_class < 0 or opts.top_rejected < 0:
        raise UserError("--samples_per_class and --top_rejected must be >= 0")
    config = s3_config(options)
    try:
        info = load_info(opts.dataset, config)
    except DatasetError as e:
        raise UserError(str(e)) from None
    rejected = read_rejected(opts.dataset, config)
    print(summary(opts.dataset, info, rejected, opts.top_rejected), flush=True)
    stray = _unlisted_shards(opts.dataset, info, config)
    if stray:
        print(f"  note: {len(stray)} shard files not in the manifest (readers ignore them): "
              + ", ".join(stray[:5]) + (" …" if len(stray) > 5 else ""))  # fmt: skip
    if opts.report and not opts.verify:
        _write_report(opts, info, rejected, config)
    if not opts.verify:
        return None
    tasks = shard_tasks(info)
    records = sum(entry["examples"] for _split, entry in tasks)
    progress.LOGGER.info("verify: reading %d shards (%s records) …", len(tasks), f"{records:,}")
    with quiet_tensorflow_import():
        import tensorflow  # noqa: F401 - the shards' records are parsed with it

    temp_location = options.view_as(GoogleCloudOptions).temp_location
    # Where the verdict leaves the duplicate report for the HTML report: a place the
    # workers reach (--temp_location), or this machine's (a local runner's workers).
    found_at = None
    if opts.report:
        scratch = temp_location or tempfile.gettempdir()
        found_at = storage.join(scratch, f"s3tfr-duplicates-{uuid.uuid4().hex[:16]}.json")
    with (
        progress.temporary_folder(temp_location, config) as folder,
        progress.watch("verify", folder, "records", records) as folder,
        beam.Pipeline(options=options) as p,
    ):
        verified = p | "VerifyShards" >> VerifyShards(opts.dataset, info, config, folder)
        duplicates = verified["duplicates"]
        _ = (
            p
            | "VerdictTrigger" >> beam.Create([None])
            | "Verdict"
            >> beam.Map(
                _verdict,
                pvalue.AsList(verified["checks"]),
                info,
                pvalue.AsSingleton(duplicates["exact"]),
                pvalue.AsSingleton(duplicates["near"]),
                found_at,
                config,
            )
        )
    if found_at:
        try:
            report = DuplicateReport.from_json(storage.read_bytes(found_at, config))
        finally:
            storage.delete(found_at, config)
        _write_report(opts, info, rejected, config, report)
    return p.result


def _write_report(opts, info: dict, rejected: list[dict], config, duplicates=None) -> None:
    from transforms.report import write_report

    path = write_report(opts.dataset, info, rejected, opts.report, opts.samples_per_class,
                        config, duplicates)  # fmt: skip
    print(f"report: {path}", flush=True)


def verify_failed(result) -> bool:
    """Whether a verify run found any mismatch (from its counters)."""
    values = counters(result, METRICS_NAMESPACE)
    return values.get("verdicts", 0) != 1 or values.get("verdicts_failed", 0) > 0


def main(argv: list[str] | None = None) -> None:
    def _job(args):
        try:
            result = run(args)
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as e:
            # Past the manifest (read rejections, list shards, report): one line, as there.
            raise UserError(str(s3_error(e, "the dataset"))) from None
        if result is None:
            return
        if verify_failed(result):
            print("inspect: verify FAILED: see the FAIL lines above", file=sys.stderr)
            sys.exit(1)
        print("inspect: verify passed")

    cli_main("inspect", _job, argv, InspectOptions, DESCRIPTION)


if __name__ == "__main__":
    main()
