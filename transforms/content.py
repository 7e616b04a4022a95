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

import apache_beam as beam
from apache_beam import pvalue

from s3tfr import s3
from s3tfr.host import usable_cpus
from s3tfr.s3 import S3Config
from transforms.duplicates import NearPairs, groups_of, source_hash
from transforms.listing import METRICS_NAMESPACE, REJECTED, count_rejection
from transforms.references import ImageRef, Rejection
from transforms.sources import read_source

__all__ = ["Deduplicate", "GroupNear", "HashSources"]

# References travel in lists of up to this many, as the listing emits them.
_LIST_SIZE = 1000


class _HashFn(beam.DoFn):
    """[ImageRef] -> [ImageRef] with ``sha256`` set; a Rejection per unreadable source."""

    def __init__(
        self, input_root: str, max_concurrent_gets: int, config, perceptual_max_pixels: int
    ) -> None:
        self._input = input_root
        self._gets = max_concurrent_gets
        self._config = config
        self._perceptual = perceptual_max_pixels
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
            ref = ref._replace(phash=source_hash(data, self._perceptual))
        return ref

    def process(self, refs: list[ImageRef]):
        hashed = []
        for result in self._pool.map(self._hash, refs):
            if isinstance(result, Rejection):
                yield pvalue.TaggedOutput(REJECTED, count_rejection(result))
            else:
                hashed.append(result)
        self._hashed.inc(len(hashed))
        if hashed:
            yield hashed


class HashSources(beam.PTransform):
    """Lists of ``ImageRef`` -> the same with each source's SHA-256, and with
    ``perceptual_max_pixels`` its perceptual hash too (the source decoded within that
    pixel limit and shrunk to 64x64 gray: about half a conversion's work).

    Returns:
        A dict: ``"refs"`` (lists of ``ImageRef``) and ``"rejected"`` (sources gone or
        unreadable since they were listed).
    """

    def __init__(
        self,
        input_root: str,
        max_concurrent_gets: int,
        config: S3Config | None,
        perceptual_max_pixels: int = 0,
    ) -> None:
        super().__init__()
        self._fn = _HashFn(input_root, max_concurrent_gets, config, perceptual_max_pixels)

    def expand(self, refs):
        hashed = refs | "Hash" >> beam.ParDo(self._fn).with_outputs(REJECTED, main="refs")
        return {"refs": hashed.refs, "rejected": hashed[REJECTED]}


def _keep_first(group, labels: list[str]):
    """(sha256, refs) -> the first ref by key of a class in ``labels`` (else the first
    of all, which AssignShards then rejects as an unknown class); a Rejection for each
    of its twins."""
    _digest, refs = group
    known = set(labels)
    ordered = sorted(refs, key=lambda r: (r.label not in known, r))
    kept, *twins = ordered
    yield kept
    for twin in twins:
        if twin.label == kept.label:
            code, reason = "duplicate", f"the same bytes as {kept.key}, which is kept"
        else:
            code, reason = (
                "label_conflict",
                f"the same bytes as {kept.key}, which is kept in class {kept.label!r}",
            )
        yield pvalue.TaggedOutput(
            REJECTED, count_rejection(Rejection(twin.key, "dedupe", code, reason))
        )


class Deduplicate(beam.PTransform):
    """Lists of hashed ``ImageRef`` -> one per content, in lists again.

    The kept one is the first key in sorting order among those of a known class (with
    ``--labels_file``, a twin in a listed class is kept over one in a class the file
    leaves out), whatever else is listed with it, so the same input always keeps the
    same images. Only references are grouped.

    Args:
        labels: a one-element PCollection holding the class names.

    Returns:
        A dict: ``"refs"`` (lists of ``ImageRef``) and ``"rejected"`` (the twins, code
        ``duplicate``, or ``label_conflict`` where the twin is in another class).
    """

    def __init__(self, labels) -> None:
        super().__init__()
        self._labels = labels

    def expand(self, refs):
        kept = (
            refs
            | "ByContent" >> beam.FlatMap(lambda batch: ((r.sha256, r) for r in batch))
            | "GroupByContent" >> beam.GroupByKey()
            | "KeepFirst"
            >> beam.FlatMap(_keep_first, pvalue.AsSingleton(self._labels)).with_outputs(
                REJECTED, main="refs"
            )
        )
        lists = kept.refs | "Lists" >> beam.BatchElements(
            min_batch_size=1, max_batch_size=_LIST_SIZE
        )
        return {"refs": lists, "rejected": kept[REJECTED]}


def _near_roots(pairs) -> dict[str, str]:
    """key -> the smallest SHA-256 of its near-duplicate group, for grouped keys only."""
    roots = {}
    for group in groups_of(pairs):
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
