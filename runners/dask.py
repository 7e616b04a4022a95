"""Beam's DaskRunner with the gaps fixed that real pipelines hit: a pipeline in, a Dask
task graph on a ``dask.distributed`` cluster out, with the same outputs and counters as
DirectRunner.

    --runner=DaskRunner --dask_client_address=tcp://scheduler:8786

Beam 2.77's ``apache_beam.runners.dask.dask_runner.DaskRunner`` translates a pipeline into
``dask.bag`` operations, but:

- a ParDo's tagged outputs land in the same bag as its main output, so a consumer of
  ``.with_outputs(...)[tag]`` receives every output of the step;
- a side input is computed inside each consuming task (``bag.compute()`` on a worker):
  the steps behind it run again per partition, and a one-thread worker can block on it;
- ``Reshuffle`` is a no-op and ``Create`` puts a few elements in one partition, so a
  pipeline that starts from one element (a root URI) runs as one task on one worker;
- only the bag of the last transform is computed, and ``metrics()`` raises.

This subclass keeps Beam's translation of Create, GroupByKey and Flatten and its DoFn
invoker and builds the graph itself: one bag per PCollection (a multi-output ParDo's bag
holds ``(tag, value)`` pairs that each output filters), side inputs materialised once as
graph dependencies, Reshuffle as a repartition over the cluster's threads, every leaf
computed, and each bundle's counters returned beside its outputs. As on Beam's own
runners, a CombinePerKey combines within each partition before its shuffle, and a
Flatten joins its inputs partition by partition: a convert job then runs half the
tasks that Beam's translation would give it.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import operator
import threading
import uuid

import apache_beam as beam
from apache_beam import pvalue
from apache_beam.metrics.execution import MetricsContainer
from apache_beam.pipeline import PipelineVisitor
from apache_beam.runners.common import (
    DoFnContext,
    DoFnInvoker,
    DoFnSignature,
    _OutputHandler,
)
from apache_beam.runners.dask import dask_runner as beam_dask
from apache_beam.runners.dask import overrides, transform_evaluator
from apache_beam.runners.direct.direct_metrics import DirectMetrics
from apache_beam.runners.worker import statesampler
from apache_beam.transforms import window
from apache_beam.transforms.sideinputs import SideInputMap
from apache_beam.utils import counters

__all__ = ["WORKER_CONFIG", "DaskRunner"]

# Dask's nannies set MALLOC_TRIM_THRESHOLD_ in their workers, which turns off glibc's
# adaptive mmap threshold: every decoded image buffer is then mapped and unmapped, and
# converting an image costs ~40% more CPU (measured: 0.68 vs 0.47 CPU-s per 300 photos).
# And a worker preloads this module (dask_setup below): it imports Beam and the jobs'
# transforms when it starts, not inside the first task of the first job.
# Local clusters get this config; for `dask worker` on a cluster see
# docs/RUNNING_ON_CLUSTERS.md.
WORKER_CONFIG = {
    "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None,
    "distributed.worker.preload": [__name__],
}

# The tag of the per-bundle metric updates in a ParDo's bag; no user output has it.
_METRICS_TAG = "__dask_runner_metrics__"
# Partitions per cluster thread after a Reshuffle: enough that uneven shards even out.
_PARTITIONS_PER_THREAD = 4


# DoFns set up on this worker process and idle between bundles, by (run id, step label):
# reused as Beam's own workers reuse them, so that setup() (a loaded TF graph, a client
# pool) runs once per instance instead of once per partition.
_IDLE_DOFNS: dict[tuple[str, str], list[beam.DoFn]] = collections.defaultdict(list)
_IDLE_LOCK = threading.Lock()


def dask_setup(worker) -> None:
    """Dask's preload hook (``dask worker --preload runners.dask``): imports
    what the jobs' tasks need once, when the worker starts.

    Otherwise every fresh worker imports Beam and the image libraries while it
    deserialises its first task (~1.2 s of CPU), on the first job's critical path and on
    the cores the other workers need. Measured, 8,000 images on 2 one-thread workers:
    15.0 -> 12.3 s.
    """
    del worker
    import beam_jobs.convert  # Beam, listing, sharding, the shard writer
    import beam_jobs.upload  # noqa: F401


def _release_run(run_id: str) -> None:
    """Tears down this worker's idle DoFns of one pipeline run (``client.run`` target)."""
    with _IDLE_LOCK:
        keys = [key for key in _IDLE_DOFNS if key[0] == run_id]
        fns = [fn for key in keys for fn in _IDLE_DOFNS.pop(key)]
    for fn in fns:
        with contextlib.suppress(Exception):  # best effort, as Beam's teardown contract
            fn.teardown()


@contextlib.contextmanager
def _metered(label: str):
    """Counts the metrics of the code it wraps in a fresh container, as Beam's workers."""
    container = MetricsContainer(label)
    sampler = statesampler.StateSampler(label, counters.CounterFactory())
    previous = statesampler.get_current_tracker()
    statesampler.set_current_tracker(sampler)
    try:
        with sampler.scoped_state(label, "process", metrics_container=container):
            yield container
    finally:
        statesampler.set_current_tracker(previous)


def _run_bundle(
    items,
    transform: beam.ParDo,
    run_id: str,
    label: str,
    window_fn,
    side_views: list,
    side_values: list,
) -> list:
    """One Dask partition through a DoFn: ``[(tag, value)]`` plus the bundle's counters."""
    receivers = transform_evaluator.OneReceiver()
    handler = _OutputHandler(
        window_fn=window_fn,
        main_receivers=receivers[None],
        tagged_receivers=receivers,
        per_element_output_counter=None,
        output_batch_converter=None,
        process_yields_batches=False,
        process_batch_yields_elements=False,
    )
    args, kwargs = transform.raw_side_inputs
    with _IDLE_LOCK:
        idle = _IDLE_DOFNS[(run_id, label)]
        fn = idle.pop() if idle else None
    fresh = fn is None
    invoker = DoFnInvoker.create_invoker(
        DoFnSignature(transform.fn if fresh else fn),
        handler,
        context=DoFnContext(label, state=None),
        side_inputs=[
            SideInputMap(
                view_class,
                view_options,
                [transform_evaluator.get_windowed_value(v, None) for v in values],
            )
            for (view_class, view_options), values in zip(side_views, side_values)
        ],
        input_args=list(args),
        input_kwargs=kwargs,
        user_state_context=None,
        bundle_finalizer_param=beam.DoFn.BundleFinalizerParam(),
    )
    with _metered(label) as container:
        if fresh:
            invoker.invoke_setup()
        invoker.invoke_start_bundle()
        for item in items:
            invoker.invoke_process(
                transform_evaluator.get_windowed_value(item, window_fn)
            )
        invoker.invoke_finish_bundle()
    with _IDLE_LOCK:
        _IDLE_DOFNS[(run_id, label)].append(transform.fn if fresh else fn)
    out = [
        (v.tag, v.value.value) if isinstance(v, beam.TaggedOutput) else (None, v.value)
        for v in receivers.values
    ]
    out.append((_METRICS_TAG, container.get_cumulative()))
    return out


def _combine_bundle(items, fn: beam.CombineFn, label: str, merge: bool) -> list:
    """One partition of a lifted CombinePerKey: ``(key, value)`` in, ``(key,
    accumulator)`` out; or, with ``merge``, ``(key, [(key, accumulator)])`` in, ``(key,
    output)`` out. Counters as :func:`_run_bundle`."""
    with _metered(label) as container:
        fn.setup()
        try:
            if merge:
                outputs = [
                    (
                        key,
                        fn.extract_output(fn.merge_accumulators([a for _, a in pairs])),
                    )
                    for key, pairs in items
                ]
            else:
                accumulators: dict = {}
                for key, value in items:
                    if key not in accumulators:
                        accumulators[key] = fn.create_accumulator()
                    accumulators[key] = fn.add_input(accumulators[key], value)
                outputs = [(key, fn.compact(a)) for key, a in accumulators.items()]
        finally:
            fn.teardown()
    return [(None, kv) for kv in outputs] + [(_METRICS_TAG, container.get_cumulative())]


def _tagged(raw, tag=None):
    """The values of one tag in a bag of ``(tag, value)`` pairs."""
    return raw.filter(lambda pair, tag=tag: pair[0] == tag).pluck(1)


def _liftable(node) -> bool:
    """A CombinePerKey whose CombineFn can run before the shuffle, as Beam's runners do."""
    transform = node.transform
    return (
        type(transform) is beam.CombinePerKey
        and not transform.args
        and not transform.kwargs
        and not getattr(transform, "_using_gbek", False)
        and isinstance(node.inputs[0].windowing.windowfn, window.GlobalWindows)
    )


def _chain(*parts) -> list:
    return [value for part in parts for value in part]


def _flatten(bags: list):
    """Beam's Flatten: partition ``i`` of the output joins partition ``i`` of each input.

    ``dask.bag.concat`` appends the partitions instead: every Flatten would then add up
    its inputs' partitions, and a GroupByKey after it (the rejected list, a
    CombineGlobally over several outputs) would shuffle many near-empty partitions
    (measured: a third of a convert job's tasks).
    """
    import dask
    import dask.bag as db

    if len(bags) == 1:
        return bags[0]
    parts = [bag.to_delayed(optimize_graph=False) for bag in bags]
    width = max(len(p) for p in parts)
    return db.from_delayed(
        [
            dask.delayed(_chain)(*(p[i] for p in parts if i < len(p)))
            for i in range(width)
        ]
    )


@dataclasses.dataclass
class _GraphBuilder(PipelineVisitor):
    """Builds one bag per PCollection; ParDo bags hold ``(tag, value)`` pairs."""

    run_id: str
    partitions: int
    bag_kwargs: dict
    bags: dict = dataclasses.field(default_factory=dict)
    pardo_bags: list = dataclasses.field(default_factory=list)
    consumed: set = dataclasses.field(default_factory=set)
    lifting: object = None  # the CombinePerKey node whose parts are being skipped

    def _side_values(self, side_input: pvalue.AsSideInput):
        import dask

        self.consumed.add(side_input.pvalue)
        parts = self.bags[side_input.pvalue].to_delayed(optimize_graph=False)
        return dask.delayed(_chain)(*parts)

    def enter_composite_transform(self, node) -> None:
        if self.lifting is None and _liftable(node):
            self.lifting = node

    def leave_composite_transform(self, node) -> None:
        """A CombinePerKey: a combine per partition, a shuffle of the accumulators
        (one per key and partition, not every value), a merge per key."""
        if node is not self.lifting:
            return
        self.lifting = None
        (pcoll,) = node.inputs
        self.consumed.add(pcoll)
        fn, label = node.transform.fn, node.full_label
        partial = self.bags[pcoll].map_partitions(_combine_bundle, fn, label, False)
        merged = (
            _tagged(partial)
            .groupby(operator.itemgetter(0))
            .map_partitions(_combine_bundle, fn, label, True)
        )
        self.pardo_bags += [partial, merged]
        (out,) = node.outputs.values()
        self.bags[out] = _tagged(merged)

    def visit_transform(self, node) -> None:
        if self.lifting is not None:
            return
        inputs = [v for v in node.inputs if not isinstance(v, pvalue.PBegin)]
        self.consumed.update(inputs)
        in_bags = [self.bags[v] for v in inputs]
        transform = node.transform
        # Exact types, as Beam's translation: _GroupAlsoByWindow subclasses ParDo and is
        # a no-op here because the GroupByKey translation already drops windows.
        if type(transform) is beam.ParDo:
            window_fn = inputs[0].windowing.windowfn if inputs else None
            # Views are built here: on workers the side inputs' PCollections are stubs.
            side_views = [(type(si), si._view_options()) for si in node.side_inputs]
            side_values = [self._side_values(si) for si in node.side_inputs]
            raw = in_bags[0].map_partitions(
                _run_bundle,
                transform,
                self.run_id,
                node.full_label,
                window_fn,
                side_views,
                side_values,
            )
            self.pardo_bags.append(raw)
            for tag, pcoll in node.outputs.items():
                want = None if pcoll.tag is None or tag == "None" else pcoll.tag
                self.bags[pcoll] = _tagged(raw, want)
            return
        if type(transform) is overrides._Reshuffle:
            # Spread the work over the cluster; Beam's DaskRunner leaves it in place.
            bag = in_bags[0].repartition(npartitions=self.partitions)
        elif type(transform) is overrides._Flatten:
            bag = _flatten(in_bags)
        elif type(transform) in transform_evaluator.TRANSLATIONS:
            op = transform_evaluator.TRANSLATIONS[type(transform)](
                node, self.bag_kwargs
            )
            bag = op.apply(in_bags[0] if in_bags else None)
        elif in_bags:
            bag = in_bags[0]  # composite boundaries and other no-ops
        else:
            return
        for pcoll in node.outputs.values():
            self.bags[pcoll] = bag

    def leaves(self) -> list:
        return [bag for pcoll, bag in self.bags.items() if pcoll not in self.consumed]

    def metric_bags(self) -> list:
        return [_tagged(raw, _METRICS_TAG) for raw in self.pardo_bags]


class _Result(beam_dask.DaskRunnerResult):
    """Waits for every leaf, then folds the bundles' metric updates into DirectMetrics."""

    def __init__(
        self, client, run_id: str, futures: list, metric_futures: list
    ) -> None:
        self._run_id = run_id
        self._metric_futures = metric_futures
        self._metrics: DirectMetrics | None = None
        super().__init__(client, futures + metric_futures)

    def wait_until_finish(self, duration=None) -> str:
        try:
            state = super().wait_until_finish(duration)
            if self._metrics is None:
                self._metrics = DirectMetrics()
                for update in _chain(*self.client.gather(self._metric_futures)):
                    self._metrics.commit_logical(None, update)
                    self._metrics.commit_physical(None, update)
        finally:
            if self._state != beam.runners.runner.PipelineState.RUNNING:
                with contextlib.suppress(Exception):  # workers may be gone already
                    self.client.run(_release_run, self._run_id)
                self.client.close()
        return state

    def metrics(self) -> DirectMetrics:
        if self._metrics is None:
            raise RuntimeError("metrics are available once the pipeline has finished")
        return self._metrics


class DaskRunner(beam_dask.DaskRunner):
    """Runs a pipeline on a ``dask.distributed`` cluster (``--dask_client_address``)."""

    def run_pipeline(self, pipeline, options) -> _Result:
        import dask
        import dask.distributed as ddist

        dask_options = options.view_as(beam_dask.DaskOptions).get_all_options(
            drop_default=True, current_only=True
        )
        bag_kwargs = beam_dask.DaskOptions._extract_bag_kwargs(dask_options)
        with dask.config.set(
            WORKER_CONFIG
        ):  # used when the client starts a local cluster
            client = ddist.Client(**dask_options)
        threads = sum(client.nthreads().values()) or 1
        partitions = bag_kwargs.get("npartitions") or _PARTITIONS_PER_THREAD * threads
        pipeline.replace_all(overrides.dask_overrides())
        run_id = uuid.uuid4().hex
        builder = _GraphBuilder(run_id, partitions, bag_kwargs)
        pipeline.visit(builder)
        leaves, metric_bags = builder.leaves(), builder.metric_bags()
        # One compute call: steps shared by several leaves run once.
        futures = client.compute(leaves + metric_bags)
        return _Result(client, run_id, futures[: len(leaves)], futures[len(leaves) :])
