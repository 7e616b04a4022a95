"""Progress and output manners of the command-line jobs: the workers' progress markers,
the bar (live on a terminal, periodic lines elsewhere), and what each job prints on
stderr when it runs as a person runs it (a subprocess whose stderr is no terminal, or a
pseudo-terminal)."""

from __future__ import annotations

import io
import logging
import os
import pty
import re
import select
import subprocess
import sys
import time
import uuid

import pytest
from rich.console import Console

from beam_jobs import progress
from devtools.sample_data import CORRUPT_NAME, write_photo_tree
from s3tfr import s3
from transforms.progress import ProgressFolder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGES = 200  # one corrupt file besides: listed and assigned, then rejected
# Lines a default run must not show: TensorFlow's C++ log, urllib3's discarded
# connections, tracebacks.
NOISE = re.compile(
    r"^[IWE]\d{4} |cuInit|absl::InitializeLog|Connection pool is full|Traceback"
)


# ---------------------------------------------------------------- markers and the bar


def test_markers_count_each_task_once_at_its_highest_count(tmp_path):
    folder = ProgressFolder(str(tmp_path / "progress"))
    assert folder.read() == (None, (0,))
    folder.set_total(7)
    first = folder.task("train-00000-of-00002.tfrecord")
    first.add(1, 100)
    first.add(2, 50)
    first.finish()
    second = folder.task("train-00001-of-00002.tfrecord")
    second.add(3, 10)
    second.finish()
    # A retried task writes under the same name: counted once, at its highest count.
    folder.task("train-00001-of-00002.tfrecord").finish()
    assert folder.read() == (7, (6, 160))
    # One marker per task: the previous one goes when the count grows.
    assert sorted(os.listdir(tmp_path / "progress" / "done")) == [
        "train-00000-of-00002.tfrecord@3@150",
        "train-00001-of-00002.tfrecord@0",
        "train-00001-of-00002.tfrecord@3@10",
    ]
    folder.remove()
    assert not (tmp_path / "progress").exists()


def test_markers_on_s3(s3_bucket):
    folder = ProgressFolder(f"s3://{s3_bucket}/run/progress")
    folder.set_total(5)
    task = folder.task("validation-00000-of-00001.tfrecord")
    task.add(5)
    task.finish()
    assert folder.read() == (5, (5,))
    folder.remove()
    assert list(s3.iter_objects(s3_bucket, "")) == []


def test_a_marker_that_cannot_be_written_never_fails_the_work(tmp_path):
    (tmp_path / "file").write_text("a file where the folder should be")
    task = ProgressFolder(str(tmp_path / "file" / "progress")).task("t")
    task.add(1)
    task.finish()
    assert task.counts == [1]


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_lines_every_ten_percent_or_ten_seconds_and_a_last_one(caplog):
    clock = _Clock()
    caplog.set_level(logging.INFO, logger=progress.LOGGER.name)
    bar = progress.Bar("convert", "images", clock=clock)
    assert caplog.messages == []  # nothing until the total is known
    clock.now = 1
    bar.update(0, total=4000)
    for now, done in ((2, 100), (3, 390), (4, 420), (16, 500), (17, 1300), (18, 1310)):
        clock.now = now
        bar.update(done)
    clock.now = 20
    bar.update(900)  # a marker read late never takes progress back
    bar.close(complete=True)
    assert caplog.messages == [
        "convert: 0/4,000 images (0%)",
        "convert: 420/4,000 images (10%), 105 images/s, ETA 34 s",
        "convert: 500/4,000 images (12%), 31 images/s, ETA 2 min",
        "convert: 1,300/4,000 images (32%), 76 images/s, ETA 35 s",
        "convert: 4,000/4,000 images (100%) in 20 s, 200 images/s",
    ]


def test_rate_and_eta_by_bytes_when_bytes_are_counted(caplog):
    clock = _Clock()
    caplog.set_level(logging.INFO, logger=progress.LOGGER.name)
    bar = progress.Bar("upload", "files", 10, 100_000_000, clock=clock)
    clock.now = 10
    bar.update(9, 20_000_000)  # the largest file goes first: bytes tell the time left
    assert caplog.messages[-1] == (
        "upload: 9/10 files (90%), 20.0/100.0 MB, 1 files/s, 2.0 MB/s, ETA 40 s"
    )


def test_the_live_bar_draws_on_a_terminal():
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=100, color_system=None)
    clock = _Clock()
    bar = progress.Bar("verify", "records", console=console, clock=clock)
    clock.now = 2
    bar.update(150, total=600)
    bar.close(complete=True)
    drawn = out.getvalue()
    assert "━" in drawn and "verify" in drawn
    assert "600/600 records (100%) in 2.0 s, 300 records/s" in drawn


# ------------------------------------------------------------- the jobs as a user runs them


def _environment() -> dict[str, str]:
    """The test session's environment without the TensorFlow log level that conftest
    sets: the jobs choose their own, as for a user."""
    env = {**os.environ, "PYTHONPATH": ROOT}
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    return env


def _job(module: str, *args: str, cwd: str = ROOT) -> subprocess.CompletedProcess:
    """Runs a job with stdout and stderr captured separately (stderr is no terminal)."""
    done = subprocess.run(
        [sys.executable, "-m", module, *args], check=False, cwd=cwd, capture_output=True,
        text=True, timeout=300, env=_environment(),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _progress(stderr: str, job: str, unit: str) -> list[tuple[int, int]]:
    """(done, total) of every progress line of ``job``."""
    pattern = re.compile(rf"^{job}: ([\d,]+)/([\d,]+) {unit} \(\d+%\)")
    return [
        (int(m[1].replace(",", "")), int(m[2].replace(",", "")))
        for line in stderr.splitlines()
        if (m := pattern.match(line))
    ]


def _assert_no_noise(stderr: str) -> None:
    assert [line for line in stderr.splitlines() if NOISE.search(line)] == []


@pytest.fixture(scope="module")
def runs(s3_server, tmp_path_factory):
    """A tree uploaded, converted from S3 with four workers, verified and analyzed: each
    job run once as a subprocess; their outputs by name."""
    bucket = f"progress-{uuid.uuid4().hex[:12]}"
    s3.client().create_bucket(Bucket=bucket)
    tree = str(tmp_path_factory.mktemp("tree"))
    write_photo_tree(tree, IMAGES, classes=4, size=(64, 48))
    with open(os.path.join(tree, "class_00", CORRUPT_NAME), "wb") as f:
        f.write(b"\xff\xd8\xff\xe0 cut short")
    work = str(tmp_path_factory.mktemp("cwd"))
    images, dataset = f"s3://{bucket}/images/", f"s3://{bucket}/dataset/"
    done = {}
    done["upload"] = _job(
        "beam_jobs.upload", "--source", tree, "--output", images, cwd=work
    )
    # Four DoFn instances of 32 GETs each share one client per process: its pool must
    # hold them all (urllib3 warns "Connection pool is full" otherwise).
    done["convert"] = _job("beam_jobs.convert", "--input", images, "--output", dataset,
                           "--num_shards=4", "--direct_num_workers=4")  # fmt: skip
    # Its hashing pass reports as lines of its own beside the conversion's.
    done["hash"] = _job("beam_jobs.convert", "--input", images, "--output",
                        f"s3://{bucket}/by-content/", "--split_by", "content",
                        "--num_shards=4")  # fmt: skip
    done["verify"] = _job("beam_jobs.inspect", dataset, "--verify")
    done["analyze"] = _job("beam_jobs.analyze", "--dataset", dataset)
    done["work"] = work
    return done


@pytest.mark.parametrize(
    "job, name, unit, total",
    [
        ("upload", "upload", "files", IMAGES + 1),
        ("convert", "convert", "images", IMAGES + 1),
        ("hash", "hash", "sources", IMAGES + 1),
        ("verify", "verify", "records", IMAGES),
        ("analyze", "analyze", "images", None),
    ],
)
def test_progress_lines_count_up_to_the_planned_total(runs, job, name, unit, total):
    lines = _progress(runs[job].stderr, name, unit)
    assert lines, runs[job].stderr
    totals = {t for _done, t in lines}
    assert len(totals) == 1, lines
    (planned,) = totals
    if total is not None:
        assert planned == total
    dones = [d for d, _t in lines]
    assert dones == sorted(dones) and dones[-1] == planned
    assert re.search(
        rf"^{name}: .* \(100%\).* in [\d.]+ s, ", runs[job].stderr, re.MULTILINE
    )


@pytest.mark.parametrize("job", ["upload", "convert", "verify", "analyze"])
def test_default_output_has_no_library_chatter(runs, job):
    _assert_no_noise(runs[job].stderr + runs[job].stdout)
    assert "apache_beam" not in runs[job].stderr


def test_verify_prints_each_verdict_once(runs):
    output = runs["verify"].stdout + runs["verify"].stderr
    verdicts = re.findall(r"^(?:PASS|FAIL) (\S+):", output, re.MULTILINE)
    assert len(verdicts) == 8 and len(set(verdicts)) == 8, output  # 4 shards a split
    assert "inspect: verify passed" in runs["verify"].stdout


def test_upload_report_goes_to_a_private_folder_of_its_own(runs):
    (report,) = re.findall(r"^report: (.+)$", runs["upload"].stdout, re.MULTILINE)
    folder = os.path.dirname(report)
    assert os.path.basename(folder).startswith("s3tfr-upload-")
    assert os.stat(folder).st_mode & 0o077 == 0
    assert os.listdir(runs["work"]) == []  # nothing in the directory it ran in


def test_dry_run_says_the_same_on_stderr_and_stdout(s3_bucket, tmp_path):
    write_photo_tree(str(tmp_path / "tree"), 12, classes=2, size=(32, 24))
    done = _job("beam_jobs.upload", "--source", str(tmp_path / "tree"),
                "--output", f"s3://{s3_bucket}/x/", "--dry_run")  # fmt: skip
    assert "dry run: 12 files would be uploaded" in done.stderr
    assert "would upload 12 files" in done.stdout
    assert list(s3.iter_objects(s3_bucket, "")) == []


def test_quiet_prints_the_result_only(tmp_path):
    write_photo_tree(str(tmp_path / "tree"), 12, classes=2, size=(32, 24))
    out = str(tmp_path / "out")
    done = _job(
        "beam_jobs.convert", "--input", str(tmp_path / "tree"), "--output", out, "-q"
    )
    assert done.stderr == ""
    assert f"Dataset written to {out}" in done.stdout
    done = _job("beam_jobs.inspect", out, "--verify", "--quiet")
    assert done.stderr == ""
    assert "inspect: verify passed" in done.stdout


def _under_terminal(args: list[str]) -> tuple[int, str, str]:
    """Runs a job with stderr on a pseudo-terminal; returns (status, terminal, stdout)."""
    controller, terminal = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, *args], cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=terminal, env={**_environment(), "COLUMNS": "120"},
    )  # fmt: skip
    os.close(terminal)
    drawn = b""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        ready, _, _ = select.select([controller], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # the job closed the terminal
                break
            if not chunk:
                break
            drawn += chunk
        elif proc.poll() is not None:
            break
    os.close(controller)
    stdout = proc.stdout.read().decode()
    return proc.wait(timeout=60), drawn.decode("utf-8", "replace"), stdout


def test_on_a_terminal_a_live_bar_is_drawn(tmp_path):
    write_photo_tree(str(tmp_path / "tree"), 30, classes=3, size=(32, 24))
    out = str(tmp_path / "out")
    status, drawn, stdout = _under_terminal(
        ["-m", "beam_jobs.convert", "--input", str(tmp_path / "tree"), "--output", out]
    )
    assert status == 0, drawn
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", drawn)
    assert "━" in plain
    assert "30/30 images (100%) in " in plain
    assert not re.search(r"^convert: [\d,]+/", plain, re.MULTILINE)  # a bar, not lines
    assert f"Dataset written to {out}" in stdout  # the summary stays on stdout
