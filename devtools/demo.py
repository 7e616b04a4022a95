"""``./run_local.sh`` with no arguments: the whole product on an embedded default.

Starts a local S3 server (moto, 127.0.0.1, free port), generates sample images in class
folders (JPEG and PNG, mixed sizes, one corrupt file), puts them in a bucket, runs the
convert job on DirectRunner from S3 to S3, reads a few records back through Beam's S3
filesystem, prints a summary, copies the dataset to ``local_run/dataset/`` so it outlives
the server, and stops the server.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile

from beam_jobs import convert, logs
from devtools import local_s3
from devtools.sample_data import write_sample_tree
from s3tfr import s3, storage
from s3tfr.host import quiet_tensorflow_import

BUCKET = "demo-images"
DEFAULT_KEEP = "local_run/dataset"


def _show_records(uri: str, count: int = 3) -> None:
    """Reads the first records of one shard with Beam's S3 filesystem and TF's parser."""
    from apache_beam.io.filesystems import FileSystems

    with quiet_tensorflow_import():
        import tensorflow as tf

    with FileSystems.open(uri) as f, tempfile.NamedTemporaryFile(suffix=".tfrecord") as tmp:
        shutil.copyfileobj(f, tmp)
        tmp.flush()
        print(f"\nFirst records of {uri}:")
        for raw in tf.data.TFRecordDataset(tmp.name).take(count).as_numpy_iterator():
            feature = tf.train.Example.FromString(raw).features.feature
            print(
                f"  {feature['image/filename'].bytes_list.value[0].decode()}: "
                f"label {feature['image/class/label'].int64_list.value[0]} "
                f"({feature['image/class/text'].bytes_list.value[0].decode()}), "
                f"{feature['image/width'].int64_list.value[0]}x"
                f"{feature['image/height'].int64_list.value[0]} "
                f"{feature['image/format'].bytes_list.value[0].decode()}, "
                f"{len(feature['image/encoded'].bytes_list.value[0])} bytes"
            )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per_class", type=int, default=12, help="sample images per class")
    parser.add_argument("--resize", default="shorter:128", help="convert job --resize")
    parser.add_argument("--keep", default=DEFAULT_KEEP, help="local copy of the dataset")
    args, beam_args = parser.parse_known_args(argv)

    with (
        logs.configured("demo"),  # the convert job's progress, and quiet libraries
        tempfile.TemporaryDirectory() as tmp,
        local_s3.running() as server,
    ):
        print(f"Local S3 server at {server.endpoint} (moto, stopped at the end)")
        counts = write_sample_tree(os.path.join(tmp, "images"), per_class=args.per_class)
        s3.client().create_bucket(Bucket=BUCKET)
        uploaded = len(local_s3.put_tree(os.path.join(tmp, "images"), BUCKET, "images/"))
        print(
            f"Sample images: {sum(counts.values())} in {len(counts)} classes plus 1 corrupt "
            f"file, {uploaded} objects put in s3://{BUCKET}/images/"
        )
        output = f"s3://{BUCKET}/tfrecords/"
        result = convert.run(
            ["--input", f"s3://{BUCKET}/images/", "--output", output, "--resize", args.resize]
            + beam_args
        )
        convert.print_summary(output, result)
        first = min(n for n in storage.list_files(output) if n.startswith("train-"))
        _show_records(storage.join(output, first))
        if os.path.isdir(args.keep):
            shutil.rmtree(args.keep)
        for name in storage.list_files(output):
            storage.write_bytes(
                storage.join(args.keep, name), storage.read_bytes(storage.join(output, name))
            )
        print(f"\nThe dataset was written to {output} and copied to {args.keep}/")


if __name__ == "__main__":
    main()
