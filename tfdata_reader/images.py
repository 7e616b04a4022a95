"""make_dataset_from_images: an unconverted ``<class>/<file>`` tree in, batches out.

For small data and for checking the converted output: one GET (or file read) per image,
many in flight, no manifest. Classes and candidate files follow the convert job's rules
(:mod:`transforms.listing`): the class folders of
``tf.keras.utils.image_dataset_from_directory`` (every folder not starting with ``.``,
sorted, an empty one included), their files found recursively. Files the convert job
would reject are skipped here without a record, undecodable ones included.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from s3tfr import storage
from s3tfr.manifest import DatasetError
from s3tfr.s3 import S3Config
from tfdata_reader import ops

__all__ = ["list_images", "make_dataset_from_images"]

DEFAULT_CONCURRENCY = 32


def list_images(
    uri: str, config: S3Config | None = None
) -> tuple[list[str], list[int], list[str]]:
    """``(relative keys, label indices, class names)`` of the images under ``uri``.

    Keys are sorted; the class names are every class folder's, sorted, whether or not it
    holds an image (:func:`s3tfr.storage.class_folders`).

    Raises:
        DatasetError: no candidate image in any class folder.
    """
    classes = storage.class_folders(uri, config)
    labelled = sorted(
        (key, index)
        for index, name in enumerate(classes)
        for key, size, _stamp in storage.walk_folder(uri, name, config)
        if storage.candidate_rejection(key, size) is None
    )
    if not labelled:
        raise DatasetError(f"no <class>/<file> images under {uri}")
    return [key for key, _ in labelled], [index for _, index in labelled], classes


def make_dataset_from_images(
    uri: str,
    batch_size: int = 32,
    image_size: Sequence[int] = (224, 224),
    *,
    resize: str = "crop",
    normalize: ops.Normalize = "unit",
    dtype: tf.DType = tf.float32,
    one_hot: bool = False,
    concurrency: int = DEFAULT_CONCURRENCY,
    config: S3Config | None = None,
) -> tf.data.Dataset:
    """Reads a raw class-folder tree (local or S3) in sorted key order, without augmentation.

    Args:
        uri: ``s3://bucket/prefix`` or a local directory holding ``<class>/<file>``.
        batch_size: examples per batch (the last one may be smaller).
        image_size: ``(height, width)`` of the output images.
        resize: ``"crop"``, ``"pad"`` or ``"stretch"``.
        normalize: as in ``make_dataset``.
        dtype: ``tf.float32`` or ``tf.uint8``.
        one_hot: one-hot labels instead of int64 indices.
        concurrency: GETs in flight.
        config: S3 client settings.

    Returns:
        ``(images, labels)`` batches, with a ``class_names`` attribute: the class folder
        names in label order. Its ``cardinality()`` is unknown: which files decode is
        only known once they are read.
    """
    ops.check_options(resize, normalize, dtype)
    keys, labels, classes = list_images(uri, config)
    image_size = tuple(int(v) for v in image_size)
    window = max(1, concurrency)

    def _bytes():
        # Threads, not tf.data parallelism: a GET waits on the network, not on a core.
        with concurrent.futures.ThreadPoolExecutor(window, "image-get") as pool:
            futures = [pool.submit(storage.read_bytes, storage.join(uri, k), config)
                       for k in keys[:window]]  # fmt: skip
            for i in range(len(keys)):
                data = futures[i].result()
                futures[i] = None
                if i + window < len(keys):
                    futures.append(
                        pool.submit(
                            storage.read_bytes,
                            storage.join(uri, keys[i + window]),
                            config,
                        )
                    )
                yield data, np.int64(labels[i])

    ds = tf.data.Dataset.from_generator(
        _bytes,
        output_signature=(
            tf.TensorSpec([], tf.string),
            tf.TensorSpec([], tf.int64),
        ),
    )
    ds = ds.map(
        # Whole-image decode: these files were never validated, and only a full decode
        # notices a truncated one.
        lambda data, label: (
            ops.to_image(data, image_size, resize, None, None, partial=False),
            label,
        ),
        num_parallel_calls=tf.data.AUTOTUNE,
    ).ignore_errors(log_warning=True)
    ds = ds.batch(batch_size)

    def _finish(images, label):
        images = ops.normalize_batch(images, normalize, dtype)
        if one_hot:
            label = tf.one_hot(label, len(classes), dtype=tf.float32)
        return images, label

    ds = ds.map(_finish, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)
    # As tf.keras.utils.image_dataset_from_directory sets it.
    ds.class_names = list(classes)
    return ds
