"""s3-tfrecords: S3 image folders to sharded TFRecord datasets, and back into training.

This package is the core both sides share, with no Beam and no TensorFlow import: the
data contract (:mod:`s3tfr.contract`), the manifest's schema and validation
(:mod:`s3tfr.manifest`), S3 and local storage (:mod:`s3tfr.s3`, :mod:`s3tfr.storage`),
the host's resources (:mod:`s3tfr.host`) and the errors jobs end with
(:mod:`s3tfr.errors`). On top of everything, the Python API (:mod:`s3tfr.api`, re-exported
here: ``s3tfr.convert(...)``) and the console scripts (:mod:`s3tfr.cli`) run the jobs.
"""

from s3tfr.api import analyze, argv, convert, load_info, upload, verify
from s3tfr.contract import VERSION as __version__
from s3tfr.errors import JobFailed, UserError

# The Python API (s3tfr.api), the version and the errors jobs end with.
__all__ = [
    "JobFailed",
    "UserError",
    "__version__",
    "analyze",
    "argv",
    "convert",
    "load_info",
    "upload",
    "verify",
]
