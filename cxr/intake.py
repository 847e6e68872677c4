"""Intake shared by the watcher and the API: store the bytes once, write rows, enqueue."""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass

from celery import Celery

from cxr.db import repo
from cxr.db.models import Job
from cxr.db.session import session_scope
from cxr.queue import enqueue_study
from cxr.settings import Settings
from cxr.store import Stored, safe_filename

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Intaken:
    study_id: uuid.UUID
    filename: str
    status: str
    created: bool


def register(
    settings: Settings,
    celery: Celery,
    *,
    stored: Stored,
    filename: str,
    source: str,
    job_id: uuid.UUID | None = None,
    position: int = 0,
) -> Intaken:
    """Record a stored file as a study (or find the existing one) and enqueue new studies.

    The row is committed before the task is sent, so a worker never sees an unknown id.
    """
    name = safe_filename(filename)
    with session_scope(settings.database_url) as session:
        study, created = repo.add_study(
            session,
            sha256=stored.sha256,
            filename=name,
            source=source,
            stored_path=str(stored.path),
            size_bytes=stored.size_bytes,
        )
        if job_id is not None:
            job = session.get(Job, job_id)
            repo.link_job_study(session, job=job, study=study, filename=name, position=position)
        out = Intaken(study_id=study.id, filename=name, status=study.status, created=created)
    if created:
        enqueue_study(celery, str(out.study_id))
        log.info("study %s queued (source=%s, sha256=%s)", out.study_id, source, stored.sha256[:12])
    else:
        log.info("study %s already known (sha256=%s); not queued again", out.study_id, stored.sha256[:12])
    return out

