"""Class lists equal to tf.keras.utils.image_dataset_from_directory's, on local trees and on
S3, and keys with empty segments on S3: listing, the convert job and the raw-tree reader."""

from __future__ import annotations

import collections
import json
import os

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing import test_pipeline
from apache_beam.testing.util import assert_that, equal_to

from beam_jobs import convert
from devtools.local_s3 import put_tree
from devtools.sample_data import encode, photo_like
from s3tfr import s3, storage
from s3tfr.manifest import load_info
from tfdata_reader.images import list_images
from transforms.listing import ListImages

UNICODE_CLASS = "ünïcödé 猫"
# Images Keras indexes and the convert job converts (hidden files and nested folders,
# hidden ones included, are indexed by Keras' recursive walk).
GOOD = [
    "cat/a.jpg",
    "cat/b.png",
    "cat/sub/c.jpg",
    "cat/.hidden.jpg",
    "cat/.ipynb_checkpoints/a-checkpoint.jpg",
    "dog/e.jpg",
    f"{UNICODE_CLASS}/d.jpg",
]
LINKED = ["linked/e.jpg"]  # linked -> dog: Keras follows a link to a class folder
# key -> rejection code of the files that are listed but not converted
DECODE_REJECTED = {"corrupt/cut.jpg": "truncated", "notes/readme.txt": "not_an_image"}
HIDDEN = {".ipynb_checkpoints/x-checkpoint.jpg": "hidden_folder"}


def _image(path, rng: np.random.Generator) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = "PNG" if path.suffix == ".png" else "JPEG"
    path.write_bytes(encode(photo_like(40, 30, rng), fmt))


def _write_tree(root, link: bool) -> None:
    """Class folders Keras keeps that hold no usable image, a hidden folder beside them,
    and (``link``) a link to a class folder."""
    rng = np.random.default_rng(0)
    for rel in GOOD + [".ipynb_checkpoints/x-checkpoint.jpg"]:
        _image(root / rel, rng)
    (root / "empty").mkdir()
    whole = encode(photo_like(200, 150, rng), "JPEG", quality=90)
    (root / "corrupt").mkdir()
    (root / "corrupt" / "cut.jpg").write_bytes(whole[: len(whole) // 3])
    (root / "notes").mkdir()
    (root / "notes" / "readme.txt").write_text("no images here\n")
    if link:
        os.symlink("dog", root / "linked", target_is_directory=True)


def _keras(directory) -> tuple[list[str], list[str]]:
    """(class names, file paths relative to ``directory``) of Keras' own index."""
    import tensorflow as tf

    ds = tf.keras.utils.image_dataset_from_directory(
        str(directory), shuffle=False, batch_size=None, image_size=(8, 8)
    )
    files = [os.path.relpath(p, directory).replace(os.sep, "/") for p in ds.file_paths]
    return ds.class_names, files


@pytest.fixture(scope="module")
def trees(tmp_path_factory) -> dict:
    """The odd tree with and without the class link, with Keras' index of each."""
    out = {}
    for name, link in (("linked", True), ("plain", False)):
        root = tmp_path_factory.mktemp(name)
        _write_tree(root, link)
        classes, files = _keras(root)
        out[name] = {"root": root, "classes": classes, "files": files}
    return out


def _assert_listing(root: str, refs, rejected, classes, split_from_dirs=False) -> None:
    """Asserts ListImages' (key, split, label) per ref, (key, stage, code) per
    rejection, and its summary (every object counted once, the class names)."""
    with test_pipeline.TestPipeline() as p:
        listed = p | ListImages(root, split_from_dirs=split_from_dirs)
        assert_that(
            listed["refs"]
            | beam.FlatMap(lambda batch: [(r.key, r.split, r.label) for r in batch]),
            equal_to(refs),
            label="Refs",
        )
        assert_that(
            listed["rejected"] | beam.Map(lambda r: (r.key, r.stage, r.code)),
            equal_to(rejected),
            label="Rejected",
        )
        assert_that(
            listed["summary"],
            equal_to([(len(refs) + len(rejected), classes)]),
            label="Summary",
        )


def _shard_labels(out: str, info: dict, tmp_path) -> dict[str, tuple[int, str]]:
    """filename -> (label, class text) over every shard of a dataset."""
    import tensorflow as tf

    labels = {}
    for split in info["splits"].values():
        for entry in split["shards"]:
            path = tmp_path / entry["file"]
            path.write_bytes(storage.read_bytes(storage.join(out, entry["file"])))
            for raw in tf.data.TFRecordDataset(str(path)).as_numpy_iterator():
                feature = tf.train.Example.FromString(raw).features.feature
                name = feature["image/filename"].bytes_list.value[0].decode()
                labels[name] = (
                    feature["image/class/label"].int64_list.value[0],
                    feature["image/class/text"].bytes_list.value[0].decode(),
                )
    return labels


def _check_dataset(
    out: str, tmp_path, classes, good, rejected: dict, class_level: int = 0
) -> dict:
    """Asserts a committed dataset's labels, counts, records and rejections; the class
    of a key is its segment ``class_level``."""
    info = load_info(out)
    assert info["labels"] == classes
    labels_txt = storage.read_bytes(storage.join(out, "labels.txt")).decode("utf-8")
    assert labels_txt.splitlines() == classes
    counts = info["counts"]
    assert counts["listed"] == counts["converted"] + counts["rejected"]
    assert (counts["converted"], counts["rejected"]) == (len(good), len(rejected))
    lines = (
        storage.read_bytes(storage.join(out, "rejected.jsonl")).decode().splitlines()
    )
    assert {json.loads(x)["key"]: json.loads(x)["code"] for x in lines} == rejected
    per_class = collections.Counter()
    for split in info["splits"].values():
        assert list(split["class_counts"]) == classes
        per_class.update(split["class_counts"])
    want = collections.Counter(key.split("/")[class_level] for key in good)
    assert {c: per_class[c] for c in classes} == {c: want[c] for c in classes}
    records = _shard_labels(out, info, tmp_path)
    assert sorted(records) == sorted(good)
    for key, (label, text) in records.items():
        assert text == key.split("/")[class_level], key
        assert label == classes.index(text), key
    return info


# ---------------------------------------------------------------- the rule


@pytest.mark.parametrize(
    "name, is_class",
    [("cat", True), (UNICODE_CLASS, True), (".ipynb_checkpoints", False), ("", False),
     ("..", False), ("bad\udcff", False)],
)  # fmt: skip
def test_is_class_folder(name, is_class):
    assert storage.is_class_folder(name) is is_class


@pytest.mark.parametrize(
    "key, code",
    [("cat/a.jpg", None), ("cat/.a.jpg", None), ("cat/", "directory_marker"),
     ("cat//a.jpg", "empty_segment"), ("/a.jpg", "empty_segment"),
     ("cat//", "empty_segment"), ("cat/a.jpg\udcff", "bad_name")],
)  # fmt: skip
def test_candidate_rejection(key, code):
    assert storage.candidate_rejection(key, 10) == code


# ---------------------------------------------------------------- local trees


def test_listing_and_reader_match_keras_on_a_local_tree(trees):
    tree = trees["linked"]
    assert tree["classes"] == sorted(
        ["cat", "corrupt", "dog", "empty", "linked", "notes", UNICODE_CLASS]
    )
    assert sorted(tree["files"]) == sorted(GOOD + LINKED + ["corrupt/cut.jpg"])

    # Keras' files, plus the one it leaves out for its extension (decoded here, rejected)
    refs = sorted(tree["files"] + ["notes/readme.txt"])
    _assert_listing(
        str(tree["root"]),
        [(key, "", key.split("/", 1)[0]) for key in refs],
        [(key, "list", code) for key, code in HIDDEN.items()],
        tree["classes"],
    )

    keys, labels, classes = list_images(str(tree["root"]))
    assert classes == tree["classes"]
    assert keys == refs
    assert labels == [classes.index(k.split("/", 1)[0]) for k in keys]


def test_convert_labels_equal_keras_on_a_local_tree(trees, tmp_path):
    tree = trees["linked"]
    out = str(tmp_path / "out")
    convert.run(["--input", str(tree["root"]), "--output", out, "--num_shards", "2"])
    _check_dataset(
        out, tmp_path, tree["classes"], GOOD + LINKED, {**DECODE_REJECTED, **HIDDEN}
    )


def test_split_from_dirs_class_list_is_the_union_of_the_splits(tmp_path):
    rng = np.random.default_rng(1)
    src = tmp_path / "src"
    for rel in ("train/cat/a.jpg", "train/dog/b.jpg", "test/cat/c.jpg",
                "train/.ipynb_checkpoints/d.jpg", ".cache/cat/e.jpg"):  # fmt: skip
        _image(src / rel, rng)
    (src / "test" / "bird").mkdir()
    keras_classes = sorted(set(_keras(src / "train")[0]) | set(_keras(src / "test")[0]))
    assert keras_classes == ["bird", "cat", "dog"]
    out = str(tmp_path / "out")
    convert.run(["--input", str(src), "--output", out, "--split_from_dirs"])
    hidden = {"train/.ipynb_checkpoints/d.jpg": "hidden_folder",
              ".cache/cat/e.jpg": "hidden_folder"}  # fmt: skip
    info = _check_dataset(
        out, tmp_path, keras_classes,
        ["train/cat/a.jpg", "train/dog/b.jpg", "test/cat/c.jpg"], hidden, class_level=1,
    )  # fmt: skip
    assert {s: v["class_counts"] for s, v in info["splits"].items()} == {
        "train": {"bird": 0, "cat": 1, "dog": 1},
        "test": {"bird": 0, "cat": 1, "dog": 0},
    }


# ---------------------------------------------------------------- S3


def test_convert_labels_equal_keras_on_s3(trees, s3_bucket, tmp_path):
    tree = trees["plain"]  # no links on S3
    put_tree(str(tree["root"]), s3_bucket, "in/")
    # A folder made in the S3 console is a marker object: "empty" exists as a class.
    s3.put_bytes(s3_bucket, "in/empty/", b"")
    s3.put_bytes(s3_bucket, "in/cat/", b"")
    markers = {"empty/": "directory_marker", "cat/": "directory_marker"}
    root = f"s3://{s3_bucket}/in"

    keys, _labels, classes = list_images(root)
    assert classes == tree["classes"]
    assert keys == sorted(GOOD + list(DECODE_REJECTED))

    out = f"s3://{s3_bucket}/out/"
    convert.run(
        ["--input", root + "/", "--output", out, "--validation_fraction", "0.3"]
    )
    _check_dataset(
        out, tmp_path, tree["classes"], GOOD, {**DECODE_REJECTED, **HIDDEN, **markers}
    )


def _put_image(bucket: str, key: str, rng: np.random.Generator) -> None:
    s3.put_bytes(bucket, key, encode(photo_like(40, 30, rng), "JPEG"))


def test_s3_keys_with_empty_segments_are_rejected_and_the_root_listed_once(
    s3_bucket, tmp_path
):
    import tfdata_reader

    rng = np.random.default_rng(2)
    for key in ("in/cat/a.jpg", "in//x.jpg", "in/cat//y.jpg"):
        _put_image(s3_bucket, key, rng)
    s3.put_bytes(s3_bucket, "in/", b"")  # a root marker: "" as object and as folder
    root = f"s3://{s3_bucket}/in"
    assert list_images(root) == (["cat/a.jpg"], [0], ["cat"])

    out = f"s3://{s3_bucket}/out/"
    convert.run(["--input", root, "--output", out, "--validation_fraction", "0"])
    rejected = {"/x.jpg": "empty_segment", "cat//y.jpg": "empty_segment",
                "": "directory_marker"}  # fmt: skip
    _check_dataset(out, tmp_path, ["cat"], ["cat/a.jpg"], rejected)
    lines = storage.read_bytes(out + "rejected.jsonl").decode().splitlines()
    reasons = {json.loads(x)["key"]: json.loads(x)["reason"] for x in lines}
    assert "empty path segment ('//')" in reasons["/x.jpg"]
    assert "without '//'" in reasons["cat//y.jpg"]

    ds = tfdata_reader.make_dataset(
        out, "train", batch_size=4, image_size=(8, 8), training=False
    )
    assert [labels.numpy().tolist() for _images, labels in ds] == [[0]]


def test_s3_empty_segments_with_split_from_dirs(s3_bucket):
    rng = np.random.default_rng(3)
    for key in ("sp/train/cat/a.jpg", "sp/train//x.jpg", "sp//cat/y.jpg",
                "sp/test/dog/b.jpg", "sp/test/dog//z.jpg"):  # fmt: skip
        _put_image(s3_bucket, key, rng)
    _assert_listing(
        f"s3://{s3_bucket}/sp",
        [("test/dog/b.jpg", "test", "dog"), ("train/cat/a.jpg", "train", "cat")],
        [("train//x.jpg", "list", "empty_segment"),
         ("/cat/y.jpg", "list", "empty_segment"),
         ("test/dog//z.jpg", "list", "empty_segment")],
        ["cat", "dog"],
        split_from_dirs=True,
    )  # fmt: skip
