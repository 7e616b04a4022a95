"""Upload benchmark: the upload job vs ``aws s3 cp --recursive`` vs a serial boto3 loop,
and the server's saturated PUT rate, in one run on one generated tree.

Every client talks to the same local S3 server (moto, its own process) through the
project's proxy adding 50 ms per request, as real S3 does, so concurrency matters
(bench/servers.py).
Prints one table with ratios, and the CPU seconds each run cost the client, the server
and the proxy: on a small machine they share the cores, so a client's own CPU slows
the server it waits for. Also prints a bound on what any Beam job could show here: the
fastest client through the proxy (the saturated loop, no Beam) plus importing Beam in a
fresh interpreter (bench/startup.py).

    .venv/bin/python bench/upload.py [--small 2000] [--large 3] [--large_mb 20]

awscli v1 pins botocore exactly, so it is installed (once) into its own virtual
environment under ~/.cache/s3tfr-bench, never into the project's.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import resource
import subprocess
import sys
import time
from typing import Self

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

from beam_jobs.upload import DEFAULT_CONCURRENCY
from bench.servers import proxied_s3
from bench.startup import beam_import_seconds
from devtools import sample_data
from s3tfr import s3
from s3tfr.s3 import S3Config

CACHE = os.path.expanduser("~/.cache/s3tfr-bench")
AWSCLI_VENV = os.path.join(CACHE, "awscli-venv")
LATENCY_MS = 50
# The saturated rate is the best of these thread counts: a strong baseline whichever
# count suits the machine.
SATURATION_THREADS = (64, 128)
# awscli's default multipart threshold; the job is given the same for a fair comparison.
MULTIPART_MB = 8


def _awscli() -> str:
    aws = os.path.join(AWSCLI_VENV, "bin", "aws")
    if not os.path.exists(aws):
        print("installing awscli into", AWSCLI_VENV, file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", AWSCLI_VENV], check=True)
        pip = os.path.join(AWSCLI_VENV, "bin", "pip")
        subprocess.run([pip, "install", "--quiet", "awscli"], check=True)
    return aws


def _tree(root: str, small: int, large: int, large_mb: int) -> tuple[list[str], int]:
    marker = os.path.join(root, f".complete-{small}-{large}-{large_mb}")
    if not os.path.exists(marker):
        subprocess.run(["rm", "-rf", root], check=True)
        sample_data.write_photo_tree(root, small, classes=8, size=(320, 240))
        rng = np.random.default_rng(1)
        os.makedirs(os.path.join(root, "large"), exist_ok=True)
        for i in range(large):
            with open(os.path.join(root, "large", f"big_{i}.bin"), "wb") as f:
                f.write(rng.bytes(large_mb * 1024 * 1024))
        open(marker, "w").close()
    files = []
    for dirpath, _dirs, names in os.walk(root):
        files += [os.path.join(dirpath, n) for n in names if not n.startswith(".")]
    files.sort()
    return files, sum(os.path.getsize(f) for f in files)


def _cpu_seconds(pid: int) -> float:
    """User + system CPU of a running process (Linux ``/proc``)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class _Meter:
    """Wall time and CPU seconds of one run: the client (this process's threads, or
    the commands it waited for), the server and the proxy."""

    def __init__(self, server: subprocess.Popen, proxy: subprocess.Popen) -> None:
        self._pids = (server.pid, proxy.pid)

    def __enter__(self) -> Self:
        self._start = (
            time.monotonic(),
            time.process_time() + _children_cpu(),
            *map(_cpu_seconds, self._pids),
        )
        return self

    def __exit__(self, *_exc) -> None:
        end = (
            time.monotonic(),
            time.process_time() + _children_cpu(),
            *map(_cpu_seconds, self._pids),
        )
        self.seconds, *self.cpu = (b - a for a, b in zip(self._start, end))


def _put_all(files, root, bucket, prefix, config, threads) -> None:
    def put(path):
        with open(path, "rb") as f:
            data = f.read()
        key = prefix + os.path.relpath(path, root)
        s3.client(config).put_object(Bucket=bucket, Key=key, Body=data)

    if threads == 1:
        for path in files:
            put(path)
    else:
        with concurrent.futures.ThreadPoolExecutor(threads) as pool:
            list(pool.map(put, files))


def _run(cmd: list[str]) -> None:
    """Runs a command in this process's environment (``proxied_s3`` exports the server's)."""
    result = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(
            f"failed ({result.returncode}): {' '.join(cmd)}\n{result.stderr[-2000:]}"
        )


def _count(bucket: str, prefix: str, config: S3Config) -> int:
    return sum(1 for _ in s3.iter_objects(bucket, prefix, config))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--small", type=int, default=2000, help="small JPEGs in the tree"
    )
    parser.add_argument("--large", type=int, default=3, help="large files in the tree")
    parser.add_argument(
        "--large_mb", type=int, default=20, help="size of each large file"
    )
    args = parser.parse_args()

    aws = _awscli()
    root = os.path.join(CACHE, "tree")
    files, total_bytes = _tree(root, args.small, args.large, args.large_mb)
    with proxied_s3(LATENCY_MS, "bench") as servers:
        server, proxy, proxy_url = servers.server, servers.proxy, servers.proxy_endpoint
        direct = S3Config(max_pool_connections=128)
        via_proxy = S3Config(s3_endpoint_url=proxy_url, max_pool_connections=128)
        n = len(files)
        rows: dict[str, _Meter] = {}

        def measured(name: str, work, *work_args) -> _Meter:
            with _Meter(server, proxy) as meter:
                work(*work_args)
            rows[name] = meter
            return meter

        runs = {}
        for threads in SATURATION_THREADS:
            with _Meter(server, proxy) as runs[threads]:
                _put_all(files, root, "bench", f"saturated-{threads}/", direct, threads)
        threads = min(runs, key=lambda t: runs[t].seconds)
        saturated = runs[threads]
        rows[f"server saturated PUT rate (direct, {threads} threads)"] = saturated
        proxied = measured(
            "saturated PUT rate through the 50 ms proxy (128 threads)",
            _put_all, files, root, "bench", "saturated-proxy/", via_proxy, 128,
        )  # fmt: skip
        job = [
            sys.executable, "-m", "beam_jobs.upload", f"--source={root}", "--exclude=.*",
            "--output=s3://bench/job/", f"--s3_endpoint_url={proxy_url}",
            f"--multipart_threshold_mb={MULTIPART_MB}",
            f"--report={os.path.join(CACHE, 'report.json')}",
        ]  # fmt: skip
        job_run = measured(
            f"upload job (DirectRunner, {DEFAULT_CONCURRENCY} in flight)",
            _run,
            job,
        )
        rerun = measured("upload job, no-op rerun", _run, job)
        aws_cmd = [
            aws, "s3", "cp", "--recursive", "--quiet", "--exclude", ".*", root,
            "s3://bench/awscli/", "--endpoint-url", proxy_url,
        ]  # fmt: skip
        aws_run = measured("aws s3 cp --recursive (awscli defaults)", _run, aws_cmd)
        serial = measured(
            "serial boto3 put_object loop",
            _put_all, files, root, "bench", "serial/", via_proxy, 1,
        )  # fmt: skip
        prefixes = [f"saturated-{threads}/" for threads in SATURATION_THREADS]
        for prefix in (*prefixes, "saturated-proxy/", "job/", "awscli/", "serial/"):
            got = _count("bench", prefix, direct)
            if got != n:
                sys.exit(f"{prefix}: {got} objects, expected {n}")

    # A pipeline's first PUT waits for Beam's import, and boto3 through the proxy has not
    # gone faster than the saturated loop (no Beam, 128 threads, nothing else running).
    beam_import = beam_import_seconds()
    bound = beam_import + proxied.seconds
    job_time = job_run.seconds
    print(
        f"\n{n:,} files ({args.small:,} JPEGs of ~{(total_bytes - args.large * args.large_mb * 2**20) / max(args.small, 1) / 1024:.0f} KiB"
        f" + {args.large} x {args.large_mb} MiB), {total_bytes / 1e6:,.1f} MB; "
        f"proxy latency {LATENCY_MS} ms; {os.cpu_count()} CPUs\n"
    )
    print(
        f"| {'client':<58} | {'seconds':>8} | {'files/s':>8} | {'MB/s':>6} | vs job "
        "| CPU s: client / server / proxy |"
    )
    print(f"|{'-' * 60}|{'-' * 9}:|{'-' * 9}:|{'-' * 7}:|-------:|{'-' * 31}:|")
    for name, meter in rows.items():
        seconds = meter.seconds
        files_per_s = n / seconds if "rerun" not in name else float("nan")
        mb_s = total_bytes / 1e6 / seconds if "rerun" not in name else float("nan")
        cpu = " / ".join(f"{c:.1f}" for c in meter.cpu)
        print(
            f"| {name:<58} | {seconds:8.1f} | {files_per_s:8.0f} | {mb_s:6.1f} | "
            f"{seconds / job_time:5.2f}x | {cpu:>30} |"
        )
    print(
        f"\njob rate / saturated rate: {saturated.seconds / job_time:.1%} "
        "(target >= 80%)\n"
        f"job speed-up over awscli: {aws_run.seconds / job_time:.2f}x (target >= 1.5x)\n"
        f"job speed-up over serial loop: {serial.seconds / job_time:.1f}x "
        "(target >= 10x)\n"
        f"no-op rerun / first upload: {rerun.seconds / job_time:.1%} (target <= 10%)"
    )
    print(
        f"\nbound for any Beam job here: importing Beam ({beam_import:.1f} s) + the "
        f"saturated loop through the proxy ({proxied.seconds:.1f} s) = {bound:.1f} s, "
        f"so at most {saturated.seconds / bound:.1%} of the saturated rate and "
        f"{aws_run.seconds / bound:.2f}x awscli"
    )


if __name__ == "__main__":
    main()
