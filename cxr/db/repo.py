"""Repository functions: each takes a session and keyword-only arguments.

They flush but never commit; the caller owns the transaction.
"""

from __future__ import annotations

import enum
import os
import socket
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, case, delete, func, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload

from cxr.db.models import (
    STUDY_METADATA_COLUMNS, ApiKey, Job, JobStudy, ModelVersion, Result, Study, StudyEvent, StudyFile, StudyStatus,
    Worker, utcnow,
)
from cxr.identity import UID_CONFLICT, conflict_sentence, film_key, header_differences, owner_note


def worker_name() -> str:
    """This process as a lease holder: ``host:pid``."""
    return f"{socket.gethostname()}:{os.getpid()}"


def actor_name(role: str) -> str:
    """Who made a status change, for the audit trail: ``role@host:pid`` (watcher, api, worker, reaper)."""
    return f"{role}@{worker_name()}"


def _intake_actor(source: str) -> str:
    return actor_name("watcher" if source == "watch" else source)


def record_event(session: Session, *, study_id: uuid.UUID, status: str, actor: str, detail: str | None = None,
                 at: datetime | None = None) -> StudyEvent:
    """Append one status change to a study's audit trail."""
    event = StudyEvent(study_id=study_id, status=status, actor=actor[:255], detail=detail, at=at or utcnow())
    session.add(event)
    return event


#: The audit-trail status of a note: something done to a study's input on its way to the model
#: (``"<code>: <sentence>"``, e.g. a negative PNG inverted, a DICOM read without its file meta).
NOTE_STATUS = "note"


def record_notes(session: Session, *, study_id: uuid.UUID, notes: list[str], actor: str | None = None) -> None:
    """Append each note to the study's audit trail (status ``note``), unless the same note is there."""
    if not notes:
        return
    have = set(session.scalars(select(StudyEvent.detail).where(StudyEvent.study_id == study_id,
                                                               StudyEvent.status == NOTE_STATUS)))
    for note in notes:
        if note not in have:
            record_event(session, study_id=study_id, status=NOTE_STATUS, actor=actor or actor_name("worker"),
                         detail=note)


def study_notes(session: Session, *, study_id: uuid.UUID) -> list[str]:
    """The notes of a study's audit trail, oldest first (see :data:`NOTE_STATUS`)."""
    return [d for d in session.scalars(select(StudyEvent.detail).where(
        StudyEvent.study_id == study_id, StudyEvent.status == NOTE_STATUS).order_by(StudyEvent.id)) if d]


def study_events(session: Session, *, study_id: uuid.UUID) -> list[StudyEvent]:
    """A study's status changes, oldest first."""
    return list(session.scalars(select(StudyEvent).where(StudyEvent.study_id == study_id)
                                .order_by(StudyEvent.id)))


def create_job(session: Session, *, source: str, callback_url: str | None = None) -> Job:
    job = Job(source=source, callback_url=callback_url, callback_state="pending" if callback_url else None)
    session.add(job)
    session.flush()
    return job


class Duplicate(str, enum.Enum):
    same_bytes = "same_bytes"
    same_sop_instance = "same_sop_instance"


@dataclass(frozen=True)
class IntakeResult:
    study: Study
    created: bool  # a new study row
    duplicate: Duplicate | None  # how an existing study was recognised
    enqueue: bool  # the study (new or re-queued) needs a screening task


@dataclass(frozen=True)
class _UidConflict:
    """A file whose SOP Instance UID belongs to a different film (see cxr.identity)."""

    owner: Study
    differences: list[str]


#: ``stored path -> sha256 of the decoded pixels``, or None when they cannot be decoded.
PixelFingerprint = Callable[[str], "str | None"]


def _clip(metadata: dict[str, Any]) -> dict[str, Any]:
    """Metadata limited to known study columns and trimmed to their lengths."""
    out: dict[str, Any] = {}
    for column in STUDY_METADATA_COLUMNS:
        value = metadata.get(column)
        if value is None:
            continue
        col_type = Study.__table__.c[column].type
        length = getattr(col_type, "length", None)
        out[column] = value[:length] if length and isinstance(value, str) else value
    return out


def _requeue(session: Session, study: Study, *, actor: str, detail: str) -> None:
    previous = study.status
    study.status = StudyStatus.queued.value
    study.error = None
    study.reject_code = None
    study.started_at = None
    study.finished_at = None
    study.worker_id = None
    study.lease_expires_at = None
    study.updated_at = utcnow()
    record_event(session, study_id=study.id, status=StudyStatus.queued.value, actor=actor,
                 detail=f"re-queued (was {previous}): {detail}")


def intake_file(
    session: Session,
    *,
    sha256: str,
    filename: str,
    source: str,
    stored_path: str,
    size_bytes: int,
    metadata: dict[str, Any] | None = None,
    reject: tuple[str, str] | None = None,
    actor: str | None = None,
    pixels: PixelFingerprint | None = None,
) -> IntakeResult:
    """Record a stored file: a new study, or the study it belongs to. Decides identity.

    - Bytes already received (any file of any study): that study. It is re-queued only if
      it was not screened for reasons that were not the file's content (status ``failed``,
      or rejected for its ``bad_filename``, when this submission's name is fine).
    - A DICOM SOP Instance UID already known, with different bytes: a **re-send** (say, a
      transcoded copy) when it agrees with a study holding that UID: the same patient key,
      StudyInstanceUID and SeriesInstanceUID, and the same decoded pixels (``pixels`` gives
      a file's pixel hash, ``cxr.identity.pixel_fingerprint``; it is called only here, on a
      UID collision, and the hash is kept in ``study_files.pixel_sha256``). The file is then
      recorded on that study. A scored, queued or processing study is left alone (never
      screened twice); one that was rejected or failed gets the new file as its primary file
      and is re-queued. Pixels that cannot be compared (one copy does not decode, or no
      ``pixels`` given) count as a match only for such an unscored study.
    - A known UID that does not agree (another patient, other pixels, another Study or
      Series UID): a **UID conflict**. A new study, screened like any other, with
      ``marker`` ``uid_conflict``, a ``marker_detail`` sentence saying what differs,
      ``conflicts_with`` the study that owns the UID, and an audit event on both studies.
    - Otherwise a new study with this file, ``rejected`` at once when ``reject`` (code,
      sentence) is given.

    Safe against a watcher and an API racing on the same bytes or the same SOP instance:
    the unique sha256 and the unique owner of a SOP Instance UID make the loser find the
    winner's row.

    Every status set here is written to the audit trail with ``actor`` (default:
    ``watcher@host:pid`` for source ``watch``, else ``<source>@host:pid``).
    """
    actor = actor or _intake_actor(source)
    metadata = _clip(metadata or {})
    sop = metadata.get("sop_instance_uid")
    for attempt in range(3):
        found = _find_existing(session, sha256=sha256, sop=sop, filename=filename, source=source,
                               stored_path=stored_path, size_bytes=size_bytes, metadata=metadata, reject=reject,
                               actor=actor, pixels=pixels)
        if isinstance(found, IntakeResult):
            return found
        study = Study(sha256=sha256, filename=filename, source=source, stored_path=stored_path,
                      size_bytes=size_bytes, **metadata)
        if found is not None:
            study.conflicts_with = found.owner.id
            study.film_key = film_key(metadata, pixels=pixels(stored_path) if pixels else None, sha256=sha256)
            study.marker = UID_CONFLICT
            study.marker_detail = conflict_sentence(sop_instance_uid=sop, owner_id=found.owner.id,
                                                    differences=found.differences)
        if reject is not None:
            study.status = StudyStatus.rejected.value
            study.reject_code, study.error = reject[0], f"{reject[0]}: {reject[1]}"
            study.finished_at = utcnow()
        try:
            with session.begin_nested():
                session.add(study)
                session.flush()
                session.add(StudyFile(study_id=study.id, sha256=sha256, stored_path=stored_path,
                                      size_bytes=size_bytes, filename=filename, source=source,
                                      transfer_syntax=metadata.get("transfer_syntax"),
                                      pixel_sha256=pixels(stored_path) if found is not None and pixels else None))
                record_event(session, study_id=study.id, status=study.status, actor=actor,
                             detail=study.error if reject is not None else f"received from {source}")
                if found is not None:
                    record_event(session, study_id=study.id, status=study.status, actor=actor,
                                 detail=study.marker_detail)
                    record_event(session, study_id=found.owner.id, status=found.owner.status, actor=actor,
                                 detail=owner_note(sop_instance_uid=sop, newcomer_id=study.id,
                                                   differences=found.differences))
                session.flush()
        except IntegrityError:
            continue  # someone else inserted these bytes or this SOP instance meanwhile: find it
        return IntakeResult(study=study, created=True, duplicate=None, enqueue=reject is None)
    raise RuntimeError(f"intake of {sha256[:12]} kept colliding with concurrent inserts")


def _same_pixels(session: Session, study: Study, *, stored_path: str, pixels: PixelFingerprint | None) -> bool | None:
    """Whether a new file's decoded pixels equal ``study``'s (None: they cannot be compared,
    because a file does not decode or no ``pixels`` is given). The study's files whose hash
    is known count; else its primary file is decoded once and its hash kept."""
    if pixels is None:
        return None
    new = pixels(stored_path)
    if new is None:
        return None
    files = list(session.scalars(select(StudyFile).where(StudyFile.study_id == study.id)))
    if any(f.pixel_sha256 == new for f in files):
        return True
    primary = next((f for f in files if f.sha256 == study.sha256), None)
    known = primary.pixel_sha256 if primary is not None else None
    if known is None:
        known = pixels(study.stored_path)
        if known is not None and primary is not None:
            primary.pixel_sha256 = known
    return None if known is None else known == new


def _find_existing(session: Session, *, sha256: str, sop: str | None, filename: str, source: str,
                   stored_path: str, size_bytes: int, metadata: dict[str, Any],
                   reject: tuple[str, str] | None, actor: str,
                   pixels: PixelFingerprint | None) -> IntakeResult | _UidConflict | None:
    known = session.scalar(select(StudyFile).where(StudyFile.sha256 == sha256))
    if known is not None:
        study = session.get(Study, known.study_id)
        retry = study.status == StudyStatus.failed.value or (
            reject is None and study.status == StudyStatus.rejected.value and study.reject_code == "bad_filename")
        if retry:
            _requeue(session, study, actor=actor, detail="the same bytes were received again")
            study.filename = filename
        session.flush()
        return IntakeResult(study=study, created=False, duplicate=Duplicate.same_bytes, enqueue=retry)
    if sop is None:
        return None
    # The owner of the UID first, then earlier conflicting films (a re-send of one of those joins it).
    candidates = list(session.scalars(select(Study).where(Study.sop_instance_uid == sop)
                                      .order_by(Study.conflicts_with.is_not(None), Study.created_at, Study.id)))
    if not candidates:
        return None
    unscored = (StudyStatus.failed.value, StudyStatus.rejected.value)
    study, differences = None, {}
    for candidate in candidates:
        differs = header_differences(metadata, {c: getattr(candidate, c) for c in
                                                ("patient_key", "study_instance_uid", "series_instance_uid")})
        if not differs:
            same = _same_pixels(session, candidate, stored_path=stored_path, pixels=pixels)
            # A copy of a film still waiting in the queue whose own file does not decode (a copy
            # cut short that the watcher took in after its stalled limit): the readable copy
            # takes its place below, so the film is screened once, from complete bytes.
            replaces_unreadable = (same is None and candidate.status == StudyStatus.queued.value
                                   and pixels is not None and pixels(stored_path) is not None)
            if same or (same is None and candidate.status in unscored) or replaces_unreadable:
                study = candidate
                break
            differs = ["pixels"] if same is False else ["pixels_unknown"]
        differences[candidate.id] = differs
    if study is None:
        owner = next((c for c in candidates if c.conflicts_with is None), candidates[0])
        return _UidConflict(owner=owner, differences=differences[owner.id])
    try:
        with session.begin_nested():
            session.add(StudyFile(study_id=study.id, sha256=sha256, stored_path=stored_path, size_bytes=size_bytes,
                                  filename=filename, source=source, transfer_syntax=metadata.get("transfer_syntax"),
                                  pixel_sha256=pixels(stored_path) if pixels else None))
            session.flush()
    except IntegrityError:
        return None  # these bytes were recorded meanwhile; the caller looks again
    if reject is None and study.status == StudyStatus.queued.value and pixels is not None \
            and pixels(study.stored_path) is None and pixels(stored_path) is not None:
        # Still queued and its primary copy does not decode: the readable copy becomes the
        # primary file; the task already queued screens it.
        study.sha256, study.stored_path, study.size_bytes, study.filename = sha256, stored_path, size_bytes, filename
        for column, value in metadata.items():
            setattr(study, column, value)
        record_event(session, study_id=study.id, status=study.status, actor=actor,
                     detail="a readable copy of its SOP instance replaced a copy that does not decode")
    # Not scored yet: the new copy may be readable, and becomes the primary file; but a copy
    # that does not decode never displaces one that does (a truncated re-send of a film the
    # gate refused would otherwise replace the complete film and be rejected as unreadable).
    worse = pixels is not None and pixels(stored_path) is None and pixels(study.stored_path) is not None
    retry = reject is None and study.status in unscored and not worse
    if retry:
        study.sha256, study.stored_path, study.size_bytes, study.filename = sha256, stored_path, size_bytes, filename
        for column, value in metadata.items():
            setattr(study, column, value)
        _requeue(session, study, actor=actor, detail="a new copy of its SOP instance was received")
    session.flush()
    return IntakeResult(study=study, created=False, duplicate=Duplicate.same_sop_instance, enqueue=retry)


def update_study_metadata(session: Session, *, study_id: uuid.UUID, metadata: dict[str, Any]) -> None:
    """Fill study metadata columns learnt by the worker (format, size, DICOM fields).

    Identity columns set at intake (SOP Instance UID, patient key) are never overwritten."""
    values = {k: v for k, v in _clip(metadata).items() if k not in ("sop_instance_uid", "patient_key")}
    if values:
        session.execute(update(Study).where(Study.id == study_id).values(**values))


def link_job_study(session: Session, *, job: Job, study: Study, filename: str, position: int) -> JobStudy:
    item = JobStudy(job_id=job.id, study_id=study.id, filename=filename, position=position)
    session.add(item)
    session.flush()
    return item


def get_study(session: Session, *, study_id: uuid.UUID, with_results: bool = True) -> Study | None:
    """A study, with its results and their model versions loaded (``with_results=False``:
    the study's own row only, one query, as a worker about to screen it needs)."""
    if not with_results:
        return session.get(Study, study_id)
    return session.get(Study, study_id, options=[selectinload(Study.results).selectinload(Result.model_version)])


def get_job(session: Session, *, job_id: uuid.UUID) -> Job | None:
    return session.get(
        Job,
        job_id,
        options=[selectinload(Job.items).selectinload(JobStudy.study).selectinload(Study.results)],
    )


def claim_study(session: Session, *, study_id: uuid.UUID, worker: str | None = None,
                lease_seconds: float = 120.0) -> bool:
    """Move a study to ``processing`` with a lease held by ``worker`` (default: this process,
    ``host:pid``) until now + ``lease_seconds``. True if claimed.

    Claimable: a ``queued`` study, or a ``processing`` one whose lease has expired (its
    worker died or lost the database) or is already this worker's (a redelivered task).
    A study another live worker holds, or a finished one, is left alone.
    """
    worker = worker or worker_name()
    now = utcnow()
    expires = now + timedelta(seconds=lease_seconds)
    res = session.execute(
        update(Study)
        .where(Study.id == study_id, or_(
            Study.status == StudyStatus.queued.value,
            and_(Study.status == StudyStatus.processing.value, or_(
                Study.lease_expires_at.is_(None), Study.lease_expires_at < now, Study.worker_id == worker)),
        ))
        .values(status=StudyStatus.processing.value, started_at=now, updated_at=now, worker_id=worker,
                lease_expires_at=expires)
        .execution_options(synchronize_session="fetch")  # no Python-side datetime comparison (SQLite is naive)
    )
    if res.rowcount != 1:
        return False
    record_event(session, study_id=study_id, status=StudyStatus.processing.value, actor=f"worker@{worker}",
                 detail=f"lease until {expires.isoformat(timespec='seconds')}", at=now)
    return True


def renew_leases(session: Session, *, worker: str, lease_seconds: float) -> int:
    """Extend every lease ``worker`` holds to now + ``lease_seconds``. Returns how many."""
    res = session.execute(
        update(Study)
        .where(Study.worker_id == worker, Study.status == StudyStatus.processing.value)
        .values(lease_expires_at=utcnow() + timedelta(seconds=lease_seconds))
        .execution_options(synchronize_session="fetch")
    )
    return res.rowcount


def heartbeat(session: Session, *, worker: str, now: datetime | None = None) -> None:
    """Record that ``worker`` (``host:pid``) is alive now (an upsert of its ``workers`` row)."""
    now = now or utcnow()
    insert = pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert
    session.execute(insert(Worker).values(name=worker[:255], started_at=now, heartbeat_at=now)
                    .on_conflict_do_update(index_elements=["name"], set_={"heartbeat_at": now}))


def forget_worker(session: Session, *, worker: str) -> None:
    session.execute(delete(Worker).where(Worker.name == worker))


def prune_workers(session: Session, *, older_than: datetime) -> int:
    """Drop the rows of workers silent since before ``older_than`` (long gone, nothing left to reap)."""
    held = select(Study.worker_id).where(Study.worker_id == Worker.name).exists()
    return session.execute(delete(Worker).where(Worker.heartbeat_at < older_than, ~held)
                           .execution_options(synchronize_session=False)).rowcount


def mark_delivered(session: Session, *, worker: str, study_ids: list[uuid.UUID]) -> int:
    """Note on ``queued`` studies that ``worker`` has taken their task from the broker (reserved,
    prefetched): kept in ``worker_id`` while the study is queued. Should that worker die before
    it claims them, the reaper publishes their tasks again at once (see reap_expired)."""
    if not study_ids:
        return 0
    res = session.execute(update(Study).where(Study.id.in_(study_ids), Study.status == StudyStatus.queued.value)
                          .values(worker_id=worker[:255]).execution_options(synchronize_session=False))
    return res.rowcount


def dead_workers(session: Session, *, now: datetime, dead_after: float) -> list[tuple[str, datetime]]:
    """Workers whose last heartbeat is older than ``dead_after`` seconds: (name, last heartbeat)."""
    cutoff = now - timedelta(seconds=dead_after)
    return list(session.execute(select(Worker.name, Worker.heartbeat_at).where(Worker.heartbeat_at < cutoff)).all())


@dataclass(frozen=True)
class Requeued:
    study_id: uuid.UUID
    reason: str


def reap_expired(session: Session, *, now: datetime | None = None, actor: str | None = None,
                 stale_queued_after: float | None = None, dead_after: float | None = None,
                 limit: int = 1000) -> list[Requeued]:
    """Re-queue every ``processing`` study whose lease expired before ``now``; the caller
    commits and then publishes a screening task for each.

    With ``stale_queued_after`` (seconds), also return ``queued`` studies untouched for that
    long, whose task may have been lost (the caller passes it only when the broker queue is
    empty); their ``updated_at`` is bumped so they are not re-published on the next pass.
    With ``dead_after`` (seconds), a worker whose heartbeat (``workers``) is older than that is
    dead: its ``processing`` studies are re-queued at once, lease or no lease, and the
    ``queued`` studies whose task it had taken (``mark_delivered``) are returned for publishing
    again (their mark cleared). A worker with no heartbeat row is judged by its leases only.

    Each change is compare-and-set, so two reapers never re-queue the same study twice."""
    now = now or utcnow()
    actor = actor or actor_name("reaper")
    out: list[Requeued] = []
    if dead_after is not None:
        for worker, last in dead_workers(session, now=now, dead_after=dead_after):
            held = session.execute(
                select(Study.id, Study.status, Study.lease_expires_at, Study.updated_at)
                .where(Study.worker_id == worker, Study.status.in_([StudyStatus.processing.value,
                                                                   StudyStatus.queued.value]))
                .limit(limit)).all()
            for sid, status, expires, updated in held:
                cas = (Study.id == sid, Study.status == status, Study.worker_id == worker)
                res = session.execute(
                    update(Study).where(*cas)
                    .values(status=StudyStatus.queued.value, worker_id=None, lease_expires_at=None, started_at=None,
                            updated_at=now)
                    .execution_options(synchronize_session="fetch"))
                if res.rowcount != 1:
                    continue
                last_seen = last.isoformat(timespec="seconds")
                if status == StudyStatus.processing.value:
                    reason = f"worker {worker} is dead (no heartbeat since {last_seen}); its lease is void, re-queued"
                else:
                    reason = (f"its task was taken by worker {worker}, which is dead (no heartbeat since {last_seen}); "
                              "task published again")
                record_event(session, study_id=sid, status=StudyStatus.queued.value, actor=actor, detail=reason, at=now)
                out.append(Requeued(study_id=sid, reason=reason))
    expired = session.execute(
        select(Study.id, Study.worker_id, Study.lease_expires_at)
        .where(Study.status == StudyStatus.processing.value, Study.lease_expires_at < now)
        .order_by(Study.lease_expires_at).limit(limit)
    ).all()
    for sid, worker, expires in expired:
        res = session.execute(
            update(Study)
            .where(Study.id == sid, Study.status == StudyStatus.processing.value, Study.lease_expires_at == expires)
            .values(status=StudyStatus.queued.value, worker_id=None, lease_expires_at=None, started_at=None,
                    updated_at=now)
            .execution_options(synchronize_session="fetch")
        )
        if res.rowcount == 1:
            reason = f"lease of worker {worker} expired at {expires.isoformat(timespec='seconds')}; re-queued"
            record_event(session, study_id=sid, status=StudyStatus.queued.value, actor=actor, detail=reason, at=now)
            out.append(Requeued(study_id=sid, reason=reason))
    if stale_queued_after is not None:
        cutoff = now - timedelta(seconds=stale_queued_after)
        stale = session.execute(
            select(Study.id, Study.updated_at)
            .where(Study.status == StudyStatus.queued.value, Study.updated_at < cutoff)
            .order_by(Study.updated_at).limit(limit)
        ).all()
        for sid, updated in stale:
            res = session.execute(update(Study).where(Study.id == sid, Study.status == StudyStatus.queued.value,
                                                      Study.updated_at == updated).values(updated_at=now)
                                  .execution_options(synchronize_session="fetch"))
            if res.rowcount == 1:
                reason = (f"queued since {updated.isoformat(timespec='seconds')} with no task waiting in the "
                          "broker queue; task published again")
                record_event(session, study_id=sid, status=StudyStatus.queued.value, actor=actor, detail=reason, at=now)
                out.append(Requeued(study_id=sid, reason=reason))
    session.flush()
    return out


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


def activate_model_version(session: Session, *, model_version_id: int, path: str) -> ModelVersion:
    """Make one version the active one (every other is deactivated) and record its bundle path."""
    session.execute(update(ModelVersion).where(ModelVersion.id != model_version_id).values(active=False))
    session.execute(update(ModelVersion).where(ModelVersion.id == model_version_id)
                    .values(active=True, path=path, activated_at=utcnow()))
    session.flush()
    return session.get(ModelVersion, model_version_id, populate_existing=True)


def active_model_version(session: Session) -> ModelVersion | None:
    return session.scalar(select(ModelVersion).where(ModelVersion.active.is_(True)))


def list_model_versions(session: Session) -> list[tuple[ModelVersion, int]]:
    """Every version with the number of results made with it, newest first."""
    counts = (select(Result.model_version_id, func.count(Result.id).label("n"))
              .group_by(Result.model_version_id).subquery())
    rows = session.execute(
        select(ModelVersion, func.coalesce(counts.c.n, 0))
        .outerjoin(counts, counts.c.model_version_id == ModelVersion.id)
        .order_by(ModelVersion.created_at.desc(), ModelVersion.id.desc())
    ).all()
    return [(mv, int(n)) for mv, n in rows]


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
    final: bool = True,
    actor: str | None = None,
    ood_score: float | None = None,
    uncertainty: float | None = None,
    uncertain: bool | None = None,
) -> Result:
    """Store a result and (``final``) mark the study done. A result already stored for this
    model wins; only its missing heatmap (and timings) are filled in.

    ``final=False`` stores the scores before the heatmap exists: the study stays
    ``processing`` (POST /predict answers from such a row; ``done`` waits for the heatmap).

    The insert is an upsert (``ON CONFLICT DO NOTHING`` on the unique (study, model version)):
    two workers finishing the same study (a lease that expired under a slow worker) leave
    one row, the first one written."""
    where = (Result.study_id == study_id, Result.model_version_id == model_version_id)
    insert = pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert
    session.execute(insert(Result).values(
        study_id=study_id, model_version_id=model_version_id, probabilities=probabilities,
        predicted_class=predicted_class, confidence=float(probabilities[predicted_class]), risk=risk,
        flagged=flagged, heatmap_path=heatmap_path, timings_ms=timings_ms, created_at=utcnow(),
        ood_score=ood_score, uncertainty=uncertainty, uncertain=uncertain,
    ).on_conflict_do_nothing(index_elements=["study_id", "model_version_id"]))
    result = session.scalar(select(Result).where(*where).execution_options(populate_existing=True))
    if result.heatmap_path is None and heatmap_path is not None:
        result.heatmap_path = heatmap_path
        result.timings_ms = timings_ms
    if final:
        _finish(session, study_id=study_id, status=StudyStatus.done, error=None, reject_code=None,
                actor=actor, detail=f"{result.predicted_class} (risk {result.risk:.3f})")
    session.flush()
    return result


def _finish(session: Session, *, study_id: uuid.UUID, status: StudyStatus, error: str | None,
            reject_code: str | None, actor: str | None, detail: str | None) -> None:
    """Set a final status, release the lease, and write the change to the audit trail
    (only when the status changes, so a repeated write adds no event)."""
    previous = session.scalar(select(Study.status).where(Study.id == study_id))
    now = utcnow()
    session.execute(
        update(Study)
        .where(Study.id == study_id)
        .values(status=status.value, error=error, reject_code=reject_code, finished_at=now, updated_at=now,
                worker_id=None, lease_expires_at=None)
    )
    if previous is not None and previous != status.value:
        record_event(session, study_id=study_id, status=status.value, actor=actor or actor_name("worker"),
                     detail=detail, at=now)


def mark_study(
    session: Session, *, study_id: uuid.UUID, status: StudyStatus, error: str | None, reject_code: str | None = None,
    actor: str | None = None,
) -> None:
    """Set a study's final status (and reason), release its lease, and audit the change
    (``actor`` defaults to ``worker@host:pid``)."""
    _finish(session, study_id=study_id, status=status, error=error, reject_code=reject_code, actor=actor,
            detail=error)


@dataclass(frozen=True)
class WorklistRow:
    study: Study
    result: Result | None

    @property
    def key(self) -> "WorklistKey":
        """This row's place in the worklist order (what a cursor points after)."""
        return WorklistKey(
            group=_group_of(self.study.status),
            flagged=1 if self.result is not None and (self.result.flagged or self.result.uncertain) else 0,
            risk=float(self.result.risk) if self.result is not None else -1.0,
            created_at=self.study.created_at,
            study_id=self.study.id,
        )


@dataclass(frozen=True)
class WorklistKey:
    """A position in the worklist order: (group, flagged, risk, created_at, study id)."""

    group: int
    flagged: int
    risk: float
    created_at: datetime
    study_id: uuid.UUID


def _group_of(status: str) -> int:
    if status == StudyStatus.done.value:
        return 0
    if status in (StudyStatus.queued.value, StudyStatus.processing.value):
        return 1
    return 2


def latest_result(study: Study) -> Result | None:
    return study.results[-1] if study.results else None


def worklist(
    session: Session,
    *,
    status: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    flagged: bool | None = None,
    predicted_class: str | None = None,
    model_version: str | None = None,
    after: WorklistKey | None = None,
    limit: int | None = 100,
) -> list[WorklistRow]:
    """Studies for review: scored ones first, flagged or uncertain (refer for review) before
    the others, highest risk first;
    then queued/processing; then rejected and failed ones, newest first (ties: study id).

    ``flagged``, ``predicted_class`` and ``model_version`` filter on the newest result.
    ``after`` continues the list after that row (keyset pagination: stable while rows are added)."""
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
    if until is not None:
        stmt = stmt.where(Study.created_at < until)
    if flagged is not None:
        stmt = stmt.where(Result.flagged.is_(flagged))
    if predicted_class:
        stmt = stmt.where(Result.predicted_class == predicted_class)
    if model_version:
        stmt = stmt.where(Result.model_version_id.in_(
            select(ModelVersion.id).where(ModelVersion.version == model_version)))
    group = case(
        (Study.status == StudyStatus.done.value, 0),
        (Study.status.in_([StudyStatus.queued.value, StudyStatus.processing.value]), 1),
        else_=2,
    )
    # No result sorts as unflagged with risk -1: after every scored row of its group, as NULLS LAST did.
    # An uncertain result (refer for review) sorts with the flagged ones.
    flag = case((or_(Result.flagged.is_(True), Result.uncertain.is_(True)), 1), else_=0)
    risk = func.coalesce(Result.risk, -1.0)
    if after is not None:
        stmt = stmt.where(or_(
            group > after.group,
            and_(group == after.group, or_(
                flag < after.flagged,
                and_(flag == after.flagged, or_(
                    risk < after.risk,
                    and_(risk == after.risk, or_(
                        Study.created_at < after.created_at,
                        and_(Study.created_at == after.created_at, Study.id < after.study_id),
                    )),
                )),
            )),
        ))
    stmt = stmt.order_by(group, flag.desc(), risk.desc(), Study.created_at.desc(), Study.id.desc())
    if limit:
        stmt = stmt.limit(limit)
    return [WorklistRow(study=s, result=r) for s, r in session.execute(stmt).all()]


def study_statuses(session: Session, *, study_ids: list[uuid.UUID]) -> dict[uuid.UUID, tuple[str, bool]]:
    """(status, has a result) per study."""
    scored = select(Result.id).where(Result.study_id == Study.id).exists()
    return {sid: (status, bool(has)) for sid, status, has in
            session.execute(select(Study.id, Study.status, scored).where(Study.id.in_(study_ids))).all()}


def study_summary(study: Study, result: Result | None) -> dict[str, Any]:
    """The JSON shape shared by the API and ``cxr worklist``.

    ``marker`` (e.g. ``uid_conflict``, see ``cxr.identity``), ``marker_detail`` and
    ``conflicts_with`` (the study that owns its SOP Instance UID) flag a study that is
    screened as usual but that a reader must look at twice; None when there is nothing."""
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
        "uncertainty": result.uncertainty if result else None,
        "uncertain": result.uncertain if result else None,
        "ood_score": result.ood_score if result else None,
        "heatmap_path": result.heatmap_path if result else None,
        "model_version": result.model_version.version if result and result.model_version else None,
        "timings_ms": dict(result.timings_ms) if result else None,
        "reject_code": study.reject_code,
        "error": study.error,
        "marker": study.marker,
        "marker_detail": study.marker_detail,
        "conflicts_with": str(study.conflicts_with) if study.conflicts_with else None,
        "metadata": {c: getattr(study, c) for c in STUDY_METADATA_COLUMNS if getattr(study, c) is not None},
        "created_at": study.created_at.isoformat() if study.created_at else None,
        "finished_at": study.finished_at.isoformat() if study.finished_at else None,
    }


def add_api_key(session: Session, *, name: str, prefix: str, key_sha256: str) -> ApiKey:
    key = ApiKey(name=name, prefix=prefix, key_sha256=key_sha256)
    session.add(key)
    session.flush()
    return key


def revoke_api_key(session: Session, *, key_id: int | None = None, prefix: str | None = None) -> list[ApiKey]:
    """Revoke the active key(s) with this id or prefix; returns what was revoked."""
    stmt = select(ApiKey).where(ApiKey.revoked_at.is_(None))
    if key_id is not None:
        stmt = stmt.where(ApiKey.id == key_id)
    elif prefix:
        stmt = stmt.where(ApiKey.prefix == prefix)
    else:
        return []
    keys = list(session.scalars(stmt))
    for key in keys:
        key.revoked_at = utcnow()
    session.flush()
    return keys


def list_api_keys(session: Session) -> list[ApiKey]:
    return list(session.scalars(select(ApiKey).order_by(ApiKey.id)))


def api_key_status(session: Session, *, key_sha256: str | None) -> tuple[bool, bool]:
    """(any key was ever stored, revoked ones included; this hash is an active stored key).

    The first tells whether the installation has required keys: revoking the last key must
    not open the API (README "Security and limits")."""
    match = bool(key_sha256) and session.scalar(
        select(ApiKey.id).where(ApiKey.revoked_at.is_(None), ApiKey.key_sha256 == key_sha256)) is not None
    return match or session.scalar(select(ApiKey.id).limit(1)) is not None, match


TERMINAL_STATUSES = (StudyStatus.done.value, StudyStatus.failed.value, StudyStatus.rejected.value)


def job_report(session: Session, *, job_id: uuid.UUID) -> dict[str, Any] | None:
    """The JSON shape of GET /jobs/{id} (and of a job's callback)."""
    job = get_job(session, job_id=job_id)
    if job is None:
        return None
    studies = [study_summary(item.study, latest_result(item.study)) | {"filename": item.filename}
               for item in job.items]
    counts: dict[str, int] = {}
    for s in studies:
        counts[s["status"]] = counts.get(s["status"], 0) + 1
    statuses = [s["status"] for s in studies]
    if statuses and all(s in TERMINAL_STATUSES for s in statuses):
        overall = "done"
    elif any(s != StudyStatus.queued.value for s in statuses):
        overall = "processing"
    else:
        overall = "queued"
    out = {"job_id": str(job.id), "status": overall, "counts": counts, "studies": studies}
    if job.callback_url:
        out["callback"] = {"state": job.callback_state, "attempts": job.callback_attempts or 0,
                           "last_attempt_at": job.callback_at.isoformat() if job.callback_at else None,
                           "error": job.callback_error}
    return out


def claim_complete_callbacks(session: Session, *, study_id: uuid.UUID | None = None,
                             job_id: uuid.UUID | None = None, publish_grace_seconds: float = 60.0,
                             limit: int = 1000) -> list[uuid.UUID]:
    """Jobs (holding this study, or this job, or any job when neither is given) whose callback is
    pending and whose studies are all finished, moved to ``sending``: each is claimed by exactly
    one caller, who then publishes its callback task. The outbox lease runs ``publish_grace_seconds``:
    should the task never run (lost message, dead publisher), the reaper publishes it again."""
    stmt = select(Job.id).where(Job.callback_state == "pending")
    if study_id is not None:
        stmt = stmt.where(Job.id.in_(select(JobStudy.job_id).where(JobStudy.study_id == study_id)))
    if job_id is not None:
        stmt = stmt.where(Job.id == job_id)
    unfinished = (select(JobStudy.job_id).join(Study, Study.id == JobStudy.study_id)
                  .where(JobStudy.job_id == Job.id, Study.status.not_in(TERMINAL_STATUSES)).exists())
    claimed = []
    lease = utcnow() + timedelta(seconds=publish_grace_seconds)
    for jid in session.scalars(stmt.where(~unfinished).limit(limit)).all():
        res = session.execute(update(Job).where(Job.id == jid, Job.callback_state == "pending")
                              .values(callback_state="sending", callback_holder=None,
                                      callback_lease_expires_at=lease))
        if res.rowcount == 1:
            claimed.append(jid)
    session.flush()
    return claimed


@dataclass(frozen=True)
class CallbackAttempt:
    url: str
    attempt: int  # 1 for the first delivery attempt
    report: dict[str, Any]


def begin_callback_attempt(session: Session, *, job_id: uuid.UUID, holder: str,
                           lease_seconds: float) -> CallbackAttempt | None:
    """Take the job's callback for one delivery attempt (compare-and-set): allowed when it is
    ``sending`` and nobody holds it, or its lease expired, or ``holder`` (a Celery task id, the
    same across that task's retries) already does. Counts the attempt and leases the delivery
    for ``lease_seconds`` (the attempt's deadline plus the longest wait before its retry).
    None: delivered, given up, or held by another live task."""
    now = utcnow()
    res = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.callback_state == "sending",
               or_(Job.callback_holder.is_(None), Job.callback_holder == holder,
                   Job.callback_lease_expires_at.is_(None), Job.callback_lease_expires_at < now))
        .values(callback_holder=holder[:255], callback_lease_expires_at=now + timedelta(seconds=lease_seconds),
                callback_attempts=Job.callback_attempts + 1, callback_at=now)
        .execution_options(synchronize_session=False)
    )
    if res.rowcount != 1:
        return None
    url, attempts = session.execute(select(Job.callback_url, Job.callback_attempts).where(Job.id == job_id)).one()
    return CallbackAttempt(url=url, attempt=attempts, report=job_report(session, job_id=job_id))


def callback_attempt_failed(session: Session, *, job_id: uuid.UUID, holder: str, error: str) -> None:
    """Record why the attempt failed; the delivery stays ``sending`` and leased to ``holder`` until its retry."""
    session.execute(update(Job).where(Job.id == job_id, Job.callback_holder == holder)
                    .values(callback_error=error[:1000]).execution_options(synchronize_session=False))


def finish_callback(session: Session, *, job_id: uuid.UUID, state: str, error: str | None = None,
                    holder: str | None = None) -> None:
    """End the delivery: ``sent`` or ``failed`` (with why). With ``holder``, only if it still holds it."""
    stmt = update(Job).where(Job.id == job_id)
    if holder is not None:
        stmt = stmt.where(Job.callback_holder == holder)
    session.execute(stmt.values(callback_state=state, callback_at=utcnow(), callback_error=error,
                                callback_holder=None, callback_lease_expires_at=None)
                    .execution_options(synchronize_session=False))


def reap_callbacks(session: Session, *, now: datetime | None = None, publish_grace_seconds: float = 60.0,
                   limit: int = 1000) -> list[uuid.UUID]:
    """Callbacks ``sending`` whose lease expired: their worker died mid-delivery or while waiting
    to retry, or their task was lost. Released (compare-and-set, so one reaper takes each) with a
    fresh publishing grace; the caller commits and publishes their tasks again."""
    now = now or utcnow()
    # A `sending` row without a lease predates the outbox (its delivery was lost for good then): due too.
    due = session.execute(select(Job.id, Job.callback_lease_expires_at)
                          .where(Job.callback_state == "sending",
                                 or_(Job.callback_lease_expires_at < now, Job.callback_lease_expires_at.is_(None)))
                          .limit(limit)).all()
    out = []
    for jid, expires in due:
        same = Job.callback_lease_expires_at.is_(None) if expires is None else Job.callback_lease_expires_at == expires
        res = session.execute(
            update(Job).where(Job.id == jid, Job.callback_state == "sending", same)
            .values(callback_holder=None, callback_lease_expires_at=now + timedelta(seconds=publish_grace_seconds))
            .execution_options(synchronize_session=False))
        if res.rowcount == 1:
            out.append(jid)
    session.flush()
    return out


@dataclass(frozen=True)
class SummaryRow:
    """What the summary report needs of one study and its newest result (None: not scored)."""

    created_at: datetime
    finished_at: datetime | None
    status: str
    reject_code: str | None
    error: str | None
    predicted_class: str | None
    flagged: bool | None
    risk: float | None
    probabilities: dict[str, float] | None
    model_version: str | None
    architecture: str | None
    result_at: datetime | None


def summary_rows(session: Session, *, since: datetime | None = None,
                 until: datetime | None = None) -> list[SummaryRow]:
    """Every study received in [since, until) with its newest result, oldest first (columns only)."""
    latest = select(Result.study_id, func.max(Result.id).label("rid")).group_by(Result.study_id).subquery()
    stmt = (
        select(Study.created_at, Study.finished_at, Study.status, Study.reject_code, Study.error,
               Result.predicted_class, Result.flagged, Result.risk, Result.probabilities, ModelVersion.version,
               ModelVersion.architecture, Result.created_at)
        .outerjoin(latest, latest.c.study_id == Study.id)
        .outerjoin(Result, Result.id == latest.c.rid)
        .outerjoin(ModelVersion, ModelVersion.id == Result.model_version_id)
    )
    if since is not None:
        stmt = stmt.where(Study.created_at >= since)
    if until is not None:
        stmt = stmt.where(Study.created_at < until)
    stmt = stmt.order_by(Study.created_at, Study.id)
    return [SummaryRow(*row) for row in session.execute(stmt).all()]
