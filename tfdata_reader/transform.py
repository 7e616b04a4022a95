"""The analyze job's output for readers and serving (no Beam import).

In: a dataset prefix (``s3://bucket/prefix`` or a local path) that the analyze job
(``python -m beam_jobs.analyze``) has written to. Out:

- :func:`load_analysis`: ``OUT/analysis.json``, the statistics the transform baked in
  (label vocabulary, per-channel pixel mean/std, class counts and weights, source image
  sizes), validated and checked to belong to the dataset as it is now;
- :func:`pixel_normalizer`: the transform's pixel normalisation as a callable on float32
  0..255 batches, for ``make_dataset(normalize="transform_fn")``;
- :func:`transform_output`: ``tft.TFTransformOutput`` over ``OUT/transform_fn`` (copied to a
  local cache first when the dataset is on S3: TensorFlow 2.21 has no S3 filesystem), whose
  ``transform_features_layer()`` gives a serving model the same constants, label
  vocabulary and class weights.

``analysis.json`` is written last by the analyze job: it is the commit marker of the
transform output, as ``s3tfr_manifest.json`` is of the dataset.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable
from typing import Any

from s3tfr import s3, storage
from s3tfr.contract import (
    ANALYSIS_FILE,
    ANALYSIS_FORMAT_VERSION,
    TRANSFORM_FN_DIR,
    TRANSFORMED_METADATA_DIR,
    split_fingerprint,
)
from s3tfr.manifest import DatasetError, load_info, read_json
from s3tfr.s3 import S3Config
from tfdata_reader.cache import default_cache_dir

__all__ = [
    "load_analysis",
    "normalize_pixels",
    "pixel_normalizer",
    "transform_output",
]


def normalize_pixels(images, mean, std):
    """``(images - mean) / std`` per channel, on the 0..255 scale.

    The one definition of the normalisation: the reader (``normalize="transform_fn"``)
    and serving models call it with the transform's constants, so both compute the same
    values.
    """
    return (images - mean) / std


def _require(condition: bool, uri: str, what: str) -> None:
    if not condition:
        raise DatasetError(
            f"invalid {ANALYSIS_FILE} under {uri}: {what}; rerun the analyze job "
            f"(python -m beam_jobs.analyze --dataset {uri})"
        )


def _validate(analysis: Any, uri: str, info: dict) -> dict:
    _require(isinstance(analysis, dict), uri, "the top level is not a JSON object")
    _require(
        analysis.get("format_version") == ANALYSIS_FORMAT_VERSION,
        uri,
        f"format_version must be {ANALYSIS_FORMAT_VERSION}",
    )
    channels = analysis.get("pixel_mean"), analysis.get("pixel_std")
    _require(
        all(
            isinstance(v, list)
            and len(v) == 3
            and all(isinstance(x, (int, float)) and math.isfinite(x) for x in v)
            for v in channels
        ),
        uri,
        "'pixel_mean' and 'pixel_std' must be 3 finite numbers each",
    )
    _require(all(x > 0 for x in analysis["pixel_std"]), uri, "'pixel_std' must be > 0")
    _require(
        analysis.get("labels") == info["labels"], uri, "'labels' differ from labels.txt"
    )
    split = analysis.get("split")
    if split not in info["splits"] or analysis.get("fingerprint") != split_fingerprint(
        info, split
    ):
        raise DatasetError(
            f"{ANALYSIS_FILE} under {uri} was computed from other shards than the dataset "
            f"holds now (it was reconverted or appended to); rerun the analyze job "
            f"(python -m beam_jobs.analyze --dataset {uri})"
        )
    return analysis


def load_analysis(
    uri: str, config: S3Config | None = None, info: dict | None = None
) -> dict:
    """Reads and validates ``<uri>/analysis.json``.

    Args:
        uri: the dataset prefix, ``s3://bucket/prefix`` or a local directory.
        config: S3 client settings; ``None`` uses the standard AWS chain.
        info: the dataset's manifest if already loaded (else it is read).

    Returns:
        The statistics: ``labels``, ``pixel_mean`` / ``pixel_std`` (per channel, 0..255
        scale), ``class_counts`` / ``class_weights`` (by label), ``source_image_stats``,
        ``split``, ``examples``, ``pixels``.

    Raises:
        DatasetError: no analysis (the analyze job has not run or did not finish), an
            invalid one, or one computed from shards the dataset no longer holds.
    """
    info = info if info is not None else load_info(uri, config)
    analysis = read_json(
        uri,
        ANALYSIS_FILE,
        config,
        missing="the dataset has not been analyzed (or the analyze job did not finish); "
        f"run python -m beam_jobs.analyze --dataset {uri}",
        rerun="rerun the analyze job",
    )
    return _validate(analysis, uri, info)


def pixel_normalizer(analysis: dict) -> Callable:
    """The transform's normalisation as a callable on float32 0..255 image batches."""
    import tensorflow as tf

    mean = tf.constant(analysis["pixel_mean"], tf.float32)
    std = tf.constant(analysis["pixel_std"], tf.float32)
    return lambda images: normalize_pixels(images, mean, std)


def _local_copy(
    uri: str, analysis: dict, config: S3Config | None, cache_dir: str | None
) -> str:
    """A local directory holding the transform output of an S3 dataset (downloaded once).

    The directory is named by the analysis fingerprint and the run's time, so a rerun of the
    analyze job downloads its new output rather than reusing the old one.
    """
    key = hashlib.sha256(
        f"{uri}|{analysis['fingerprint']}|{analysis['created']}".encode()
    ).hexdigest()[:24]
    root = os.path.join(cache_dir or default_cache_dir(), f"transform-{key}")
    if os.path.isdir(root):
        return root
    staging = f"{root}.tmp-{os.getpid()}"
    for folder in (TRANSFORM_FN_DIR, TRANSFORMED_METADATA_DIR):
        for name, _size in storage.walk(storage.join(uri, folder), config):
            target = os.path.join(staging, folder, *name.split("/"))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with open(target, "wb") as f:
                f.write(
                    storage.read_bytes(storage.join(uri, f"{folder}/{name}"), config)
                )
    os.replace(staging, root)
    return root


def transform_output(
    uri: str,
    config: S3Config | None = None,
    cache_dir: str | None = None,
    analysis: dict | None = None,
):
    """``tft.TFTransformOutput`` of an analyzed dataset, local or on S3.

    Args:
        uri: the dataset prefix.
        config: S3 client settings.
        cache_dir: where an S3 dataset's transform output is copied (default: the
            reader's shard cache directory).
        analysis: the dataset's :func:`load_analysis` result if already loaded.

    Returns:
        A ``tensorflow_transform.TFTransformOutput``.

    Raises:
        DatasetError: as :func:`load_analysis`.
    """
    import tensorflow_transform as tft

    analysis = analysis if analysis is not None else load_analysis(uri, config)
    local = _local_copy(uri, analysis, config, cache_dir) if s3.is_s3(uri) else uri
    return tft.TFTransformOutput(local)
