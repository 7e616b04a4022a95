"""The jobs on every runner they support here, against the local S3 server: DirectRunner
(in_memory, multi_processing), PortableRunner through the embedded job service (LOOPBACK,
and EXTERNAL against a worker pool whose workers install only what the job staged with
``--setup_file``), and DaskRunner on a scheduler and two worker processes on 127.0.0.1.

Convert must write byte-identical files with identical counters on each; upload and
analyze must give the same, checked results. The worker pool and the Dask cluster are
started once per module and always stopped with their whole process groups.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from beam_jobs import analyze, convert, upload
from beam_jobs.common import counters, pipeline_options
from devtools.local_s3 import free_port, put_tree
from devtools.sample_data import write_sample_tree
from s3tfr import s3, storage
from s3tfr.contract import MANIFEST
from s3tfr.host import usable_cpus
from tests.test_analyze import _check_statistics
from transforms.listing import METRICS_NAMESPACE as CONVERT_METRICS
from transforms.upload_files import METRICS_NAMESPACE as UPLOAD_METRICS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PER_CLASS = 6  # 3 classes: 18 images plus one truncated JPEG
CONVERT_ARGS = ["--resize", "crop:48x48", "--num_shards", "3", "--validation_fraction", "0.2"]  # fmt: skip
START_TIMEOUT_S = 120


def _start(cmd: list[str], env: dict, cwd: str, log: str) -> subprocess.Popen:
    """Starts ``cmd`` in its own process group (its children die with it)."""
    with open(log, "wb") as out:
        return subprocess.Popen(
            cmd,
            env=env,
            cwd=cwd,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _stop(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    # Workers that a pool or nanny started and that outlived the group leader.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def _wait_for_port(port: int, proc: subprocess.Popen, log: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(
                f"{proc.args[:3]} exited {proc.returncode}:\n{Path(log).read_text()[-3000:]}"
            )
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    pytest.fail(
        f"{proc.args[:3]} did not listen on {port}:\n{Path(log).read_text()[-3000:]}"
    )


def _worker_env() -> dict:
    """The test's environment (the local server's AWS_* chain) with the venv's python
    first on PATH, as workers on a cluster node would have it."""
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    return env


@pytest.fixture(scope="module")
def worker_pool(s3_server, tmp_path_factory):
    """An EXTERNAL worker pool on 127.0.0.1 whose workers boot like the SDK container:
    they install the staged ``--setup_file`` package and nothing else of the project."""
    tmp = tmp_path_factory.mktemp("worker-pool")
    boot = tmp / "boot.sh"
    boot.write_text(
        f'#!/bin/sh\nexec "{sys.executable}" "{ROOT}/tests/sdk_boot.py" "$@"\n'
    )
    boot.chmod(0o755)
    env = _worker_env()
    env.pop("PYTHONPATH", None)
    port = free_port()
    log = str(tmp / "pool.log")
    cmd = [sys.executable, "-m", "apache_beam.runners.worker.worker_pool_main",
           f"--service_port={port}", f"--container_executable={boot}"]  # fmt: skip
    proc = _start(cmd, env, str(tmp), log)
    try:
        _wait_for_port(port, proc, log)
        yield f"127.0.0.1:{port}"
    finally:
        _stop(proc)


@pytest.fixture(scope="module")
def dask_cluster(s3_server, tmp_path_factory):
    """A dask.distributed scheduler and two one-thread worker processes on 127.0.0.1."""
    import distributed

    tmp = tmp_path_factory.mktemp("dask")
    env = _worker_env()
    # The worker set-up docs/RUNNING_ON_CLUSTERS.md recommends (no malloc trimming, the
    # jobs' modules preloaded).
    (tmp / "config").mkdir()
    (tmp / "config" / "distributed.yaml").write_text(
        "distributed:\n  nanny:\n    pre-spawn-environ:\n      MALLOC_TRIM_THRESHOLD_: null\n"
    )
    env["DASK_CONFIG"] = str(tmp / "config")
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    procs = [
        _start([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                "--port", str(port), "--no-dashboard"], env, str(tmp), str(tmp / "scheduler.log"))
    ]  # fmt: skip
    try:
        _wait_for_port(port, procs[0], str(tmp / "scheduler.log"))
        procs.append(
            _start([sys.executable, "-m", "distributed.cli.dask_worker", address,
                    "--nworkers", "2", "--nthreads", "1", "--host", "127.0.0.1",
                    "--no-dashboard", "--local-directory", str(tmp),
                    "--preload", "runners.dask"],
                   env, str(tmp), str(tmp / "workers.log"))
        )  # fmt: skip
        with distributed.Client(address, timeout=START_TIMEOUT_S) as client:
            client.wait_for_workers(2, timeout=START_TIMEOUT_S)
            trim = client.run(lambda: os.environ.get("MALLOC_TRIM_THRESHOLD_"))
            assert list(trim.values()) == [None, None], trim
            # The preload imported the shard writer before any task arrived.
            loaded = client.run(lambda: "transforms.tfrecords" in sys.modules)
            assert list(loaded.values()) == [True, True], loaded
        yield address
    finally:
        for proc in reversed(procs):
            _stop(proc)


RUNNERS = ["direct_multi_processing", "portable_loopback", "portable_external", "dask"]
# The convert job's default on DirectRunner: one worker thread per core.
CONVERT_RUNNERS = [*RUNNERS, "direct_default"]


@pytest.fixture
def runner_args(request) -> list[str]:
    """The pipeline options that select the runner named by the test's parameter."""
    name = request.param
    if name == "direct_default":
        return []
    if name == "direct_multi_processing":
        return ["--direct_running_mode=multi_processing", "--direct_num_workers=2"]
    if name == "portable_loopback":
        return [
            "--runner=PortableRunner",
            "--job_endpoint=embed",
            "--environment_type=LOOPBACK",
        ]
    if name == "portable_external":
        pool = request.getfixturevalue("worker_pool")
        return ["--runner=PortableRunner", "--job_endpoint=embed", "--environment_type=EXTERNAL",
                f"--environment_config={pool}", f"--setup_file={ROOT}/setup.py"]  # fmt: skip
    if name == "dask":
        return ["--runner=DaskRunner",
                f"--dask_client_address={request.getfixturevalue('dask_cluster')}"]  # fmt: skip
    raise ValueError(name)


def _objects(prefix: str) -> dict[str, bytes]:
    """Every object under ``prefix``, recursively, by relative name."""
    return {
        name: storage.read_bytes(storage.join(prefix, name))
        for name, _ in storage.walk(prefix)
    }


@pytest.fixture(scope="module")
def sample(s3_server, tmp_path_factory) -> str:
    """The sample tree on S3: ``s3://runners/images/``."""
    src = str(tmp_path_factory.mktemp("runners-src"))
    write_sample_tree(src, per_class=PER_CLASS)
    s3.client().create_bucket(Bucket="runners")
    put_tree(src, "runners", "images/")
    return "s3://runners/images/"


@pytest.fixture(scope="module")
def reference(sample) -> tuple[dict[str, bytes], dict[str, int]]:
    """Convert on DirectRunner in_memory: the files and counters every runner must match."""
    out = "s3://runners/reference/"
    result = convert.run(
        ["--input", sample, "--output", out, "--direct_running_mode=in_memory", *CONVERT_ARGS]
    )
    return _objects(out), counters(result, CONVERT_METRICS)


# ---------------------------------------------------------------- convert


@pytest.mark.parametrize(
    "argv",
    [["--runner=DaskRunner"], ["--runner", "DaskRunner"],
     ["--runner=apache_beam.runners.dask.dask_runner.DaskRunner"]],
)  # fmt: skip
def test_dask_runner_names_resolve_to_the_fixed_runner(argv):
    from apache_beam.options.pipeline_options import StandardOptions

    runner = pipeline_options(argv).view_as(StandardOptions).runner
    assert runner == "runners.dask.DaskRunner"


@pytest.mark.parametrize(
    ("argv", "mode", "workers"),
    [([], "multi_threading", usable_cpus()),
     (["--direct_num_workers=3"], "multi_threading", 3),
     (["--direct_running_mode=in_memory"], "in_memory", 1),
     (["--direct_running_mode=multi_processing"], "multi_processing", 1)],
)  # fmt: skip
def test_local_threads_only_when_no_running_mode_is_chosen(argv, mode, workers):
    from apache_beam.options.pipeline_options import DirectOptions

    direct = pipeline_options(argv, local_threads=True).view_as(DirectOptions)
    assert (direct.direct_running_mode, direct.direct_num_workers) == (mode, workers)
    assert pipeline_options(argv).view_as(DirectOptions).direct_running_mode == (
        "in_memory" if mode == "multi_threading" else mode
    )
    dask = pipeline_options(["--runner=DaskRunner", *argv], local_threads=True)
    assert dask.view_as(DirectOptions).direct_running_mode == (
        "in_memory" if mode == "multi_threading" else mode
    )


@pytest.mark.skipif(
    not hasattr(os, "sched_setaffinity") or usable_cpus() < 2, reason="needs 2 CPUs"
)
def test_local_threads_follow_the_cpu_affinity():
    # A container or cluster worker confined to one core gets one worker thread (and one
    # decoder), not one per core of the machine.
    code = (
        "import os; os.sched_setaffinity(0, [sorted(os.sched_getaffinity(0))[0]]);"
        "from apache_beam.options.pipeline_options import DirectOptions;"
        "from beam_jobs.common import pipeline_options;"
        "from transforms import tfrecords;"
        "o = pipeline_options([], local_threads=True).view_as(DirectOptions);"
        "print(o.direct_num_workers, tfrecords._DECODE_SLOTS._initial_value)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    ).stdout  # fmt: skip
    assert out.split() == ["1", "1"]


def test_convert_reference_on_direct_in_memory(reference):
    files, counts = reference
    info = json.loads(files[MANIFEST])
    assert info["counts"]["listed"] == 3 * PER_CLASS + 1
    assert info["counts"]["rejected_by_code"] == {"truncated": 1}
    assert sorted(n for n in files if n.endswith(".tfrecord")) == [
        "train-00000-of-00003.tfrecord", "train-00001-of-00003.tfrecord",
        "train-00002-of-00003.tfrecord", "validation-00000-of-00001.tfrecord",
    ]  # fmt: skip
    assert counts["listed"] == 3 * PER_CLASS + 1
    assert counts["converted"] == 3 * PER_CLASS
    assert counts["rejected_truncated"] == 1
    assert counts["shards_written"] == 4
    assert counts["bytes_written"] == sum(
        s["bytes"] for split in info["splits"].values() for s in split["shards"]
    )


def check_convert(
    sample: str, out: str, reference, runner_args: list[str], recomputes: bool = False
) -> None:
    """Converts ``sample`` to ``out`` with ``runner_args``: every file byte-identical to
    the DirectRunner reference's (the manifest's counts included), the same counters.

    With ``recomputes`` (Spark), a counter may be a whole multiple of the reference's:
    Spark may compute a stage's output again for a second consumer, and Beam reports
    Spark's metrics as attempted, recomputations included. The files still must match.
    """
    result = convert.run(["--input", sample, "--output", out, *CONVERT_ARGS, *runner_args])
    files, counts = reference
    got = _objects(out)
    assert sorted(got) == sorted(files)
    for name, data in files.items():
        assert got[name] == data, f"{name} differs from DirectRunner in_memory's"
    measured = counters(result, CONVERT_METRICS)
    if not recomputes:
        assert measured == counts
        return
    assert sorted(measured) == sorted(counts)
    for name, value in counts.items():
        assert value and measured[name] % value == 0 and measured[name] >= value, name


@pytest.mark.parametrize("runner_args", CONVERT_RUNNERS, indirect=True)
def test_convert_identical_on_every_runner(sample, reference, runner_args, request):
    check_convert(sample, f"s3://runners/convert-{request.node.callspec.id}/", reference,
                  runner_args)  # fmt: skip


# ---------------------------------------------------------------- upload


def check_upload(s3_bucket: str, tmp_path, runner_args: list[str]) -> None:
    """Uploads a tree (one file already there unchanged, one stale, one multipart) with
    ``runner_args`` and checks counters, report and every object's bytes."""
    src = tmp_path / "src"
    write_sample_tree(str(src), per_class=3, corrupt=False)
    (src / "cat" / "big.bin").write_bytes(os.urandom(int(1.5 * 2**20)))  # multipart
    prefix = "images/"
    already = "bird/bird_0000.jpg"
    s3.put_bytes(s3_bucket, prefix + already, (src / already).read_bytes())
    s3.put_bytes(s3_bucket, prefix + "dog/dog_0001.jpg", b"stale bytes of another size")
    local = {
        path.relative_to(src).as_posix(): path.read_bytes()
        for path in src.rglob("*")
        if path.is_file()
    }
    report = tmp_path / "report.json"
    result = upload.run([f"--source={src}", f"--output=s3://{s3_bucket}/{prefix}",
                         "--multipart_threshold_mb=1", f"--report={report}", *runner_args])  # fmt: skip
    sent = {k: v for k, v in local.items() if k != already}
    assert counters(result, UPLOAD_METRICS) == {
        "bytes_uploaded": sum(len(v) for v in sent.values()),
        "files_uploaded": len(sent),
    }
    assert json.loads(report.read_text())["counts"] == {"unchanged": 1, "uploaded": len(sent)}
    assert _objects(f"s3://{s3_bucket}/{prefix}") == local


@pytest.mark.parametrize("runner_args", RUNNERS[:1] + RUNNERS[2:], indirect=True)
def test_upload_on_runner(s3_bucket, tmp_path, runner_args):
    check_upload(s3_bucket, tmp_path, runner_args)


# ---------------------------------------------------------------- analyze


@pytest.mark.parametrize("runner_args", RUNNERS[:1] + RUNNERS[2:], indirect=True)
def test_analyze_on_runner(reference, runner_args, request):
    dataset = f"s3://runners/analyze-{request.node.callspec.id}/"
    for name, data in reference[0].items():
        storage.write_bytes(storage.join(dataset, name), data)
    analyze.run(["--dataset", dataset, "--record_batch_size", "4", *runner_args])
    analysis = json.loads(storage.read_bytes(storage.join(dataset, "analysis.json")))
    _check_statistics(dataset, analysis)
