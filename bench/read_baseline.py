"""make_dataset against hand-written tf.data pipelines that yield the same tensors.

    .venv/bin/python bench/read_baseline.py [--images 3200] [--rounds 5]
    .venv/bin/python bench/read_baseline.py --dataset DIR   # an existing converted dataset

Without ``--dataset``, generates ``--images`` photo-like 500x375 JPEGs and converts them
with ``--resize crop:224x224`` (the train split is what is read: 90 % of them).

Two modes, each a pair of pipelines over the train split's local shards, batches of 64
float32 224x224x3 images in 0..1 with int64 labels (bench/peers.py's
``same_tensor_baseline`` says exactly what the hand-written ones do):

- evaluation: ``make_dataset(training=False)`` against ``TFRecordDataset`` -> parse ->
  decode -> centre crop and resize -> scale;
- training: ``make_dataset(training=True)`` against the same with a shuffle buffer of
  1,024 records, random resized crop, flip, brightness and contrast.

Steady state: images/s over ``--batches`` batches after ``--warmup``, the datasets
repeated so no epoch ends; beside it, this process's CPU time per image (all threads).
Every round runs both pipelines of a mode back to back, the order alternating from round
to round, and takes their ratio: on a shared machine a burst of load then moves both
sides of a ratio, or one round, not the median. Prints, per mode, the median of the
rates and of the per-round ratios, with the ratios' range. Ratios are what matter:
absolute rates depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tfdata_reader
from beam_jobs import convert
from bench.convert import photo_tree
from bench.peers import BATCH_SIZE, same_tensor_baseline
from s3tfr.manifest import load_info, shard_uris

MODES = ("evaluation", "training")


def rate(ds, warmup: int, batches: int) -> tuple[float, float]:
    """Images/s and CPU ms per image over ``batches`` batches after ``warmup``."""
    it = iter(ds.repeat())
    for _ in range(warmup):
        next(it)
    start, cpu, images = time.perf_counter(), time.process_time(), 0
    for _ in range(batches):
        images += int(next(it)[0].shape[0])
    seconds = time.perf_counter() - start
    return images / seconds, 1000 * (time.process_time() - cpu) / images


def measure(dataset: str, rounds: int, warmup: int, batches: int) -> dict:
    """Per mode: each round's (make_dataset, baseline) rates and CPU ms per image."""
    files = [path for path, _ in shard_uris(load_info(dataset), dataset, "train")]
    pipelines = {
        mode: {
            "make_dataset": lambda t=mode == "training": tfdata_reader.make_dataset(
                dataset, "train", batch_size=BATCH_SIZE, training=t
            ),
            "baseline": lambda t=mode == "training": same_tensor_baseline(files, t),
        }
        for mode in MODES
    }
    for pair in pipelines.values():  # TensorFlow's one-time start-up, out of round 1
        for build in pair.values():
            rate(build(), 1, 1)
    runs: dict = {mode: [] for mode in MODES}
    for r in range(rounds):
        for mode in MODES:
            order = ["make_dataset", "baseline"][:: 1 if r % 2 == 0 else -1]
            got = {key: rate(pipelines[mode][key](), warmup, batches) for key in order}
            runs[mode].append(got)
            ratio = got["make_dataset"][0] / got["baseline"][0]
            print(f"round {r + 1}/{rounds} {mode}: make_dataset "
                  f"{got['make_dataset'][0]:.0f}, baseline {got['baseline'][0]:.0f} "
                  f"images/s, ratio {ratio:.2f}", file=sys.stderr)  # fmt: skip
    return runs


def summarize(runs: dict) -> dict:
    summary = {}
    for mode, rounds in runs.items():
        ratios = [r["make_dataset"][0] / r["baseline"][0] for r in rounds]
        summary[mode] = {
            key: {
                "rate": statistics.median(r[key][0] for r in rounds),
                "cpu_ms": statistics.median(r[key][1] for r in rounds),
            }
            for key in ("make_dataset", "baseline")
        }
        summary[mode]["ratio"] = statistics.median(ratios)
        summary[mode]["ratios"] = ratios
    return summary


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", help="a converted dataset (default: generate one)")
    parser.add_argument(
        "--images", type=int, default=3200, help="images to generate without --dataset"
    )
    parser.add_argument("--rounds", type=int, default=5, help="rounds; medians shown")
    parser.add_argument("--batches", type=int, default=40, help="measured batches")
    parser.add_argument("--warmup", type=int, default=10, help="warm-up batches")
    parser.add_argument("--json", help="also write every round here")
    args = parser.parse_args(argv)
    if min(args.images, args.rounds, args.batches, args.warmup) < 1:
        parser.error("--images, --rounds, --batches and --warmup must be >= 1")
    work = None
    dataset = args.dataset
    if dataset is None:
        work = tempfile.mkdtemp(prefix="bench-read-baseline-")
        src, dataset = os.path.join(work, "src"), os.path.join(work, "out")
        photo_tree(src, args.images, 0, os.cpu_count() or 1)
        convert.run(
            ["--input", src, "--output", dataset, "--resize", "crop:224x224"]
        )
    try:
        examples = load_info(dataset)["splits"]["train"]["examples"]
        runs = measure(dataset, args.rounds, args.warmup, args.batches)
    finally:
        if work:
            shutil.rmtree(work, ignore_errors=True)
    summary = summarize(runs)
    print(f"\nmake_dataset / same-tensor tf.data baseline, batch {BATCH_SIZE}, "
          f"224x224 float32, {args.batches} batches after {args.warmup}, "
          f"{os.cpu_count()} CPUs, {examples} train images, median of "
          f"{args.rounds} rounds")  # fmt: skip
    print("| mode | make_dataset img/s | baseline img/s | ratio (median) | ratio range "
          "| CPU ms/img make_dataset | CPU ms/img baseline |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|")
    for mode, s in summary.items():
        print(f"| {mode} | {s['make_dataset']['rate']:.0f} | {s['baseline']['rate']:.0f} "
              f"| {s['ratio']:.2f} | {min(s['ratios']):.2f}-{max(s['ratios']):.2f} "
              f"| {s['make_dataset']['cpu_ms']:.3f} "
              f"| {s['baseline']['cpu_ms']:.3f} |")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"settings": vars(args), "rounds": runs, "summary": summary}, f)


if __name__ == "__main__":
    main()
