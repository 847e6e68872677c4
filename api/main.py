"""FastAPI intake. Screening aid, not for clinical use.

Thin: validate, store, write rows, enqueue. The model runs in the workers only; the
``/predict*`` endpoints enqueue with high priority and wait (bounded) for the worker's row.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any

import anyio
from celery import Celery
from fastapi import Depends, FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from PIL import Image
from pydantic import BaseModel
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session

from api.auth import ApiKeyAuth
from api.deps import celery_dep, pool_exhausted, require_api_key, session_dep, settings_dep
from api.health import monitor_for
from api.uploads import BodyLimit, is_zip, peek, require_image, unpack_zip
from cxr import DISCLAIMER, __version__
from cxr.bundle import BundleError, file_sha256, read_meta
from cxr.db import repo
from cxr.db.models import StudyStatus
from cxr.db.session import DatabaseNotReady, database_problem
from cxr.intake import DiskFullError, Intaken, check_free_space, register
from cxr.metrics import api_metrics
from cxr.callbacks import AllowList, static_refusal
from cxr.queue import PRIORITY_BATCH, PRIORITY_HIGH, fire_callbacks
from cxr.registry import resolve_bundle
from cxr.settings import Settings, get_settings
from cxr.store import put_stream

log = logging.getLogger(__name__)

MAX_BATCH = 10  # the seed's limit for /predict/batch


@asynccontextmanager
async def lifespan(_app: FastAPI):
    """Start the background health checks with the API (GET /health reads their result)."""
    monitor = monitor_for(get_settings())
    try:
        yield
    finally:
        monitor.stop()


app = FastAPI(
    title="cxr-screen",
    version=__version__,
    description="Batch screening of chest radiographs (Normal / Pneumonia / Tuberculosis). " + DISCLAIMER,
    lifespan=lifespan,
)
# Outermost last: CORS, then the key check (a refused request's body is never read), then the size limit.
app.add_middleware(BodyLimit)
app.add_middleware(ApiKeyAuth)
app.add_exception_handler(PoolTimeout, pool_exhausted)
if get_settings().cors_origins:
    app.add_middleware(CORSMiddleware, allow_origins=get_settings().cors_origins, allow_methods=["GET", "POST"],
                       allow_headers=["X-API-Key", "Content-Type"])


@app.exception_handler(DatabaseNotReady)
@app.exception_handler(OperationalError)
async def database_unavailable(request: Request, exc: Exception) -> JSONResponse:
    """Any route: a database that is missing, unreachable or not migrated is a 503 whose
    ``detail`` is the sentence the CLI prints (``cxr.db.session.database_problem``)."""
    problem = database_problem(get_settings().database_url, exc)
    log.error("%s %s: %s", request.method, request.url.path, problem)
    return JSONResponse({"detail": str(problem)}, status_code=503)


SettingsDep = Annotated[Settings, Depends(settings_dep)]
# At most CXR_DB_POOL_SIZE requests hold a session at once (the others wait their turn without
# a thread, so load queues instead of failing on the pool); each session is closed as soon
# as its endpoint returns.
SessionDep = Annotated[Session, Depends(session_dep, scope="function", max_concurrency=get_settings().db_pool_size)]
# /predict* wait for the worker (up to CXR_PREDICT_TIMEOUT_SECONDS) with their connection
# returned between looks: they take turns of their own, so clients waiting there do not
# hold up the other routes.
PredictSessionDep = Annotated[Session, Depends(session_dep, scope="function",
                                               max_concurrency=get_settings().db_pool_size)]
CeleryDep = Annotated[Celery, Depends(celery_dep)]
Protected = [Depends(require_api_key)]
TERMINAL = {StudyStatus.done.value, StudyStatus.failed.value, StudyStatus.rejected.value}


class Error(BaseModel):
    detail: Any


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": Error} for code in (401, 422, 503, *codes)}


class StudyRef(BaseModel):
    study_id: uuid.UUID
    filename: str
    status: str
    duplicate: str | None = None  # "same_bytes" or "same_sop_instance": linked to an existing study
    marker: str | None = None  # "uid_conflict": a new study whose SOP Instance UID belonged to another film


class JobCreated(BaseModel):
    job_id: uuid.UUID
    studies: list[StudyRef]
    disclaimer: str = DISCLAIMER


class Prediction(BaseModel):
    """The seed's response (predicted_class, confidence, probabilities, inference_time_ms) plus ours."""

    predicted_class: str | None
    confidence: float | None
    probabilities: dict[str, float] | None
    inference_time_ms: float | None
    study_id: uuid.UUID
    model_version: str | None
    flagged: bool | None
    risk: float | None
    uncertainty: float | None = None  # MC-dropout mutual information (nats); None: the model computes none
    uncertain: bool | None = None  # at or above the bundle's threshold: refer for review
    ood_score: float | None = None  # out-of-distribution score (squared Mahalanobis distance)
    status: str
    heatmap_ready: bool = False
    reject_code: str | None = None
    error: str | None = None
    filename: str | None = None
    duplicate: str | None = None
    marker: str | None = None  # "uid_conflict": its SOP Instance UID belonged to another film first
    disclaimer: str = DISCLAIMER


class Explanation(Prediction):
    heatmap: str | None  # base64 PNG: the Grad-CAM heatmap alone
    heatmap_url: str
    overlay: str | None  # base64 PNG: the heatmap blended on the radiograph
    overlay_url: str


class Worklist(BaseModel):
    items: list[dict[str, Any]]
    next_cursor: str | None
    disclaimer: str = DISCLAIMER


# --- intake helpers -------------------------------------------------------------------

def _store_upload(settings: Settings, upload: UploadFile, *, what: str):
    require_image(peek(upload.file), what=what)
    try:
        return put_stream(settings.store_dir, upload.file, max_bytes=settings.max_upload_bytes)
    except ValueError as e:
        raise HTTPException(413, f"{what}: {e}") from e


def callback_refusal(url: str, settings: Settings):
    """Why a callback URL is refused at submission time (cxr.callbacks.static_refusal), or None."""
    return static_refusal(url, AllowList.parse(settings.callback_allow))


def _intake(settings: Settings, celery: Celery, session: Session, uploads: list[UploadFile], *,
            priority: int, allow_zip: bool, callback_url: str | None = None) -> tuple[uuid.UUID, list[Intaken]]:
    """Check every upload (type, size), then store each, record it in a new job and enqueue it.

    507 while the store's disk is below CXR_MIN_FREE_MB: nothing is taken, nothing accepted is lost."""
    try:
        check_free_space(settings)
    except DiskFullError as e:
        log.error("refusing an upload: %s", e)
        raise HTTPException(507, f"{e}. Retry later") from e
    heads = [peek(u.file) for u in uploads]
    zipped = allow_zip and len(uploads) == 1 and is_zip(heads[0])
    if not zipped:
        for n, head in enumerate(heads):
            require_image(head, what=f"file {n + 1}")
    members = []
    if zipped:  # every member checked and stored before the job exists: a refused zip leaves no job
        members = list(unpack_zip(uploads[0].file, store_dir=settings.store_dir,
                                  max_total_bytes=int(settings.max_zip_uncompressed_mb * 1048576),
                                  max_members=settings.max_zip_members))
    job = repo.create_job(session, source="api", callback_url=callback_url)
    session.commit()
    out: list[Intaken] = []
    if zipped:
        for position, member in enumerate(members):
            out.append(register(settings, celery, stored=member.stored, filename=member.filename, source="api",
                                job_id=job.id, position=position, priority=priority))
        return job.id, out
    for position, upload in enumerate(uploads):
        stored = _store_upload(settings, upload, what=f"file {position + 1}")
        out.append(register(settings, celery, stored=stored, filename=upload.filename or "upload", source="api",
                            job_id=job.id, position=position, priority=priority))
    return job.id, out


def _wait(settings: Settings, session: Session, study_ids: list[uuid.UUID], *, job_id: uuid.UUID | None,
          heatmap: bool = False) -> None:
    """Poll the database until every study is scored (its scores are stored before Grad-CAM
    runs) or finished (rejected, failed, or ``heatmap``: done with its heatmap written);
    504 (with the ids to poll) after CXR_PREDICT_TIMEOUT_SECONDS."""
    deadline = time.monotonic() + settings.predict_timeout_seconds
    pause = 0.001
    # Being claimed, decoded, screened and stored takes a study longer than this (about 15 ms
    # here): looking earlier finds nothing and only takes CPU from the worker.
    time.sleep(0.006)
    while True:
        statuses = repo.study_statuses(session, study_ids=study_ids)
        session.rollback()  # a fresh snapshot next time; the connection goes back to the pool meanwhile
        if all(sid in statuses and (statuses[sid][0] in TERMINAL or (statuses[sid][1] and not heatmap))
               for sid in study_ids):
            return
        if time.monotonic() >= deadline:
            detail = {"message": f"not finished within {settings.predict_timeout_seconds:g} s; poll the study",
                      "study_ids": [str(s) for s in study_ids],
                      "status_urls": [f"/studies/{s}" for s in study_ids]}
            if len(study_ids) == 1:
                detail["study_id"] = str(study_ids[0])
            if job_id is not None:
                detail["job_id"] = str(job_id)
            raise HTTPException(504, detail)
        time.sleep(pause)
        pause = min(pause * 1.5, 0.0015)  # a status SELECT costs ~0.2 ms: looking every 1.5 ms answers promptly


def _prediction(session: Session, ref: Intaken) -> dict[str, Any]:
    study = repo.get_study(session, study_id=ref.study_id)
    result = repo.latest_result(study)
    summary = repo.study_summary(study, result)
    infer = (summary["timings_ms"] or {}).get("infer")
    scored = result is not None and study.status in (StudyStatus.processing.value, StudyStatus.done.value)
    return {**{k: summary[k] for k in ("predicted_class", "confidence", "probabilities", "model_version", "flagged",
                                       "risk", "uncertainty", "uncertain", "ood_score", "reject_code", "error",
                                       "marker")},
            # Scored is done for a prediction; the study itself turns `done` once its heatmap is written.
            "status": StudyStatus.done.value if scored else study.status,
            "heatmap_ready": bool(result is not None and result.heatmap_path),
            "inference_time_ms": infer, "study_id": study.id, "filename": ref.filename, "duplicate": ref.duplicate}


def _one(uploads: list[UploadFile], settings: Settings, celery: Celery, session: Session, *,
         heatmap: bool = False) -> dict[str, Any]:
    job_id, refs = _intake(settings, celery, session, uploads, priority=PRIORITY_HIGH, allow_zip=False)
    _wait(settings, session, [refs[0].study_id], job_id=None, heatmap=heatmap)
    pred = _prediction(session, refs[0])
    if pred["status"] != StudyStatus.done.value:
        raise HTTPException(422, {"message": "the image was not scored", **{
            k: (str(v) if isinstance(v, uuid.UUID) else v)
            for k, v in pred.items() if k in ("study_id", "status", "reject_code", "error")}})
    return pred


# --- seed-compatible endpoints --------------------------------------------------------

@app.post("/predict", response_model=Prediction, dependencies=Protected, responses=errors(413, 415, 504, 507))
def predict(
    file: Annotated[UploadFile, File(description="One PNG, JPEG or DICOM file")],
    settings: SettingsDep, session: PredictSessionDep, celery: CeleryDep,
) -> dict[str, Any]:
    """Screen one image: enqueued with high priority, answered when the worker is done (or 504
    with the study id to poll after CXR_PREDICT_TIMEOUT_SECONDS). A file the quality gate
    refuses gets 422 with its reject_code."""
    return _one([file], settings, celery, session)


@app.post("/predict/batch", response_model=list[Prediction], dependencies=Protected,
          responses=errors(413, 415, 504, 507))
def predict_batch(
    files: Annotated[list[UploadFile], File(description=f"Up to {MAX_BATCH} PNG, JPEG or DICOM files")],
    settings: SettingsDep, session: PredictSessionDep, celery: CeleryDep,
) -> list[dict[str, Any]]:
    """Screen up to 10 images, one entry per file in order; files the gate refuses have
    status `rejected` and a reject_code. More files: use POST /jobs."""
    if len(files) > MAX_BATCH:
        raise HTTPException(413, f"{len(files)} files sent; /predict/batch takes at most {MAX_BATCH}. "
                                 "Send larger sets to POST /jobs")
    job_id, refs = _intake(settings, celery, session, files, priority=PRIORITY_HIGH, allow_zip=False)
    _wait(settings, session, list(dict.fromkeys(r.study_id for r in refs)), job_id=job_id)
    return [_prediction(session, r) for r in refs]


def _png_bytes(path: Path) -> bytes:
    """A stored heatmap image as PNG. Workers keep the overlay as a JPEG (it encodes ~10x
    faster, off the screening path); it is turned into the PNG clients get on request."""
    data = path.read_bytes()
    if data.startswith(b"\x89PNG"):
        return data
    out = io.BytesIO()
    with Image.open(io.BytesIO(data)) as im:
        im.save(out, format="PNG", compress_level=3)
    return out.getvalue()


def _b64(path: Path | None) -> str | None:
    if path is None or not path.is_file():
        return None
    return base64.b64encode(_png_bytes(path)).decode("ascii")


def _heatmap_files(heatmap_path: str | None) -> tuple[Path | None, Path | None]:
    """(bare heatmap, overlay). Results from before the bare heatmap was kept have only the overlay."""
    if not heatmap_path:
        return None, None
    overlay = Path(heatmap_path)
    bare = overlay.with_name(overlay.stem + ".cam.png")  # as worker.screening.explain.heatmap_only_path
    return (bare if bare.is_file() else None), overlay


@app.post("/predict/explain", response_model=Explanation, dependencies=Protected,
          responses=errors(413, 415, 504, 507))
def predict_explain(
    file: Annotated[UploadFile, File(description="One PNG, JPEG or DICOM file")],
    settings: SettingsDep, session: PredictSessionDep, celery: CeleryDep,
) -> dict[str, Any]:
    """As /predict, plus the Grad-CAM heatmap (base64 PNG, the map alone in jet colours) and
    the overlay (base64 PNG, the map blended on the radiograph), with their URLs."""
    pred = _one([file], settings, celery, session, heatmap=True)
    study = repo.get_study(session, study_id=pred["study_id"])
    bare, overlay = _heatmap_files(repo.latest_result(study).heatmap_path)
    session.close()  # the connection goes back before the images are read and encoded
    sid = pred["study_id"]
    return {**pred, "heatmap": _b64(bare), "heatmap_url": f"/studies/{sid}/heatmap",
            "overlay": _b64(overlay), "overlay_url": f"/studies/{sid}/overlay"}


# --- jobs and results -----------------------------------------------------------------

@app.post("/jobs", status_code=202, response_model=JobCreated, dependencies=Protected,
          responses=errors(400, 413, 415, 507))
def create_job(
    files: Annotated[list[UploadFile], File(description="One or more PNG, JPEG or DICOM files, or one zip of them")],
    settings: SettingsDep,
    session: SessionDep,
    celery: CeleryDep,
    callback_url: Annotated[str | None, Form(
        max_length=2000, pattern=r"^https?://[^\s\x00-\x1f]+$",
        description="POSTed the job's report (as GET /jobs/{id}, plus event) once every study is finished; "
                    "retried with backoff. Must reach a public address (loopback, private, link-local and "
                    "similar addresses get 422) unless CXR_CALLBACK_ALLOW lists it")] = None,
) -> JobCreated:
    if callback_url and (refusal := callback_refusal(callback_url, settings)) is not None:
        raise HTTPException(422, str(refusal))  # a loopback/private/metadata address: refused before any intake
    job_id, out = _intake(settings, celery, session, files, priority=PRIORITY_BATCH, allow_zip=True,
                          callback_url=callback_url)
    if callback_url:
        fire_callbacks(celery, settings.database_url, job_id=job_id)  # every study may be known and finished
    refs = [StudyRef(study_id=o.study_id, filename=o.filename, status=o.status, duplicate=o.duplicate,
                     marker=o.marker) for o in out]
    return JobCreated(job_id=job_id, studies=refs)


@app.get("/jobs/{job_id}", dependencies=Protected, responses=errors(404))
def get_job(job_id: uuid.UUID, session: SessionDep) -> dict[str, Any]:
    report = repo.job_report(session, job_id=job_id)
    if report is None:
        raise HTTPException(404, f"no job {job_id}")
    return report | {"disclaimer": DISCLAIMER}


@app.get("/studies/{study_id}", dependencies=Protected, responses=errors(404))
def get_study(study_id: uuid.UUID, session: SessionDep) -> dict[str, Any]:
    study = repo.get_study(session, study_id=study_id)
    if study is None:
        raise HTTPException(404, f"no study {study_id}")
    return (repo.study_summary(study, repo.latest_result(study))
            | {"notes": repo.study_notes(session, study_id=study_id), "disclaimer": DISCLAIMER})


def _image(session: Session, study_id: uuid.UUID, *, which: str) -> Response:
    study = repo.get_study(session, study_id=study_id)
    if study is None:
        raise HTTPException(404, f"no study {study_id}")
    result = repo.latest_result(study)
    bare, overlay = _heatmap_files(result.heatmap_path if result else None)
    status = study.status
    session.close()  # the connection goes back before the image is read and encoded
    path = overlay if which == "overlay" else (bare or overlay)
    if path is None or not path.is_file():
        raise HTTPException(404, f"study {study_id} has no {which} (status {status})")
    return Response(_png_bytes(path), media_type="image/png")


PNG = {200: {"content": {"image/png": {}}}}


@app.get("/studies/{study_id}/heatmap", response_class=Response, dependencies=Protected,
         responses=errors(404) | PNG)
def get_heatmap(study_id: uuid.UUID, session: SessionDep) -> Response:
    """The Grad-CAM heatmap alone (jet colours), PNG. Results made before the bare map was
    kept serve their overlay here."""
    return _image(session, study_id, which="heatmap")


@app.get("/studies/{study_id}/overlay", response_class=Response, dependencies=Protected,
         responses=errors(404) | PNG)
def get_overlay(study_id: uuid.UUID, session: SessionDep) -> Response:
    """The heatmap blended on the radiograph, PNG."""
    return _image(session, study_id, which="overlay")


def _encode_cursor(key: repo.WorklistKey) -> str:
    raw = json.dumps([key.group, key.flagged, key.risk, key.created_at.isoformat(), key.study_id.hex])
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> repo.WorklistKey:
    try:
        g, f, r, c, sid = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        key = repo.WorklistKey(group=int(g), flagged=int(f), risk=float(r), created_at=datetime.fromisoformat(c),
                               study_id=uuid.UUID(sid))
        if key.group not in (0, 1, 2) or key.flagged not in (0, 1) or not -1.0 <= key.risk <= 1.0:
            raise ValueError("out of range")
        return key
    except (ValueError, TypeError, binascii.Error, UnicodeDecodeError) as e:
        raise HTTPException(422, "invalid cursor; use next_cursor from the previous page as it is") from e


PRINTABLE = r"^[^\x00-\x1f\x7f]*$"  # no control characters (Postgres refuses NUL in text)


def _utc(value: datetime | None) -> datetime | None:
    return value.replace(tzinfo=timezone.utc) if value is not None and value.tzinfo is None else value


@app.get("/worklist", response_model=Worklist, dependencies=Protected, responses=errors())
def get_worklist(
    session: SessionDep,
    status: Annotated[StudyStatus | None, Query(description="Only studies with this status")] = None,
    flagged: Annotated[bool | None, Query(description="Only flagged (true) or unflagged (false) results")] = None,
    since: Annotated[datetime | None, Query(description="Received at or after (ISO 8601; UTC if no zone)")] = None,
    until: Annotated[datetime | None, Query(description="Received before (ISO 8601; UTC if no zone)")] = None,
    predicted_class: Annotated[str | None, Query(max_length=64, pattern=PRINTABLE)] = None,
    model_version: Annotated[str | None, Query(max_length=64, pattern=PRINTABLE)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: Annotated[str | None, Query(max_length=512, description="next_cursor of the previous page")] = None,
) -> dict[str, Any]:
    """Studies in `cxr worklist` order: scored ones first (flagged, then highest risk), then
    pending, then rejected and failed. Keyset pagination: pass `next_cursor` back as `cursor`."""
    rows = repo.worklist(session, status=status.value if status else None, since=_utc(since), until=_utc(until),
                         flagged=flagged, predicted_class=predicted_class, model_version=model_version,
                         after=_decode_cursor(cursor) if cursor else None, limit=limit + 1)
    more = len(rows) > limit
    rows = rows[:limit]
    return {"items": [repo.study_summary(r.study, r.result) for r in rows],
            "next_cursor": _encode_cursor(rows[-1].key) if more else None}


# --- service --------------------------------------------------------------------------

@app.get("/health")
async def health() -> JSONResponse:
    """Database and broker reachability (503 when either is down), `workers` (how many answered
    a 1 s Celery ping) and the active model version, as found by the background check
    (api/health.py, every CXR_HEALTH_INTERVAL_SECONDS; `checked_seconds_ago` says when).
    Answers at once from that state: 503 `starting` before the first check, `stale` if the
    checks stopped. Never needs an API key."""
    status, body = monitor_for(get_settings()).report()
    return JSONResponse(body, status_code=status)


_metrics_turn: list[anyio.CapacityLimiter] = []


@app.get("/metrics", include_in_schema=False)
async def metrics() -> Response:
    """Prometheus metrics (cxr.metrics): studies by status, rejections by reason, queue depth,
    the active model. Like /health, never needs an API key: counts only, no study data.
    Scrapes are served one at a time (each reads the database and the broker), so a burst
    of them holds one connection, not one per scrape."""
    if not _metrics_turn:
        _metrics_turn.append(anyio.CapacityLimiter(1))
    body, content_type = await anyio.to_thread.run_sync(api_metrics, get_settings(), limiter=_metrics_turn[0])
    return Response(body, media_type=content_type)


@app.get("/model/info", dependencies=Protected, responses=errors(503))
def model_info(settings: SettingsDep, _turn: SessionDep) -> dict[str, Any]:
    """The active bundle's metadata, read without torch: architecture, classes, input size,
    checkpoint hash, version, validation metrics and operating points (per-class thresholds)."""
    # _turn: resolve_bundle reads the registry in a session of its own; taking a turn keeps
    # the number of requests using the database within the pool.
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
        "mean": meta.mean,
        "std": meta.std,
        "checkpoint_sha256": file_sha256(path),
        "version": meta.version,
        "created_at": meta.created_at,
        "thresholds": meta.thresholds,
        "operating_points": {cls: {"threshold": t} for cls, t in meta.thresholds.items()},
        "temperature": meta.temperature,
        "logit_bias": dict(zip(meta.classes, meta.bias)),
        "ood": meta.ood or None,  # out-of-distribution gate: method, threshold (refused above it)
        "uncertainty": meta.uncertainty or None,  # method, samples, threshold (uncertain at or above it)
        "metrics": meta.extra.get("val_metrics"),
        "split_sizes": meta.extra.get("split_sizes"),
        "data_fingerprint": meta.extra.get("data_fingerprint"),
        "git_commit": meta.extra.get("git_commit"),
        "disclaimer": DISCLAIMER,
    }
