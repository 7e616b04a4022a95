"""In-graph image ops of the reader: encoded bytes in, fixed-size images out.

Decode, resize policy, seeded augmentation (stateless random ops, so a given seed gives the
same pixels on every run and after a checkpoint restore) and normalisation. Shared by
``make_dataset`` and ``make_dataset_from_images``.
"""

from __future__ import annotations

import dataclasses
import functools
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


# DCT-domain scale factors libjpeg decodes at (an 8x8 block read as 4x4, 2x2 or 1x1).
_JPEG_RATIOS = (1, 2, 4, 8)
# How a decoded window becomes its target size (see ``_scale``).
_SAME, _AREA, _BILINEAR = range(3)


def _quantize(image: tf.Tensor, dtype: tf.DType) -> tf.Tensor:
    """float32 -> whole pixel values in 0..255 (halves round up) as ``dtype``.

    ``fake_quant_with_min_max_args`` over 0..255 in 256 steps is exactly
    ``clip(floor(x + 0.5), 0, 255)``, in one pass where ``round`` and ``clip_by_value``
    take two: a tenth of an augmented image's CPU time.
    """
    return tf.cast(
        tf.quantization.fake_quant_with_min_max_args(image, 0.0, 255.0), dtype
    )


def _flip(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """A random left-right flip, drawn as ``tf.image.stateless_random_flip_left_right``
    draws it (the same flips for a seed), without its ``tf.cond`` (each costs tens of
    microseconds per image in a ``tf.data`` map): a reverse over the axes ``[1]`` or
    ``[]``."""
    flip = tf.random.stateless_uniform([], seed) < 0.5
    return tf.reverse(image, tf.range(1, 1 + tf.cast(flip, tf.int32)))


def _scale_by(
    method: int, image: tf.Tensor, target: tf.Tensor, rounded: tf.DType | None
) -> tf.Tensor:
    """One branch of ``_scale``."""
    if method == _SAME:
        return tf.cast(image, tf.float32 if rounded is None else rounded)
    filtered = tf.image.resize(
        image, target, method="area" if method == _AREA else "bilinear"
    )
    return filtered if rounded is None else _quantize(filtered, rounded)


def _scale(image: tf.Tensor, target: tf.Tensor, rounded: tf.DType | None) -> tf.Tensor:
    """uint8 image -> ``target`` (int32[2]), antialiased when shrinking.

    Area averaging (a box filter) when both sides shrink; bilinear otherwise. Same quality
    as ``antialias=True`` (triangle filter) to within ~53 dB PSNR on photos, at a sixth of
    its CPU time, which was two thirds of the reader's per-image cost. An image already
    of the target size is passed through: both filters would return its pixels.

    Args:
        image: uint8 ``(h, w, 3)``.
        target: int32[2].
        rounded: ``None`` for float32 in 0..255 as filtered (for more float work), or
            the dtype (uint8, float32) of whole pixel values.
    """
    shape = tf.shape(image)[:2]
    method = tf.where(
        tf.reduce_all(shape == target),
        _SAME,
        tf.where(tf.reduce_all(shape >= target), _AREA, _BILINEAR),
    )
    return tf.switch_case(
        method,
        [functools.partial(_scale_by, m, image, target, rounded) for m in range(3)],
    )


def _decode_jpeg_window(encoded: tf.Tensor, window: tf.Tensor, size: Sequence[int]):
    """Decodes only ``window`` (y, x, h, w) of a JPEG, at 1/2, 1/4 or 1/8 scale in the DCT
    domain when the window is at least that many times ``size`` on both sides.

    The result still has at least ``size`` pixels each way, so the resize after it only
    shrinks by less than 2x (or enlarges, as it would have anyway).
    """
    factor = tf.minimum(window[2] // size[0], window[3] // size[1])
    branch = tf.reduce_sum(tf.cast(factor >= tf.constant(_JPEG_RATIOS[1:]), tf.int32))

    def decode(ratio):
        # With ``ratio`` the crop window is given in the scaled image's coordinates.
        return lambda: tf.io.decode_and_crop_jpeg(
            encoded, window // ratio, channels=3, ratio=ratio
        )

    return tf.switch_case(branch, [decode(r) for r in _JPEG_RATIOS])


def _window_image(
    encoded: tf.Tensor,
    size: Sequence[int],
    window_fn: Callable[[tf.Tensor], tf.Tensor],
    target_fn: Callable[[tf.Tensor], tf.Tensor],
    partial: bool,
    rounded: tf.DType | None,
    flip_seed: tf.Tensor | None,
) -> tf.Tensor:
    """Encoded image -> a window of it, flipped at random if ``flip_seed`` is given,
    scaled to a target size (see ``_scale``).

    ``window_fn`` and ``target_fn`` map the stored shape (h, w, c) to the (y, x, h, w)
    window and to the int32 (h, w) it is scaled to. The flip is applied to the uint8
    window, before scaling (both filters are mirror-symmetric): a quarter of the bytes
    of the float image after it, and often fewer pixels.

    ``partial``: a JPEG's window is found from its header and only that window is decoded
    (possibly DCT-scaled). That skips the rest of the file, so a JPEG truncated after the
    window is not noticed: only for records the convert job has already decoded in full.
    """

    def whole():
        image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
        y, x, h, w = tf.unstack(window_fn(tf.shape(image)))
        return image[y : y + h, x : x + w], tf.shape(image)

    def jpeg():
        shape = tf.io.extract_jpeg_shape(encoded)
        return _decode_jpeg_window(encoded, window_fn(shape), size), shape

    if partial:
        image, shape = tf.cond(tf.io.is_jpeg(encoded), jpeg, whole)
    else:
        image, shape = whole()
    if flip_seed is not None:
        image = _flip(image, flip_seed)
    return _scale(image, target_fn(shape), rounded)


def _resize(
    encoded: tf.Tensor,
    size: Sequence[int],
    policy: str,
    partial: bool,
    rounded: tf.DType | None = None,
    flip_seed: tf.Tensor | None = None,
) -> tf.Tensor:
    """Encoded image -> ``size`` image by the resize policy (see ``_window_image``)."""
    target = tf.constant(size, tf.int32)
    hw = tf.cast(target, tf.float32)

    def whole_image(shape):
        return tf.stack([0, 0, shape[0], shape[1]])

    def output_size(shape):
        return target

    if policy == "stretch":
        return _window_image(
            encoded, size, whole_image, output_size, partial, rounded, flip_seed
        )
    if policy == "pad":
        # Fit inside ``size`` keeping the aspect ratio, then pad with zeros, centred.
        def fit(shape):
            # From the stored size, not the DCT-scaled one: the same fit for any decode.
            shape = tf.cast(shape[:2], tf.float32)
            fitted = tf.maximum(tf.floor(shape * tf.reduce_min(hw / shape)), 1)
            return tf.minimum(tf.cast(fitted, tf.int32), target)

        image = _window_image(
            encoded, size, whole_image, fit, partial, rounded, flip_seed
        )
        offset = (target - tf.shape(image)[:2]) // 2
        return tf.image.pad_to_bounding_box(
            image, offset[0], offset[1], size[0], size[1]
        )

    # crop: the largest centred window of the target's aspect ratio (the usual evaluation
    # crop); decoding just that window skips the pixels that would be cropped away.
    def centre(shape):
        shape = tf.cast(shape[:2], tf.float32)
        extent = tf.minimum(shape, tf.round(hw * tf.reduce_min(shape / hw)))
        extent = tf.maximum(extent, 1)
        begin = tf.floor((shape - extent) / 2)
        return tf.cast(tf.concat([begin, extent], 0), tf.int32)

    return _window_image(
        encoded, size, centre, output_size, partial, rounded, flip_seed
    )


def _random_resized_crop(
    encoded: tf.Tensor,
    size: Sequence[int],
    seed: tf.Tensor,
    aug: Augment,
    partial: bool,
    flip_seed: tf.Tensor | None,
) -> tf.Tensor:
    target = tf.constant(size, tf.int32)

    def window(shape):
        begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
            shape,
            bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
            seed=seed,
            min_object_covered=0.0,
            aspect_ratio_range=aug.crop_aspect,
            area_range=aug.crop_area,
            max_attempts=10,
            use_image_if_no_bounding_boxes=True,
        )
        return tf.concat([begin[:2], crop_size[:2]], 0)

    return _window_image(
        encoded, size, window, lambda shape: target, partial, None, flip_seed
    )


def to_image(
    encoded: tf.Tensor,
    size: Sequence[int],
    policy: str,
    augment: Augment | None,
    seed: tf.Tensor | None,
    partial: bool = True,
    dtype: tf.DType = tf.uint8,
) -> tf.Tensor:
    """Encoded JPEG/PNG -> ``(height, width, 3)`` image of whole pixel values 0..255,
    augmented when asked.

    Args:
        encoded: scalar string tensor with the encoded image.
        size: ``(height, width)``.
        policy: ``"crop"`` (the largest centred window of the output's aspect ratio,
            resized), ``"pad"`` (fit inside, zero padding) or ``"stretch"``; used when
            there is no random resized crop.
        augment: augmentation to apply, or ``None``.
        seed: ``int64[2]`` per-element seed for the stateless random ops.
        partial: decode only the needed window of a JPEG, DCT-scaled when much larger
            than ``size``. ``False`` decodes every image in full, so truncated files fail
            (for raw files that nothing has validated yet).
        dtype: ``tf.uint8``, or ``tf.float32`` for the same values as floats, for a
            caller that goes on in float (no uint8 copy on the way).
    """
    if augment is None:
        out = _resize(encoded, size, policy, partial, dtype)
    else:
        seeds = tf.random.experimental.stateless_split(seed, num=4)
        flip = seeds[1] if augment.flip else None
        if augment.random_resized_crop:
            out = _random_resized_crop(encoded, size, seeds[0], augment, partial, flip)
        else:
            out = _resize(encoded, size, policy, partial, flip_seed=flip)
        if augment.brightness:
            out = tf.image.stateless_random_brightness(
                out, augment.brightness * 255.0, seeds[2]
            )
        if augment.contrast:
            out = tf.image.stateless_random_contrast(
                out, 1 - augment.contrast, 1 + augment.contrast, seeds[3]
            )
        out = _quantize(out, dtype)
    return tf.ensure_shape(out, [size[0], size[1], 3])


Normalize = (
    str
    | tuple[Sequence[float], Sequence[float]]
    | Callable[[tf.Tensor], tf.Tensor]
    | None
)


def normalize_batch(
    images: tf.Tensor, normalize: Normalize, dtype: tf.DType
) -> tf.Tensor:
    """Images of whole pixel values -> the requested dtype and scale.

    Args:
        images: uint8, or float32 in 0..255 (one image or a batch).
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
    # Multiplications by reciprocals: a division costs several times as much.
    if normalize == "unit":
        return tf.cast(x * (1 / 255), dtype)
    mean, std = normalize
    mean = tf.constant(mean, tf.float32)
    inverse_std = 1 / tf.constant(std, tf.float32)
    return tf.cast((x * (1 / 255) - mean) * inverse_std, dtype)


def check_options(policy: str, normalize: Normalize, dtype: tf.DType) -> None:
    """Raises ValueError for an unknown resize policy, normalisation or dtype."""
    if policy not in RESIZE_POLICIES:
        raise ValueError(f"resize must be one of {RESIZE_POLICIES}, not {policy!r}")
    if dtype not in (tf.float32, tf.uint8, tf.float16, tf.bfloat16):
        raise ValueError(
            f"dtype must be float32, float16, bfloat16 or uint8, not {dtype}"
        )
    if normalize is None or callable(normalize) or normalize == "unit":
        return
    if not (isinstance(normalize, (tuple, list)) and len(normalize) == 2):
        raise ValueError(
            f"normalize must be 'unit', None, (mean, std) or a callable: {normalize!r}"
        )
