"""The package graph of docs/ARCHITECTURE.md, checked on every import statement (module
level or inside a function) of the shipped packages: a new arrow the architecture does not
allow fails here, naming the file, the line and the import."""

from __future__ import annotations

import ast
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

SHIPPED = ("s3tfr", "transforms", "tfdata_reader", "beam_jobs", "runners")
# Top-level modules each shipped package may import, among the project's own and the heavy
# frameworks; the standard library and small third-party libraries are not listed.
PROJECT = {*SHIPPED, "devtools", "engines", "tests", "bench", "examples"}
FRAMEWORKS = {
    "apache_beam",
    "tensorflow",
    "tensorflow_transform",
    "tensorflow_datasets",
    "PIL",
    "moto",
    "dask",
    "distributed",
    "pytest",
}
ALLOWED = {
    # The core: the data contract, S3 and storage; no Beam, no TensorFlow.
    "s3tfr": {"s3tfr"},
    # The writer's stages (Beam, Pillow, tensorflow-transform in analyze).
    "transforms": {
        "s3tfr",
        "transforms",
        "apache_beam",
        "tensorflow",
        "tensorflow_transform",
        "PIL",
    },
    # The reader: TensorFlow, never Beam.
    "tfdata_reader": {"s3tfr", "tfdata_reader", "tensorflow", "tensorflow_transform"},
    # The jobs assemble stages; inspect and analyze read what they wrote like a reader.
    "beam_jobs": {
        "s3tfr",
        "transforms",
        "beam_jobs",
        "apache_beam",
        "tensorflow",
        "tensorflow_transform",
    },
    "runners": {"runners", "beam_jobs", "apache_beam", "dask", "distributed"},
}
# The top layer: the Python API and the console scripts run the jobs and the reader.
TOP_LAYER = {
    "s3tfr/api.py": {"beam_jobs", "tfdata_reader", "transforms"},
    "s3tfr/cli.py": {"beam_jobs"},
}


def _imports(path: pathlib.Path):
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", "") == "import_module"
        ):
            # importlib.import_module(f"beam_jobs.{job}") and the like
            arg = node.args[0] if node.args else None
            if isinstance(arg, ast.JoinedStr) and isinstance(
                arg.values[0], ast.Constant
            ):
                yield node.lineno, arg.values[0].value
            elif isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                yield node.lineno, arg.value


def _violations(package: str) -> list[str]:
    found = []
    for path in sorted((ROOT / package).rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        allowed = ALLOWED[package] | TOP_LAYER.get(rel, set())
        for line, module in _imports(path):
            top = module.split(".")[0]
            if top in (PROJECT | FRAMEWORKS) and top not in allowed:
                found.append(f"{rel}:{line}: imports {module}")
    return found


@pytest.mark.parametrize("package", SHIPPED)
def test_imports_follow_the_package_graph(package):
    assert _violations(package) == []


def test_the_check_sees_a_forbidden_import(tmp_path, monkeypatch):
    # The check itself: a reader module importing Beam, and the core importing the
    # reader inside a function, are both reported.
    fake = tmp_path / "tfdata_reader"
    fake.mkdir()
    (fake / "bad.py").write_text("import os\n\ndef f():\n    import apache_beam\n")
    core = tmp_path / "s3tfr"
    core.mkdir()
    (core / "bad.py").write_text("from tfdata_reader.dataset import make_dataset\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert _violations("tfdata_reader") == [
        "tfdata_reader/bad.py:4: imports apache_beam"
    ]
    assert _violations("s3tfr") == ["s3tfr/bad.py:1: imports tfdata_reader.dataset"]
