"""Duplicate-safe splits (--split_by content) and --dedupe exact, end to end on
DirectRunner over generated trees with exact duplicates in one class and across classes."""

from __future__ import annotations

import collections
import json
import os
import re
import shutil

import numpy as np
import pytest

from beam_jobs import convert
from beam_jobs.common import UserError
from devtools.sample_data import encode, photo_like
from s3tfr.manifest import load_info
from tests.test_convert import _parse_shard
from transforms.examples import ConvertSettings, convert_record
from transforms.images import parse_resize
from transforms.references import ShardItem

CLASSES = ("cat", "dog", "fox")


def _tree(root, unique: int = 40, same_class: int = 24, across: int = 8, seed: int = 0):
    """``unique`` distinct images per class, then ``same_class`` copies of some under
    another name in the same class and ``across`` copies into another class.

    Returns:
        {key: content id} for every file written.
    """
    rng = np.random.default_rng(seed)
    contents = {}
    for c in CLASSES:
        os.makedirs(os.path.join(root, c), exist_ok=True)
        for i in range(unique):
            key = f"{c}/img{i:03d}.jpg"
            data = encode(photo_like(48, 40, rng), "JPEG", quality=90)
            contents[key] = data
    originals = sorted(contents)
    for j in range(same_class):
        source = originals[(j * 7) % len(originals)]
        key = f"{source.split('/')[0]}/copy{j:03d}.jpg"
        contents[key] = contents[source]
    for j in range(across):
        source = originals[(j * 11 + 3) % len(originals)]
        other = CLASSES[(CLASSES.index(source.split("/")[0]) + 1) % len(CLASSES)]
        contents[f"{other}/moved{j:03d}.jpg"] = contents[source]
    ids = {}
    for key, data in contents.items():
        with open(os.path.join(root, key), "wb") as f:
            f.write(data)
        ids[key] = ids.get(key) or next(
            (k for k, d in contents.items() if d == data), key
        )  # the first key with these bytes: the content's id
    return ids


def _records(out, tmp_path) -> list[dict]:
    records = []
    for name in sorted(os.listdir(out)):
        if name.endswith(".tfrecord"):
            with open(os.path.join(out, name), "rb") as f:
                for record in _parse_shard(f.read(), tmp_path):
                    record["split"] = name.split("-")[0]
                    records.append(record)
    return records


def _straddling(records) -> int:
    splits = collections.defaultdict(set)
    for r in records:
        splits[r["image/source_sha256"]].add(r["split"])
    return sum(len(s) > 1 for s in splits.values())


def _convert(src, out, *flags):
    convert.run(["--input", str(src), "--output", str(out), "--resize", "crop:32x32",
                 "--validation_fraction", "0.4", "--num_shards", "2", *flags])  # fmt: skip


def test_content_split_keeps_every_duplicate_group_in_one_split(tmp_path):
    src = tmp_path / "src"
    ids = _tree(src)
    _convert(src, tmp_path / "by_key")
    _convert(src, tmp_path / "by_content", "--split_by", "content")
    by_key = _records(tmp_path / "by_key", tmp_path)
    by_content = _records(tmp_path / "by_content", tmp_path)
    # The problem is real with key-hash splits on this tree...
    assert _straddling(by_key) > 0
    # ...and gone by content, with nothing lost.
    assert _straddling(by_content) == 0
    assert len(by_content) == len(by_key) == len(ids)
    assert {r["image/filename"].decode() for r in by_content} == set(ids)
    info = load_info(str(tmp_path / "by_content"))
    assert info["options"]["split_by"] == "content"
    assert info["counts"]["listed"] == info["counts"]["converted"] == len(ids)
    assert set(info["splits"]) == {"train", "validation"}


def test_content_split_is_stable_as_images_are_added_and_renamed(tmp_path):
    src = tmp_path / "src"
    _tree(src)
    _convert(src, tmp_path / "before", "--split_by", "content")
    before = {
        r["image/source_sha256"]: r["split"] for r in _records(tmp_path / "before", tmp_path)
    }
    # New images, and one old image under a new name.
    _tree(src / "more", unique=10, same_class=0, across=0, seed=9)
    for c in CLASSES:
        for name in os.listdir(src / "more" / c):
            shutil.move(src / "more" / c / name, src / c / f"new_{name}")
    shutil.rmtree(src / "more")
    os.rename(src / "cat" / "img000.jpg", src / "cat" / "renamed.jpg")
    _convert(src, tmp_path / "after", "--split_by", "content")
    after = {
        r["image/source_sha256"]: r["split"] for r in _records(tmp_path / "after", tmp_path)
    }
    assert len(after) > len(before)
    assert all(after[digest] == split for digest, split in before.items())


def test_dedupe_exact_keeps_the_first_key_and_names_it_in_each_twins_rejection(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    ids = _tree(src)
    _convert(src, out, "--dedupe", "exact")
    records = _records(out, tmp_path)
    kept = {r["image/filename"].decode() for r in records}
    groups = collections.defaultdict(list)
    for key, content in ids.items():
        groups[content].append(key)
    assert kept == {min(keys) for keys in groups.values()}
    rejected = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    twins = {r["key"]: r for r in rejected if r["stage"] == "dedupe"}
    assert set(twins) == set(ids) - kept
    codes = collections.Counter(r["code"] for r in twins.values())
    expected_conflicts = sum(
        1
        for keys in groups.values()
        for key in sorted(keys)[1:]
        if key.split("/")[0] != min(keys).split("/")[0]
    )
    assert codes["label_conflict"] == expected_conflicts > 0
    assert codes["duplicate"] == len(twins) - expected_conflicts > 0
    for key, r in twins.items():
        first = min(groups[ids[key]])
        assert first in r["reason"] and first in kept
    info = load_info(str(out))
    assert info["counts"]["listed"] == len(ids)
    assert info["counts"]["converted"] == len(groups)
    assert info["counts"]["rejected"] == len(rejected) == len(twins)  # no other rejection


def test_split_by_content_and_split_from_dirs_are_exclusive(tmp_path):
    with pytest.raises(UserError, match="--split_by content"):
        convert.run(["--input", str(tmp_path), "--output", str(tmp_path / "o"),
                     "--split_by", "content", "--split_from_dirs"])  # fmt: skip
    assert not (tmp_path / "o").exists()


def test_a_source_changed_after_hashing_is_rejected_not_written():
    data = encode(photo_like(48, 40, np.random.default_rng(1)), "JPEG")
    item = ShardItem(1, "cat/a.jpg", len(data), 0, "cat", sha256="0" * 64)
    settings = ConvertSettings(parse_resize("crop:32x32"))
    result = convert_record(settings, item, data)
    assert result.code == "changed_while_converting" and result.key == "cat/a.jpg"


def test_inspect_verify_reports_exact_and_near_duplicates_straddling_first(tmp_path, capsys):
    from PIL import Image

    from tests.test_inspect import _inspect

    src, out = tmp_path / "src", tmp_path / "out"
    ids = _tree(src, unique=30, same_class=10, across=4)
    # Near-duplicates: 6 originals again, resized and re-encoded at another quality.
    rng = np.random.default_rng(5)
    near = {}
    for j in range(6):
        original = f"{CLASSES[j % 3]}/orig{j}.jpg"
        image = photo_like(160, 120, rng)
        (src / original).write_bytes(encode(image, "JPEG", quality=92))
        copy = f"{CLASSES[j % 3]}/zcopy{j}.jpg"
        (src / copy).write_bytes(
            encode(image.resize((120, 90), Image.Resampling.BICUBIC), "JPEG", quality=70)
        )
        near[original] = copy
    _convert(src, out)
    records = _records(out, tmp_path)
    split_of = {r["image/filename"].decode(): r["split"] for r in records}
    groups = collections.defaultdict(list)
    for key, content in ids.items():
        groups[content].append(key)
    exact = [keys for keys in groups.values() if len(keys) > 1]
    straddling = sum(len({split_of[k] for k in keys}) > 1 for keys in exact)
    across = sum(len({k.split("/")[0] for k in keys}) > 1 for keys in exact)

    report = tmp_path / "report"
    code, output = _inspect([str(out), "--verify", "--report", str(report)], capsys)
    assert code == 0, output
    lines = output.splitlines()
    summary = next(line for line in lines if line.startswith("exact duplicates"))
    assert summary == (
        f"exact duplicates (same source bytes): {len(exact)} groups, "
        f"{sum(map(len, exact))} records; straddling splits {straddling}, across classes {across}"
    )
    start = lines.index(summary)
    listed = lines[start + 1 : start + 1 + len(exact)]
    # Groups across splits come first.
    assert [line.startswith("  across splits") for line in listed] == [True] * straddling + [
        False
    ] * (len(exact) - straddling)
    near_summary = next(line for line in lines if line.startswith("near-duplicates"))
    near_lines = lines[lines.index(near_summary) + 1 :]
    for original, copy in near.items():
        assert any(original in line and copy in line for line in near_lines), (original, copy)
    # The HTML report has the same groups, those straddling splits first.
    page = (report / "index.html").read_text()
    section = page[page.index("<h2 id=duplicates>") : page.index("<h2 id=sizes>")]
    assert (
        f"<td>exact (same source bytes)</td><td class=n>{len(exact)}</td>"
        f"<td class=n>{sum(map(len, exact))}</td><td class=n>{straddling}</td>"
    ) in section
    rows = re.findall(r"<tr><td>(exact|near)</td><td>([^<]*)</td><td>([^<]*)</td></tr>", section)
    assert sum(kind == "exact" for kind, _, _ in rows) == len(exact)
    assert sum(kind == "near" for kind, _, _ in rows) >= len(near)
    first = ["splits" in across for _kind, across, _members in rows]
    assert first == sorted(first, reverse=True) and sum(first) >= straddling
    for original, copy in near.items():
        assert any(original in m and copy in m for _k, _a, m in rows), (original, copy)


def _near_tree(root, pairs: int = 24) -> dict[str, str]:
    """``pairs`` originals, each with a resized, re-encoded copy in the same class, and
    as many unrelated images. Returns {copy key: original key}."""
    from PIL import Image

    rng = np.random.default_rng(21)
    copies = {}
    for j in range(pairs):
        c = CLASSES[j % len(CLASSES)]
        os.makedirs(os.path.join(root, c), exist_ok=True)
        image = photo_like(160, 120, rng)
        with open(os.path.join(root, c, f"orig{j:02d}.jpg"), "wb") as f:
            f.write(encode(image, "JPEG", quality=92))
        small = image.resize((120, 90), Image.Resampling.BICUBIC)
        with open(os.path.join(root, c, f"small{j:02d}.jpg"), "wb") as f:
            f.write(encode(small, "JPEG", quality=70))
        with open(os.path.join(root, c, f"other{j:02d}.jpg"), "wb") as f:
            f.write(encode(photo_like(160, 120, rng), "JPEG", quality=90))
        copies[f"{c}/small{j:02d}.jpg"] = f"{c}/orig{j:02d}.jpg"
    return copies


def test_dedupe_near_puts_resized_reencoded_copies_in_their_originals_split(tmp_path):
    src = tmp_path / "src"
    copies = _near_tree(src)
    _convert(src, tmp_path / "content", "--split_by", "content")
    _convert(src, tmp_path / "near", "--dedupe", "near")

    def splits(out):
        return {r["image/filename"].decode(): r["split"] for r in _records(out, tmp_path)}

    content, near = splits(tmp_path / "content"), splits(tmp_path / "near")
    # Different bytes: by content alone, copies straddle as often as chance has it...
    assert sum(content[c] != content[o] for c, o in copies.items()) > 0
    # ...grouped by perceptual hash, never; and every image is kept.
    assert all(near[c] == near[o] for c, o in copies.items())
    assert len(near) == len(content) == 3 * len(copies)
    assert load_info(str(tmp_path / "near"))["options"]["split_by"] == "content"
    # Images in no group keep the split their content gives them.
    alone = [k for k in near if k.split("/")[1].startswith("other")]
    assert all(near[k] == content[k] for k in alone)


def test_dedupe_and_content_split_from_s3(s3_bucket, tmp_path):
    from devtools.local_s3 import put_tree

    src = tmp_path / "src"
    ids = _tree(src, unique=20, same_class=8, across=3)
    put_tree(str(src), s3_bucket, "images/")
    out = tmp_path / "out"
    convert.run(["--input", f"s3://{s3_bucket}/images/", "--output", str(out),
                 "--resize", "crop:32x32", "--validation_fraction", "0.4",
                 "--num_shards", "2", "--dedupe", "exact", "--split_by", "content"])  # fmt: skip
    records = _records(out, tmp_path)
    assert len(records) == len(set(ids.values()))
    assert _straddling(records) == 0
    info = load_info(str(out))
    assert info["counts"]["listed"] == len(ids)
    assert info["counts"]["rejected"] == len(ids) - len(records)


def test_dedupe_keeps_the_twin_in_a_listed_class(tmp_path):
    # The first key's class is left out by --labels_file: its twin in a listed class is
    # kept, not rejected as a duplicate of an image the dataset will not hold.
    src, out = tmp_path / "src", tmp_path / "out"
    data = encode(photo_like(48, 40, np.random.default_rng(3)), "JPEG")
    other = encode(photo_like(48, 40, np.random.default_rng(4)), "JPEG")
    for key, content in (("aaa/x.jpg", data), ("zzz/y.jpg", data), ("zzz/z.jpg", other)):
        (src / key).parent.mkdir(parents=True, exist_ok=True)
        (src / key).write_bytes(content)
    labels = tmp_path / "labels.txt"
    labels.write_text("zzz\n")
    _convert(src, out, "--dedupe", "exact", "--labels_file", str(labels))
    kept = {r["image/filename"].decode() for r in _records(out, tmp_path)}
    assert kept == {"zzz/y.jpg", "zzz/z.jpg"}
    rejected = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    assert [(r["key"], r["code"]) for r in rejected] == [("aaa/x.jpg", "label_conflict")]


def test_dedupe_near_does_not_merge_a_family_of_look_alike_images(tmp_path):
    # Flat colours: their perceptual hashes chain into one family. Merged, it would move
    # most of the dataset into one split; left to the content split, the split holds.
    from PIL import Image

    src = tmp_path / "src"
    rng = np.random.default_rng(8)
    for i in range(160):
        folder = src / CLASSES[i % 3]
        folder.mkdir(parents=True, exist_ok=True)
        color = tuple(int(v) for v in rng.integers(0, 256, 3))
        (folder / f"flat{i:03d}.jpg").write_bytes(
            encode(Image.new("RGB", (48, 40), color), "JPEG", quality=90)
        )
    _convert(src, tmp_path / "near", "--dedupe", "near", "--validation_fraction", "0.5")
    _convert(src, tmp_path / "content", "--split_by", "content", "--validation_fraction", "0.5")
    near = collections.Counter(r["split"] for r in _records(tmp_path / "near", tmp_path))
    content = collections.Counter(r["split"] for r in _records(tmp_path / "content", tmp_path))
    assert sum(near.values()) == 160
    assert abs(near["validation"] - content["validation"]) <= 32  # at most one group moved


def test_dedupe_keeps_a_twin_with_a_valid_split_folder_and_does_not_merge_empty_files(
    tmp_path,
):
    src, out = tmp_path / "src", tmp_path / "out"
    data = encode(photo_like(48, 40, np.random.default_rng(6)), "JPEG")
    files = {"bad-split/cat/x.jpg": data, "train/cat/y.jpg": data,
             "train/cat/e1.jpg": b"", "train/cat/e2.jpg": b""}  # fmt: skip
    for key, content in files.items():
        (src / key).parent.mkdir(parents=True, exist_ok=True)
        (src / key).write_bytes(content)
    convert.run(["--input", str(src), "--output", str(out), "--split_from_dirs",
                 "--dedupe", "exact"])  # fmt: skip
    kept = {r["image/filename"].decode() for r in _records(out, tmp_path)}
    assert kept == {"train/cat/y.jpg"}
    codes = {
        r["key"]: r["code"]
        for r in map(json.loads, (out / "rejected.jsonl").read_text().splitlines())
    }
    assert codes == {"bad-split/cat/x.jpg": "duplicate", "train/cat/e1.jpg": "zero_bytes",
                     "train/cat/e2.jpg": "zero_bytes"}  # fmt: skip


def test_inspect_sees_no_near_group_across_splits_in_a_dedupe_near_dataset(tmp_path, capsys):
    from tests.test_inspect import _inspect

    src, out = tmp_path / "src", tmp_path / "out"
    _near_tree(src, pairs=12)
    _convert(src, out, "--dedupe", "near")
    code, output = _inspect([str(out), "--verify"], capsys)
    assert code == 0, output
    near = next(line for line in output.splitlines() if line.startswith("near-duplicates"))
    assert "straddling splits 0," in near and "12 groups" in near, near
