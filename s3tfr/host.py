"""What this process may use of the machine it runs on, and how it gives memory back."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import sys
from collections.abc import Iterator

__all__ = ["keep_freed_heap", "quiet_tensorflow_import", "usable_cpus"]

# glibc's mallopt parameter for the heap's top padding (malloc.h: M_TOP_PAD).
_M_TOP_PAD = -2
HEAP_PAD_BYTES = 64 << 20


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity mask where the OS has one.

    ``os.cpu_count()`` counts the machine's CPUs, also in a container or a cluster worker
    confined to fewer (``taskset``, cgroup cpusets): sizing thread pools by it there
    starts more decoders than cores, which only contend.
    """
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


@functools.cache
def keep_freed_heap() -> bool:
    """Has glibc's malloc keep 64 MB free at the top of the heap instead of returning it.

    Converting an image allocates and frees a few MB. With glibc's defaults the top of a
    small heap goes back to the kernel after every image and is faulted in, zeroed, for
    the next: measured, 0.7 ms of system time per 500x375 JPEG in a fresh process,
    about a quarter of its conversion, and slower user time from the cold pages. Only
    memory the process once used stays resident. Once per process; does nothing where
    the C library is not glibc.

    Returns:
        Whether the setting was applied.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return mallopt(_M_TOP_PAD, HEAP_PAD_BYTES) == 1


@contextlib.contextmanager
def quiet_tensorflow_import() -> Iterator[None]:
    """Around a first import of TensorFlow: what it writes to stderr while its libraries
    load is dropped when ``TF_CPP_MIN_LOG_LEVEL`` asks for fewer than INFO logs.

    TensorFlow 2.21's libraries log as they load (oneDNN, CUDA stubs, CPU features)
    through absl before absl's logging is set up, and such lines ignore
    ``TF_CPP_MIN_LOG_LEVEL`` (tensorflow/tensorflow#100442); only the file descriptor
    they are written to can hold them back. An import error still raises, after stderr
    is back.
    """
    if "tensorflow" in sys.modules or os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0") in ("", "0"):
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
