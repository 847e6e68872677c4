#!/usr/bin/env python3
"""Quick start for a fresh clone; needs only Python 3.11+.

    python3 scripts/dev.py up      # install into .venv, migrate, run API + watcher + worker
    python3 scripts/dev.py test    # install with test extras into .venv, run the test suite

Anything after the verb is passed on (to `cxr up` or to pytest). The install is skipped
when pyproject.toml has not changed since the last one.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = Path(os.environ.get("CXR_VENV", ROOT / ".venv"))
PY = VENV / "bin" / "python"


def ensure_env(extras: str) -> None:
    if sys.version_info < (3, 11):
        sys.exit(f"cxr-screen needs Python 3.11 or newer; this is {sys.version.split()[0]}")
    if not PY.exists():
        print(f"creating virtual environment {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + extras.encode()).hexdigest()
    stamp = VENV / f".cxr-installed-{extras or 'base'}"
    if stamp.exists() and stamp.read_text() == digest:
        return
    target = f"{ROOT}[{extras}]" if extras else str(ROOT)
    print(f"installing cxr-screen{f'[{extras}]' if extras else ''} into {VENV} (first run takes a few minutes)",
          flush=True)
    subprocess.run([str(PY), "-m", "pip", "install", "-q", "--upgrade", "pip"], check=True)
    subprocess.run([str(PY), "-m", "pip", "install", "-q", "-e", target], check=True)
    stamp.write_text(digest)


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("up", "test"):
        print(__doc__)
        return 2
    verb, rest = argv[0], argv[1:]
    if verb == "up":
        ensure_env("")
        return subprocess.call([str(PY), "-m", "cxr", "up", *rest], cwd=ROOT)
    ensure_env("test")
    return subprocess.call([str(PY), "-m", "pytest", "-ra", *rest], cwd=ROOT)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
