"""TensorFlow Datasets' metadata for a converted dataset: the manifest in; the files that
let ``tfds.builder_from_directory(OUT)`` load the dataset out.

TFDS reads a folder of prepared data through ``dataset_info.json`` (its ``DatasetInfo``
proto as JSON: name, version, file format, and per split the shard lengths, bytes and a
``filepathTemplate`` that matches the shards' names), ``features.json`` (the feature
connectors that decode a record) and ``<feature>.labels.txt`` for a ``ClassLabel``.

The records' keys are what a nested ``FeaturesDict`` flattens to (TFDS joins the levels
with ``/``): ``{"image": {"encoded": Image, "class": {"label": ClassLabel, ...}, ...}}``
reads ``image/encoded`` and ``image/class/label``, so TFDS yields
``example["image"]["encoded"]`` as a decoded ``uint8`` image and
``example["image"]["class"]["label"]`` as the class index.

The JSON is written here rather than by TFDS's own classes: a worker would otherwise import
TFDS (and TensorFlow) to commit a dataset, and TFDS is no dependency of the convert job;
``tests/test_tfds.py`` loads what is written with TFDS itself.
"""

from __future__ import annotations

import json

from s3tfr.contract import FORMAT_VERSION, LEGACY_MANIFEST, SHARD_NAME_RE

__all__ = [
    "FILEPATH_TEMPLATE",
    "TFDS_FEATURES",
    "TFDS_FILES",
    "TFDS_INFO",
    "TFDS_LABELS",
    "TFDS_NAME",
    "tfds_files",
]

# TFDS's file name; in the older layout the same name held this tool's manifest.
TFDS_INFO = LEGACY_MANIFEST
TFDS_FEATURES = "features.json"
# "<feature path with - for />.labels.txt": the names of image/class/label.
TFDS_LABELS = "image-class-label.labels.txt"
TFDS_FILES = (TFDS_INFO, TFDS_FEATURES, TFDS_LABELS)
TFDS_NAME = "s3_tfrecords"
# TFDS's template for the shards' names: SHARD_X_OF_Y is "NNNNN-of-NNNNN".
FILEPATH_TEMPLATE = "{SPLIT}-{SHARD_X_OF_Y}.tfrecord"
# After ``convert --append`` a split's names run past the count they carry, and may skip
# numbers (shards replaced): TFDS then reads them by index in the split's series, and
# a number without a shard has length 0, which TFDS skips without opening a file.
SERIES_TEMPLATE = "{{SPLIT}}-{{SHARD_INDEX}}-of-{count:05d}.tfrecord"

_FEATURE_CLASS = "tensorflow_datasets.core.features."
_TEXT = {"pythonClassName": f"{_FEATURE_CLASS}text_feature.Text", "text": {}}
_INT64 = {
    "pythonClassName": f"{_FEATURE_CLASS}scalar.Scalar",
    "tensor": {"dtype": "int64", "encoding": "none", "shape": {}},
}


def _image_shape(options: dict) -> list[str]:
    """The decoded image's shape: fixed by a crop, else only its channels are known."""
    resize = str(options.get("resize", "none"))
    height = width = "-1"
    if resize.startswith("crop:"):
        width, _, height = resize.removeprefix("crop:").partition("x")
    return [height, width, str(options.get("channels", 3))]


def _features(info: dict) -> dict:
    """The ``features.json`` content: a nested FeaturesDict over the records' keys."""
    options = info.get("options", {})
    described = info.get("features", {})
    leaves = {
        "image/encoded": {
            "pythonClassName": f"{_FEATURE_CLASS}image_feature.Image",
            "image": {
                "shape": {"dimensions": _image_shape(options)},
                "dtype": "uint8",
                "encodingFormat": options.get("image_format", "jpeg"),
            },
        },
        "image/format": _TEXT,
        "image/height": _INT64,
        "image/width": _INT64,
        "image/channels": _INT64,
        "image/class/label": {
            "pythonClassName": f"{_FEATURE_CLASS}class_label_feature.ClassLabel",
            "classLabel": {"numClasses": str(len(info["labels"]))},
        },
        "image/class/text": _TEXT,
        "image/filename": _TEXT,
        "image/source_sha256": _TEXT,
    }
    root: dict = {}
    for key, leaf in leaves.items():
        description = described.get(key, {}).get("description")
        leaf = {**leaf, "description": description} if description else leaf
        *parents, name = key.split("/")
        level = root
        for parent in parents:
            level = level.setdefault(parent, {})
        level[name] = leaf

    def _dict(level: dict) -> dict:
        return {
            "pythonClassName": f"{_FEATURE_CLASS}features_dict.FeaturesDict",
            "featuresDict": {
                "features": {
                    name: _dict(value) if "pythonClassName" not in value else value
                    for name, value in level.items()
                }
            },
        }

    return _dict(root)


def _dataset_info(info: dict) -> dict:
    """The ``dataset_info.json`` content: TFDS's DatasetInfo proto in its JSON form."""
    tool = info.get("tool", {})
    source = info.get("source", {}).get("uri", "")
    return {
        "name": TFDS_NAME,
        "description": (
            f"Images of {len(info['labels'])} classes from {source}, converted by "
            f"{tool.get('name', 's3-tfrecords')} {tool.get('version', '')}".rstrip()
        ),
        "version": f"{FORMAT_VERSION}.0.0",
        "fileFormat": "tfrecord",
        "splits": [
            {"name": split, "numBytes": str(entry["bytes"]), **_shards(entry["shards"])}
            for split, entry in sorted(info["splits"].items())
        ],
    }


def _shards(shards: list[dict]) -> dict:
    """A split's ``shardLengths`` and ``filepathTemplate``: one length per number of its
    series (0 where no shard has it)."""
    numbered = [SHARD_NAME_RE.fullmatch(shard["file"]) for shard in shards]
    counts = {int(match["count"]) for match in numbered}
    lengths = {int(match["index"]): shard["examples"] for match, shard in zip(numbered, shards)}
    if counts == {len(shards)} and set(lengths) == set(range(len(shards))):
        template = FILEPATH_TEMPLATE
    else:
        template = SERIES_TEMPLATE.format(count=counts.pop())
    return {
        "shardLengths": [str(lengths.get(i, 0)) for i in range(max(lengths) + 1)],
        "filepathTemplate": template,
    }


def _json(document: dict) -> bytes:
    return (
        json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    ).encode()


def tfds_files(info: dict) -> dict[str, bytes]:
    """TFDS's metadata files for the dataset that ``info`` (the manifest) describes.

    Args:
        info: the manifest dict as the convert job commits it.

    Returns:
        File name -> content, to be written beside the shards; empty for a compressed
        dataset: TFDS opens TFRecord shards without a compression type, so it cannot
        read gzip shards.
    """
    if info.get("compression"):
        return {}
    labels = "".join(f"{label}\n" for label in info["labels"])
    return {
        TFDS_INFO: _json(_dataset_info(info)),
        TFDS_FEATURES: _json(_features(info)),
        TFDS_LABELS: labels.encode(),
    }
