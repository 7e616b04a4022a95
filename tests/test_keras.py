"""The reader's Keras manners: exact cardinality, ``class_names``, ``model.fit`` with known
steps, and the Keras examples of docs/READER.md run as written."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import warnings

import pytest
import tensorflow as tf

from devtools import sample_data
from devtools.local_s3 import put_tree
from s3tfr.contract import MANIFEST
from tests.test_reader import _with_bad_record, convert_sample
from tfdata_reader import load_info, make_dataset, make_dataset_from_images

SIZE = (16, 16)
READER_DOC = os.path.join(
    os.path.dirname(os.path.dirname(__file__)), "docs", "READER.md"
)
# A runnable block: the fenced Python block right after this comment.
TESTED_BLOCK = re.compile(r"<!-- tested -->\s*```python\n(.*?)```", re.DOTALL)


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> str:
    return convert_sample(tmp_path_factory.mktemp("keras"))


def _expected_batches(info, split, batch_size, drop_remainder, workers=1, index=0):
    """Batches one worker gets, from the manifest: whole shards when there are enough,
    else every ``workers``-th record of each shard."""
    counts = [s["examples"] for s in info["splits"][split]["shards"]]
    if len(counts) >= workers:
        records = sum(counts[index::workers])
    else:
        records = sum(len(range(index, n, workers)) for n in counts)
    return records // batch_size if drop_remainder else math.ceil(records / batch_size)


def _dataset(uri, split="train", **kwargs):
    kwargs.setdefault("image_size", SIZE)
    return make_dataset(uri, split, **kwargs)


CASES = {
    # name: (split, make_dataset keywords, drop_remainder in effect, workers, index)
    "training-drops-remainder": ("train", {"batch_size": 5, "training": True}, True, 1, 0),
    "evaluation-keeps-remainder": ("train", {"batch_size": 5, "training": False}, False, 1, 0),
    "explicit-drop": ("train", {"batch_size": 4, "training": False, "drop_remainder": True}, True, 1, 0),
    "by-file-worker-1-of-3": ("train", {"batch_size": 2, "training": False, "num_workers": 3, "worker_index": 1}, False, 3, 1),
    "by-record-worker-1-of-5": ("validation", {"batch_size": 1, "training": False, "num_workers": 5, "worker_index": 1}, False, 5, 1),
}  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_cardinality_is_what_the_dataset_yields(converted, case):
    split, kwargs, drop, workers, index = CASES[case]
    ds = _dataset(converted, split, **kwargs)
    want = _expected_batches(
        load_info(converted), split, kwargs["batch_size"], drop, workers, index
    )
    assert int(ds.cardinality()) == want
    assert sum(1 for _ in ds) == want
    assert int(ds.repeat(2).cardinality()) == 2 * want
    assert ds.repeat().cardinality() == tf.data.INFINITE_CARDINALITY


def test_cardinality_per_input_context(converted):
    info = load_info(converted)
    for index in range(2):
        context = tf.distribute.InputContext(
            num_input_pipelines=2, input_pipeline_id=index, num_replicas_in_sync=2
        )
        ds = _dataset(converted, batch_size=6, training=False, input_context=context)
        want = _expected_batches(info, "train", 3, False, 2, index)  # 3 per replica
        assert int(ds.cardinality()) == want == sum(1 for _ in ds)


def test_skipping_records_leaves_cardinality_unknown(converted, tmp_path):
    out, _ = _with_bad_record(converted, tmp_path)
    ds = _dataset(out, batch_size=1, training=False, skip_bad_records=True)
    assert ds.cardinality() == tf.data.UNKNOWN_CARDINALITY
    assert sum(1 for _ in ds) == load_info(converted)["splits"]["train"]["examples"]


def test_a_manifest_that_overcounts_fails_naming_the_shard(converted, tmp_path):
    # The cardinality is the manifest's; when a shard holds fewer records than listed, the
    # iteration fails at that shard with the reader's message rather than ending short.
    out = str(tmp_path / "over")
    shutil.copytree(converted, out)
    with open(os.path.join(out, MANIFEST)) as f:
        info = json.load(f)
    info["splits"]["train"]["shards"][0]["examples"] += 1
    info["splits"]["train"]["examples"] += 1
    with open(os.path.join(out, MANIFEST), "w") as f:
        json.dump(info, f)
    ds = _dataset(out, batch_size=1, training=False)
    assert int(ds.cardinality()) == info["splits"]["train"]["examples"]
    shard = info["splits"]["train"]["shards"][0]
    with pytest.raises(
        tf.errors.OpError,
        match=f"{shard['file']} holds {shard['examples'] - 1} records",
    ):
        sum(1 for _ in ds)


def test_class_names_are_the_labels_in_label_order(converted, tmp_path):
    info = load_info(converted)
    assert _dataset(converted, batch_size=4).class_names == info["labels"]
    assert _dataset(converted, "validation", batch_size=4).class_names == info["labels"]
    src = str(tmp_path / "src")
    sample_data.write_sample_tree(src, per_class=2)
    keras_ds = tf.keras.utils.image_dataset_from_directory(
        src, image_size=SIZE, batch_size=4
    )
    assert make_dataset_from_images(src, 4, SIZE).class_names == keras_ds.class_names
    assert keras_ds.class_names == info["labels"]


class _Steps(tf.keras.callbacks.Callback):
    """What ``fit`` knew of the steps per epoch, and the batches it got in each epoch."""

    def on_train_begin(self, logs=None):
        self.steps, self.batches = self.params["steps"], []

    def on_epoch_begin(self, epoch, logs=None):
        self.batches.append(0)

    def on_train_batch_end(self, batch, logs=None):
        self.batches[-1] += 1


def _tiny_model(num_classes):
    model = tf.keras.Sequential(
        [
            tf.keras.Input((*SIZE, 3)),
            tf.keras.layers.Conv2D(2, 3, activation="relu"),
            tf.keras.layers.GlobalAveragePooling2D(),
            tf.keras.layers.Dense(num_classes),
        ]
    )
    model.compile(
        "adam", tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    return model


FIT_CASES = {
    "batched": ({"batch_size": 4}, 1, 0),
    "with-remainder": ({"batch_size": 4, "drop_remainder": False}, 1, 0),
    "host-0-of-2": ({"batch_size": 2, "num_workers": 2, "worker_index": 0}, 2, 0),
    "host-1-of-2": ({"batch_size": 2, "num_workers": 2, "worker_index": 1}, 2, 1),
}


@pytest.mark.parametrize("case", FIT_CASES, ids=list(FIT_CASES))
def test_fit_knows_steps_per_epoch(converted, case):
    kwargs, workers, index = FIT_CASES[case]
    info = load_info(converted)
    ds = _dataset(converted, training=True, seed=1, **kwargs)
    drop = kwargs.get("drop_remainder", True)
    want = _expected_batches(info, "train", kwargs["batch_size"], drop, workers, index)
    assert want > 0
    steps = _Steps()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _tiny_model(len(ds.class_names)).fit(ds, epochs=2, verbose=0, callbacks=[steps])
    assert steps.steps == want == int(ds.cardinality())
    assert steps.batches == [want, want]
    assert not [w for w in caught if "ran out of data" in str(w.message)]


def _tested_blocks(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return TESTED_BLOCK.findall(f.read())


def _substitute(block: str, values: dict) -> str:
    """Replaces the block's top-level ``NAME = ...`` lines for the names in ``values``;
    every block must read ``DATA``."""
    for name, value in values.items():
        block, n = re.subn(
            rf"^{name} = .*$", f"{name} = {value!r}", block, flags=re.MULTILINE
        )
        assert n <= 1, f"{name} is assigned {n} times"
        assert n or name != "DATA", f"a tested block does not set DATA:\n{block}"
    return block


def _rescales_its_input(model) -> bool:
    return any(isinstance(layer, tf.keras.layers.Rescaling) for layer in model.layers)


def test_reader_doc_examples_run(converted, s3_bucket, tmp_path, monkeypatch):
    blocks = _tested_blocks(READER_DOC)
    assert blocks, "docs/READER.md marks no block <!-- tested -->"
    put_tree(converted, s3_bucket, "converted/")
    monkeypatch.setenv("TFDATA_READER_CACHE", str(tmp_path / "cache"))
    # MobileNetV3Small takes 32x32 and up.
    values = {
        "DATA": f"s3://{s3_bucket}/converted",
        "SIZE": (32, 32),
        "BATCH": 4,
        "EPOCHS": 1,
    }
    for block in blocks:
        namespace: dict = {"__name__": "__readme__"}
        code = compile(_substitute(block, values), READER_DOC, "exec")
        exec(code, namespace)  # noqa: S102 (the documentation's own example)
        models = [v for v in namespace.values() if isinstance(v, tf.keras.Model)]
        datasets = [v for v in namespace.values() if isinstance(v, tf.data.Dataset)]
        for model in models:
            for ds in datasets:
                images, _ = next(iter(ds))
                # A model with its own Rescaling (MobileNetV3, EfficientNet) takes 0-255.
                if _rescales_its_input(model):
                    assert float(tf.reduce_max(images)) > 1.0, model.name
