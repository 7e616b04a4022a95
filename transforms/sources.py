"""Reading one listed source object: its bytes, or the rejection that says why not."""

from __future__ import annotations

import errno

from s3tfr import storage
from s3tfr.s3 import S3Config
from transforms.references import Rejection

__all__ = ["read_source"]


def read_source(input_root: str, key: str, config: S3Config | None) -> bytes | Rejection:
    """The bytes of ``key`` under ``input_root``, or a ``fetch`` rejection for a file
    gone or unreadable since it was listed (the job goes on; S3 errors other than a
    missing object raise, and Beam retries the bundle)."""
    uri = storage.join(input_root, key)
    try:
        return storage.read_bytes(uri, config)
    except FileNotFoundError:
        return Rejection(key, "fetch", "object_missing", "gone since it was listed")
    except IsADirectoryError:
        return Rejection(key, "fetch", "unreadable", "not a regular file any more "
                         "(replaced since it was listed)")  # fmt: skip
    except PermissionError:
        return Rejection(key, "fetch", "unreadable", "permission denied")
    except OSError as e:  # a link loop, a device gone, a socket: this file only
        return Rejection(key, "fetch", "unreadable",
                         f"cannot read it ({errno.errorcode.get(e.errno, 'OSError')})")  # fmt: skip
