"""FastAPI intake. Screening aid, not for clinical use."""

from __future__ import annotations

import logging
import uuid
from typing import Annotated, Any

from celery import Celery
from fastapi import Depends, FastAPI, File, HTTPException, UploadFile
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel
from sqlalchemy import text
from sqlalchemy.orm import Session

from api.deps import celery_dep, session_dep, settings_dep
from cxr import DISCLAIMER, __version__
from cxr.bundle import BundleError, file_sha256, read_meta
from cxr.db import repo
from cxr.db.models import StudyStatus
from cxr.intake import register
from cxr.registry import resolve_bundle
from cxr.settings import Settings
from cxr.store import put_stream

log = logging.getLogger(__name__)

app = FastAPI(
    title="cxr-screen",
    version=__version__,
    description="Batch screening of chest radiographs (Normal / Pneumonia / Tuberculosis). " + DISCLAIMER,
)

SettingsDep = Annotated[Settings, Depends(settings_dep)]
SessionDep = Annotated[Session, Depends(session_dep)]
CeleryDep = Annotated[Celery, Depends(celery_dep)]
TERMINAL = {StudyStatus.done.value, StudyStatus.failed.value, StudyStatus.rejected.value}


class StudyRef(BaseModel):
    study_id: uuid.UUID
    filename: str
    status: str
    duplicate: str | None = None  # "same_bytes" or "same_sop_instance": linked to an existing study


class JobCreated(BaseModel):
    job_id: uuid.UUID
    studies: list[StudyRef]
    disclaimer: str = DISCLAIMER


@app.post("/jobs", status_code=202, response_model=JobCreated)
def create_job(
    files: Annotated[list[UploadFile], File(description="One or more PNG, JPEG or DICOM files")],
    settings: SettingsDep,
    session: SessionDep,
    celery: CeleryDep,
) -> JobCreated:
    job = repo.create_job(session, source="api")
    session.commit()
    refs = []
    for position, upload in enumerate(files):
        stored = put_stream(settings.store_dir, upload.file)
        out = register(
            settings, celery, stored=stored, filename=upload.filename or "upload", source="api",
            job_id=job.id, position=position,
        )
        refs.append(StudyRef(study_id=out.study_id, filename=out.filename, status=out.status,
                             duplicate=out.duplicate))
    return JobCreated(job_id=job.id, studies=refs)


def job_status(statuses: list[str]) -> str:
    if statuses and all(s in TERMINAL for s in statuses):
        return "done"
    if any(s != StudyStatus.queued.value for s in statuses):
        return "processing"
    return "queued"


@app.get("/jobs/{job_id}")
def get_job(job_id: uuid.UUID, session: SessionDep) -> dict[str, Any]:
    job = repo.get_job(session, job_id=job_id)
    if job is None:
        raise HTTPException(404, f"no job {job_id}")
    studies = [repo.study_summary(item.study, repo.latest_result(item.study)) | {"filename": item.filename}
               for item in job.items]
    statuses = [s["status"] for s in studies]
    counts: dict[str, int] = {}
    for s in statuses:
        counts[s] = counts.get(s, 0) + 1
    return {"job_id": str(job.id), "status": job_status(statuses), "counts": counts, "studies": studies,
            "disclaimer": DISCLAIMER}


@app.get("/studies/{study_id}")
def get_study(study_id: uuid.UUID, session: SessionDep) -> dict[str, Any]:
    study = repo.get_study(session, study_id=study_id)
    if study is None:
        raise HTTPException(404, f"no study {study_id}")
    return repo.study_summary(study, repo.latest_result(study)) | {"disclaimer": DISCLAIMER}


@app.get("/studies/{study_id}/heatmap", response_class=FileResponse)
def get_heatmap(study_id: uuid.UUID, session: SessionDep) -> FileResponse:
    study = repo.get_study(session, study_id=study_id)
    if study is None:
        raise HTTPException(404, f"no study {study_id}")
    result = repo.latest_result(study)
    if result is None or not result.heatmap_path:
        raise HTTPException(404, f"study {study_id} has no heatmap (status {study.status})")
    return FileResponse(result.heatmap_path, media_type="image/png")


@app.get("/health")
def health(settings: SettingsDep, session: SessionDep, celery: CeleryDep) -> JSONResponse:
    checks: dict[str, Any] = {}
    try:
        session.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as e:  # reported, not raised: this endpoint exists to say what is down
        checks["database"] = f"error: {type(e).__name__}"
    try:
        with celery.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
        checks["broker"] = "ok"
    except Exception as e:  # reported, not raised
        checks["broker"] = f"error: {type(e).__name__}"
    ok = all(v == "ok" for v in checks.values())
    return JSONResponse({"status": "ok" if ok else "degraded", **checks, "version": __version__},
                        status_code=200 if ok else 503)


@app.get("/model/info")
def model_info(settings: SettingsDep) -> dict[str, Any]:
    path = resolve_bundle(settings)
    if path is None:
        raise HTTPException(503, "no model bundle configured (set CXR_CHECKPOINT)")
    try:
        meta = read_meta(path)
    except BundleError as e:
        raise HTTPException(503, str(e)) from e
    return {
        "architecture": meta.architecture,
        "classes": meta.classes,
        "input_size": meta.input_size,
        "in_chans": meta.in_chans,
        "checkpoint_sha256": file_sha256(path),
        "version": meta.version,
        "created_at": meta.created_at,
        "thresholds": meta.thresholds,
        "temperature": meta.temperature,
        "disclaimer": DISCLAIMER,
    }
