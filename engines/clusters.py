"""Flink and Spark clusters on 127.0.0.1 with Beam's job server in front of them.

In: an engine name and a working folder. Out: a running :class:`Engine` (job endpoint,
cluster address, the pipeline options that submit to it) until the context ends; then
every process it started is stopped with its whole process group.

- Flink: a session cluster, one JobManager and one TaskManager with ``slots`` slots
  (Flink's own ``bin/jobmanager.sh`` / ``bin/taskmanager.sh start-foreground``), and
  Beam's Flink job server submitting to its REST endpoint.
- Spark: a standalone master and one worker (``bin/spark-class`` …``Master`` /
  ``Worker``), and Beam's Spark job server as the driver that runs jobs on it.

All of it listens on 127.0.0.1 on free ports, with small heaps (the machine has two
cores). The logs are in ``<workdir>/log``; :func:`running` removes a working folder it
created itself only when the block ends without an error, so logs outlive a failure.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from engines import fetch

_LOGGER = logging.getLogger(__name__)

START_TIMEOUT_S = 180
# Flink 1.19 and Spark 3.5 on Java 17 need these opened (Flink's default config.yaml and
# Spark's launcher pass the same); the job servers run their clients in-process.
JAVA_17_OPTS = [
    "-XX:+IgnoreUnrecognizedVMOptions",
    *(f"--add-opens=java.base/{pkg}=ALL-UNNAMED"
      for pkg in ("java.lang", "java.lang.invoke", "java.lang.reflect", "java.io",
                  "java.net", "java.nio", "java.text", "java.time", "java.util",
                  "java.util.concurrent", "java.util.concurrent.atomic",
                  "java.util.concurrent.locks", "sun.nio.ch", "sun.nio.cs",
                  "sun.security.action", "sun.util.calendar")),
    "--add-exports=java.base/sun.net.util=ALL-UNNAMED",
    "--add-exports=java.rmi/sun.rmi.registry=ALL-UNNAMED",
    "--add-opens=java.security.jgss/sun.security.krb5=ALL-UNNAMED",
]  # fmt: skip
JOB_SERVER_HEAP = "-Xmx512m"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EngineError(RuntimeError):
    """An engine process exited or did not become ready; the message has its log tail."""


@dataclasses.dataclass
class _Process:
    name: str
    proc: subprocess.Popen
    log: Path

    def tail(self, chars: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def check(self) -> None:
        if self.proc.poll() is not None:
            raise EngineError(
                f"{self.name} exited with status {self.proc.returncode} "
                f"(log: {self.log}):\n{self.tail()}"
            )

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        # Children (executors, the JVM under a start script) that outlived the leader.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)


@dataclasses.dataclass
class Engine:
    """A running engine: where to submit jobs and the options that do it."""

    name: str  # "flink" or "spark"
    job_endpoint: str  # Beam's job server, HOST:PORT
    master: str  # Flink's REST address or Spark's master URL
    web_ui: str
    workdir: Path
    job_server_jar: Path

    def pipeline_args(self, environment: str = "LOOPBACK", config: str = "") -> list[str]:
        """The options that run a Beam Python pipeline on this engine.

        Args:
            environment: ``LOOPBACK`` (the SDK workers run in the launching process),
                ``EXTERNAL`` (a worker pool at ``config``, HOST:PORT) or ``PROCESS``
                (``config`` is the JSON of a boot command).
            config: the ``--environment_config`` for EXTERNAL and PROCESS.
        """
        runner = {"flink": "FlinkRunner", "spark": "SparkRunner"}[self.name]
        args = [f"--runner={runner}", f"--job_endpoint={self.job_endpoint}",
                f"--environment_type={environment}"]  # fmt: skip
        if config:
            args.append(f"--environment_config={config}")
        if self.name == "flink":
            args += [f"--flink_master={self.master}", f"--flink_version={fetch.FLINK_MINOR}"]
        else:
            args.append(f"--spark_master_url={self.master}")
        return args


def _start(name: str, cmd: list[str], env: dict, workdir: Path) -> _Process:
    log = workdir / "log" / f"{name}.out"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd,
            env=env,
            cwd=workdir,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    _LOGGER.info("started %s (pid %d): %s", name, proc.pid, log)
    return _Process(name, proc, log)


def _wait(what: str, ready, procs: list[_Process]) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        for p in procs:
            p.check()
        with contextlib.suppress(OSError, ValueError):
            if ready():
                return
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {p.name} ({p.log}):\n{p.tail(2000)}" for p in procs)
            raise EngineError(f"{what} not ready after {START_TIMEOUT_S} s\n{tails}")
        time.sleep(0.25)


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.load(response)


def _base_env() -> dict:
    env = dict(os.environ)
    # The cluster processes never talk to S3; they must not be steered by a user's
    # Java or Python settings either.
    for name in ("CLASSPATH", "JAVA_TOOL_OPTIONS", "_JAVA_OPTIONS", "PYSPARK_PYTHON"):
        env.pop(name, None)
    return env


def _flink(workdir: Path, slots: int, procs: list[_Process]) -> tuple[str, str]:
    home = fetch.flink_home()
    conf = workdir / "conf"
    conf.mkdir(parents=True, exist_ok=True)
    for name in ("log4j-console.properties", "log4j.properties", "logback-console.xml"):
        shutil.copy(home / "conf" / name, conf / name)
    rest_port = free_port()
    settings = {
        "jobmanager.rpc.address": "127.0.0.1",
        "jobmanager.rpc.port": free_port(),
        "jobmanager.bind-host": "127.0.0.1",
        "jobmanager.memory.process.size": "768m",
        "jobmanager.execution.failover-strategy": "region",
        "taskmanager.host": "127.0.0.1",
        "taskmanager.bind-host": "127.0.0.1",
        "taskmanager.numberOfTaskSlots": slots,
        "taskmanager.memory.process.size": "2048m",
        # Beam's batch translation sorts in managed memory; a job with many shuffles
        # (analyze) needs more network buffers than the default fraction of this heap.
        "taskmanager.memory.managed.size": "128m",
        "taskmanager.memory.network.min": "512m",
        "taskmanager.memory.network.max": "512m",
        "rest.address": "127.0.0.1",
        "rest.bind-address": "127.0.0.1",
        "rest.port": rest_port,
        "blob.server.port": free_port(),
        "parallelism.default": slots,
        "env.java.opts.all": " ".join(JAVA_17_OPTS),
        "io.tmp.dirs": str(workdir / "tmp"),
    }
    (workdir / "tmp").mkdir(exist_ok=True)
    # Flink 1.19's config.yaml is standard YAML; flat keys are accepted.
    (conf / "config.yaml").write_text(
        "".join(f"{key}: {json.dumps(value)}\n" for key, value in settings.items())
    )
    env = _base_env()
    env.update(FLINK_HOME=str(home), FLINK_CONF_DIR=str(conf),
               FLINK_LOG_DIR=str(workdir / "log"))  # fmt: skip
    procs.append(_start("flink-jobmanager", [str(home / "bin/jobmanager.sh"), "start-foreground"], env, workdir))  # fmt: skip
    _wait("Flink JobManager", lambda: _listening(rest_port), procs)
    procs.append(_start("flink-taskmanager", [str(home / "bin/taskmanager.sh"), "start-foreground"], env, workdir))  # fmt: skip
    rest = f"127.0.0.1:{rest_port}"

    def slots_up() -> bool:
        tms = _get_json(f"http://{rest}/taskmanagers")["taskmanagers"]
        return sum(tm["slotsNumber"] for tm in tms) >= slots

    _wait("Flink TaskManager", slots_up, procs)
    return rest, f"http://{rest}"


def _spark(workdir: Path, cores: int, procs: list[_Process]) -> tuple[str, str]:
    home = fetch.spark_home()
    (workdir / "conf").mkdir(parents=True, exist_ok=True)
    env = _base_env()
    env.update(
        SPARK_HOME=str(home),
        SPARK_CONF_DIR=str(workdir / "conf"),
        SPARK_LOG_DIR=str(workdir / "log"),
        SPARK_LOCAL_IP="127.0.0.1",
        SPARK_LOCAL_DIRS=str(workdir / "tmp"),
        SPARK_DAEMON_MEMORY="256m",
        SPARK_NO_DAEMONIZE="1",
    )
    port, ui = free_port(), free_port()
    master = f"spark://127.0.0.1:{port}"
    spark_class = str(home / "bin/spark-class")
    procs.append(_start("spark-master", [spark_class, "org.apache.spark.deploy.master.Master",
                                         "--host", "127.0.0.1", "--port", str(port),
                                         "--webui-port", str(ui)], env, workdir))  # fmt: skip
    _wait("Spark master", lambda: _listening(port), procs)
    procs.append(_start("spark-worker", [spark_class, "org.apache.spark.deploy.worker.Worker",
                                         "--host", "127.0.0.1", "--port", str(free_port()),
                                         "--webui-port", str(free_port()),
                                         "--cores", str(cores), "--memory", "1536m",
                                         "--work-dir", str(workdir / "work"), master],
                        env, workdir))  # fmt: skip
    web_ui = f"http://127.0.0.1:{ui}"
    _wait("Spark worker", lambda: _get_json(f"{web_ui}/json/")["aliveworkers"] >= 1, procs)
    return master, web_ui


def _job_server(engine: str, master: str, workdir: Path, procs: list[_Process]) -> str:
    jar = fetch.job_server(engine)
    port = free_port()
    cmd = ["java", JOB_SERVER_HEAP, *JAVA_17_OPTS]
    if engine == "flink":
        cmd += ["-jar", str(jar), f"--flink-master={master}",
                f"--flink-conf-dir={workdir / 'conf'}"]  # fmt: skip
    else:
        # Beam's published Spark job server jar bundles Spark; here Spark's own jars (the
        # cluster's) complete the class path.
        spark_jars = fetch.spark_home() / "jars" / "*"
        cmd += ["-Dspark.executor.memory=1g", "-Dspark.driver.host=127.0.0.1",
                "-Dspark.driver.bindAddress=127.0.0.1", "-Dspark.ui.enabled=false",
                "-cp", f"{jar}{os.pathsep}{spark_jars}", fetch.SPARK_DRIVER,
                f"--spark-master-url={master}"]  # fmt: skip
    cmd += ["--job-host=127.0.0.1", f"--job-port={port}", "--artifact-port=0",
            "--expansion-port=0", f"--artifacts-dir={workdir / 'artifacts'}"]  # fmt: skip
    env = _base_env()
    env["SPARK_LOCAL_IP"] = "127.0.0.1"
    procs.append(_start(f"{engine}-job-server", cmd, env, workdir))
    _wait(f"Beam's {engine} job server", lambda: _listening(port), procs)
    return f"127.0.0.1:{port}"


@contextlib.contextmanager
def running(
    engine: str, workdir: str | os.PathLike | None = None, slots: int = 2
) -> Iterator[Engine]:
    """Starts ``engine`` (``flink`` or ``spark``) and its job server; stops them at exit.

    Args:
        engine: ``flink`` (session cluster) or ``spark`` (standalone cluster).
        workdir: configuration, logs and scratch space; a temporary folder when
            ``None``, removed at exit unless the block raised.
        slots: Flink task slots / Spark worker cores.

    Raises:
        EngineError: a process exited or did not become ready (with its log's tail).
    """
    if engine not in ("flink", "spark"):
        raise ValueError(f"unknown engine {engine!r}: flink or spark")
    own = workdir is None
    path = Path(tempfile.mkdtemp(prefix=f"{engine}-") if own else workdir)
    path.mkdir(parents=True, exist_ok=True)
    procs: list[_Process] = []
    ok = False
    try:
        if engine == "flink":
            master, web_ui = _flink(path, slots, procs)
        else:
            master, web_ui = _spark(path, slots, procs)
        endpoint = _job_server(engine, master, path, procs)
        yield Engine(engine, endpoint, master, web_ui, path, fetch.job_server(engine))
        ok = True
    finally:
        for p in reversed(procs):
            p.stop()
        if own and ok:
            shutil.rmtree(path, ignore_errors=True)
        elif not ok:
            _LOGGER.warning("%s: logs kept in %s", engine, path / "log")
