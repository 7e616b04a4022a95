"""WriteManifest: shard infos and rejections in; labels.txt, rejected.jsonl, TensorFlow
Datasets' metadata (:mod:`transforms.tfds_metadata`) and, last, s3tfr_manifest.json out.

``s3tfr_manifest.json`` is the commit marker: it is written only after every shard is in
place under its final name, the stale shards the dataset owned are gone and the other
files are written, only when every listed object is accounted for (``listed = converted +
rejected``), and only by the run that holds the output's lease (:mod:`transforms.commit`).
"""

from __future__ import annotations

import collections
import json

import apache_beam as beam
from apache_beam import pvalue

from s3tfr import storage
from s3tfr.contract import FORMAT_VERSION, LABELS, MANIFEST, REJECTED_FILE, shard_name
from transforms.commit import OutputRun, finish, mark_written
from transforms.references import Rejection
from transforms.tfds_metadata import tfds_files

__all__ = [
    "FEATURES",
    "FORMAT_VERSION",
    "MANIFEST",
    "WriteManifest",
    "commit_dataset",
]

FEATURES = {
    "image/encoded": {"dtype": "string", "description": "encoded image (JPEG or PNG)"},
    "image/format": {"dtype": "string", "description": "jpeg or png"},
    "image/height": {"dtype": "int64", "description": "height of the encoded image"},
    "image/width": {"dtype": "int64", "description": "width of the encoded image"},
    "image/channels": {"dtype": "int64", "description": "3 (RGB) or 1 (grayscale)"},
    "image/class/label": {"dtype": "int64", "description": "line index in labels.txt"},
    "image/class/text": {"dtype": "string", "description": "class name"},
    "image/filename": {"dtype": "string", "description": "source key under the input"},
    "image/source_sha256": {"dtype": "string", "description": "hex sha256 of the source"},
}


class AccountingError(RuntimeError):
    """Listed objects are missing from both the output and the rejections."""


def _merge_stats(shards: list[dict]) -> dict:
    formats: collections.Counter[str] = collections.Counter()
    height, width, examples = [None, 0, 0], [None, 0, 0], 0
    for shard in shards:
        stats = shard["stats"]
        formats.update(stats["source_formats"])
        examples += shard["examples"]
        for acc, (lo, hi, total) in ((height, stats["height"]), (width, stats["width"])):
            if shard["examples"]:
                acc[0] = lo if acc[0] is None else min(acc[0], lo)
                acc[1], acc[2] = max(acc[1], hi), acc[2] + total

    def _summary(acc):
        return {"min": acc[0] or 0, "max": acc[1], "mean": round(acc[2] / examples, 2)
                if examples else 0}  # fmt: skip

    return {
        "source_height": _summary(height),
        "source_width": _summary(width),
        "source_formats": dict(sorted(formats.items())),
    }


def commit_dataset(
    run: OutputRun,
    shards: list[dict],
    rejected: list[Rejection],
    labels: list[str],
    listed: int,
    base_info: dict,
) -> dict:
    """Finishes a dataset: names, cleans, and writes the metadata files, manifest last.

    Beside labels.txt and rejected.jsonl, the metadata files are TensorFlow Datasets'
    (:func:`transforms.tfds_metadata.tfds_files`), for an uncompressed dataset.

    A shard whose every image was rejected was not written; the others of its split are
    then renamed so that names run ``00000 .. N-1`` of ``N`` without a gap. Only files the
    dataset owns are deleted (:func:`transforms.commit.finish`).

    Returns:
        The manifest dict that was written.

    Raises:
        AccountingError: if ``listed != converted + rejected`` (nothing is written then).
        LeaseLost, FileExistsError: another run holds the prefix or committed first.
    """
    converted = sum(s["examples"] for s in shards)
    if listed != converted + len(rejected):
        raise AccountingError(
            f"listed {listed} objects but converted {converted} and rejected "
            f"{len(rejected)}: refusing to mark the dataset complete"
        )
    by_split: dict[str, list[dict]] = collections.defaultdict(list)
    for shard in sorted(shards, key=lambda s: s["file"]):
        if shard["examples"]:
            by_split[shard["split"]].append(shard)
    splits = {}
    for split, written in sorted(by_split.items()):
        entries = []
        for index, shard in enumerate(written):
            final = shard_name(split, index, len(written))
            if final != shard["file"]:
                mark_written(run, final)
                storage.rename(run.uri(shard["file"]), run.uri(final), run.config)
            entries.append(
                {
                    "file": final,
                    "examples": shard["examples"],
                    "bytes": shard["bytes"],
                    "sha256": shard["sha256"],
                }
            )
        class_counts: collections.Counter[str] = collections.Counter()
        for shard in written:
            class_counts.update(shard["stats"]["class_counts"])
        splits[split] = {
            "examples": sum(e["examples"] for e in entries),
            "bytes": sum(e["bytes"] for e in entries),
            "num_shards": len(entries),
            "class_counts": {label: class_counts.get(label, 0) for label in labels},
            "shards": entries,
        }

    ordered = sorted(rejected, key=lambda r: (r.key, r.stage, r.code))
    by_code = collections.Counter(r.code for r in ordered)
    info = {
        "format_version": FORMAT_VERSION,
        **base_info,
        "labels": labels,
        "num_classes": len(labels),
        "features": FEATURES,
        "counts": {
            "listed": listed,
            "converted": converted,
            "rejected": len(ordered),
            "rejected_by_code": dict(sorted(by_code.items())),
        },
        "splits": splits,
        "image_stats": _merge_stats(shards),
    }
    info["source"] = {**info.get("source", {}), "objects_listed": listed}
    files = {
        LABELS: "".join(f"{label}\n" for label in labels).encode(),
        REJECTED_FILE: "".join(r.to_json() + "\n" for r in ordered).encode(),
        **tfds_files(info),
    }
    keep = {e["file"] for split in splits.values() for e in split["shards"]}
    manifest = (json.dumps(info, indent=2, ensure_ascii=False) + "\n").encode()
    finish(run, keep, files, manifest)
    return info


class WriteManifest(beam.PTransform):
    """Commits a converted dataset once every shard is written.

    Args:
        run: the run that holds the output prefix.
        labels: one-element PCollection with the class names.
        listed: one-element PCollection with the number of objects listed.
        base_info: manifest fields known up front (source, options, tool).

    The input is a dict: ``"shards"`` (shard info dicts) and ``"rejected"`` (Rejection).
    Returns a one-element PCollection with the written manifest dict.
    """

    def __init__(self, run: OutputRun, labels, listed, base_info: dict) -> None:
        super().__init__()
        self._run = run
        self._labels = labels
        self._listed = listed
        self._base = base_info

    def expand(self, inputs):
        run, base = self._run, self._base

        def commit(results: list, labels: list[str], listed: int) -> dict:
            shards = [r for r in results if not isinstance(r, Rejection)]
            rejected = [r for r in results if isinstance(r, Rejection)]
            return commit_dataset(run, shards, rejected, labels, listed, base)

        # One list of both (shard info dicts and rejections), so one combine: with no
        # input at all it still holds one (empty) list, and the commit still runs.
        return (
            (inputs["shards"], inputs["rejected"])
            | "AllResults" >> beam.Flatten()
            | "ResultList" >> beam.combiners.ToList()
            | "Commit"
            >> beam.Map(commit, pvalue.AsSingleton(self._labels), pvalue.AsSingleton(self._listed))
        )
