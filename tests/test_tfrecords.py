"""The hand-written Example encoder and TFRecord framing against TensorFlow's own."""

from __future__ import annotations

import pytest
import tensorflow as tf

from transforms.examples import TFRecordFile, encode_example

FEATURES = {
    "image/encoded": bytes(range(256)) * 3,
    "image/format": b"jpeg",
    "image/height": 375,
    "image/width": 2**40,
    "image/class/label": 0,
    "negative": -5,
    "image/class/text": "ünïcode".encode(),
    "empty": b"",
}


def _tf_example(features) -> tf.train.Example:
    feature = {}
    for key, value in features.items():
        if isinstance(value, bytes):
            feature[key] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))
        else:
            feature[key] = tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))
    return tf.train.Example(features=tf.train.Features(feature=feature))


def test_example_bytes_equal_tensorflow_deterministic_serialization():
    ours = encode_example(FEATURES)
    assert ours == _tf_example(FEATURES).SerializeToString(deterministic=True)
    assert tf.train.Example.FromString(ours) == _tf_example(FEATURES)


@pytest.mark.parametrize("compression", ["", "GZIP"])
def test_tfrecord_files_read_by_tensorflow_and_deterministic(tmp_path, compression):
    records = [encode_example({"i": i, "b": bytes([i]) * i}) for i in range(50)]
    for name in ("a", "b"):
        with TFRecordFile(str(tmp_path / name), compression) as f:
            for record in records:
                f.write(record)
    assert (tmp_path / "a").read_bytes() == (tmp_path / "b").read_bytes()
    read = tf.data.TFRecordDataset(str(tmp_path / "a"), compression_type=compression)
    assert [bytes(r) for r in read.as_numpy_iterator()] == records
    if not compression:
        path = str(tmp_path / "tf")
        with tf.io.TFRecordWriter(path) as writer:
            for record in records:
                writer.write(record)
        assert (tmp_path / "a").read_bytes() == (tmp_path / "tf").read_bytes()
