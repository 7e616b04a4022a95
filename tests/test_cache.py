"""The reader's shard cache shared by processes, verified on every use, within its limit;
and the reader's errors at its boundaries (S3 credentials and endpoint, inconsistent
manifests, bad records), all against the local S3 server and real reader processes."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time

import boto3
import moto.settings
import pytest
import tensorflow as tf

from beam_jobs import convert
from beam_jobs import inspect as inspect_job
from devtools import sample_data
from devtools.local_s3 import put_tree
from s3tfr import s3
from s3tfr.contract import MANIFEST
from s3tfr.s3 import S3Config
from tfdata_reader import DatasetError, ReaderStats, ShardCache, load_info, make_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = (8, 8)
SHARDS = 60
# Per reader process: shards fetched ahead, read at once, downloading at once.
PREFETCH, CYCLE, WORKERS = 1, 1, 1
# What one reader may hold (see make_dataset's cache.new_owner), plus its download.
HELD_PER_READER = 2 * (PREFETCH + 2 * CYCLE) + 4 + WORKERS

READER = f"""
import hashlib, json, sys
import tensorflow as tf
from tfdata_reader import ReaderStats, ShardCache, make_dataset

uri, cache_dir, max_bytes, seed, epochs = sys.argv[1:6]
cache = ShardCache(cache_dir, max_bytes=int(max_bytes), workers={WORKERS})
stats = ReaderStats()
ds = make_dataset(
    uri, "train", batch_size=4, image_size={SIZE}, training=False, shuffle=True,
    seed=int(seed), dtype=tf.uint8, augment=False, cache=cache, stats=stats,
    prefetch_shards={PREFETCH}, cycle_length={CYCLE},
)
for epoch in range(int(epochs)):
    seen = sorted(
        hashlib.sha256(image.tobytes()).hexdigest() + f":{{label}}"
        for images, labels in ds.as_numpy_iterator()
        for image, label in zip(images, labels)
    )
    print(json.dumps({{"epoch": epoch, "seen": seen, "cache": dict(stats.cache)}}), flush=True)
"""


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    """A converted sample dataset re-sharded to one record per train shard (many shards)."""
    root = tmp_path_factory.mktemp("cache")
    src, out = str(root / "src"), str(root / "out")
    sample_data.write_sample_tree(src, per_class=20, corrupt=False)
    convert.run(["--input", src, "--output", out, "--resize", "crop:24x24",
                 "--num_shards", "4", "--validation_fraction", "0"])  # fmt: skip
    info = load_info(out)
    split = info["splits"]["train"]
    records = []
    for shard in split["shards"]:
        path = os.path.join(out, shard["file"])
        records += list(tf.data.TFRecordDataset(path).as_numpy_iterator())
        os.remove(path)
    assert len(records) == SHARDS
    split["shards"] = []
    for i, record in enumerate(records):
        name = f"train-{i:05d}-of-{SHARDS:05d}.tfrecord"
        with tf.io.TFRecordWriter(os.path.join(out, name)) as writer:
            writer.write(record)
        with open(os.path.join(out, name), "rb") as f:
            data = f.read()
        split["shards"].append(
            {"file": name, "examples": 1, "bytes": len(data),
             "sha256": hashlib.sha256(data).hexdigest()}
        )  # fmt: skip
    split["num_shards"] = SHARDS
    split["bytes"] = sum(s["bytes"] for s in split["shards"])
    _write_info(out, info)
    return out


def _write_info(root: str, info: dict) -> None:
    with open(os.path.join(root, MANIFEST), "w") as f:
        json.dump(info, f)


def _read(uri: str, **kwargs) -> list[str]:
    """``digest:label`` of every example, sorted, as the reader script lists them."""
    ds = make_dataset(uri, "train", batch_size=4, image_size=SIZE, training=False,
                      dtype=tf.uint8, augment=False, **kwargs)  # fmt: skip
    return sorted(
        hashlib.sha256(image.tobytes()).hexdigest() + f":{label}"
        for images, labels in ds.as_numpy_iterator()
        for image, label in zip(images, labels)
    )


def _within(seconds: float, fn):
    """Runs ``fn`` with a deadline: a hang fails the test instead of the suite."""
    result: dict = {}

    def run():
        try:
            result["value"] = fn()
        except BaseException as e:  # noqa: BLE001 (raised again in the test's thread)
            result["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds} s: it hangs"
    if "error" in result:
        raise result["error"]
    return result["value"]


def _cache_bytes(cache_dir: str) -> int:
    """Bytes of shards in the cache, published or downloading (not the ~100 B sidecars)."""
    total = 0
    for folder, _, names in os.walk(cache_dir):
        for name in names:
            if name.endswith((".tfrecord", ".part")):
                try:
                    total += os.path.getsize(os.path.join(folder, name))
                except FileNotFoundError:
                    pass
    return total


def _shard_bytes(root: str) -> int:
    return max(s["bytes"] for s in load_info(root)["splits"]["train"]["shards"])


def _run_readers(tmp_path, uri: str, limit: int, seeds, epochs: int, timeout_s: float):
    """Runs one reader process per seed on one cache dir, sampling the dir's size.

    Returns:
        The peak size, and per reader ``(exit status, output)``; a reader still running
        after ``timeout_s`` fails the test.
    """
    cache_dir = tmp_path / "cache"
    script = tmp_path / "reader.py"
    script.write_text(READER)
    procs, logs = [], []
    with contextlib.ExitStack() as stack:
        for seed in seeds:
            logs.append(stack.enter_context(open(tmp_path / f"reader{seed}.log", "w+")))
            procs.append(subprocess.Popen(
                [sys.executable, str(script), uri, str(cache_dir), str(limit), str(seed),
                 str(epochs)],
                cwd=ROOT, stdout=logs[-1], stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONPATH": ROOT, "TF_CPP_MIN_LOG_LEVEL": "2"},
            ))  # fmt: skip
        peak, deadline = 0, time.monotonic() + timeout_s
        try:
            while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
                peak = max(peak, _cache_bytes(cache_dir))
                time.sleep(0.01)
        finally:
            hung = [p.poll() is None for p in procs]
            for p in procs:
                p.kill()
                p.wait()
        texts = []
        for log in logs:
            log.seek(0)
            texts.append(log.read())
    for text, hangs in zip(texts, hung):
        assert not hangs, f"a reader still runs after {timeout_s} s: " + text[-3000:]
    return peak, [(p.returncode, text) for p, text in zip(procs, texts)]


@pytest.mark.parametrize("readers", [2, 4])
def test_readers_share_one_small_cache(dataset, s3_bucket, tmp_path, readers):
    put_tree(dataset, s3_bucket, "ds/")
    want = _read(dataset)
    shard = _shard_bytes(dataset)
    limit = 6 * shard
    epochs = 3
    peak, runs = _run_readers(
        tmp_path, f"s3://{s3_bucket}/ds", limit, range(1, readers + 1), epochs, 150
    )
    for status, text in runs:
        assert status == 0, text[-3000:]
        results = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
        assert [r["epoch"] for r in results] == list(range(epochs))
        for r in results:
            assert r["seen"] == want, f"epoch {r['epoch']} did not read every record once"
        assert results[-1]["cache"]["evicted"] > 0
    assert peak <= limit + readers * HELD_PER_READER * shard
    assert peak < SHARDS * shard, "nothing was evicted"


def test_a_reader_that_fails_names_the_shard_and_exits(dataset, s3_bucket, tmp_path):
    put_tree(dataset, s3_bucket, "ds/")
    entry = load_info(dataset)["splits"]["train"]["shards"][9]
    data = bytearray(s3.get_bytes(s3_bucket, f"ds/{entry['file']}"))
    data[-5] ^= 0xFF
    s3.put_bytes(s3_bucket, f"ds/{entry['file']}", bytes(data))
    _, [(status, text)] = _run_readers(
        tmp_path, f"s3://{s3_bucket}/ds", 10**9, [1], 1, 60
    )
    assert status == 1
    assert f"{entry['file']} does not match s3tfr_manifest.json after 3 tries (sha256" in text


def _flip(path: str) -> None:
    """Flips one byte in place and puts the mtime back: only a rehash can tell."""
    st = os.stat(path)
    with open(path, "r+b") as f:
        f.seek(st.st_size // 2)
        byte = f.read(1)
        f.seek(st.st_size // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_damaged_cache_files_are_fetched_again(dataset, s3_bucket, tmp_path):
    put_tree(dataset, s3_bucket, "ds/")
    want = _read(dataset)
    cache = ShardCache(str(tmp_path / "cache"))
    stats = ReaderStats()
    uri = f"s3://{s3_bucket}/ds"
    assert _read(uri, cache=cache, stats=stats) == want
    files = sorted((tmp_path / "cache").glob("*.tfrecord"))
    assert len(files) == SHARDS and stats.cache["downloads"] == SHARDS
    _flip(str(files[0]))
    with open(files[1], "r+b") as f:
        f.truncate(os.path.getsize(files[1]) - 7)
    assert _within(60, lambda: _read(uri, cache=cache, stats=stats)) == want
    assert stats.cache["damaged"] == 2 and stats.cache["downloads"] == SHARDS + 2
    assert stats.total_skipped == 0
    # A file deleted from the cache is simply fetched again.
    os.remove(files[2])
    assert _read(uri, cache=cache, stats=stats) == want
    assert stats.cache["downloads"] == SHARDS + 3


def test_unverified_bytes_never_reach_a_verifying_reader(dataset, s3_bucket, tmp_path):
    put_tree(dataset, s3_bucket, "good/")
    put_tree(dataset, s3_bucket, "bad/")
    entry = load_info(dataset)["splits"]["train"]["shards"][5]
    key = f"bad/{entry['file']}"
    data = bytearray(s3.get_bytes(s3_bucket, key))
    data[len(data) // 2] ^= 0xFF  # same size: only the sha256 can tell
    s3.put_bytes(s3_bucket, key, bytes(data))
    cache_dir = str(tmp_path / "cache")
    want = _read(dataset)

    # A reader that checks sizes only takes the bad bytes (or fails on them) ...
    try:
        _read(f"s3://{s3_bucket}/bad", cache=ShardCache(cache_dir, verify="size"))
    except tf.errors.OpError:
        pass
    content_name = os.path.join(cache_dir, f"{entry['sha256']}.tfrecord")
    assert not os.path.exists(content_name)
    unverified = ShardCache(cache_dir, verify="size").path_for(entry, f"s3://{s3_bucket}/{key}")
    assert os.path.exists(unverified)
    # ... which a verifying reader never takes: not for the bad copy itself,
    with pytest.raises(tf.errors.OpError, match=f"{entry['file']} does not match.*sha256"):
        _within(60, lambda: _read(f"s3://{s3_bucket}/bad", cache=ShardCache(cache_dir)))
    assert not os.path.exists(content_name)
    # nor for a healthy copy with the same hashes,
    stats = ReaderStats()
    assert _read(f"s3://{s3_bucket}/good", cache=ShardCache(cache_dir), stats=stats) == want
    with open(content_name, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == entry["sha256"]
    # nor when planted under the content name with a publish record that fits its stat.
    os.remove(content_name)
    with open(content_name, "wb") as f:
        f.write(data)
    st = os.stat(content_name)
    record = {"sha256": entry["sha256"], "bytes": st.st_size, "verified": "sha256",
              "ino": st.st_ino, "mtime_ns": st.st_mtime_ns}  # fmt: skip
    with open(content_name.removesuffix(".tfrecord") + ".json", "w") as f:
        json.dump(record, f)
    stats = ReaderStats()
    assert _read(f"s3://{s3_bucket}/good", cache=ShardCache(cache_dir), stats=stats) == want
    assert stats.cache["damaged"] == 1 and stats.cache["downloads"] == 1


def test_inconsistent_manifests_are_errors(dataset, tmp_path):
    copy = str(tmp_path / "copy")
    shutil.copytree(dataset, copy)
    info = load_info(copy)
    info["compression"] = "GZIP"
    _write_info(copy, info)
    with pytest.raises(DatasetError, match="holds uncompressed TFRecords, not GZIP.*'compression'"):
        _read(copy)
    info["compression"] = ""
    info["splits"]["train"]["shards"][3]["examples"] = 2
    info["splits"]["train"]["examples"] += 1
    _write_info(copy, info)
    with pytest.raises(tf.errors.OpError, match="00003-of-00060.tfrecord holds 1 records but "
                       "s3tfr_manifest.json lists 2"):  # fmt: skip
        _within(60, lambda: _read(copy, skip_bad_records=True))


def test_broken_framing_fails_instead_of_skipping(dataset, tmp_path):
    copy = str(tmp_path / "copy")
    shutil.copytree(dataset, copy)
    shard = os.path.join(copy, load_info(copy)["splits"]["train"]["shards"][7]["file"])
    ds_kwargs = {"verify": "none", "cache_dir": str(tmp_path / "c"), "skip_bad_records": True}
    _flip(shard)
    with pytest.raises(tf.errors.DataLossError):
        _within(60, lambda: _read(copy, **ds_kwargs))
    os.remove(shard)
    with pytest.raises(DatasetError, match="00007-of-00060.tfrecord.*missing"):
        _read(copy, **ds_kwargs)


def _inspect_error(capsys, uri: str, *flags: str) -> str:
    with pytest.raises(SystemExit) as exited:
        inspect_job.main([uri, *flags])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.count("\n") == 1, err
    return err


def test_s3_errors_are_one_line(dataset, s3_bucket, s3_server, tmp_path, capsys, monkeypatch):
    put_tree(dataset, s3_bucket, "ds/")
    uri = f"s3://{s3_bucket}/ds"
    iam = boto3.client("iam", endpoint_url=s3_server.endpoint)
    user = f"reader-{time.monotonic_ns()}"
    iam.create_user(UserName=user)
    key = iam.create_access_key(UserName=user)["AccessKey"]
    # The local server accepts any credentials unless told to check them.
    monkeypatch.setattr(moto.settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)
    cases = {
        "InvalidAccessKeyId": ("AKIANOTKNOWN", "x", "--s3_access_key_id"),
        "SignatureDoesNotMatch": (key["AccessKeyId"], "wrong", "AWS_SECRET_ACCESS_KEY"),
        "AccessDenied": (key["AccessKeyId"], key["SecretAccessKey"], "IAM policy"),
    }
    for code, (key_id, secret, hint) in cases.items():
        config = S3Config(s3_access_key_id=key_id, s3_secret_access_key=secret)
        with pytest.raises(DatasetError, match=f"^{code} reading {uri}/.*: .*{hint}"):
            make_dataset(uri, config=config, cache_dir=str(tmp_path))
        flags = (f"--s3_access_key_id={key_id}", f"--s3_secret_access_key={secret}")
        assert f"inspect: error: {code} reading" in _inspect_error(capsys, uri, *flags)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(DatasetError, match="^no AWS credentials to read s3://.*AWS_PROFILE"):
        make_dataset(uri)
    assert "no AWS credentials" in _inspect_error(capsys, uri)
    closed = S3Config(s3_endpoint_url="http://127.0.0.1:9", s3_access_key_id="a",
                      s3_secret_access_key="b", max_attempts=1)  # fmt: skip
    with pytest.raises(DatasetError, match="^cannot reach http://127.0.0.1:9 .*ENDPOINT_URL"):
        make_dataset(uri, config=closed)


def test_cache_stays_within_limit_across_epochs_in_one_process(dataset, s3_bucket, tmp_path):
    put_tree(dataset, s3_bucket, "ds/")
    want = _read(dataset)
    shard = _shard_bytes(dataset)
    limit = 5 * shard
    cache = ShardCache(str(tmp_path / "cache"), max_bytes=limit, workers=WORKERS)
    uri = f"s3://{s3_bucket}/ds"
    peak, done = 0, threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _cache_bytes(str(tmp_path / "cache")))
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        for seed in (1, 2, 3):
            got = _read(uri, cache=cache, shuffle=True, seed=seed,
                        prefetch_shards=PREFETCH, cycle_length=CYCLE)  # fmt: skip
            assert got == want
    finally:
        done.set()
        sampler.join()
    assert cache.stats["evicted"] >= 2 * SHARDS
    assert peak <= limit + HELD_PER_READER * shard
    kept = sum(f.stat().st_size for f in (tmp_path / "cache").rglob("*.tfrecord"))
    assert kept <= limit
