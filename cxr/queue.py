"""The Celery application object, configured from settings. No task code and no torch here,
so the API can enqueue by task name without importing the model."""

from __future__ import annotations

from functools import lru_cache

from celery import Celery

from cxr.fs_transport import TRANSPORT as FS_TRANSPORT
from cxr.settings import Settings, get_settings

SCREEN_TASK = "cxr.screen_study"
CALLBACK_TASK = "cxr.job_callback"

# Task priorities. On Redis, kombu keeps one list per priority step (0, 3, 6, 9) and a
# worker always takes from the lowest number first: 0 is served first. Interactive calls
# (POST /predict*) use PRIORITY_HIGH; batch intake (POST /jobs, the watcher) PRIORITY_BATCH.
# The filesystem transport has no priorities: there every task is first in, first out.
PRIORITY_HIGH = 0
PRIORITY_BATCH = 6


def make_celery(settings: Settings) -> Celery:
    app = Celery("cxr", broker=settings.broker_url)
    conf: dict = dict(
        task_default_queue=settings.queue,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        broker_connection_timeout=5,
        # Callbacks have their own queue, served by each worker's callback process (worker/callbacks.py):
        # a slow receiver never takes a screening slot.
        task_routes={CALLBACK_TASK: {"queue": settings.callback_queue}},
    )
    if settings.uses_filesystem_broker:
        settings.ensure_dirs()
        queue_dir = str(settings.broker_dir / "queue")
        conf["broker_transport"] = FS_TRANSPORT  # kombu's, with atomic writes (see cxr/fs_transport.py)
        conf["broker_transport_options"] = {
            "data_folder_in": queue_dir,
            "data_folder_out": queue_dir,
            "processed_folder": str(settings.broker_dir / "processed"),
            "control_folder": str(settings.broker_dir / "control"),
            "store_processed": False,
            "polling_interval": settings.broker_poll_seconds,
        }
    elif settings.broker_url.startswith(("redis://", "rediss://")):
        # Redis redelivers a task nobody acknowledged after visibility_timeout (CXR_VISIBILITY_TIMEOUT_SECONDS,
        # default 2 h): keep it well above the longest batch. A dead worker's studies do not wait for it:
        # their leases expire and the reaper re-queues them (README, "What happens when…").
        conf["broker_transport_options"] = {"visibility_timeout": settings.visibility_timeout_seconds}
    app.conf.update(conf)
    return app


@lru_cache
def get_celery() -> Celery:
    return make_celery(get_settings())


def enqueue_study(app: Celery, study_id: str, *, priority: int = PRIORITY_BATCH) -> None:
    """Publish a study's screening task. An interactive one (PRIORITY_HIGH: someone waits on
    POST /predict) asks the worker to store its scores before drawing the heatmap; batch work
    saves that extra database write."""
    interactive = priority <= PRIORITY_HIGH
    app.send_task(SCREEN_TASK, args=[study_id], kwargs={"scores_first": True} if interactive else None,
                  priority=priority)


def queue_depth(app: Celery, queue: str) -> int:
    """Tasks waiting in the broker queue (not counting those a worker has already taken).
    A queue the broker does not know (a Redis restarted empty) holds nothing: 0."""
    from kombu.exceptions import ChannelError

    with app.connection_for_write() as conn:
        try:
            return conn.default_channel.queue_declare(queue=queue, passive=True).message_count
        except ChannelError as e:
            if str(getattr(e, "reply_code", "")) == "404":
                return 0
            raise


def callback_publish_grace(settings: Settings) -> float:
    """How long a published callback task may take to start before the reaper publishes it again (s)."""
    return max(30.0, 3 * settings.callback_deadline_seconds)


def enqueue_callback(app: Celery, job_id: str) -> None:
    """Publish a job's callback task (to CXR_CALLBACK_QUEUE, through task_routes)."""
    app.send_task(CALLBACK_TASK, args=[job_id], priority=PRIORITY_HIGH)


def fire_callbacks(app: Celery, database_url: str, *, study_id=None, job_id=None) -> list:
    """Enqueue the callback of every job that this study (or this job; or, with neither, any
    job) just completed. The job row is the outbox: it is `sending` before the task is
    published, so a task lost on the way is published again by the reaper. Returns the job ids."""
    from cxr.db import repo
    from cxr.db.session import session_scope

    with session_scope(database_url) as session:
        jobs = repo.claim_complete_callbacks(session, study_id=study_id, job_id=job_id,
                                             publish_grace_seconds=callback_publish_grace(get_settings()))
    for jid in jobs:
        enqueue_callback(app, str(jid))
    return jobs
