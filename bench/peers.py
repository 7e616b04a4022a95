"""The project beside its peers: the same conversion and reading, on one machine.

    .venv/bin/python bench/peers.py [--n 4000] [--big 300] [--repeat 2] [--json PATH]
    .venv/bin/python bench/peers.py --quick    # N=200, big=10, repeat=1: a smoke run

Run it on a quiet machine: every contestant uses every core. At the defaults on 2 cores
it takes about 15 minutes; ``--quick`` takes about 2.5 minutes and its rates
are mostly start-up (its marginal rates are noise).

The first run makes Ray's virtual environment, ``.bench-venvs/ray/`` (git-ignored; a few
minutes, about 2.7 GB, TensorFlow being most of it), and later runs reuse it until
``RAY_REQUIREMENTS`` change. Where it cannot be made (no package index), the Ray rows
say why and the rest runs.

Convert. Photo-like 500x375 quality-90 JPEGs in 4 class folders (4N generated; the N
tree links the first N of them) -> shorter side 224 -> centre crop 224x224 -> JPEG
quality 90 -> TFRecord shards of ``tf.train.Example`` on local disk, by:

1. the project: ``python -m beam_jobs.convert --input SRC --output OUT --resize
   crop:224x224``, on its default DirectRunner;
2. a hand-written Pillow loop, one process per core (``--workers``);
3. the same loop with simplejpeg (libjpeg-turbo) decoding and encoding;
4. a ``build_imagenet_data.py``-style converter (tensorflow/models): TF ops in
   ``--workers`` threads, ``tf.io.TFRecordWriter`` per shard;
5. Ray Data: ``read_binary_files`` -> ``map_batches`` (Pillow) -> ``write_tfrecords``.

bench/peer_jobs.py holds the peers and says exactly what each does; ``--workers``
(default: one per core) sets their processes, threads or Ray CPUs. Each contestant runs
as its own process from a fresh interpreter, start-up included, at N and at 4N images,
and on ``--big`` photo-like 4000x3000 (12 MP) JPEGs (one distinct image per 20 files,
the rest hard links to them: decoding costs the same, and generating a 12 MP image costs
seconds). Every round runs every contestant once on each tree, the order rotated each
round; the table shows the fastest of ``--repeat`` rounds (another process on a shared
machine only ever slows a run down). Marginal images/s is (4N - N) / (t4N - tN): the
steady-state rate, start-up and shutdown cancelled out. Peak RSS is the largest sum of
RSS over a run's whole process tree, sampled from /proc every 50 ms (shared pages, such
as Ray's object store, count in every process that maps them). Every run's record count
is checked.

Image quality: PSNR (RGB) and SSIM (luma, 11x11 Gaussian window, sigma 1.5) of each
contestant's 224x224 output at N against a full-precision reference, on ``--sample``
images: the source decoded at full size by Pillow, each channel resized in float (mode
"F", Lanczos) to the same target size, the same centre crop, no rounding.

Read. On the project's 4N dataset (its train split, local files), batches of 64
224x224x3 float32 images in 0..1 with int64 labels, from: ``tfdata_reader.make_dataset``
with ``training=False`` and ``training=True``; a hand-written ``tf.data`` pipeline that
yields the same tensors for each (``TFRecordDataset`` -> parse -> decode -> centre crop
and resize, or random resized crop, flip, brightness and contrast -> scale to 0..1 ->
batch -> prefetch); Keras ``image_dataset_from_directory`` over the 4N source JPEGs (it
decodes the 500x375 sources; scaled to 0..1 after it); Ray Data ``read_tfrecords`` with
a Pillow decode in ``map_batches``. Steady state: images/s over ``--batches`` batches
after ``--warmup`` batches, the datasets repeated so no epoch ends; the best of
``--repeat`` rounds.

Prints markdown tables; ``--json PATH`` writes every measurement as well. Ratios are
what matter: absolute rates depend on the machine.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import glob
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.convert import first_images, photo_tree, run_tree
from bench.peer_jobs import SIDE, count_records, crop_geometry

PEER_JOBS = os.path.join(ROOT, "bench", "peer_jobs.py")
RAY_VENV = os.path.join(ROOT, ".bench-venvs", "ray")


def _project_pins(*names: str) -> tuple[str, ...]:
    """The lines of requirements.txt that pin ``names``."""
    with open(os.path.join(ROOT, "requirements.txt")) as f:
        lines = [line.split("#")[0].strip() for line in f]
    return tuple(
        line for line in lines if line.split("==")[0].split("[")[0].lower() in names
    )


# Ray Data builds and parses tf.train.Example with TensorFlow and checksums the records
# it writes with crc32c; TensorFlow, Pillow and NumPy as the project pins them.
RAY_REQUIREMENTS = (
    "ray[data]==2.60.0",
    "crc32c==2.9.post0",
    *_project_pins("tensorflow", "pillow", "numpy"),
)
RESIZE = f"crop:{SIDE}x{SIDE}"
BIG_SIZE = (4000, 3000)
BIG_FILES_PER_IMAGE = 20
RSS_INTERVAL_S = 0.05
BATCH_SIZE = 64
QUICK = {"n": 200, "big": 10, "repeat": 1, "batches": 10, "warmup": 3, "sample": 20}
ENV = {"TF_CPP_MIN_LOG_LEVEL": "2", "RAY_USAGE_STATS_ENABLED": "0"}


@dataclasses.dataclass(frozen=True)
class Contestant:
    key: str
    name: str
    argv: tuple[str, ...]  # followed by SRC OUT (the project: its flags)
    records: str  # glob of its record files in OUT


def ray_python() -> str:
    """The Ray environment's interpreter, made again when ``RAY_REQUIREMENTS`` change.

    Raises:
        RuntimeError: pip failed (the message ends with its log's last lines).
    """
    want = hashlib.sha256("\n".join(RAY_REQUIREMENTS).encode()).hexdigest()
    stamp = os.path.join(RAY_VENV, ".requirements.sha256")
    python = os.path.join(RAY_VENV, "bin", "python")
    with contextlib.suppress(OSError), open(stamp) as f:
        if os.path.exists(python) and f.read().strip() == want:
            return python
    print(f"making {os.path.relpath(RAY_VENV, ROOT)} (first run: a few minutes)",
          file=sys.stderr)  # fmt: skip
    log_path = os.path.join(RAY_VENV, "install.log")
    steps = [
        [python, "-m", "pip", "install", "--upgrade", "pip"],
        [python, "-m", "pip", "install", *RAY_REQUIREMENTS],
    ]
    if not os.path.exists(python):
        steps.insert(0, [sys.executable, "-m", "venv", RAY_VENV])
    os.makedirs(RAY_VENV, exist_ok=True)
    with open(log_path, "w") as log:
        for step in steps:
            done = subprocess.run(
                step, check=False, stdout=log, stderr=subprocess.STDOUT
            )
            if done.returncode:
                with open(log_path) as f:
                    tail = "".join(f.readlines()[-5:])
                raise RuntimeError(f"{' '.join(step[:4])} failed:\n{tail}")
    with open(stamp, "w") as f:
        f.write(want + "\n")
    return python


def contestants(workers: int, ray: str | None):
    """The rows that can run here, why the others cannot, and the peers' own flags."""
    peer = ("--workers", str(workers))
    rows = [
        Contestant("project", "this project (beam_jobs.convert, DirectRunner)",
                   (sys.executable, "-m", "beam_jobs.convert", "--resize", RESIZE),
                   "*.tfrecord"),
        Contestant("pillow", f"Pillow loop, {workers} processes",
                   (sys.executable, PEER_JOBS, "pillow"), "*.tfrecord"),
        Contestant("simplejpeg", f"simplejpeg loop, {workers} processes",
                   (sys.executable, PEER_JOBS, "simplejpeg"), "*.tfrecord"),
        Contestant("tf-imagenet", f"build_imagenet_data.py-style TF, {workers} threads",
                   (sys.executable, PEER_JOBS, "tf-imagenet"), "*.tfrecord"),
        Contestant("ray", f"Ray Data, {workers} CPUs",
                   (ray or "", PEER_JOBS, "ray"), "*"),
    ]  # fmt: skip
    missing = {}
    try:
        import simplejpeg  # noqa: F401
    except ImportError:
        missing["simplejpeg"] = "simplejpeg not installed (pip install simplejpeg)"
    if ray is None:
        missing["ray"] = "no Ray environment"
    return [c for c in rows if c.key not in missing], missing, peer


def _argv(c: Contestant, src: str, out: str, peer: tuple[str, ...]) -> list[str]:
    if c.key == "project":
        return [*c.argv, "--input", src, "--output", out]
    return [*c.argv, src, out, *peer]


def record_files(c: Contestant, out: str) -> list[str]:
    return sorted(
        p for p in glob.glob(os.path.join(out, c.records)) if os.path.isfile(p)
    )


def big_tree(root: str, count: int, processes: int) -> None:
    """``count`` 4000x3000 JPEGs: one distinct image per ``BIG_FILES_PER_IMAGE`` files,
    the rest hard links to them."""
    distinct_root = os.path.join(root, ".distinct")
    distinct = max(processes, -(-count // BIG_FILES_PER_IMAGE))
    photo_tree(distinct_root, distinct, 2, processes, BIG_SIZE)
    images = sorted(glob.glob(os.path.join(distinct_root, "*", "*.jpg")))
    for i in range(count):
        folder = os.path.join(root, f"class_{i % 4:02d}")
        os.makedirs(folder, exist_ok=True)
        os.link(images[i % len(images)], os.path.join(folder, f"img_{i:06d}.jpg"))
    shutil.rmtree(distinct_root)


def _failure(what: str, error: subprocess.CalledProcessError) -> str:
    """Prints the end of a failed run's stderr; returns its last error line."""
    text = (error.stderr or b"").decode(errors="replace").strip()
    print(f"{what} failed (exit {error.returncode}):\n{text[-3000:]}", file=sys.stderr)
    lines = text.splitlines() or [f"exit {error.returncode}"]
    errors = [line for line in lines if "Error" in line or "Exception" in line]
    return (errors or lines)[-1].strip()[:300]


def convert_section(args, rows, peer, trees, tmp):
    """Runs every contestant on every tree, ``args.repeat`` rounds.

    Returns:
        ``{key: {tree: [run, ...]}}`` with each run's seconds and peak RSS, the failures
        ``{key: reason}``, and the output folders kept: N for every contestant, 4N for
        the project.
    """
    runs = {c.key: {tree: [] for tree in trees} for c in rows}
    failed, kept = {}, {}
    for r in range(args.repeat):
        order = rows[r % len(rows) :] + rows[: r % len(rows)]
        for tree, (src, count) in trees.items():
            for c in order:
                if c.key in failed:
                    continue
                out = os.path.join(tmp, "out", f"{c.key}-{tree}-{r}")
                try:
                    seconds, peak, _ = run_tree(
                        _argv(c, src, out, peer), ENV, RSS_INTERVAL_S
                    )
                except subprocess.CalledProcessError as e:
                    failed[c.key] = f"failed on {tree}: {_failure(c.key, e)}"
                    continue
                written = count_records(record_files(c, out))
                if written != count:
                    failed[c.key] = (
                        f"wrote {written} records for {count} images ({tree})"
                    )
                    print(f"{c.key}: {failed[c.key]}", file=sys.stderr)
                    continue
                runs[c.key][tree].append({"seconds": seconds, "peak_rss": peak})
                print(f"round {r + 1}/{args.repeat}, {tree} ({count}): {c.key} "
                      f"{seconds:.1f} s, {count / seconds:.0f} images/s, peak RSS "
                      f"{peak / 2**20:.0f} MB", file=sys.stderr)  # fmt: skip
                if r == 0 and (tree == "N" or (tree == "4N" and c.key == "project")):
                    kept[(c.key, tree)] = out
                else:
                    shutil.rmtree(out, ignore_errors=True)
    return runs, failed, kept


def summarize(runs: dict, trees: dict) -> dict:
    """Fastest run per tree, rates, marginal rate and peak RSS of one contestant."""
    best = {t: min((x["seconds"] for x in v), default=None) for t, v in runs.items()}
    peak = {t: max((x["peak_rss"] for x in v), default=None) for t, v in runs.items()}
    n, big = trees["N"][1], trees["12MP"][1]
    row = {
        "n_seconds": best["N"],
        "n_rate": n / best["N"] if best["N"] else None,
        "4n_seconds": best["4N"],
        "marginal_rate": None,
        "big_rate": big / best["12MP"] if best["12MP"] else None,
        "peak_rss_n": peak["N"],
        "peak_rss_4n": peak["4N"],
        "peak_rss_big": peak["12MP"],
        "runs": runs,
    }
    if best["N"] and best["4N"] and best["4N"] > best["N"]:
        row["marginal_rate"] = 3 * n / (best["4N"] - best["N"])
    return row


def _float_rgb(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), np.float64)


def reference(data: bytes) -> np.ndarray:
    """The full-precision 224x224: full decode, float Lanczos per channel, the crop."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    target_w, target_h, box = crop_geometry(*image.size)
    pixels = np.asarray(image, np.float32)
    channels = [
        np.asarray(
            Image.fromarray(np.ascontiguousarray(pixels[..., k]), "F")
            .resize((target_w, target_h), Image.Resampling.LANCZOS)
            .crop(box)
        )
        for k in range(3)
    ]
    return np.clip(np.stack(channels, axis=-1).astype(np.float64), 0, 255)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def _gaussian(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    x = np.arange(size) - (size - 1) / 2
    g = np.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def _filter(x: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Separable filter by ``g``, valid region only."""
    n = len(g)
    rows = sum(g[k] * x[k : x.shape[0] - n + 1 + k] for k in range(n))
    return sum(g[k] * rows[:, k : x.shape[1] - n + 1 + k] for k in range(n))


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM (Wang et al. 2004) of two RGB images on their luma (BT.601), 0..255."""
    weights = np.array([0.299, 0.587, 0.114])
    x, y = a @ weights, b @ weights
    g = _gaussian()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mx, my = _filter(x, g), _filter(y, g)
    sxx = _filter(x * x, g) - mx * mx
    syy = _filter(y * y, g) - my * my
    sxy = _filter(x * y, g) - mx * my
    index = ((2 * mx * my + c1) * (2 * sxy + c2)) / (
        (mx * mx + my * my + c1) * (sxx + syy + c2)
    )
    return float(index.mean())


def _encoded_images(paths: list[str], keys: set[str]) -> dict[str, bytes]:
    import tensorflow as tf

    found = {}
    for record in tf.data.TFRecordDataset(paths):
        feature = tf.train.Example.FromString(record.numpy()).features.feature
        key = feature["image/filename"].bytes_list.value[0].decode()
        if key in keys:
            found[key] = feature["image/encoded"].bytes_list.value[0]
    return found


def quality_section(rows, kept, src: str, sample: int) -> dict:
    """Mean PSNR and SSIM per contestant over ``sample`` images of the N tree."""
    keys = sorted(
        os.path.relpath(p, src).replace(os.sep, "/")
        for p in glob.glob(os.path.join(src, "*", "*.jpg"))
    )
    keys = keys[:: max(1, len(keys) // sample)][:sample]
    refs = {}
    for key in keys:
        with open(os.path.join(src, key), "rb") as f:
            refs[key] = reference(f.read())
    result = {}
    for c in rows:
        out = kept.get((c.key, "N"))
        if out is None:
            continue
        images = _encoded_images(record_files(c, out), set(keys))
        scores = [
            (psnr(refs[k], got), ssim(refs[k], got))
            for k in keys
            if k in images
            and (got := _float_rgb(Image.open(io.BytesIO(images[k])))).shape
            == refs[k].shape
        ]
        result[c.key] = {
            "psnr": float(np.mean([p for p, _ in scores])),
            "ssim": float(np.mean([s for _, s in scores])),
            "images": len(scores),
        }
    return result


def same_tensor_baseline(files: list[str], training: bool):
    """The hand-written tf.data pipeline with make_dataset's output: float32 224x224x3
    in 0..1, int64 labels; in training, random resized crop (8-100 % of the area, aspect
    3/4-4/3), flip, brightness +-0.2 and contrast 0.8-1.2, as ``ops.Augment()``."""
    import tensorflow as tf

    features = {
        "image/encoded": tf.io.FixedLenFeature([], tf.string),
        "image/class/label": tf.io.FixedLenFeature([], tf.int64),
    }

    def parse(record):
        example = tf.io.parse_single_example(record, features)
        data = example["image/encoded"]
        if training:
            begin, size, _ = tf.image.sample_distorted_bounding_box(
                tf.io.extract_jpeg_shape(data),
                bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
                min_object_covered=0.0,
                aspect_ratio_range=(3 / 4, 4 / 3),
                area_range=(0.08, 1.0),
                max_attempts=10,
                use_image_if_no_bounding_boxes=True,
            )
            window = tf.stack([begin[0], begin[1], size[0], size[1]])
            image = tf.io.decode_and_crop_jpeg(data, window, channels=3)
            image = tf.image.resize(image, [SIDE, SIDE]) / 255.0
            image = tf.image.random_flip_left_right(image)
            image = tf.image.random_brightness(image, 0.2)
            image = tf.image.random_contrast(image, 0.8, 1.2)
            image = tf.clip_by_value(image, 0.0, 1.0)
        else:
            image = tf.io.decode_jpeg(data, channels=3)
            shape = tf.shape(image)
            side = tf.minimum(shape[0], shape[1])
            image = tf.image.crop_to_bounding_box(
                image, (shape[0] - side) // 2, (shape[1] - side) // 2, side, side
            )
            image = tf.image.resize(image, [SIDE, SIDE]) / 255.0
        return image, example["image/class/label"]

    ds = tf.data.TFRecordDataset(files, num_parallel_reads=tf.data.AUTOTUNE)
    if training:
        ds = ds.shuffle(1024)
    ds = ds.map(parse, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.batch(BATCH_SIZE, drop_remainder=training).prefetch(tf.data.AUTOTUNE)


def keras_from_directory(src: str):
    import tensorflow as tf

    with contextlib.redirect_stdout(io.StringIO()):  # "Found N files belonging to …"
        ds = tf.keras.utils.image_dataset_from_directory(
            src, batch_size=BATCH_SIZE, image_size=(SIDE, SIDE), shuffle=False,
            crop_to_aspect_ratio=True,
        )  # fmt: skip
    return ds.map(
        lambda images, labels: (images / 255.0, labels),
        num_parallel_calls=tf.data.AUTOTUNE,
    ).prefetch(tf.data.AUTOTUNE)


def _describe(images: np.ndarray) -> str:
    return (f"{images.dtype} {'x'.join(map(str, images.shape))}, "
            f"{images.min():.2f}..{images.max():.2f}")  # fmt: skip


def steady_rate(ds, warmup: int, batches: int) -> dict:
    """Images/s over ``batches`` batches after ``warmup`` (at least 1), the dataset
    repeated; the output described from the first batch."""
    it = iter(ds.repeat())
    first, _ = next(it)
    for _ in range(warmup - 1):
        next(it)
    start, images = time.perf_counter(), 0
    for _ in range(batches):
        batch, _ = next(it)
        images += int(batch.shape[0])
    seconds = time.perf_counter() - start
    return {"rate": images / seconds, "output": _describe(first.numpy())}


def read_section(args, dataset: str, src: str, ray: str | None, workers: int) -> dict:
    import tfdata_reader
    from s3tfr.manifest import load_info, shard_uris

    files = [path for path, _ in shard_uris(load_info(dataset), dataset, "train")]
    pipelines = {
        "make_dataset": lambda: tfdata_reader.make_dataset(
            dataset, "train", batch_size=BATCH_SIZE, training=False
        ),
        "baseline": lambda: same_tensor_baseline(files, training=False),
        "make_dataset_training": lambda: tfdata_reader.make_dataset(
            dataset, "train", batch_size=BATCH_SIZE, training=True
        ),
        "baseline_training": lambda: same_tensor_baseline(files, training=True),
        "keras": lambda: keras_from_directory(src),
    }
    if ray:
        pipelines["ray"] = None
    results = {key: [] for key in pipelines}
    keys = list(pipelines)
    for r in range(args.repeat):
        for key in keys[r % len(keys) :] + keys[: r % len(keys)]:
            if key == "ray":
                try:
                    results[key].append(_ray_read(args, files, ray, workers))
                except subprocess.CalledProcessError as e:
                    results[key].append({"error": _failure("ray-read", e)})
            else:
                results[key].append(
                    steady_rate(pipelines[key](), args.warmup, args.batches)
                )
            got = results[key][-1]
            print(f"read round {r + 1}/{args.repeat}: {key} "
                  f"{got.get('rate', 0):.0f} images/s", file=sys.stderr)  # fmt: skip
    return {key: max(v, key=lambda x: x.get("rate", 0)) for key, v in results.items()}


def _ray_read(args, files: list[str], ray: str, workers: int) -> dict:
    _, _, stdout = run_tree(
        [ray, PEER_JOBS, "ray-read", *files, "--workers", str(workers),
         "--batch_size", str(BATCH_SIZE), "--warmup", str(args.warmup),
         "--batches", str(args.batches)],
        ENV, RSS_INTERVAL_S,
    )  # fmt: skip
    got = json.loads(stdout.decode().strip().splitlines()[-1])
    return {"rate": got["images"] / got["seconds"], "output": got["output"]}


def _mb(value) -> str:
    return "" if value is None else f"{value / 2**20:,.0f} MB"


def _num(value, fmt: str = ".0f") -> str:
    return "" if value is None else format(value, fmt)


def print_tables(report: dict) -> None:
    s = report["settings"]
    print(f"\nconvert: photo-like 500x375 q90 JPEGs -> {RESIZE} JPEG q90 TFRecords, "
          f"N={s['n']}, 12 MP: {s['big']} 4000x3000 JPEGs, {s['workers']} workers, "
          f"{s['cpus']} CPUs, fastest of {s['repeat']}")  # fmt: skip
    print("| contestant | N s | N img/s | 4N s | marginal img/s | 12 MP img/s "
          "| peak RSS 4N | peak RSS 12 MP | PSNR dB | SSIM |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in report["convert"]:
        if "error" in row:
            print(f"| {row['name']} | {row['error']} |" + " |" * 8)
            continue
        print(f"| {row['name']} | {_num(row['n_seconds'], '.1f')} "
              f"| {_num(row['n_rate'])} | {_num(row['4n_seconds'], '.1f')} "
              f"| {_num(row['marginal_rate'])} | {_num(row['big_rate'], '.1f')} "
              f"| {_mb(row['peak_rss_4n'])} | {_mb(row['peak_rss_big'])} "
              f"| {_num(row.get('psnr'), '.2f')} "
              f"| {_num(row.get('ssim'), '.4f')} |")  # fmt: skip
    print(
        "\nthe project / each peer (images/s: above 1 the project is faster; "
        "peak RSS: below 1 it uses less)"
    )
    print(
        "| peer | N img/s | marginal img/s | 12 MP img/s | peak RSS 4N | PSNR dB diff |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for ratio in report["convert_ratios"]:
        print(f"| {ratio['peer']} | {_num(ratio['n_rate'], '.2f')} "
              f"| {_num(ratio['marginal_rate'], '.2f')} "
              f"| {_num(ratio['big_rate'], '.2f')} "
              f"| {_num(ratio['peak_rss_4n'], '.2f')} "
              f"| {_num(ratio['psnr_diff'], '+.2f')} |")  # fmt: skip
    print(f"\nread: the project's 4N dataset (train split, local), batch {BATCH_SIZE}, "
          f"steady state: {s['batches']} batches after {s['warmup']}, best of "
          f"{s['repeat']}")  # fmt: skip
    print("| pipeline | output | img/s | ratio to baseline |")
    print("|---|---|---:|---:|")
    for row in report["read"]:
        if "error" in row:
            print(f"| {row['name']} | {row['error']} | | |")
            continue
        print(f"| {row['name']} | {row['output']} | {row['rate']:.0f} "
              f"| {_num(row['ratio'], '.2f')} |")  # fmt: skip


READ_ROWS = {
    "make_dataset": ("make_dataset(training=False)", "baseline"),
    "baseline": ("hand-written tf.data, same tensors (evaluation)", "baseline"),
    "make_dataset_training": ("make_dataset(training=True)", "baseline_training"),
    "baseline_training": ("hand-written tf.data, same tensors (training augmentation)",
                          "baseline_training"),
    "keras": ("Keras image_dataset_from_directory, source JPEGs", "baseline"),
    "ray": ("Ray Data read_tfrecords + Pillow decode", "baseline"),
}  # fmt: skip


def build_report(args, rows, missing, failed, trees, runs, quality, read) -> dict:
    """Every measurement, the project's ratios to each peer and the read rows."""
    convert = []
    for c in rows:
        row = {"key": c.key, "name": c.name, **summarize(runs[c.key], trees)}
        row.update(quality.get(c.key, {}))
        if c.key in failed:
            row["error"] = failed[c.key]
        convert.append(row)
    project = convert[0]
    ratios = []
    for row in convert[1:]:
        if "error" in row:
            continue
        ratio = {"peer": row["name"]}
        for field in ("n_rate", "marginal_rate", "big_rate", "peak_rss_4n"):
            mine, theirs = project.get(field), row.get(field)
            ratio[field] = mine / theirs if mine and theirs else None
        ratio["psnr_diff"] = (
            project["psnr"] - row["psnr"]
            if "psnr" in project and "psnr" in row
            else None
        )
        ratios.append(ratio)
    convert += [{"key": k, "name": k, "error": why} for k, why in missing.items()]
    read_rows = []
    for key, (name, baseline) in READ_ROWS.items():
        if key in read:
            base = read.get(baseline, {}).get("rate")
            versus = read[key]["rate"] / base if "rate" in read[key] and base else None
            read_rows.append({"key": key, "name": name, **read[key], "ratio": versus})
    settings = {
        "n": args.n, "big": args.big, "repeat": args.repeat, "workers": args.workers,
        "cpus": os.cpu_count(), "sample": args.sample, "batches": args.batches,
        "warmup": args.warmup, "ray_requirements": list(RAY_REQUIREMENTS),
    }  # fmt: skip
    return {
        "settings": settings,
        "convert": convert,
        "convert_ratios": ratios,
        "read": read_rows,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=4000, help="N images (also run at 4N)")
    parser.add_argument("--big", type=int, default=300, help="12 MP images")
    parser.add_argument("--repeat", type=int, default=2, help="rounds; fastest shown")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="the peers' processes, threads or Ray CPUs")  # fmt: skip
    parser.add_argument("--sample", type=int, default=50, help="images for PSNR/SSIM")
    parser.add_argument(
        "--batches", type=int, default=100, help="read: measured batches"
    )
    parser.add_argument("--warmup", type=int, default=10, help="read: warm-up batches")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: "
                        + ", ".join(f"{k}={v}" for k, v in QUICK.items()))  # fmt: skip
    args = parser.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    if min(args.n, args.big, args.repeat, args.warmup, args.batches, args.sample) < 1:
        parser.error(
            "--n, --big, --repeat, --warmup, --batches and --sample must be >= 1"
        )
    os.environ.update(ENV)
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (ROOT, os.environ.get("PYTHONPATH")) if p
    )
    try:
        ray = ray_python()
    except RuntimeError as e:
        print(f"no Ray rows: {e}", file=sys.stderr)
        ray = None
    rows, missing, peer = contestants(args.workers, ray)
    processes = os.cpu_count() or 1

    with tempfile.TemporaryDirectory(prefix="bench-peers-") as tmp:
        src4, src_n, big = (
            os.path.join(tmp, name) for name in ("src4n", "srcn", "big")
        )
        start = time.perf_counter()
        photo_tree(src4, 4 * args.n, 0, processes)
        first_images(src4, src_n, args.n)
        big_tree(big, args.big, processes)
        print(f"generated {4 * args.n} 500x375 and {args.big} 4000x3000 JPEGs in "
              f"{time.perf_counter() - start:.0f} s", file=sys.stderr)  # fmt: skip
        trees = {
            "N": (src_n, args.n),
            "4N": (src4, 4 * args.n),
            "12MP": (big, args.big),
        }
        runs, failed, kept = convert_section(args, rows, peer, trees, tmp)
        quality = quality_section(rows, kept, src_n, args.sample)
        read = {}
        if ("project", "4N") in kept:
            read = read_section(args, kept[("project", "4N")], src4, ray, args.workers)

    report = build_report(args, rows, missing, failed, trees, runs, quality, read)
    print_tables(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
