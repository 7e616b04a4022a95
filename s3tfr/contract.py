"""The data contract between the writer (``transforms``) and the readers (``tfdata_reader``,
TensorFlow Datasets, people): file names, shard names, record keys, the analysis keys.

Both sides import these names from here and nowhere else; the manifest's schema and its
validation are in :mod:`s3tfr.manifest`. No Beam or TensorFlow import.
"""

from __future__ import annotations

import hashlib
import json
import os
import re

__all__ = [
    "ANALYSIS_FILE",
    "ANALYSIS_FORMAT_VERSION",
    "CHANNELS_KEY",
    "CLASS_COUNTS_KEY",
    "CLASS_WEIGHTS_KEY",
    "CLASS_WEIGHT_KEY",
    "FILENAME_KEY",
    "FORMAT_KEY",
    "FORMAT_VERSION",
    "HEIGHT_KEY",
    "IMAGE_KEY",
    "INDEX_DIR",
    "LABELS",
    "LABEL_KEY",
    "LABEL_TEXT_KEY",
    "LABEL_VOCABULARY",
    "LEGACY_MANIFEST",
    "MANIFEST",
    "PIXEL_COUNT_KEY",
    "PIXEL_MEAN_KEY",
    "PIXEL_STD_KEY",
    "RECORD_KEYS",
    "REJECTED_FILE",
    "SHARD_NAME_RE",
    "SOURCE_SHA256_KEY",
    "SPLIT_NAME_RE",
    "TOOL",
    "TRANSFORMED_LABEL_KEY",
    "TRANSFORMED_METADATA_DIR",
    "TRANSFORM_FN_DIR",
    "VERSION",
    "WIDTH_KEY",
    "fd_sha256",
    "file_sha256",
    "index_name",
    "shard_name",
    "split_fingerprint",
]

VERSION = "0.1.0"
TOOL = {"name": "s3-tfrecords", "version": VERSION}

# Files of a dataset prefix. The manifest is written last: it is the commit marker.
MANIFEST = "s3tfr_manifest.json"
# The older layout's manifest; in the present one, TensorFlow Datasets' metadata.
LEGACY_MANIFEST = "dataset_info.json"
FORMAT_VERSION = 1
LABELS = "labels.txt"  # line i = label i
REJECTED_FILE = "rejected.jsonl"  # one JSON object per input not written

# Split names: they become file names and TFDS split names.
SPLIT_NAME_RE = re.compile(r"[A-Za-z0-9_]+")
# Shards: ``<split>-<index>-of-<count>.tfrecord``, five digits each. Anchored with
# fullmatch: no separator, no "..", nothing before or after. ``count`` is the split's
# shard count at its first conversion; shards that ``convert --append`` adds continue
# the numbering beyond it (``train-00032-of-00032``), so that one name pattern (and one
# TensorFlow Datasets file template) covers every shard of a split.
SHARD_NAME_RE = re.compile(
    rf"(?P<split>{SPLIT_NAME_RE.pattern})-(?P<index>\d{{5}})-of-(?P<count>\d{{5}})\.tfrecord"
)


def shard_name(split: str, index: int, count: int) -> str:
    """The file name of shard ``index`` of ``count`` in ``split`` (``SHARD_NAME_RE``)."""
    return f"{split}-{index:05d}-of-{count:05d}.tfrecord"


# Beside each shard, the key index of its records (``convert --append`` reads it to find
# what the dataset holds): gzip'd JSON lines ``{"key", "size", "stamp", "sha256"}``.
INDEX_DIR = "s3tfr_index"


def index_name(shard: str) -> str:
    """The key index file of the shard named ``shard`` (a ``SHARD_NAME_RE`` name)."""
    return f"{INDEX_DIR}/{shard}.jsonl.gz"


# Each record is a tf.train.Example with these keys (the classic ImageNet converters').
IMAGE_KEY = "image/encoded"
FORMAT_KEY = "image/format"
HEIGHT_KEY = "image/height"
WIDTH_KEY = "image/width"
CHANNELS_KEY = "image/channels"
LABEL_KEY = "image/class/label"
LABEL_TEXT_KEY = "image/class/text"
FILENAME_KEY = "image/filename"
SOURCE_SHA256_KEY = "image/source_sha256"
RECORD_KEYS = (IMAGE_KEY, FORMAT_KEY, HEIGHT_KEY, WIDTH_KEY, CHANNELS_KEY, LABEL_KEY,
               LABEL_TEXT_KEY, FILENAME_KEY, SOURCE_SHA256_KEY)  # fmt: skip

# The analyze job's output: analysis.json (written last, its commit marker) beside
# tensorflow-transform's transform_fn/ and transformed_metadata/.
ANALYSIS_FILE = "analysis.json"
ANALYSIS_FORMAT_VERSION = 1
TRANSFORM_FN_DIR = "transform_fn"
TRANSFORMED_METADATA_DIR = "transformed_metadata"
LABEL_VOCABULARY = "labels"  # the vocabulary's asset name in the transform output
# Per-example outputs of the transform besides the copied raw features.
TRANSFORMED_LABEL_KEY = "label"  # int64: index of the class text in the vocabulary
CLASS_WEIGHT_KEY = "class_weight"  # float32: inverse-frequency weight of the class
# Dataset-wide statistics, the same for every example (as tft_unit's own
# assertAnalyzerOutputs broadcasts analyzer results): the normalisation constants a
# serving model reads from the transform layer, and what analysis.json records.
PIXEL_MEAN_KEY = "stats/pixel_mean"  # float32 (3,), 0..255 scale
PIXEL_STD_KEY = "stats/pixel_std"  # float32 (3,)
PIXEL_COUNT_KEY = "stats/pixels"  # int64: pixels of all analyzed images
CLASS_COUNTS_KEY = "stats/class_counts"  # int64 (num_classes,)
CLASS_WEIGHTS_KEY = "stats/class_weights"  # float32 (num_classes,)


def split_fingerprint(info: dict, split: str) -> str:
    """A digest of one split's shard list: an analysis belongs to exactly these shards."""
    shards = info["splits"][split]["shards"]
    return hashlib.sha256(json.dumps(shards, sort_keys=True).encode()).hexdigest()


_HASH_CHUNK = 4 * 1024 * 1024


def file_sha256(path: str) -> str:
    """The hex sha256 of a local file, as the manifest records each shard's."""
    with open(path, "rb") as f:
        return fd_sha256(f.fileno())


def fd_sha256(fd: int) -> str:
    """The hex sha256 of an open file, read from its start with ``pread``."""
    digest = hashlib.sha256()
    offset = 0
    while chunk := os.pread(fd, _HASH_CHUNK, offset):
        digest.update(chunk)  # hashlib releases the GIL on large buffers
        offset += len(chunk)
    return digest.hexdigest()
