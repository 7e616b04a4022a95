"""AnalyzeImages: a converted dataset's shards in; ``OUT/transform_fn/``,
``OUT/transformed_metadata/`` and, last, ``OUT/analysis.json`` out.

tensorflow-transform computes, in one pass over the training split's records:

- the label vocabulary (``tft.vocabulary``), which must agree with ``labels.txt``;
- the per-channel pixel mean and standard deviation over every pixel of every image, as
  exact int64 sums of per-image sums (images may differ in size), so the result does not
  depend on batching or worker count;
- class counts and inverse-frequency class weights.

The records reach TFT as Arrow record batches (TFXIO's ``TFExampleRecord`` decoder), read
shard by shard as streams: every analyzer is a combiner, so memory per worker is one
record batch plus constants whatever the dataset size.

The transform graph maps the class text to its vocabulary index, gives each example its
class weight, and gives every example the dataset's statistics (``stats/…``): a serving
model reads the normalisation constants from it. It does not decode or resize images
itself: TensorFlow runs every stateful op of a graph, and the reader's resize ops carry
shape assertions (stateful), so an image output would be computed during the analysis
too, tripling its cost. Images are decoded and sized by the reader's ops
(``tfdata_reader.ops``) in training and serving alike. ``analysis.json`` records the
same statistics for readers (``tfdata_reader.transform``) and people, with the source
image size statistics of ``s3tfr_manifest.json``.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
from collections.abc import Callable, Sequence

import apache_beam as beam

from s3tfr import storage
from s3tfr.contract import (
    ANALYSIS_FILE,
    ANALYSIS_FORMAT_VERSION,
    CLASS_COUNTS_KEY,
    CLASS_WEIGHT_KEY,
    CLASS_WEIGHTS_KEY,
    IMAGE_KEY,
    LABEL_KEY,
    LABEL_TEXT_KEY,
    LABEL_VOCABULARY,
    MANIFEST,
    PIXEL_COUNT_KEY,
    PIXEL_MEAN_KEY,
    PIXEL_STD_KEY,
    TRANSFORM_FN_DIR,
    TRANSFORMED_LABEL_KEY,
    TRANSFORMED_METADATA_DIR,
    split_fingerprint,
)
from s3tfr.host import quiet_tensorflow_import
from s3tfr.manifest import shard_uris
from s3tfr.s3 import S3Config
from transforms.progress import ProgressFolder
from transforms.verify import iter_records

# Last: a worker process that unpickles these stages imports TensorFlow here first.
with quiet_tensorflow_import():
    import tensorflow as tf
    import tensorflow_transform as tft
    import tensorflow_transform.beam as tft_beam
    from tensorflow_transform.tf_metadata import schema_utils
    from tfx_bsl.public import tfxio

__all__ = [
    "RAW_FEATURE_SPEC",
    "AnalyzeImages",
    "ReadRecordBatches",
    "make_preprocessing_fn",
    "publish_analysis",
    "raw_schema",
]

RAW_FEATURE_SPEC = {
    IMAGE_KEY: tf.io.FixedLenFeature([], tf.string),
    LABEL_KEY: tf.io.FixedLenFeature([], tf.int64),
    LABEL_TEXT_KEY: tf.io.FixedLenFeature([], tf.string),
}
# A channel with one value everywhere has std 0: dividing by this instead keeps the
# normalised images finite.
_MIN_STD = 1e-3


def _pixel_moments(encoded: tf.Tensor) -> tf.Tensor:
    """int64 ``(batch, 7)``: per image, channel sums and sums of squares, and pixel count.

    Exact integers, so the dataset totals do not depend on the image sizes or on the
    order in which TFT combines batches. Per image they are summed in float64, which is
    exact here (every partial sum is an integer below 2**53 for any image under 10**11
    pixels) and 20 % cheaper per image than int64 arithmetic.
    """

    def _one(data):
        # channels=3 and no animation, as the reader decodes (tfdata_reader.ops.to_image).
        image = tf.io.decode_image(data, channels=3, expand_animations=False)
        shape = tf.shape(image, out_type=tf.int64)
        # (3, pixels): each channel's values contiguous, so each sum is one inner
        # reduction rather than a strided one over a trailing axis of 3.
        channels = tf.cast(tf.transpose(tf.reshape(image, [-1, 3])), tf.float64)
        return tf.concat(
            [
                tf.cast(tf.reduce_sum(channels, axis=1), tf.int64),
                tf.cast(tf.reduce_sum(channels * channels, axis=1), tf.int64),
                [shape[0] * shape[1]],
            ],
            axis=0,
        )

    return tf.map_fn(_one, encoded, fn_output_signature=tf.TensorSpec([7], tf.int64))


def _mean_std(
    sums: tf.Tensor, squares: tf.Tensor, count: tf.Tensor
) -> tuple[tf.Tensor, tf.Tensor]:
    """Per-channel mean and (population) standard deviation from exact totals."""
    n = tf.cast(count, tf.float64)
    mean = tf.cast(sums, tf.float64) / n
    variance = tf.maximum(tf.cast(squares, tf.float64) / n - mean * mean, 0.0)
    std = tf.maximum(tf.sqrt(variance), _MIN_STD)
    return tf.cast(mean, tf.float32), tf.cast(std, tf.float32)


def _broadcast(value: tf.Tensor, batch: tf.Tensor) -> tf.Tensor:
    return tf.broadcast_to(value, tf.concat([[batch], tf.shape(value)], axis=0))


def make_preprocessing_fn(labels: Sequence[str]) -> Callable[[dict], dict]:
    """The dataset's ``preprocessing_fn``.

    Args:
        labels: the class names of ``labels.txt``, in order (``image/class/label`` indexes
            them).

    Returns:
        A TFT ``preprocessing_fn``: raw features (:data:`RAW_FEATURE_SPEC`) in; the raw
        features plus ``label``, ``class_weight`` and the broadcast statistics
        (``stats/…``, see ``tfdata_reader.transform``) out.
    """
    labels = list(labels)
    num_classes = len(labels)

    def preprocessing_fn(inputs: dict) -> dict:
        outputs = inputs.copy()
        encoded = inputs[IMAGE_KEY]
        # The statistics follow the image input's batch: a serving model that feeds only
        # image bytes gets them.
        batch = tf.shape(encoded)[0]

        # One combiner for every exact total: each analyzer adds its own Beam stages
        # and graph phase, and those dominate the job's fixed cost.
        totals = tft.sum(
            tf.concat(
                [
                    _pixel_moments(encoded),
                    tf.one_hot(inputs[LABEL_KEY], num_classes, dtype=tf.int64),
                ],
                axis=1,
            ),
            reduce_instance_dims=False,
            name="totals",
        )
        pixel_count = totals[6]
        mean, std = _mean_std(totals[0:3], totals[3:6], pixel_count)
        counts = totals[7:]

        # TFT orders a vocabulary by frequency; reserving labels.txt's names keeps its
        # indices equal to image/class/label. A class text outside labels.txt would be
        # appended after them, which the analyze job reports as an error.
        vocabulary = tft.vocabulary(
            inputs[LABEL_TEXT_KEY],
            vocab_filename=LABEL_VOCABULARY,
            reserved_tokens=labels,
        )
        outputs[TRANSFORMED_LABEL_KEY] = tft.apply_vocabulary(
            inputs[LABEL_TEXT_KEY], vocabulary
        )

        counts_f = tf.cast(counts, tf.float64)
        # "balanced" weights: total / (classes * count); a class with no example gets 0.
        weights = tf.cast(
            tf.math.divide_no_nan(tf.reduce_sum(counts_f), num_classes * counts_f),
            tf.float32,
        )
        outputs[CLASS_WEIGHT_KEY] = tf.gather(weights, inputs[LABEL_KEY])

        outputs[PIXEL_MEAN_KEY] = _broadcast(mean, batch)
        outputs[PIXEL_STD_KEY] = _broadcast(std, batch)
        outputs[PIXEL_COUNT_KEY] = _broadcast(pixel_count, batch)
        outputs[CLASS_COUNTS_KEY] = _broadcast(counts, batch)
        outputs[CLASS_WEIGHTS_KEY] = _broadcast(weights, batch)
        return outputs

    return preprocessing_fn


def raw_schema():
    """The raw features' ``tensorflow_metadata`` schema (for TFXIO and tft_unit)."""
    return schema_utils.schema_from_feature_spec(RAW_FEATURE_SPEC)


class _ReadShardFn(beam.DoFn):
    """Shard URI -> its serialized records, counted in the progress markers."""

    def __init__(
        self, compression: str, config: S3Config | None, progress: ProgressFolder | None
    ) -> None:
        self._compression = compression
        self._config = config
        self._progress = progress

    def process(self, uri: str):
        if self._progress is None:
            yield from iter_records(uri, self._compression, self._config)
            return
        task = self._progress.task(uri.rsplit("/", 1)[-1])
        for record in iter_records(uri, self._compression, self._config):
            task.add(1)
            yield record
        task.finish()


class ReadRecordBatches(beam.PTransform):
    """Shard URIs in (at construction); Arrow record batches of the raw features out.

    Each shard is streamed by one DoFn call (S3 or local, the project's S3 settings);
    TFXIO's ``TFExampleRecord`` decodes batches of records into Arrow, keeping only the
    features of :data:`RAW_FEATURE_SPEC`.

    Args:
        shard_uris: the shards to read.
        compression: ``""``, ``"GZIP"`` or ``"ZLIB"``, as in the manifest.
        config: S3 client settings.
        batch_size: records per record batch.
        progress: where to report the records read, per shard, if anywhere.

    Attributes:
        tensor_adapter_config: what ``tft_beam.AnalyzeDataset`` needs beside the batches.
    """

    def __init__(
        self,
        shard_uris: Sequence[str],
        compression: str,
        config: S3Config | None,
        batch_size: int,
        progress: ProgressFolder | None = None,
    ) -> None:
        super().__init__()
        self._uris = list(shard_uris)
        self._compression = compression
        self._config = config
        self._batch_size = batch_size
        self._progress = progress
        self._tfxio = tfxio.TFExampleRecord(
            file_pattern=self._uris, validate=False, schema=raw_schema()
        )
        self.tensor_adapter_config = self._tfxio.TensorAdapterConfig()

    def expand(self, pbegin):
        return (
            pbegin
            | "ShardUris" >> beam.Create(self._uris)
            # one shard per DoFn call, spread over workers
            | "SpreadShards" >> beam.Reshuffle()
            | "ReadRecords"
            >> beam.ParDo(_ReadShardFn(self._compression, self._config, self._progress))
            # serialized tf.train.Example
            | "ToRecordBatches" >> self._tfxio.RawRecordToRecordBatch(self._batch_size)
        )


def _upload_tree(local_root: str, output_root: str, folder: str, config) -> None:
    """Replaces ``output_root/folder`` by the files of ``local_root/folder``."""
    uploaded = set()
    source = os.path.join(local_root, folder)
    for dirpath, _dirs, files in os.walk(source):
        for name in files:
            rel = os.path.relpath(os.path.join(dirpath, name), source).replace(
                os.sep, "/"
            )
            storage.put_file(
                os.path.join(dirpath, name),
                storage.join(output_root, f"{folder}/{rel}"),
                config,
            )
            uploaded.add(rel)
    target = storage.join(output_root, folder)
    for name, _size in storage.walk(target, config):
        if name not in uploaded:  # left by an earlier analysis
            storage.delete(storage.join(target, name), config)


def _statistics(output_dir: str, labels: list[str]) -> dict:
    """Reads the analyzer results back out of the transform graph."""
    output = tft.TFTransformOutput(output_dir)
    # The statistics are the same for every example: one made-up example gives them.
    probe = {
        IMAGE_KEY: tf.io.encode_png(tf.zeros([1, 1, 3], tf.uint8))[tf.newaxis],
        LABEL_KEY: tf.constant([0], tf.int64),
        LABEL_TEXT_KEY: tf.constant([labels[0]]),
    }
    stats = output.transform_raw_features(probe)

    def first(key):
        return stats[key].numpy()[0]

    vocabulary = [v.decode() for v in output.vocabulary_by_name(LABEL_VOCABULARY)]
    if vocabulary != labels:
        extra = [v for v in vocabulary if v not in labels]
        raise ValueError(
            f"the records hold class names that labels.txt does not list: {extra[:10]}; "
            "the dataset is inconsistent: reconvert it"
        )
    counts = first(CLASS_COUNTS_KEY)
    weights = first(CLASS_WEIGHTS_KEY)
    return {
        # float32 values, written exactly (a float32 is exact as a JSON double).
        "pixel_mean": [float(v) for v in first(PIXEL_MEAN_KEY)],
        "pixel_std": [float(v) for v in first(PIXEL_STD_KEY)],
        "pixels": int(first(PIXEL_COUNT_KEY)),
        "class_counts": {label: int(counts[i]) for i, label in enumerate(labels)},
        "class_weights": {label: float(weights[i]) for i, label in enumerate(labels)},
    }


def publish_analysis(
    _unused,
    staging: str,
    output_root: str,
    info: dict,
    split: str,
    config: S3Config | None,
) -> dict:
    """Moves the transform output to the dataset, then writes ``analysis.json`` last.

    Raises:
        ValueError: when the analyzed records disagree with the manifest (class names or
            counts): nothing is published then.
    """
    labels = info["labels"]
    stats = _statistics(staging, labels)
    want = {
        label: info["splits"][split]["class_counts"].get(label, 0) for label in labels
    }
    if stats["class_counts"] != want:
        raise ValueError(
            f"class counts of the {split} records {stats['class_counts']} differ from "
            f"{MANIFEST} {want}: the dataset is inconsistent: reconvert it"
        )
    for folder in (TRANSFORMED_METADATA_DIR, TRANSFORM_FN_DIR):
        _upload_tree(staging, output_root, folder, config)
    analysis = {
        "format_version": ANALYSIS_FORMAT_VERSION,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "split": split,
        "fingerprint": split_fingerprint(info, split),
        "examples": info["splits"][split]["examples"],
        "labels": labels,
        "transform_fn": TRANSFORM_FN_DIR,
        "pixel_scale": "0..255",
        **stats,
        "source_image_stats": info.get("image_stats", {}),
    }
    storage.write_bytes(
        storage.join(output_root, ANALYSIS_FILE),
        (json.dumps(analysis, indent=2, ensure_ascii=False) + "\n").encode(),
        config,
    )
    shutil.rmtree(staging, ignore_errors=True)
    return analysis


class AnalyzeImages(beam.PTransform):
    """Analyzes one split of a converted dataset with tensorflow-transform.

    Args:
        dataset: the dataset prefix (``s3://`` or local); the output goes there too.
        info: its validated manifest (``tfdata_reader.load_info``).
        split: the split to analyze (``train``).
        temp_dir: a local directory for TFT's temporary files.
        config: S3 client settings.
        batch_size: records per Arrow record batch.
        progress: where to report the records read, per shard, if anywhere.

    Returns:
        A one-element PCollection with the analysis dict written to ``analysis.json``.
    """

    def __init__(
        self,
        dataset: str,
        info: dict,
        split: str,
        temp_dir: str,
        config: S3Config | None,
        batch_size: int,
        progress: ProgressFolder | None = None,
    ) -> None:
        super().__init__()
        self._dataset = dataset
        self._info = info
        self._split = split
        self._temp_dir = temp_dir
        self._config = config
        self._batch_size = batch_size
        self._progress = progress

    def expand(self, pbegin):
        shards = [uri for uri, _ in shard_uris(self._info, self._dataset, self._split)]
        read = ReadRecordBatches(
            shards,
            self._info.get("compression", ""),
            self._config,
            self._batch_size,
            self._progress,
        )
        batches = pbegin | "ReadRecordBatches" >> read
        preprocessing_fn = make_preprocessing_fn(self._info["labels"])
        with tft_beam.Context(temp_dir=os.path.join(self._temp_dir, "tft")):
            transform_fn = (
                batches,
                read.tensor_adapter_config,
            ) | "AnalyzeDataset" >> tft_beam.AnalyzeDataset(preprocessing_fn)
        # TFT writes through tf.io.gfile, which has no S3 filesystem in TensorFlow 2.21:
        # it writes to a local staging directory, and one step moves the files to the
        # dataset (local or S3) and writes analysis.json last.
        staging = os.path.join(self._temp_dir, "staging")
        return (
            transform_fn
            | "WriteTransformFn" >> tft_beam.WriteTransformFn(staging)
            | "Publish"
            >> beam.Map(
                publish_analysis,
                staging,
                self._dataset,
                self._info,
                self._split,
                self._config,
            )
        )
