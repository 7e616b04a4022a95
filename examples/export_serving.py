"""Train on an analyzed dataset, then export a model that serves raw JPEG bytes.

    python examples/export_serving.py --dataset s3://bucket/tfrecords --export_dir /tmp/m

Training reads the dataset with ``make_dataset(normalize="transform_fn")``. The exported
SavedModel decodes and sizes the bytes it is given with the reader's own ops and
normalises them with the constants of the analyze job's transform layer
(``transform_features_layer()``, attached to the model), which are the constants the
reader used: a served image gets the prediction training would give it.

Its ``serving_default`` signature takes ``image_bytes`` (a batch of encoded JPEG or PNG
strings) and returns ``probabilities``, ``class_ids`` and ``class_names`` (ids mapped
through the transform's label vocabulary, which equals ``labels.txt``).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import keras
import tensorflow as tf

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tfdata_reader
from s3tfr.contract import IMAGE_KEY, LABEL_VOCABULARY, PIXEL_MEAN_KEY, PIXEL_STD_KEY
from tfdata_reader import ops, transform
from tfdata_reader.transform import normalize_pixels

__all__ = ["ServingModule", "export_serving_model", "small_model"]


class ServingModule(tf.Module):
    """A trained model behind the dataset's transform layer: JPEG bytes in.

    Args:
        model: a Keras model taking normalised ``(batch, height, width, 3)`` images and
            returning class probabilities.
        tft_output: the dataset's ``tft.TFTransformOutput``
            (``tfdata_reader.transform.transform_output``).
        image_size: ``(height, width)``, as the model was trained with.
        resize: the reader's resize policy the model was trained with.
    """

    def __init__(
        self,
        model: keras.Model,
        tft_output,
        image_size: Sequence[int],
        resize: str = "crop",
    ) -> None:
        super().__init__()
        self.model = model
        # Tracked as an attribute so its assets (the label vocabulary) are exported too.
        self.tft_layer = tft_output.transform_features_layer()
        self.class_names = tf.constant(tft_output.vocabulary_by_name(LABEL_VOCABULARY))
        self._image_size = tuple(int(v) for v in image_size)
        self._resize = resize

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
    def serve(self, image_bytes: tf.Tensor) -> dict[str, tf.Tensor]:
        # The reader's decode and resize (augmentation off), as in evaluation.
        pixels = tf.map_fn(
            lambda data: ops.to_image(data, self._image_size, self._resize, None, None),
            image_bytes,
            fn_output_signature=tf.TensorSpec([*self._image_size, 3], tf.uint8),
        )
        stats = self.tft_layer({IMAGE_KEY: image_bytes})
        images = normalize_pixels(
            tf.cast(pixels, tf.float32),
            stats[PIXEL_MEAN_KEY][:, tf.newaxis, tf.newaxis, :],
            stats[PIXEL_STD_KEY][:, tf.newaxis, tf.newaxis, :],
        )
        probabilities = self.model(images, training=False)
        class_ids = tf.argmax(probabilities, axis=-1)
        return {
            "probabilities": probabilities,
            "class_ids": class_ids,
            "class_names": tf.gather(self.class_names, class_ids),
        }


def export_serving_model(
    model: keras.Model,
    tft_output,
    export_dir: str,
    image_size: Sequence[int],
    resize: str = "crop",
) -> str:
    """Saves ``model`` with the transform attached; returns ``export_dir``."""
    module = ServingModule(model, tft_output, image_size, resize)
    tf.saved_model.save(
        module, export_dir, signatures={"serving_default": module.serve}
    )
    return export_dir


def small_model(image_size: Sequence[int], num_classes: int) -> keras.Model:
    """A small CNN: enough to show training and serving agree, not to be accurate."""
    return keras.Sequential(
        [
            keras.Input((*image_size, 3)),
            keras.layers.Conv2D(8, 3, strides=2, activation="relu"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(num_classes, activation="softmax"),
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--dataset", required=True, help="an analyzed dataset (s3:// or path)"
    )
    parser.add_argument("--export_dir", required=True, help="where the SavedModel goes")
    parser.add_argument("--epochs", type=int, default=1, help="training epochs")
    parser.add_argument(
        "--batch_size", type=int, default=32, help="training batch size"
    )
    parser.add_argument("--image_size", default="224x224", help="HxW the model sees")
    parser.add_argument(
        "--resize",
        default="crop",
        choices=ops.RESIZE_POLICIES,
        help="reader resize policy",
    )
    args = parser.parse_args()

    analysis = transform.load_analysis(args.dataset)
    image_size = tuple(int(v) for v in args.image_size.lower().split("x"))
    train = tfdata_reader.make_dataset(
        args.dataset,
        "train",
        batch_size=args.batch_size,
        image_size=image_size,
        resize=args.resize,
        normalize="transform_fn",
        seed=0,
        drop_remainder=False,
    )
    model = small_model(image_size, len(analysis["labels"]))
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    labels = analysis["labels"]
    weights = {i: analysis["class_weights"][label] for i, label in enumerate(labels)}
    model.fit(train, epochs=args.epochs, class_weight=weights)
    export_serving_model(
        model,
        transform.transform_output(args.dataset, analysis=analysis),
        args.export_dir,
        image_size,
        args.resize,
    )
    print(f"serving model written to {args.export_dir} (signature serving_default)")


if __name__ == "__main__":
    main()
