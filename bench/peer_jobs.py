"""The peers that bench/peers.py measures against the project, one per process.

    python bench/peer_jobs.py CONTESTANT SRC OUT [--workers 2]    convert
    python bench/peer_jobs.py ray-read SHARD… --batch_size 64 …  read (Ray's venv)

Each converter takes a ``<class>/<file>`` tree of JPEGs and writes what the convert job
writes with ``--resize crop:224x224``: shorter side to 224, the centred 224x224, JPEG
quality 90 (4:2:0, as Pillow encodes it), one ``tf.train.Example`` per image with the
project's keys, in TFRecord files on local disk. Labels are the index of the class
folder among the sorted folder names, as the job's ``labels.txt`` has them. Every
converter makes the same sizes and crop: the target is the source scaled to a shorter
side of 224, each side rounded, and the crop starts at half the excess, rounded down
(:func:`crop_geometry`).

- ``pillow``: a hand-written loop in ``--workers`` processes (``multiprocessing``, each
  converting every other file into its own shard): Pillow opens the file, ``draft``
  decodes it at 1/2, 1/4 or 1/8 scale when that still covers the target, a bilinear
  (antialiased) resize to the target, the crop, JPEG encode. The Example and its
  TFRecord framing (masked CRC32C, google-crc32c) are the project's own
  (:mod:`transforms.examples`), so the row measures the image work and its
  orchestration.
- ``simplejpeg``: the same loop with libjpeg-turbo through simplejpeg for decode and
  encode; the resize is Pillow's. It decodes at the scale ``draft`` picks (1/2, 1/4 or
  1/8), not at libjpeg-turbo's other M/8 factors: measured on these 500x375 sources, 5/8
  converted 1.5x faster and cost 2 dB of PSNR (34.6 against 36.6) and 0.010 of SSIM.
- ``tf-imagenet``: as tensorflow/models' ``build_imagenet_data.py`` is built: the file
  list split into ``--workers`` ranges, one Python thread per range under a
  ``tf.train.Coordinator``, each writing its shards with ``tf.io.TFRecordWriter``; the
  image work in one compiled function (the script's ``ImageCoder``):
  ``tf.io.decode_jpeg`` at full size, ``tf.image.resize`` (its default: bilinear, no
  antialiasing), the crop, ``tf.io.encode_jpeg``.
- ``ray``: Ray Data, ``read_binary_files`` -> ``map_batches`` (the Pillow loop's image
  function) -> ``write_tfrecords``, on a local Ray of ``--workers`` CPUs. Runs in its
  own virtual environment (bench/peers.py makes it).
- ``ray-read``: Ray Data ``read_tfrecords`` over a converted dataset's shards ->
  ``map_batches`` decoding each image to float32 in 0..1 -> ``iter_batches``; prints the
  steady-state images/s as JSON on its last line.

Only the standard library is imported at the top: each peer imports what it uses, and
pays for it in its own wall time, as it would on its own.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import struct
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIDE = 224
QUALITY = 90
IMAGE_EXTENSIONS = (".jpg", ".jpeg")


def crop_geometry(width: int, height: int, side: int = SIDE):
    """``(target width, target height, crop box)`` for a ``width`` x ``height`` source:
    shorter side to ``side``, then the centred ``side`` x ``side`` square of that."""
    scale = side / min(width, height)
    target_w, target_h = (
        max(side, round(width * scale)),
        max(side, round(height * scale)),
    )
    left, top = (target_w - side) // 2, (target_h - side) // 2
    return target_w, target_h, (left, top, left + side, top + side)


def list_tree(src: str) -> tuple[list[tuple[str, int]], list[str]]:
    """``([(relative path, label)], class names)``, in sorted order."""
    classes = sorted(e.name for e in os.scandir(src) if e.is_dir())
    files = []
    for label, name in enumerate(classes):
        for entry in sorted(os.scandir(os.path.join(src, name)), key=lambda e: e.name):
            if entry.name.lower().endswith(IMAGE_EXTENSIONS):
                files.append((f"{name}/{entry.name}", label))
    return files, classes


def count_records(paths: list[str]) -> int:
    """Records in TFRecord files, from their framing (length, CRC, data, CRC)."""
    count = 0
    for path in paths:
        with open(path, "rb") as f:
            while header := f.read(8):
                (length,) = struct.unpack("<Q", header)
                f.seek(length + 8, os.SEEK_CUR)
                count += 1
    return count


def _shard(out: str, index: int, count: int) -> str:
    return os.path.join(out, f"train-{index:05d}-of-{count:05d}.tfrecord")


def _features(encoded: bytes, label: int, text: str, key: str, source: bytes) -> dict:
    """The project's keys (README, "Data contract") for one converted image."""
    return {
        "image/encoded": encoded,
        "image/format": b"jpeg",
        "image/height": SIDE,
        "image/width": SIDE,
        "image/channels": 3,
        "image/class/label": label,
        "image/class/text": text.encode(),
        "image/filename": key.encode(),
        "image/source_sha256": hashlib.sha256(source).hexdigest().encode(),
    }


def pillow_image(data: bytes) -> bytes:
    """Source JPEG bytes -> the 224x224 JPEG, with Pillow."""
    from PIL import Image

    image = Image.open(io.BytesIO(data))
    target_w, target_h, box = crop_geometry(*image.size)
    image.draft("RGB", (target_w, target_h))
    image = image.convert("RGB").resize((target_w, target_h), Image.Resampling.BILINEAR)
    out = io.BytesIO()
    image.crop(box).save(out, format="JPEG", quality=QUALITY)
    return out.getvalue()


def simplejpeg_image(data: bytes) -> bytes:
    """Source JPEG bytes -> the 224x224 JPEG, simplejpeg (libjpeg-turbo) both ways."""
    import numpy as np
    import simplejpeg
    from PIL import Image

    height, width, _, _ = simplejpeg.decode_jpeg_header(data)
    target_w, target_h, box = crop_geometry(width, height)
    factor = 1
    while (
        factor < 8
        and width // (2 * factor) >= target_w
        and height // (2 * factor) >= target_h
    ):
        factor *= 2
    pixels = simplejpeg.decode_jpeg(
        data, colorspace="RGB", min_height=-(-height // factor),
        min_width=-(-width // factor),
    )  # fmt: skip
    image = Image.fromarray(pixels).resize(
        (target_w, target_h), Image.Resampling.BILINEAR
    )
    return simplejpeg.encode_jpeg(
        np.asarray(image.crop(box)), quality=QUALITY, colorspace="RGB",
        colorsubsampling="420",
    )  # fmt: skip


_IMAGE_FUNCTIONS = {"pillow": pillow_image, "simplejpeg": simplejpeg_image}


def _convert_share(kind, src, path, share, classes) -> int:
    sys.path.insert(0, ROOT)
    from transforms.examples import encode_example, frame_record

    convert = _IMAGE_FUNCTIONS[kind]
    with open(path, "wb") as out:
        for key, label in share:
            with open(os.path.join(src, key), "rb") as f:
                data = f.read()
            example = encode_example(
                _features(convert(data), label, classes[label], key, data)
            )
            out.write(frame_record(example))
    return len(share)


def loop_convert(kind: str, src: str, out: str, workers: int) -> int:
    """The hand-written loop: ``workers`` processes, one shard each."""
    import multiprocessing

    files, classes = list_tree(src)
    os.makedirs(out, exist_ok=True)
    jobs = [(kind, src, _shard(out, k, workers), files[k::workers], classes)
            for k in range(workers)]  # fmt: skip
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        return sum(pool.starmap(_convert_share, jobs))


# build_imagenet_data.py writes shards of about 1,000 images (1,024 for 1.28M images).
_IMAGES_PER_SHARD = 1000


def tf_imagenet_convert(src: str, out: str, workers: int) -> int:
    """build_imagenet_data.py's structure on TF 2: threads over ranges, coordinated."""
    import numpy as np
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec([], tf.string)])
    def resize_jpeg(data):
        image = tf.io.decode_jpeg(data, channels=3)
        shape = tf.cast(tf.shape(image)[:2], tf.float64)
        target = tf.cast(tf.round(shape * SIDE / tf.reduce_min(shape)), tf.int32)
        target = tf.maximum(target, SIDE)
        image = tf.image.resize(image, target)
        top, left = (target[0] - SIDE) // 2, (target[1] - SIDE) // 2
        image = image[top : top + SIDE, left : left + SIDE]
        image = tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
        return tf.io.encode_jpeg(image, quality=QUALITY)

    def feature(value):
        if isinstance(value, bytes):
            return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))
        return tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))

    files, classes = list_tree(src)
    os.makedirs(out, exist_ok=True)
    shards_per_thread = max(1, -(-len(files) // (workers * _IMAGES_PER_SHARD)))
    num_shards = workers * shards_per_thread
    bounds = np.linspace(0, len(files), num_shards + 1).astype(int)

    def process_batch(thread_index: int) -> None:
        for s in range(shards_per_thread):
            shard = thread_index * shards_per_thread + s
            with tf.io.TFRecordWriter(_shard(out, shard, num_shards)) as writer:
                for key, label in files[bounds[shard] : bounds[shard + 1]]:
                    with tf.io.gfile.GFile(os.path.join(src, key), "rb") as f:
                        data = f.read()
                    encoded = resize_jpeg(tf.constant(data)).numpy()
                    features = _features(encoded, label, classes[label], key, data)
                    example = tf.train.Example(
                        features=tf.train.Features(
                            feature={k: feature(v) for k, v in features.items()}
                        )
                    )
                    writer.write(example.SerializeToString())

    coord = tf.train.Coordinator()
    threads = [
        threading.Thread(target=process_batch, args=(k,)) for k in range(workers)
    ]
    for thread in threads:
        thread.start()
    coord.join(threads)
    return len(files)


def _start_ray(workers: int):
    import ray

    ray.init(
        num_cpus=workers, include_dashboard=False, log_to_driver=False,
        logging_level="ERROR",
    )  # fmt: skip
    ray.data.DataContext.get_current().enable_progress_bars = False
    return ray


def ray_convert(src: str, out: str, workers: int) -> int:
    import numpy as np

    ray = _start_ray(workers)
    files, classes = list_tree(src)
    labels = {name: label for label, name in enumerate(classes)}
    root = os.path.abspath(src)

    def convert(batch: dict) -> dict:
        keys = [os.path.relpath(p, root).replace(os.sep, "/") for p in batch["path"]]
        rows = [
            _features(pillow_image(data), labels[key.split("/")[0]],
                      key.split("/")[0], key, data)
            for key, data in zip(keys, batch["bytes"])
        ]  # fmt: skip
        return {
            name: np.array([row[name] for row in rows], dtype=object if isinstance(
                rows[0][name], bytes) else np.int64)
            for name in rows[0]
        }  # fmt: skip

    ds = ray.data.read_binary_files(root, include_paths=True)
    ds.map_batches(convert, batch_format="numpy").write_tfrecords(out)
    ray.shutdown()
    return len(files)


def ray_read(
    shards: list[str], batch_size: int, warmup: int, batches: int, workers: int
) -> dict:
    """Steady-state images/s of Ray Data reading ``shards``."""
    import numpy as np
    from PIL import Image

    ray = _start_ray(workers)
    records = count_records(shards)
    # Enough epochs of the shards for the warm-up and the measured batches.
    epochs = -(-(warmup + batches) * batch_size // max(records, 1)) + 1

    def decode(batch: dict) -> dict:
        images = []
        for data in batch["image/encoded"]:
            image = Image.open(io.BytesIO(data)).convert("RGB")
            if image.size != (SIDE, SIDE):
                target_w, target_h, box = crop_geometry(*image.size)
                image = image.resize((target_w, target_h), Image.Resampling.BILINEAR)
                image = image.crop(box)
            images.append(np.asarray(image))
        return {
            "image": np.stack(images).astype(np.float32) / 255.0,
            "label": np.asarray(batch["image/class/label"], np.int64),
        }

    ds = ray.data.read_tfrecords(shards * epochs).map_batches(
        decode, batch_format="numpy"
    )
    it = iter(ds.iter_batches(batch_size=batch_size, batch_format="numpy"))
    first = next(it)["image"]
    output = (f"{first.dtype} {'x'.join(map(str, first.shape))}, "
              f"{first.min():.2f}..{first.max():.2f}")  # fmt: skip
    for _ in range(warmup - 1):
        next(it)
    start, images = time.perf_counter(), 0
    for _ in range(batches):
        batch = next(it)
        images += len(batch["label"])
    seconds = time.perf_counter() - start
    it.close()  # before the shutdown, which the iterator's end would otherwise outlive
    ray.shutdown()
    return {"images": images, "seconds": seconds, "output": output}


CONVERTERS = {
    "pillow": lambda src, out, workers: loop_convert("pillow", src, out, workers),
    "simplejpeg": lambda src, out, workers: loop_convert(
        "simplejpeg", src, out, workers
    ),
    "tf-imagenet": tf_imagenet_convert,
    "ray": ray_convert,
}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("contestant", choices=(*CONVERTERS, "ray-read"))
    parser.add_argument(
        "paths", nargs="+", help="SRC OUT (convert) or the shards to read (ray-read)"
    )
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="processes, threads or Ray CPUs")  # fmt: skip
    parser.add_argument("--batch_size", type=int, default=64, help="ray-read")
    parser.add_argument("--warmup", type=int, default=10, help="ray-read: batches")
    parser.add_argument("--batches", type=int, default=100, help="ray-read: measured")
    args = parser.parse_args(argv)
    if args.contestant == "ray-read":
        result = ray_read(
            args.paths, args.batch_size, args.warmup, args.batches, args.workers
        )
    else:
        if len(args.paths) != 2:
            parser.error("convert takes SRC OUT")
        count = CONVERTERS[args.contestant](*args.paths, args.workers)
        result = {"images": count}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
