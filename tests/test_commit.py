"""One writer per output prefix, and a convert deletes only what the dataset owns.

Real processes race on one prefix (local and on the local S3 server); the lease's corner
cases (a dead holder, a stalled one, a manifest committed by someone else) are set up
directly.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from beam_jobs import convert
from beam_jobs.common import UserError
from devtools.local_s3 import put_tree
from devtools.sample_data import write_sample_tree
from s3tfr import s3, storage
from s3tfr.contract import MANIFEST
from s3tfr.manifest import load_info
from transforms import commit
from transforms.commit import Lease, LeaseLost, OutputBusy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FOREIGN = {
    # Named like shards, but the user's: no convert may touch them.
    "test-00000-of-00001.tfrecord": b"the user's own shard",
    "train-00007-of-00009.tfrecord": b"looks like a stale shard, is not one",
    "notes.txt": b"my notes",
}


def _files(out: str) -> dict[str, bytes]:
    """Every file under a local dir or S3 prefix, by relative name."""
    return {rel: storage.read_bytes(storage.join(out, rel)) for rel, _ in storage.walk(out)}


def _put_foreign(out: str) -> None:
    for name, data in FOREIGN.items():
        storage.write_bytes(storage.join(out, name), data)


def _assert_not_wrong_complete(out: str) -> None:
    """A manifest, if there is one, names exactly the shards that are there."""
    files = _files(out)
    if MANIFEST not in files:
        return
    info = load_info(out)
    counts = info["counts"]
    assert counts["listed"] == counts["converted"] + counts["rejected"]
    for split in info["splits"].values():
        for shard in split["shards"]:
            data = files.get(shard["file"])
            assert data is not None, f"{shard['file']} is listed but missing"
            assert len(data) == shard["bytes"], shard["file"]
            assert hashlib.sha256(data).hexdigest() == shard["sha256"], shard["file"]
    assert files["labels.txt"].decode().splitlines() == info["labels"]


@pytest.fixture
def source(tmp_path, request):
    """A sample tree, local or on the local S3 server (``request.param``)."""
    local = str(tmp_path / "src")
    write_sample_tree(local, per_class=6)
    if request.param == "local":
        return local, str(tmp_path / "out")
    bucket = request.getfixturevalue("s3_bucket")
    put_tree(local, bucket, "images/")
    return f"s3://{bucket}/images/", f"s3://{bucket}/out/"


@pytest.mark.parametrize("source", ["local", "s3"], indirect=True)
def test_rerun_with_other_options_keeps_foreign_files(source):
    src, out = source
    _put_foreign(out)
    convert.run(["--input", src, "--output", out, "--num_shards", "4"])
    first = {n for n in _files(out) if n.startswith("train-") and n not in FOREIGN}
    assert first == {f"train-{i:05d}-of-00004.tfrecord" for i in range(4)}
    convert.run(["--input", src, "--output", out, "--num_shards", "3"])
    files = _files(out)
    for name, data in FOREIGN.items():
        assert files[name] == data, name
    shards = {n for n in files if n.endswith(".tfrecord") and n not in FOREIGN}
    assert shards == {f"train-{i:05d}-of-00003.tfrecord" for i in range(3)} | {
        "validation-00000-of-00001.tfrecord"
    }
    assert not any(n.startswith(".s3tfr/") for n in files)  # lease and records gone
    _assert_not_wrong_complete(out)


def _spawn(args: list[str], log_path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": ROOT}
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "beam_jobs.convert", *args],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip


def race(runs: list[list[str]], logs) -> list[int]:
    """Starts a convert per argument list at once; returns their exit codes, each 0 (it
    committed) or 2 with the lease holder named and no traceback; at least one is 0."""
    procs = [(_spawn(args, f"{logs}-{n}.log"), f"{logs}-{n}.log") for n, args in enumerate(runs)]
    codes = []
    for proc, log in procs:
        code = proc.wait(timeout=300)
        with open(log, errors="replace") as f:
            text = f.read()
        assert code in (0, 2), text[-3000:]
        if code == 2:
            assert "another convert run is writing" in text, text[-3000:]
            assert "Traceback" not in text
        codes.append(code)
    assert 0 in codes
    return codes


@pytest.mark.parametrize("source", ["local", "s3"], indirect=True)
def test_concurrent_converts_never_leave_a_wrong_complete_dataset(source, tmp_path):
    src, out = source
    _put_foreign(out)
    outcomes = []
    for attempt in range(3):
        codes = race(
            [["--input", src, "--output", out, "--num_shards", shards] for shards in ("4", "3")],
            tmp_path / f"run{attempt}",
        )
        outcomes.append(tuple(codes))
        _assert_not_wrong_complete(out)
        files = _files(out)
        assert all(files[name] == data for name, data in FOREIGN.items())
        assert not any(n.startswith(".s3tfr/") for n in files)
    # Both orders happen; print them for the record.
    print("exit codes per attempt:", outcomes)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_live_lease_is_respected_and_a_dead_one_taken_over(where, tmp_path, request):
    if where == "local":
        out = str(tmp_path / "out")
    else:
        out = f"s3://{request.getfixturevalue('s3_bucket')}/out/"
    holder = {"run_id": "other", "host": "elsewhere", "pid": 1, "pid_start": "",
              "started": time.time(),
              "renewed": time.time(), "expires": time.time() + 600}  # fmt: skip
    lock = storage.join(out, commit.LOCK)
    storage.write_bytes(lock, json.dumps(holder).encode())
    before = _files(out)
    with pytest.raises(OutputBusy, match="another convert run is writing .*run other on "
                                         "elsewhere"):  # fmt: skip
        Lease(out).acquire()
    assert _files(out) == before  # nothing written, nothing deleted

    # The same holder, its lease expired; then one of this host whose process is gone.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for stale in ({**holder, "expires": time.time() - 1},
                  {**holder, "host": socket.gethostname(), "pid": dead.pid}):  # fmt: skip
        storage.write_bytes(lock, json.dumps(stale).encode())
        with Lease(out) as run:
            assert commit.held(run)
        assert not storage.exists(lock)


def _stalled(out: str) -> tuple[Lease, commit.OutputRun]:
    """A run holding ``out`` whose lease has expired, as if it stalled beyond it."""
    first = Lease(out)
    run = first.acquire()
    holder = json.loads(storage.read_bytes(storage.join(out, commit.LOCK)))
    holder["expires"] = time.time() - 1
    storage.write_bytes(storage.join(out, commit.LOCK), json.dumps(holder).encode())
    return first, run


def test_a_stalled_run_that_lost_its_lease_does_not_commit(tmp_path):
    out = str(tmp_path / "out")
    # The first run stalls beyond its lease; a second takes the prefix over.
    first, run = _stalled(out)
    second = Lease(out)
    second.acquire()
    with pytest.raises(LeaseLost, match="no longer holds the lease"):
        commit.finish(run, set(), {}, b"{}")
    assert not os.path.exists(os.path.join(out, MANIFEST))
    second.release()
    first.release()  # must not delete the second run's lease (already released here)


def test_a_manifest_committed_by_another_writer_is_never_overwritten(s3_bucket):
    out = f"s3://{s3_bucket}/out/"
    with Lease(out) as run:
        s3.put_bytes(s3_bucket, f"out/{MANIFEST}", b'{"theirs": 1}')
        with pytest.raises(FileExistsError, match="another run committed"):
            commit.finish(run, set(), {}, b'{"ours": 1}')
    assert s3.get_bytes(s3_bucket, f"out/{MANIFEST}") == b'{"theirs": 1}'


def test_an_interrupted_runs_shards_are_removed_by_the_next_run(tmp_path):
    src, out = str(tmp_path / "src"), str(tmp_path / "out")
    write_sample_tree(src, per_class=6)
    _put_foreign(out)
    # A run that died after moving in one shard: its record names it.
    interrupted = commit.OutputRun(out, "deadbeef")
    marker = storage.join(interrupted.records, "written/train-00003-of-00011.tfrecord")
    storage.write_bytes(marker, b"")
    storage.write_bytes(storage.join(out, "train-00003-of-00011.tfrecord"), b"partial run")
    convert.run(["--input", src, "--output", out, "--num_shards", "2"])
    files = _files(out)
    assert "train-00003-of-00011.tfrecord" not in files
    assert all(files[name] == data for name, data in FOREIGN.items())
    _assert_not_wrong_complete(out)


def test_partial_s3_credentials_are_a_user_error(tmp_path):
    with pytest.raises(UserError, match="--s3_secret_access_key was given without "
                                        "--s3_access_key_id"):  # fmt: skip
        convert.run(["--input", str(tmp_path), "--output", str(tmp_path / "o"),
                     "--s3_secret_access_key=abc"])  # fmt: skip


def test_a_run_that_lost_its_lease_writes_none_of_its_files(tmp_path):
    out = str(tmp_path / "out")
    first, run = _stalled(out)
    with Lease(out) as second:
        storage.write_bytes(second.uri("labels.txt"), b"theirs\n")
        with pytest.raises(LeaseLost):
            commit.finish(run, set(), {"labels.txt": b"ours\n"}, b"{}")
        with pytest.raises(LeaseLost):
            commit.mark_written(run, "train-00000-of-00001.tfrecord")
        assert storage.read_bytes(second.uri("labels.txt")) == b"theirs\n"
    first.release()


def test_a_users_file_at_a_shard_name_is_never_replaced(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    write_sample_tree(str(src), per_class=3, corrupt=False)
    out.mkdir()
    (out / "train-00000-of-00001.tfrecord").write_bytes(b"the user's own")
    done = subprocess.run(
        [sys.executable, "-m", "beam_jobs.convert", "--input", str(src), "--output",
         str(out), "--num_shards", "1"], check=False, cwd=ROOT, capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": ROOT}, timeout=300,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1] == (
        f"convert: failed: {out}/train-00000-of-00001.tfrecord exists and is not a file "
        "of this dataset: the convert job never replaces files it did not write; move "
        "it, or choose another --output or --num_shards"
    )
    assert (out / "train-00000-of-00001.tfrecord").read_bytes() == b"the user's own"
    assert not (out / MANIFEST).exists()


@pytest.mark.parametrize(
    "content",
    [b"garbage", b"[1, 2]", b'{"expires": "soon"}', b'{"expires": null}',
     (b'{"run_id": "x", "host": "h", "pid": 100000000000000000000, "pid_start": "",'
      b' "started": 1e20, "renewed": 0, "expires": 1e20}')],
    ids=["not-json", "a-list", "text-expiry", "null-expiry", "huge-numbers"],
)  # fmt: skip
def test_a_lease_file_this_tool_did_not_write_is_taken_over(tmp_path, content):
    out = str(tmp_path / "out")
    storage.write_bytes(storage.join(out, commit.LOCK), content)
    with Lease(out) as run:
        assert commit.held(run)


def test_state_folders_that_are_links_are_refused_and_nothing_outside_is_touched(tmp_path):
    victim = tmp_path / "victim"
    (victim / "photos").mkdir(parents=True)
    (victim / "photos" / "data.txt").write_text("precious")
    src, out = tmp_path / "src", tmp_path / "out"
    write_sample_tree(str(src), per_class=2, corrupt=False)
    (out / ".s3tfr").mkdir(parents=True)
    (out / ".s3tfr" / "runs").symlink_to(victim)
    with pytest.raises(UserError, match="is a symbolic link"):
        convert.run(["--input", str(src), "--output", str(out)])
    assert (victim / "photos" / "data.txt").read_text() == "precious"


def test_file_uris_are_local_paths(tmp_path):
    src = tmp_path / "src"
    write_sample_tree(str(src), per_class=2, corrupt=False)
    with pytest.raises(UserError, match="inside input"):
        convert.run(["--input", str(src), "--output", f"file://{src}/out"])
    convert.run(["--input", f"file://{src}", "--output", f"file://{tmp_path}/out"])
    assert not (tmp_path / "out" / ".s3tfr").exists()
    _assert_not_wrong_complete(str(tmp_path / "out"))
    with pytest.raises(UserError, match="unsupported scheme 'S3'"):
        convert.run(["--input", str(src), "--output", "S3://bucket/out"])
