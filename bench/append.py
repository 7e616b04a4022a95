"""``convert --append`` against a full reconvert, both measured in the same run.

    .venv/bin/python bench/append.py [--images 4000] [--s3_images 2000] [--rounds 2]

Generates N photo-like 500x375 JPEGs and converts them (``--resize crop:224x224``). Then,
for each case, starting each time from a copy of that committed dataset:

- **nothing changed**: the input as converted (an append's floor: start-up, listing,
  reading the key indexes, committing; a full reconvert converts everything again);
- **1 % new**: N/100 new images are added to the input;
- **1 % deleted**: N/100 images are deleted (their records are dropped: the shards
  holding them are copied without them);

and measures, on the same input, ``convert --append`` and the plain rerun a user would
run without it (a full reconvert of everything), each in its own process (start-up
included: both pay the same). Reported per case: wall seconds (fastest of ``--rounds``,
the two in turn), bytes written under the output (files created or replaced), and
shards created. On S3 (``--s3_images``), the same on the local S3 server behind the
project's proxy with ``--latency_ms`` per request.

Prints one table. The ratios are what matter: absolute times depend on the machine.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.convert import photo_tree, run_job
from bench.servers import proxied_s3
from devtools.local_s3 import put_tree
from s3tfr import s3, storage

BUCKET = "bench-append"
OPTIONS = ["--resize", "crop:224x224"]


def _state(out: str) -> dict[str, tuple[int, str]]:
    """name -> (size, stamp) of every file under the output. Locally the stamp is the
    modification time; on S3 the metadata the copy set (``_copy``), which a job's
    rewrite does not keep: an ETag would not tell a rewrite with the same bytes."""
    if s3.is_s3(out):
        bucket, prefix = s3.parse(out)
        prefix = prefix.rstrip("/") + "/"
        client = s3.client()
        return {
            o.key[len(prefix):]: (o.size, client.head_object(Bucket=bucket, Key=o.key)
                                  .get("Metadata", {}).get("bench", "written"))
            for o in s3.iter_objects(bucket, prefix)
        }  # fmt: skip
    found = {}
    for rel, size in storage.walk(out):
        found[rel] = (size, str(os.stat(os.path.join(out, rel)).st_mtime_ns))
    return found


def _written(before: dict, after: dict) -> tuple[int, int]:
    """(bytes of files created or replaced, shards created or replaced)."""
    changed = [name for name, value in after.items() if before.get(name) != value]
    return (
        sum(after[name][0] for name in changed),
        sum(name.endswith(".tfrecord") for name in changed),
    )


def _copy(src: str, dest: str) -> None:
    """Copies a dataset (local dir or S3 prefix) to ``dest``, replacing what is there."""
    if s3.is_s3(dest):
        bucket, prefix = s3.parse(dest)
        for obj in list(s3.iter_objects(bucket, prefix.rstrip("/") + "/")):
            s3.client().delete_object(Bucket=bucket, Key=obj.key)
        src_bucket, src_prefix = s3.parse(src)
        src_prefix = src_prefix.rstrip("/") + "/"
        for obj in s3.iter_objects(src_bucket, src_prefix):
            rel = obj.key[len(src_prefix):]
            s3.client().copy_object(
                Bucket=bucket, Key=prefix.rstrip("/") + "/" + rel,
                CopySource={"Bucket": src_bucket, "Key": obj.key},
                Metadata={"bench": "copied"}, MetadataDirective="REPLACE",
            )  # fmt: skip
        return
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(src, dest)


def _measure(src: str, committed: str, out: str, append: bool) -> tuple[float, int, int]:
    _copy(committed, out)
    before = _state(out)
    seconds, _peak = run_job(
        ["--input", src, "--output", out, *OPTIONS, *(["--append"] if append else [])]
    )
    return (seconds, *_written(before, _state(out)))


def _case(src: str, committed: str, out: str, rounds: int) -> dict:
    best = {}
    for r in range(rounds):
        order = (True, False) if r % 2 == 0 else (False, True)
        for append in order:
            result = _measure(src, committed, out, append)
            if append not in best or result[0] < best[append][0]:
                best[append] = result
    return best


def _images(root: str) -> list[str]:
    return sorted(rel for rel, _ in storage.walk(root))


def _run_cases(src: str, base: str, committed: str, out: str, new: str, rounds: int,
               put, delete) -> dict[str, dict]:  # fmt: skip
    """The cases on one input: as converted, measure; add ``new``'s images, measure;
    remove them and delete 1 % of the originals, measure."""
    results = {}
    run_job(["--input", src, "--output", committed, *OPTIONS])
    # The append's floor: start-up, listing, reading the key indexes, the commit.
    results["nothing changed"] = _case(src, committed, out, rounds)
    added = _images(new)
    put(new)
    results["1 % new"] = _case(src, committed, out, rounds)
    for rel in added:
        delete(rel)
    gone = _images(base)[:: 100][: len(added)]
    for rel in gone:
        delete(rel)
    results["1 % deleted"] = _case(src, committed, out, rounds)
    return results


def _table(where: str, n: int, results: dict[str, dict]) -> None:
    print(f"\n{where}, N = {n:,} images, fastest of the rounds")
    print("| case | append s | full reconvert s | time ratio | append MB written "
          "| full MB written | bytes ratio | shards written (append / full) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for case, best in results.items():
        (a_s, a_b, a_n), (f_s, f_b, f_n) = best[True], best[False]
        print(f"| {case} | {a_s:.1f} | {f_s:.1f} | {a_s / f_s:.2f} | {a_b / 1e6:.2f} "
              f"| {f_b / 1e6:.1f} | {a_b / max(f_b, 1):.3f} | {a_n} / {f_n} |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=4000, help="N, local")
    parser.add_argument("--s3_images", type=int, default=2000, help="N on S3 (0: skip)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--latency_ms", type=float, default=50)
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="bench-append-")
    try:
        src, new = os.path.join(work, "src"), os.path.join(work, "new")
        os.makedirs(src)
        os.makedirs(new)
        photo_tree(src, args.images, seed=1, processes=2)
        photo_tree(new, max(1, args.images // 100), seed=2, processes=2)
        for rel in _images(new):  # new names: added, not replacing
            folder, name = rel.split("/")
            os.rename(os.path.join(new, rel), os.path.join(new, folder, f"new_{name}"))
        pristine = os.path.join(work, "pristine")
        shutil.copytree(src, pristine)

        def put_local(tree: str) -> None:
            shutil.copytree(tree, src, dirs_exist_ok=True)

        def delete_local(rel: str) -> None:
            os.remove(os.path.join(src, rel))

        results = _run_cases(src, pristine, os.path.join(work, "committed"),
                             os.path.join(work, "out"), new, args.rounds, put_local,
                             delete_local)  # fmt: skip
        _table("Local disk", args.images, results)

        if args.s3_images:
            with proxied_s3(args.latency_ms, BUCKET) as servers:
                os.environ["AWS_ENDPOINT_URL_S3"] = servers.proxy_endpoint
                subset = os.path.join(work, "subset")
                names = _images(pristine)[: args.s3_images]
                for rel in names:
                    os.makedirs(os.path.dirname(os.path.join(subset, rel)), exist_ok=True)
                    os.link(os.path.join(pristine, rel), os.path.join(subset, rel))
                few = os.path.join(work, "few")
                for rel in _images(new)[: max(1, args.s3_images // 100)]:
                    os.makedirs(os.path.dirname(os.path.join(few, rel)), exist_ok=True)
                    os.link(os.path.join(new, rel), os.path.join(few, rel))
                put_tree(subset, BUCKET, "images/")
                s3_src = f"s3://{BUCKET}/images/"

                def put_s3(tree: str) -> None:
                    put_tree(tree, BUCKET, "images/")

                def delete_s3(rel: str) -> None:
                    storage.delete(storage.join(s3_src, rel))

                results = _run_cases(s3_src, subset, f"s3://{BUCKET}/committed/",
                                     f"s3://{BUCKET}/out/", few, args.rounds, put_s3,
                                     delete_s3)  # fmt: skip
                _table(f"S3 (local server, +{args.latency_ms:.0f} ms per request)",
                       args.s3_images, results)  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
