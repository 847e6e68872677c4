"""`cxr model activate` decides which bundle the workers use; each result records its version."""

from __future__ import annotations

import json
import uuid
from dataclasses import replace
from pathlib import Path

from cxr.bundle import read_meta
from cxr.registry import resolve_bundle
from cxr.settings import Settings
from tests.stack import clean_env, cxr


def second_bundle(tiny_bundle: Path, tmp_path: Path) -> Path:
    """Another bundle (same weights, different version) written through save_bundle."""
    from worker.screening.model import load_bundle, save_bundle

    loaded = load_bundle(tiny_bundle)
    return save_bundle(tmp_path / "v2.safetensors", loaded.model, replace(loaded.meta, version="v2"))


def test_activate_list_and_worker_uses_active_version(tmp_path, tiny_bundle):
    from worker.service import process_study

    home = tmp_path / "var"
    env = clean_env(CXR_HOME=str(home))
    cxr("db", "upgrade", env=env)
    v2 = second_bundle(tiny_bundle, tmp_path)
    out = cxr("model", "activate", str(tiny_bundle), env=env)
    assert "version test-random" in out.stdout
    out = cxr("model", "activate", str(v2), env=env)
    assert "version v2" in out.stdout
    listed = json.loads(cxr("model", "list", "--format", "json", env=env).stdout)
    assert [(m["version"], m["active"]) for m in listed] == [("v2", True), ("test-random", False)]

    settings = Settings(home=home)
    active = resolve_bundle(settings)
    assert active.parent == home / "models" and read_meta(active).version == "v2"
    # An explicit CXR_CHECKPOINT still wins.
    assert resolve_bundle(Settings(home=home, checkpoint=tiny_bundle)) == tiny_bundle.resolve()

    # A study screened now is scored by the active version, and says so.
    from celery import Celery

    from cxr.intake import register
    from cxr.store import put_file
    from tests.imagegen import write_png

    celery = Celery(broker="filesystem://")
    qdir = str(tmp_path / "q")
    Path(qdir).mkdir()
    celery.conf.broker_transport_options = {"data_folder_in": qdir, "data_folder_out": qdir,
                                            "control_folder": qdir + "-control"}
    stored = put_file(settings.store_dir, write_png(tmp_path / "f.png"))
    study = register(settings, celery, stored=stored, filename="f.png", source="api")
    assert process_study(settings, study.study_id) == "done"
    wl = json.loads(cxr("worklist", "--format", "json", env=env).stdout)
    assert wl[0]["status"] == "done" and wl[0]["model_version"] == "v2"
    listed = {m["version"]: m["results"] for m in json.loads(cxr("model", "list", "-f", "json", env=env).stdout)}
    assert listed == {"v2": 1, "test-random": 0}


def test_activate_refuses_a_non_bundle(tmp_path):
    env = clean_env(CXR_HOME=str(tmp_path / "var"))
    cxr("db", "upgrade", env=env)
    junk = tmp_path / f"{uuid.uuid4().hex}.safetensors"
    junk.write_bytes(b"junk")
    out = cxr("model", "activate", str(junk), env=env, check=False)
    assert out.returncode == 2 and "cannot activate" in out.stderr
