"""Reader throughput, all in one run on one converted dataset; prints one table.

Rows (images/s over one full epoch, same batch size and image size):
  make_dataset, S3 through the proxy with added latency, cold cache and warm cache;
  make_dataset from local files; a plain TFRecordDataset over the local shards (read only,
  no decode: the I/O limit); make_dataset_from_images, one GET per image through the proxy.

    .venv/bin/python -m bench.read --images 2000 --latency_ms 50
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf

import tfdata_reader
from beam_jobs import convert, local_s3, sample_data
from beam_jobs.s3proxy import S3Proxy
from tfdata_reader import ShardCache
from transforms import s3
from transforms.s3 import S3Config


def _upload(root: str, bucket: str, prefix: str) -> None:
    import concurrent.futures

    paths = [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs]

    def put(path):
        with open(path, "rb") as f:
            s3.put_bytes(bucket, prefix + os.path.relpath(path, root), f.read())

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        list(pool.map(put, paths))


def _rate(ds) -> tuple[float, int]:
    start = time.perf_counter()
    n = 0
    for batch in ds:
        images = batch[0] if isinstance(batch, tuple) else batch
        n += int(tf.shape(images)[0])
    return n / (time.perf_counter() - start), n


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000, help="images in the dataset")
    parser.add_argument("--shards", type=int, default=16, help="train shards")
    parser.add_argument("--latency_ms", type=float, default=50, help="added per S3 request")
    parser.add_argument("--batch_size", type=int, default=64, help="batch size")
    parser.add_argument("--image_size", type=int, default=224, help="output side in pixels")
    args = parser.parse_args(argv)
    size = (args.image_size, args.image_size)
    work = tempfile.mkdtemp(prefix="bench-reader-")
    src, out = os.path.join(work, "src"), os.path.join(work, "out")
    sample_data.write_photo_tree(src, args.images, classes=4, size=(500, 375))
    convert.run(["--input", src, "--output", out, "--num_shards", str(args.shards)])

    server = local_s3.LocalS3().start()
    os.environ.update(local_s3.environment(server.endpoint))
    s3.client().create_bucket(Bucket="bench-reader")
    _upload(out, "bench-reader", "converted/")
    _upload(src, "bench-reader", "raw/")
    proxy = S3Proxy(server.endpoint, args.latency_ms / 1000).start()
    config = S3Config(s3_endpoint_url=proxy.endpoint)

    def make(uri, **kw):
        return tfdata_reader.make_dataset(
            uri, "train", args.batch_size, size, training=True, seed=0, drop_remainder=False, **kw
        )

    rows = []
    cache = ShardCache(os.path.join(work, "cache"), config=config)
    remote = make("s3://bench-reader/converted", cache=cache, config=config)
    requests = proxy.requests
    rows.append(("make_dataset, S3 +latency, cold cache", *_rate(remote)))
    cold_requests, requests = proxy.requests - requests, proxy.requests
    rows.append(("make_dataset, S3 +latency, warm cache", *_rate(remote)))
    warm_requests = proxy.requests - requests
    rows.append(("make_dataset, local files", *_rate(make(out))))
    files = sorted(tf.io.gfile.glob(os.path.join(out, "train-*.tfrecord")))
    plain = tf.data.TFRecordDataset(files, num_parallel_reads=tf.data.AUTOTUNE)
    rows.append(("plain TFRecordDataset, local (read only)", *_rate(plain.batch(args.batch_size))))
    per_image = tfdata_reader.make_dataset_from_images(
        "s3://bench-reader/raw", args.batch_size, size, config=config
    )
    rows.append(("one GET per image, S3 +latency", *_rate(per_image)))
    proxy.stop()
    server.stop()

    local = rows[2][1]
    print(
        f"\nreader benchmark: {args.images} images 500x375 JPEG -> {args.shards} shards, "
        f"output {size[0]}x{size[1]}, batch {args.batch_size}, S3 latency "
        f"{args.latency_ms:.0f} ms, {os.cpu_count()} CPUs"
    )
    print(f"{'pipeline':<44}{'images':>8}{'images/s':>10}{'vs local':>10}")
    for name, rate, n in rows:
        print(f"{name:<44}{n:>8}{rate:>10.0f}{rate / local:>9.2f}x")
    print(f"cold / local files      {rows[0][1] / local:.2f}  (target >= 0.80)")
    print(f"warm / local files      {rows[1][1] / local:.2f}  (target >= 0.95)")
    print(f"cold S3 / one-GET-each  {rows[0][1] / rows[4][1]:.2f}  (target >= 5)")
    print(f"S3 requests: cold epoch {cold_requests}, warm epoch {warm_requests}")


if __name__ == "__main__":
    main()
