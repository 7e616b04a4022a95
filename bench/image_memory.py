"""Peak memory and time of one conversion, on the largest inputs the default limits admit.

    .venv/bin/python bench/image_memory.py [--only TEXT] [--images_module PATH]

For each kind of source (8-bit RGB JPEG and PNG, 16-bit grayscale and RGB PNG, 1-bit
PNG, palette PNG with transparency, RGBA PNG, progressive 4:4:4 JPEG), one image as
large as the default ``--max_pixels`` admits for it: 100,000,000 pixels, fewer where its
conversion needs more than 8 bytes a pixel. Flat content, so the files are small, as a
hostile file's would be. Each is converted to JPEG with ``--resize none`` and with
``crop:224x224``, in a fresh process that applies the job's heap setting and reports its
own peak RSS (``VmHWM``) and seconds. The baseline is a fresh process that only imports
the modules.

``--images_module`` converts with another version of ``transforms/images.py`` (one from
git history, say) on the same files.

Prints one markdown table.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import struct
import subprocess
import sys
import tempfile
import zlib
from collections.abc import Callable

from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from transforms import images

WIDTH = 10_000
RESIZES = ("none", "crop:224x224")

# Run in a fresh interpreter: argv = root, images module path or "", file or "-", resize.
_CHILD = r"""
import importlib.util, json, sys, time
sys.path.insert(0, sys.argv[1])
from s3tfr.host import keep_freed_heap
keep_freed_heap()
if sys.argv[2]:
    spec = importlib.util.spec_from_file_location("images_under_test", sys.argv[2])
    images = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(images)
else:
    from transforms import images

def peak() -> int:
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))

result = {}
if sys.argv[3] != "-":
    with open(sys.argv[3], "rb") as f:
        data = f.read()
    start = time.perf_counter()
    try:
        images.convert_image(data, images.parse_resize(sys.argv[4]))
        result["outcome"] = "converted"
    except images.ImageError as e:
        result["outcome"] = e.code
    result["seconds"] = time.perf_counter() - start
result["peak"] = peak()
print(json.dumps(result))
"""


def _chunk(kind: bytes, body: bytes) -> bytes:
    crc = zlib.crc32(kind + body) & 0xFFFFFFFF
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)


def png(color_type: int, depth: int, extra: bytes = b"") -> Callable:
    """A writer of all-zero PNGs that streams rows: no image is ever held in memory."""
    samples = {0: 1, 2: 3, 3: 1, 6: 4}[color_type]

    def write(path: str, width: int, height: int) -> None:
        row = bytes(1 + (width * samples * depth + 7) // 8)  # filter byte + samples
        compressor = zlib.compressobj(6)
        header = struct.pack(">IIBBBBB", width, height, depth, color_type, 0, 0, 0)
        with open(path, "wb") as f:
            f.write(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + extra)
            pending = bytearray()
            for _ in range(height):
                pending += compressor.compress(row)
                if len(pending) > 1 << 20:
                    f.write(_chunk(b"IDAT", bytes(pending)))
                    pending.clear()
            f.write(_chunk(b"IDAT", bytes(pending + compressor.flush())))
            f.write(_chunk(b"IEND", b""))

    return write


def jpeg(**params) -> Callable:
    def write(path: str, width: int, height: int) -> None:
        Image.new("RGB", (width, height), (90, 140, 200)).save(path, "JPEG", **params)

    return write


CASES = {
    "8-bit RGB JPEG": jpeg(quality=90),
    "8-bit RGB PNG": png(2, 8),
    "16-bit gray PNG": png(0, 16),
    "16-bit RGB PNG": png(2, 16),
    "1-bit PNG": png(0, 1),
    "palette PNG + transparency": png(
        3, 8, _chunk(b"PLTE", bytes(range(256)) * 3) + _chunk(b"tRNS", b"\x00")
    ),
    "RGBA PNG": png(6, 8),
    "progressive 4:4:4 JPEG": jpeg(quality=90, progressive=True, subsampling=0),
}


def admitted_height(write: Callable, max_pixels: int) -> int:
    """The most rows of ``WIDTH`` pixels that ``max_pixels`` admits for this kind."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "sample")
        write(path, 64, 64)
        with open(path, "rb") as f:
            sample = Image.open(io.BytesIO(f.read()))
        # The conversion's own estimate (transforms/images.py) for this kind of source.
        per_pixel = images._working_bytes_per_pixel(sample, channels=3)
    budget = max_pixels * images._BUDGET_BYTES_PER_PIXEL
    return min(max_pixels, int(budget / per_pixel)) // WIDTH


def run_child(module: str, path: str = "-", resize: str = "none") -> dict:
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, ROOT, module, path, resize],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if done.returncode:
        raise RuntimeError(f"the conversion process failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help="run the kinds whose name has this")
    parser.add_argument(
        "--images_module", default="", help="path of another transforms/images.py"
    )
    args = parser.parse_args()
    module = os.path.abspath(args.images_module) if args.images_module else ""
    baseline = run_child(module)["peak"]
    print(f"baseline (imports only): {baseline / 1e6:,.0f} MB peak RSS\n")
    print("| source | size | file bytes | resize | peak RSS | above baseline | seconds "
          "| outcome |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, write in CASES.items():
            if args.only not in name:
                continue
            height = admitted_height(write, images.DEFAULT_MAX_PIXELS)
            path = os.path.join(tmp, "image")
            write(path, WIDTH, height)
            size = os.path.getsize(path)
            for resize in RESIZES:
                result = run_child(module, path, resize)
                print(
                    f"| {name} | {WIDTH:,} × {height:,} | {size:,} | {resize} "
                    f"| {result['peak'] / 1e6:,.0f} MB "
                    f"| {(result['peak'] - baseline) / 1e6:,.0f} MB "
                    f"| {result['seconds']:.1f} | {result['outcome']} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
