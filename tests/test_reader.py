"""tfdata_reader against a converted sample dataset, locally and on the local S3 server."""

from __future__ import annotations

import collections
import copy
import hashlib
import http.server
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import types

import botocore.endpoint
import botocore.exceptions
import numpy as np
import pytest
import tensorflow as tf

import tfdata_reader
from beam_jobs import convert
from devtools import sample_data
from devtools.local_s3 import put_tree
from s3tfr import s3
from s3tfr.contract import MANIFEST
from s3tfr.s3 import S3Config
from tfdata_reader import DatasetError, ShardCache, load_info, make_dataset, ops
from tfdata_reader.dataset import ReaderStats

SIZE = (32, 32)


def convert_sample(root) -> str:
    """Converts the sample tree (8 images a class) under ``root``: 4 train shards of
    17 records in all, 4 validation shards of 7."""
    src, out = str(root / "src"), str(root / "out")
    sample_data.write_sample_tree(src, per_class=8)
    convert.run(
        [
            "--input",
            src,
            "--output",
            out,
            "--resize",
            "crop:48x48",
            "--num_shards",
            "4",
            "--validation_fraction",
            "0.25",
        ]
    )
    return out


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> str:
    """One converted sample dataset, shared by the module's tests."""
    return convert_sample(tmp_path_factory.mktemp("reader"))


@pytest.fixture
def s3_dataset(converted, s3_bucket) -> str:
    put_tree(converted, s3_bucket, "ds/")
    return f"s3://{s3_bucket}/ds"


def _examples(ds) -> collections.Counter:
    """Multiset of (image digest, label) over a dataset of uint8 batches."""
    seen: collections.Counter = collections.Counter()
    for images, labels in ds:
        for image, label in zip(images.numpy(), labels.numpy()):
            seen[(hashlib.sha256(image.tobytes()).hexdigest(), int(label))] += 1
    return seen


def _plain(uri, split="train", **kwargs):
    """Unaugmented uint8 reading, so every example has one identity."""
    kwargs.setdefault("training", False)
    return make_dataset(
        uri,
        split,
        batch_size=5,
        image_size=SIZE,
        dtype=tf.uint8,
        augment=False,
        **kwargs,
    )


def test_load_info_validates_manifest(converted):
    info = load_info(converted)
    assert info["labels"] == ["bird", "cat", "dog"]
    assert info["splits"]["train"]["num_shards"] == 4
    for bad_name in (
        "../train-00000-of-00004.tfrecord",
        "/etc/train-00000-of-00004.tfrecord",
        "train-00000-of-00004.tfrecord/..",
        "validation-00000-of-00004.tfrecord",
    ):
        broken = copy.deepcopy(info)
        broken["splits"]["train"]["shards"][0]["file"] = bad_name
        with pytest.raises(DatasetError, match="file"):
            tfdata_reader.validate_info(broken, "x")
    broken = copy.deepcopy(info)
    broken["splits"]["train"]["shards"][1]["sha256"] = "../../etc/passwd"
    with pytest.raises(DatasetError, match="sha256"):
        tfdata_reader.validate_info(broken, "x")
    broken = copy.deepcopy(info)
    broken["splits"]["train"]["shards"][1]["examples"] = -1
    with pytest.raises(DatasetError, match="examples"):
        tfdata_reader.validate_info(broken, "x")


def test_incomplete_dataset_is_refused(converted, s3_bucket):
    put_tree(converted, s3_bucket, "ds/")
    s3.client().delete_object(Bucket=s3_bucket, Key=f"ds/{MANIFEST}")
    with pytest.raises(
        DatasetError, match="no s3tfr_manifest.json under s3://.*convert job"
    ):
        make_dataset(f"s3://{s3_bucket}/ds")
    with pytest.raises(DatasetError, match="no split 'test'"):
        make_dataset(converted, "test")


def test_cache_names_cannot_escape(tmp_path):
    cache = ShardCache(str(tmp_path / "cache"))
    good = {"sha256": "a" * 64, "file": "../../x", "bytes": 1}
    path = cache.path_for(good)
    assert os.path.dirname(path) == os.path.realpath(tmp_path / "cache")
    assert os.path.basename(path) == "a" * 64 + ".tfrecord"
    for digest in ("../../etc/passwd", "A" * 64, "a" * 63 + "/", None):
        with pytest.raises(ValueError):
            cache.path_for({"sha256": digest, "bytes": 1})


def test_every_example_once_from_s3(converted, s3_dataset, tmp_path):
    info = load_info(converted)
    local = _examples(_plain(converted))
    remote = _examples(
        _plain(s3_dataset, shuffle=True, seed=3, cache_dir=str(tmp_path))
    )
    assert remote == local
    assert sum(remote.values()) == info["splits"]["train"]["examples"]
    by_label = collections.Counter()
    for (_, label), n in remote.items():
        by_label[info["labels"][label]] += n
    assert by_label == info["splits"]["train"]["class_counts"]


@pytest.mark.parametrize(
    "split,workers", [("train", 2), ("train", 3), ("validation", 5)]
)
def test_workers_see_each_example_once(converted, split, workers):
    whole = _examples(_plain(converted, split))
    parts = [
        _examples(
            _plain(
                converted,
                split,
                num_workers=workers,
                worker_index=w,
                shuffle=True,
                seed=w,
            )
        )
        for w in range(workers)
    ]
    assert sum(parts, collections.Counter()) == whole
    for a in range(workers):
        for b in range(a + 1, workers):
            assert not set(parts[a]) & set(parts[b])


def test_input_context_shards_like_worker_index(converted):
    context = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=1)
    via_context = make_dataset(
        converted,
        batch_size=10,
        image_size=SIZE,
        training=False,
        dtype=tf.uint8,
        input_context=context,
    )
    assert _examples(via_context) == _examples(
        _plain(converted, num_workers=2, worker_index=1)
    )


def test_seeded_runs_are_identical(converted):
    def run(seed):
        ds = make_dataset(
            converted, batch_size=4, image_size=SIZE, training=True, seed=seed
        )
        return [(x.numpy(), y.numpy()) for x, y in ds.take(3)]

    first, second, other = run(11), run(11), run(12)
    for (xa, ya), (xb, yb) in zip(first, second):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    assert any(not np.array_equal(a[0], c[0]) for a, c in zip(first, other))


@pytest.mark.parametrize("normalize", ["unit", ([0.5, 0.4, 0.3], [0.2, 0.25, 0.3])])
def test_shuffle_buffer_of_images_reads_the_same_values(converted, normalize):
    # Records larger than a uint8 image of the output size are shuffled as images, which
    # are normalised per batch; otherwise records are shuffled and each image normalised
    # on its own (as without shuffling). Both give the same values.
    size = (4, 4)
    info = load_info(converted)
    assert info["splits"]["train"]["bytes"] > info["splits"]["train"]["examples"] * 48

    def examples(shuffle):
        ds = make_dataset(
            converted, batch_size=5, image_size=size, training=False, shuffle=shuffle,
            seed=1, normalize=normalize,
        )  # fmt: skip
        return collections.Counter(
            (image.tobytes(), int(label))
            for images, labels in ds
            for image, label in zip(images.numpy(), labels.numpy())
        )

    assert examples(shuffle=True) == examples(shuffle=False)


def test_unshuffled_reads_keep_their_order_by_default(converted):
    # An evaluation pass (no shuffle, no seed) must not reorder records by thread timing:
    # predictions are matched to files by position.
    def options(**kwargs):
        ds = make_dataset(converted, batch_size=4, image_size=SIZE, **kwargs)
        return ds.options().deterministic

    assert options(training=False)
    assert options(training=True, seed=1)
    assert not options(training=True)
    assert not options(training=False, deterministic=False)


def test_checkpoint_resumes_mid_epoch(converted, tmp_path):
    def dataset():
        return make_dataset(
            converted,
            batch_size=3,
            image_size=SIZE,
            training=True,
            seed=5,
            dtype=tf.uint8,
            augment=False,
        )

    def rest(iterator):
        return [(x.numpy(), y.numpy()) for x, y in iterator]

    iterator = iter(dataset())
    head = [next(iterator) for _ in range(2)]
    saved = tf.train.Checkpoint(iterator=iterator).save(str(tmp_path / "ckpt"))
    tail = rest(iterator)
    resumed = iter(dataset())
    tf.train.Checkpoint(iterator=resumed).restore(saved).assert_consumed()
    tail_again = rest(resumed)
    assert len(tail) == len(tail_again) > 0
    for (xa, ya), (xb, yb) in zip(tail, tail_again):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    # head + tail is one epoch: nothing repeated, nothing skipped (up to drop_remainder).
    epoch = _examples(
        (x, y) for x, y in head + [(tf.constant(a), tf.constant(b)) for a, b in tail]
    )
    whole = _examples(_plain(converted))
    assert not (epoch - whole) and sum(epoch.values()) == len(head + tail) * 3
    assert sum(whole.values()) - sum(epoch.values()) < 3


def test_second_epoch_reads_from_cache(s3_dataset, s3_proxy, tmp_path):
    proxy = s3_proxy()
    cache = ShardCache(
        str(tmp_path / "cache"), config=S3Config(s3_endpoint_url=proxy.endpoint)
    )
    ds = _plain(
        s3_dataset, cache=cache, config=S3Config(s3_endpoint_url=proxy.endpoint)
    )
    first = _examples(ds)
    after_first = proxy.requests
    second = _examples(ds)
    assert first == second
    assert cache.stats["downloads"] == 4
    assert proxy.requests == after_first, "the second epoch went to S3"
    assert len(list((tmp_path / "cache").glob("*.tfrecord"))) == 4


def test_cache_bound_evicts(s3_dataset, tmp_path):
    shards = load_info(s3_dataset)["splits"]["train"]["shards"]
    bound = max(s["bytes"] for s in shards)
    cache = ShardCache(str(tmp_path / "cache"), max_bytes=bound)
    got = _examples(_plain(s3_dataset, cache=cache))
    assert sum(got.values()) == sum(s["examples"] for s in shards)
    assert cache.stats["evicted"] >= 1
    kept = [f.stat().st_size for f in (tmp_path / "cache").rglob("*.tfrecord")]
    assert sum(kept) <= bound


def test_retries_injected_faults(converted, s3_dataset, s3_proxy, tmp_path):
    faults = {"slowdown": 0.15, "internal_error": 0.1, "reset": 0.1, "truncate": 0.15}
    proxy = s3_proxy(faults=faults, seed=4)
    config = S3Config(s3_endpoint_url=proxy.endpoint)
    cache = ShardCache(str(tmp_path / "cache"), config=config, part_bytes=16 * 1024)
    ds = _plain(s3_dataset, "train", cache=cache, config=config)
    assert _examples(ds) == _examples(_plain(converted))
    assert sum(proxy.injected.values()) > 0 and proxy.injected["truncate"] > 0


def test_missing_or_changed_shard_names_it(s3_dataset, tmp_path):
    bucket = s3.parse(s3_dataset)[0]
    key = "ds/train-00002-of-00004.tfrecord"
    data = bytearray(s3.get_bytes(bucket, key))
    data[len(data) // 2] ^= 0xFF  # same size, other bytes: only the sha256 can tell
    s3.put_bytes(bucket, key, bytes(data))
    ds = _plain(s3_dataset, cache_dir=str(tmp_path / "c1"))
    with pytest.raises(tf.errors.OpError, match="train-00002-of-00004.*sha256"):
        _examples(ds)
    s3.client().delete_object(Bucket=bucket, Key=key)
    with pytest.raises(DatasetError, match="train-00002-of-00004.tfrecord.*missing"):
        _plain(s3_dataset, cache_dir=str(tmp_path / "c2"))


def _with_bad_record(converted, tmp_path) -> tuple[str, str]:
    """A copy of the dataset with one undecodable image added to a train shard."""
    out = str(tmp_path / "bad")
    shutil.copytree(converted, out)
    info = load_info(out)
    shard = info["splits"]["train"]["shards"][0]
    path = os.path.join(out, shard["file"])
    records = list(tf.data.TFRecordDataset(path).as_numpy_iterator())
    example = tf.train.Example()
    example.ParseFromString(records[0])
    example.features.feature["image/encoded"].bytes_list.value[0] = (
        b"\xff\xd8not a jpeg"
    )
    records.insert(1, example.SerializeToString())
    with tf.io.TFRecordWriter(path) as writer:
        for record in records:
            writer.write(record)
    with open(path, "rb") as f:
        data = f.read()
    shard.update(
        examples=len(records), bytes=len(data), sha256=hashlib.sha256(data).hexdigest()
    )
    info["splits"]["train"]["examples"] += 1
    with open(os.path.join(out, MANIFEST), "w") as f:
        json.dump(info, f)
    return out, path


def test_bad_record_fails_or_is_skipped_and_counted(converted, tmp_path, caplog):
    out, shard_path = _with_bad_record(converted, tmp_path)
    with pytest.raises(tf.errors.InvalidArgumentError):
        _examples(_plain(out))
    stats = ReaderStats()
    with caplog.at_level(logging.WARNING, logger="tfdata_reader"):
        got = _examples(_plain(out, stats=stats, skip_bad_records=True))
    assert got == _examples(_plain(converted))
    assert stats.skipped == {shard_path: 1}
    assert any(
        os.path.basename(shard_path) in r.getMessage() and "record 1" in r.getMessage()
        for r in caplog.records
    )


def test_from_images_matches_tree(tmp_path, s3_bucket):
    src = str(tmp_path / "src")
    sample_data.write_sample_tree(src, per_class=4)
    put_tree(src, s3_bucket, "raw/")
    ds = tfdata_reader.make_dataset_from_images(
        f"s3://{s3_bucket}/raw", batch_size=5, image_size=SIZE, concurrency=8
    )
    labels = collections.Counter()
    for images, batch_labels in ds:
        assert images.shape[1:] == (*SIZE, 3) and images.dtype == tf.float32
        labels.update(batch_labels.numpy().tolist())
    assert labels == {0: 4, 1: 4, 2: 4}  # the truncated JPEG was skipped


def test_normalisation_one_hot_and_keras_fit(converted):
    ds = make_dataset(
        converted,
        batch_size=4,
        image_size=SIZE,
        training=True,
        seed=0,
        one_hot=True,
        normalize=([0.5, 0.5, 0.5], [0.25, 0.25, 0.25]),
    )
    images, labels = next(iter(ds))
    assert labels.shape == (4, 3) and images.dtype == tf.float32
    assert float(tf.reduce_min(images)) < 0 < float(tf.reduce_max(images))
    model = tf.keras.Sequential(
        [
            tf.keras.Input((*SIZE, 3)),
            tf.keras.layers.Conv2D(4, 3, activation="relu"),
            tf.keras.layers.GlobalAveragePooling2D(),
            tf.keras.layers.Dense(3),
        ]
    )
    model.compile("adam", tf.keras.losses.CategoricalCrossentropy(from_logits=True))
    history = model.fit(ds, epochs=2, verbose=0)
    assert (
        len(history.history["loss"]) == 2 and np.isfinite(history.history["loss"]).all()
    )


def _reference_image(encoded, size, policy, window=None):
    """Whole-image decode and antialiased resize: the straightforward, slow way."""
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    if window is not None:
        y, x, h, w = window
        return tf.image.resize(image[y : y + h, x : x + w], size, antialias=True)
    if policy == "stretch":
        return tf.image.resize(image, size, antialias=True)
    if policy == "pad":
        return tf.image.resize_with_pad(
            tf.cast(image, tf.float32), *size, antialias=True
        )
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    scaled = tf.math.ceil(shape * tf.reduce_max(tf.constant(size, tf.float32) / shape))
    image = tf.image.resize(image, tf.cast(scaled, tf.int32), antialias=True)
    return tf.image.resize_with_crop_or_pad(image, *size)


def _assert_close(got, want):
    diff = np.abs(got.numpy().astype(float) - np.round(want.numpy()))
    # Area vs triangle filter and DCT scaling differ by ~2 levels at most, more along hard
    # edges; a misplaced window (a crop in the wrong coordinates, a wrong DCT scale) by
    # tens of levels.
    assert diff.mean() < 2.5 and (diff > 48).mean() < 0.02, (diff.mean(), diff.max())


@pytest.mark.parametrize(
    "shape,fmt", [((375, 500), "JPEG"), ((1500, 2000), "JPEG"), ((375, 500), "PNG")]
)
def test_window_decode_matches_whole_image_decode(shape, fmt):
    """Decoding only the needed window, DCT-scaled, gives the pixels a full decode does."""
    rng = np.random.default_rng(1)
    data = sample_data.encode(sample_data.photo_like(shape[1], shape[0], rng), fmt)
    encoded = tf.constant(data)
    augment = ops.Augment(flip=False, brightness=0, contrast=0)
    for size in ((224, 224), (64, 96)):
        for policy in ops.RESIZE_POLICIES:
            got = ops.to_image(encoded, size, policy, None, None)
            _assert_close(got, _reference_image(encoded, size, policy))
        for j in range(3):
            seed = tf.constant([9, j], tf.int64)
            got = ops.to_image(encoded, size, "crop", augment, seed)
            crop_seed = tf.random.experimental.stateless_split(seed, num=4)[0]
            begin, extent, _ = tf.image.stateless_sample_distorted_bounding_box(
                tf.constant([*shape, 3]),
                bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
                seed=crop_seed,
                min_object_covered=0.0,
                aspect_ratio_range=augment.crop_aspect,
                area_range=augment.crop_area,
                max_attempts=10,
                use_image_if_no_bounding_boxes=True,
            )
            window = [int(begin[0]), int(begin[1]), int(extent[0]), int(extent[1])]
            _assert_close(got, _reference_image(encoded, size, None, window))


def test_reader_imports_no_beam():
    code = (
        "import sys, tfdata_reader, tfdata_reader.dataset, tfdata_reader.images;"
        "bad = [m for m in sys.modules if m.startswith('apache_beam')];"
        "assert not bad, bad"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_endpoint_fails_fast_in_one_line():
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    config = S3Config(
        s3_endpoint_url=endpoint, s3_access_key_id="a", s3_secret_access_key="b"
    )
    assert config.max_attempts == s3.DEFAULT_MAX_ATTEMPTS
    start = time.monotonic()
    with pytest.raises(DatasetError) as raised:
        make_dataset("s3://bucket/ds", config=config)
    elapsed = time.monotonic() - start
    message = str(raised.value)
    assert message.startswith(f"cannot reach {endpoint} to read s3://bucket/ds/")
    assert "\n" not in message and raised.value.__suppress_context__
    # 3 refused connections, under 0.2 s of backoff between them (with 10 attempts,
    # each request made 5 times over, this took about a minute).
    assert elapsed < 5, elapsed


class _Answers(http.server.BaseHTTPRequestHandler):
    """Answers every HEAD with the server's ``status`` and closes the connection."""

    def do_HEAD(self):
        self.send_response(self.server.status)
        self.send_header("Content-Length", "0")
        self.send_header("Connection", "close")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_connection_errors_get_every_attempt_once_the_endpoint_answered(monkeypatch):
    monkeypatch.setattr(
        botocore.endpoint, "time", types.SimpleNamespace(sleep=lambda _: None)
    )
    keys = {"s3_access_key_id": "a", "s3_secret_access_key": "b", "max_attempts": 6}

    def attempts(config, error):
        client = s3.client(config)
        sent = []

        def count(**_):
            sent.append(1)

        client.meta.events.register("before-send.s3", count)
        try:
            with pytest.raises(error):
                client.head_object(Bucket="b", Key="k")
        finally:
            client.meta.events.unregister("before-send.s3", count)
        return len(sent)

    closed = S3Config(s3_endpoint_url=f"http://127.0.0.1:{_closed_port()}", **keys)
    refused = botocore.exceptions.EndpointConnectionError
    assert attempts(closed, refused) == s3.FIRST_CONTACT_ATTEMPTS
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Answers)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    config = S3Config(s3_endpoint_url=f"http://127.0.0.1:{port}", **keys)
    try:
        server.status = 503  # throttling and 5xx errors: every attempt
        assert attempts(config, botocore.exceptions.ClientError) == 6
        server.status = 404
        assert attempts(config, botocore.exceptions.ClientError) == 1
    finally:
        server.shutdown()
        server.server_close()
    # The endpoint answered before: a refused connection now is a blip, tried as often.
    assert attempts(config, refused) == 6
