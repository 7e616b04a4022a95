"""The convert job: an S3 prefix (or local folder) of ``<class>/<file>`` images in;
deterministic sharded TFRecords, ``labels.txt``, ``rejected.jsonl``, TensorFlow Datasets'
metadata and, last, ``s3tfr_manifest.json`` out (README, "What it writes").

    python -m beam_jobs.convert --input s3://bucket/images/ --output s3://bucket/tfrecords/

Any Beam runner option works alongside (``--runner``, ``--direct_num_workers``,
``--s3_endpoint_url`` …); ``--runner=DaskRunner`` is accepted as an alias.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
from collections.abc import Iterator

import apache_beam as beam
import botocore.exceptions
from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions

from beam_jobs import progress
from beam_jobs.common import (
    UserError,
    add_shared_argument,
    cli_main,
    counters,
    failure_in,
    local_runner,
    pipeline_options,
    pool_for,
    s3_config,
)
from s3tfr import s3, storage
from s3tfr.contract import INDEX_DIR, MANIFEST, REJECTED_FILE, TOOL, index_name
from s3tfr.manifest import DatasetError, load_info, s3_error
from s3tfr.s3 import S3Config
from transforms import turbo
from transforms.append import (
    Compactions,
    HeldCount,
    Reconcile,
    naming_after,
    shard_files,
)
from transforms.commit import (
    ForeignFile,
    Lease,
    LeaseLost,
    ManifestConflict,
    OutputBusy,
    OutputRun,
)
from transforms.content import Deduplicate, GroupNear, HashSources
from transforms.examples import ConvertSettings
from transforms.images import (
    DEFAULT_JPEG_QUALITY,
    DEFAULT_MAX_PIXELS,
    Resize,
    estimated_encoded_bytes,
    parse_resize,
)
from transforms.listing import METRICS_NAMESPACE, ListImages
from transforms.manifest_writer import AccountingError, WriteManifest
from transforms.progress import ProgressFolder
from transforms.references import KeyIndexError
from transforms.sharding import AssignShards, ShardConfig
from transforms.tfrecords import WriteShards

DESCRIPTION = """\
Convert a folder of images laid out <class>/<file> (an s3:// prefix or a local
directory) into sharded TFRecord files with labels.txt, rejected.jsonl, TensorFlow
Datasets' metadata and, last, s3tfr_manifest.json.

example:
  s3tfr-convert --input s3://bucket/images/ --output s3://bucket/tfrecords/ \\
      --resize crop:224x224"""

__all__ = ["ConvertOptions", "main", "run"]

DEFAULT_VALIDATION_FRACTION = 0.1
DEFAULT_SPLIT_SALT = "s3-tfrecords"
DEFAULT_RESIZE = "none"
DEFAULT_SHARD_SIZE_MB = 128
DEFAULT_MAX_CONCURRENT_GETS = 32
DEFAULT_MIN_SHARDS = 32


class ConvertOptions(PipelineOptions):
    @classmethod
    def _add_argparse_args(cls, parser) -> None:
        parser.add_argument("--input", help="s3://bucket/prefix/ or a local dir of <class>/<file>")
        add_shared_argument(
            parser, "--output", help="s3://bucket/prefix/ or a local dir for the dataset"
        )
        parser.add_argument(
            "--labels_file",
            default=None,
            help="fix the class list and order (one name per line); other classes are rejected",
        )
        parser.add_argument(
            "--validation_fraction",
            type=float,
            default=DEFAULT_VALIDATION_FRACTION,
            help="share of images in the validation split, by salted key hash (0 allowed)",
        )
        parser.add_argument(
            "--split_from_dirs",
            action="store_true",
            help="the input is laid out <split>/<class>/<file>: take splits from it",
        )
        parser.add_argument(
            "--split_by",
            default="key",
            choices=("key", "content"),
            help="pick each image's split by a hash of its key, or of its bytes (content: "
            "exact duplicates share a split; reads every source once more)",
        )
        parser.add_argument(
            "--dedupe",
            default="none",
            choices=("none", "exact", "near"),
            help="exact: keep one image per content (the first key); reject its twins, "
            "each naming the one kept. near: keep every image, but put near-duplicates "
            "(perceptual hash) and exact ones in one split (implies --split_by content). "
            "Both read every source once more",
        )
        parser.add_argument(
            "--split_salt",
            default=DEFAULT_SPLIT_SALT,
            help="salt of the key hash that picks splits and shards",
        )
        parser.add_argument(
            "--resize",
            default=DEFAULT_RESIZE,
            help="none (keep size; RGB JPEGs keep their bytes), shorter:256, fit:224x224 "
            "or crop:224x224",
        )
        parser.add_argument(
            "--channels", type=int, default=3, choices=(1, 3), help="3 (RGB) or 1 (grayscale)"
        )
        parser.add_argument(
            "--image_format", default="jpeg", choices=("jpeg", "png"), help="output encoding"
        )
        parser.add_argument("--jpeg_quality", type=int, default=DEFAULT_JPEG_QUALITY, help="1..95")
        parser.add_argument(
            "--max_pixels",
            type=int,
            default=DEFAULT_MAX_PIXELS,
            help="reject images with more pixels than this (decompression bombs)",
        )
        parser.add_argument(
            "--shard_size_mb",
            type=float,
            default=DEFAULT_SHARD_SIZE_MB,
            help="target shard size; the shard count per split follows from it",
        )
        parser.add_argument(
            "--num_shards", type=int, default=0, help="fixed shard count per split (0: by size)"
        )
        parser.add_argument(
            "--min_shards",
            type=int,
            default=DEFAULT_MIN_SHARDS,
            help="fewest shards per split (for parallel writing and reading) while each "
            "holds at least 100 images",
        )
        parser.add_argument(
            "--compression", default="none", choices=("none", "gzip"), help="shard compression"
        )
        parser.add_argument(
            "--append",
            action="store_true",
            help="add to the committed dataset at --output instead of rewriting it: "
            "convert only new and changed sources into new shards; drop the records of "
            "changed and deleted ones by copying just the shards that hold them. "
            "Committed shards are never rewritten (docs/APPEND.md)",
        )
        parser.add_argument(
            "--analyze",
            action="store_true",
            help="then run the analyze job (tensorflow-transform statistics, transform_fn) "
            "on the committed dataset, with the same runner options",
        )
        parser.add_argument(
            "--max_concurrent_gets",
            type=int,
            default=DEFAULT_MAX_CONCURRENT_GETS,
            help="image GETs in flight per worker (decoding runs one per core)",
        )


def _validate(opts: ConvertOptions) -> Resize:
    """Checks the options; returns ``--resize`` parsed (the one place it is parsed)."""
    if not opts.input or not opts.output:
        raise UserError("--input and --output are required (s3://bucket/prefix/ or a path)")
    for flag, uri in (("--input", opts.input), ("--output", opts.output)):
        scheme = re.match(r"([A-Za-z][A-Za-z0-9+.-]*)://", uri)
        if scheme and scheme[1] not in ("s3", "file"):
            raise UserError(
                f"{flag} {uri}: unsupported scheme {scheme[1]!r}; use s3:// (lower case) "
                "or a local path"
            )
    if not 0 <= opts.validation_fraction < 1:
        raise UserError("--validation_fraction must be in [0, 1)")
    if not 1 <= opts.jpeg_quality <= 95:
        raise UserError("--jpeg_quality must be in 1..95")
    for flag in ("max_pixels", "shard_size_mb", "max_concurrent_gets", "min_shards"):
        if getattr(opts, flag) <= 0:
            raise UserError(f"--{flag} must be positive")
    if opts.num_shards < 0:
        raise UserError("--num_shards must be 0 (by size) or positive")
    if opts.append and opts.dedupe == "near":
        raise UserError(
            "--append cannot keep --dedupe near's groups: a new image can join committed "
            "images of different splits into one group, which moves them; run a full convert"
        )
    if opts.append and opts.num_shards:
        raise UserError("--append sizes its new shards by --shard_size_mb: drop --num_shards")
    if (opts.split_by == "content" or opts.dedupe == "near") and opts.split_from_dirs:
        flag = "--split_by content" if opts.split_by == "content" else "--dedupe near"
        raise UserError(
            f"{flag} picks the splits itself; --split_from_dirs takes them from the "
            "folders: give one of them"
        )
    try:
        return parse_resize(opts.resize)
    except ValueError as e:
        raise UserError(str(e)) from None


def _normalise(uri: str) -> str:
    if s3.is_s3(uri):
        return uri.rstrip("/") + "/"
    return os.path.realpath(uri.removeprefix("file://")) + os.sep


def _check_input(root: str, config: S3Config, split_from_dirs: bool) -> list[str]:
    """Fails early, with one line, on a missing bucket, prefix or class layout; returns
    the sorted class names."""
    try:
        if not s3.is_s3(root) and not os.path.isdir(root.removeprefix("file://")):
            raise UserError(f"input {root} is not a directory")
        entries = list(storage.list_level(root, config))
        tops = [name for name, size in entries if size is None and storage.is_class_folder(name)]
        if split_from_dirs:
            classes = [c for top in tops
                       for c in storage.class_folders(storage.join(root, top), config)]  # fmt: skip
        else:
            classes = tops
    except botocore.exceptions.ClientError as e:
        code = s3.error_code(e)
        if code == "NoSuchBucket":
            raise UserError(f"bucket of {root} does not exist") from None
        raise UserError(str(s3_error(e, root))) from None
    except botocore.exceptions.BotoCoreError as e:  # no credentials, no endpoint
        raise UserError(str(s3_error(e, root))) from None
    except PermissionError as e:
        raise UserError(f"cannot list {root}: {e}") from None
    if not classes:
        layout = "<split>/<class>/<file>" if split_from_dirs else "<class>/<file>"
        files = sum(size is not None for _name, size in entries)
        folders = len(entries) - files
        if folders:
            what = f"{folders} folders but no class folders (names starting with '.' are not classes)"
        elif files:
            what = f"{files} objects but no class folders"
        else:
            what = "nothing"
        raise UserError(f"{root} holds {what}: expected images laid out {layout}")
    return sorted(set(classes))


def _check_output(output: str, input_root: str) -> None:
    """Refuses an output inside the input."""
    if _normalise(output).startswith(_normalise(input_root)):
        raise UserError(
            f"output {output} is inside input {input_root}: a rerun would ingest its output"
        )


@contextlib.contextmanager
def _output_lease(output: str, config: S3Config, append: bool) -> Iterator[OutputRun]:
    """Holds the output prefix for this run (:class:`transforms.commit.Lease`); taking
    the lease is also the proof that the output is writable."""
    lease = Lease(output, config, append)
    try:
        run = lease.acquire()
    except OutputBusy as e:
        raise UserError(str(e)) from None
    except botocore.exceptions.ClientError as e:
        code = s3.error_code(e)
        raise UserError(f"cannot write to {output}: {code or e}") from None
    except botocore.exceptions.BotoCoreError as e:
        raise UserError(str(s3_error(e, output))) from None
    except OSError as e:
        raise UserError(f"cannot write to {output}: {e.strerror or e}") from None
    try:
        yield run
    finally:
        lease.release()


def _read_labels(uri: str, config: S3Config) -> list[str]:
    try:
        text = storage.read_bytes(uri, config).decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read --labels_file {uri}: {e}") from None
    # Names as written, spaces kept (labels.txt's own lines round-trip); blank lines skipped.
    labels = [line for line in text.splitlines() if line.strip()]
    if not labels or len(set(labels)) != len(labels):
        raise UserError(f"--labels_file {uri} must list distinct class names, one per line")
    return labels


def _options_record(opts: ConvertOptions, resize: Resize) -> dict:
    """The conversion options as written to the manifest (no runner, no secrets)."""
    names = (
        "validation_fraction", "split_from_dirs", "split_by", "dedupe", "split_salt",
        "resize", "channels",
        "image_format", "jpeg_quality", "max_pixels", "shard_size_mb", "num_shards",
        "min_shards", "compression",
    )  # fmt: skip
    record = {name: getattr(opts, name) for name in names}
    record["resize"] = str(resize)
    if opts.dedupe == "near":
        record["split_by"] = "content"  # implied
    return record


# What stops a job (exit 1, one line) rather than a crash: see transforms/commit.py.
_STOPPING_ERRORS = (AccountingError, ForeignFile, KeyIndexError, LeaseLost, ManifestConflict)


def run(argv: list[str] | None = None) -> beam.runners.runner.PipelineResult:
    """Runs the convert job; returns the finished pipeline's result.

    Raises:
        UserError: for input, output or option problems found before the pipeline starts.
        JobFailed: the job stopped before committing: another writer took the output,
            a user's file is in a shard's way, or the images did not add up.
    """
    try:
        return _run(argv)
    except Exception as e:
        failure = failure_in(e, _STOPPING_ERRORS)
        if failure is None:
            raise
        raise failure from None


def _run(argv: list[str] | None) -> beam.runners.runner.PipelineResult:
    given = pipeline_options(argv)
    opts = given.view_as(ConvertOptions)
    resize = _validate(opts)
    # On S3, worker threads overlap one shard's network waits (its last GETs, its PUT)
    # with another's work. On local paths the in-process runner is faster (measured: 7.1
    # against 9.0 s for 4,000 images): its one worker's thread pool already decodes on
    # every core, and multi_threading routes every element through an embedded gRPC
    # channel.
    on_s3 = s3.is_s3(opts.input) or s3.is_s3(opts.output)
    options = pipeline_options(argv, local_threads=True) if on_s3 else given
    # Per DoFn instance: its GETs, and its shard moves (two at once, each up to four
    # parts of a multipart upload) with the run's markers.
    config = pool_for(
        s3_config(options),
        opts.max_concurrent_gets + 10,
        options.view_as(DirectOptions).direct_num_workers,
    )
    classes = _check_input(opts.input, config, opts.split_from_dirs)
    _check_output(opts.output, opts.input)
    fixed_labels = _read_labels(opts.labels_file, config) if opts.labels_file else None
    settings = ConvertSettings(
        resize, opts.channels, opts.image_format, opts.jpeg_quality,
        opts.max_pixels,
    )  # fmt: skip
    base_info = {
        "tool": TOOL,
        # A local input as its absolute path: an append from another working directory
        # must recognise it.
        "source": {"uri": opts.input if s3.is_s3(opts.input)
                   else os.path.realpath(opts.input.removeprefix("file://"))},
        "options": _options_record(opts, resize),
        # The libraries whose code decides the output bytes (the launcher's; workers run
        # the same pinned requirements).
        "codecs": turbo.versions(),
        "compression": "GZIP" if opts.compression == "gzip" else "",
    }
    with _output_lease(opts.output, config, opts.append) as output_run:
        base = None
        if opts.append:
            base = _append_base(opts.output, config, base_info, fixed_labels or classes)
            fixed_labels = base["labels"] if base else fixed_labels
        result = _convert(opts, options, output_run, settings, base_info, fixed_labels, base)
        if opts.analyze:
            # Imported here: TensorFlow Transform takes seconds to load and convert alone
            # never needs it. The analysis reads the committed shards (resized images), not
            # the sources: its labels must be known before its pipeline is built.
            from beam_jobs import analyze

            # With the runner options as given: worker threads chosen for S3's waits are
            # not a choice for TensorFlow Transform's many small stages.
            analyze.analyze(opts.output, given)
    return result


# Options that may differ between a dataset and an append to it: they size shards only.
_SHARD_SIZE_OPTIONS = ("shard_size_mb", "num_shards", "min_shards")


def _append_base(
    output: str, config: S3Config, base_info: dict, labels: list[str]
) -> dict | None:
    """The committed dataset an append adds to (``None``: there is none yet, and the
    append is a full conversion), checked against this run; read while the lease is
    held.

    Raises:
        UserError: the dataset was converted with other options or classes, or has no
            key index (converted by an older version).
    """
    try:
        info = load_info(output, config)
    except DatasetError as e:
        if "no " + MANIFEST in str(e):
            progress.LOGGER.info("convert --append: no dataset at %s yet: converting all", output)
            return None
        raise UserError(f"--append: {e}") from None
    source = info.get("source", {}).get("uri", "")
    if _normalise(source) != _normalise(base_info["source"]["uri"]):
        raise UserError(
            f"--append: {output} was converted from {source}, not "
            f"{base_info['source']['uri']}: an append adds what changed in the same input "
            "(and drops what is gone from it); to convert another input, run a full "
            "convert into another --output"
        )
    ours, theirs = base_info["options"], info.get("options", {})
    changed = [
        f"--{name} {theirs.get(name)!r} (now {ours[name]!r})"
        for name in ours
        if name not in _SHARD_SIZE_OPTIONS and theirs.get(name) != ours[name]
    ]
    if changed:
        raise UserError(
            f"--append: {output} was converted with {', '.join(changed)}: append with "
            "the options it was converted with, or run a full convert"
        )
    if labels != info["labels"]:
        new = sorted(set(labels) - set(info["labels"]))
        gone = sorted(set(info["labels"]) - set(labels))
        what = (
            f"the classes differ from the dataset's (new: {new or 'none'}; gone: "
            f"{gone or 'none'})" if new or gone else
            f"the class order differs from the dataset's ({', '.join(info['labels'])})"
        )  # fmt: skip
        raise UserError(
            f"--append: {what}, so record label indices would change: run a full convert, "
            "or pass --labels_file with the dataset's labels.txt (images of other classes "
            "are then rejected)"
        )
    indexed = set(storage.list_files(storage.join(output, INDEX_DIR), config))
    missing = [f for f in shard_files(info) if index_name(f).split("/", 1)[1] not in indexed]
    if missing:
        raise UserError(
            f"--append: {len(missing)} of the {len(shard_files(info))} shards of {output} "
            f"have no key index (first: {index_name(missing[0])}): converted by a version "
            "without key indexes, or the files were removed; run a full convert once"
        )
    return info


def _convert(
    opts: ConvertOptions,
    options: PipelineOptions,
    output_run: OutputRun,
    settings: ConvertSettings,
    base_info: dict,
    fixed_labels: list[str] | None,
    base: dict | None,
) -> beam.runners.runner.PipelineResult:
    """The convert pipeline itself, run while ``output_run`` holds the output; with
    ``base``, an append to that committed dataset (:mod:`transforms.append`)."""
    config = output_run.config
    progress.LOGGER.info("convert: listing %s …", opts.input)
    hashing = opts.split_by == "content" or opts.dedupe != "none"
    with (
        progress.watch(
            "convert", ProgressFolder(output_run.progress, config), "images"
        ) as reported,
        # The hashing pass, as lines (a terminal draws one bar: the conversion's); an
        # append hashes only what it converts, too few to count.
        progress.watch(
            "hash", ProgressFolder(f"{output_run.progress}-hash", config) if hashing
            and base is None else None, "sources", lines=True,
        ) as hash_reported,
        beam.Pipeline(runner=local_runner(options), options=options) as p,
    ):  # fmt: skip
        listed = p | "ListImages" >> ListImages(opts.input, config, opts.split_from_dirs)
        if fixed_labels:
            labels = p | "FixedLabels" >> beam.Create([fixed_labels])
        else:
            labels = listed["summary"] | "Labels" >> beam.Map(lambda summary: summary[1])
        listed_count = listed["summary"] | "ListedCount" >> beam.Map(lambda summary: summary[0])
        estimate = functools.partial(
            estimated_encoded_bytes, settings.resize, settings.image_format
        )
        sharding = ShardConfig(
            opts.validation_fraction, opts.split_salt, int(opts.shard_size_mb * 1024 * 1024),
            opts.num_shards, opts.min_shards,
            "content" if opts.dedupe == "near" else opts.split_by,
        )  # fmt: skip
        refs, content_rejected, near_roots = listed["refs"], [], None
        held = compactions = reconciled = demoted = None
        if base is not None:
            progress.LOGGER.info(
                "convert --append: comparing the listing with the key index of %d shards …",
                len(shard_files(base)),
            )
            reconciled = refs | "Reconcile" >> Reconcile(
                base, opts.output, opts.input, opts.max_concurrent_gets, config
            )
            refs = reconciled["fresh"]
            content_rejected.append(reconciled["rejected"])
        if hashing:
            progress.LOGGER.info("convert: reading every source once to hash its content …")
            hashed = refs | "HashSources" >> HashSources(
                opts.input, opts.max_concurrent_gets, config,
                settings if opts.dedupe == "near" else None, hash_reported, listed_count,
            )  # fmt: skip
            refs = hashed["refs"]
            content_rejected.append(hashed["rejected"])
            if opts.dedupe == "exact":
                deduplicated = refs | "Deduplicate" >> Deduplicate(
                    labels, reconciled["held"] if reconciled is not None else None
                )
                refs = deduplicated["refs"]
                content_rejected.append(deduplicated["rejected"])
                demoted = deduplicated["demoted"] if reconciled is not None else None
            elif opts.dedupe == "near":
                near_roots = refs | "GroupNear" >> GroupNear()
        assigned = refs | "AssignShards" >> AssignShards(
            labels, sharding, estimate, near_roots
        )
        groups = assigned["groups"]
        if reconciled is not None:
            # Records of changed and deleted sources, and held twins of a new first key.
            dropped = reconciled["dropped"]
            if demoted is not None:
                dropped = (dropped, demoted) | "AllDropped" >> beam.Flatten()
            compactions = dropped | "Compactions" >> Compactions()
            held = reconciled["held"] | "HeldCount" >> HeldCount(demoted)
            groups = (groups, compactions) | "WithCompactions" >> beam.Flatten()
        written = groups | "WriteShards" >> WriteShards(
            opts.input,
            opts.output,
            settings,
            base_info["compression"],
            opts.max_concurrent_gets,
            config,
            output_run,
            reported,
            naming_after(base) if base is not None else None,
        )
        rejected = (
            listed["rejected"],
            *content_rejected,
            assigned["rejected"],
            written["rejected"],
        ) | "AllRejected" >> beam.Flatten()
        _ = {"shards": written["shards"], "rejected": rejected} | "WriteManifest" >> (
            WriteManifest(output_run, labels, listed_count, base_info, base, held)
        )
    return p.result


def print_summary(output: str, result, config: S3Config | None = None) -> None:
    """Prints what a person asks after a run: classes, splits, shards, rejections."""
    info = load_info(output, config)
    counts = info["counts"]
    print(f"\nDataset written to {output}")
    print(f"  classes ({info['num_classes']}): {', '.join(info['labels'])}")
    for split, s in info["splits"].items():
        per_class = ", ".join(f"{k}={v}" for k, v in s["class_counts"].items())
        print(
            f"  {split}: {s['examples']} examples in {s['num_shards']} shards, "
            f"{s['bytes'] / 1e6:.1f} MB ({per_class})"
        )
    print(
        f"  listed {counts['listed']}, converted {counts['converted']}, "
        f"rejected {counts['rejected']} (see rejected.jsonl)"
    )
    if info.get("appends"):
        last = info["appends"][-1]
        print(
            f"  this append: {last['added']} records added, {last['dropped']} dropped "
            f"(changed or deleted sources; {len(last['replaced_shards'])} shards copied "
            f"without them); {len(info['appends'])} appends since the last full conversion"
        )
    rejected = storage.read_bytes(storage.join(output, REJECTED_FILE), config)
    for line in rejected.decode().splitlines()[:10]:
        r = json.loads(line)
        print(f"    rejected {r['key']}: {r['reason']}")
    print(
        "  counters: "
        + ", ".join(f"{k}={v}" for k, v in counters(result, METRICS_NAMESPACE).items())
    )
    print(f"  inspect it: ./run_local.sh inspect {output}  (--verify, --report DIR)")


# Errors that stop a convert run with a message that says it all: no traceback.
def main(argv: list[str] | None = None) -> None:
    def _job(args):
        result = run(args)
        opts = pipeline_options(args).view_as(ConvertOptions)
        config = s3_config(pipeline_options(args))
        print_summary(opts.output, result, config)
        if opts.analyze:
            from beam_jobs import analyze

            analyze.print_summary(opts.output, config)

    cli_main("convert", _job, argv, ConvertOptions, DESCRIPTION)


if __name__ == "__main__":
    main()
