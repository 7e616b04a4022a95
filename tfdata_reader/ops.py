"""In-graph image ops of the reader: encoded bytes in, fixed-size images out.

Decode, resize policy, seeded augmentation (stateless random ops, so a given seed gives the
same pixels on every run and after a checkpoint restore) and normalisation. Shared by
``make_dataset`` and ``make_dataset_from_images``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import tensorflow as tf

__all__ = ["RESIZE_POLICIES", "Augment", "normalize_batch", "to_image"]

RESIZE_POLICIES = ("crop", "pad", "stretch")


@dataclasses.dataclass(frozen=True)
class Augment:
    """Training augmentation; each part switches off on its own.

    Attributes:
        flip: random left-right flip.
        brightness: max brightness delta as a fraction of the pixel range (0: off).
        contrast: contrast factor drawn from ``[1 - contrast, 1 + contrast]`` (0: off).
        random_resized_crop: Inception-style crop of ``crop_area`` of the image with aspect
            ratio in ``crop_aspect``, resized to ``image_size``; off: the resize policy.
    """

    flip: bool = True
    brightness: float = 0.2
    contrast: float = 0.2
    random_resized_crop: bool = True
    crop_area: tuple[float, float] = (0.08, 1.0)
    crop_aspect: tuple[float, float] = (3 / 4, 4 / 3)


def _resize(image: tf.Tensor, size: Sequence[int], policy: str) -> tf.Tensor:
    """Any-size uint8 image -> float32 ``size`` image in 0..255."""
    height, width = size
    if policy == "stretch":
        return tf.image.resize(image, size, antialias=True)
    if policy == "pad":
        return tf.image.resize_with_pad(tf.cast(image, tf.float32), height, width, antialias=True)
    # crop: scale the shorter side to fit, then take the centre (the usual evaluation crop).
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = tf.reduce_max(tf.constant([height, width], tf.float32) / shape)
    scaled = tf.cast(tf.math.ceil(shape * scale), tf.int32)
    image = tf.image.resize(image, scaled, antialias=True)
    return tf.image.resize_with_crop_or_pad(image, height, width)


def _random_resized_crop(
    image: tf.Tensor, size: Sequence[int], seed: tf.Tensor, aug: Augment
) -> tf.Tensor:
    begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image),
        bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
        seed=seed,
        min_object_covered=0.0,
        aspect_ratio_range=aug.crop_aspect,
        area_range=aug.crop_area,
        max_attempts=10,
        use_image_if_no_bounding_boxes=True,
    )
    crop = tf.slice(image, begin, crop_size)
    return tf.image.resize(crop, size, antialias=True)


def to_image(
    encoded: tf.Tensor,
    size: Sequence[int],
    policy: str,
    augment: Augment | None,
    seed: tf.Tensor | None,
) -> tf.Tensor:
    """Encoded JPEG/PNG -> uint8 ``(height, width, 3)`` image, augmented when asked.

    Args:
        encoded: scalar string tensor with the encoded image.
        size: ``(height, width)``.
        policy: ``"crop"`` (centre crop after an aspect-preserving resize), ``"pad"`` or
            ``"stretch"``; used when there is no random resized crop.
        augment: augmentation to apply, or ``None``.
        seed: ``int64[2]`` per-element seed for the stateless random ops.
    """
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    if augment is None:
        out = _resize(image, size, policy)
    else:
        seeds = tf.random.experimental.stateless_split(seed, num=4)
        if augment.random_resized_crop:
            out = _random_resized_crop(image, size, seeds[0], augment)
        else:
            out = _resize(image, size, policy)
        if augment.flip:
            out = tf.image.stateless_random_flip_left_right(out, seeds[1])
        if augment.brightness:
            out = tf.image.stateless_random_brightness(out, augment.brightness * 255.0, seeds[2])
        if augment.contrast:
            out = tf.image.stateless_random_contrast(
                out, 1 - augment.contrast, 1 + augment.contrast, seeds[3]
            )
    # uint8 keeps the shuffle buffer 4x smaller; normalisation happens per batch.
    out = tf.cast(tf.clip_by_value(tf.round(out), 0.0, 255.0), tf.uint8)
    return tf.ensure_shape(out, [size[0], size[1], 3])


Normalize = str | tuple[Sequence[float], Sequence[float]] | Callable[[tf.Tensor], tf.Tensor] | None


def normalize_batch(images: tf.Tensor, normalize: Normalize, dtype: tf.DType) -> tf.Tensor:
    """uint8 images -> the requested dtype and scale.

    Args:
        images: uint8 batch.
        normalize: ``"unit"`` (0..1), ``None`` (0..255 as float), ``(mean, std)`` per channel
            on the 0..1 scale (``(x / 255 - mean) / std``), or a callable taking float32
            0..255 images (the hook for the analyze job's ``transform_fn``).
        dtype: ``tf.float32`` or ``tf.uint8`` (then ``normalize`` is not applied).
    """
    if dtype == tf.uint8:
        return images
    x = tf.cast(images, tf.float32)
    if callable(normalize):
        return tf.cast(normalize(x), dtype)
    if normalize is None:
        return tf.cast(x, dtype)
    if normalize == "unit":
        return tf.cast(x / 255.0, dtype)
    mean, std = normalize
    mean = tf.constant(mean, tf.float32)
    std = tf.constant(std, tf.float32)
    return tf.cast((x / 255.0 - mean) / std, dtype)


def check_options(policy: str, normalize: Normalize, dtype: tf.DType) -> None:
    """Raises ValueError for an unknown resize policy, normalisation or dtype."""
    if policy not in RESIZE_POLICIES:
        raise ValueError(f"resize must be one of {RESIZE_POLICIES}, not {policy!r}")
    if dtype not in (tf.float32, tf.uint8, tf.float16, tf.bfloat16):
        raise ValueError(f"dtype must be float32, float16, bfloat16 or uint8, not {dtype}")
    if normalize is None or callable(normalize) or normalize == "unit":
        return
    if not (isinstance(normalize, (tuple, list)) and len(normalize) == 2):
        raise ValueError(
            f"normalize must be 'unit', None, (mean, std) or a callable: {normalize!r}"
        )
