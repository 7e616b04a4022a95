"""ReaderOptions: make_dataset's reading options as one frozen value, checked when built
and resolved once per call."""

from __future__ import annotations

import dataclasses
import inspect

import numpy as np
import pytest
import tensorflow as tf

from tests.test_reader import convert_sample
from tfdata_reader import Augment, ReaderOptions, make_dataset
from tfdata_reader.options import ResolvedOptions

SIZE = (32, 32)


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> str:
    return convert_sample(tmp_path_factory.mktemp("options"))


def _batches(ds):
    return [(x.numpy(), y.numpy()) for x, y in ds]


def _assert_same(a, b):
    assert len(a) == len(b) > 0
    for (xa, ya), (xb, yb) in zip(a, b):
        assert xa.dtype == xb.dtype
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)


def test_options_are_frozen():
    options = ReaderOptions(batch_size=8)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.batch_size = 16
    assert dataclasses.replace(options, training=False).batch_size == 8
    with pytest.raises(TypeError):
        ReaderOptions(8)  # keywords only


def test_fields_are_make_datasets_keywords_with_its_defaults():
    parameters = inspect.signature(make_dataset).parameters
    for field in dataclasses.fields(ReaderOptions):
        parameter = parameters[field.name]
        assert parameter.default == field.default, field.name
    assert parameters["options"].kind is inspect.Parameter.KEYWORD_ONLY
    separate = set(parameters) - {f.name for f in dataclasses.fields(ReaderOptions)}
    assert separate == {
        "uri", "split", "input_context", "cache", "stats", "config", "options"
    }  # fmt: skip


@pytest.mark.parametrize("training", [True, False])
def test_options_read_what_keywords_read(converted, training):
    keywords = {"batch_size": 4, "image_size": SIZE, "training": training, "seed": 1}
    by_keywords = make_dataset(converted, "train", **keywords)
    by_options = make_dataset(converted, "train", options=ReaderOptions(**keywords))
    assert int(by_options.cardinality()) == int(by_keywords.cardinality())
    assert by_options.class_names == by_keywords.class_names
    _assert_same(_batches(by_options), _batches(by_keywords))


def test_keywords_beside_options_override_its_fields(converted):
    options = ReaderOptions(
        batch_size=3, image_size=SIZE, training=False, dtype=tf.uint8, seed=1
    )
    # Named by keyword or position, a keyword wins even when it is the signature's
    # default (training=True).
    overridden = make_dataset(converted, "train", 5, training=True, options=options)
    want = make_dataset(
        converted, "train", batch_size=5, image_size=SIZE, training=True,
        dtype=tf.uint8, seed=1,
    )  # fmt: skip
    assert int(overridden.cardinality()) == int(want.cardinality())
    _assert_same(_batches(overridden), _batches(want))
    # The options object itself is unchanged.
    assert options.batch_size == 3 and options.training is False


BAD = [
    ("batch_size", 0, ValueError),
    ("batch_size", 4.0, TypeError),
    ("image_size", (32,), TypeError),
    ("image_size", (32, 0), ValueError),
    ("image_size", 32, TypeError),
    ("training", "yes", TypeError),
    ("shuffle", 1, TypeError),
    ("seed", 1.5, TypeError),
    ("shuffle_buffer", 0, ValueError),
    ("resize", "zoom", ValueError),
    ("augment", "flip", TypeError),
    ("normalize", "imagenet", ValueError),
    ("dtype", tf.int32, ValueError),
    ("num_workers", 0, ValueError),
    ("worker_index", -1, ValueError),
    ("cache_dir", 3, TypeError),
    ("cache_max_bytes", -1, ValueError),
    ("prefetch_shards", -1, ValueError),
    ("cycle_length", 0, ValueError),
    ("verify", "md5", ValueError),
]


@pytest.mark.parametrize(
    "name, value, error", BAD, ids=[f"{n}={v!r}" for n, v, _ in BAD]
)
def test_a_bad_option_is_refused_naming_it(tmp_path, name, value, error):
    with pytest.raises(error, match=name):
        ReaderOptions(**{name: value})
    with pytest.raises(error, match=name):
        dataclasses.replace(ReaderOptions(), **{name: value})
    # Before anything is read: the dataset does not even exist.
    missing = str(tmp_path / "missing")
    with pytest.raises(error, match=name):
        make_dataset(missing, **{name: value})
    with pytest.raises(error, match=name):
        make_dataset(missing, options=ReaderOptions(), **{name: value})


def test_unknown_options_are_refused(tmp_path):
    with pytest.raises(TypeError, match="colour"):
        ReaderOptions(colour="red")
    with pytest.raises(TypeError, match="colour"):
        make_dataset(str(tmp_path), options=ReaderOptions(), colour="red")
    with pytest.raises(TypeError, match="options must be a ReaderOptions"):
        make_dataset(str(tmp_path), options={"batch_size": 4})


def test_resolve_fills_in_the_defaults():
    training = ReaderOptions(image_size=[64.0, np.int64(48)]).resolve()
    assert isinstance(training, ResolvedOptions)
    assert training.image_size == (64, 48)
    assert training.shuffle and training.drop_remainder
    assert training.augment == Augment()
    assert not training.deterministic  # shuffled, no seed
    assert ReaderOptions(seed=3).resolve().deterministic
    evaluation = ReaderOptions(training=False).resolve()
    assert not evaluation.shuffle and not evaluation.drop_remainder
    assert evaluation.augment is None and evaluation.deterministic
    # augment=True is the default augmentation, in evaluation too; False is none.
    assert ReaderOptions(training=False, augment=True).resolve().augment == Augment()
    assert ReaderOptions(augment=False).resolve().augment is None
    flip = Augment(brightness=0, contrast=0)
    assert ReaderOptions(augment=flip).resolve().augment is flip
    assert not ReaderOptions(shuffle=True, deterministic=False).resolve().deterministic
    with pytest.raises(dataclasses.FrozenInstanceError):
        training.batch_size = 1


def test_input_context_overrides_workers_and_batch_size():
    context = tf.distribute.InputContext(
        num_input_pipelines=2, input_pipeline_id=1, num_replicas_in_sync=4
    )
    options = ReaderOptions(batch_size=32, num_workers=9, worker_index=7)
    resolved = options.resolve(context)
    assert resolved.num_workers == 2 and resolved.worker_index == 1
    assert resolved.batch_size == 8  # 32 over 4 replicas
    with pytest.raises(ValueError, match=r"worker_index 2 not in \[0, 2\)"):
        ReaderOptions(num_workers=2, worker_index=2).resolve()
    with pytest.raises(ValueError, match="transform_fn"):
        ReaderOptions(normalize="transform_fn").resolve()
