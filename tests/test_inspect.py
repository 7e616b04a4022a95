"""The inspect job: summary, HTML report (rendered in headless Chromium) and --verify, on
datasets written by the real convert job from generated images, local and on local S3."""

from __future__ import annotations

import html.parser
import itertools
import json
import os
import pathlib
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from beam_jobs import convert, inspect
from devtools import sample_data
from devtools.local_s3 import put_tree
from s3tfr.contract import MANIFEST

CLASSES = ("ant", "bee", "wasp")
PER_CLASS = 6
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _convert(tmp_path_factory, *extra: str) -> str:
    src = str(tmp_path_factory.mktemp("src"))
    out = str(tmp_path_factory.mktemp("out"))
    sample_data.write_sample_tree(src, classes=CLASSES, per_class=PER_CLASS, corrupt=True)
    convert.run(["--input", src, "--output", out, "--num_shards", "2", "--resize",
                 "crop:48x48", "--validation_fraction", "0.3", *extra])  # fmt: skip
    return out


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    """A converted sample dataset (read-only: copy it before damaging it)."""
    return _convert(tmp_path_factory)


@pytest.fixture
def copy(dataset, tmp_path) -> str:
    return shutil.copytree(dataset, str(tmp_path / "copy"))


def _info(root: str) -> dict:
    with open(os.path.join(root, MANIFEST)) as f:
        return json.load(f)


def _inspect(argv: list[str], capsys) -> tuple[int, str]:
    try:
        inspect.main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def _shard_lines(output: str) -> dict[str, str]:
    """The verdict lines on stdout, by shard file name."""
    lines = {}
    for line in output.splitlines():
        if line.startswith(("PASS ", "FAIL ")) and ".tfrecord:" in line:
            lines[line.split()[1].rstrip(":")] = line
    return lines


def test_dataset_positional_or_flag():
    assert inspect._with_dataset_flag(["out", "--verify"]) == ["--dataset", "out", "--verify"]
    assert inspect._with_dataset_flag(["--verify", "out"]) == ["--verify", "--dataset", "out"]
    assert inspect._with_dataset_flag(["--report", "r", "out"]) == [
        "--report", "r", "--dataset", "out"]  # fmt: skip
    assert inspect._with_dataset_flag(["--runner=DirectRunner", "out"])[-1] == "out"
    assert inspect._with_dataset_flag(["--dataset", "out"]) == ["--dataset", "out"]


def test_summary_shows_classes_counts_and_rejections(dataset, capsys):
    code, output = _inspect([dataset], capsys)
    info = _info(dataset)
    assert code == 0
    for index, label in enumerate(CLASSES):
        counts = [info["splits"][s]["class_counts"][label] for s in info["splits"]]
        assert sum(counts) == PER_CLASS
        assert f"{index:>5}  {label}" in output
        assert " ".join(f"{c:>10}" for c in counts) in output
    assert "truncated: 1" in output and f"{CLASSES[-1]}/broken.jpg" in output
    assert "resize=crop:48x48" in output and "listed 19, converted 18, rejected 1" in output
    assert "not in the manifest" not in output


def test_summary_notes_unlisted_shards(copy, capsys):
    shutil.copy(os.path.join(copy, "train-00000-of-00002.tfrecord"),
                os.path.join(copy, "train-00000-of-00003.tfrecord"))  # fmt: skip
    code, output = _inspect([copy], capsys)
    assert code == 0
    assert "1 shard files not in the manifest (readers ignore them): train-00000-of-00003" in output


def test_missing_manifest_is_a_clear_error(tmp_path, capsys):
    code, output = _inspect([str(tmp_path)], capsys)
    assert code == 2
    assert "no s3tfr_manifest.json" in output and "convert job did not finish" in output


class _Page(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.images, self.cells, self.links = [], [], []
        self._in_cell = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self._in_cell = tag == "td"
        if tag == "img":
            self.images.append(attrs["src"])
        self.links += [v for k, v in attrs.items() if k in ("href", "src") and v]

    def handle_data(self, data):
        if self._in_cell:
            self.cells.append(data)


def test_report_has_classes_counts_and_renders(dataset, tmp_path, capsys):
    report = str(tmp_path / "report")
    code, output = _inspect([dataset, "--report", report, "--samples_per_class", "4"], capsys)
    assert code == 0 and os.path.join(report, "index.html") in output
    page = _Page()
    with open(os.path.join(report, "index.html"), encoding="utf-8") as f:
        page.feed(f.read())
    info = _info(dataset)
    # One row per class: label, name, count per split; then the rejected row.
    for index, label in enumerate(CLASSES):
        at = page.cells.index(label)
        assert page.cells[at - 1] == str(index)
        assert page.cells[at + 1 : at + 1 + len(info["splits"])] == [
            str(info["splits"][s]["class_counts"][label]) for s in info["splits"]
        ]
    assert f"{CLASSES[-1]}/broken.jpg" in page.cells and "truncated" in page.cells
    # Self-contained: a bar chart per split and a contact sheet per class, all inline PNGs.
    assert len(page.images) == len(info["splits"]) + len(CLASSES)
    assert all(src.startswith("data:image/png;base64,") for src in page.links)

    if CHROMIUM is None:
        pytest.skip("no chromium: run `./run_local.sh test` as root to install it")
    shot = tmp_path / "shot.png"
    subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}",
         "--window-size=1200,1600", f"file://{report}/index.html"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape[:2] == (1600, 1200)
    non_white = (pixels < 240).any(axis=-1).mean()
    assert 0.05 < non_white < 0.9, non_white
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 100  # charts and photos, not text


def test_verify_passes_on_a_good_dataset(dataset, capsys):
    code, output = _inspect(["--verify", dataset], capsys)
    shards = [s["file"] for split in _info(dataset)["splits"].values() for s in split["shards"]]
    assert code == 0, output
    lines = _shard_lines(output)
    assert sorted(lines) == sorted(shards)
    assert all(line.startswith("PASS") for line in lines.values())
    assert f"verify: {len(shards)} of {len(shards)} shards passed, 18 records read" in output


def _flip(path: str) -> None:
    data = bytearray(pathlib.Path(path).read_bytes())
    data[len(data) // 2] ^= 0x01
    pathlib.Path(path).write_bytes(bytes(data))


def _truncate(path: str) -> None:
    data = pathlib.Path(path).read_bytes()
    pathlib.Path(path).write_bytes(data[: len(data) - 50])


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (_flip, "sha256 differs from the manifest"),
        (os.remove, "missing: no such file"),
        (_truncate, "bytes, manifest says"),
    ],
)
def test_verify_fails_naming_the_damaged_shard(copy, capsys, damage, expected):
    victim = "train-00001-of-00002.tfrecord"
    damage(os.path.join(copy, victim))
    code, output = _inspect([copy, "--verify"], capsys)
    assert code == 1, output
    lines = _shard_lines(output)
    failed = lines.pop(victim)
    assert failed.startswith(f"FAIL {victim}: ") and expected in failed, failed
    assert lines and all(line.startswith("PASS") for line in lines.values())


def test_verify_fails_when_class_counts_differ(copy, capsys):
    path = os.path.join(copy, MANIFEST)
    info = _info(copy)
    counts = info["splits"]["train"]["class_counts"]
    counts[CLASSES[0]] += 1
    counts[CLASSES[1]] -= 1
    with open(path, "w") as f:
        json.dump(info, f)
    code, output = _inspect([copy, "--verify"], capsys)
    assert code == 1
    assert "FAIL split train: class counts" in output


def test_verify_on_s3_gzip(tmp_path_factory, s3_bucket, capsys):
    local = _convert(tmp_path_factory, "--compression", "gzip")
    assert _info(local)["compression"] == "GZIP"
    put_tree(local, s3_bucket, "ds/")
    uri = f"s3://{s3_bucket}/ds"
    code, output = _inspect([uri, "--verify"], capsys)
    assert code == 0, output
    assert all(line.startswith("PASS") for line in _shard_lines(output).values())

    victim = "validation-00000-of-00002.tfrecord"
    _flip(os.path.join(local, victim))
    put_tree(local, s3_bucket, "ds/")
    code, output = _inspect([uri, "--verify"], capsys)
    assert code == 1
    assert _shard_lines(output)[victim].startswith(f"FAIL {victim}")


@pytest.mark.parametrize("num_classes", [3, 40, 1000])
def test_class_chart_names_stay_readable(num_classes):
    """With many or long class names, no two names on an axis overlap, each stays inside
    the figure, and the figure keeps a page's size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from transforms.report import AXIS_NAME_CHARS, class_chart

    rng = np.random.default_rng(num_classes)
    labels = [f"n{i:08d}_a_rather_long_wordnet_style_class_name_{i}" for i in range(num_classes)]
    counts = {label: int(rng.integers(1, 1300)) for label in labels}
    figure = class_chart("train", labels, counts)
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    page = figure.bbox
    width, height = figure.get_size_inches()
    assert width <= 15 and height <= 11
    named = 0
    for axes in figure.axes:
        names = [t for t in axes.get_yticklabels() if t.get_text()]
        boxes = [t.get_window_extent(renderer) for t in names]
        for box in boxes:
            assert box.x0 >= page.x0 - 1 and box.y0 >= page.y0 - 1
        for lower, upper in itertools.pairwise(sorted(boxes, key=lambda b: b.y0)):
            assert upper.y0 >= lower.y1 - 0.5, "names on an axis overlap"
        classes = [t.get_text() for t in names if not t.get_text().isdigit()]
        for name in classes:
            assert len(name) <= AXIS_NAME_CHARS and name.startswith("n")
        named += len(classes)
    assert named == (num_classes if num_classes <= 40 else 30)
    plt.close(figure)
