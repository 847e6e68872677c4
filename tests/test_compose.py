"""docker-compose.yml is valid Compose (checked by the real Compose v2 binary, no engine needed)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import compose

from tests.stack import ROOT


def test_compose_file_validates():
    binary = Path(compose.__file__).parent / "docker-compose"
    out = subprocess.run([str(binary), "-f", str(ROOT / "docker-compose.yml"), "config", "-q"],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    services = subprocess.run([str(binary), "-f", str(ROOT / "docker-compose.yml"), "config", "--services"],
                              capture_output=True, text=True, cwd=ROOT).stdout.split()
    assert {"postgres", "redis", "migrate", "api", "watcher", "worker"} <= set(services)
