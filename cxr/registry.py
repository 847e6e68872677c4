"""Which model bundle serves: explicit setting, else the active version in the database,
else the bundle shipped in ``models/``. Torch-free (the API uses it for /model/info)."""

from __future__ import annotations

import shutil
from pathlib import Path

from cxr.bundle import file_sha256, read_meta
from cxr.db import repo
from cxr.db.models import ModelVersion
from cxr.db.session import session_scope
from cxr import settings as settings_module
from cxr.settings import Settings


def resolve_bundle(settings: Settings, *, use_registry: bool = True) -> Path | None:
    """CXR_CHECKPOINT if set; else the version activated with `cxr model activate`;
    else models/cxr-default.safetensors if present; else None."""
    if settings.checkpoint is not None:
        return settings.checkpoint
    if use_registry:
        with session_scope(settings.database_url) as session:
            mv = repo.active_model_version(session)
            if mv is not None and mv.path:
                return Path(mv.path)
    default = settings_module.DEFAULT_BUNDLE
    return default if default.exists() else None


def activate(settings: Settings, bundle: Path) -> ModelVersion:
    """Copy a bundle into CXR_HOME/models (so every host sharing CXR_HOME sees it), record it
    in model_versions and make it the active version. Workers pick it up when (re)started."""
    meta = read_meta(bundle)
    sha = file_sha256(bundle)
    dest = settings.home / "models" / f"{sha}.safetensors"
    if not dest.exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_suffix(".tmp")
        shutil.copyfile(bundle, tmp)
        tmp.replace(dest)
    with session_scope(settings.database_url) as session:
        mv = repo.ensure_model_version(session, checkpoint_sha256=sha, architecture=meta.architecture,
                                       class_names=list(meta.classes), version=meta.version)
        return repo.activate_model_version(session, model_version_id=mv.id, path=str(dest))
