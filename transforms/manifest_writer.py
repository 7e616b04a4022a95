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
from s3tfr.contract import (
    FORMAT_VERSION,
    LABELS,
    MANIFEST,
    REJECTED_FILE,
    index_name,
    shard_name,
)
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


def _merge_stats(shards: list[dict], base: dict | None = None, base_examples: int = 0) -> dict:
    """The source image statistics of ``shards`` (converted by this run), merged with
    those of a committed dataset (``base``, over ``base_examples`` images) when
    appending."""
    formats: collections.Counter[str] = collections.Counter()
    height, width, examples = [None, 0, 0], [None, 0, 0], 0
    if base and base_examples:
        formats.update(base["source_formats"])
        examples = base_examples
        for acc, name in ((height, "source_height"), (width, "source_width")):
            summary = base[name]
            acc[0], acc[1], acc[2] = summary["min"], summary["max"], summary["mean"] * examples
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


def _entry(shard: dict) -> dict:
    return {key: shard[key] for key in ("file", "examples", "bytes", "sha256")}


def _full_splits(run: OutputRun, shards: list[dict]) -> dict[str, tuple[list[dict], collections.Counter]]:
    """A full conversion's splits: its shards, numbered ``00000 .. N-1`` of ``N`` without
    a gap (a shard whose every image was rejected was not written: the others of its
    split are renamed, each with its key index)."""
    by_split: dict[str, list[dict]] = collections.defaultdict(list)
    for shard in sorted(shards, key=lambda s: s["file"]):
        if shard["examples"]:
            by_split[shard["split"]].append(shard)
    splits = {}
    for split, written in sorted(by_split.items()):
        entries = []
        counts: collections.Counter[str] = collections.Counter()
        for index, shard in enumerate(written):
            final = shard_name(split, index, len(written))
            if final != shard["file"]:
                mark_written(run, final)
                for old, new in ((shard["file"], final),
                                 (index_name(shard["file"]), index_name(final))):  # fmt: skip
                    storage.rename(run.uri(old), run.uri(new), run.config)
            entries.append({**_entry(shard), "file": final})
            counts.update(shard["stats"]["class_counts"])
        splits[split] = (entries, counts)
    return splits


def _appended_splits(base: dict, shards: list[dict]) -> dict[str, tuple[list[dict], collections.Counter]]:
    """An append's splits: the committed shards it did not replace, its copies of those
    it did (less the changed and deleted sources' records), and its new shards, in
    name order; names may skip numbers (a replaced shard's, an empty group's)."""
    replaced = {s["replaces"] for s in shards if "replaces" in s}
    entries: dict[str, list[dict]] = collections.defaultdict(list)
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for split, entry in base["splits"].items():
        entries[split] += [e for e in entry["shards"] if e["file"] not in replaced]
        counts[split].update(entry["class_counts"])
    for shard in shards:
        split, stats = shard["split"], shard["stats"]
        if "replaces" in shard:
            counts[split].subtract(stats["dropped_class_counts"])
        else:
            counts[split].update(stats["class_counts"])
        if shard["examples"]:
            entries[split].append(_entry(shard))
    return {
        split: (sorted(entries[split], key=lambda e: e["file"]), counts[split])
        for split in sorted(entries)
        if entries[split]
    }


def commit_dataset(
    run: OutputRun,
    shards: list[dict],
    rejected: list[Rejection],
    labels: list[str],
    listed: int,
    base_info: dict,
    base: dict | None = None,
    held: int = 0,
) -> dict:
    """Finishes a dataset: names, cleans, and writes the metadata files, manifest last.

    Beside labels.txt and rejected.jsonl, the metadata files are TensorFlow Datasets'
    (:func:`transforms.tfds_metadata.tfds_files`), for an uncompressed dataset. Only
    files the dataset owns are deleted (:func:`transforms.commit.finish`).

    Args:
        base: the committed manifest an append (``convert --append``) adds to; ``None``
            for a full conversion.
        held: with ``base``, its records whose sources are listed unchanged.

    Returns:
        The manifest dict that was written.

    Raises:
        AccountingError: if ``listed != converted + rejected``, or an append's held and
            dropped records do not add up to the committed ones (nothing is written then).
        LeaseLost, FileExistsError: another run holds the prefix or committed first.
    """
    new = [s for s in shards if "replaces" not in s]
    converted_new = sum(s["examples"] for s in new)
    if base is not None:
        dropped = sum(s["dropped"] for s in shards if "replaces" in s)
        committed = sum(split["examples"] for split in base["splits"].values())
        if held != committed - dropped:
            raise AccountingError(
                f"the dataset held {committed} records, {dropped} were dropped and "
                f"{held} matched the listing: refusing to commit the append"
            )
    if listed != held + converted_new + len(rejected):
        raise AccountingError(
            f"listed {listed} objects but converted {held + converted_new} and rejected "
            f"{len(rejected)}: refusing to mark the dataset complete"
        )
    found = _full_splits(run, shards) if base is None else _appended_splits(base, shards)
    splits = {
        split: {
            "examples": sum(e["examples"] for e in entries),
            "bytes": sum(e["bytes"] for e in entries),
            "num_shards": len(entries),
            "class_counts": {label: counts.get(label, 0) for label in labels},
            "shards": entries,
        }
        for split, (entries, counts) in found.items()
    }
    ordered = sorted(rejected, key=lambda r: (r.key, r.stage, r.code))
    by_code = collections.Counter(r.code for r in ordered)
    converted = sum(split["examples"] for split in splits.values())
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
        "image_stats": _merge_stats(new),
    }
    if base is not None:
        info["image_stats"] = _merge_stats(new, base["image_stats"], held + dropped)
        info["appends"] = [*base.get("appends", []), {
            "added": converted_new, "dropped": dropped,
            "replaced_shards": sorted(s["replaces"] for s in shards if "replaces" in s),
            "codecs": base_info.get("codecs", {}),
        }]  # fmt: skip
        info["codecs"] = base.get("codecs", info.get("codecs"))
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
        base: the committed manifest an append adds to (``None``: a full conversion).
        held: with ``base``, a one-element PCollection: its records still listed unchanged.

    The input is a dict: ``"shards"`` (shard info dicts) and ``"rejected"`` (Rejection).
    Returns a one-element PCollection with the written manifest dict.
    """

    def __init__(
        self, run: OutputRun, labels, listed, base_info: dict, base: dict | None = None,
        held=None,
    ) -> None:  # fmt: skip
        super().__init__()
        self._run = run
        self._labels = labels
        self._listed = listed
        self._base_info = base_info
        self._base = base
        self._held = held

    def expand(self, inputs):
        run, base_info, base = self._run, self._base_info, self._base

        def commit(results: list, labels: list[str], listed: int, held: int = 0) -> dict:
            shards = [r for r in results if not isinstance(r, Rejection)]
            rejected = [r for r in results if isinstance(r, Rejection)]
            return commit_dataset(run, shards, rejected, labels, listed, base_info, base, held)

        # One list of both (shard info dicts and rejections), so one combine: with no
        # input at all it still holds one (empty) list, and the commit still runs.
        return (
            (inputs["shards"], inputs["rejected"])
            | "AllResults" >> beam.Flatten()
            | "ResultList" >> beam.combiners.ToList()
            | "Commit"
            >> beam.Map(
                commit,
                pvalue.AsSingleton(self._labels),
                pvalue.AsSingleton(self._listed),
                *([pvalue.AsSingleton(self._held)] if self._held is not None else []),
            )
        )
