"""Prometheus metrics for the API and the workers. Torch-free.

API (``GET /metrics``): what the shared state says, read when scraped, so every API replica
reports the same numbers: studies by status (database counts), rejected studies by reason,
queue depth (the broker), the active model version; plus the API process's own metrics.

Worker (``cxr worker`` with CXR_WORKER_METRICS_PORT): what the worker itself did:
screening latency and batch size histograms, studies screened by outcome and model version,
DICOM outputs written or failed. Pushgateway-free multiprocess mode: every worker process
(the prefork children too) writes its samples to files under
``$CXR_HOME/metrics/worker-<pid>/`` and the exporter in the worker's main process adds them up.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector
from prometheus_client import values as prom_values
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from cxr.settings import Settings

log = logging.getLogger(__name__)

STATUSES = ("queued", "processing", "done", "failed", "rejected")
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)

# --- API side: read at scrape time ------------------------------------------------------


def queue_depth(settings: Settings) -> int:
    """Messages waiting in the screening queue: the sum of LLEN over kombu's priority lists
    on Redis, the message files of this queue in the filesystem transport's folder."""
    if settings.uses_filesystem_broker:
        folder = settings.broker_dir / "queue"
        return sum(1 for p in folder.iterdir() if p.name.endswith(f".{settings.queue}.msg")) if folder.is_dir() else 0
    if settings.broker_url.startswith(("redis://", "rediss://")):
        import redis
        from kombu.transport.redis import Channel

        sep, steps = Channel.sep, Channel.priority_steps  # how kombu names a queue's priority lists
        client = redis.Redis.from_url(settings.broker_url, socket_connect_timeout=2, socket_timeout=2)
        try:
            names = [settings.queue] + [f"{settings.queue}{sep}{p}" for p in steps if p]
            return sum(client.llen(n) for n in names)
        finally:
            client.close()
    raise ValueError(f"queue depth is not known for the broker {settings.broker_url.split(':', 1)[0]}://")


class StateCollector(Collector):
    """Gauges computed from the database, the broker and the model registry on each scrape.
    A part that cannot be read gives ``cxr_up{part=...} 0`` and a log line, not a failed scrape."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def describe(self) -> list:
        return []  # collected only when scraped (no database query at registration)

    def collect(self) -> Iterator:
        up = GaugeMetricFamily("cxr_up", "1 when this part could be read for this scrape.", labels=["part"])
        yield from self._guarded("database", up, self._database)
        yield from self._guarded("broker", up, self._broker)
        yield from self._guarded("model", up, self._model)
        yield up

    def _guarded(self, part: str, up: GaugeMetricFamily, collect) -> Iterator:
        try:
            families = list(collect())
        except Exception as e:  # reported as cxr_up{part}=0 and logged: a scrape must not fail on it
            log.warning("metrics: cannot read the %s (%s: %s)", part, type(e).__name__, e)
            up.add_metric([part], 0)
            return
        up.add_metric([part], 1)
        yield from families

    def _database(self) -> Iterator:
        from sqlalchemy import func, select

        from cxr.db.models import Study
        from cxr.db.session import session_scope

        with session_scope(self.settings.database_url) as session:
            by_status = dict(session.execute(select(Study.status, func.count()).group_by(Study.status)).all())
            by_reason = session.execute(
                select(Study.reject_code, func.count()).where(Study.status == "rejected").group_by(Study.reject_code)
            ).all()
        studies = GaugeMetricFamily("cxr_studies", "Studies in the database by status.", labels=["status"])
        for status in sorted(set(STATUSES) | set(by_status)):
            studies.add_metric([status], by_status.get(status, 0))
        yield studies
        rejected = GaugeMetricFamily("cxr_rejected_studies", "Rejected studies by reject code.", labels=["reason"])
        for code, n in by_reason:
            rejected.add_metric([code or "unknown"], n)
        yield rejected

    def _broker(self) -> Iterator:
        depth = GaugeMetricFamily("cxr_queue_depth", "Screening tasks waiting in the broker.", labels=["queue"])
        depth.add_metric([self.settings.queue], queue_depth(self.settings))
        yield depth

    def _model(self) -> Iterator:
        from cxr.bundle import read_meta
        from cxr.registry import resolve_bundle

        path = resolve_bundle(self.settings)
        if path is None:
            raise FileNotFoundError("no model bundle configured")
        meta = read_meta(path)
        info = InfoMetricFamily("cxr_model", "The model bundle new studies are screened with.")
        info.add_metric([], {"version": meta.version, "architecture": meta.architecture,
                             "sha256": _sha256_of(str(path), path.stat().st_mtime_ns)})
        yield info


@lru_cache(maxsize=8)
def _sha256_of(path: str, mtime_ns: int) -> str:  # a bundle is hashed once, not on every scrape
    from cxr.bundle import file_sha256

    return file_sha256(Path(path))


_api_registries: dict[int, CollectorRegistry] = {}


def api_metrics(settings: Settings) -> tuple[bytes, str]:
    """The API's /metrics body and content type (one registry per settings object)."""
    registry = _api_registries.get(id(settings))
    if registry is None:
        registry = CollectorRegistry()
        registry.register(StateCollector(settings))
        ProcessCollector(registry=registry)
        _api_registries[id(settings)] = registry
    return generate_latest(registry), CONTENT_TYPE_LATEST


# --- Worker side ------------------------------------------------------------------------


class WorkerMetrics:
    """The worker's series. Created on first use, in the process that records them (after
    any fork), into a private registry: the exporter reads the multiprocess files instead."""

    def __init__(self) -> None:
        registry = CollectorRegistry()
        self.latency = Histogram("cxr_screening_seconds", "Time a worker took to screen one study "
                                 "(read, gate, decode, infer, Grad-CAM, store), by outcome.",
                                 ["status"], buckets=LATENCY_BUCKETS, registry=registry)
        self.batch_size = Histogram("cxr_batch_size", "Studies in the forward pass each screened study was part of.",
                                    buckets=BATCH_BUCKETS, registry=registry)
        self.screened = Counter("cxr_screened", "Studies screened by this worker, by outcome and model version.",
                                ["status", "model_version"], registry=registry)
        self.dicom_outputs = Counter("cxr_dicom_outputs", "DICOM SR + Secondary Capture sets written to "
                                     "CXR_DICOM_OUTBOX, or failed.", ["result"], registry=registry)


@lru_cache(maxsize=1)
def worker_metrics() -> WorkerMetrics:
    return WorkerMetrics()


def record_screening(outcome, *, seconds: float, model_version: str) -> None:
    """Record one screened study (an Outcome of worker.screening.pipeline)."""
    m = worker_metrics()
    m.latency.labels(outcome.status).observe(seconds)
    m.screened.labels(outcome.status, model_version).inc()
    batch = outcome.timings_ms.get("batch_size")
    if outcome.status == "done" and batch:
        m.batch_size.observe(batch)


def enable_multiprocess(folder: Path) -> None:
    """Switch prometheus_client to multiprocess files in ``folder`` (emptied first). Must run
    before any worker metric is created and before the worker forks."""
    if worker_metrics.cache_info().currsize:
        raise RuntimeError("worker metrics were created before multiprocess mode was enabled")
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    # prometheus_client reads its multiprocess folder from this environment variable (here
    # and in every child process); it is set from CXR_HOME, never configured by hand.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(folder)
    prom_values.ValueClass = prom_values.get_value_class()


def start_worker_exporter(settings: Settings) -> Path:
    """Serve the worker's metrics on CXR_WORKER_METRICS_HOST:CXR_WORKER_METRICS_PORT.

    Returns the multiprocess folder, which is removed when the worker exits."""
    from prometheus_client import start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector

    folder = settings.metrics_dir / f"worker-{os.getpid()}"
    enable_multiprocess(folder)
    owner = os.getpid()
    # Forked children inherit atexit handlers: only the worker's main process removes the folder.
    atexit.register(lambda: os.getpid() == owner and shutil.rmtree(folder, ignore_errors=True))
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(folder))
    start_http_server(settings.worker_metrics_port, addr=settings.worker_metrics_host, registry=registry)
    log.info("worker metrics on http://%s:%d/metrics", settings.worker_metrics_host, settings.worker_metrics_port)
    return folder
