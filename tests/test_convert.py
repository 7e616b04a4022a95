"""The convert job: transforms in TestPipeline, and whole runs on local paths and local S3."""

from __future__ import annotations

import collections
import hashlib
import io
import json
import os

import apache_beam as beam
import numpy as np
import pytest
import tensorflow as tf
from apache_beam.testing import test_pipeline
from apache_beam.testing.util import assert_that, equal_to
from PIL import Image

from beam_jobs import convert
from beam_jobs.common import UserError, counters
from devtools.local_s3 import put_tree
from devtools.sample_data import encode, photo_like, write_sample_tree
from s3tfr import storage
from s3tfr.contract import INDEX_DIR, MANIFEST, index_name
from transforms.commit import Lease, mark_written
from transforms.examples import ConvertSettings
from transforms.listing import ListImages
from transforms.manifest_writer import AccountingError, commit_dataset
from transforms.references import ImageRef, Rejection, ShardItem, key_hash
from transforms.sharding import AssignShards, ShardConfig, num_shards
from transforms.tfds_metadata import TFDS_FILES
from transforms.tfrecords import WriteShards

# file -> rejection code, for the odd files _odd_tree adds to a sample tree
BAD_FILES = {
    "dog/broken.jpg": "truncated",
    "cat/notes.jpg": "not_an_image",
    "cat/empty.jpg": "zero_bytes",
    "readme.txt": "no_class_folder",
}


def _odd_tree(root) -> list[str]:
    """A sample tree plus odd files; returns the relative keys of the good images."""
    root = str(root)
    write_sample_tree(root, per_class=6)
    with open(os.path.join(root, "cat", "notes.jpg"), "w") as f:
        f.write("not a picture\n")
    open(os.path.join(root, "cat", "empty.jpg"), "wb").close()
    with open(os.path.join(root, "readme.txt"), "w") as f:
        f.write("top-level file without a class folder\n")
    image = photo_like(120, 90, np.random.default_rng(9))
    with open(os.path.join(root, "dog", "png_named.jpg"), "wb") as f:
        f.write(encode(image, "PNG"))
    keys = []
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            key = os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/")
            if key not in BAD_FILES:
                keys.append(key)
    return sorted(keys)


def _read_json(uri: str) -> dict:
    return json.loads(storage.read_bytes(uri))


def _parse_shard(data: bytes, tmp_path) -> list[dict]:
    path = tmp_path / hashlib.sha256(data).hexdigest()
    path.write_bytes(data)
    records = []
    for raw in tf.data.TFRecordDataset(str(path)).as_numpy_iterator():
        feature = tf.train.Example.FromString(raw).features.feature
        record = {}
        for key, value in feature.items():
            kind = value.WhichOneof("kind")
            record[key] = getattr(value, kind).value[0]
        records.append(record)
    return records


# ---------------------------------------------------------------- transforms


def test_list_images_emits_refs_and_rejections(tmp_path):
    # Non-images are only found out at decode; listing rejects what it can see.
    keys = _odd_tree(tmp_path) + ["cat/notes.jpg", "dog/broken.jpg"]
    sizes = {k: os.path.getsize(tmp_path / k) for k in keys}
    # The listing's stamp, which changes when a file is rewritten.
    stamps = {k: storage.local_stamp(str(tmp_path / k)) for k in keys}
    with test_pipeline.TestPipeline() as p:
        listed = p | ListImages(str(tmp_path))
        assert_that(
            listed["refs"] | beam.FlatMap(lambda refs: refs),
            equal_to([ImageRef(k, sizes[k], k.split("/")[0], "", stamp=stamps[k]) for k in keys]),
            label="Refs",
        )
        assert_that(
            listed["rejected"] | beam.Map(lambda r: (r.key, r.stage, r.code)),
            equal_to(
                [("cat/empty.jpg", "list", "zero_bytes"), ("readme.txt", "list", "no_class_folder")]
            ),
            label="Rejected",
        )


def test_assign_shards_uses_only_the_key_hash():
    refs = [ImageRef(f"c{i % 2}/img{i}.jpg", 1000, f"c{i % 2}") for i in range(40)]
    refs.append(ImageRef("zzz/other.jpg", 10, "zzz"))

    def expected(fraction):
        groups = collections.defaultdict(list)
        items = []
        for ref in refs[:-1]:
            u, order = key_hash("salt", ref.key)
            split = "validation" if u < fraction else "train"
            items.append((split, ShardItem(order, ref.key, ref.size, int(ref.label[1]), ref.label)))
        counts = collections.Counter(split for split, _ in items)
        for split, item in items:
            groups[(split, item.order % min(3, counts[split]))].append(item)
        return [(k, sorted(v)) for k, v in groups.items()]

    with test_pipeline.TestPipeline() as p:
        labels = p | "Labels" >> beam.Create([["c0", "c1"]])
        batches = p | beam.Create([refs[:15], refs[15:]])
        out = batches | AssignShards(
            labels, ShardConfig(0.3, "salt", shard_bytes=1, fixed_shards=3), lambda size: size
        )
        assert_that(
            out["groups"] | beam.MapTuple(lambda k, v: (k, sorted(i for b in v for i in b))),
            equal_to(expected(0.3)),
            label="Groups",
        )
        assert_that(
            out["rejected"] | beam.Map(lambda r: (r.key, r.code)),
            equal_to([("zzz/other.jpg", "unknown_class")]),
            label="Rejected",
        )


def _shard_groups(root, shards: int) -> list:
    keys = sorted(rel for rel, _ in storage.walk(root))
    groups = collections.defaultdict(list)
    for i, key in enumerate(keys):
        size = os.path.getsize(os.path.join(root, key))
        groups[("train", i % shards)].append(ShardItem(i, key, size, 0, key.split("/")[0]))
    # As AssignShards groups them: lists of references, here two per shard.
    return [(k, [items[::2], items[1::2]]) for k, items in groups.items()]


def test_write_shards_emits_every_shard_once_as_its_move_ends(tmp_path):
    # More shards than moves run in the background: infos come from process() and,
    # for the last ones, from finish_bundle.
    src, out = str(tmp_path / "src"), str(tmp_path / "out")
    write_sample_tree(src, per_class=4, corrupt=False)
    groups = _shard_groups(src, 5)
    with test_pipeline.TestPipeline() as p:
        written = p | beam.Create(groups) | WriteShards(src, out, ConvertSettings())
        expected = [
            (f"train-{i:05d}-of-00005.tfrecord", sum(map(len, batches)))
            for i, (_, batches) in enumerate(groups)
        ]
        infos = written["shards"] | beam.Map(lambda info: (info["file"], info["examples"]))
        assert_that(infos, equal_to(expected))
    shards = [f"train-{i:05d}-of-00005.tfrecord" for i in range(5)]
    assert sorted(os.listdir(out)) == [INDEX_DIR, *shards]
    assert sorted(os.listdir(os.path.join(out, INDEX_DIR))) == [
        index_name(shard).split("/")[1] for shard in shards
    ]


def test_write_shards_fails_when_a_shard_cannot_be_moved(tmp_path):
    src, blocker = str(tmp_path / "src"), tmp_path / "a_file"
    write_sample_tree(src, per_class=2, corrupt=False)
    blocker.write_text("the output's parent is a file")
    with (
        pytest.raises(Exception, match="Not a directory|File exists"),
        test_pipeline.TestPipeline() as p,
    ):
        _ = (
            p
            | beam.Create(_shard_groups(src, 3))
            | WriteShards(src, str(blocker / "out"), ConvertSettings())
        )


def test_split_of_an_image_never_changes_when_others_are_added():
    before = {f"a/{i}.jpg": key_hash("s", f"a/{i}.jpg") for i in range(100)}
    after = {f"a/{i}.jpg": key_hash("s", f"a/{i}.jpg") for i in range(1000)}
    assert all(after[k] == v for k, v in before.items())
    share = sum(u < 0.1 for u, _ in after.values()) / len(after)
    assert 0.07 < share < 0.13


def test_num_shards():
    assert num_shards(10, 300 * 2**20, 128 * 2**20) == 3
    assert num_shards(2, 300 * 2**20, 128 * 2**20) == 2  # never more shards than examples
    assert num_shards(1000, 1, 128 * 2**20) == 1
    assert num_shards(1000, 1, 128 * 2**20, fixed=7) == 7
    assert num_shards(1000, 1, 128 * 2**20, min_shards=8) == 8
    assert num_shards(350, 1, 128 * 2**20, min_shards=8) == 3  # >= 100 images each
    assert num_shards(99, 1, 128 * 2**20, min_shards=8) == 1


def _shard(split, file, examples, label="a"):
    stats = {"class_counts": {label: examples}, "source_formats": {"jpeg": examples},
             "source_bytes": 10, "height": [5, 5, 5 * examples], "width": [4, 4, 4 * examples]}  # fmt: skip
    info = {"split": split, "file": file, "examples": examples, "stats": stats}
    if examples:
        info.update(bytes=3, sha256="0" * 64)
    return info


def test_commit_renumbers_around_an_empty_shard_and_removes_only_owned(tmp_path):
    # The committed dataset owned train-00000-of-00009; the user's own shard-named file
    # and notes are not the dataset's and stay.
    (tmp_path / MANIFEST).write_text(json.dumps(
        {"splits": {"train": {"shards": [{"file": "train-00000-of-00009.tfrecord"}]}}}
    ))  # fmt: skip
    for name in ("train-00000-of-00009.tfrecord", "test-00000-of-00001.tfrecord"):
        (tmp_path / name).write_bytes(b"abc")
    (tmp_path / "notes.txt").write_bytes(b"mine")
    shards = [
        _shard("train", "train-00000-of-00003.tfrecord", 2),
        _shard("train", "train-00001-of-00003.tfrecord", 0),  # all rejected: never written
        _shard("train", "train-00002-of-00003.tfrecord", 1),
    ]
    rejected = [Rejection("a/x.jpg", "decode", "truncated", "cut")]
    with Lease(str(tmp_path)) as run:
        for shard in shards:
            if shard["examples"]:  # as the shard writer moves them in, after its index
                mark_written(run, shard["file"])
                (tmp_path / INDEX_DIR).mkdir(exist_ok=True)
                (tmp_path / index_name(shard["file"])).write_bytes(shard["file"].encode())
                (tmp_path / shard["file"]).write_bytes(b"abc")
        info = commit_dataset(run, shards, rejected, ["a"], 4, {})
    assert sorted(os.listdir(tmp_path)) == [
        "dataset_info.json", "features.json", "image-class-label.labels.txt",
        "labels.txt", "notes.txt", "rejected.jsonl", INDEX_DIR, MANIFEST,
        "test-00000-of-00001.tfrecord",
        "train-00000-of-00002.tfrecord", "train-00001-of-00002.tfrecord",
    ]  # fmt: skip
    # Each key index was renamed with its shard.
    assert (tmp_path / index_name("train-00001-of-00002.tfrecord")).read_bytes() == (
        b"train-00002-of-00003.tfrecord"
    )
    assert [s["file"] for s in info["splits"]["train"]["shards"]] == [
        "train-00000-of-00002.tfrecord", "train-00001-of-00002.tfrecord"]  # fmt: skip
    assert info["counts"] == {"listed": 4, "converted": 3, "rejected": 1,
                              "rejected_by_code": {"truncated": 1}}  # fmt: skip


def test_commit_refuses_when_an_input_is_unaccounted(tmp_path):
    with Lease(str(tmp_path)) as run, pytest.raises(AccountingError, match="listed 5"):
        commit_dataset(run, [_shard("train", "t.tfrecord", 3)], [], ["a"], 5, {})
    assert not (tmp_path / MANIFEST).exists()


# ---------------------------------------------------------------- whole job


def test_convert_on_local_s3_end_to_end(s3_bucket, tmp_path):
    src = tmp_path / "src"
    good = _odd_tree(src)
    put_tree(str(src), s3_bucket, "images/")
    out = f"s3://{s3_bucket}/out/"
    args = ["--input", f"s3://{s3_bucket}/images/", "--output", out, "--num_shards", "2",
            "--validation_fraction", "0.25"]  # fmt: skip
    result = convert.run(args)
    info = _read_json(out + MANIFEST)
    labels = storage.read_bytes(out + "labels.txt").decode().splitlines()
    assert labels == ["bird", "cat", "dog"] == info["labels"]

    seen = {}
    for split, s in info["splits"].items():
        assert s["num_shards"] == len(s["shards"]) <= 2
        for entry in s["shards"]:
            data = storage.read_bytes(out + entry["file"])
            assert (len(data), hashlib.sha256(data).hexdigest()) == (entry["bytes"], entry["sha256"])
            records = _parse_shard(data, tmp_path)
            assert len(records) == entry["examples"] > 0
            for r in records:
                key = r["image/filename"].decode()
                assert key not in seen
                seen[key] = split
                assert r["image/class/label"] == labels.index(key.split("/")[0])
                assert r["image/class/text"].decode() == key.split("/")[0]
                source = (src / key).read_bytes()
                assert r["image/source_sha256"].decode() == hashlib.sha256(source).hexdigest()
                want = np.asarray(Image.open(io.BytesIO(source)).convert("RGB"), np.float32)
                got = np.asarray(Image.open(io.BytesIO(r["image/encoded"])), np.float32)
                assert got.shape == want.shape
                assert (r["image/height"], r["image/width"]) == want.shape[:2]
                assert np.abs(got - want).mean() < 6.0, key  # JPEG q90 re-encode of noisy PNGs
    assert sorted(seen) == good
    assert set(seen.values()) == {"train", "validation"}

    rejected = storage.read_bytes(out + "rejected.jsonl").decode().splitlines()
    assert {json.loads(x)["key"]: json.loads(x)["code"] for x in rejected} == BAD_FILES
    assert info["counts"]["listed"] == len(good) + len(BAD_FILES)
    assert info["counts"]["converted"] == len(good)
    assert info["source"] == {"uri": f"s3://{s3_bucket}/images/",
                              "objects_listed": len(good) + len(BAD_FILES)}  # fmt: skip

    counts = counters(result, "convert")
    assert counts["listed"] == len(good) + len(BAD_FILES)
    assert counts["converted"] == len(good)
    assert counts["rejected"] == len(BAD_FILES)
    assert counts["rejected_truncated"] == counts["rejected_not_an_image"] == 1

    # Beam's own S3 filesystem and TFRecord reader read what was written.
    with test_pipeline.TestPipeline() as p:
        count = (
            p
            | beam.io.ReadFromTFRecord(out + "train-*.tfrecord")
            | beam.combiners.Count.Globally()
        )
        assert_that(count, equal_to([info["splits"]["train"]["examples"]]))


def test_class_indices_match_keras_image_dataset_from_directory(tmp_path):
    write_sample_tree(str(tmp_path / "src"), classes=("zebra", "Apple", "mango", "b_2"),
                      per_class=3, corrupt=False)  # fmt: skip
    keras_ds = tf.keras.utils.image_dataset_from_directory(
        str(tmp_path / "src"), shuffle=False, batch_size=None, image_size=(8, 8)
    )
    keras_labels = {
        os.path.relpath(path, tmp_path / "src").replace(os.sep, "/"): int(label)
        for path, (_, label) in zip(keras_ds.file_paths, keras_ds.as_numpy_iterator())
    }
    out = tmp_path / "out"
    convert.run(["--input", str(tmp_path / "src"), "--output", str(out)])
    info = _read_json(str(out / MANIFEST))
    assert info["labels"] == keras_ds.class_names
    ours = {}
    for split in info["splits"].values():
        for entry in split["shards"]:
            for r in _parse_shard((out / entry["file"]).read_bytes(), tmp_path):
                ours[r["image/filename"].decode()] = r["image/class/label"]
    assert ours == keras_labels


def test_golden_determinism_in_memory_vs_multi_processing(tmp_path):
    write_sample_tree(str(tmp_path / "src"), per_class=8)
    args = ["--input", str(tmp_path / "src"), "--num_shards", "3", "--resize", "crop:48x48"]
    convert.run(args + ["--output", str(tmp_path / "a")])
    two_processes = ["--output", str(tmp_path / "b"), "--direct_running_mode",
                     "multi_processing", "--direct_num_workers", "2"]  # fmt: skip
    convert.run(args + two_processes)
    files = sorted(rel for rel, _size in storage.walk(str(tmp_path / "a")))
    assert files == sorted(rel for rel, _size in storage.walk(str(tmp_path / "b")))
    assert "train-00002-of-00003.tfrecord" in files
    assert index_name("train-00002-of-00003.tfrecord") in files
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_rerun_with_another_shard_count_removes_old_shards(tmp_path):
    write_sample_tree(str(tmp_path / "src"), per_class=5, corrupt=False)
    base = ["--input", str(tmp_path / "src"), "--output", str(tmp_path / "out")]
    convert.run(base + ["--num_shards", "4"])
    convert.run(base + ["--num_shards", "2"])
    shards = sorted(n for n in os.listdir(tmp_path / "out") if n.endswith(".tfrecord"))
    assert shards == ["train-00000-of-00002.tfrecord", "train-00001-of-00002.tfrecord",
                      "validation-00000-of-00001.tfrecord"]  # fmt: skip


def test_split_from_dirs_labels_file_and_gzip(tmp_path):
    for split, n in (("train", 4), ("test", 2)):
        write_sample_tree(str(tmp_path / "src" / split), classes=("a", "b"), per_class=n,
                          corrupt=False)  # fmt: skip
    labels_file = tmp_path / "labels.txt"
    labels_file.write_text("b\n")  # fixes the class list: "a" is rejected
    out = tmp_path / "out"
    convert.run(["--input", str(tmp_path / "src"), "--output", str(out), "--split_from_dirs",
                 "--labels_file", str(labels_file), "--compression", "gzip"])  # fmt: skip
    info = _read_json(str(out / MANIFEST))
    assert info["labels"] == ["b"] and info["compression"] == "GZIP"
    # TensorFlow Datasets cannot read gzip shards: no TFDS metadata claims it can.
    assert not any((out / name).exists() for name in TFDS_FILES)
    assert {k: v["examples"] for k, v in info["splits"].items()} == {"train": 4, "test": 2}
    assert info["counts"]["rejected_by_code"] == {"unknown_class": 6}
    shard = out / info["splits"]["test"]["shards"][0]["file"]
    assert len(list(tf.data.TFRecordDataset(str(shard), compression_type="GZIP"))) == 2


@pytest.mark.parametrize(
    "make_args, message",
    [
        (lambda b, t: [f"s3://no-such-bucket-{b}/x/", f"s3://{b}/out/"], "does not exist"),
        (lambda b, t: [f"s3://{b}/empty/", f"s3://{b}/out/"], "holds nothing"),
        (lambda b, t: [f"s3://{b}/flat/", f"s3://{b}/out/"], "no class folders"),
        (lambda b, t: [f"s3://{b}/images/", f"s3://{b}/images/out/"], "inside input"),
        (lambda b, t: [f"s3://{b}/images/", f"s3://no-such-bucket-{b}/o/"], "cannot write"),
        (lambda b, t: [str(t / "missing"), str(t / "out")], "not a directory"),
    ],
    ids=[
        "no-bucket",
        "empty-prefix",
        "no-class-folders",
        "output-in-input",
        "unwritable-output",
        "missing-dir",
    ],
)
def test_user_errors_are_one_clear_line(s3_bucket, tmp_path, capsys, make_args, message):
    from s3tfr import s3

    s3.put_bytes(s3_bucket, "flat/a.jpg", b"x")
    s3.put_bytes(s3_bucket, "images/cat/a.jpg", b"x")
    src, out = make_args(s3_bucket, tmp_path)
    with pytest.raises(UserError, match=message):
        convert.run(["--input", src, "--output", out])
    with pytest.raises(SystemExit) as exit_info:
        convert.main(["--input", src, "--output", out])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("convert: error:") and message in err[-1]
    assert "Traceback" not in "\n".join(err)


# The bytes a fixed input converts to, with the pinned Pillow, simplejpeg (libjpeg-turbo),
# OpenCV and zlib: a change to the code that alters any output byte fails here, as does a
# dependency upgrade that does (then check the outputs, and record the new hashes in the
# same change).
GOLDEN = {
    "train-00000-of-00002.tfrecord": "d92b77e13b3627fd1b99d512638116a1967b7a419b0081fdd6c148ffcb68ec9e",
    "train-00001-of-00002.tfrecord": "a6ec306ed00d765c6ff8e48ea20758b4280099ca1171e3f8095fcfa9146625ef",
    "validation-00000-of-00002.tfrecord": "3a9213d1a8b485b6c63ac8a3e75de1badeaa3830ab0b3e556970cafc72b062b0",
    "validation-00001-of-00002.tfrecord": "7a0423cc1fb23e4a8080149d75703663556cc2eb730e0c8e72350ebe3f47a163",
    "labels.txt": "0e400cbf0a12179f11f768ecdbfc0f9d7120fd15c830b72556de502b3f427206",
    "rejected.jsonl": "bdf3ff5ec71ce0f00d081843c2b97bd071abb5aeeedf478b64a6ea584ce82dd4",
}


def test_golden_bytes(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    write_sample_tree(str(src), per_class=12)
    convert.run(["--input", str(src), "--output", str(out), "--resize", "crop:64x64",
                 "--num_shards", "2"])  # fmt: skip
    got = {name: hashlib.sha256((out / name).read_bytes()).hexdigest() for name in GOLDEN}
    assert got == GOLDEN
