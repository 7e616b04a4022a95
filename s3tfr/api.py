"""The Python API: the command-line jobs as functions that return what they made.

    import s3tfr

    info = s3tfr.convert(input="s3://bucket/images/", output="s3://bucket/tfr/",
                         resize="crop:224x224")
    info["splits"]["train"]["examples"]

Keyword arguments are the jobs' command-line options without the dashes
(``validation_fraction=0.2`` is ``--validation_fraction=0.2``); ``True`` passes a flag
alone, ``False`` and ``None`` leave it out, a list or tuple repeats it. Beam's options
(``runner="DaskRunner"``, ``s3_endpoint_url=…``) are accepted the same way; an unknown
or misspelt option raises :class:`UserError` naming it, as on the command line.

Errors: :class:`UserError` for problems with the input, the output or the options (exit
status 2 on the command line), :class:`JobFailed` when a job stopped for a reason its
message explains (exit status 1). The Beam jobs need the ``beam`` extra
(``pip install 's3-tfrecords[beam]'``); the reader (``tfdata_reader``) does not.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping

from s3tfr import manifest
from s3tfr.errors import JobFailed, UserError

# Top-level modules of the ``beam`` extra (setup.py).
_BEAM_EXTRA = ("apache_beam", "tensorflow_transform", "PIL", "matplotlib")


def argv(options: Mapping[str, object]) -> list[str]:
    """Command-line arguments for keyword options (see the module docstring).

    Raises:
        UserError: for an option name that cannot be a flag.
    """
    args = []
    for name, value in options.items():
        if not name.isidentifier() or name.startswith("_"):
            raise UserError(f"not an option name: {name!r}")
        flag = f"--{name}"
        values = value if isinstance(value, (list, tuple)) else [value]
        for item in values:
            if item is True:
                args.append(flag)
            elif item is not None and item is not False:
                args.append(f"{flag}={item}")
    return args


def job_module(job: str):
    """``beam_jobs.<job>``; a missing Beam install is a :class:`UserError` saying what to
    install, not an ImportError from deep inside Beam's imports."""
    import importlib

    try:
        return importlib.import_module(f"beam_jobs.{job}")
    except ModuleNotFoundError as e:
        if e.name and e.name.split(".")[0] in _BEAM_EXTRA:
            raise UserError(
                f"{job} needs the Beam jobs' dependencies: pip install 's3-tfrecords[beam]'"
            ) from None
        raise


def _run(job: str, args: list[str]):
    return job_module(job).run(args)


def _s3_config(options: Mapping[str, object]):
    """The S3 settings among keyword options (Beam's ``s3_*`` names); ``None`` for the
    standard AWS chain."""
    import dataclasses

    from s3tfr.s3 import S3Config

    names = {f.name for f in dataclasses.fields(S3Config) if f.name.startswith("s3_")}
    given = {k: v for k, v in options.items() if k in names and v is not None}
    try:
        return S3Config(**given) if given else None
    except ValueError as e:
        raise UserError(str(e)) from None


def load_info(dataset: str, **options) -> dict:
    """The dataset's manifest (shards, counts per split and class, labels, options).

    Args:
        dataset: the convert job's output, ``s3://bucket/prefix`` or a local directory.
        **options: S3 settings as keyword options (``s3_endpoint_url=…``), if any.

    Raises:
        s3tfr.manifest.DatasetError: no committed dataset there, or a manifest that
            does not validate.
    """
    unknown = sorted(set(options) - {k for k in options if k.startswith("s3_")})
    if unknown:
        raise UserError(f"load_info takes S3 options only, not {', '.join(unknown)}")
    return manifest.load_info(str(dataset), _s3_config(options))


def convert(input: str, output: str, **options) -> dict:
    """Converts ``<class>/<file>`` images under ``input`` into a dataset at ``output``.

    Args:
        input: ``s3://bucket/prefix`` or a local directory of class folders.
        output: where the shards and the manifest go (S3 or local).
        **options: the convert job's options (``resize="crop:224x224"``,
            ``validation_fraction=0.2``, ``runner=…``; ``s3tfr-convert --help``).

    Returns:
        The committed dataset's manifest, as :func:`load_info` reads it.
    """
    args = argv({"input": input, "output": output, **options})
    _run("convert", args)
    return manifest.load_info(str(output), _s3_config(options))


def analyze(dataset: str, **options) -> dict:
    """Computes the dataset's statistics (pixel mean/std, class weights, sizes).

    Returns:
        The statistics, as ``tfdata_reader.load_analysis`` reads them.
    """
    args = argv({"dataset": dataset, **options})
    _run("analyze", args)
    from tfdata_reader import load_analysis

    return load_analysis(str(dataset), _s3_config(options))


def verify(dataset: str, **options) -> dict:
    """Reads every shard of the dataset back and checks it against the manifest.

    Returns:
        The verify counters: ``shards_passed``, ``records_read``, ``images_decoded``, …

    Raises:
        JobFailed: a shard or a split did not match its manifest entry.
    """
    from beam_jobs import common

    args = argv({"dataset": dataset, "verify": True, **options})
    result = _run("inspect", args)
    from beam_jobs.inspect import verify_failed
    from transforms.verify import METRICS_NAMESPACE

    values = common.counters(result, METRICS_NAMESPACE)
    if verify_failed(result):
        raise JobFailed(
            f"verify of {dataset} failed: {values.get('shards_failed', 0)} shards "
            "did not match the manifest (s3tfr-inspect --verify prints each)"
        )
    return values


def upload(source: str, output: str, **options) -> dict:
    """Uploads a local ``<class>/<file>`` folder to S3; only what is missing or changed.

    Returns:
        The upload report: ``counts`` and ``bytes`` by outcome, ``failed`` files with
        their reasons, ``would_upload`` on a dry run.
    """
    given = {"source": source, "output": output, **options}
    with tempfile.TemporaryDirectory(prefix="s3tfr-upload-") as folder:
        report = given.setdefault("report", os.path.join(folder, "report.json"))
        args = argv(given)
        _run("upload", args)
        from s3tfr import storage

        return json.loads(storage.read_bytes(str(report), _s3_config(options)))
