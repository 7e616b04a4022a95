"""One interface over local directories and S3 prefixes for the jobs (no Beam import).

In: a root URI (``s3://bucket/prefix`` or a local path) and names relative to it. Out:
listings (one level, or recursive and paged), whole-object reads, and writes that appear
atomically at their final name (local: rename; S3: an upload completes or never shows).
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator

import botocore.exceptions

from s3tfr import s3
from s3tfr.s3 import S3Config

__all__ = [
    "Entry",
    "delete",
    "exists",
    "is_utf8",
    "join",
    "list_files",
    "list_level",
    "printable",
    "put_file",
    "read_bytes",
    "rename",
    "walk",
    "write_bytes",
]

# Temp files are created 0600; finished ones get the usual mode (read at import, while
# single-threaded: os.umask can only be read by setting it).
_UMASK = os.umask(0o022)
os.umask(_UMASK)
_FILE_MODE = 0o666 & ~_UMASK

Entry = tuple[str, int]  # (name relative to the listed root, size in bytes)


def join(root: str, name: str) -> str:
    """Joins a root URI or path and a relative ``/``-separated name with one slash."""
    return root.rstrip("/") + "/" + name


def is_utf8(name: str) -> bool:
    """Whether a name is valid UTF-8; local file names may hold other bytes, which
    Python represents as surrogate escapes."""
    try:
        name.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def printable(name: str) -> str:
    """A name fit for reports: bytes that are not UTF-8 become U+FFFD.

    Beam's coders, JSON output and S3 keys all refuse surrogate escapes, so a local name
    that is not UTF-8 is reported through this and never passed on as it is.
    """
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _local(uri: str) -> str:
    return uri.removeprefix("file://")


def _key_prefix(uri: str) -> tuple[str, str]:
    bucket, key = s3.parse(uri)
    return bucket, (key.rstrip("/") + "/") if key.strip("/") else ""


def list_level(uri: str, config: S3Config | None = None) -> Iterator[tuple[str, int | None]]:
    """One level under ``uri``: ``(name, None)`` for sub-folders, ``(name, size)`` for files.

    Folder names carry no trailing slash. An S3 "directory marker" object (a key ending in
    ``/``, size 0) at this level is reported as a file named ``""``.
    """
    if s3.is_s3(uri):
        bucket, prefix = _key_prefix(uri)
        for item in s3.list_prefixes(bucket, prefix, config):
            if isinstance(item, str):
                yield item[len(prefix) :].rstrip("/"), None
            else:
                yield item.key[len(prefix) :], item.size
        return
    with os.scandir(_local(uri)) as entries:
        for entry in entries:
            if _is_dir(entry):
                yield os.fsdecode(entry.name), None
            else:
                yield os.fsdecode(entry.name), _size(entry.path)


def _is_dir(entry: os.DirEntry) -> bool:
    """A folder, or a link to one; a link loop is not (as ``os.path.isdir`` says)."""
    try:
        return entry.is_dir(follow_symlinks=True)
    except OSError:
        return False


def _size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return -1  # a dangling link or unreadable entry: the reader reports it


def walk(uri: str, config: S3Config | None = None) -> Iterator[Entry]:
    """Every file under ``uri``, recursively, streamed (S3: 1,000 keys per request).

    Names are relative to ``uri`` with ``/`` separators. Local symlinked folders are not
    followed (a link loop cannot hang the listing); symlinked files are.
    """
    if s3.is_s3(uri):
        bucket, prefix = _key_prefix(uri)
        for obj in s3.iter_objects(bucket, prefix, config):
            yield obj.key[len(prefix) :], obj.size
        return
    for rel, path in _walk_local(_local(uri)):
        yield rel, _size(path)


def _walk_local(root: str) -> Iterator[tuple[str, str]]:
    """(name relative to ``root`` with ``/`` separators, path) of every local file under
    ``root``, sorted; symlinked folders are not followed."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel_dir = os.path.relpath(dirpath, root)
        for name in sorted(filenames):
            rel = name if rel_dir == "." else os.path.join(rel_dir, name)
            yield os.fsdecode(rel).replace(os.sep, "/"), os.path.join(dirpath, name)


def list_files(uri: str, config: S3Config | None = None) -> list[str]:
    """Names of the files directly under ``uri`` (empty when it does not exist)."""
    if not s3.is_s3(uri) and not os.path.isdir(_local(uri)):
        return []
    return [name for name, size in list_level(uri, config) if size is not None and name]


def read_bytes(uri: str, config: S3Config | None = None) -> bytes:
    """Reads a whole file or object.

    Raises:
        FileNotFoundError: no such file or object (or bucket).
        PermissionError: access denied.
    """
    if s3.is_s3(uri):
        try:
            return s3.get_bytes(*s3.parse(uri), config)
        except botocore.exceptions.ClientError as e:
            code = s3.error_code(e)
            if code in ("NoSuchKey", "404", "NoSuchBucket", "NotFound"):
                raise FileNotFoundError(f"{uri}: {code}") from None
            if code in ("AccessDenied", "403"):
                raise PermissionError(f"{uri}: {code}") from None
            raise
    # Not blocking: a file replaced by a FIFO since it was listed must not hang the
    # reader; only regular files are read.
    fd = os.open(_local(uri), os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with open(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise IsADirectoryError(errno.EINVAL, "not a regular file", uri)
        return f.read()


def exists(uri: str, config: S3Config | None = None) -> bool:
    if s3.is_s3(uri):
        bucket, key = s3.parse(uri)
        try:
            s3.client(config).head_object(Bucket=bucket, Key=key)
            return True
        except botocore.exceptions.ClientError as e:
            if s3.error_code(e) in ("404", "NoSuchKey", "NotFound"):
                return False
            raise
    return os.path.exists(_local(uri))


def put_file(path: str, uri: str, config: S3Config | None = None) -> None:
    """Moves the local file ``path`` to ``uri``; it appears there complete or not at all."""
    if s3.is_s3(uri):
        s3.upload_file(path, *s3.parse(uri), config)
        os.remove(path)
        return
    dest = _local(uri)
    os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
    staged = f"{dest}.tmp-{os.getpid()}"
    shutil.move(path, staged)
    os.chmod(staged, _FILE_MODE)
    os.replace(staged, dest)


def write_bytes(uri: str, data: bytes, config: S3Config | None = None) -> None:
    """Writes a small object atomically (see :func:`put_file`)."""
    if s3.is_s3(uri):
        s3.put_bytes(*s3.parse(uri), data, config)
        return
    dest = _local(uri)
    os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=os.path.dirname(dest) or ".", delete=False) as f:
        f.write(data)
    os.chmod(f.name, _FILE_MODE)
    os.replace(f.name, dest)


def rename(src: str, dst: str, config: S3Config | None = None) -> None:
    """Moves a file or object (S3: server-side copy, then delete)."""
    if s3.is_s3(src):
        bucket, key = s3.parse(src)
        dst_bucket, dst_key = s3.parse(dst)
        source = {"Bucket": bucket, "Key": key}
        s3.client(config).copy(source, dst_bucket, dst_key)
        delete(src, config)
        return
    os.replace(_local(src), _local(dst))


def delete(uri: str, config: S3Config | None = None) -> None:
    """Deletes one file or object; a missing one is not an error."""
    if s3.is_s3(uri):
        bucket, key = s3.parse(uri)
        s3.client(config).delete_object(Bucket=bucket, Key=key)
        return
    try:
        os.remove(_local(uri))
    except FileNotFoundError:
        pass


# The class-folder rules, shared by the convert job's listing and the tf.data reader's
# make_dataset_from_images (which must not import Beam).
__all__ += [
    "candidate_rejection",
    "class_folders",
    "has_empty_segment",
    "has_line_break",
    "is_class_folder",
    "local_stamp",
    "walk_folder",
]


def is_class_folder(name: str) -> bool:
    """Whether a folder found at the class level is a class.

    The rule of ``tf.keras.utils.image_dataset_from_directory(labels="inferred")``: every
    folder whose name does not start with ``.``, empty or not (a link to a folder is a
    folder). Less the names no dataset can hold: ``""`` (on S3, the common prefix of keys
    holding ``//``), names that are not UTF-8 and names holding a line break.
    """
    return bool(name) and not name.startswith(".") and is_utf8(name) and not has_line_break(name)


def has_line_break(name: str) -> bool:
    """Whether a name holds a character that ends a line: labels.txt has one name per
    line, so such a folder cannot be a class (Keras would take it)."""
    return name.splitlines() != [name]


def class_folders(uri: str, config: S3Config | None = None) -> list[str]:
    """The class names under ``uri``, sorted as Python sorts strings (as Keras does).

    On S3 a folder is a common prefix, so a directory-marker object ``<name>/`` alone
    makes an (empty) class, as an empty local folder does.
    """
    return sorted(
        name
        for name, size in list_level(uri, config)
        if size is None and is_class_folder(name)
    )


def has_empty_segment(key: str) -> bool:
    """Whether a ``/``-separated key has an empty segment before its last (``a//b``,
    ``/b``); the empty last segment of a directory marker ``a/`` does not count."""
    return key.startswith("/") or "//" in key


def candidate_rejection(key: str, size: int) -> str | None:
    """Why an object in a class folder cannot be an image, as a rejection code (``None``:
    it is a candidate, to be decoded). ``key`` is relative to the input root."""
    if not is_utf8(key):
        return "bad_name"
    if has_empty_segment(key):
        return "empty_segment"
    if key.endswith("/"):
        return "directory_marker"
    if size == 0:
        return "zero_bytes"
    if size < 0:
        return "unreadable"
    return None


def walk_folder(
    root: str, folder: str, config: S3Config | None = None
) -> Iterator[tuple[str, int, str]]:
    """Every file under ``folder`` (a name relative to ``root``), named relative to
    ``root``, as ``(name, size, stamp)``. The stamp changes when the file is rewritten:
    the ETag on S3, :func:`local_stamp` locally.

    Unlike ``walk(join(root, folder))``, which strips slashes, the folder is taken as it
    is: on S3 the folder ``""`` (keys ``<root>//…``) lists only the keys under ``<root>//``,
    not the whole root again.
    """
    if s3.is_s3(root):
        bucket, prefix = _key_prefix(root)
        for obj in s3.iter_objects(bucket, f"{prefix}{folder}/", config):
            yield obj.key[len(prefix) :], obj.size, obj.etag
        return
    for rel, path in _walk_local(_local(join(root, folder))):
        size, stamp = _size_and_stamp(path)
        yield f"{folder}/{rel}", size, stamp


def local_stamp(path: str) -> str:
    """What changes when a local file is rewritten or replaced: its modification and
    change times and its inode (``cp -p``, ``rsync -t`` or ``tar x`` keep the
    modification time, and a rename swaps inodes; nobody can set the change time);
    ``""`` when it cannot be read."""
    return _size_and_stamp(path)[1]


def _size_and_stamp(path: str) -> tuple[int, str]:
    """A local file's size (-1 when it cannot be read, as :func:`_size`) and
    :func:`local_stamp`, from one ``stat``."""
    try:
        st = os.stat(path)
    except OSError:
        return -1, ""
    return st.st_size, f"{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}"
