"""ORM models. Schema changes go through Alembic only (``migrations/``)."""

from __future__ import annotations

import enum
import uuid
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON, Boolean, DateTime, Float, ForeignKey, Index, Integer, MetaData, String, Text, UniqueConstraint, false, text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class StudyStatus(str, enum.Enum):
    queued = "queued"
    processing = "processing"
    done = "done"
    failed = "failed"
    rejected = "rejected"


class Source(str, enum.Enum):
    watch = "watch"
    api = "api"


NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_name)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {dict[str, Any]: JSON, list[str]: JSON}


class ModelVersion(Base):
    __tablename__ = "model_versions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    checkpoint_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    architecture: Mapped[str] = mapped_column(String(128))
    class_names: Mapped[list[str]] = mapped_column(JSON)
    version: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # Where the bundle lives (under CXR_HOME/models for activated bundles, so every host sees it).
    path: Mapped[str | None] = mapped_column(Text, nullable=True)
    active: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    activated_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    source: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # POSTed the job's report once every study is finished (retried with backoff).
    callback_url: Mapped[str | None] = mapped_column(Text, nullable=True)
    # pending, sending, sent, failed
    callback_state: Mapped[str | None] = mapped_column(String(16), nullable=True, index=True)
    callback_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # The callback outbox: delivery attempts made so far, the task holding the delivery (a Celery
    # task id) and until when; the reaper publishes again a `sending` callback whose lease expired.
    callback_attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    callback_holder: Mapped[str | None] = mapped_column(String(255), nullable=True)
    callback_lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    callback_error: Mapped[str | None] = mapped_column(Text, nullable=True)  # why the last attempt failed

    items: Mapped[list["JobStudy"]] = relationship(back_populates="job", order_by="JobStudy.position")


class Worker(Base):
    """A live (or once live) worker process: ``host:pid`` and its last heartbeat. The reaper
    treats a worker whose heartbeat is older than CXR_WORKER_DEAD_AFTER_SECONDS as dead: its
    leases and the tasks delivered to it are re-queued without waiting for the lease to run out."""

    __tablename__ = "workers"

    name: Mapped[str] = mapped_column(String(255), primary_key=True)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)


class Study(Base):
    """One radiograph. Identity: its bytes (sha256, through ``study_files``), and for DICOM its
    SOP Instance UID. ``sha256``/``stored_path`` name the primary file, the one screened.

    One study per SOP Instance UID owns it (``conflicts_with`` NULL: a partial unique index).
    A different film that arrives with a UID already owned (another patient, other pixels,
    another Study or Series UID) is its own study, with ``conflicts_with`` naming the owner
    and ``marker`` set (``cxr.identity.UID_CONFLICT``); see ``cxr.identity``."""

    __tablename__ = "studies"
    __table_args__ = (
        Index("uq_studies_sop_instance_uid_owner", "sop_instance_uid", unique=True,
              sqlite_where=text("conflicts_with IS NULL"), postgresql_where=text("conflicts_with IS NULL")),
        # One study per conflicting film too (two copies of it racing in find one study).
        Index("uq_studies_sop_instance_uid_film", "sop_instance_uid", "film_key", unique=True,
              sqlite_where=text("conflicts_with IS NOT NULL"), postgresql_where=text("conflicts_with IS NOT NULL")),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    filename: Mapped[str] = mapped_column(String(255))
    source: Mapped[str] = mapped_column(String(16))
    stored_path: Mapped[str] = mapped_column(Text)
    size_bytes: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), default=StudyStatus.queued.value, index=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    reject_code: Mapped[str | None] = mapped_column(String(32), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # The lease of a study in `processing`: which worker holds it (host:pid) and until when.
    # The worker renews it while it works; the reaper re-queues a study whose lease expired.
    worker_id: Mapped[str | None] = mapped_column(String(255), nullable=True)
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True, index=True)

    # What the file says about itself (DICOM header at intake; format and size from the worker).
    # Never PatientID or PatientName: only patient_key, an HMAC of PatientID.
    image_format: Mapped[str | None] = mapped_column(String(16), nullable=True)
    width: Mapped[int | None] = mapped_column(Integer, nullable=True)
    height: Mapped[int | None] = mapped_column(Integer, nullable=True)
    sop_instance_uid: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    study_instance_uid: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    series_instance_uid: Mapped[str | None] = mapped_column(String(64), nullable=True)
    accession_number: Mapped[str | None] = mapped_column(String(64), nullable=True)
    modality: Mapped[str | None] = mapped_column(String(16), nullable=True)
    body_part: Mapped[str | None] = mapped_column(String(64), nullable=True)
    view_position: Mapped[str | None] = mapped_column(String(16), nullable=True)
    patient_age: Mapped[str | None] = mapped_column(String(16), nullable=True)
    patient_sex: Mapped[str | None] = mapped_column(String(16), nullable=True)
    manufacturer: Mapped[str | None] = mapped_column(String(128), nullable=True)
    transfer_syntax: Mapped[str | None] = mapped_column(String(64), nullable=True)
    patient_key: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    # Something a reader must know about a study that is screened as usual (not a rejection):
    # a code from cxr.identity (``uid_conflict``) and the sentence saying what and what to do.
    marker: Mapped[str | None] = mapped_column(String(32), nullable=True, index=True)
    marker_detail: Mapped[str | None] = mapped_column(Text, nullable=True)
    # For a uid_conflict: the earlier study that owns this SOP Instance UID.
    conflicts_with: Mapped[uuid.UUID | None] = mapped_column(nullable=True)
    # For a uid_conflict: which film this is (cxr.identity.film_key: header and pixel hash).
    film_key: Mapped[str | None] = mapped_column(String(64), nullable=True)

    results: Mapped[list["Result"]] = relationship(back_populates="study", order_by="Result.id")
    files: Mapped[list["StudyFile"]] = relationship(back_populates="study", order_by="StudyFile.id")
    events: Mapped[list["StudyEvent"]] = relationship(back_populates="study", order_by="StudyEvent.id",
                                                      passive_deletes=True)


#: Study columns filled from file metadata (see cxr.dicom.header_fields and the worker).
STUDY_METADATA_COLUMNS = (
    "image_format", "width", "height", "sop_instance_uid", "study_instance_uid", "series_instance_uid",
    "accession_number", "modality", "body_part", "view_position", "patient_age", "patient_sex",
    "manufacturer", "transfer_syntax", "patient_key",
)


class StudyEvent(Base):
    """The audit trail: one row per status change of a study, with who made it.

    ``actor`` is the process: ``watcher@host:pid``, ``api@host:pid``, ``worker@host:pid``,
    ``reaper@host:pid``. ``detail`` says why (a reject reason, an expired lease); never a
    patient identifier."""

    __tablename__ = "study_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    study_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    status: Mapped[str] = mapped_column(String(16))
    actor: Mapped[str] = mapped_column(String(255))
    detail: Mapped[str | None] = mapped_column(Text, nullable=True)

    study: Mapped[Study] = relationship(back_populates="events")


class StudyFile(Base):
    """Every distinct file received for a study: the first, and e.g. a re-sent, transcoded
    copy of the same SOP instance. Each is kept in the store under its sha256."""

    __tablename__ = "study_files"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    study_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    stored_path: Mapped[str] = mapped_column(Text)
    size_bytes: Mapped[int] = mapped_column(Integer)
    filename: Mapped[str] = mapped_column(String(255))
    source: Mapped[str] = mapped_column(String(16))
    transfer_syntax: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # sha256 of the decoded pixels (cxr.identity.pixel_fingerprint), computed when a file of
    # the same SOP Instance UID arrives and kept so it is computed once.
    pixel_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    study: Mapped[Study] = relationship(back_populates="files")


class JobStudy(Base):
    """One submitted file of a job. Identical bytes submitted twice point at the same study."""

    __tablename__ = "job_studies"

    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    filename: Mapped[str] = mapped_column(String(255))

    job: Mapped[Job] = relationship(back_populates="items")
    study: Mapped[Study] = relationship()


class Result(Base):
    __tablename__ = "results"
    __table_args__ = (UniqueConstraint("study_id", "model_version_id", name="uq_results_study_model"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    study_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    model_version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"))
    probabilities: Mapped[dict[str, Any]] = mapped_column(JSON)
    predicted_class: Mapped[str] = mapped_column(String(64))
    confidence: Mapped[float] = mapped_column(Float)
    risk: Mapped[float] = mapped_column(Float, index=True)
    flagged: Mapped[bool] = mapped_column(Boolean, default=False, index=True)
    # What the model knows it does not know (None: the bundle computes no such value).
    ood_score: Mapped[float | None] = mapped_column(Float, nullable=True)
    uncertainty: Mapped[float | None] = mapped_column(Float, nullable=True)
    uncertain: Mapped[bool | None] = mapped_column(Boolean, nullable=True, index=True)
    heatmap_path: Mapped[str | None] = mapped_column(Text, nullable=True)
    timings_ms: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    study: Mapped[Study] = relationship(back_populates="results")
    model_version: Mapped[ModelVersion] = relationship()


class ApiKey(Base):
    """An API key, stored only as its sha256 (keys are 256-bit random tokens, so a plain
    hash cannot be reversed). ``prefix`` (the first characters) lets people tell keys apart."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64))
    prefix: Mapped[str] = mapped_column(String(16))
    key_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
