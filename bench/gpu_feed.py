"""Does the reader keep an accelerator busy? A Keras model trained on ``make_dataset``.

    .venv/bin/python -m bench.gpu_feed --images 2000 --batch 64 --steps 60

Runs on whatever TensorFlow finds (a GPU when there is one, else the CPU) and prints one
table. The dataset is converted once by the convert job (photo-like 500x375 JPEGs,
``--resize crop:224x224``) into a local folder, or ``--dataset`` names one.

Rows, images/s at steady state (the first ``--warmup`` steps of each row are not timed:
tracing, kernel selection and the shard cache's first fill stay out of the rate):

- **input alone**: ``make_dataset(training=True)`` iterated with no model;
- **model alone**: the same model's ``train_on_batch`` on one batch held on the device,
  so no input work at all: the accelerator's own rate;
- **model fed by the reader**: ``model.fit`` on ``make_dataset``, the real thing.

The accelerator's idle share is ``1 - fed step rate / model-alone step rate``: the part of
each fed step spent waiting for input. Near 0 means the reader keeps up; the input-alone
rate says by how much it could. The model is MobileNetV3-Small (``weights=None``, its own
preprocessing on, so the reader's uint8-range floats go in as they are); ``--model tiny``
uses a 3-layer CNN whose device rate a CPU can also saturate.

Without an accelerator the model and the reader share the same cores, so the idle share
measured on a CPU is their contention, not input starvation; the script is run on a lent
accelerator for the figure that matters (README, "Reader").
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf

import tfdata_reader
from beam_jobs import convert
from bench.convert import photo_tree

SIZE = 224


def build_model(kind: str, num_classes: int) -> tf.keras.Model:
    if kind == "tiny":
        model = tf.keras.Sequential([
            tf.keras.Input((SIZE, SIZE, 3)),
            tf.keras.layers.Rescaling(1 / 255),
            tf.keras.layers.Conv2D(16, 3, strides=2, activation="relu"),
            tf.keras.layers.Conv2D(32, 3, strides=2, activation="relu"),
            tf.keras.layers.GlobalAveragePooling2D(),
            tf.keras.layers.Dense(num_classes),
        ])  # fmt: skip
    else:
        model = tf.keras.applications.MobileNetV3Small(
            input_shape=(SIZE, SIZE, 3), weights=None, classes=num_classes,
            include_preprocessing=True, classifier_activation=None,
        )  # fmt: skip
    model.compile(
        optimizer="adam",
        loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


class _StepTimes(tf.keras.callbacks.Callback):
    def __init__(self, warmup: int):
        super().__init__()
        self.warmup, self.started, self.steps = warmup, None, 0

    def on_train_batch_end(self, batch, logs=None):
        self.steps += 1
        if self.steps == self.warmup:
            self.started = time.perf_counter()

    def rate(self, batch: int) -> float:
        timed = self.steps - self.warmup
        return timed * batch / (time.perf_counter() - self.started)


def input_alone(ds, steps: int, warmup: int, batch: int) -> float:
    it = iter(ds)
    for _ in range(warmup):
        next(it)
    start = time.perf_counter()
    for _ in range(steps):
        images, _labels = next(it)
    _ = images.shape  # the last batch is materialised
    return steps * batch / (time.perf_counter() - start)


def model_alone(model, ds, steps: int, warmup: int, batch: int) -> float:
    images, labels = next(iter(ds))
    images, labels = tf.identity(images), tf.identity(labels)  # on the device
    for _ in range(warmup):
        model.train_on_batch(images, labels)
    start = time.perf_counter()
    for _ in range(steps):
        loss = model.train_on_batch(images, labels)
    float(loss)  # waits for the device
    return steps * batch / (time.perf_counter() - start)


def fed(model, ds, steps: int, warmup: int, batch: int) -> float:
    timer = _StepTimes(warmup)
    model.fit(
        ds, epochs=1, steps_per_epoch=warmup + steps, callbacks=[timer], verbose=0
    )
    return timer.rate(batch)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", help="a converted dataset (else one is made)")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=60, help="timed steps per row")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps per row")
    parser.add_argument("--model", choices=["mobilenet_v3_small", "tiny"],
                        default="mobilenet_v3_small")  # fmt: skip
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="s3tfr-gpu-feed-") as work:
        dataset = args.dataset
        if dataset is None:
            src, dataset = os.path.join(work, "src"), os.path.join(work, "ds")
            photo_tree(src, args.images, seed=0, processes=os.cpu_count() or 1)
            convert.run(["--input", src, "--output", dataset, "--resize",
                         f"crop:{SIZE}x{SIZE}"])  # fmt: skip
        info = tfdata_reader.load_info(dataset)
        cache = os.path.join(work, "cache")

        def reader():
            # Repeated: the rows need more steps than one epoch may hold.
            return tfdata_reader.make_dataset(
                dataset, "train", batch_size=args.batch, training=True,
                cache_dir=cache,
            ).repeat()  # fmt: skip

        model = build_model(args.model, info["num_classes"])
        rows = {
            "input alone (make_dataset, training=True)": input_alone(
                reader(), args.steps, args.warmup, args.batch
            ),
            "model alone (one batch on the device)": model_alone(
                model, reader(), args.steps, args.warmup, args.batch
            ),
            "model fed by make_dataset (fit)": fed(
                model, reader(), args.steps, args.warmup, args.batch
            ),
        }

    devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices(
        "CPU"
    )
    idle = (
        1
        - rows["model fed by make_dataset (fit)"]
        / rows["model alone (one batch on the device)"]
    )
    print(f"\ndevice: {devices[0].name}; model {args.model}; batch {args.batch}; "
          f"{args.steps} timed steps after {args.warmup}; "
          f"{info['splits']['train']['examples']} train images\n")  # fmt: skip
    print("| row | images/s |\n|---|---:|")
    for name, rate in rows.items():
        print(f"| {name} | {rate:,.0f} |")
    print(f"| accelerator idle share (1 - fed / model alone) | {max(idle, 0):.0%} |")


if __name__ == "__main__":
    main()
