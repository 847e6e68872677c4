"""Screen one stored study: the glue between the database and the screening core.

Plain functions, called by the Celery task; testable without Celery.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from functools import lru_cache
from pathlib import Path

from cxr.bundle import NO_BUNDLE_HELP, BundleError
from cxr.db import repo
from cxr.db.models import StudyStatus
from cxr.db.session import session_scope
from cxr.metrics import record_screening
from cxr.registry import resolve_bundle
from cxr.settings import Settings
from worker.leases import ensure_lease_keeper

log = logging.getLogger(__name__)


class NoBundleError(RuntimeError):
    pass


def screen_options(settings: Settings):
    """The screening core's reading options (gate rules, VOI, size limit) from the settings.

    The worker and ``cxr predict`` both build theirs here, so they gate alike."""
    from worker.screening.decode import VoiOptions
    from worker.screening.gate import GateRules
    from worker.screening.pipeline import ScreenOptions

    return ScreenOptions(
        max_pixels=settings.max_image_pixels,
        gate=GateRules(
            not_radiograph=settings.gate_not_radiograph,
            not_chest=settings.gate_not_chest,
            lateral_view=settings.gate_lateral_view,
            multi_frame=settings.gate_multi_frame,
            too_small=settings.gate_too_small,
            min_size=settings.gate_min_size,
            chest_body_parts=frozenset(settings.gate_chest_body_parts),
            blank_image=settings.gate_blank_image,
            polarity=settings.gate_polarity,
        ),
        voi=VoiOptions(use_window=settings.voi_use_window,
                       fallback_percentiles=tuple(settings.voi_fallback_percentiles)),
        heatmaps=settings.heatmaps,
        engine=settings.engine,
        cache_dir=settings.home / "onnx",
        threads=settings.torch_threads,
        max_batch=settings.max_batch,
        max_wait_ms=settings.max_wait_ms,
        batch_eager=settings.batch_eager,
        decode_budget_bytes=settings.decode_budget_bytes,
    )


_load_lock = threading.Lock()


@lru_cache(maxsize=1)
def _screener(checkpoint: str, device: str, torch_threads: int, options):
    import torch

    from worker.screening.model import load_bundle
    from worker.screening.pipeline import Screener

    torch.set_num_threads(torch_threads)
    return Screener(load_bundle(Path(checkpoint), device=device), options)


# How long a worker process trusts its last look at which bundle is active.
BUNDLE_RECHECK_SECONDS = 2.0
_resolved: dict[tuple[str, str], tuple[float, Path | None]] = {}


def _active_bundle(settings: Settings) -> Path | None:
    """resolve_bundle, looked up at most every BUNDLE_RECHECK_SECONDS per process (it is a
    database query; a worker asks for every study)."""
    key = (settings.database_url, str(settings.checkpoint))
    now = time.monotonic()
    hit = _resolved.get(key)
    if hit is not None and now - hit[0] < BUNDLE_RECHECK_SECONDS:
        return hit[1]
    path = resolve_bundle(settings)
    _resolved[key] = (now, path)
    return path


def get_screener(settings: Settings):
    """The process's screener, loaded on first use (never at import, never before a fork).

    The bundle is resolved again every couple of seconds (CXR_CHECKPOINT, else the active
    version in the database, else the shipped default), so `cxr model activate` takes effect
    within BUNDLE_RECHECK_SECONDS without a restart; the loaded model is cached per bundle."""
    ckpt = _active_bundle(settings)
    if ckpt is None:
        raise NoBundleError(NO_BUNDLE_HELP)
    with _load_lock:  # a threads pool must not load the same model twice
        return _screener(str(ckpt), settings.device, settings.torch_threads, screen_options(settings))


@lru_cache(maxsize=4)
def _model_version_id(database_url: str, sha256: str, architecture: str, classes: tuple[str, ...], version: str) -> int:
    with session_scope(database_url) as session:
        mv = repo.ensure_model_version(
            session, checkpoint_sha256=sha256, architecture=architecture, class_names=list(classes), version=version
        )
        return mv.id


def process_study(settings: Settings, study_id: uuid.UUID, *, scores_first: bool = False) -> str:
    """Screen a study once. Idempotent: a study already done for this model is left alone.

    Returns what happened: 'done', 'rejected', 'failed', 'already-done', 'not-claimable' or 'missing'.
    The study is claimed with a lease (this process, renewed in the background while it
    works); every status change is written to the audit trail as ``worker@host:pid``.
    ``scores_first`` (someone waits on POST /predict): store the scores before the heatmap
    is drawn, at the cost of one more database write.
    """
    worker = ensure_lease_keeper(settings)
    screener = get_screener(settings)
    loaded = screener.loaded
    started = time.perf_counter()  # the screening latency metric: from here to the stored result
    mv_id = _model_version_id(
        settings.database_url, loaded.sha256, loaded.meta.architecture, tuple(loaded.meta.classes), loaded.meta.version
    )
    with session_scope(settings.database_url) as session:
        study = repo.get_study(session, study_id=study_id, with_results=False)
        if study is None:
            log.warning("study %s not found; dropping task", study_id)
            return "missing"
        if repo.has_result(session, study_id=study_id, model_version_id=mv_id):
            if study.status != StudyStatus.done.value:
                repo.mark_study(session, study_id=study_id, status=StudyStatus.done, error=None)
            return "already-done"
        if not repo.claim_study(session, study_id=study_id, worker=worker, lease_seconds=settings.lease_seconds):
            log.info("study %s is %s; not screening it again", study_id, study.status)
            return "not-claimable"
        stored_path = Path(study.stored_path)

    try:
        data = stored_path.read_bytes()
    except OSError as e:
        outcome_error = f"store_unreadable: the stored copy cannot be read ({e.strerror}); check CXR_HOME"
        with session_scope(settings.database_url) as session:
            repo.mark_study(session, study_id=study_id, status=StudyStatus.failed, error=outcome_error)
        log.error("study %s failed: %s", study_id, outcome_error)
        return "failed"

    heatmap_to = settings.heatmap_dir / f"{study_id}.jpg"  # written only if the heatmap policy wants one

    def publish_scores(scored) -> None:
        # The scores are stored before the heatmap is drawn and written; the study stays
        # `processing` until then. POST /predict answers from this row.
        with session_scope(settings.database_url) as session:
            repo.record_result(session, study_id=study_id, model_version_id=mv_id, probabilities=scored.probabilities,
                               predicted_class=scored.predicted_class, risk=scored.risk, flagged=scored.flagged,
                               heatmap_path=None, timings_ms=scored.timings_ms, final=False,
                               ood_score=scored.ood_score, uncertainty=scored.uncertainty,
                               uncertain=scored.uncertain)

    outcome = screener.screen(data, heatmap_to=heatmap_to,
                              on_scored=publish_scores if scores_first and settings.heatmaps != "none" else None)
    with session_scope(settings.database_url) as session:
        repo.update_study_metadata(session, study_id=study_id, metadata=outcome.metadata)
        repo.record_notes(session, study_id=study_id, notes=outcome.notes)
        if outcome.status == "done":
            repo.record_result(
                session,
                study_id=study_id,
                model_version_id=mv_id,
                probabilities=outcome.probabilities,
                predicted_class=outcome.predicted_class,
                risk=outcome.risk,
                flagged=outcome.flagged,
                heatmap_path=outcome.heatmap_path,
                timings_ms=outcome.timings_ms,
                ood_score=outcome.ood_score,
                uncertainty=outcome.uncertainty,
                uncertain=outcome.uncertain,
            )
        else:
            repo.mark_study(session, study_id=study_id, status=StudyStatus(outcome.status), error=outcome.error,
                            reject_code=outcome.reject_code)
    if outcome.status == "done":
        log.info("study %s done: %s %s", study_id, outcome.predicted_class, outcome.timings_ms)
    else:
        log.warning("study %s %s: %s", study_id, outcome.status, outcome.error)
    record_screening(outcome, seconds=time.perf_counter() - started, model_version=loaded.meta.version)
    if settings.dicom_outbox is not None:  # SR + heatmap SC for DICOM studies; a failure is logged, not raised
        from worker.dicom_out import write_for_study
        write_for_study(settings.dicom_outbox, study_id=study_id, outcome=outcome, meta=loaded.meta,
                        source_path=stored_path)
    return outcome.status


def fail_study(settings: Settings, study_id: uuid.UUID, error: str) -> None:
    with session_scope(settings.database_url) as session:
        repo.mark_study(session, study_id=study_id, status=StudyStatus.failed, error=error)


__all__ = ["BundleError", "NoBundleError", "fail_study", "get_screener", "process_study"]
