"""Process boundaries: the API stays torch-free; a worker never runs without a model."""

from __future__ import annotations

import subprocess
import sys

from tests.stack import ROOT, clean_env, cxr


def test_api_imports_no_torch():
    code = "import sys, api.main; assert 'torch' not in sys.modules, 'api imported torch'; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=clean_env(), capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_worker_without_bundle_stops_with_instructions(tmp_path):
    # No CXR_CHECKPOINT and no shipped default: the worker must refuse, saying how to get a bundle.
    cxr("db", "upgrade", env=clean_env(CXR_HOME=str(tmp_path)))
    code = ("import sys; from pathlib import Path; import cxr.settings as s; "
            "s.DEFAULT_BUNDLE = Path('/nonexistent/cxr-default.safetensors'); "
            "from cxr.cli import app; app(['worker'], prog_name='cxr')")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=clean_env(CXR_HOME=str(tmp_path)),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "No model bundle is configured" in out.stderr and "CXR_CHECKPOINT" in out.stderr
    assert "celery" not in out.stdout.lower()  # never got as far as starting a worker


def test_worker_with_missing_bundle_file_stops(tmp_path):
    out = cxr("worker", env=clean_env(CXR_HOME=str(tmp_path), CXR_CHECKPOINT=str(tmp_path / "nope.safetensors")),
              check=False, timeout=120)
    assert out.returncode == 2
    assert "model bundle not found" in out.stderr and "CXR_CHECKPOINT" in out.stderr


def test_worker_rejects_a_file_that_is_not_a_bundle(tmp_path):
    bogus = tmp_path / "model.safetensors"
    bogus.write_bytes(b"not a bundle at all")
    out = cxr("worker", env=clean_env(CXR_HOME=str(tmp_path), CXR_CHECKPOINT=str(bogus)), check=False, timeout=120)
    assert out.returncode == 2 and "cannot use model bundle" in out.stderr
