"""The console scripts (``s3tfr-convert`` …): the jobs' ``main``, after checking that the
Beam extra is installed, so a reader-only install says what to add instead of failing
with an ImportError."""

import sys

from s3tfr.api import job_module
from s3tfr.errors import UserError


def _main(job: str) -> None:
    try:
        module = job_module(job)
    except UserError as e:
        print(f"{job}: error: {e}", file=sys.stderr)
        sys.exit(2)
    module.main()


def convert() -> None:
    _main("convert")


def upload() -> None:
    _main("upload")


def analyze() -> None:
    _main("analyze")


def inspect() -> None:
    _main("inspect")
