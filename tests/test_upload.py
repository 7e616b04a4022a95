"""The upload job against the local S3 server: byte-for-byte mirror, idempotent reruns,
checksum-based change detection, multipart, bad input reported while the rest uploads,
dry run and filters, and retries through the fault-injecting proxy."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from beam_jobs import upload
from beam_jobs.common import counters
from devtools.sample_data import encode, photo_like, write_sample_tree
from s3tfr import s3
from transforms.upload_files import METRICS_NAMESPACE
from transforms.uploader import UploadSettings, content_type, plan, selected

MIB = 1024 * 1024


def _tree_files(root: str) -> dict[str, bytes]:
    files = {}
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, root).replace(os.sep, "/")] = f.read()
    return files


def _bucket_files(bucket: str, prefix: str) -> dict[str, bytes]:
    return {
        obj.key[len(prefix) :]: s3.get_bytes(bucket, obj.key)
        for obj in s3.iter_objects(bucket, prefix)
    }


def _image_tree(root: str, count: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for i in range(count):
        folder = os.path.join(root, f"class_{i % 3}")
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"img_{i:03d}.jpg"), "wb") as f:
            f.write(encode(photo_like(64, 48, rng), "JPEG", quality=90))


def _report(tmp_path, name: str = "report.json") -> dict:
    with open(tmp_path / name) as f:
        return json.load(f)


def _main(args: list[str], report: str) -> tuple[int, dict]:
    with pytest.raises(SystemExit) as exit_info:
        upload.main([*args, f"--report={report}"])
        raise SystemExit(0)
    with open(report) as f:
        return exit_info.value.code, json.load(f)


def test_selected_globs_match_relative_paths():
    assert selected("cat/a.jpg", (), ())
    assert selected("cat/a.jpg", ("*.jpg",), ())
    assert not selected("cat/a.png", ("*.jpg",), ())
    assert not selected("cat/a.jpg", ("*.jpg",), ("cat/*",))
    assert selected("dog/a.jpg", ("*.jpg",), ("cat/*",))


def test_content_type_comes_from_content_not_extension():
    image = photo_like(32, 24, np.random.default_rng(0))
    assert content_type(encode(image, "PNG"), "looks_like.jpg") == ("image/png", True)
    assert content_type(encode(image, "JPEG"), "noext") == ("image/jpeg", True)
    assert content_type(b"plain text, not an image", "fake.jpg") == ("image/jpeg", False)
    assert content_type(b"\x00\x01", "blob") == ("application/octet-stream", False)


def test_upload_mirrors_tree_rerun_skips_and_changed_files_reupload(s3_bucket, tmp_path):
    src = str(tmp_path / "src")
    write_sample_tree(src, per_class=3, corrupt=False)
    png = encode(photo_like(40, 30, np.random.default_rng(1)), "PNG")
    (tmp_path / "src" / "dog" / "really_a_png.jpg").write_bytes(png)
    big = np.random.default_rng(2).bytes(int(2.5 * MIB))
    (tmp_path / "src" / "cat" / "big.bin").write_bytes(big)
    (tmp_path / "src" / "notes.txt").write_bytes(b"a file at the top of the tree")
    args = [
        f"--source={src}",
        f"--output=s3://{s3_bucket}/images",
        "--multipart_threshold_mb=1",
        "--sse=AES256",
        f"--report={tmp_path / 'report.json'}",
    ]
    local = _tree_files(src)

    first = counters(upload.run(args), METRICS_NAMESPACE)
    assert first["files_uploaded"] == len(local)
    assert first["bytes_uploaded"] == sum(len(v) for v in local.values())
    assert _bucket_files(s3_bucket, "images/") == local
    client = s3.client()
    head = client.head_object(Bucket=s3_bucket, Key="images/dog/really_a_png.jpg")
    assert head["ContentType"] == "image/png"
    assert client.head_object(Bucket=s3_bucket, Key="images/cat/cat_0000.jpg")["ContentType"] == (
        "image/jpeg"
    )
    big_head = client.head_object(Bucket=s3_bucket, Key="images/cat/big.bin")
    assert "-" in big_head["ETag"], "a file above the threshold must go multipart"
    assert big_head["ServerSideEncryption"] == "AES256"

    # Nothing changed: the plan finds every file unchanged and no pipeline starts.
    assert upload.run(args) is None
    assert _report(tmp_path)["counts"] == {"unchanged": len(local)}

    # Same size, other bytes: only a checksum can tell; and one that grew.
    same_size = bytearray(local["bird/bird_0000.jpg"])
    same_size[-3] ^= 0xFF
    (tmp_path / "src" / "bird" / "bird_0000.jpg").write_bytes(same_size)
    big_changed = bytearray(big)
    big_changed[MIB] ^= 0xFF
    (tmp_path / "src" / "cat" / "big.bin").write_bytes(big_changed)
    (tmp_path / "src" / "dog" / "dog_0001.jpg").write_bytes(local["dog/dog_0001.jpg"] + b"xx")
    third = counters(upload.run(args), METRICS_NAMESPACE)
    assert third["files_uploaded"] == 3
    assert _report(tmp_path)["counts"] == {"unchanged": len(local) - 3, "uploaded": 3}
    assert _bucket_files(s3_bucket, "images/") == _tree_files(src)


def test_beam_is_imported_only_when_a_file_must_upload(s3_bucket, tmp_path):
    src = tmp_path / "src"
    _image_tree(str(src), 6)
    settings = UploadSettings(source=str(src), bucket=s3_bucket, prefix="p/")
    calls = []
    dry = plan(settings, dry_run=True, on_first_upload=lambda: calls.append(1))
    assert len(dry.done.would_upload) == 6 and calls == []
    assert len(plan(settings, on_first_upload=lambda: calls.append(1)).to_upload) == 6
    assert calls == [1], "called once, when the first file to upload is found"

    args = [f"--source={src}", f"--output=s3://{s3_bucket}/p/"]
    upload.run([*args, f"--report={tmp_path / 'first.json'}"])
    # A rerun with nothing to upload and a dry run, in a fresh interpreter: no Beam.
    runs = [
        [*args, f"--report={tmp_path / 'rerun.json'}"],
        [f"--source={src}", f"--output=s3://{s3_bucket}/q/", "--dry_run"]
        + [f"--report={tmp_path / 'dry.json'}"],
    ]
    script = (
        "import json, sys\n"
        "from beam_jobs import upload\n"
        "for argv in json.loads(sys.argv[1]):\n"
        "    assert upload.run(argv) is None\n"
        "assert 'apache_beam' not in sys.modules, 'Beam was imported'\n"
    )
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    command = [sys.executable, "-c", script, json.dumps(runs)]
    subprocess.run(command, check=True, cwd=repo)
    assert _report(tmp_path, "rerun.json")["counts"] == {"unchanged": 6}
    assert len(_report(tmp_path, "dry.json")["would_upload"]) == 6


def test_bad_inputs_are_reported_and_the_rest_upload(s3_bucket, tmp_path):
    src = tmp_path / "src"
    _image_tree(str(src), 6)
    good = _tree_files(str(src))
    os.symlink(tmp_path / "missing.jpg", src / "class_0" / "dangling.jpg")
    os.mkfifo(src / "class_1" / "pipe.jpg")
    os.symlink("..", src / "class_2" / "loop")
    # st_size says 0 but reading yields bytes: a file that changes size while read.
    os.symlink("/proc/self/status", src / "class_2" / "growing.txt")
    expected = {
        "class_0/dangling.jpg": "dangling symlink",
        "class_1/pipe.jpg": "not a regular file (FIFO)",
        "class_2/loop/": "symlink loop",
        "class_2/growing.txt": "changed size while being read",
    }
    if os.geteuid() != 0:  # root reads any file whatever its mode
        unreadable = src / "class_0" / "secret.jpg"
        unreadable.write_bytes(b"x" * 10)
        unreadable.chmod(0)
        expected["class_0/secret.jpg"] = "Permission denied"

    code, report = _main(
        [f"--source={src}", f"--output=s3://{s3_bucket}/p/", "--object_attempts=2"],
        str(tmp_path / "report.json"),
    )

    assert code == 1
    reasons = {f["key"]: f["reason"] for f in report["failed"]}
    assert set(reasons) == set(expected)
    for key, phrase in expected.items():
        assert phrase in reasons[key], (key, reasons[key])
    assert report["counts"]["uploaded"] == len(good)
    assert _bucket_files(s3_bucket, "p/") == good


def test_dry_run_with_filters_uploads_nothing_and_prints_no_secret(s3_bucket, tmp_path, capsys):
    src = tmp_path / "src"
    _image_tree(str(src), 6)
    (src / "class_0" / "fake.jpg").write_bytes(b"text that only claims to be a JPEG")
    (src / "class_0" / "notes.txt").write_bytes(b"notes")
    secret = "do-not-print-this-secret"
    code, report = _main(
        [
            f"--source={src}",
            f"--output=s3://{s3_bucket}/p",
            "--dry_run",
            "--images_only",
            "--include=*.jpg",
            "--exclude=class_2/*",
            "--s3_access_key_id=local-test-key",
            f"--s3_secret_access_key={secret}",
        ],
        str(tmp_path / "report.json"),
    )
    assert code == 0
    assert report["would_upload"] == [
        "class_0/img_000.jpg",
        "class_0/img_003.jpg",
        "class_1/img_001.jpg",
        "class_1/img_004.jpg",
    ]
    assert report["counts"]["not_image"] == 1
    assert list(s3.iter_objects(s3_bucket, "")) == []
    out, err = capsys.readouterr()
    assert "would upload class_0/img_000.jpg" in out
    assert secret not in out + err


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "does not exist"),
        ("empty", "holds no files"),
        ("no_bucket", "bucket no-such-bucket-here does not exist"),
        ("not_s3", "--output must be an s3:// URI"),
    ],
)
def test_bad_setup_is_one_clear_line_and_exit_2(s3_server, tmp_path, capsys, case, message):
    src = tmp_path / "src"
    (src / "empty_class").mkdir(parents=True)
    if case != "empty":
        (src / "a" / "x.jpg").parent.mkdir()
        (src / "a" / "x.jpg").write_bytes(b"x")
    source = str(tmp_path / "nowhere") if case == "missing" else str(src)
    output = str(tmp_path / "out") if case == "not_s3" else "s3://no-such-bucket-here/p/"
    with pytest.raises(SystemExit) as exit_info:
        upload.main([f"--source={source}", f"--output={output}"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_retries_under_injected_slowdown_and_resets_lose_nothing(s3_bucket, s3_proxy, tmp_path):
    src = tmp_path / "src"
    _image_tree(str(src), 40, seed=3)
    (src / "class_0" / "big.bin").write_bytes(np.random.default_rng(4).bytes(int(1.5 * MIB)))
    proxy = s3_proxy(faults={"slowdown": 0.15, "reset": 0.1}, seed=7)

    code, report = _main(
        [
            f"--source={src}",
            f"--output=s3://{s3_bucket}/p/",
            f"--s3_endpoint_url={proxy.endpoint}",
            "--multipart_threshold_mb=1",
        ],
        str(tmp_path / "report.json"),
    )

    assert proxy.injected["slowdown"] > 0 and proxy.injected["reset"] > 0, proxy.injected
    assert code == 0, report["failed"]
    assert _bucket_files(s3_bucket, "p/") == _tree_files(str(src))
    head = s3.client().head_object(Bucket=s3_bucket, Key="p/class_0/big.bin")
    assert "-" in head["ETag"]
