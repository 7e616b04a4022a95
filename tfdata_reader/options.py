"""ReaderOptions: how ``make_dataset`` reads, checked when built and resolved once per call.

``ReaderOptions`` holds the values as given (``None`` where a default depends on other
options). ``ReaderOptions.resolve`` turns them into ``ResolvedOptions``, where every
default is filled in, so the pipeline reads each setting from one place.
"""

from __future__ import annotations

import dataclasses
import numbers
import os
from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from s3tfr.s3 import S3Config
from tfdata_reader import ops, transform
from tfdata_reader.cache import VERIFY_MODES

__all__ = [
    "DEFAULT_PREFETCH_SHARDS",
    "DEFAULT_SHUFFLE_BUFFER",
    "ReaderOptions",
    "ResolvedOptions",
]

DEFAULT_SHUFFLE_BUFFER = 1024
DEFAULT_PREFETCH_SHARDS = 8
TRANSFORM_FN = "transform_fn"


@dataclasses.dataclass(frozen=True, kw_only=True)
class ReaderOptions:
    """How ``make_dataset`` reads a split: its keyword options, as one frozen value.

    Build one, pass it as ``make_dataset(uri, split, options=...)``, and derive variants
    with ``dataclasses.replace`` (for instance a training and an evaluation pass sharing
    the rest). The fields, their defaults and their meaning are ``make_dataset``'s
    keywords of the same names. Each value is checked when the object is built: a wrong
    type raises ``TypeError`` and a value out of range ``ValueError``, naming the option.
    """

    batch_size: int = 32
    image_size: Sequence[int] = (224, 224)
    training: bool = True
    seed: int | None = None
    deterministic: bool | None = None
    shuffle: bool | None = None
    shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER
    resize: str = "crop"
    augment: ops.Augment | bool | None = None
    normalize: ops.Normalize = "unit"
    dtype: tf.DType = tf.float32
    one_hot: bool = False
    drop_remainder: bool | None = None
    num_workers: int = 1
    worker_index: int = 0
    skip_bad_records: bool = False
    cache_dir: str | os.PathLike | None = None
    cache_max_bytes: int | None = None
    prefetch_shards: int = DEFAULT_PREFETCH_SHARDS
    cycle_length: int | None = None
    verify: str = "sha256"

    def __post_init__(self) -> None:
        _integer("batch_size", self.batch_size, minimum=1)
        _image_size(self.image_size)
        for name in ("training", "one_hot", "skip_bad_records"):
            _flag(name, getattr(self, name))
        for name in ("deterministic", "shuffle", "drop_remainder"):
            _flag(name, getattr(self, name), optional=True)
        _integer("seed", self.seed, optional=True)
        _integer("shuffle_buffer", self.shuffle_buffer, minimum=1)
        if not isinstance(self.augment, (ops.Augment, bool, type(None))):
            raise TypeError(
                f"augment must be an Augment, True, False or None, not {self.augment!r}"
            )
        normalize = self.normalize
        if isinstance(normalize, str) and normalize == TRANSFORM_FN:
            normalize = None  # loaded by resolve() from the dataset's analysis.json
        ops.check_options(self.resize, normalize, self.dtype)
        _integer("num_workers", self.num_workers, minimum=1)
        _integer("worker_index", self.worker_index, minimum=0)
        if not isinstance(self.cache_dir, (str, os.PathLike, type(None))):
            raise TypeError(f"cache_dir must be a path or None, not {self.cache_dir!r}")
        _integer("cache_max_bytes", self.cache_max_bytes, minimum=0, optional=True)
        _integer("prefetch_shards", self.prefetch_shards, minimum=0)
        _integer("cycle_length", self.cycle_length, minimum=1, optional=True)
        if self.verify not in VERIFY_MODES:
            raise ValueError(
                f"verify must be one of {VERIFY_MODES}, not {self.verify!r}"
            )

    def resolve(
        self,
        input_context: tf.distribute.InputContext | None = None,
        *,
        uri: str | None = None,
        config: S3Config | None = None,
    ) -> ResolvedOptions:
        """These options with every default filled in, for one ``make_dataset`` call.

        Args:
            input_context: ``tf.distribute.InputContext``; its input pipelines replace
                ``num_workers`` / ``worker_index`` and ``batch_size`` becomes its
                per-replica share of the global ``batch_size``.
            uri: the dataset, whose ``analysis.json`` gives ``normalize="transform_fn"``
                its per-channel mean and std.
            config: S3 client settings for reading ``analysis.json``.

        Raises:
            ValueError: ``worker_index`` not in ``[0, num_workers)``, a ``batch_size`` the
                replicas cannot share, or ``normalize="transform_fn"`` without ``uri``.
            DatasetError: ``normalize="transform_fn"`` and no valid ``analysis.json``.
        """
        normalize = self.normalize
        if isinstance(normalize, str) and normalize == TRANSFORM_FN:
            if uri is None:
                raise ValueError("normalize='transform_fn' needs the dataset's uri")
            normalize = transform.pixel_normalizer(transform.load_analysis(uri, config))
        num_workers, worker_index = self.num_workers, self.worker_index
        batch_size = self.batch_size
        if input_context is not None:
            num_workers = input_context.num_input_pipelines
            worker_index = input_context.input_pipeline_id
            batch_size = input_context.get_per_replica_batch_size(batch_size)
        if not 0 <= worker_index < num_workers:
            raise ValueError(f"worker_index {worker_index} not in [0, {num_workers})")
        training = bool(self.training)
        shuffle = training if self.shuffle is None else bool(self.shuffle)
        if self.deterministic is None:
            deterministic = self.seed is not None or not shuffle
        else:
            deterministic = bool(self.deterministic)
        if self.augment is True:
            augment = ops.Augment()
        elif self.augment is None:
            augment = ops.Augment() if training else None
        elif self.augment is False:
            augment = None
        else:
            augment = self.augment
        drop_remainder = (
            training if self.drop_remainder is None else bool(self.drop_remainder)
        )
        return ResolvedOptions(
            batch_size=int(batch_size),
            image_size=_image_size(self.image_size),
            training=training,
            seed=self.seed,
            deterministic=deterministic,
            shuffle=shuffle,
            shuffle_buffer=int(self.shuffle_buffer),
            resize=self.resize,
            augment=augment,
            normalize=normalize,
            dtype=tf.as_dtype(self.dtype),
            one_hot=bool(self.one_hot),
            drop_remainder=drop_remainder,
            num_workers=int(num_workers),
            worker_index=int(worker_index),
            skip_bad_records=bool(self.skip_bad_records),
            cache_dir=self.cache_dir,
            cache_max_bytes=self.cache_max_bytes,
            prefetch_shards=int(self.prefetch_shards),
            cycle_length=self.cycle_length,
            verify=self.verify,
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class ResolvedOptions:
    """``ReaderOptions`` with every default filled in (``ReaderOptions.resolve``).

    ``batch_size``, ``num_workers`` and ``worker_index`` are this input pipeline's (after
    an ``input_context``); ``augment`` is ``None`` for no augmentation; ``normalize`` is
    never ``"transform_fn"`` (the analysis' normaliser instead); ``cycle_length`` stays
    ``None`` when not given, since its default depends on the split's shards.
    """

    batch_size: int
    image_size: tuple[int, int]
    training: bool
    seed: int | None
    deterministic: bool
    shuffle: bool
    shuffle_buffer: int
    resize: str
    augment: ops.Augment | None
    normalize: ops.Normalize
    dtype: tf.DType
    one_hot: bool
    drop_remainder: bool
    num_workers: int
    worker_index: int
    skip_bad_records: bool
    cache_dir: str | os.PathLike | None
    cache_max_bytes: int | None
    prefetch_shards: int
    cycle_length: int | None
    verify: str


def _integer(
    name: str, value, *, minimum: int | None = None, optional: bool = False
) -> None:
    if value is None and optional:
        return
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        either = "an int or None" if optional else "an int"
        raise TypeError(f"{name} must be {either}, not {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, not {value!r}")


def _flag(name: str, value, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, (bool, np.bool_)):
        either = "True, False or None" if optional else "True or False"
        raise TypeError(f"{name} must be {either}, not {value!r}")


def _whole(value) -> bool:
    if isinstance(value, (bool, np.bool_)):
        return False
    if isinstance(value, numbers.Integral):
        return True
    return isinstance(value, numbers.Real) and float(value).is_integer()


def _image_size(value) -> tuple[int, int]:
    """``(height, width)`` as two positive ints (whole floats and NumPy ints accepted)."""
    try:
        pair = tuple(value)
    except TypeError:
        raise TypeError(f"image_size must be (height, width), not {value!r}") from None
    if len(pair) != 2 or not all(_whole(v) for v in pair):
        raise TypeError(f"image_size must be (height, width) as ints, not {value!r}")
    size = (int(pair[0]), int(pair[1]))
    if min(size) < 1:
        raise ValueError(f"image_size must be positive, not {value!r}")
    return size
