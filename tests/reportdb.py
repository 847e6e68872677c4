"""A generated database of 20 studies, screened through the real intake and worker code, for
the report tests: 15 scored (two model versions, some flagged), 3 rejected, 2 failed,
spread over three days."""

from __future__ import annotations

import io
import uuid
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path

import numpy as np
from PIL import Image
from sqlalchemy import select

from cxr.db.models import Result, Study
from cxr.db.session import session_scope
from cxr.settings import Settings
from tests.badfiles import half, png_bytes
from tests.imagegen import chest_like, write_dicom

N_STUDIES = 20
REJECTED = {"notes.png": "not_an_image", "one_pixel.png": "too_small", "truncated.png": "unreadable"}
FAILED = ("lost-a.png", "lost-b.png")  # their stored copies vanish before screening: store_unreadable
VERSIONS = ("test-calibrated", "test-operating-point")


@dataclass(frozen=True)
class ReportDb:
    settings: Settings
    env: dict[str, str]  # CXR_* for `cxr` subprocesses on this database
    study_ids: dict[str, uuid.UUID]  # file name -> study id
    versions: tuple[str, str]


def _varied(seed: int) -> np.ndarray:
    """chest_like, with a per-image gain, offset and gradient so the random model's scores spread."""
    rng = np.random.default_rng(1000 + seed)
    img = chest_like(300, seed=seed).astype(np.float32) / 255
    yy = np.linspace(0, 1, img.shape[0])[:, None]
    img = img * rng.uniform(0.5, 1.3) + rng.uniform(-0.25, 0.25) + rng.uniform(-0.4, 0.4) * yy
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


def _good_files(folder: Path) -> list[Path]:
    files = []
    for i in range(12):
        files.append(folder / f"film{i:02d}.png")
        Image.fromarray(_varied(i)).save(files[-1], format="PNG")
    for i in (12, 13):
        files.append(folder / f"film{i:02d}.jpg")
        Image.fromarray(_varied(i)).save(files[-1], format="JPEG", quality=90)
    files.append(write_dicom(folder / "film14.dcm", size=300, seed=14))
    return files


def _bad_files(folder: Path) -> list[Path]:
    png = io.BytesIO()
    Image.fromarray(_varied(99)).save(png, format="PNG")
    contents = {"notes.png": b"Clinical notes, not an image\n" * 20,
                "one_pixel.png": png_bytes(np.zeros((1, 1), np.uint8)),
                "truncated.png": half(png.getvalue())}
    out = []
    for name, data in contents.items():
        out.append(folder / name)
        out[-1].write_bytes(data)
    for i, name in enumerate(FAILED):
        out.append(folder / name)
        Image.fromarray(_varied(50 + i)).save(out[-1], format="PNG")
    return out


def calibrated_bundle(tiny_bundle: Path, dest: Path, *, version: str, thresholds: dict[str, float]) -> Path:
    """tiny_bundle's random weights with batch-norm statistics re-estimated on generated
    radiographs, so that (unlike the raw random network, whose output hardly depends on its
    input) its scores spread across studies; with ``thresholds`` as its operating point."""
    import torch

    from worker.screening.model import load_bundle, save_bundle

    loaded = load_bundle(tiny_bundle)
    model, meta = loaded.model, loaded.meta
    side = meta.input_size
    x = np.stack([np.asarray(Image.fromarray(_varied(i)).resize((side, side)), np.float32) / 255 for i in range(40)])
    x = torch.from_numpy((x[:, None] - meta.mean[0]) / meta.std[0])
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # a cumulative average: one pass gives the batch's statistics
    model.train()
    with torch.no_grad():
        model(x)
    model.eval()
    meta = replace(meta, thresholds=thresholds, version=version, temperature=0.5, created_at="")
    return save_bundle(dest, model, meta)


def build(home: Path, tiny_bundle: Path, *, database_url: str | None = None) -> ReportDb:
    """Take 20 files in through cxr.intake (as the watcher does) and screen them with
    worker.service.process_study (as the Celery task does): the first six with model A (no
    thresholds: it flags every non-Normal prediction), the rest with model B (an operating
    point at the median P(Tuberculosis) of those six). Then spread the studies over three
    consecutive days (study i goes i % 3 days back)."""
    from cxr.db.migrate import upgrade
    from cxr.intake import register
    from cxr.queue import make_celery
    from cxr.store import put_file
    from worker.service import process_study

    originals = home.parent / "originals"
    originals.mkdir(parents=True)
    bundle_a = calibrated_bundle(tiny_bundle, home.parent / "a.safetensors", version=VERSIONS[0], thresholds={})
    base = {"home": home, "checkpoint": bundle_a, "_env_file": None}
    if database_url:
        base["database_url"] = database_url
    settings_a = Settings(**base)
    settings_a.ensure_dirs()
    upgrade(settings_a.database_url, "head")
    celery = make_celery(settings_a)  # filesystem broker under home: the tasks are sent, nobody consumes them

    ids: dict[str, uuid.UUID] = {}
    good, bad = _good_files(originals), _bad_files(originals)
    for f in good + bad:
        stored = put_file(settings_a.store_dir, f)
        ids[f.name] = register(settings_a, celery, stored=stored, filename=f.name, source="watch").study_id
        if f.name in FAILED:
            stored.path.unlink()

    for f in good[:6]:
        assert process_study(settings_a, ids[f.name]) == "done"
    with session_scope(settings_a.database_url) as s:
        first = s.scalars(select(Result).where(Result.study_id.in_([ids[f.name] for f in good[:6]]))).all()
        cut = float(np.median([r.probabilities["Tuberculosis"] for r in first]))
    bundle_b = calibrated_bundle(tiny_bundle, home.parent / "b.safetensors", version=VERSIONS[1],
                                 thresholds={"Tuberculosis": cut, "Pneumonia": 0.5})
    settings_b = settings_a.model_copy(update={"checkpoint": bundle_b})
    for f in good[6:]:
        assert process_study(settings_b, ids[f.name]) == "done"
    for name, code in REJECTED.items():
        assert process_study(settings_b, ids[name]) == "rejected", name
    for name in FAILED:
        assert process_study(settings_b, ids[name]) == "failed", name

    names = [f.name for f in good + bad]
    with session_scope(settings_a.database_url) as s:
        for i, name in enumerate(names):
            back = timedelta(days=i % 3)
            study = s.get(Study, ids[name])
            study.created_at -= back
            study.updated_at -= back
            if study.finished_at is not None:
                study.finished_at -= back
            for r in study.results:
                r.created_at -= back
        s.flush()
        flags = s.scalars(select(Result.flagged)).all()
    assert len(ids) == N_STUDIES
    assert any(flags) and not all(flags), f"the generated results should mix flagged and unflagged: {flags}"
    env = {"CXR_HOME": str(home), "CXR_DATABASE_URL": settings_a.database_url}
    return ReportDb(settings=settings_a, env=env, study_ids=ids, versions=VERSIONS)
