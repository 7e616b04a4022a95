"""tf.data reader for the convert job's sharded TFRecords (local or S3); no Beam import.

``load_info`` / ``DatasetError`` / ``shard_uris`` need only the standard library and boto3;
``make_dataset``, ``ReaderOptions`` and ``make_dataset_from_images`` import TensorFlow on first
use, so tools that only inspect a manifest stay fast.
"""

from __future__ import annotations

from s3tfr.manifest import DatasetError, load_info, shard_uris, validate_info

__all__ = [
    "Augment",
    "DatasetError",
    "ReaderOptions",
    "ReaderStats",
    "ShardCache",
    "load_analysis",
    "load_info",
    "make_dataset",
    "make_dataset_from_images",
    "shard_uris",
    "validate_info",
]

_LAZY = {
    "make_dataset": "tfdata_reader.dataset",
    "make_dataset_from_images": "tfdata_reader.images",
    "ShardCache": "tfdata_reader.cache",
    "ReaderOptions": "tfdata_reader.options",
    "ReaderStats": "tfdata_reader.dataset",
    "Augment": "tfdata_reader.ops",
    "load_analysis": "tfdata_reader.transform",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tfdata_reader' has no attribute {name!r}")
