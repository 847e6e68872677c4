"""Job callbacks: delivered at least once, off the screening path, never into the internal network.

- **Their own queue and pool.** The callback task is routed to ``CXR_CALLBACK_QUEUE``
  (``cxr.queue.make_celery``). Each ``cxr worker`` starts one callback process
  (:func:`start_callback_process`): a Celery worker with a threads pool of
  ``CXR_CALLBACK_CONCURRENCY`` on that queue only, so receivers that answer slowly occupy
  callback threads, never screening ones. It dies with its ``cxr worker`` (PR_SET_PDEATHSIG)
  and answers no remote control (so ``/health`` counts screening workers only).
- **One deadline per attempt** and the address policy of :mod:`cxr.callbacks`.
- **Retries are Celery's** (``autoretry_for``, ``retry_backoff``, ``retry_backoff_max``,
  ``retry_jitter``, ``max_retries``); the count of attempts is kept on the job row
  (``callback_attempts``, shown by GET /jobs/{id}), which decides when to give up.
- **Survives worker death.** The job row is an outbox with a lease: each attempt leases the
  delivery for its deadline plus the longest wait before its retry. A worker killed mid-attempt
  or while its retry waits (the retry's message dies with it) stops nothing for good: once the
  lease runs out the reaper publishes the task again (``cxr.reaper``).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import uuid

from cxr.callbacks import AllowList, AttemptFailed, CallbackRefused, post_json
from cxr.db import repo
from cxr.db.session import session_scope
from cxr.queue import CALLBACK_TASK, get_celery
from cxr.settings import Settings, get_settings

log = logging.getLogger(__name__)
app = get_celery()
_settings = get_settings()
# Slack on top of an attempt's deadline and backoff before its lease may be taken over.
LEASE_SLACK_SECONDS = 5.0
BACKOFF_FACTOR = int(max(1.0, _settings.callback_backoff_seconds))  # Celery's retry_backoff is whole seconds


def longest_wait(retries: int, settings: Settings) -> float:
    """The longest countdown Celery's retry_backoff can pick before retry number ``retries + 1``
    (full jitter picks at random up to this), seconds."""
    return float(min(int(settings.callback_backoff_max_seconds), BACKOFF_FACTOR * 2 ** retries))


@app.task(name=CALLBACK_TASK, bind=True, acks_late=True, ignore_result=True,
          autoretry_for=(AttemptFailed,), retry_backoff=BACKOFF_FACTOR,
          retry_backoff_max=int(_settings.callback_backoff_max_seconds), retry_jitter=True,
          max_retries=_settings.callback_retries)
def job_callback(self, job_id: str) -> str:
    """POST a finished job's report (the body of GET /jobs/{id}, plus ``event``) to its callback URL.

    Returns 'sent', 'failed' (retries spent), 'refused' (the address is not allowed: not
    retried) or 'not-claimable' (delivered already, or another live task holds it). Raises
    AttemptFailed to have Celery retry with backoff."""
    settings = get_settings()
    jid = uuid.UUID(job_id)
    holder = self.request.id or f"local-{uuid.uuid4()}"
    lease = settings.callback_deadline_seconds + longest_wait(self.request.retries, settings) + LEASE_SLACK_SECONDS
    with session_scope(settings.database_url) as session:
        attempt = repo.begin_callback_attempt(session, job_id=jid, holder=holder, lease_seconds=lease)
    if attempt is None:
        log.info("job %s callback: already delivered, given up, or held by another task", job_id)
        return "not-claimable"
    body = {"event": "job.completed", **attempt.report}
    try:
        post_json(attempt.url, body, allow=AllowList.parse(settings.callback_allow),
                  deadline_seconds=settings.callback_deadline_seconds)
    except CallbackRefused as e:
        log.warning("job %s callback refused on attempt %d: %s", job_id, attempt.attempt, e)
        with session_scope(settings.database_url) as session:
            repo.finish_callback(session, job_id=jid, state="failed", error=str(e), holder=holder)
        return "refused"
    except AttemptFailed as e:
        if attempt.attempt > settings.callback_retries:
            log.error("job %s callback failed after %d attempts (%s); giving up", job_id, attempt.attempt, e.reason)
            with session_scope(settings.database_url) as session:
                repo.finish_callback(session, job_id=jid, state="failed", error=e.reason, holder=holder)
            return "failed"
        log.warning("job %s callback attempt %d failed (%s); Celery retries it with backoff", job_id,
                    attempt.attempt, e.reason)
        with session_scope(settings.database_url) as session:
            repo.callback_attempt_failed(session, job_id=jid, holder=holder, error=e.reason)
        raise
    with session_scope(settings.database_url) as session:
        repo.finish_callback(session, job_id=jid, state="sent", holder=holder)
    log.info("job %s callback delivered on attempt %d", job_id, attempt.attempt)
    return "sent"


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """PR_SET_PDEATHSIG (prctl(2)): SIGTERM this process when the parent dies, even by SIGKILL."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)
    except OSError:
        pass


def start_callback_process(settings: Settings) -> subprocess.Popen | None:
    """Start this worker's callback process (:func:`main`), in the same
    process group, dying with its parent. None when CXR_CALLBACK_CONCURRENCY is 0."""
    if settings.callback_concurrency == 0:
        return None
    env = {**os.environ, "CXR_CALLBACK_PARENT": str(os.getpid())}
    preexec = _die_with_parent if sys.platform.startswith("linux") else None
    return subprocess.Popen([sys.executable, "-c", "from worker.callbacks import main; main()"], env=env,
                            preexec_fn=preexec)


def main() -> None:
    """The callback process: a Celery worker on CXR_CALLBACK_QUEUE with a threads pool."""
    from cxr.logsafe import configure_logging

    settings = get_settings()
    configure_logging(settings.log_level)
    app.conf.worker_enable_remote_control = False  # not a screening worker: /health's ping does not count it
    # Celery's "<name> ready." line would read, in the shared log, as the screening worker being ready.
    logging.getLogger("celery.apps.worker").addFilter(lambda r: "ready." not in r.getMessage())
    from celery.signals import worker_ready

    worker_ready.connect(lambda **_: log.info("callback process consuming %s", settings.callback_queue), weak=False)
    parent = os.environ.get("CXR_CALLBACK_PARENT", str(os.getpid()))
    log.info("callback process for worker %s: queue %s, %d threads", parent, settings.callback_queue,
             settings.callback_concurrency)
    app.worker_main(["worker", f"--loglevel={settings.log_level}", "-Q", settings.callback_queue,
                     f"--concurrency={max(1, settings.callback_concurrency)}", "--pool=threads",
                     "-n", f"cxr-callbacks-{parent}-{os.getpid()}@%h", "--without-gossip", "--without-mingle",
                     "--without-heartbeat"])
