"""``convert --append``: only new and changed sources are converted, committed shards are
never rewritten, and the result holds exactly what a full conversion of the same input
holds, in the same splits.

Every check compares the appended dataset with a full conversion of the same tree into
another prefix, record by record (key, split, source SHA-256, label), and reads it back
through the reader, ``inspect --verify`` and TensorFlow Datasets.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import time

import numpy as np
import pytest
from PIL import Image

from beam_jobs import convert, inspect
from beam_jobs.common import UserError
from devtools.local_s3 import put_tree
from devtools.sample_data import write_sample_tree
from s3tfr import storage
from s3tfr.contract import INDEX_DIR, index_name
from tests.test_commit import _spawn, race
from tfdata_reader import load_info, make_dataset
from transforms.verify import iter_records, parse_example

CLASSES = ("ant", "bee", "wasp")
# Small shards, so that a few images spread over many of them and a change touches few.
SHARDING = ["--validation_fraction", "0.3", "--shard_size_mb", "0.004", "--min_shards", "6"]


def _convert(src: str, out: str, *extra: str) -> dict:
    convert.run(["--input", src, "--output", out, *SHARDING, *extra])
    return load_info(out)


def _records(out: str) -> dict[str, tuple[str, str, str]]:
    """key -> (split, source SHA-256, class) of every record the manifest lists."""
    info = load_info(out)
    records = {}
    for split, entry in info["splits"].items():
        for shard in entry["shards"]:
            for raw in iter_records(storage.join(out, shard["file"]), info["compression"]):
                example = parse_example(raw)
                key = example["image/filename"].decode()
                assert key not in records, f"{key} held twice"
                records[key] = (split, example["image/source_sha256"],
                                example["image/class/text"].decode())  # fmt: skip
    return records


def _shard_files(out: str) -> dict[str, tuple[str, int]]:
    """Shard file -> (SHA-256 of its bytes, modification time in ns), local output."""
    found = {}
    for name in os.listdir(out):
        if name.endswith(".tfrecord"):
            path = os.path.join(out, name)
            with open(path, "rb") as f:
                found[name] = (hashlib.sha256(f.read()).hexdigest(), os.stat(path).st_mtime_ns)
    return found


def _verified(out: str) -> None:
    result = inspect.run([out, "--verify"])
    assert not inspect.verify_failed(result)


def _read_count(out: str, split: str) -> int:
    ds = make_dataset(out, split=split, batch_size=7, image_size=(16, 16), training=False)
    return sum(int(images.shape[0]) for images, _labels in ds)


def _photo(path: str, seed: int, size=(48, 40)) -> None:
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=90)


def _same_size_other_photo(path: str) -> None:
    """Rewrites the JPEG at ``path`` as another photo of exactly the same byte size
    (zeros after the end-of-image marker make up the difference)."""
    size = os.path.getsize(path)
    for quality in range(90, 5, -5):
        buffer = io.BytesIO()
        pixels = np.random.default_rng(quality).integers(0, 255, (40, 48, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(buffer, "JPEG", quality=quality)
        if buffer.tell() <= size:
            with open(path, "wb") as f:
                f.write(buffer.getvalue() + b"\0" * (size - buffer.tell()))
            return
    raise AssertionError("no JPEG small enough")


@pytest.fixture
def tree(tmp_path) -> str:
    src = str(tmp_path / "src")
    write_sample_tree(src, classes=CLASSES, per_class=14, corrupt=True)
    return src


def _full_conversion(src: str, tmp_path, *extra: str) -> str:
    """A full conversion of ``src`` into a fresh prefix; returns the prefix."""
    out = str(tmp_path / f"full{len(os.listdir(tmp_path))}")
    _convert(src, out, *extra)
    return out


def _full(src: str, tmp_path, *extra: str) -> dict[str, tuple[str, str, str]]:
    """The records of a full conversion of ``src`` (into a fresh prefix)."""
    return _records(_full_conversion(src, tmp_path, *extra))


def test_append_converts_only_new_images_and_leaves_shards_untouched(tree, tmp_path):
    out = str(tmp_path / "out")
    before = _convert(tree, out)
    shards = _shard_files(out)
    for i in range(6):
        _photo(os.path.join(tree, CLASSES[i % 3], f"new-{i}.jpg"), seed=100 + i)

    info = _convert(tree, out, "--append")

    after = _shard_files(out)
    assert {name: after[name] for name in shards} == shards  # same bytes, same mtimes
    added = set(after) - set(shards)
    assert added and all(name in {s["file"] for e in info["splits"].values()
                                  for s in e["shards"]} for name in added)  # fmt: skip
    assert info["counts"]["converted"] == before["counts"]["converted"] + 6
    assert info["counts"]["listed"] == info["counts"]["converted"] + info["counts"]["rejected"]
    assert info["appends"][-1]["added"] == 6 and info["appends"][-1]["dropped"] == 0
    # Exactly what a full conversion holds, each image in the same split.
    assert _records(out) == _full(tree, tmp_path)
    for split, entry in info["splits"].items():
        assert _read_count(out, split) == entry["examples"]
    _verified(out)


def test_append_after_changed_and_deleted_sources(tree, tmp_path):
    out = str(tmp_path / "out")
    _convert(tree, out)
    old = _records(out)
    shards = _shard_files(out)
    holder = {}  # key -> its shard, from the key index
    for name in shards:
        data = gzip.decompress(storage.read_bytes(os.path.join(out, index_name(name))))
        for line in data.decode().splitlines():
            holder[json.loads(line)["key"]] = name
    keys = sorted(old)
    deleted, resized, rewritten, touched = keys[0], keys[5], keys[9], keys[12]
    os.remove(os.path.join(tree, deleted))
    _photo(os.path.join(tree, resized), seed=7, size=(60, 30))  # another size
    _same_size_other_photo(os.path.join(tree, rewritten))
    with open(os.path.join(tree, touched), "rb") as f:
        same = f.read()
    with open(os.path.join(tree, touched), "wb") as f:  # the same bytes written again:
        f.write(same)  # held, not reconverted

    info = _convert(tree, out, "--append")

    after = _shard_files(out)
    replaced = set(info["appends"][-1]["replaced_shards"])
    assert replaced == {holder[deleted], holder[resized], holder[rewritten]}
    assert {n: after[n] for n in set(shards) - replaced} == {
        n: shards[n] for n in set(shards) - replaced
    }
    for name in replaced:
        assert name not in after and not os.path.exists(os.path.join(out, index_name(name)))
    records = _records(out)
    assert deleted not in records
    assert records == _full(tree, tmp_path)
    assert records[touched] == old[touched]
    assert info["counts"]["listed"] == info["counts"]["converted"] + info["counts"]["rejected"]
    for split, entry in info["splits"].items():
        assert _read_count(out, split) == entry["examples"]
        assert sum(entry["class_counts"].values()) == entry["examples"]
    _verified(out)


def test_append_twice_in_a_row_and_with_nothing_new(tree, tmp_path):
    out = str(tmp_path / "out")
    _convert(tree, out)
    _photo(os.path.join(tree, "ant", "first.jpg"), seed=1)
    _convert(tree, out, "--append")
    _photo(os.path.join(tree, "bee", "second.jpg"), seed=2)
    os.remove(os.path.join(tree, "ant", "first.jpg"))
    info = _convert(tree, out, "--append")
    assert len(info["appends"]) == 2
    assert _records(out) == _full(tree, tmp_path)
    assert "appended 2 times since its full conversion: 2 records added, 1 dropped" in (
        inspect.summary(out, info, [])
    )
    shards = _shard_files(out)

    again = _convert(tree, out, "--append")  # nothing changed: no shard written

    assert _shard_files(out) == shards
    assert again["splits"] == load_info(out)["splits"] == info["splits"]
    assert len(again["appends"]) == 3
    last = again["appends"][-1]
    assert (last["added"], last["dropped"], last["replaced_shards"]) == (0, 0, [])
    _verified(out)


def test_a_plain_rerun_after_appends_is_a_full_conversion(tree, tmp_path):
    out = str(tmp_path / "out")
    _convert(tree, out)
    _photo(os.path.join(tree, "wasp", "late.jpg"), seed=3)
    _convert(tree, out, "--append")
    info = _convert(tree, out)
    reference = str(tmp_path / "reference")
    _convert(tree, reference)
    assert _shard_files(out).keys() == _shard_files(reference).keys()
    assert {n: v[0] for n, v in _shard_files(out).items()} == {
        n: v[0] for n, v in _shard_files(reference).items()
    }
    assert "appends" not in info
    assert sorted(os.listdir(os.path.join(out, INDEX_DIR))) == sorted(
        os.listdir(os.path.join(reference, INDEX_DIR))
    )


def test_append_to_nothing_converts_everything(tree, tmp_path):
    out = str(tmp_path / "out")
    info = _convert(tree, out, "--append")
    assert "appends" not in info
    assert _records(out) == _full(tree, tmp_path)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--resize", "crop:32x32"], "--resize"),
        (["--dedupe", "near"], "--dedupe near"),
        (["--num_shards", "3"], "--num_shards"),
    ],
)
def test_append_refuses_what_it_cannot_keep_consistent(tree, tmp_path, extra, message):
    out = str(tmp_path / "out")
    _convert(tree, out)
    with pytest.raises(UserError, match=message):
        _convert(tree, out, "--append", *extra)


def test_append_refuses_a_new_class(tree, tmp_path):
    out = str(tmp_path / "out")
    _convert(tree, out)
    os.makedirs(os.path.join(tree, "aphid"))
    _photo(os.path.join(tree, "aphid", "a.jpg"), seed=4)
    with pytest.raises(UserError, match=r"new: \['aphid'\]"):
        _convert(tree, out, "--append")
    # With the dataset's labels fixed, the new class's images are rejected instead.
    info = _convert(tree, out, "--append", "--labels_file", os.path.join(out, "labels.txt"))
    assert info["counts"]["rejected_by_code"].get("unknown_class") == 1


@pytest.mark.parametrize("split_by", ["key", "content"])
def test_append_with_dedupe_exact_keeps_what_a_full_conversion_keeps(tree, tmp_path, split_by):
    extra = ("--dedupe", "exact", "--split_by", split_by)
    out = str(tmp_path / "out")
    _convert(tree, out, *extra)
    held = sorted(_records(out))
    # A twin whose key sorts before its held original (a full conversion keeps the
    # twin: the held record must go), one in another class sorting after its original
    # (rejected as a label conflict), and an image with no twin.
    shutil.copy(os.path.join(tree, held[3]), os.path.join(tree, "ant", "0-copy.jpg"))
    shutil.copy(os.path.join(tree, held[-2]), os.path.join(tree, "wasp", "zz-copy.jpg"))
    _photo(os.path.join(tree, "bee", "fresh.jpg"), seed=5)

    info = _convert(tree, out, "--append", *extra)

    records = _records(out)
    full = _full_conversion(tree, tmp_path, *extra)
    assert records == _records(full)
    assert "ant/0-copy.jpg" in records and held[3] not in records
    assert "wasp/zz-copy.jpg" not in records and "bee/fresh.jpg" in records
    assert storage.read_bytes(os.path.join(out, "rejected.jsonl")) == storage.read_bytes(
        os.path.join(full, "rejected.jsonl")
    )
    assert info["counts"]["listed"] == info["counts"]["converted"] + info["counts"]["rejected"]
    _verified(out)


def test_append_keeps_content_splits(tree, tmp_path):
    out = str(tmp_path / "out")
    _convert(tree, out, "--split_by", "content")
    first = sorted(_records(out))[2]
    shutil.copy(os.path.join(tree, first), os.path.join(tree, "ant", "zz-twin.jpg"))
    _convert(tree, out, "--append", "--split_by", "content")
    records = _records(out)
    assert records["ant/zz-twin.jpg"][0] == records[first][0]
    assert records == _full(tree, tmp_path, "--split_by", "content")


def test_two_concurrent_appends_one_commits_the_other_stops(tree, tmp_path):
    out = str(tmp_path / "out")
    _convert(tree, out)
    for i in range(4):
        _photo(os.path.join(tree, "bee", f"late-{i}.jpg"), seed=200 + i)
    race([["--input", tree, "--output", out, *SHARDING, "--append"]] * 2, tmp_path / "append")
    # Whichever order they ran in, the dataset holds every image once.
    assert _records(out) == _full(tree, tmp_path)
    _verified(out)


def test_append_on_s3(tree, s3_bucket, tmp_path):
    put_tree(tree, s3_bucket, "images/")
    src, out = f"s3://{s3_bucket}/images/", f"s3://{s3_bucket}/out/"
    before = _convert(src, out)
    etags = {
        s["file"]: storage.read_bytes(storage.join(out, s["file"]))
        for e in before["splits"].values() for s in e["shards"]
    }  # fmt: skip
    local = str(tmp_path / "new")
    os.makedirs(os.path.join(local, "wasp"))
    _photo(os.path.join(local, "wasp", "s3-new.jpg"), seed=9)
    put_tree(local, s3_bucket, "images/")
    gone = min(_records(out))
    storage.delete(storage.join(src, gone))

    info = _convert(src, out, "--append")

    records = _records(out)
    assert "wasp/s3-new.jpg" in records and gone not in records
    replaced = set(info["appends"][-1]["replaced_shards"])
    assert len(replaced) == 1
    for name, data in etags.items():
        if name not in replaced:
            assert storage.read_bytes(storage.join(out, name)) == data
    assert info["counts"]["converted"] == before["counts"]["converted"]
    mirror = str(tmp_path / "mirror")
    os.makedirs(mirror)
    for rel, _size in storage.walk(src):
        path = os.path.join(mirror, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(storage.read_bytes(storage.join(src, rel)))
    assert records == _full(mirror, tmp_path)
    _verified(out)


def test_tfds_reads_old_and_new_shards_after_an_append(tree, tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    out = str(tmp_path / "out")
    _convert(tree, out)
    for i in range(3):
        _photo(os.path.join(tree, "ant", f"tfds-{i}.jpg"), seed=300 + i)
    os.remove(os.path.join(tree, sorted(_records(out))[1]))
    info = _convert(tree, out, "--append")
    builder = tfds.builder_from_directory(out)
    for split, entry in info["splits"].items():
        names = {
            example["image"]["filename"].decode()
            for example in tfds.as_numpy(builder.as_dataset(split=split))
        }
        expected = {k for k, v in _records(out).items() if v[0] == split}
        assert names == expected and len(expected) == entry["examples"]
        assert builder.info.splits[split].num_examples == entry["examples"]


def test_a_damaged_key_index_fails_verify_and_stops_an_append(tree, tmp_path):
    from beam_jobs.common import JobFailed

    out = str(tmp_path / "out")
    info = _convert(tree, out)
    shard = info["splits"]["train"]["shards"][0]["file"]
    with open(os.path.join(out, index_name(shard)), "wb") as f:
        f.write(gzip.compress(b'{"key": "ant/not-in-the-shard.jpg", "size": 1, "stamp": "",'
                              b' "sha256": ""}\n', mtime=0))  # fmt: skip
    result = inspect.run([out, "--verify"])
    assert inspect.verify_failed(result)
    os.remove(os.path.join(tree, min(_records(out))))
    with pytest.raises(JobFailed, match="key index"):
        _convert(tree, out, "--append")
    assert load_info(out)["splits"] == info["splits"]  # the dataset as it was


def test_an_append_killed_midway_leaves_the_dataset_as_it_was(tree, tmp_path):
    out = str(tmp_path / "out")
    _convert(tree, out)
    before = _records(out)
    manifest = storage.read_bytes(os.path.join(out, "s3tfr_manifest.json"))
    for i in range(60):
        _photo(os.path.join(tree, CLASSES[i % 3], f"burst-{i:03d}.jpg"), seed=400 + i,
               size=(400, 300))  # fmt: skip
    runs = os.path.join(out, ".s3tfr", "runs")
    proc = _spawn(["--input", tree, "--output", out, *SHARDING, "--append"],
                  tmp_path / "killed.log")  # fmt: skip
    # Killed once its first new shard is in place (marked), before it commits.
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if os.path.isdir(runs) and any(
            files for path, _dirs, files in os.walk(runs) if path.endswith("written")
        ):
            break
        time.sleep(0.01)
    assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
    proc.kill()
    proc.wait()
    # The committed dataset is untouched and still reads as it was.
    assert storage.read_bytes(os.path.join(out, "s3tfr_manifest.json")) == manifest
    assert _records(out) == before
    _verified(out)
    # The next append takes over the dead run's lease and finishes the work.
    _convert(tree, out, "--append")
    assert _records(out) == _full(tree, tmp_path)
    assert not os.path.exists(os.path.join(out, ".s3tfr"))
    _verified(out)


def test_analysis_is_stale_after_an_append_until_analyze_runs_on_old_and_new(tree, tmp_path):
    from tfdata_reader import DatasetError
    from tfdata_reader import transform as reader_transform

    out = str(tmp_path / "out")
    _convert(tree, out, "--resize", "crop:32x32", "--analyze")
    first = reader_transform.load_analysis(out)
    for i in range(5):
        _photo(os.path.join(tree, "wasp", f"stats-{i}.jpg"), seed=500 + i)
    _convert(tree, out, "--resize", "crop:32x32", "--append")
    with pytest.raises(DatasetError, match="appended to"):
        make_dataset(out, "train", batch_size=4, image_size=(32, 32), normalize="transform_fn")
    info = _convert(tree, out, "--resize", "crop:32x32", "--append", "--analyze")
    analysis = reader_transform.load_analysis(out)
    # Computed over old and new records alike.
    assert analysis["examples"] == info["splits"]["train"]["examples"] == first["examples"] + (
        sum(v[0] == "train" for k, v in _records(out).items() if "/stats-" in k)
    )
    make_dataset(out, "train", batch_size=4, image_size=(32, 32), normalize="transform_fn")


def test_local_sources_swapped_with_their_times_kept_are_noticed(tmp_path):
    # Two files of one size and one modification time (as after `tar x`, `cp -p`,
    # `rsync -t`), then swapped by renames: size and mtime alike, bytes not.
    src, out = tmp_path / "src", str(tmp_path / "out")
    for folder in ("a", "b"):
        (src / folder).mkdir(parents=True)
    x, y = (tmp_path / "x.jpg", tmp_path / "y.jpg")
    _photo(str(x), seed=1)
    _photo(str(y), seed=2)
    size = max(x.stat().st_size, y.stat().st_size)
    when = 1_700_000_000_000_000_000
    for name, path in (("a/x.jpg", x), ("a/y.jpg", y), ("b/z.jpg", None)):
        if path is None:
            _photo(str(src / name), seed=3)
        else:
            data = path.read_bytes()
            (src / name).write_bytes(data + b"\0" * (size - len(data)))
        os.utime(src / name, ns=(when, when))
    _convert(str(src), out)
    os.rename(src / "a/x.jpg", src / "swap")
    os.rename(src / "a/y.jpg", src / "a/x.jpg")
    os.rename(src / "swap", src / "a/y.jpg")
    _convert(str(src), out, "--append")
    assert _records(out) == _full(str(src), tmp_path)


def test_append_refuses_another_input_and_names_a_class_order(tree, tmp_path):
    out = str(tmp_path / "out")
    labels = tmp_path / "labels.txt"
    labels.write_text("wasp\nant\nbee\n")
    _convert(tree, out, "--labels_file", str(labels))
    other = str(tmp_path / "other")
    shutil.copytree(tree, other)
    with pytest.raises(UserError, match="was converted from"):
        _convert(other, out, "--append", "--labels_file", str(labels))
    with pytest.raises(UserError, match="class order differs"):
        _convert(tree, out, "--append")


def test_an_append_stopped_before_its_commit_leaves_tfds_on_the_committed_dataset(
    tree, tmp_path, monkeypatch
):
    tfds = pytest.importorskip("tensorflow_datasets")
    from transforms import commit

    out = str(tmp_path / "out")
    info = _convert(tree, out)
    for i in range(4):
        _photo(os.path.join(tree, "ant", f"late-{i}.jpg"), seed=600 + i)
    os.remove(os.path.join(tree, min(_records(out))))

    def stop(run, manifest):
        raise commit.ManifestConflict("stopped before the commit")

    monkeypatch.setattr(commit, "_replace_base", stop)
    with pytest.raises(Exception, match="stopped before the commit"):
        _convert(tree, out, "--append")
    assert load_info(out)["splits"] == info["splits"]
    builder = tfds.builder_from_directory(out)
    for split, entry in info["splits"].items():
        assert sum(1 for _ in builder.as_dataset(split=split)) == entry["examples"]


def test_append_from_another_working_directory_with_a_relative_input(tree, tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    monkeypatch.chdir(os.path.dirname(tree))
    info = _convert(os.path.basename(tree), out)
    assert info["source"]["uri"] == os.path.realpath(tree)
    _photo(os.path.join(tree, "bee", "moved-in.jpg"), seed=11)
    monkeypatch.chdir(tree)
    appended = _convert(".", out, "--append")
    assert appended["appends"][-1]["added"] == 1
