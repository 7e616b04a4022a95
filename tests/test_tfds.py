"""TensorFlow Datasets reads a converted dataset: ``tfds.builder_from_directory(OUT)``.

Datasets are converted by the convert job (local and on the local S3 server), then loaded
with TFDS itself and compared, record by record, with the shards as the manifest lists
them. Also: the older layout (the manifest as ``dataset_info.json``) still reads, and a
prefix with TFDS's files but no manifest is refused as unfinished.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from beam_jobs import convert, inspect
from devtools.local_s3 import put_tree
from devtools.sample_data import write_sample_tree
from s3tfr import storage
from s3tfr.contract import LEGACY_MANIFEST, MANIFEST
from tfdata_reader import DatasetError, load_info, make_dataset
from transforms.commit import Lease
from transforms.tfds_metadata import TFDS_FEATURES, TFDS_FILES, TFDS_INFO, TFDS_LABELS

tfds = pytest.importorskip("tensorflow_datasets")

CLASSES = ("ant", "bee", "wasp")
PER_CLASS = 6
READER_DOC = os.path.join(
    os.path.dirname(os.path.dirname(__file__)), "docs", "READER.md"
)


def _convert(src: str, out: str, *extra: str) -> dict:
    convert.run(["--input", src, "--output", out, "--num_shards", "2",
                 "--validation_fraction", "0.3", *extra])  # fmt: skip
    return load_info(out)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> str:
    src = str(tmp_path_factory.mktemp("src"))
    write_sample_tree(src, classes=CLASSES, per_class=PER_CLASS, corrupt=True)
    return src


@pytest.fixture(scope="module")
def cropped(source, tmp_path_factory) -> str:
    """A converted dataset, JPEG, RGB, every image 40x32 (read-only)."""
    out = str(tmp_path_factory.mktemp("cropped"))
    _convert(source, out, "--resize", "crop:40x32")
    return out


def _shard_records(out: str, info: dict, split: str) -> dict[str, dict]:
    """The records of ``split`` as the manifest lists them, by source file name."""
    records = {}
    for shard in info["splits"][split]["shards"]:
        for raw in tf.data.TFRecordDataset(os.path.join(out, shard["file"])):
            feature = tf.train.Example.FromString(raw.numpy()).features.feature
            record = {
                k: getattr(v, v.WhichOneof("kind")).value[0] for k, v in feature.items()
            }
            records[record["image/filename"].decode()] = record
    return records


def _tfds_records(builder, split: str) -> dict[str, dict]:
    examples = {}
    for example in tfds.as_numpy(builder.as_dataset(split=split)):
        image = example["image"]
        examples[image["filename"].decode()] = image
    return examples


def _assert_tfds_reads_every_record(out: str) -> dict:
    """TFDS's counts, class names and every decoded record match the dataset's shards."""
    info = load_info(out)
    builder = tfds.builder_from_directory(out)
    assert {name: s.num_examples for name, s in builder.info.splits.items()} == {
        name: s["examples"] for name, s in info["splits"].items()
    }
    assert {name: s.num_shards for name, s in builder.info.splits.items()} == {
        name: s["num_shards"] for name, s in info["splits"].items()
    }
    labels = storage.read_bytes(os.path.join(out, "labels.txt")).decode().splitlines()
    assert (
        builder.info.features["image"]["class"]["label"].names
        == labels
        == info["labels"]
    )
    decoded = {}
    for split in info["splits"]:
        ours, theirs = _shard_records(out, info, split), _tfds_records(builder, split)
        assert (
            sorted(theirs) == sorted(ours)
            and len(theirs) == info["splits"][split]["examples"]
        )
        for name, record in ours.items():
            image = theirs[name]
            assert image["class"]["label"] == record["image/class/label"]
            assert (
                labels[image["class"]["label"]] == record["image/class/text"].decode()
            )
            assert image["class"]["text"] == record["image/class/text"]
            assert image["source_sha256"] == record["image/source_sha256"]
            assert image["format"] == record["image/format"]
            assert image["encoded"].dtype == np.uint8
            assert image["encoded"].shape == (
                record["image/height"],
                record["image/width"],
                record["image/channels"],
            )
            decoded[name] = (image["encoded"], record["image/encoded"])
    return decoded


def test_tfds_reads_every_record_of_every_split(cropped):
    decoded = _assert_tfds_reads_every_record(cropped)
    assert len(decoded) == len(CLASSES) * PER_CLASS
    builder = tfds.builder_from_directory(cropped)
    # A crop fixes the size, so TFDS knows the shape before it decodes an image.
    assert builder.info.features["image"]["encoded"].shape == (32, 40, 3)
    assert builder.info.features["image"]["encoded"].encoding_format == "jpeg"
    assert builder.info.file_format.value == "tfrecord"
    assert builder.info.name == "s3_tfrecords"
    for pixels, encoded in decoded.values():
        assert np.array_equal(pixels, tf.io.decode_jpeg(encoded).numpy())


def test_the_reader_docs_example_runs(cropped, capsys):
    with open(READER_DOC) as f:
        section = f.read().split("## Loading with TensorFlow Datasets", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.DOTALL)[1]
    assert '"/data/tfrecords"' in code
    namespace: dict = {}
    exec(code.replace('"/data/tfrecords"', repr(cropped)), namespace)  # noqa: S102
    printed = capsys.readouterr().out.splitlines()
    assert printed == [
        str(load_info(cropped)["splits"]["train"]["examples"]),
        str(list(CLASSES)),
    ]
    pairs = list(namespace["train"].as_numpy_iterator())
    assert len(pairs) == load_info(cropped)["splits"]["train"]["examples"]
    assert all(image.shape == (32, 40, 3) and 0 <= label < 3 for image, label in pairs)


def test_tfds_reads_png_grayscale_of_any_size(source, tmp_path):
    out = str(tmp_path / "out")
    _convert(source, out, "--image_format", "png", "--channels", "1")
    decoded = _assert_tfds_reads_every_record(out)
    builder = tfds.builder_from_directory(out)
    assert builder.info.features["image"]["encoded"].shape == (None, None, 1)
    assert builder.info.features["image"]["encoded"].encoding_format == "png"
    assert len({pixels.shape for pixels, _ in decoded.values()}) > 1
    for pixels, encoded in decoded.values():
        # PNG is lossless: TFDS's pixels are exactly those of the stored image.
        assert np.array_equal(
            pixels[..., 0], np.asarray(Image.open(io.BytesIO(encoded)))
        )


def test_tfds_metadata_of_an_s3_output(source, s3_bucket, tmp_path):
    # TensorFlow reads no s3:// paths without a filesystem plugin, so TFDS loads a local
    # copy: the TFDS files on S3 are the ones a local conversion writes.
    put_tree(source, s3_bucket, "images/")
    out = f"s3://{s3_bucket}/out/"
    _convert(f"s3://{s3_bucket}/images/", out, "--resize", "crop:40x32")
    copy = tmp_path / "copy"
    for rel, _size in storage.walk(out):
        storage.write_bytes(str(copy / rel), storage.read_bytes(storage.join(out, rel)))
    assert set(TFDS_FILES) | {MANIFEST} <= set(os.listdir(copy))
    decoded = _assert_tfds_reads_every_record(str(copy))
    assert len(decoded) == len(CLASSES) * PER_CLASS
    info = json.loads((copy / TFDS_INFO).read_text())
    assert info["description"].startswith(
        f"Images of 3 classes from s3://{s3_bucket}/images/"
    )


def test_tfds_files_are_replaced_by_a_rerun(source, tmp_path):
    out = str(tmp_path / "out")
    _convert(source, out, "--resize", "crop:40x32")
    _convert(source, out, "--resize", "crop:40x32", "--num_shards", "3")
    builder = tfds.builder_from_directory(out)
    assert builder.info.splits["train"].num_shards == 3
    _assert_tfds_reads_every_record(out)
    # gzip shards are beyond TFDS: a rerun with --compression gzip leaves none of its files.
    _convert(source, out, "--compression", "gzip")
    assert not any(os.path.exists(os.path.join(out, name)) for name in TFDS_FILES)
    assert load_info(out)["compression"] == "GZIP"


def test_a_rerun_removes_tfds_files_before_it_replaces_a_shard(cropped, tmp_path):
    out = str(tmp_path / "out")
    shutil.copytree(cropped, out)
    with Lease(out):
        # Held, as by a convert run before its first shard: TFDS finds no dataset.
        left = set(os.listdir(out))
        assert not (set(TFDS_FILES) | {MANIFEST}) & left
        assert "train-00000-of-00002.tfrecord" in left
        with pytest.raises(
            OSError, match=f"Could not read dataset info from .*{TFDS_INFO}"
        ):
            tfds.builder_from_directory(out)


def _older_layout(dataset: str, tmp_path) -> str:
    """A copy of ``dataset`` as older versions wrote it: the manifest as dataset_info.json,
    no TFDS metadata."""
    old = str(tmp_path / "old")
    shutil.copytree(dataset, old)
    for name in (TFDS_FEATURES, TFDS_LABELS):
        os.remove(os.path.join(old, name))
    os.replace(os.path.join(old, MANIFEST), os.path.join(old, LEGACY_MANIFEST))
    return old


def test_the_older_layout_still_reads(cropped, tmp_path, capsys):
    old = _older_layout(cropped, tmp_path)
    info = load_info(old)
    assert info == load_info(cropped)
    ds = make_dataset(old, "train", batch_size=4, image_size=(32, 40), training=False)
    labels = [int(label) for _images, batch in ds for label in batch.numpy()]
    assert len(labels) == info["splits"]["train"]["examples"]
    assert sorted(labels) == sorted(
        r["image/class/label"] for r in _shard_records(old, info, "train").values()
    )
    try:
        inspect.main([old, "--verify"])
        code = 0
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    output = captured.out + captured.err
    assert code == 0, output
    verdicts = {line.split()[1].rstrip(":") for line in output.splitlines()
                if line.startswith("PASS ") and ".tfrecord:" in line}  # fmt: skip
    listed = {s["file"] for split in info["splits"].values() for s in split["shards"]}
    assert verdicts == listed and "FAIL" not in output


def test_a_rerun_over_the_older_layout_owns_its_shards(cropped, tmp_path):
    old = _older_layout(cropped, tmp_path)
    stale = {n for n in os.listdir(old) if n.startswith("train-")}
    info = load_info(old)
    src = info["source"]["uri"]
    convert.run(["--input", src, "--output", old, "--num_shards", "3",
                 "--validation_fraction", "0.3", "--resize", "crop:40x32"])  # fmt: skip
    shards = {n for n in os.listdir(old) if n.endswith(".tfrecord")}
    assert "train-00000-of-00002.tfrecord" in stale and not stale & shards
    # Every shard left is listed: the older manifest's shards were the dataset's own.
    assert {s["file"] for split in load_info(old)["splits"].values()
            for s in split["shards"]} == shards  # fmt: skip
    assert json.loads(storage.read_bytes(os.path.join(old, TFDS_INFO)))["name"]
    _assert_tfds_reads_every_record(old)


def test_tfds_files_without_the_manifest_are_refused(cropped, tmp_path):
    # As a run that stopped between TFDS's files and the manifest leaves the prefix.
    half = str(tmp_path / "half")
    shutil.copytree(cropped, half)
    os.remove(os.path.join(half, MANIFEST))
    message = f"no {MANIFEST} under {half}: the convert job did not finish"
    with pytest.raises(DatasetError, match=message):
        load_info(half)
    with pytest.raises(DatasetError, match=message):
        make_dataset(half, "train")
