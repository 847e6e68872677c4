"""kombu's filesystem transport, with messages written atomically.

The stock transport creates a message file in the queue folder and then writes into it. A
consumer that lists the folder in between moves the still-empty file away, fails to parse it
(JSONDecodeError: Celery stops the worker as an "unrecoverable error") and the message is
lost. Seen here with a few thousand files dropped into the inbox at once. The exchange
table (which queues an exchange routes to) had the same race: it was truncated and rewritten
in place while other processes read it. This transport writes each message, and each new
exchange table, under a temporary name and renames it into place, so a reader sees a whole
file or none. Selected by cxr.queue for ``filesystem://``.
"""

from __future__ import annotations

import os
import threading
import uuid
from functools import cached_property
from pathlib import Path
from time import monotonic, sleep

from kombu.exceptions import ChannelError
from kombu.transport import filesystem, virtual
from kombu.transport.filesystem import LOCK_EX, exchange_queue_t, lock, unlock
from kombu.utils.encoding import str_to_bytes
from kombu.utils.json import dumps

TRANSPORT = "cxr.fs_transport:Transport"


def control_folder_of(options: dict | None) -> str:
    """The absolute control folder (exchange tables) for these transport options: the one
    given, else ``control`` beside the data folder, never kombu's ``control`` in the working
    directory (which left ``control/celery.exchange`` wherever a process happened to run)."""
    options = options or {}
    if options.get("control_folder"):
        return os.path.abspath(options["control_folder"])
    data = options.get("data_folder_in") or options.get("data_folder_out")
    return os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(data)), "control") if data else "control")


class Channel(filesystem.Channel):
    @cached_property
    def control_folder(self) -> Path:
        return Path(control_folder_of(self.transport_options))

    def _put(self, queue, payload, **kwargs):
        """Put ``payload`` onto ``queue``: write ``<name>.tmp``, flush it, rename it to ``<name>``."""
        name = "{}_{}.{}.msg".format(int(round(monotonic() * 1000)), uuid.uuid4(), queue)
        final = os.path.join(self.data_folder_out, name)
        tmp = final + ".tmp"  # "<ms>_<uuid>.<queue>.msg.tmp" never matches a queue's ".msg" suffix
        try:
            with open(tmp, "wb") as f:
                f.write(str_to_bytes(dumps(payload)))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except OSError as exc:
            raise ChannelError(f"Cannot add file {final!r} to directory") from exc


    def _queue_bind(self, exchange, routing_key, pattern, queue):
        """Add a queue to an exchange's table: read, change and replace the table whole, one
        binder at a time (a lock file beside it), so a concurrent get_table never reads half."""
        file = self._exchange_file(exchange)
        self.control_folder.mkdir(parents=True, exist_ok=True)
        queue_val = exchange_queue_t(routing_key or "", pattern or "", queue or "")
        try:
            with open(file.with_name(file.name + ".lock"), "a") as guard:
                lock(guard, LOCK_EX)
                try:
                    queues = filesystem.Channel.get_table(self, exchange)  # as it is: no waiting
                    if queue_val not in queues:
                        queues.insert(0, queue_val)
                        tmp = file.with_name(f"{file.name}.{uuid.uuid4().hex}.tmp")
                        tmp.write_bytes(str_to_bytes(dumps(queues)))
                        os.replace(tmp, file)
                finally:
                    unlock(guard)
        except OSError as exc:
            raise ChannelError(f"Cannot open {file}") from exc


    def get_table(self, exchange):
        """The exchange's table, from its file. Within one process kombu records a binding in
        memory (``state.bindings``) before the first binder has written the file; a publisher
        on another thread that read the file in between found no queue and its message went
        nowhere. So while the file has no table but this process knows of a binding to the
        exchange, look again (for up to two seconds). Exchanges nobody here bound (a
        broadcast with no worker listening) are answered at once."""
        table = super().get_table(exchange)
        deadline = monotonic() + 2.0
        while not table and monotonic() < deadline and any(b[1] == exchange for b in list(self.state.bindings)):
            sleep(0.005)
            table = super().get_table(exchange)
        return table


class Transport(filesystem.Transport):
    """kombu keeps one in-memory record of bindings per process for this transport, whatever
    the folders; a second broker folder in the same process (each test's CXR_HOME) then never
    got its exchange table written. Here the record is kept per control folder."""

    Channel = Channel
    _states: dict[str, virtual.BrokerState] = {}
    _states_lock = threading.Lock()

    def __init__(self, client, **kwargs):
        super().__init__(client, **kwargs)
        folder = control_folder_of(client.transport_options)
        with self._states_lock:
            self.state = self._states.setdefault(folder, virtual.BrokerState())
