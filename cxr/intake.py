"""Intake shared by the watcher and the API: store the bytes once, decide identity, write rows, enqueue.

Identity is decided here, before any worker sees the file:

- the same bytes (sha256) always give the same study;
- for DICOM, the header is read and the same SOP Instance UID with different bytes joins
  the existing study as another file when it is a re-send (same patient, Study and Series
  UIDs, same decoded pixels: a transcoded copy); otherwise it is its own study, marked
  ``uid_conflict`` (``cxr.identity``). Pixels are decoded only on such a UID collision;
- the study keeps the DICOM metadata, with the patient pseudonymised (``cxr.dicom``).
"""

from __future__ import annotations

import logging
import re
import shutil
import uuid
from dataclasses import dataclass

from celery import Celery

from cxr.db import repo
from cxr.db.models import Job
from cxr.db.session import session_scope
from cxr.dicom import pseudonym_key, read_header
from cxr.identity import fingerprinter
from cxr.queue import PRIORITY_BATCH, enqueue_study
from cxr.settings import Settings
from cxr.store import Stored, safe_filename

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Intaken:
    study_id: uuid.UUID
    filename: str
    status: str
    created: bool
    duplicate: str | None = None  # "same_bytes" | "same_sop_instance" when an existing study was found
    marker: str | None = None  # the study's marker: cxr.identity.UID_CONFLICT when its SOP Instance UID was taken


class DiskFullError(OSError):
    """The store's disk is below CXR_MIN_FREE_MB: intake waits, files stay where they are."""


def check_free_space(settings: Settings, incoming_bytes: int = 0) -> None:
    """Refuse intake while the disk holding the store has less than ``min_free_mb`` free
    (after this file). Nothing already accepted is touched."""
    settings.store_dir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(settings.store_dir).free
    if free - incoming_bytes < settings.min_free_mb * 1024 * 1024:
        raise DiskFullError(
            f"disk full: {free / 1048576:.1f} MB free under {settings.store_dir}, below CXR_MIN_FREE_MB="
            f"{settings.min_free_mb:g}; intake is paused and new files wait (nothing accepted is lost)")


def filename_problem(name: str | None) -> str | None:
    """Why a client-supplied file name is refused, or None. Path separators, ``..`` and
    control characters have no place in a file name: the client is confused or hostile."""
    if not name:
        return None
    if "/" in name or "\\" in name:
        return "the file name contains a path separator; send the file under its plain name (no folders)"
    if any(part == ".." for part in re.split(r"[/\\]", name)) or name.strip() in (".", ".."):
        return "the file name is '..'; send the file under its plain name"
    if any(ord(c) < 32 for c in name):
        return "the file name contains control characters; send the file under its plain name"
    return None


def register(
    settings: Settings,
    celery: Celery,
    *,
    stored: Stored,
    filename: str,
    source: str,
    job_id: uuid.UUID | None = None,
    position: int = 0,
    priority: int = PRIORITY_BATCH,
) -> Intaken:
    """Record a stored file as a study (or find the one it belongs to) and enqueue what needs screening.

    The row is committed before the task is sent, so a worker never sees an unknown id.
    A file name with path separators or ``..`` makes the study ``rejected`` (code
    ``bad_filename``); its bytes are kept in the store all the same.

    A DICOM file whose SOP Instance UID is already known is compared with the studies
    holding it (header, then decoded pixels: ``repo.intake_file``); a different film becomes
    its own study with ``Intaken.marker`` ``uid_conflict``, logged as a warning.
    """
    name = safe_filename(filename)
    problem = filename_problem(filename)
    header = read_header(stored.path, key=pseudonym_key(settings))
    metadata = {}
    if header is not None:
        metadata = {**header.fields, "image_format": "dicom"}
        if header.patient_key:
            metadata["patient_key"] = header.patient_key
    with session_scope(settings.database_url) as session:
        res = repo.intake_file(
            session,
            sha256=stored.sha256,
            filename=name,
            source=source,
            stored_path=str(stored.path),
            size_bytes=stored.size_bytes,
            metadata=metadata,
            reject=("bad_filename", problem) if problem else None,
            pixels=fingerprinter(max_pixels=settings.max_image_pixels) if header is not None else None,
        )
        if job_id is not None:
            job = session.get(Job, job_id)
            repo.link_job_study(session, job=job, study=res.study, filename=name, position=position)
        dup = res.duplicate.value if res.duplicate else None
        out = Intaken(study_id=res.study.id, filename=name, status=res.study.status, created=res.created,
                      duplicate=dup, marker=res.study.marker)
    if out.marker and res.created:
        log.warning("study %s: %s", out.study_id, res.study.marker_detail)
    if res.enqueue:
        enqueue_study(celery, str(out.study_id), priority=priority)
        log.info("study %s queued (source=%s, sha256=%s%s)", out.study_id, source, stored.sha256[:12],
                 f", again after a {dup} resubmission" if dup else "")
    elif problem:
        log.warning("study %s rejected at intake: bad_filename (sha256=%s)", out.study_id, stored.sha256[:12])
    else:
        log.info("study %s already known (%s, sha256=%s); not queued again", out.study_id, dup, stored.sha256[:12])
    return out
