"""Fetches the engines into a git-ignored cache, once per version.

In: the versions pinned below. Out, under ``CACHE`` (``.engines/`` at the repository
root, or ``$ENGINES_CACHE``):

```
beam-2.62.0/flink-1.19/   lib/*.jar and beam-runners-flink-1.19-job-server-2.62.0.jar
beam-2.62.0/spark-3/      lib/*.jar and beam-runners-spark-3-job-server-2.62.0.jar
flink-1.19.3/             bin/ conf/ lib/ opt/ plugins/  (a Flink distribution)
spark-3.5.7/              bin/ sbin/ jars/               (a Spark distribution)
```

Beam publishes each job server as one shaded jar
(``beam-runners-flink-1.19-job-server``, ``beam-runners-spark-3-job-server``); the Maven
mirror these machines reach serves neither, but it serves the runner modules the jars
are built from with every dependency. So Maven's ``dependency:copy-dependencies`` puts
the runner and its dependencies in ``lib/``, and the ``…-job-server-….jar`` beside it is
a manifest-only jar (``Main-Class`` = the job server driver, ``Class-Path`` = ``lib/``),
which ``java -jar`` and Beam's ``--flink_job_server_jar`` / ``--spark_job_server_jar``
run as they would the published one.

A folder is complete when its ``.complete`` file holds the versions it was made for; it
is built in a temporary folder beside it and renamed into place, under a lock, so an
interrupted or concurrent fetch never leaves half an engine behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

_LOGGER = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("ENGINES_CACHE", ROOT / ".engines"))

# The newest Beam Java release whose Flink and Spark runner modules and job service the
# Maven mirror serves with all their dependencies (docs/RUNNING_ON_CLUSTERS.md says
# which look-ups decided it). The Python SDK (2.77) submits to it over the portable job
# API, which is versioned by its protos, not by Beam's release.
BEAM_JAVA_VERSION = "2.62.0"
FLINK_MINOR = "1.19"  # the newest Flink that Beam 2.62's runners are built for
FLINK_VERSION = "1.19.3"
SPARK_VERSION = "3.5.7"  # Scala 2.12, as Beam's Spark 3 runner

FLINK_DRIVER = "org.apache.beam.runners.flink.FlinkJobServerDriver"
SPARK_DRIVER = "org.apache.beam.runners.spark.SparkJobServerDriver"
# The job servers log through SLF4J 1.7 (the version their dependencies bring).
_SLF4J_BINDING = ("org.slf4j", "slf4j-simple", "1.7.30")

_POM = """<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local.engines</groupId>
  <artifactId>{artifact}-classpath</artifactId>
  <version>{version}</version>
  <packaging>pom</packaging>
  <dependencies>
{dependencies}
  </dependencies>
</project>
"""
_DEPENDENCY = """    <dependency>
      <groupId>{}</groupId><artifactId>{}</artifactId><version>{}</version>
    </dependency>"""


@contextlib.contextmanager
def _locked(name: str) -> Iterator[None]:
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / f".{name.replace('/', '-')}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _ensure(name: str, stamp: str, build) -> Path:
    """``CACHE/name``, built by ``build(tmp_dir)`` unless already complete for ``stamp``."""
    target = CACHE / name
    marker = target / ".complete"
    if marker.is_file() and marker.read_text() == stamp:
        return target
    with _locked(name):
        if marker.is_file() and marker.read_text() == stamp:
            return target
        print(f"engines: fetching {name} into {CACHE} (once)", file=sys.stderr)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            build(tmp)
            (tmp / ".complete").write_text(stamp)
            if target.exists():
                shutil.rmtree(target)
            tmp.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _run(cmd: list[str], cwd: Path, what: str) -> None:
    proc = subprocess.run(cmd, check=False, cwd=cwd, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(
            f"{what} failed ({' '.join(cmd[:3])} …, exit {proc.returncode}):\n"
            f"{(proc.stdout + proc.stderr)[-4000:]}"
        )


def _manifest_jar(path: Path, main_class: str, class_path: list[str]) -> None:
    """A jar with only a manifest: ``java -jar path`` runs ``main_class`` on ``class_path``
    (paths relative to the jar's folder)."""

    def wrap(line: str) -> str:  # manifest lines are at most 72 bytes
        out = [line[:72]]
        out += [" " + line[i : i + 71] for i in range(72, len(line), 71)]
        return "\r\n".join(out)

    manifest = "".join(
        wrap(line) + "\r\n"
        for line in (
            "Manifest-Version: 1.0",
            "Created-By: engines/fetch.py",
            f"Main-Class: {main_class}",
            "Class-Path: " + " ".join(class_path),
        )
    )
    with zipfile.ZipFile(path, "w") as jar:
        jar.writestr("META-INF/MANIFEST.MF", manifest + "\r\n")


def job_server(engine: str) -> Path:
    """The job server jar of ``engine`` (``flink`` or ``spark``), fetched once.

    Returns:
        The manifest-only jar; its ``lib/`` folder lies beside it.
    """
    if engine == "flink":
        module, driver = f"beam-runners-flink-{FLINK_MINOR}", FLINK_DRIVER
    elif engine == "spark":
        module, driver = "beam-runners-spark-3", SPARK_DRIVER
    else:
        raise ValueError(f"unknown engine {engine!r}: flink or spark")
    jar_name = f"{module}-job-server-{BEAM_JAVA_VERSION}.jar"

    def build(tmp: Path) -> None:
        if shutil.which("mvn") is None:
            raise RuntimeError("engines: Maven (mvn) is needed to fetch the job servers")
        deps = [("org.apache.beam", module, BEAM_JAVA_VERSION), _SLF4J_BINDING]
        (tmp / "pom.xml").write_text(
            _POM.format(
                artifact=module,
                version=BEAM_JAVA_VERSION,
                dependencies="\n".join(_DEPENDENCY.format(*d) for d in deps),
            )
        )
        _run(
            ["mvn", "-B", "-q", "dependency:copy-dependencies",
             "-DoutputDirectory=lib", "-DincludeScope=runtime"],
            tmp, f"resolving {module}:{BEAM_JAVA_VERSION} from Maven Central",
        )  # fmt: skip
        jars = sorted(p.name for p in (tmp / "lib").glob("*.jar"))
        _manifest_jar(tmp / jar_name, driver, [f"lib/{name}" for name in jars])

    folder = _ensure(
        f"beam-{BEAM_JAVA_VERSION}/{engine}", f"{module} {BEAM_JAVA_VERSION}", build
    )
    return folder / jar_name


def _pip_download(requirements: list[str], dest: Path) -> list[Path]:
    _run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--no-build-isolation",
         "--quiet", "--dest", str(dest), *requirements],
        dest, f"downloading {' '.join(requirements)} from PyPI",
    )  # fmt: skip
    return sorted(dest.iterdir())


def _unpack(archive: Path, members: dict[str, str], dest: Path) -> None:
    """Copies the archive's files under each ``prefix`` of ``members`` to
    ``dest/members[prefix]``, keeping the paths below the prefix."""
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as z:
            for name in z.namelist():
                if not name.endswith("/"):
                    _copy_member(name, lambda n=name: z.open(n), members, dest)
    else:
        with tarfile.open(archive) as tar:
            for info in tar:
                if info.isfile():
                    _copy_member(info.name, lambda i=info: tar.extractfile(i), members, dest)


def _copy_member(name: str, open_member, members: dict[str, str], dest: Path) -> None:
    for prefix, folder in members.items():
        if prefix in name:
            out = dest / folder / name.split(prefix, 1)[1]
            out.parent.mkdir(parents=True, exist_ok=True)
            with open_member() as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst)
            return


def flink_home() -> Path:
    """A Flink distribution: ``bin/`` and ``conf/`` from the ``apache-flink`` wheel, the
    jars from ``apache-flink-libraries`` (unpacked, not installed)."""

    def build(tmp: Path) -> None:
        dl = tmp / ".download"
        dl.mkdir()
        for archive in _pip_download(
            [f"apache-flink=={FLINK_VERSION}", f"apache-flink-libraries=={FLINK_VERSION}"],
            dl,
        ):
            _unpack(
                archive,
                {"pyflink/bin/": "bin", "pyflink/conf/": "conf", "deps/lib/": "lib",
                 "deps/opt/": "opt", "deps/plugins/": "plugins", "deps/bin/": "bin"},
                tmp,
            )  # fmt: skip
        shutil.rmtree(dl)
        for script in (tmp / "bin").iterdir():
            script.chmod(0o755)
        if not list((tmp / "lib").glob("flink-dist-*.jar")):
            raise RuntimeError(f"apache-flink-libraries {FLINK_VERSION} has no flink-dist")

    return _ensure(f"flink-{FLINK_VERSION}", FLINK_VERSION, build)


def spark_home() -> Path:
    """A Spark distribution: ``bin/``, ``sbin/`` and ``jars/`` from the ``pyspark``
    package (unpacked, not installed)."""

    def build(tmp: Path) -> None:
        dl = tmp / ".download"
        dl.mkdir()
        for archive in _pip_download([f"pyspark=={SPARK_VERSION}"], dl):
            _unpack(
                archive,
                {"deps/bin/": "bin", "deps/sbin/": "sbin", "deps/jars/": "jars"},
                tmp,
            )
        shutil.rmtree(dl)
        for folder in ("bin", "sbin"):
            for script in (tmp / folder).iterdir():
                script.chmod(0o755)
        # Spark's scripts read the version from a RELEASE file or from the jars' names.
        if not list((tmp / "jars").glob(f"spark-core_2.12-{SPARK_VERSION}.jar")):
            raise RuntimeError(f"pyspark {SPARK_VERSION} has no spark-core jar")

    return _ensure(f"spark-{SPARK_VERSION}", SPARK_VERSION, build)


def fetch_all(engines: tuple[str, ...] = ("flink", "spark")) -> None:
    """Fetches everything ``engines`` need (idempotent)."""
    for engine in engines:
        job_server(engine)
        (flink_home if engine == "flink" else spark_home)()
