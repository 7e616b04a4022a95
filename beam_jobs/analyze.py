"""The analyze job: a converted dataset in; its tensorflow-transform output
(``transform_fn/``, ``transformed_metadata/``) and, last, ``analysis.json`` out.

    python -m beam_jobs.analyze --dataset s3://bucket/tfrecords/

Any Beam runner option works alongside (``--runner``, ``--direct_num_workers``,
``--s3_endpoint_url`` …). The convert job runs it after committing a dataset when given
``--analyze``.

TensorFlow and tensorflow-transform are imported only once the dataset is found to be
analyzable, so ``--help`` and a user's mistakes answer without their seconds of import.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import apache_beam as beam
from apache_beam.options.pipeline_options import GoogleCloudOptions, PipelineOptions

from beam_jobs import progress
from beam_jobs.common import (
    UserError,
    add_shared_argument,
    cli_main,
    local_runner,
    pipeline_options,
    s3_config,
)
from s3tfr import storage
from s3tfr.contract import ANALYSIS_FILE
from s3tfr.host import quiet_tensorflow_import
from s3tfr.manifest import DatasetError, load_info
from s3tfr.s3 import S3Config

DESCRIPTION = """\
Compute dataset statistics of a converted dataset with tensorflow-transform
(label vocabulary, per-channel pixel mean and std, class counts) and write
transform_fn/ and analysis.json under it.

example:
  s3tfr-analyze --dataset s3://bucket/tfrecords/"""

__all__ = ["AnalyzeOptions", "analyze", "main", "print_summary", "run"]

DEFAULT_SPLIT = "train"
DEFAULT_RECORD_BATCH_SIZE = 128


class AnalyzeOptions(PipelineOptions):
    @classmethod
    def _add_argparse_args(cls, parser) -> None:
        add_shared_argument(
            parser,
            "--dataset",
            help="the convert job's --output (s3://bucket/prefix/ or a local dir)",
        )
        add_shared_argument(
            parser,
            "--split",
            default=DEFAULT_SPLIT,
            help="the split whose statistics are computed",
        )
        parser.add_argument(
            "--record_batch_size",
            type=int,
            default=DEFAULT_RECORD_BATCH_SIZE,
            help="records per Arrow record batch fed to tensorflow-transform",
        )


def analyze(
    dataset: str,
    options: PipelineOptions,
    split: str = DEFAULT_SPLIT,
    record_batch_size: int = DEFAULT_RECORD_BATCH_SIZE,
) -> beam.runners.runner.PipelineResult:
    """Analyzes ``split`` of the dataset at ``dataset`` with ``options``' runner.

    Raises:
        UserError: no complete dataset there, no such split, an empty split, bad options.
    """
    config = s3_config(options)
    try:
        info = load_info(dataset, config)
    except DatasetError as e:
        raise UserError(str(e)) from None
    if split not in info["splits"] or not info["splits"][split]["examples"]:
        raise UserError(f"{dataset} has no {split!r} examples to analyze")
    if record_batch_size <= 0:
        raise UserError("--record_batch_size must be positive")
    # tensorflow-transform works with Keras 2 only and sets this when imported, by which
    # time TensorFlow has imported Keras 3 for nothing (0.4 s of CPU); a user's own
    # setting wins, as it does with TFT.
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    with quiet_tensorflow_import():
        from transforms.statistics import AnalyzeImages

    # The old analysis must not describe the new transform output while it is replaced.
    storage.delete(storage.join(dataset, ANALYSIS_FILE), config)
    examples = info["splits"][split]["examples"]
    progress.LOGGER.info("analyze: %s %s images of %s …", f"{examples:,}", split, dataset)
    # TFT writes its SavedModels with tf.io, which needs a local (or TF-supported) path.
    temp_dir = tempfile.mkdtemp(prefix="s3tfr-analyze-")
    temp_location = options.view_as(GoogleCloudOptions).temp_location
    try:
        with (
            progress.temporary_folder(temp_location, config) as folder,
            progress.watch("analyze", folder, "images", examples) as folder,
            beam.Pipeline(runner=local_runner(options), options=options) as p,
        ):
            _ = p | "AnalyzeImages" >> AnalyzeImages(
                dataset,
                info,
                split,
                temp_dir,
                config,
                record_batch_size,
                folder,
            )
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
    return p.result


def run(argv: list[str] | None = None) -> beam.runners.runner.PipelineResult:
    """Runs the analyze job; returns the finished pipeline's result.

    Raises:
        UserError: for dataset or option problems found before the pipeline starts.
    """
    options = pipeline_options(argv)
    opts = options.view_as(AnalyzeOptions)
    if not opts.dataset:
        raise UserError("--dataset is required (the convert job's --output)")
    return analyze(
        opts.dataset,
        options,
        opts.split,
        opts.record_batch_size,
    )


def print_summary(dataset: str, config: S3Config | None = None) -> None:
    """Prints what the analysis found: the images analyzed, pixel mean and std."""
    uri = storage.join(dataset, ANALYSIS_FILE)
    analysis = json.loads(storage.read_bytes(uri, config))
    mean, std = ([round(v, 2) for v in analysis[k]] for k in ("pixel_mean", "pixel_std"))
    print(f"\nAnalysis written to {uri}")
    print(
        f"  {analysis['examples']:,} {analysis['split']} images: pixel mean {mean}, "
        f"std {std} ({analysis['pixel_scale']})"
    )


def main(argv: list[str] | None = None) -> None:
    def _job(args):
        run(args)
        options = pipeline_options(args)
        print_summary(options.view_as(AnalyzeOptions).dataset, s3_config(options))

    cli_main("analyze", _job, argv, AnalyzeOptions, DESCRIPTION)


if __name__ == "__main__":
    main()
