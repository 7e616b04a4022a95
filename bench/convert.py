"""Convert job throughput and memory, against baselines measured in the same run.

    .venv/bin/python bench/convert.py [--images 2000] [--workers 2] [--latency_ms 50]

Generates ``--images`` photo-like 500x375 JPEGs, then measures, on the same data:

- compute limit: one process looping decode/resize/encode (the job's own image function)
  over in-memory bytes, times the worker count;
- the job on local paths (DirectRunner multi_processing, ``--workers`` workers);
- the job on the local S3 server behind the project's proxy with ``--latency_ms`` per
  request, as real S3 answers;
- a naive baseline on the same proxied S3: list, one GET per image, PIL decode/resize/
  encode, one TFRecord written with tf.io.TFRecordWriter, multiprocessing.Pool;
- peak RSS of the job's whole process tree at N and 4N images (local paths).

Prints one table. Ratios are what matter: absolute rates depend on the machine.
"""

from __future__ import annotations

import argparse
import io
import multiprocessing
import os
import subprocess
import sys
import tempfile
import threading
import time

import psutil

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from beam_jobs import local_s3
from beam_jobs.s3proxy import S3Proxy
from beam_jobs.sample_data import write_photo_tree
from transforms import s3, storage
from transforms.images import parse_resize
from transforms.tfrecords import ConvertSettings

BUCKET = "bench-convert"


def compute_limit(root: str, settings: ConvertSettings) -> tuple[int, float]:
    blobs = [storage.read_bytes(storage.join(root, name)) for name, _ in storage.walk(root)]
    start = time.perf_counter()
    for data in blobs:
        settings.convert(data)
    return len(blobs), time.perf_counter() - start


def run_job(
    args: list[str], env: dict | None = None, module: str = "beam_jobs.convert"
) -> tuple[float, int]:
    """Runs a job (the convert job by default) in a subprocess; returns (seconds, peak RSS
    of its tree)."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", module, *args],
        env={**os.environ, **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    stderr = []
    reader = threading.Thread(target=lambda: stderr.append(proc.stderr.read()), daemon=True)
    reader.start()
    peak = 0
    parent = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            tree = [parent, *parent.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.1)
    elapsed = time.perf_counter() - start
    reader.join()
    if proc.returncode:
        sys.exit(f"{module} failed:\n{stderr[0].decode()[-3000:]}")
    return elapsed, peak


_naive = {}


def _naive_init(endpoint: str, bucket: str, size: tuple[int, int]) -> None:
    import boto3

    _naive.update(client=boto3.client("s3", endpoint_url=endpoint), bucket=bucket, size=size)


def _naive_one(item: tuple[str, int]) -> bytes:
    import tensorflow as tf
    from PIL import Image

    key, label = item
    body = _naive["client"].get_object(Bucket=_naive["bucket"], Key=key)["Body"].read()
    image = Image.open(io.BytesIO(body)).convert("RGB").resize(_naive["size"])
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=90)

    def _bytes(v):
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[v]))

    feature = {
        "image/encoded": _bytes(out.getvalue()),
        "image/filename": _bytes(key.encode()),
        "image/class/label": tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def naive_baseline(endpoint: str, prefix: str, workers: int, size, out_path: str) -> float:
    """The script people write first; returns seconds for the whole dataset."""
    import boto3
    import tensorflow as tf

    start = time.perf_counter()
    client = boto3.client("s3", endpoint_url=endpoint)
    keys = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        keys += [o["Key"] for o in page.get("Contents", [])]
    classes = sorted({k[len(prefix) :].split("/")[0] for k in keys})
    items = [(k, classes.index(k[len(prefix) :].split("/")[0])) for k in keys]
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers, _naive_init, (endpoint, BUCKET, size)) as pool:
        with tf.io.TFRecordWriter(out_path) as writer:
            for record in pool.imap(_naive_one, items, chunksize=8):
                writer.write(record)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000, help="N (memory also at 4N)")
    parser.add_argument("--workers", type=int, default=2, help="job and baseline workers")
    parser.add_argument("--latency_ms", type=float, default=50, help="proxy latency per request")
    parser.add_argument("--resize", default="crop:224x224", help="resize for every variant")
    parser.add_argument("--skip_memory", action="store_true", help="skip the 4N memory run")
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    resize = parse_resize(args.resize)
    settings = ConvertSettings(resize=resize)
    n = args.images
    workers = ["--direct_running_mode=multi_processing", f"--direct_num_workers={args.workers}"]
    rows = []

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "src")
        source_bytes = write_photo_tree(src, n)
        print(f"generated {n} 500x375 JPEGs ({source_bytes / 1e6:.0f} MB)", file=sys.stderr)

        count, seconds = compute_limit(src, settings)
        limit = count / seconds * args.workers
        rows.append(("compute limit (1 process x workers)", count, seconds, limit))

        common = ["--resize", args.resize, "--validation_fraction", "0.1", *workers]
        seconds, rss_n = run_job(["--input", src, "--output", os.path.join(tmp, "out1"), *common])
        job_local = n / seconds
        rows.append((f"job, local paths, {args.workers} workers", n, seconds, job_local))

        with local_s3.running() as server:
            s3.client().create_bucket(Bucket=BUCKET)
            local_s3.put_tree(src, BUCKET, "images/")
            with S3Proxy(server.endpoint, args.latency_ms / 1000) as proxy:
                seconds, _ = run_job(
                    ["--input", f"s3://{BUCKET}/images/", "--output", f"s3://{BUCKET}/out/",
                     f"--s3_endpoint_url={proxy.endpoint}", *common],  # fmt: skip
                    env=local_s3.environment(server.endpoint),
                )
                job_s3 = n / seconds
                rows.append((f"job, S3 +{args.latency_ms:.0f} ms, {args.workers} workers", n,
                             seconds, job_s3))  # fmt: skip
                seconds = naive_baseline(
                    proxy.endpoint, "images/", args.workers, (resize.width, resize.height),
                    os.path.join(tmp, "naive.tfrecord"),
                )  # fmt: skip
                naive = n / seconds
                rows.append((f"naive Pool baseline, S3 +{args.latency_ms:.0f} ms", n, seconds,
                             naive))  # fmt: skip

        rss_4n = None
        if not args.skip_memory:
            write_photo_tree(os.path.join(tmp, "src4"), 4 * n, seed=1)
            seconds, rss_4n = run_job(
                ["--input", os.path.join(tmp, "src4"), "--output", os.path.join(tmp, "out4"),
                 *common]  # fmt: skip
            )
            job_local_4n = 4 * n / seconds
            rows.append((f"job, local paths, {args.workers} workers, 4N", 4 * n, seconds,
                         job_local_4n))  # fmt: skip

    print(f"\nconvert benchmark: {n} photo-like 500x375 JPEGs, --resize {args.resize}, "
          f"{args.workers} workers, {os.cpu_count()} cores")  # fmt: skip
    print("| variant | images | seconds | images/s |")
    print("|---|---:|---:|---:|")
    for name, count, secs, rate in rows:
        print(f"| {name} | {count} | {secs:.1f} | {rate:.0f} |")
    print("\n| ratio | measured | target |")
    print("|---|---:|---:|")
    print(f"| job local / compute limit, N={n} | {job_local / limit:.2f} | >= 0.70 |")
    if rss_4n:
        print(f"| job local / compute limit, 4N={4 * n} | {job_local_4n / limit:.2f} | >= 0.70 |")
    print(f"| job S3 / naive baseline (both S3 +{args.latency_ms:.0f} ms) | "
          f"{job_s3 / naive:.1f}x | >= 5x |")  # fmt: skip
    print(f"| peak RSS, job tree, N={n} | {rss_n / 2**20:.0f} MB | |")
    if rss_4n:
        print(f"| peak RSS, job tree, 4N={4 * n} | {rss_4n / 2**20:.0f} MB "
              f"({rss_4n / rss_n:.2f}x of N) | flat |")  # fmt: skip


if __name__ == "__main__":
    main()
