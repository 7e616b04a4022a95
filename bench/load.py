"""The convert job under load: many small images through the S3 proxy, with bounded
memory and bounded connections.

    .venv/bin/python bench/load.py [--images 20000] [--small 2000] [--latency_ms 50]

Generates ``--images`` small photo-like JPEGs (64x48, ~2 KB) in 10 class folders, puts
them on the local S3 server, and converts them S3 to S3 through the project's proxy
adding ``--latency_ms`` per request, on ``--workers`` DirectRunner processes. It does the
same for the first ``--small`` images, and prints one table: seconds, images/s, peak
RSS of the job's whole process tree, and the most client connections the proxy saw open
at once. Bounded means: the large run's peak memory and connections stay at the small
run's, not ten times them.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from devtools import local_s3
from devtools.s3proxy import S3Proxy
from devtools.sample_data import write_photo_tree
from s3tfr import s3

BUCKET = "bench-load"


def _run_job():
    """bench/convert.py's subprocess runner (seconds and peak RSS of the job's tree)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "convert.py")
    spec = importlib.util.spec_from_file_location("bench_convert", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.run_job


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=20_000, help="images, large run")
    parser.add_argument("--small", type=int, default=2_000, help="images, small run")
    parser.add_argument(
        "--latency_ms", type=float, default=50, help="added per request"
    )
    parser.add_argument("--workers", type=int, default=2, help="DirectRunner processes")
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    run_job = _run_job()
    rows = []
    with tempfile.TemporaryDirectory() as tmp, local_s3.running() as server:
        s3.client().create_bucket(Bucket=BUCKET)
        for name, count in (("small", args.small), ("large", args.images)):
            # Same seed: the small tree is the large one's first images.
            src = os.path.join(tmp, name)
            total = write_photo_tree(src, count, classes=10, size=(64, 48))
            local_s3.put_tree(src, BUCKET, f"{name}/")
            print(
                f"{name}: {count} JPEGs ({total / 1e6:.0f} MB) in S3", file=sys.stderr
            )
        for name, count in (("small", args.small), ("large", args.images)):
            with S3Proxy(server.endpoint, args.latency_ms / 1000) as proxy:
                seconds, peak = run_job(
                    ["--input", f"s3://{BUCKET}/{name}/", "--output",
                     f"s3://{BUCKET}/out-{name}/", f"--s3_endpoint_url={proxy.endpoint}",
                     "--direct_running_mode=multi_processing",
                     f"--direct_num_workers={args.workers}"],
                    env=local_s3.environment(server.endpoint),
                )  # fmt: skip
                rows.append(
                    (count, seconds, peak, proxy.max_connections, proxy.requests)
                )
            print(f"{name}: {count} images in {seconds:.0f} s", file=sys.stderr)

    print(f"\nconvert under load: 64x48 JPEGs, S3 to S3 through the proxy at "
          f"+{args.latency_ms:.0f} ms per request, {args.workers} workers, "
          f"{os.cpu_count()} cores")  # fmt: skip
    print("| images | seconds | images/s | peak RSS (job tree) | max open connections "
          "| requests |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|")
    for count, seconds, peak, connections, requests in rows:
        print(f"| {count:,} | {seconds:.0f} | {count / seconds:.0f} | "
              f"{peak / 2**20:.0f} MB | {connections} | {requests:,} |")  # fmt: skip
    small, large = rows
    print(f"\n{large[0] / small[0]:.0f}x the images: peak RSS x{large[2] / small[2]:.2f}, "
          f"max open connections x{large[3] / max(small[3], 1):.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
