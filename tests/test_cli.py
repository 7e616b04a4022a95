"""The jobs' command lines: --help lists each job's own options; a misspelt or unknown
option stops the job (exit 2, one line, nothing written) instead of a Beam warning;
-v/--debug add the traceback behind a one-line error."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from beam_jobs import analyze, convert, inspect
from beam_jobs.common import UserError
from devtools.sample_data import write_sample_tree

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args], check=False, cwd=ROOT, capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": ROOT}, timeout=120,
    )  # fmt: skip


@pytest.mark.parametrize(
    "module, flags",
    [
        ("beam_jobs.convert", ["--input", "--output", "--validation_fraction", "--resize",
                               "--num_shards", "--max_pixels"]),
        ("beam_jobs.analyze", ["--dataset", "--split"]),
        ("beam_jobs.inspect", ["--dataset", "--verify", "--report"]),
    ],
)  # fmt: skip
def test_help_lists_the_jobs_own_options_with_defaults(module, flags):
    done = _cli(module, "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: s3tfr-{module.split('.')[1]}")
    for flag in flags:
        assert flag in done.stdout
    assert "(default:" in done.stdout and "--help_beam" in done.stdout
    assert "DESIGN.md" not in done.stdout


def test_help_beam_lists_beam_options():
    done = _cli("beam_jobs.convert", "--help_beam")
    assert done.returncode == 0
    assert "--runner" in done.stdout and "--s3_endpoint_url" in done.stdout


def test_a_misspelt_option_exits_2_and_writes_nothing(tmp_path):
    out = tmp_path / "out"
    done = _cli("beam_jobs.convert", "--input", str(tmp_path), "--output", str(out),
                "--valdation_fraction", "0.3", "--apend")  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        (
            "convert: error: unknown option --valdation_fraction (did you mean "
            "--validation_fraction?); unknown option --apend (did you mean --append?); see --help"
        )
    ]
    assert not out.exists()


@pytest.mark.parametrize("run", [convert.run, analyze.run, inspect.run])
def test_the_python_entry_points_refuse_unknown_options(run, tmp_path):
    with pytest.raises(UserError, match="unknown option --no_such_flag"):
        run(["--input", str(tmp_path), "--dataset", str(tmp_path), "--no_such_flag=1"])


def test_beam_options_still_pass(tmp_path):
    # Real Beam options (of any options class) are not unknown.
    from beam_jobs.common import pipeline_options

    options = pipeline_options(["--runner=DirectRunner", "--direct_num_workers=2",
                                "--s3_endpoint_url=http://127.0.0.1:1",
                                "--flink_master=127.0.0.1:8081", "--job_endpoint=embed"])  # fmt: skip
    assert options.get_all_options()["direct_num_workers"] == 2


@pytest.mark.parametrize(
    "env, flags, message",
    [
        ({"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None, "AWS_PROFILE": None,
          "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent", "AWS_CONFIG_FILE": "/nonexistent",
          "AWS_EC2_METADATA_DISABLED": "true"}, [], "no AWS credentials to read"),
        ({"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y", "AWS_MAX_ATTEMPTS": "1"},
         ["--s3_endpoint_url=http://127.0.0.1:9"], "cannot reach http://127.0.0.1:9"),
    ],
    ids=["no-credentials", "unreachable-endpoint"],
)  # fmt: skip
def test_s3_setup_problems_are_one_line(tmp_path, env, flags, message):
    full = {**os.environ, "PYTHONPATH": ROOT}
    full.pop("AWS_ENDPOINT_URL_S3", None)
    for name, value in env.items():
        if value is None:
            full.pop(name, None)
        else:
            full[name] = value
    done = subprocess.run(
        [sys.executable, "-m", "beam_jobs.convert", "--input", "s3://bucket/in",
         "--output", str(tmp_path / "out"), *flags],
        check=False, cwd=ROOT, capture_output=True, text=True, env=full, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("convert: error: ") and message in lines[-1]
    assert "Traceback" not in done.stderr


def test_upload_refuses_a_misspelt_option_before_planning(tmp_path):
    # Upload plans without Beam; an option it does not know is checked against Beam's
    # before anything is listed or uploaded (the bucket here does not even exist).
    (tmp_path / "src" / "cat").mkdir(parents=True)
    done = _cli("beam_jobs.upload", "--source", str(tmp_path / "src"), "--output",
                "s3://no-such-bucket/x/", "--concurency", "3")  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        (
            "upload: error: unknown option --concurency (did you mean --concurrency?); "
            "see --help"
        )
    ]


@pytest.mark.parametrize(
    "module, args, message",
    [
        ("beam_jobs.convert", ["--input", "/tmp"], "--input and --output are required"),
        ("beam_jobs.analyze", [], "--dataset is required"),
        ("beam_jobs.inspect", [], "which dataset?"),
    ],
)
def test_a_missing_required_option_is_one_line(module, args, message):
    done = _cli(module, *args)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    (line,) = [ln for ln in done.stderr.splitlines() if "error" in ln]
    assert message in line


@pytest.mark.parametrize("module", ["beam_jobs.convert", "beam_jobs.analyze",
                                    "beam_jobs.inspect", "beam_jobs.upload"])  # fmt: skip
def test_help_lists_the_output_options(module):
    done = _cli(module, "--help")
    assert done.returncode == 0, done.stderr
    for flag in ("-q, --quiet", "-v, --verbose", "--debug"):
        assert flag in done.stdout


@pytest.mark.parametrize("flag", ["-v", "--verbose", "--debug"])
def test_verbose_shows_the_traceback_behind_a_user_error(tmp_path, flag):
    args = ["--input", str(tmp_path / "missing"), "--output", str(tmp_path / "out")]
    quiet = _cli("beam_jobs.convert", *args)
    assert quiet.returncode == 2
    assert quiet.stderr.strip().splitlines() == [
        f"convert: error: input {tmp_path / 'missing'} is not a directory"
    ]
    loud = _cli("beam_jobs.convert", flag, *args)
    assert loud.returncode == 2
    assert "Traceback" in loud.stderr and "UserError" in loud.stderr
    assert loud.stderr.strip().splitlines()[-1] == quiet.stderr.strip()


def test_a_failed_worker_is_one_line_without_verbose(tmp_path):
    # The shard writer stops at a user's file where a shard goes: Beam logs the worker's
    # traceback, which only -v shows; the job's one line always ends the output.
    write_sample_tree(str(tmp_path / "src"), per_class=3, corrupt=False)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "train-00000-of-00001.tfrecord").write_bytes(b"the user's own")
    args = ["--input", str(tmp_path / "src"), "--output", str(tmp_path / "out"),
            "--num_shards", "1"]  # fmt: skip
    for verbose in (False, True):
        done = _cli("beam_jobs.convert", *args, *(["-v"] if verbose else []))
        assert done.returncode == 1
        lines = done.stderr.strip().splitlines()
        assert lines[-1].startswith("convert: failed: ") and "is not a file of" in lines[-1]
        assert ("Traceback" in done.stderr) is verbose, done.stderr
        if not verbose:
            assert [ln for ln in lines if not ln.startswith("convert: ")] == []
