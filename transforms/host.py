"""What this process may use of the machine it runs on."""

from __future__ import annotations

import os

__all__ = ["usable_cpus"]


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity mask where the OS has one.

    ``os.cpu_count()`` counts the machine's CPUs, also in a container or a cluster worker
    confined to fewer (``taskset``, cgroup cpusets): sizing thread pools by it there
    starts more decoders than cores, which only contend.
    """
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1
