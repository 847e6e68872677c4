"""Start and stop real cxr processes for end-to-end tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**overrides: str) -> dict[str, str]:
    """The current environment without any CXR_* setting, plus the given ones."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CXR_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(overrides)
    return env


def cxr(*args: str, env: dict[str, str], timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "cxr", *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"cxr {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


@dataclass
class Stack:
    """Long-running cxr processes; their output goes to log files shown on failure."""

    log_dir: Path
    env: dict[str, str]
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def start(self, name: str, *args: str) -> subprocess.Popen:
        log = (self.log_dir / f"{name}.log").open("w")
        p = subprocess.Popen([sys.executable, "-m", "cxr", *args], env=self.env, cwd=ROOT, stdout=log,
                             stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[name] = p
        return p

    def logs(self) -> str:
        return "\n".join(f"----- {p.name}\n{p.read_text()[-6000:]}" for p in sorted(self.log_dir.glob("*.log")))

    def assert_running(self) -> None:
        for name, p in self.procs.items():
            if p.poll() is not None:
                raise AssertionError(f"{name} exited with {p.returncode}\n{self.logs()}")

    def wait_http(self, url: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.assert_running()
            try:
                if httpx.get(url, timeout=2).status_code < 500:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise AssertionError(f"{url} not up after {timeout}s\n{self.logs()}")

    def stop(self, timeout: float = 60) -> dict[str, int]:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        codes = {}
        for name, p in self.procs.items():
            try:
                codes[name] = p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                codes[name] = p.wait()
        return codes


def wait_until(predicate, *, timeout: float, interval: float = 0.5, describe=lambda: ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s: {describe()}")
