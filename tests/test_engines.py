"""Every job on real Flink and Spark clusters on 127.0.0.1, submitted through Beam's
job servers, against the local S3 server.

A Flink session cluster (JobManager + TaskManager with 2 slots) and a Spark standalone
cluster (master + worker with 2 cores) are started once per module by
``engines.clusters``, each with Beam's job server in front of it, and stopped at the
end (their logs stay in pytest's temporary folder). Jobs run with the SDK workers in
this process (``LOOPBACK``) and, for convert, in an ``EXTERNAL`` worker pool whose
workers install only what the job staged (``--setup_file``), as on a cluster node.

Convert must write the files DirectRunner writes, byte for byte, with the same
counters; upload, analyze and inspect --verify must give the same, checked results.
"""

from __future__ import annotations

import json

import pytest

from beam_jobs import analyze, convert, inspect
from beam_jobs.common import counters
from devtools.local_s3 import put_tree
from devtools.sample_data import write_sample_tree
from engines import clusters
from s3tfr import s3, storage
from tests.test_analyze import _check_statistics
from tests.test_runners import (
    CONVERT_ARGS,
    PER_CLASS,
    ROOT,
    _objects,
    check_convert,
    check_upload,
    worker_pool,
)
from transforms.listing import METRICS_NAMESPACE as CONVERT_METRICS
from transforms.verify import METRICS_NAMESPACE as VERIFY_METRICS

__all__ = ["worker_pool"]  # a fixture this module uses, imported from test_runners

BUCKET = "engines"


@pytest.fixture(scope="module", params=["flink", "spark"])
def engine(request, tmp_path_factory):
    """A Flink session cluster or a Spark standalone cluster, with Beam's job server, on
    127.0.0.1; one at a time (pytest runs every test of one engine, then the other's)."""
    name = request.param
    with clusters.running(name, workdir=tmp_path_factory.mktemp(name)) as started:
        yield started


@pytest.fixture(scope="module")
def sample(s3_server, tmp_path_factory) -> str:
    """The sample tree on S3: ``s3://engines/images/``."""
    src = str(tmp_path_factory.mktemp("engines-src"))
    write_sample_tree(src, per_class=PER_CLASS)
    s3.client().create_bucket(Bucket=BUCKET)
    put_tree(src, BUCKET, "images/")
    return f"s3://{BUCKET}/images/"


@pytest.fixture(scope="module")
def reference(sample) -> tuple[dict[str, bytes], dict[str, int]]:
    """Convert on DirectRunner in_memory: the files and counters every engine must match."""
    out = f"s3://{BUCKET}/reference/"
    result = convert.run(
        ["--input", sample, "--output", out, "--direct_running_mode=in_memory", *CONVERT_ARGS]
    )
    return _objects(out), counters(result, CONVERT_METRICS)


def _args(engine: clusters.Engine, environment: str, request) -> list[str]:
    if environment == "LOOPBACK":
        return engine.pipeline_args("LOOPBACK")
    pool = request.getfixturevalue("worker_pool")
    return [*engine.pipeline_args("EXTERNAL", pool), f"--setup_file={ROOT}/setup.py"]


def _convert_matches_reference(engine, environment, sample, reference, request) -> None:
    out = f"s3://{BUCKET}/convert-{engine.name}-{environment.lower()}/"
    check_convert(sample, out, reference, _args(engine, environment, request),
                  recomputes=engine.name == "spark")  # fmt: skip


def _analyze_is_right(engine, reference) -> None:
    dataset = f"s3://{BUCKET}/analyze-{engine.name}/"
    for name, data in reference[0].items():
        storage.write_bytes(storage.join(dataset, name), data)
    analyze.run(["--dataset", dataset, "--record_batch_size", "4", *engine.pipeline_args()])
    analysis = json.loads(storage.read_bytes(storage.join(dataset, "analysis.json")))
    _check_statistics(dataset, analysis)


def _verify(engine, reference, damaged: bool) -> dict[str, int]:
    dataset = f"s3://{BUCKET}/verify-{engine.name}-{'damaged' if damaged else 'good'}/"
    for name, data in reference[0].items():
        if damaged and name == "train-00001-of-00003.tfrecord":
            data = data[: len(data) // 2] + bytes([data[len(data) // 2] ^ 1]) + data[
                len(data) // 2 + 1 :
            ]
        storage.write_bytes(storage.join(dataset, name), data)
    result = inspect.run([dataset, "--verify", *engine.pipeline_args()])
    assert inspect.verify_failed(result) == damaged
    return counters(result, VERIFY_METRICS)


ENVIRONMENTS = ["LOOPBACK", "EXTERNAL"]


# Each test runs once per engine: its id ends in [flink] or [spark] (`-k flink`).


@pytest.mark.parametrize("environment", ENVIRONMENTS)
def test_convert_identical_to_direct_runner(engine, environment, sample, reference, request):
    _convert_matches_reference(engine, environment, sample, reference, request)


def test_upload(engine, s3_bucket, tmp_path):
    check_upload(s3_bucket, tmp_path, engine.pipeline_args())


def test_analyze(engine, reference):
    _analyze_is_right(engine, reference)


def test_inspect_verify(engine, reference):
    good = _verify(engine, reference, damaged=False)
    assert (good["shards_passed"], good.get("shards_failed", 0)) == (4, 0)
    damaged = _verify(engine, reference, damaged=True)
    assert (damaged["shards_passed"], damaged["shards_failed"]) == (3, 1)
