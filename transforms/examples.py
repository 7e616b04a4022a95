"""One image's record: conversion, ``tf.train.Example`` encoding and TFRecord framing.

No Beam and no TensorFlow here: the shard writer calls :func:`convert_record` for each
image, and the benchmarks' compute limit calls :class:`ConvertSettings` without paying
for Beam's imports.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import struct
from typing import TYPE_CHECKING

import google_crc32c

from s3tfr import contract
from transforms.images import (
    DEFAULT_JPEG_QUALITY,
    DEFAULT_MAX_PIXELS,
    DEFAULT_TIME_BUDGET_S,
    ConvertedImage,
    ImageError,
    Resize,
    convert_image,
)
from transforms.references import Rejection, ShardItem

if TYPE_CHECKING:
    from typing import Self  # Python 3.11; annotations are not evaluated at run time

__all__ = [
    "ConvertSettings",
    "TFRecordFile",
    "convert_record",
    "encode_example",
    "example_bytes",
    "example_strings",
    "frame_record",
]


@dataclasses.dataclass(frozen=True)
class ConvertSettings:
    """What :func:`convert_image` is called with, for every image of a job."""

    resize: Resize = dataclasses.field(default_factory=Resize)
    channels: int = 3
    image_format: str = "jpeg"
    jpeg_quality: int = DEFAULT_JPEG_QUALITY
    max_pixels: int = DEFAULT_MAX_PIXELS
    # Seconds one image may take before it is rejected as too_slow.
    time_budget_s: float = DEFAULT_TIME_BUDGET_S

    def convert(self, data: bytes) -> ConvertedImage:
        return convert_image(
            data,
            self.resize,
            channels=self.channels,
            image_format=self.image_format,
            jpeg_quality=self.jpeg_quality,
            max_pixels=self.max_pixels,
            time_budget_s=self.time_budget_s,
        )


# Most varints on the hot path (tags, short lengths, labels) are one byte.
_ONE_BYTE = [bytes((i,)) for i in range(0x80)]


def _varint(value: int) -> bytes:
    if 0 <= value < 0x80:
        return _ONE_BYTE[value]
    value &= (1 << 64) - 1  # int64 wire format: negatives take ten bytes
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def encode_example(features: dict[str, bytes | int]) -> bytes:
    """Serializes a ``tf.train.Example`` of single bytes or int64 values.

    Written by hand because importing TensorFlow in every worker costs seconds and
    hundreds of MB; the output is byte-identical to TensorFlow's deterministic
    serialization (map keys sorted), which a test checks.
    """
    entries = []
    for key in sorted(features):
        value = features[key]
        if isinstance(value, bytes):
            feature = _field(1, _field(1, value))  # Feature.bytes_list.value
        else:
            feature = _field(3, _field(1, _varint(value)))  # Feature.int64_list, packed
        entries.append(_field(1, _map_key(key) + _field(2, feature)))
    return _field(1, b"".join(entries))  # Example.features.feature map


@functools.lru_cache(maxsize=256)
def _map_key(key: str) -> bytes:
    """The encoded key field of a feature map entry: the same for every record."""
    return _field(1, key.encode())


def _read_varint(data: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if at >= len(data) or shift > 63:
            raise ValueError("truncated varint")
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, at


def _fields(data: bytes):
    """(field number, payload) of each length-delimited field of a protobuf message;
    varint and fixed-width fields are skipped."""
    at = 0
    while at < len(data):
        tag, at = _read_varint(data, at)
        wire = tag & 7
        if wire == 0:
            _, at = _read_varint(data, at)
        elif wire in (1, 5):
            at += 8 if wire == 1 else 4
        elif wire == 2:
            length, at = _read_varint(data, at)
            if at + length > len(data):
                raise ValueError("truncated field")
            yield tag >> 3, data[at : at + length]
            at += length
        else:
            raise ValueError(f"wire type {wire}")


def example_strings(record: bytes, keys: tuple[str, ...]) -> dict[str, bytes]:
    """The first bytes value of each of ``keys`` in a serialized ``tf.train.Example``
    (those it has), read without TensorFlow: the inverse of :func:`encode_example` for
    bytes features.

    Raises:
        ValueError: the record is not a well-formed protobuf message.
    """
    found = {}
    for number, features in _fields(record):
        if number != 1:  # Example.features
            continue
        for entry_number, entry in _fields(features):  # Features.feature map entries
            if entry_number != 1:
                continue
            key, value = "", b""
            for part, payload in _fields(entry):
                if part == 1:
                    key = payload.decode("utf-8", "surrogateescape")
                elif part == 2:
                    value = payload
            if key in keys:
                for kind, values in _fields(value):  # Feature.bytes_list
                    if kind == 1:
                        found[key] = next((v for n, v in _fields(values) if n == 1), b"")
    return found


def example_bytes(
    image: ConvertedImage, label: int, label_text: str, key: str, source_sha256: str
) -> bytes:
    """A serialized ``tf.train.Example`` with the data contract's keys
    (:data:`s3tfr.contract.RECORD_KEYS`)."""
    return encode_example(
        {
            contract.IMAGE_KEY: image.encoded,
            contract.FORMAT_KEY: image.format.encode(),
            contract.HEIGHT_KEY: image.height,
            contract.WIDTH_KEY: image.width,
            contract.CHANNELS_KEY: image.channels,
            contract.LABEL_KEY: label,
            contract.LABEL_TEXT_KEY: label_text.encode(),
            contract.FILENAME_KEY: key.encode(),
            contract.SOURCE_SHA256_KEY: source_sha256.encode(),
        }
    )


def _masked_crc(data: bytes) -> int:
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def frame_record(record: bytes) -> bytes:
    """One TFRecord: length, its masked CRC32C, the data, the data's masked CRC32C."""
    length = struct.pack("<Q", len(record))
    return b"".join(
        (length, struct.pack("<I", _masked_crc(length)), record,
         struct.pack("<I", _masked_crc(record)))
    )  # fmt: skip


class TFRecordFile:
    """Writes TFRecord framing (length, masked CRC32C, data, masked CRC32C) to a file.

    ``compression="GZIP"`` writes a standard gzip stream with a zero timestamp, so the
    same records give the same bytes.
    """

    def __init__(self, path: str, compression: str = "") -> None:
        self._raw = open(path, "wb")  # noqa: SIM115 - closed in close()
        self._out = (
            gzip.GzipFile(filename="", mode="wb", fileobj=self._raw, mtime=0)
            if compression == "GZIP"
            else self._raw
        )

    def write(self, record: bytes) -> None:
        self.write_framed(frame_record(record))

    def write_framed(self, framed: bytes) -> None:
        """Writes a record already framed by :func:`frame_record`."""
        self._out.write(framed)

    def close(self) -> None:
        if self._out is not self._raw:
            self._out.close()
        self._raw.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def convert_record(settings: ConvertSettings, item: ShardItem, data: bytes):
    """An image's source bytes -> its framed TFRecord, or why it cannot be one.

    Returns:
        ``(framed record, source size, image with its encoded bytes dropped, the
        source's hex SHA-256)`` or a :class:`Rejection`; never raises for a bad image (:func:`convert_image` raises
        only :class:`ImageError`, whose reason holds no byte of the input).
    """
    digest = hashlib.sha256(data).hexdigest()
    if item.sha256 and digest != item.sha256:
        return Rejection(item.key, "fetch", "changed_while_converting",
                         "its content changed after it was hashed to pick its split "
                         "(something wrote it during the job): rerun")  # fmt: skip
    try:
        image = settings.convert(data)
    except ImageError as e:
        return Rejection(item.key, "decode", e.code, str(e))
    record = example_bytes(image, item.label, item.label_text, item.key, digest)
    return frame_record(record), len(data), dataclasses.replace(image, encoded=b""), digest
