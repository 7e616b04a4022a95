"""Convert throughput from 1 to 2 workers on DirectRunner, Dask, Flink and Spark.

    .venv/bin/python bench/scaling.py [--images 4000] [--repeat 1] [--runners ...]

Generates ``--images`` photo-like 500x375 JPEGs (bench/convert.py's generator), then runs
the convert job on local paths, ``--resize crop:224x224``, on the same data:

- DirectRunner ``--direct_running_mode=multi_processing --direct_num_workers=1`` and ``=2``;
- DaskRunner on a ``dask.distributed`` cluster on 127.0.0.1 with 1 and with 2 worker
  processes of one thread each (the cluster is started before the job and not timed, as
  a standing cluster would be);
- FlinkRunner on a Flink session cluster with 1 and with 2 task slots and
  ``--parallelism`` to match, and SparkRunner on a Spark standalone cluster whose one
  worker has 1 and 2 cores, each behind Beam's job server on 127.0.0.1
  (``engines/clusters.py``), with ``--environment_type=LOOPBACK``: the SDK workers run in
  the job's own process, as threads, which is why local paths work. A fresh cluster and
  job server are started before each job and not timed, like the Dask cluster; the job
  is the first the cluster runs, and what the job server does for every job (staging,
  translation, on Spark a new context and executor) is in its time.

DirectRunner and Dask run twice: on all cores, and confined to as many cores as they have
workers (CPU affinity of the job and of the Dask cluster, which their processes inherit).
A convert worker decodes on every core it may use, so one unconfined worker can already
keep the machine busy; the confined runs show how the runner spreads work when each
worker adds a core, as on a cluster. Flink and Spark run on all cores only: with
LOOPBACK every slot's bundles run in the one job process whatever the parallelism, and
confining would put that process, the TaskManager (or Spark's worker and executor), the
master and the job server on one core, where on a cluster the master and the job server
have hosts of their own.

Each job runs in its own process (bench/convert.py's ``run_job``) and is timed from start
to exit, fixed costs included. With ``--repeat`` > 1 every configuration runs that many
times, interleaved, and the best time counts. Prints one table and the 1 -> 2 ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.convert import photo_tree, run_job
from engines import clusters

RESIZE = "crop:224x224"
TARGET = 1.7


@contextlib.contextmanager
def confined(cores: int | None):
    """This process (and what it starts meanwhile) on its first ``cores`` cores."""
    allowed = os.sched_getaffinity(0)
    if cores:
        os.sched_setaffinity(0, sorted(allowed)[:cores])
    try:
        yield
    finally:
        os.sched_setaffinity(0, allowed)


def direct_args(workers: int) -> list[str]:
    return ["--direct_running_mode=multi_processing", f"--direct_num_workers={workers}"]


def run_dask(args: list[str], workers: int) -> float:
    """The job on a fresh local cluster of ``workers`` one-thread processes; seconds."""
    import dask
    import distributed

    from runners.dask import WORKER_CONFIG

    with (
        dask.config.set(WORKER_CONFIG),
        distributed.LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
        ) as cluster,
    ):
        seconds, _ = run_job(
            [
                *args,
                "--runner=DaskRunner",
                f"--dask_client_address={cluster.scheduler_address}",
            ]
        )
    return seconds


def run_engine(args: list[str], engine: str, workers: int) -> tuple[float, float]:
    """The job on a fresh ``engine`` cluster (``flink`` or ``spark``) of ``workers``
    slots or cores, its SDK workers in the job's process.

    Returns:
        (seconds the job took, seconds the cluster and job server took to start).
    """
    start = time.perf_counter()
    with clusters.running(engine, slots=workers) as cluster:
        started = time.perf_counter() - start
        extra = [f"--parallelism={workers}"] if engine == "flink" else []
        seconds, _ = run_job([*args, *cluster.pipeline_args("LOOPBACK"), *extra])
    return seconds, started


RUNNERS = ("DirectRunner multi_processing", "DaskRunner", "FlinkRunner", "SparkRunner")
ENGINES = {"FlinkRunner": "flink", "SparkRunner": "spark"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--images", type=int, default=4000, help="images converted per run"
    )
    parser.add_argument(
        "--repeat", type=int, default=1, help="runs per configuration (best)"
    )
    parser.add_argument(
        "--runners", nargs="+", default=RUNNERS, choices=RUNNERS, metavar="RUNNER",
        help=f"runners to measure, of: {', '.join(repr(r) for r in RUNNERS)}",
    )  # fmt: skip
    parser.add_argument(
        "--cores", nargs="+", default=("all", "confined"), choices=("all", "confined"),
        help="all cores, one core per worker (DirectRunner and Dask only), or both",
    )  # fmt: skip
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    runners = [runner for runner in RUNNERS if runner in args.runners]
    confines = [confine for confine in (False, True)
                if ("confined" if confine else "all") in args.cores]  # fmt: skip
    configs = [(runner, workers, confine) for confine in confines for runner in runners
               for workers in (1, 2) if not (confine and runner in ENGINES)]  # fmt: skip
    if len(os.sched_getaffinity(0)) < 2:
        sys.exit("needs at least 2 usable cores")
    best: dict[tuple[str, int, bool], float] = {}
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "src")
        source_bytes = photo_tree(
            src, args.images, seed=0, processes=os.cpu_count() or 1
        )
        print(
            f"generated {args.images} 500x375 JPEGs ({source_bytes / 1e6:.0f} MB)",
            file=sys.stderr,
        )
        for _ in range(args.repeat):
            for runner, workers, confine in configs:
                out = os.path.join(tmp, "out")
                job = ["--input", src, "--output", out, "--resize", RESIZE]
                note = ""
                with confined(workers if confine else None):
                    if runner == "DaskRunner":
                        seconds = run_dask(job, workers)
                    elif runner in ENGINES:
                        seconds, started = run_engine(job, ENGINES[runner], workers)
                        note = f" (cluster and job server started in {started:.0f} s)"
                    else:
                        seconds, _ = run_job([*job, *direct_args(workers)])
                shutil.rmtree(out)
                print(f"{runner}, {workers} workers, {_cores(workers, confine)}: "
                      f"{seconds:.1f} s{note}", file=sys.stderr)  # fmt: skip
                key = (runner, workers, confine)
                best[key] = min(best.get(key, seconds), seconds)

    print(f"\nconvert scaling: {args.images} photo-like 500x375 JPEGs, local paths, "
          f"--resize {RESIZE}, {os.cpu_count()} cores, load average {load:.1f} at start"
          + (f", best of {args.repeat}" if args.repeat > 1 else ""))  # fmt: skip
    print("| runner | workers | cores | seconds | images/s |")
    print("|---|---:|---|---:|---:|")
    for (runner, workers, confine), seconds in best.items():
        print(f"| {runner} | {workers} | {_cores(workers, confine)} | {seconds:.1f} | "
              f"{args.images / seconds:.0f} |")  # fmt: skip
    print("\n| runner | cores | 1 -> 2 workers | target |")
    print("|---|---|---:|---:|")
    for confine in confines:
        for runner in runners:
            if (runner, 1, confine) not in best:
                continue
            ratio = best[(runner, 1, confine)] / best[(runner, 2, confine)]
            print(
                f"| {runner} | {_cores(None, confine)} | {ratio:.2f}x | >= {TARGET}x |"
            )


def _cores(workers: int | None, confine: bool) -> str:
    if not confine:
        return "all"
    return "one per worker" if workers is None else f"{workers} (one per worker)"


if __name__ == "__main__":
    main()
