"""Repository functions: each takes a session and keyword-only arguments.

They flush but never commit; the caller owns the transaction.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import case, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload

from cxr.db.models import Job, JobStudy, ModelVersion, Result, Study, StudyStatus, utcnow


def create_job(session: Session, *, source: str) -> Job:
    job = Job(source=source)
    session.add(job)
    session.flush()
    return job


def add_study(
    session: Session,
    *,
    sha256: str,
    filename: str,
    source: str,
    stored_path: str,
    size_bytes: int,
) -> tuple[Study, bool]:
    """Insert a study for these bytes, or return the existing one. Returns (study, created).

    The unique sha256 makes this safe against a watcher and an API racing on the same file.
    """
    existing = session.scalar(select(Study).where(Study.sha256 == sha256))
    if existing is not None:
        return existing, False
    study = Study(sha256=sha256, filename=filename, source=source, stored_path=stored_path, size_bytes=size_bytes)
    try:
        with session.begin_nested():
            session.add(study)
    except IntegrityError:
        existing = session.scalar(select(Study).where(Study.sha256 == sha256))
        if existing is None:
            raise
        return existing, False
    return study, True


def link_job_study(session: Session, *, job: Job, study: Study, filename: str, position: int) -> JobStudy:
    item = JobStudy(job_id=job.id, study_id=study.id, filename=filename, position=position)
    session.add(item)
    session.flush()
    return item


def get_study(session: Session, *, study_id: uuid.UUID) -> Study | None:
    return session.get(Study, study_id, options=[selectinload(Study.results).selectinload(Result.model_version)])


def get_job(session: Session, *, job_id: uuid.UUID) -> Job | None:
    return session.get(
        Job,
        job_id,
        options=[selectinload(Job.items).selectinload(JobStudy.study).selectinload(Study.results)],
    )


def claim_study(session: Session, *, study_id: uuid.UUID) -> bool:
    """Move a study to ``processing`` unless it is already finished. True if claimed.

    A redelivered task for a study in ``processing`` claims it again (its worker died).
    """
    res = session.execute(
        update(Study)
        .where(Study.id == study_id, Study.status.in_([StudyStatus.queued.value, StudyStatus.processing.value]))
        .values(status=StudyStatus.processing.value, started_at=utcnow(), updated_at=utcnow())
    )
    return res.rowcount == 1


def ensure_model_version(
    session: Session, *, checkpoint_sha256: str, architecture: str, class_names: list[str], version: str
) -> ModelVersion:
    mv = session.scalar(select(ModelVersion).where(ModelVersion.checkpoint_sha256 == checkpoint_sha256))
    if mv is not None:
        return mv
    mv = ModelVersion(
        checkpoint_sha256=checkpoint_sha256, architecture=architecture, class_names=class_names, version=version
    )
    try:
        with session.begin_nested():
            session.add(mv)
    except IntegrityError:
        mv = session.scalar(select(ModelVersion).where(ModelVersion.checkpoint_sha256 == checkpoint_sha256))
        if mv is None:
            raise
    return mv


def has_result(session: Session, *, study_id: uuid.UUID, model_version_id: int) -> bool:
    return (
        session.scalar(
            select(Result.id).where(Result.study_id == study_id, Result.model_version_id == model_version_id)
        )
        is not None
    )


def record_result(
    session: Session,
    *,
    study_id: uuid.UUID,
    model_version_id: int,
    probabilities: dict[str, float],
    predicted_class: str,
    risk: float,
    flagged: bool,
    heatmap_path: str | None,
    timings_ms: dict[str, float],
) -> Result:
    """Store a result and mark the study done. A result already stored for this model wins."""
    result = session.scalar(
        select(Result).where(Result.study_id == study_id, Result.model_version_id == model_version_id)
    )
    if result is None:
        result = Result(
            study_id=study_id,
            model_version_id=model_version_id,
            probabilities=probabilities,
            predicted_class=predicted_class,
            confidence=float(probabilities[predicted_class]),
            risk=risk,
            flagged=flagged,
            heatmap_path=heatmap_path,
            timings_ms=timings_ms,
        )
        session.add(result)
    session.execute(
        update(Study)
        .where(Study.id == study_id)
        .values(status=StudyStatus.done.value, error=None, finished_at=utcnow(), updated_at=utcnow())
    )
    session.flush()
    return result


def mark_study(session: Session, *, study_id: uuid.UUID, status: StudyStatus, error: str | None) -> None:
    session.execute(
        update(Study)
        .where(Study.id == study_id)
        .values(status=status.value, error=error, finished_at=utcnow(), updated_at=utcnow())
    )


@dataclass(frozen=True)
class WorklistRow:
    study: Study
    result: Result | None


def latest_result(study: Study) -> Result | None:
    return study.results[-1] if study.results else None


def worklist(
    session: Session,
    *,
    status: str | None = None,
    since: datetime | None = None,
    limit: int | None = 100,
) -> list[WorklistRow]:
    """Studies for review: scored ones first, flagged before unflagged, highest risk first;
    then queued/processing; then rejected and failed ones, newest first."""
    # The newest result per study (a max(id) subquery works on SQLite and Postgres alike).
    latest = select(Result.study_id, func.max(Result.id).label("rid")).group_by(Result.study_id).subquery()
    stmt = (
        select(Study, Result)
        .outerjoin(latest, latest.c.study_id == Study.id)
        .outerjoin(Result, Result.id == latest.c.rid)
    )
    if status:
        stmt = stmt.where(Study.status == status)
    if since is not None:
        stmt = stmt.where(Study.created_at >= since)
    group = case(
        (Study.status == StudyStatus.done.value, 0),
        (Study.status.in_([StudyStatus.queued.value, StudyStatus.processing.value]), 1),
        else_=2,
    )
    stmt = stmt.order_by(
        group,
        Result.flagged.desc().nulls_last(),
        Result.risk.desc().nulls_last(),
        Study.created_at.desc(),
    )
    if limit:
        stmt = stmt.limit(limit)
    return [WorklistRow(study=s, result=r) for s, r in session.execute(stmt).all()]


def study_summary(study: Study, result: Result | None) -> dict[str, Any]:
    """The JSON shape shared by the API and ``cxr worklist``."""
    return {
        "study_id": str(study.id),
        "filename": study.filename,
        "source": study.source,
        "status": study.status,
        "predicted_class": result.predicted_class if result else None,
        "probabilities": dict(result.probabilities) if result else None,
        "confidence": result.confidence if result else None,
        "risk": result.risk if result else None,
        "flagged": result.flagged if result else None,
        "heatmap_path": result.heatmap_path if result else None,
        "model_version": result.model_version.version if result and result.model_version else None,
        "timings_ms": dict(result.timings_ms) if result else None,
        "error": study.error,
        "created_at": study.created_at.isoformat() if study.created_at else None,
        "finished_at": study.finished_at.isoformat() if study.finished_at else None,
    }
