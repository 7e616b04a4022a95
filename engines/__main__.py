"""``./run_local.sh --runner=FlinkRunner|SparkRunner …``: the demo on a local cluster.

Starts the engine the runner names (a Flink session cluster or a Spark standalone
cluster on 127.0.0.1, with Beam's job server; fetched into ``.engines/`` on first use),
runs the demo (``devtools.demo``) against it with the SDK workers in this process
(``LOOPBACK``), and stops the cluster.

    python -m engines --runner=FlinkRunner [demo options]
"""

from __future__ import annotations

import logging
import sys

from devtools import demo
from engines import clusters

ENGINES = {"FlinkRunner": "flink", "SparkRunner": "spark"}


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    runner = next((a.split("=", 1)[1] for a in args if a.startswith("--runner=")), "")
    if runner not in ENGINES:
        sys.exit(f"engines: give --runner=FlinkRunner or --runner=SparkRunner, not {runner!r}")
    rest = [a for a in args if not a.startswith("--runner=")]
    logging.basicConfig(level=logging.WARNING, format="[%(name)s] %(message)s")
    logging.getLogger("engines").setLevel(logging.INFO)
    print(f"Starting a local {ENGINES[runner]} cluster and Beam's job server "
          "(first use fetches them into .engines/) …", flush=True)  # fmt: skip
    with clusters.running(ENGINES[runner]) as engine:
        print(f"{engine.name}: cluster at {engine.master}, job server at "
              f"{engine.job_endpoint}", flush=True)  # fmt: skip
        demo.main(rest + engine.pipeline_args("LOOPBACK"))


if __name__ == "__main__":
    main()
