"""Analyze job cost next to the convert job's, on the same data, and its memory at N and 4N.

    .venv/bin/python bench/analyze.py [--images 8000] [--workers 2]

Generates 4N photo-like 500x375 JPEGs (N = ``--images``; the N-image dataset is the first
N of them, linked), converts them with the convert
job as it runs by default on local paths (``--resize crop:224x224``, DirectRunner
in-process, its shard writer decoding on every core) and analyzes the result with the
analyze job as it runs by default (in-process) and, for context, with ``--workers``
worker processes. For every run: wall seconds, seconds per 1,000 images,
CPU seconds of the whole process tree (the honest figure on a shared machine) and peak
RSS of the tree. The analyze job reads only the train split, so its per-1,000 figures
are per 1,000 train images.

Besides the totals, the slope between N and 4N (marginal seconds per 1,000 images)
separates the per-image cost from the fixed cost of starting TensorFlow Transform, which
a tiny dataset's analysis shows on its own; from both, the dataset size from which the
totals meet the target.

Prints one table. Ratios are what matter: absolute rates depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.convert import first_images, photo_tree, run_job
from devtools.sample_data import write_photo_tree
from s3tfr.contract import MANIFEST


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measure(args: list[str], module: str) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds of the job's process tree, peak RSS bytes)."""
    cpu = _children_cpu()
    seconds, rss = run_job(args, module=module)
    return seconds, _children_cpu() - cpu, rss


def _train_images(dataset: str) -> int:
    with open(os.path.join(dataset, MANIFEST)) as f:
        return json.load(f)["splits"]["train"]["examples"]


def break_even(runs: dict, name: str, target: float = 0.5) -> str:
    """From which source dataset size the analyze job's total wall time per 1,000 train
    images is ``target`` times the convert job's per 1,000 images, by a straight line
    through each job's N and 4N runs (fixed seconds + seconds per image)."""

    def line(job):
        (w1, _, n1, _), (w4, _, n4, _) = runs[(job, 1)], runs[(job, 4)]
        slope = (w4 - w1) / (n4 - n1)
        return w1 - slope * n1, slope

    (fixed_a, per_a), (fixed_c, per_c) = line(name), line("convert")
    train = (
        runs[(name, 1)][2] / runs[("convert", 1)][2]
    )  # train images per source image
    head = (
        f"fixed {fixed_a:.1f} s + {per_a * 1000:.2f} s per 1000 train images; convert "
        f"fixed {fixed_c:.1f} s + {per_c * 1000:.2f} s per 1000 images"
    )
    if per_a <= 0 or per_c <= 0:
        return (
            f"{head}: N and 4N too close in time to fit a line (noise); use a larger N"
        )
    # analyze(n) / (train n) <= target * convert(n) / n, with n source images
    if per_a >= target * per_c:
        return f"{head}: the totals never reach {target}x"
    n = (fixed_a - target * train * fixed_c) / (train * (target * per_c - per_a))
    return f"{head}: the totals reach {target}x from about {max(n, 0):,.0f} images"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # Analysis has a fixed start (TensorFlow's import, tracing, SavedModels) of a few
    # seconds; N is large enough that it is not most of the N run.
    parser.add_argument("--images", type=int, default=8000, help="N (also run at 4N)")
    parser.add_argument(
        "--workers", type=int, default=2, help="analyze's worker processes (context rows)"
    )
    parser.add_argument(
        "--resize", default="crop:224x224", help="the convert job's resize"
    )
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    multi = f"{args.workers} processes"
    # Both jobs as they run by default on local paths: in-process (in_memory), the
    # convert job's shard writer decoding on every core.
    processes = [
        "--direct_running_mode=multi_processing",
        f"--direct_num_workers={args.workers}",
    ]
    rows = []  # (variant, images, wall, cpu, rss)
    runs = {}  # (job, scale) -> (wall, cpu, images, rss)

    with tempfile.TemporaryDirectory() as tmp:
        tiny_src, tiny_out = os.path.join(tmp, "tiny"), os.path.join(tmp, "tiny-out")
        write_photo_tree(tiny_src, 20, seed=2)
        run_job(["--input", tiny_src, "--output", tiny_out, "--resize", args.resize])
        wall, cpu, rss = measure(["--dataset", tiny_out], "beam_jobs.analyze")
        rows.append(
            ("analyze, 20 images: fixed cost", _train_images(tiny_out), wall, cpu, rss)
        )

        src4 = os.path.join(tmp, "src4")
        source_bytes = photo_tree(src4, 4 * args.images, 1, os.cpu_count() or 1)
        print(
            f"generated {4 * args.images} 500x375 JPEGs ({source_bytes / 1e6:.0f} MB)",
            file=sys.stderr,
        )
        first_images(src4, os.path.join(tmp, "src1"), args.images)
        for scale, label in ((1, "N"), (4, "4N")):
            n = scale * args.images
            src, out = (
                os.path.join(tmp, f"src{scale}"),
                os.path.join(tmp, f"out{scale}"),
            )
            convert = [
                "--input",
                src,
                "--output",
                out,
                "--resize",
                args.resize,
            ]
            wall, cpu, rss = measure(convert, "beam_jobs.convert")
            rows.append((f"convert, in-process, {label}", n, wall, cpu, rss))
            runs[("convert", scale)] = (wall, cpu, n, rss)
            train = _train_images(out)
            for name, extra in (("in-process", []), (multi, processes)):
                wall, cpu, rss = measure(
                    ["--dataset", out, *extra], "beam_jobs.analyze"
                )
                rows.append((f"analyze, {name}, {label}", train, wall, cpu, rss))
                runs[(name, scale)] = (wall, cpu, train, rss)

    print(
        f"\nanalyze benchmark: photo-like 500x375 JPEGs converted with --resize "
        f"{args.resize}, N={args.images}, {os.cpu_count()} cores"
    )
    print(
        "| variant | images | seconds | s / 1000 images | CPU s | CPU s / 1000 | peak RSS |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, count, wall, cpu, rss in rows:
        print(
            f"| {name} | {count} | {wall:.1f} | {wall / count * 1000:.2f} | {cpu:.1f} | "
            f"{cpu / count * 1000:.2f} | {rss / 2**20:.0f} MB |"
        )

    def per_image(run, column):
        return run[column] / run[2]

    def marginal(job, column):
        # the extra cost per extra image between N and 4N: the fixed costs cancel out
        (one, four) = runs[(job, 1)], runs[(job, 4)]
        return (four[column] - one[column]) / (four[2] - one[2])

    print("\n| ratio (analyze / convert, per 1000 images) | wall | CPU | target |")
    print("|---|---:|---:|---:|")
    for name in ("in-process", multi):
        for scale, label in ((1, "N"), (4, "4N")):
            a, c = runs[(name, scale)], runs[("convert", scale)]
            wall_ratio = per_image(a, 0) / per_image(c, 0)
            cpu_ratio = per_image(a, 1) / per_image(c, 1)
            print(f"| {name}, {label} | {wall_ratio:.2f} | {cpu_ratio:.2f} | <= 0.5 |")
        wall_ratio = marginal(name, 0) / marginal("convert", 0)
        cpu_ratio = marginal(name, 1) / marginal("convert", 1)
        print(
            f"| {name}, marginal (N to 4N) | {wall_ratio:.2f} | {cpu_ratio:.2f} | <= 0.5 |"
        )
    for name in ("in-process", multi):
        rss_n, rss_4n = runs[(name, 1)][3], runs[(name, 4)][3]
        print(
            f"| peak RSS analyze {name}, 4N / N | {rss_4n / rss_n:.2f} "
            f"({rss_n / 2**20:.0f} -> {rss_4n / 2**20:.0f} MB) | | flat |"
        )
    print()
    for name in ("in-process", multi):
        print(f"- analyze {name}: {break_even(runs, name)}")


if __name__ == "__main__":
    main()
