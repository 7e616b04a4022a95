"""What any Beam job pays before its first element: a fresh interpreter importing Beam.

The benchmarks add it to the best rate anything measured in the same run could reach, as
a bound on what a job could show at their sizes on this machine (pipeline construction,
runner start-up and shutdown are left out, so the bound is generous).
"""

from __future__ import annotations

import subprocess
import sys
import time


def beam_import_seconds(repeat: int = 3) -> float:
    """The fastest of ``repeat`` fresh interpreters running ``import apache_beam``
    (wall seconds, the interpreter's own start included, as a job pays it)."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import apache_beam"], check=True)
        best = min(best, time.perf_counter() - start)
    return best
