"""HashSources and Deduplicate: the sources' content, before splits are picked.

Splits picked from a hash of the key put the same bytes under two names in different
splits as often as not (train/validation leakage). With ``--split_by content`` the split
comes from the hash of the source's bytes instead, so exact duplicates always share a
split, and an image keeps its split when others are added or it is renamed; with
``--dedupe exact`` one source per content is kept (the first key) and its twins are
rejected, each naming the one kept. Both read every source once more than a plain
conversion: one extra GET per object on S3.

The writer checks each source's SHA-256 against the one it was assigned by, so a source
rewritten during the job is rejected (``changed_while_converting``), never written into
the split picked for other bytes.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
from typing import NamedTuple

import apache_beam as beam
from apache_beam import pvalue

from s3tfr import s3
from s3tfr.host import usable_cpus
from s3tfr.s3 import S3Config
from transforms.duplicates import NearPairs, converted_hash, groups_of
from transforms.listing import METRICS_NAMESPACE, REJECTED, count_rejection
from transforms.references import ImageRef, Rejection
from transforms.sharding import assign_problem
from transforms.sources import read_source

__all__ = ["Deduplicate", "GroupNear", "HashSources"]

DEMOTED = "demoted"
# References travel in lists of up to this many, as the listing emits them.
_LIST_SIZE = 1000
# The largest near-duplicate group put in one split (see _near_roots).
MAX_NEAR_GROUP = 32
_NOT_MERGED = beam.metrics.Metrics.counter(METRICS_NAMESPACE, "near_groups_not_merged")
_NOT_MERGED_IMAGES = beam.metrics.Metrics.counter(METRICS_NAMESPACE, "near_images_not_merged")


class _HashFn(beam.DoFn):
    """[ImageRef] -> [ImageRef] with ``sha256`` set; a Rejection per unreadable source."""

    def __init__(
        self, input_root: str, max_concurrent_gets: int, config, perceptual, progress
    ) -> None:
        self._input = input_root
        self._gets = max_concurrent_gets
        self._config = config
        self._perceptual = perceptual
        self._progress = progress
        self._planned_for: object = None
        self._hashed = beam.metrics.Metrics.counter(METRICS_NAMESPACE, "hashed")

    def setup(self) -> None:
        # Hashing releases the GIL: local reads need a few threads, S3 GETs many.
        threads = self._gets if s3.is_s3(self._input) else 2 * usable_cpus()
        self._pool = concurrent.futures.ThreadPoolExecutor(threads)

    def teardown(self) -> None:
        self._pool.shutdown()

    def _hash(self, ref: ImageRef) -> ImageRef | Rejection:
        data = read_source(self._input, ref.key, self._config)
        if isinstance(data, Rejection):
            return data
        ref = ref._replace(sha256=hashlib.sha256(data).hexdigest())
        if self._perceptual:
            ref = ref._replace(phash=converted_hash(data, self._perceptual))
        return ref

    def process(self, refs: list[ImageRef], listed: int | None = None):
        task = None
        if self._progress is not None:
            if self._planned_for is None:
                self._progress.set_total(listed or 0)
                self._planned_for = listed
            # Keys are unique: the first names this list's task.
            task = self._progress.task(hashlib.sha1(refs[0].key.encode(
                "utf-8", "surrogateescape")).hexdigest())  # fmt: skip
        hashed = []
        for result in self._pool.map(self._hash, refs):
            if task:
                task.add(1)
            if isinstance(result, Rejection):
                yield pvalue.TaggedOutput(REJECTED, count_rejection(result))
            else:
                hashed.append(result)
        if task:
            task.finish()
        self._hashed.inc(len(hashed))
        if hashed:
            yield hashed


class HashSources(beam.PTransform):
    """Lists of ``ImageRef`` -> the same with each source's SHA-256, and with
    ``perceptual`` (the job's ``ConvertSettings``) the perceptual hash of the image the
    dataset will hold too: the source converted as the writer will convert it (a
    conversion's work) and hashed as ``inspect --verify`` hashes records, so both judge
    the same pixels the same way.

    ``progress`` (a ``ProgressFolder``) with ``listed`` (a one-element PCollection: the
    objects listed, the planned total) reports the sources hashed.

    Returns:
        A dict: ``"refs"`` (lists of ``ImageRef``) and ``"rejected"`` (sources gone or
        unreadable since they were listed).
    """

    def __init__(
        self,
        input_root: str,
        max_concurrent_gets: int,
        config: S3Config | None,
        perceptual=None,
        progress=None,
        listed=None,
    ) -> None:
        super().__init__()
        self._fn = _HashFn(input_root, max_concurrent_gets, config, perceptual, progress)
        self._listed = listed

    def expand(self, refs):
        listed = [pvalue.AsSingleton(self._listed)] if self._listed is not None else []
        hashed = refs | "Hash" >> beam.ParDo(self._fn, *listed).with_outputs(
            REJECTED, main="refs"
        )
        return {"refs": hashed.refs, "rejected": hashed[REJECTED]}


class _Held(NamedTuple):
    """A reference whose record the dataset already holds (``convert --append``), in
    the committed shard ``file``."""

    ref: ImageRef
    file: str


def _keep_first(group, labels: list[str]):
    """(sha256, refs) -> the first ref by key among those AssignShards will take (a
    class in ``labels``, a valid split folder), else the first of all; a Rejection for
    each of its twins. Empty files are not deduplicated: each is rejected as empty.

    With records the dataset already holds (``_Held``, ``convert --append``), the same
    choice is made among them and the new references together, as a full conversion
    would make it: a held record that is kept stays; one that is not is DEMOTED (its
    record dropped, its key rejected as a twin), and a new reference kept is converted.
    """
    _digest, members = group
    held = {m.ref.key: m for m in members if isinstance(m, _Held)}
    refs = [m.ref if isinstance(m, _Held) else m for m in members]
    if not held and (len(refs) == 1 or refs[0].size == 0):
        yield from refs
        return
    known = set(labels)
    kept, *twins = sorted(refs, key=lambda r: (assign_problem(r, known) is not None, r))
    if kept.key not in held:
        yield kept
    # Identical bytes convert identically, so the kept one's fate is the twins' too.
    fate = "if it is rejected too, its own line says why"
    for twin in twins:
        if twin.key in held:
            yield pvalue.TaggedOutput(DEMOTED, (held[twin.key].file, twin.key))
        if twin.label == kept.label:
            code, reason = "duplicate", f"the same bytes as {kept.key}, kept instead ({fate})"
        else:
            reason = (
                f"the same bytes as {kept.key}, kept instead in class {kept.label!r} "
                f"({fate})"
            )
            code = "label_conflict"
        yield pvalue.TaggedOutput(
            REJECTED, count_rejection(Rejection(twin.key, "dedupe", code, reason))
        )


class Deduplicate(beam.PTransform):
    """Lists of hashed ``ImageRef`` -> one per content, in lists again.

    The kept one is the first key in sorting order among those AssignShards will take
    (``sharding.assign_problem``: a twin in a listed class and a valid split folder is
    kept over one AssignShards would reject), whatever else is listed with it, so the
    same input always keeps the same images. Only references are grouped.

    Args:
        labels: a one-element PCollection holding the class names.
        held: ``convert --append``: lists of ``(ImageRef, shard)`` (with their SHA-256)
            whose records the dataset holds: twins like any other.

    Returns:
        A dict: ``"refs"`` (lists of ``ImageRef``), ``"rejected"`` (the twins, code
        ``duplicate``, or ``label_conflict`` where the twin is in another class) and
        ``"demoted"`` (``(shard, key)`` of held records that are twins now: to drop).
    """

    def __init__(self, labels, held=None) -> None:
        super().__init__()
        self._labels = labels
        self._held = held

    def expand(self, refs):
        by_content = refs | "ByContent" >> beam.FlatMap(
            lambda batch: ((r.sha256, r) for r in batch)
        )
        if self._held is not None:
            held = self._held | "HeldByContent" >> beam.FlatMap(
                lambda batch: ((r.sha256, _Held(r, file)) for r, file in batch)
            )
            by_content = (by_content, held) | "WithHeld" >> beam.Flatten()
        kept = (
            by_content
            | "GroupByContent" >> beam.GroupByKey()
            | "KeepFirst"
            >> beam.FlatMap(_keep_first, pvalue.AsSingleton(self._labels)).with_outputs(
                REJECTED, DEMOTED, main="refs"
            )
        )
        lists = kept.refs | "Lists" >> beam.BatchElements(
            min_batch_size=1, max_batch_size=_LIST_SIZE
        )
        return {"refs": lists, "rejected": kept[REJECTED], "demoted": kept[DEMOTED]}


def _near_roots(pairs) -> dict[str, str]:
    """key -> the smallest SHA-256 of its near-duplicate group, for grouped keys only.

    A group of more than ``MAX_NEAR_GROUP`` images is not copies of one picture but a
    family the hash cannot tell apart (flat colours, centred shapes on one background,
    chained by small differences): merged, it would move a large share of the dataset
    into one split. Such groups are left to the content split, and counted
    (``near_groups_not_merged``, ``near_images_not_merged``).
    """
    roots = {}
    for group in groups_of(pairs):
        if len(group) > MAX_NEAR_GROUP:
            _NOT_MERGED.inc()
            _NOT_MERGED_IMAGES.inc(len(group))
            continue
        root = min(ref.sha256 for ref in group)
        roots.update((ref.key, root) for ref in group)
    return roots


class GroupNear(beam.PTransform):
    """Lists of ``ImageRef`` with perceptual hashes -> a one-element PCollection: the
    dict from each key in a near-duplicate group to the content its group's split is
    picked by (the group's smallest SHA-256), for ``AssignShards``. Only the hashes of
    the references are grouped; the pairs, few, meet on one worker."""

    def expand(self, refs):
        return (
            refs
            | "Hashed" >> beam.FlatMap(lambda batch: (r for r in batch if r.phash >= 0))
            | "NearPairs" >> NearPairs()
            | "AllPairs" >> beam.combiners.ToList()
            | "Roots" >> beam.Map(_near_roots)
        )
