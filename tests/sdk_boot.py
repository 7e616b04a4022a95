"""A minimal SDK worker boot for tests: what the Beam SDK container's ``boot`` does before
it starts the harness, on this machine, with nothing from the project on the path.

``python -m apache_beam.runners.worker.worker_pool_main --container_executable=X`` runs
``X --id=… --provision_endpoint=… --artifact_endpoint=… --control_endpoint=…`` per
worker. This fetches the job's staged artifacts (the ``--setup_file`` sdist), installs
them offline into a private folder, hides any editable install of the project, and runs
the SDK harness: the job's DoFns can only import ``beam_jobs`` / ``transforms`` from what
the job staged, as on a Flink, Spark or Dataflow worker.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

import grpc
from apache_beam.portability import common_urns
from apache_beam.portability.api import (
    beam_artifact_api_pb2,
    beam_artifact_api_pb2_grpc,
    beam_provision_api_pb2,
    beam_provision_api_pb2_grpc,
    beam_runner_api_pb2,
)


def _staged_name(dep: beam_runner_api_pb2.ArtifactInformation) -> str:
    payload = beam_runner_api_pb2.ArtifactStagingToRolePayload.FromString(
        dep.role_payload
    )
    return os.path.basename(payload.staged_name)


def fetch_artifacts(
    provision: str, artifacts: str, worker_id: str, dest: str
) -> list[str]:
    """Writes the job's staged artifacts to ``dest``; returns their paths."""
    metadata = [("worker_id", worker_id)]
    info = (
        beam_provision_api_pb2_grpc.ProvisionServiceStub(
            grpc.insecure_channel(provision)
        )
        .GetProvisionInfo(
            beam_provision_api_pb2.GetProvisionInfoRequest(), metadata=metadata
        )
        .info
    )
    retrieval = beam_artifact_api_pb2_grpc.ArtifactRetrievalServiceStub(
        grpc.insecure_channel(artifacts)
    )
    paths = []
    for dep in info.dependencies:
        if dep.role_urn != common_urns.artifact_roles.STAGING_TO.urn:
            continue
        path = os.path.join(dest, _staged_name(dep))
        with open(path, "wb") as f:
            request = beam_artifact_api_pb2.GetArtifactRequest(artifact=dep)
            f.writelines(
                c.data for c in retrieval.GetArtifact(request, metadata=metadata)
            )
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for flag in ("id", "logging_endpoint", "artifact_endpoint", "provision_endpoint",
                 "control_endpoint"):  # fmt: skip
        parser.add_argument(f"--{flag}", required=True)
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix=f"sdk-boot-{args.id}-")
    staged = fetch_artifacts(
        args.provision_endpoint, args.artifact_endpoint, args.id, work
    )
    packages = [p for p in staged if p.endswith((".tar.gz", ".whl"))]
    site = os.path.join(work, "site")
    if packages:
        # Offline: the worker's image already holds the dependencies (see Dockerfile).
        pip = [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-index",
        ]
        subprocess.run(
            [*pip, "--no-build-isolation", "--target", site, *packages],
            check=True,
            stdout=sys.stderr,
        )
    # The test machine's editable install would otherwise supply the project.
    sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in repr(f)]
    sys.path[:] = [site] + [
        p for p in sys.path if p and os.path.abspath(p) != os.getcwd()
    ]
    from apache_beam.runners.worker.sdk_worker import SdkHarness

    SdkHarness(args.control_endpoint, worker_id=args.id, state_cache_size=0).run()


if __name__ == "__main__":
    main()
