"""The analyze job: preprocessing_fn with tft_unit on hand-computable images; convert +
analyze on the local S3 server (images of mixed sizes) and on local paths (GZIP shards),
checked against NumPy over the same decoded images; the reader's
``normalize="transform_fn"``; the exported serving model against the training pipeline.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from tensorflow_transform.beam import tft_unit
from tensorflow_transform.tf_metadata import dataset_metadata

from beam_jobs import analyze, convert
from beam_jobs.common import UserError
from devtools import sample_data
from devtools.local_s3 import put_tree
from examples.export_serving import export_serving_model, small_model
from s3tfr import s3, storage
from tfdata_reader import DatasetError, load_info, make_dataset
from tfdata_reader import transform as reader_transform
from transforms.statistics import make_preprocessing_fn, raw_schema
from transforms.verify import iter_records, parse_example

# ---------------------------------------------------------------- preprocessing_fn

# Three PNGs (lossless, so pixels are exact) of three different sizes. Channel G is 2x
# and B 3x channel R, so one set of hand sums gives all three channels.
_R = {"a1": [[0, 40]], "b1": [[20], [60]], "a2": [[20]]}  # (height, width) grids of R


def _png(rows) -> bytes:
    r = np.array(rows, np.uint8)
    return tf.io.encode_png(np.stack([r, 2 * r, 3 * r], axis=-1)).numpy()


class PreprocessingFnTest(tft_unit.TransformTestCase):
    def test_statistics_vocabulary_and_outputs(self):
        # R over all 5 pixels: 0, 40, 20, 60, 20 -> mean 28, E[x^2] = 6000 / 5 = 1200,
        # variance 1200 - 28^2 = 416. G and B: mean 56 and 84, std 2x and 3x.
        mean = np.array([28, 56, 84], np.float32)
        std = np.array([1, 2, 3], np.float32) * np.float32(math.sqrt(416))
        # classes: a: 2 examples, b: 1 -> weights 3 / (2 * 2) = 0.75 and 3 / (2 * 1) = 1.5
        rows = [("a1", "a", 0), ("b1", "b", 1), ("a2", "a", 0)]
        input_data = [
            {
                "image/encoded": _png(_R[k]),
                "image/class/text": text,
                "image/class/label": label,
            }
            for k, text, label in rows
        ]
        expected = []
        for (_, text, label), raw in zip(rows, input_data, strict=True):
            expected.append(
                {
                    **raw,
                    "image/class/text": text.encode(),
                    "label": label,
                    "class_weight": [0.75, 1.5][label],
                    "stats/pixel_mean": mean,
                    "stats/pixel_std": std,
                    "stats/pixels": 5,
                    "stats/class_counts": [2, 1],
                    "stats/class_weights": [0.75, 1.5],
                }
            )
        self.assertAnalyzeAndTransformResults(
            input_data,
            dataset_metadata.DatasetMetadata(raw_schema()),
            make_preprocessing_fn(["a", "b"]),
            expected,
            expected_vocab_file_contents={"labels": [b"a", b"b"]},
            # one example per batch: the totals must not depend on how TFT batches
            desired_batch_size=1,
        )


# ---------------------------------------------------------------- helpers


def _train_images(uri: str) -> list[tuple[bytes, np.ndarray]]:
    """(encoded, decoded uint8 pixels) of every train record, in manifest order."""
    info = load_info(uri)
    out = []
    for shard in info["splits"]["train"]["shards"]:
        for record in iter_records(
            storage.join(uri, shard["file"]), info["compression"]
        ):
            encoded = parse_example(record)["image/encoded"]
            out.append((encoded, tf.io.decode_image(encoded, channels=3).numpy()))
    return out


def _numpy_mean_std(images) -> tuple[np.ndarray, np.ndarray]:
    pixels = np.concatenate([p.reshape(-1, 3).astype(np.float64) for _, p in images])
    return pixels.mean(axis=0), pixels.std(axis=0)


def _check_statistics(uri: str, analysis: dict) -> list:
    images = _train_images(uri)
    mean, std = _numpy_mean_std(images)
    np.testing.assert_allclose(analysis["pixel_mean"], mean, atol=1e-3)
    np.testing.assert_allclose(analysis["pixel_std"], std, atol=1e-3)
    assert analysis["pixels"] == sum(p.shape[0] * p.shape[1] for _, p in images)
    info = load_info(uri)
    counts = info["splits"]["train"]["class_counts"]
    assert analysis["class_counts"] == counts
    total = sum(counts.values())
    for label, count in counts.items():
        assert analysis["class_weights"][label] == pytest.approx(
            total / (len(counts) * count), rel=1e-6
        )
    assert analysis["source_image_stats"] == info["image_stats"]
    labels = storage.read_bytes(storage.join(uri, "labels.txt")).decode().splitlines()
    vocabulary = reader_transform.transform_output(uri).vocabulary_by_name("labels")
    assert [v.decode() for v in vocabulary] == labels
    return images


def _channel_moments(batches) -> tuple[np.ndarray, np.ndarray]:
    pixels = np.concatenate([images.numpy().reshape(-1, 3) for images in batches])
    return pixels.mean(axis=0), pixels.std(axis=0)


# ---------------------------------------------------------------- on local S3


@pytest.fixture(scope="module")
def s3_analyzed(s3_server, tmp_path_factory) -> str:
    """Sample images of mixed sizes on S3, converted with --resize none and --analyze."""
    bucket = "analyze-module"
    s3.client().create_bucket(Bucket=bucket)
    src = str(tmp_path_factory.mktemp("analyze-src"))
    sample_data.write_sample_tree(src, per_class=6)
    put_tree(src, bucket, "images/")
    out = f"s3://{bucket}/dataset"
    convert.run(
        ["--input", f"s3://{bucket}/images/", "--output", out, "--resize", "none",
         "--validation_fraction", "0.2", "--num_shards", "2", "--analyze"]
    )  # fmt: skip
    return out


def test_s3_convert_analyze_statistics_match_numpy(s3_analyzed):
    analysis = json.loads(
        storage.read_bytes(storage.join(s3_analyzed, "analysis.json"))
    )
    images = _check_statistics(s3_analyzed, analysis)
    # --resize none kept the sources' mixed sizes
    assert len({p.shape for _, p in images}) > 1
    assert storage.exists(
        storage.join(s3_analyzed, "transformed_metadata/schema.pbtxt")
    )


def test_serving_model_predicts_as_training_pipeline(s3_analyzed, tmp_path):
    analysis = reader_transform.load_analysis(s3_analyzed)
    size = (64, 80)
    keras_model = small_model(size, len(analysis["labels"]))
    export_serving_model(
        keras_model,
        reader_transform.transform_output(
            s3_analyzed, cache_dir=str(tmp_path / "cache")
        ),
        str(tmp_path / "serving"),
        size,
    )
    serve = tf.saved_model.load(str(tmp_path / "serving")).signatures["serving_default"]
    # One shard at a time, in order: the same sequence as the records read directly.
    train = make_dataset(
        s3_analyzed, "train", batch_size=4, image_size=size, training=False,
        normalize="transform_fn", cycle_length=1,
        cache_dir=str(tmp_path / "shards"),
    )  # fmt: skip
    batches = [images for images, _ in train]
    # Statistics of the stored images; the reader centre-crops and rescales these mixed
    # sizes, which shifts the pixel population a little (exact in the local
    # test, where stored and read sizes agree).
    mean, std = _channel_moments(batches)
    np.testing.assert_allclose(mean, 0.0, atol=0.1)
    np.testing.assert_allclose(std, 1.0, atol=0.1)
    expected = np.concatenate([keras_model(images).numpy() for images in batches])
    encoded = [e for e, _ in _train_images(s3_analyzed)]
    served = serve(image_bytes=tf.constant(encoded))
    np.testing.assert_allclose(
        served["probabilities"].numpy(), expected, rtol=1e-5, atol=1e-6
    )
    names = [analysis["labels"][i] for i in served["class_ids"].numpy()]
    assert [n.decode() for n in served["class_names"].numpy()] == names


# ---------------------------------------------------------------- on local paths


@pytest.fixture(scope="module")
def local_dataset(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("analyze-local")
    sample_data.write_sample_tree(str(root / "src"), per_class=5, seed=3)
    out = str(root / "out")
    convert.run(
        ["--input", str(root / "src"), "--output", out, "--resize", "crop:40x48",
         "--validation_fraction", "0.2", "--num_shards", "2", "--compression", "gzip"]
    )  # fmt: skip
    return out


def test_local_analyze_and_reader_normalizes(local_dataset):
    with pytest.raises(DatasetError, match="not been analyzed"):
        make_dataset(local_dataset, normalize="transform_fn")
    # DirectRunner in_memory: bench/analyze.py runs the job multi-process.
    analyze.run(["--dataset", local_dataset, "--record_batch_size", "4"])
    analysis = reader_transform.load_analysis(local_dataset)
    _check_statistics(local_dataset, analysis)
    ds = make_dataset(
        local_dataset, "train", batch_size=8, image_size=(48, 40), training=False,
        normalize="transform_fn",
    )  # fmt: skip
    mean, std = _channel_moments(images for images, _ in ds)
    np.testing.assert_allclose(mean, 0.0, atol=1e-4)
    np.testing.assert_allclose(std, 1.0, atol=1e-4)

    info = load_info(local_dataset)
    info["splits"]["train"]["shards"][0]["sha256"] = "0" * 64  # as if reconverted
    with pytest.raises(DatasetError, match="other shards"):
        reader_transform.load_analysis(local_dataset, info=info)


def test_user_errors(tmp_path):
    with pytest.raises(UserError, match="--dataset is required"):
        analyze.run([])
    with pytest.raises(UserError, match="no s3tfr_manifest.json"):
        analyze.run(["--dataset", str(tmp_path)])
    # In a fresh interpreter: a user's mistake is answered before TensorFlow's import.
    script = (
        "import sys\n"
        "from beam_jobs import analyze\n"
        "from beam_jobs.common import UserError\n"
        "try:\n"
        "    analyze.run(sys.argv[1:])\n"
        "except UserError:\n"
        "    pass\n"
        "else:\n"
        "    sys.exit('no UserError')\n"
        "assert 'tensorflow' not in sys.modules, 'TensorFlow was imported'\n"
    )
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    command = [sys.executable, "-c", script, "--dataset", str(tmp_path)]
    subprocess.run(command, check=True, cwd=repo)
