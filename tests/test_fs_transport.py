"""The embedded broker (kombu's filesystem transport as cxr uses it) never shows a consumer
half a message: the stock transport creates the file, then writes it, and a worker that
picked the empty file up stopped with "Unrecoverable error: JSONDecodeError" (seen in a
5,000-file soak). A reader here looks at every message file as soon as it appears."""

from __future__ import annotations

import json
import os
import threading

from kombu import Connection

from cxr.fs_transport import TRANSPORT
from cxr.queue import make_celery
from cxr.settings import Settings


def test_celery_app_uses_the_atomic_transport_for_filesystem_urls(tmp_path):
    app = make_celery(Settings(_env_file=None, home=tmp_path))
    with app.connection_for_write() as conn:
        assert type(conn.transport).__module__ == "cxr.fs_transport"


def test_message_and_exchange_files_are_never_seen_half_written(tmp_path):
    folder, control = tmp_path / "q", tmp_path / "control"
    folder.mkdir()
    opts = {"data_folder_in": str(folder), "data_folder_out": str(folder), "control_folder": str(control)}
    stop, complete, partial, errors = threading.Event(), set(), [], []

    def watch() -> None:
        while not stop.is_set():
            for name in os.listdir(folder):
                if name.endswith(".msg") and name not in complete:
                    try:
                        data = (folder / name).read_bytes()
                    except FileNotFoundError:
                        continue
                    try:
                        json.loads(data)
                        complete.add(name)
                    except ValueError:
                        partial.append(name)

    def produce() -> None:
        try:  # each producer binds the queue itself: the exchange table is written concurrently
            with Connection("filesystem://", transport=TRANSPORT, transport_options=opts) as c:
                q = c.SimpleQueue("cxr")
                for i in range(1000):
                    q.put({"i": i, "pad": "x" * 20000})
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(repr(e))

    reader = threading.Thread(target=watch)
    reader.start()
    producers = [threading.Thread(target=produce) for _ in range(3)]
    for t in producers:
        t.start()
    for t in producers:
        t.join()
    stop.set()
    reader.join()
    assert errors == [] and partial == []
    assert len([n for n in os.listdir(folder) if n.endswith(".msg")]) == 3000  # none routed nowhere
    with Connection("filesystem://", transport=TRANSPORT, transport_options=opts) as c:
        q = c.SimpleQueue("cxr")
        got = 0
        while True:
            try:
                q.get(timeout=1).ack()
            except q.Empty:
                break
            got += 1
    assert got == 3000


def test_interactive_tasks_ask_for_scores_first_and_batch_tasks_do_not(tmp_path):
    """POST /predict (high priority) asks the worker to store scores before the heatmap;
    batch intake (watcher, jobs) skips that extra write. Read back from the real queue files."""
    import base64

    from cxr.queue import PRIORITY_BATCH, PRIORITY_HIGH, enqueue_study

    settings = Settings(_env_file=None, home=tmp_path)
    app = make_celery(settings)
    enqueue_study(app, "11111111-1111-1111-1111-111111111111", priority=PRIORITY_HIGH)
    enqueue_study(app, "22222222-2222-2222-2222-222222222222", priority=PRIORITY_BATCH)
    bodies = {}
    for f in (settings.broker_dir / "queue").glob("*.msg"):
        msg = json.loads(f.read_bytes())
        args, kwargs, _ = json.loads(base64.b64decode(msg["body"]))
        bodies[args[0][0]] = kwargs
    assert bodies == {"1": {"scores_first": True}, "2": {}}


def test_exchange_tables_never_land_in_the_working_directory(tmp_path, monkeypatch):
    """Options without a control folder (a Celery app made by hand, as some tests and scripts
    do) keep the exchange table beside the data folder, not in ``./control`` wherever the
    process runs (that is how ``control/celery.exchange`` got committed at the repo root)."""
    from kombu import Exchange, Queue

    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    folder = tmp_path / "broker" / "queue"
    folder.mkdir(parents=True)
    opts = {"data_folder_in": str(folder), "data_folder_out": str(folder)}
    with Connection(transport=TRANSPORT, transport_options=opts) as conn:
        queue = Queue("q", Exchange("celery", type="direct"), routing_key="q")
        with conn.Producer() as producer:
            producer.publish({"x": 1}, exchange=queue.exchange, routing_key="q", declare=[queue])
    assert not (work / "control").exists()
    assert (tmp_path / "broker" / "control" / "celery.exchange").exists()
