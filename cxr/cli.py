"""The ``cxr`` command line. Every command has --help.

Screening aid, not for clinical use.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from typer.core import TyperGroup

from cxr import DISCLAIMER
from cxr.settings import get_settings


class Commands(TyperGroup):
    """The ``cxr`` command group. Operational database errors (no database yet, a schema at
    another revision or being migrated, a server that cannot be reached) end every command
    here, in one place: one red sentence saying what to run (``cxr.db.session.database_problem``,
    passwords hidden), exit code 2, no traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except Exception as e:
            from sqlalchemy.exc import SQLAlchemyError

            if not isinstance(e, SQLAlchemyError):
                raise
            from cxr.db.session import database_problem

            problem = database_problem(get_settings().database_url, e)
            if problem is None:
                raise
            typer.secho(str(problem), err=True, fg=typer.colors.RED)
            raise typer.Exit(2) from None


app = typer.Typer(
    cls=Commands,
    help="cxr-screen: batch screening of chest radiographs (Normal / Pneumonia / Tuberculosis) "
    "with Grad-CAM heatmaps. " + DISCLAIMER,
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="markdown",
)
db_app = typer.Typer(help="Database schema management (Alembic).", no_args_is_help=True, rich_markup_mode="markdown")
app.add_typer(db_app, name="db")
model_app = typer.Typer(help="Model versions: which bundle the workers use.", no_args_is_help=True,
                        rich_markup_mode="markdown")
app.add_typer(model_app, name="model")
apikey_app = typer.Typer(help="API keys stored (hashed) in the database.", no_args_is_help=True,
                         rich_markup_mode="markdown")
app.add_typer(apikey_app, name="apikey")
report_app = typer.Typer(help="Reports for people: the summary of screening activity.", no_args_is_help=True,
                         rich_markup_mode="markdown")
app.add_typer(report_app, name="report")

study_app = typer.Typer(help="One study and its history.", no_args_is_help=True, rich_markup_mode="markdown")
app.add_typer(study_app, name="study")
log = logging.getLogger("cxr")


class Format(str, Enum):
    table = "table"
    csv = "csv"
    json = "json"


@app.callback()
def main(
    log_level: Annotated[Optional[str], typer.Option(help="Log level (default CXR_LOG_LEVEL or INFO).")] = None,
) -> None:
    level = (log_level or get_settings().log_level).upper()
    from cxr.logsafe import configure_logging

    configure_logging(level)  # every record redacted as it is made (cxr/logsafe.py)
    if log_level:
        os.environ["CXR_LOG_LEVEL"] = level


def fail(message: str, code: int = 2) -> typer.Exit:
    typer.secho(message, err=True, fg=typer.colors.RED)
    return typer.Exit(code)


def require_bundle(checkpoint: Path | None = None, *, use_registry: bool = True) -> Path:
    """The bundle to use, validated (metadata only), or exit with instructions.

    Order: --checkpoint, CXR_CHECKPOINT, the version activated in the database (unless
    use_registry is False, as for `cxr predict`), the shipped models/cxr-default.safetensors."""
    from cxr.bundle import NO_BUNDLE_HELP, BundleError, read_meta
    from cxr.registry import resolve_bundle

    settings = get_settings()
    # A database that is missing, unreachable or not migrated ends the command in Commands.invoke.
    path = checkpoint.resolve() if checkpoint else resolve_bundle(settings, use_registry=use_registry)
    if path is None:
        raise fail(NO_BUNDLE_HELP)
    try:
        read_meta(path)
    except BundleError as e:
        hint = f"\n{NO_BUNDLE_HELP}" if not path.exists() else ""
        raise fail(f"cannot use model bundle: {e}{hint}")
    return path


@db_app.command("upgrade")
def db_upgrade(revision: Annotated[str, typer.Argument(help="Target revision.")] = "head") -> None:
    """Apply Alembic migrations up to REVISION (default: head) on CXR_DATABASE_URL."""
    from cxr.db.migrate import upgrade

    settings = get_settings()
    settings.ensure_dirs()
    upgrade(settings.database_url, revision)
    typer.echo(f"database at revision {revision}")


def gpu_children(spec: str, visible: int) -> list[str]:
    """``--gpus`` -> the CUDA_VISIBLE_DEVICES value of each worker process to start.

    ``all`` is every visible GPU; otherwise a comma-separated list of GPU indices."""
    if visible <= 0:
        raise ValueError("--gpus: no CUDA GPU is visible here (check nvidia-smi and CUDA_VISIBLE_DEVICES); "
                         "run `cxr worker` without --gpus to use the CPU")
    if spec.strip().lower() == "all":
        return [str(i) for i in range(visible)]
    try:
        wanted = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--gpus takes 'all' or GPU indices such as 0,1; got {spec!r}") from None
    bad = [i for i in wanted if not 0 <= i < visible]
    if not wanted or bad:
        raise ValueError(f"--gpus {spec}: {visible} GPU(s) visible, numbered 0-{visible - 1}")
    return [str(i) for i in dict.fromkeys(wanted)]


RESTART_FIRST_DELAY = 1.0  # seconds before a child that exited is started again; doubles while it keeps failing
RESTART_MAX_DELAY = 60.0
RESTART_STABLE_SECONDS = 30.0  # a child that ran this long before exiting starts again after RESTART_FIRST_DELAY
RESTART_GIVE_UP = 5  # consecutive exits, each within RESTART_STABLE_SECONDS of its start: stop everything


class _Child:
    """One supervised process: its command, environment, and restart history."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        self.name, self.argv, self.env = name, argv, env
        self.proc: subprocess.Popen | None = None
        self.started = 0.0
        self.quick_exits = 0  # consecutive exits soon after a start
        self.restart_at: float | None = None

    def start(self) -> None:
        # Its own session (process group): a Ctrl-C on the terminal reaches only `cxr up`,
        # which stops the children in order, and SIGKILL can take a child's own children too.
        self.proc = subprocess.Popen(self.argv, env=self.env, start_new_session=True)
        self.started = time.monotonic()
        self.restart_at = None
        log.info("started %s (pid %d)", self.name, self.proc.pid)

    def kill_group(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:  # already gone
            pass


def _exit_text(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _supervise(children: list[_Child], stop: threading.Event, *, grace_seconds: float) -> None:
    """Start the children and keep them running until a signal sets ``stop``.

    A child that exits by itself (crash, OOM kill) is started again after a delay that
    starts at RESTART_FIRST_DELAY and doubles (up to RESTART_MAX_DELAY) while it keeps
    exiting within RESTART_STABLE_SECONDS of its start; the others keep running. After
    RESTART_GIVE_UP such exits in a row (it cannot start: a configuration error, a port in
    use) everything is stopped and this exits 1.

    Stopping: SIGTERM to each child (a worker finishes its batch first), then SIGKILL to the
    process group of each one still running ``grace_seconds`` later, logged. Exits 0 when
    every child stopped by itself, 1 when one had to be killed or kept failing."""
    for child in children:
        child.start()
    failed = None
    while not stop.is_set() and failed is None:
        now = time.monotonic()
        for child in children:
            if child.restart_at is not None:
                if now >= child.restart_at:
                    child.start()
                continue
            code = child.proc.poll()
            if code is None:
                continue
            ran = now - child.started
            child.kill_group()  # what it left behind (a prefork worker's pool processes)
            child.quick_exits = child.quick_exits + 1 if ran < RESTART_STABLE_SECONDS else 1
            if child.quick_exits >= RESTART_GIVE_UP:
                log.error("%s (pid %d) %s, %d times in a row within %.0f s of starting; stopping everything",
                          child.name, child.proc.pid, _exit_text(code), child.quick_exits, RESTART_STABLE_SECONDS)
                failed = child
                break
            delay = min(RESTART_MAX_DELAY, RESTART_FIRST_DELAY * 2 ** (child.quick_exits - 1))
            log.error("%s (pid %d) %s after %.0f s; starting it again in %.0f s", child.name, child.proc.pid,
                      _exit_text(code), ran, delay)
            child.restart_at = now + delay
        stop.wait(0.2)
    running = [c for c in children if c.restart_at is None and c.proc.poll() is None]
    for child in running:
        child.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_seconds
    killed = False
    for child in running:
        try:
            child.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("%s (pid %d) did not stop within %g s of SIGTERM; killing it (SIGKILL)", child.name,
                        child.proc.pid, grace_seconds)
            child.kill_group()
            killed = True
            try:
                child.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                log.error("%s (pid %d) is still there 10 s after SIGKILL (stuck in the kernel?)", child.name,
                          child.proc.pid)
    raise typer.Exit(1 if failed is not None or killed else 0)


def _run_gpu_workers(spec: str) -> None:
    """One `cxr worker` process per GPU, each seeing only its own (CUDA_VISIBLE_DEVICES), so no
    process ever shares a CUDA context or creates one before a fork. Stops them all on
    SIGINT/SIGTERM; one that exits by itself is started again (see _supervise)."""
    import torch  # only counts the devices (NVML); the children are new processes, not forks

    try:
        devices = gpu_children(spec, torch.cuda.device_count())
    except ValueError as e:
        raise fail(str(e)) from None
    settings = get_settings()
    children = []
    for n, dev in enumerate(devices):
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": dev, "CXR_DEVICE": "cuda"}
        if settings.worker_metrics_port is not None:  # one exporter per process: consecutive ports
            env["CXR_WORKER_METRICS_PORT"] = str(settings.worker_metrics_port + n)
        children.append(_Child(f"the worker on GPU {dev}", [sys.executable, "-m", "cxr", "worker"], env))
    _supervise(children, _stop_on_signals(), grace_seconds=settings.stop_grace_seconds)


@app.command()
def worker(
    concurrency: Annotated[int, typer.Option(help="Worker processes (prefork, no micro-batching). 1: one process "
                                                  "that micro-batches CXR_MAX_BATCH studies (threads pool).")] = 1,
    gpus: Annotated[Optional[str], typer.Option(
        help="Start one worker process per GPU: 'all', or indices such as 0,1. Each sees only its own GPU.")] = None,
) -> None:
    """Run a Celery worker that screens queued studies.

    The model bundle is loaded once per worker process, after any fork. By default one
    process takes CXR_MAX_BATCH studies at once (16 on the CPU, 64 on CUDA; threads pool):
    each is decoded in its own thread and their forward passes are batched together, while
    heatmaps are drawn and written in the threads that screened them.

    Start as many workers, on as many hosts, as you like: they share the database
    (CXR_DATABASE_URL), the broker (CXR_BROKER_URL) and the store (CXR_HOME).
    """
    require_bundle()
    settings = get_settings()
    settings.ensure_dirs()
    if gpus is not None:
        _run_gpu_workers(gpus)
        return
    if settings.worker_metrics_port is not None:  # before the tasks module, and before any fork
        from cxr.metrics import start_worker_exporter

        try:
            start_worker_exporter(settings)
        except OSError as e:
            raise fail(f"cannot serve worker metrics on {settings.worker_metrics_host}:{settings.worker_metrics_port} "
                       f"({e.strerror}): give each worker on a host its own CXR_WORKER_METRICS_PORT") from e
    from worker.tasks import app as celery_app

    if concurrency > 1:
        if not settings.max_batch_is_default and settings.max_batch > 1:
            raise fail("CXR_MAX_BATCH > 1 runs one process with a threads pool; start more `cxr worker` "
                       "processes instead of --concurrency, or set CXR_MAX_BATCH=1")
        settings.max_batch = 1  # prefork children inherit this process's settings
        pool = "prefork"
    elif settings.max_batch > 1:
        pool, concurrency = "threads", settings.max_batch
    else:
        pool = "solo"
    from worker.callbacks import start_callback_process

    start_callback_process(settings)  # callbacks: their own queue and process, off the screening pool
    _run_celery_worker(celery_app, [
        "worker", f"--loglevel={settings.log_level}", "-Q", settings.queue, f"--concurrency={concurrency}",
        f"--pool={pool}", "-n", f"cxr-{os.getpid()}@%h", "--without-gossip", "--without-mingle",
    ])


def _run_celery_worker(celery_app, argv: list[str]) -> None:
    """Run the Celery worker. If it stops by itself after it was ready, nobody having asked it
    to (no SIGTERM, SIGINT or SIGQUIT, no remote ``shutdown`` command), it is started again in
    this same process (same pid, so a supervisor sees no exit) after logging why: a screening
    worker should not stay down because its broker went away in an unlucky way. A worker
    that fails before it is ready exits, so a configuration error still fails at once."""
    from celery.signals import worker_ready, worker_shutting_down
    from celery.worker.control import Panel

    state: dict[str, object] = {"ready": False, "asked": None}
    worker_ready.connect(lambda **_: state.update(ready=True), weak=False)
    worker_shutting_down.connect(lambda sig=None, **_: state.update(asked=sig or "a signal"), weak=False)
    remote = Panel.data["shutdown"]

    def shutdown(panel_state, **kwargs):  # `celery control shutdown`: asked, remotely
        state.update(asked="a remote shutdown command")
        return remote(panel_state, **kwargs)

    Panel.data["shutdown"] = shutdown
    try:
        celery_app.worker_main(argv)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    if state["ready"] and state["asked"] is None:
        log.error("the Celery worker stopped by itself (exit code %s) without being asked to; starting it again "
                  "in 2 s", code)
        time.sleep(2)
        os.execv(sys.executable, [sys.executable, "-m", "cxr", *sys.argv[1:]])
    raise SystemExit(code)


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return stop


@app.command()
def watch(
    inbox: Annotated[Optional[Path], typer.Option(help="Folder to watch (default CXR_INBOX, ./inbox).")] = None,
) -> None:
    """Watch a folder: every PNG, JPEG or DICOM file dropped in becomes a queued study.

    A file is taken in once its writer has closed it and it stopped changing
    (CXR_WATCH_SETTLE_SECONDS; CXR_WATCH_QUIET_SECONDS when no close was seen), and only
    if its content is not cut short; temporary names (.part, .filepart, .tmp, dot-files,
    CXR_WATCH_IGNORE) and anything but regular files are ignored. It is removed from the
    inbox only after it is stored and its study row is committed; files that must be kept
    go to the errors folder with a reason (README "What happens when…").
    """
    from cxr.queue import get_celery
    from worker.watcher import InboxWatcher

    settings = get_settings()
    settings.ensure_dirs()
    InboxWatcher(settings, get_celery(), inbox=inbox).run(_stop_on_signals())


API_SHUTDOWN_SECONDS = 10


@app.command()
def api(
    host: Annotated[str, typer.Option(help="Bind address.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8000,
) -> None:
    """Run the HTTP intake API under uvicorn (docs at /docs).

    With no API key ever configured (CXR_API_KEYS or `cxr apikey create`) the API is open
    to anyone who can reach it: it binds to 127.0.0.1 by default, and says so. CXR_AUTH
    overrides that decision (README "Security and limits").

    On SIGTERM/SIGINT it stops taking connections and gives requests in flight
    API_SHUTDOWN_SECONDS to finish (a /predict may be waiting for the worker), then exits."""
    import uvicorn

    settings = get_settings()
    settings.ensure_dirs()
    _warn_if_open(settings, host)
    uvicorn.run("api.main:app", host=host, port=port, log_level=settings.log_level.lower(),
                timeout_graceful_shutdown=API_SHUTDOWN_SECONDS)


@app.command()
def up(
    inbox: Annotated[Optional[Path], typer.Option(help="Folder to watch (default CXR_INBOX, ./inbox).")] = None,
    port: Annotated[int, typer.Option(help="API port.")] = 8000,
    host: Annotated[str, typer.Option(help="API bind address.")] = "127.0.0.1",
    concurrency: Annotated[int, typer.Option(help="Worker processes.")] = 1,
) -> None:
    """Everything on one machine: migrate, then run the API, the watcher and a worker.

    With no configuration this uses SQLite and a serverless (filesystem) Celery transport
    under CXR_HOME (./var). A child that exits by itself (a worker killed for memory) is
    started again, with a growing delay while it keeps failing; the others keep running.
    Ctrl-C stops all three: SIGTERM, then SIGKILL for any still running after
    CXR_STOP_GRACE_SECONDS (logged; `cxr up` then exits 1).
    """
    settings = get_settings()
    if inbox is not None:
        settings.inbox = inbox.resolve()
    settings.ensure_dirs()
    db_upgrade("head")
    require_bundle()
    env = {**os.environ, "CXR_HOME": str(settings.home), "CXR_INBOX": str(settings.inbox),
           "CXR_DATABASE_URL": settings.database_url, "CXR_BROKER_URL": settings.broker_url}
    base = [sys.executable, "-m", "cxr"]
    children = [
        _Child("worker", base + ["worker", "--concurrency", str(concurrency)], env),
        _Child("watcher", base + ["watch"], env),
        _Child("api", base + ["api", "--host", host, "--port", str(port)], env),
    ]
    typer.echo(f"cxr up: API http://{host}:{port}/docs, inbox {settings.inbox}, data {settings.home}", err=True)
    typer.echo(DISCLAIMER, err=True)
    _supervise(children, _stop_on_signals(), grace_seconds=settings.stop_grace_seconds)


def _warn_if_open(settings, host: str) -> None:
    """Log a warning when the API will be open: CXR_AUTH=open, or no key ever configured
    (and CXR_AUTH unset); and when CXR_AUTH=required while no key exists (all 401)."""
    from sqlalchemy.exc import SQLAlchemyError

    from cxr.db import repo
    from cxr.db.session import database_problem, session_scope

    where = "" if host in ("127.0.0.1", "localhost", "::1") else "; it is bound to a non-loopback address"
    if settings.auth == "open":
        log.warning("CXR_AUTH=open: the API on %s needs no key and is open to anyone who can reach it%s", host, where)
        return
    if settings.api_keys:
        return
    try:
        with session_scope(settings.database_url) as session:
            if repo.api_key_status(session, key_sha256=None)[0]:
                return  # keys were created (revoked ones count): required
    except SQLAlchemyError as e:  # the API starts all the same; its routes answer 503 with this sentence
        log.warning("cannot read API keys from the database: %s", database_problem(settings.database_url, e) or
                    type(e).__name__)
    if settings.auth == "required":
        log.warning("CXR_AUTH=required but no API key exists: every request except /health and /metrics gets 401 "
                    "until one is created (`cxr apikey create`) or set (CXR_API_KEYS)")
        return
    log.warning("no API key is configured (CXR_API_KEYS or `cxr apikey create`): the API on %s is open to anyone "
                "who can reach it%s", host, where)


def iter_inputs(paths: list[Path]) -> list[Path]:
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
        else:
            files.append(p)
    return files


def predict_rows(screener, files: list[Path], *, heatmaps: Path | None = None, workers: int = 1) -> list[dict]:
    """Screen files in-process, ``workers`` at a time (their forward passes share batches), in
    the order given. A file that cannot be read becomes a 'rejected' row; nothing raises."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    def one(item: tuple[int, Path]) -> dict:
        i, f = item
        try:
            data = f.read_bytes()
        except OSError as e:
            return {"path": str(f), "status": "rejected", "reject_code": "unreadable", "predicted_class": None,
                    "probabilities": None, "flagged": None, "uncertain": None, "uncertainty": None,
                    "ood_score": None, "heatmap_path": None,
                    "error": f"unreadable: the file cannot be read ({e.strerror})"}
        heat = heatmaps / f"{i:05d}-{f.stem}.jpg" if heatmaps else None
        out = screener.screen(data, heatmap_to=heat)
        return {"path": str(f), "status": out.status, "reject_code": out.reject_code,
                "predicted_class": out.predicted_class, "probabilities": out.probabilities,
                "flagged": out.flagged, "uncertain": out.uncertain, "uncertainty": out.uncertainty,
                "ood_score": out.ood_score, "heatmap_path": out.heatmap_path, "error": out.error,
                "notes": "; ".join(out.notes) or None}

    with ThreadPoolExecutor(max(1, workers)) as pool:
        return list(tqdm(pool.map(one, enumerate(files)), total=len(files), desc="screening", unit="file",
                         disable=len(files) < 5, file=sys.stderr))


@app.command()
def predict(
    paths: Annotated[list[Path], typer.Argument(help="Files or folders (searched recursively).")],
    format: Annotated[Format, typer.Option("--format", "-f", help="Output format.")] = Format.table,
    checkpoint: Annotated[Optional[Path], typer.Option(help="Model bundle (default CXR_CHECKPOINT).")] = None,
    heatmaps: Annotated[Optional[Path], typer.Option(
        help="Also write Grad-CAM heatmaps into this folder: NNNNN-name.jpg (overlay) and .cam.png (map alone).")] = None,
) -> None:
    """Score files directly, in-process: no database, no broker, no services.

    Uses exactly the decode, quality gate, preprocess and infer code the worker uses. A file
    that cannot be read or fails the gate gets status 'rejected' (or 'failed' when this
    installation lacks a codec), a stable reject_code and a reason; it never stops the run.
    Exits non-zero only when nothing could be scored.
    """

    from cxr.output import render
    from worker.screening.model import load_bundle
    from worker.screening.pipeline import Screener
    from worker.service import screen_options

    settings = get_settings()
    bundle = require_bundle(checkpoint, use_registry=False)
    import torch

    torch.set_num_threads(settings.torch_threads)
    screener = Screener(load_bundle(bundle, device=settings.device), screen_options(settings))
    files = iter_inputs(paths)
    rows = predict_rows(screener, files, heatmaps=heatmaps, workers=settings.max_batch)
    typer.echo(render(rows, fmt=format.value, columns=(
        "path", "status", "predicted_class", "flagged", "uncertain", "probabilities", "reject_code", "error",
        "notes")))
    typer.echo(DISCLAIMER, err=True)
    if not any(r["status"] == "done" for r in rows):
        raise typer.Exit(1)


@app.command()
def submit(
    paths: Annotated[list[Path], typer.Argument(help="Files or folders (searched recursively), or zip files.")],
    wait: Annotated[bool, typer.Option("--wait", help="Wait until every study is finished and print the results.")] = False,
    url: Annotated[Optional[str], typer.Option(help="API base URL (default CXR_API_URL).")] = None,
    per_request: Annotated[int, typer.Option(min=1, help="Files per POST /jobs request.")] = 16,
    timeout: Annotated[float, typer.Option(help="With --wait: give up after this many seconds.")] = 3600,
    format: Annotated[Format, typer.Option("--format", "-f", help="Output format.")] = Format.table,
) -> None:
    """Send files to a running API (POST /jobs) and print the study ids; with --wait, poll
    until they are finished and print the results. The key is CXR_API_KEY."""
    import httpx
    from tqdm import tqdm

    from cxr.output import render

    settings = get_settings()
    base = (url or settings.api_url).rstrip("/")
    headers = {"X-API-Key": settings.api_key.get_secret_value()} if settings.api_key else {}
    files = iter_inputs(paths)
    if not files:
        raise fail("no files to send")
    jobs: list[str] = []
    rows: list[dict] = []
    with httpx.Client(base_url=base, headers=headers, timeout=httpx.Timeout(30, write=300, read=300)) as client:
        with tqdm(total=len(files), desc="uploading", unit="file", file=sys.stderr, disable=len(files) < 2) as bar:
            for start in range(0, len(files), per_request):
                chunk = files[start:start + per_request]
                handles = [f.open("rb") for f in chunk]
                try:
                    r = client.post("/jobs", files=[("files", (f.name, h, "application/octet-stream"))
                                                    for f, h in zip(chunk, handles)])
                finally:
                    for h in handles:
                        h.close()
                if r.status_code != 202:
                    raise fail(f"POST /jobs answered {r.status_code}: {r.text[:500]}", code=1)
                body = r.json()
                jobs.append(body["job_id"])
                rows += body["studies"]
                bar.update(len(chunk))
        if wait:
            deadline = time.monotonic() + timeout
            rows = []
            with tqdm(total=len(jobs), desc="screening", unit="job", file=sys.stderr, disable=len(jobs) < 2) as bar:
                for job_id in jobs:
                    while True:
                        r = client.get(f"/jobs/{job_id}")
                        r.raise_for_status()
                        body = r.json()
                        if body["status"] == "done":
                            rows += body["studies"]
                            bar.update(1)
                            break
                        if time.monotonic() > deadline:
                            raise fail(f"job {job_id} not finished after {timeout:g} s", code=1)
                        time.sleep(0.5)
    columns = ("study_id", "filename", "status", "predicted_class", "flagged", "reject_code") if wait else \
        ("study_id", "filename", "status", "duplicate")
    typer.echo(render(rows, fmt=format.value, columns=columns))
    typer.echo(DISCLAIMER, err=True)


# `marker`: e.g. uid_conflict (cxr.identity), a study screened as usual that a reader must look at twice.
WORKLIST_COLUMNS = ("study_id", "filename", "status", "flagged", "uncertain", "predicted_class", "risk",
                    "probabilities", "uncertainty", "ood_score", "reject_code", "error", "marker", "marker_detail")
# (title, statuses, columns) of the worklist table's sections.
WORKLIST_SECTIONS = (
    ("Scored", ("done",), ("study_id", "filename", "flagged", "uncertain", "predicted_class", "risk",
                           "probabilities", "uncertainty", "marker")),
    ("Pending", ("queued", "processing"), ("study_id", "filename", "status", "marker")),
    ("Rejected and failed (not scored)", ("rejected", "failed"),
     ("study_id", "filename", "status", "reject_code", "error", "marker")),
)


class WorklistFormat(str, Enum):
    table = "table"
    csv = "csv"
    json = "json"
    html = "html"


@app.command()
def worklist(
    format: Annotated[WorklistFormat, typer.Option("--format", "-f", help="Output format. `html`: one "
                      "self-contained page with heatmap thumbnails, sorting and filtering.")] = WorklistFormat.table,
    status: Annotated[Optional[str], typer.Option(help="Only this status: queued, processing, done, failed, rejected.")] = None,
    since: Annotated[Optional[datetime], typer.Option(help="Only studies received at or after this ISO time (UTC if no zone).")] = None,
    limit: Annotated[int, typer.Option(help="At most this many rows (0 = all).")] = 100,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Write to this file instead of standard output.")] = None,
) -> None:
    """Studies from the database for review: flagged and highest-risk first, then pending,
    then failed and rejected ones.

    The table shows them in separate sections; CSV and JSON give one list, where
    `reject_code` and `error` say why a study was not scored. `--format html --out
    worklist.html` writes one self-contained HTML file (no external assets): a heatmap
    thumbnail and probability bars per study, click a header to sort, filter by text,
    status or flag; rejected and failed studies in their own section."""
    from cxr.db import repo
    from cxr.db.session import session_scope
    from cxr.output import render, render_sections

    if since is not None and since.tzinfo is None:
        since = since.replace(tzinfo=timezone.utc)
    settings = get_settings()
    with session_scope(settings.database_url) as session:
        rows = [repo.study_summary(r.study, r.result)
                for r in repo.worklist(session, status=status, since=since, limit=limit or None)]
    if format is WorklistFormat.html:
        from cxr.reports.worklist_html import render_worklist_html

        text = render_worklist_html(rows, limit=limit or None)
    elif format is WorklistFormat.json:
        # JSON: every field of each study, including reject_code, error and metadata.
        text = render(rows, fmt="json", columns=())
    elif format is WorklistFormat.table:
        text = render_sections(rows, sections=WORKLIST_SECTIONS)
    else:
        text = render(rows, fmt="csv", columns=WORKLIST_COLUMNS)
    if out is None:
        typer.echo(text)
    else:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(text if text.endswith("\n") else text + "\n", encoding="utf-8")
        except OSError as e:
            raise fail(f"cannot write the worklist to {out}: {e.strerror or e}")
        typer.echo(f"worklist: {len(rows)} studies written to {out}", err=True)
    typer.echo(DISCLAIMER, err=True)


@report_app.command("summary")
def report_summary(
    since: Annotated[Optional[datetime], typer.Option(help="Only studies received at or after this ISO time (UTC if no zone). Default: all.")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for summary.md and the PNG plots.")] = Path("summary"),
) -> None:
    """Summary report of the database: per day, studies by predicted class, flagged,
    rejected (by code) and failed (by reason); throughput; model versions in use.

    Writes `summary.md` and PNG plots into --out: daily volume stacked by class
    (`daily_volume.png`), flag rate over time (`flag_rate.png`) and score histograms per
    class (`score_histograms.png`)."""
    from cxr.db import repo
    from cxr.db.session import session_scope
    from cxr.reports.summary import summarise, write_report

    if since is not None and since.tzinfo is None:
        since = since.replace(tzinfo=timezone.utc)
    with session_scope(get_settings().database_url) as session:
        rows = repo.summary_rows(session, since=since)
    summary = summarise(rows, since=since)
    try:
        written = write_report(summary, out)
    except OSError as e:
        raise fail(f"cannot write the report into {out}: {e.strerror or e}")
    typer.echo(f"summary of {summary.received} studies over {len(summary.days)} day(s): "
               + ", ".join(str(p) for p in written), err=True)
    typer.echo(DISCLAIMER, err=True)


@model_app.command("list")
def model_list(
    format: Annotated[Format, typer.Option("--format", "-f", help="Output format.")] = Format.table,
) -> None:
    """Model versions recorded in the database, with the number of results each made."""
    from cxr.db import repo
    from cxr.db.session import session_scope
    from cxr.output import render

    with session_scope(get_settings().database_url) as session:
        rows = [{"id": mv.id, "version": mv.version, "architecture": mv.architecture, "active": mv.active,
                 "results": n, "checkpoint_sha256": mv.checkpoint_sha256[:12], "path": mv.path,
                 "created_at": mv.created_at.isoformat() if mv.created_at else None}
                for mv, n in repo.list_model_versions(session)]
    typer.echo(render(rows, fmt=format.value, columns=(
        "id", "version", "architecture", "active", "results", "checkpoint_sha256", "created_at", "path")))


@model_app.command("activate")
def model_activate(bundle: Annotated[Path, typer.Argument(help="A bundle written by `cxr train`.")]) -> None:
    """Make BUNDLE the active model: copied under CXR_HOME/models (so every host sharing
    CXR_HOME sees it) and recorded in model_versions. Workers use it from their next study.
    CXR_CHECKPOINT, when set, still wins over the active version."""
    from cxr.bundle import BundleError
    from cxr.registry import activate

    try:
        mv = activate(get_settings(), bundle)
    except BundleError as e:
        raise fail(f"cannot activate: {e}")
    typer.echo(f"active model: version {mv.version} ({mv.architecture}, sha256 {mv.checkpoint_sha256[:12]}) "
               f"-> {mv.path}")


@apikey_app.command("create")
def apikey_create(
    name: Annotated[str, typer.Option(help="Who or what the key is for (shown by `cxr apikey list`).")] = "default",
) -> None:
    """Create an API key. It is printed once; the database keeps only its sha256."""
    from cxr import apikeys
    from cxr.db import repo
    from cxr.db.session import session_scope

    key = apikeys.generate()
    with session_scope(get_settings().database_url) as session:
        row = repo.add_api_key(session, name=name[:64], prefix=apikeys.prefix_of(key), key_sha256=apikeys.digest(key))
        key_id = row.id
    typer.echo(key)
    typer.echo(f"API key {key_id} ({name}) created; it is shown only now. Send it as the X-API-Key header.", err=True)


@apikey_app.command("revoke")
def apikey_revoke(key: Annotated[str, typer.Argument(help="The key's id or prefix (from `cxr apikey list`).")]) -> None:
    """Revoke an API key: it stops working at once."""
    from cxr.db import repo
    from cxr.db.session import session_scope

    with session_scope(get_settings().database_url) as session:
        revoked = (repo.revoke_api_key(session, key_id=int(key)) if key.isdigit()
                   else repo.revoke_api_key(session, prefix=key))
        ids = [k.id for k in revoked]
    if not ids:
        raise fail(f"no active API key with id or prefix {key!r}")
    typer.echo(f"revoked API key(s) {', '.join(map(str, ids))}")


@apikey_app.command("list")
def apikey_list(
    format: Annotated[Format, typer.Option("--format", "-f", help="Output format.")] = Format.table,
) -> None:
    """API keys in the database (prefix only; the keys themselves are not stored)."""
    from cxr.db import repo
    from cxr.db.session import session_scope
    from cxr.output import render

    with session_scope(get_settings().database_url) as session:
        rows = [{"id": k.id, "name": k.name, "prefix": k.prefix, "created_at": k.created_at.isoformat(),
                 "revoked_at": k.revoked_at.isoformat() if k.revoked_at else None}
                for k in repo.list_api_keys(session)]
    typer.echo(render(rows, fmt=format.value, columns=("id", "name", "prefix", "created_at", "revoked_at")))


@study_app.command("show")
def study_show(
    study_id: Annotated[str, typer.Argument(help="The study id (a UUID).")],
    format: Annotated[Format, typer.Option("--format", "-f", help="Output format: table or json.")] = Format.table,
) -> None:
    """A study, its result and its history: every status change with its time and actor
    (watcher, api, worker or reaper, with host:pid) and why."""
    import json
    import uuid

    from cxr.db import repo
    from cxr.db.session import session_scope
    from cxr.output import render

    try:
        sid = uuid.UUID(study_id)
    except ValueError:
        raise fail(f"not a study id: {study_id!r} (expected a UUID, as `cxr worklist` prints)")
    with session_scope(get_settings().database_url) as session:
        study = repo.get_study(session, study_id=sid)
        if study is None:
            raise fail(f"no study {sid}", code=1)
        summary = repo.study_summary(study, repo.latest_result(study))
        summary["worker_id"] = study.worker_id
        summary["lease_expires_at"] = study.lease_expires_at.isoformat() if study.lease_expires_at else None
        summary["notes"] = repo.study_notes(session, study_id=sid)
        history = [{"at": e.at.isoformat(), "status": e.status, "actor": e.actor, "detail": e.detail}
                   for e in repo.study_events(session, study_id=sid)]
    if format is Format.json:
        typer.echo(json.dumps({**summary, "history": history}, indent=2, default=str))
    else:
        fields = ("study_id", "filename", "source", "status", "predicted_class", "risk", "flagged", "uncertain",
                  "uncertainty", "ood_score", "reject_code", "error", "notes", "marker", "marker_detail",
                  "conflicts_with", "model_version", "worker_id", "lease_expires_at", "created_at", "finished_at")
        width = max(map(len, fields))
        shown = {**summary, "notes": "; ".join(summary["notes"]) or None}
        typer.echo("\n".join(f"{k.ljust(width)}  {'' if shown.get(k) is None else shown[k]}" for k in fields))
        typer.echo("\nHistory")
        typer.echo(render(history, fmt="csv" if format is Format.csv else "table",
                          columns=("at", "status", "actor", "detail")))
    typer.echo(DISCLAIMER, err=True)


@app.command()
def reap(
    loop: Annotated[bool, typer.Option("--loop", help="Keep running, one pass every CXR_REAP_INTERVAL_SECONDS.")] = False,
) -> None:
    """Re-queue abandoned studies and publish their tasks again.

    A study in `processing` whose lease expired (its worker died, or lost the database for
    longer than CXR_LEASE_SECONDS) goes back to `queued`. A study `queued` for longer than
    CXR_REQUEUE_QUEUED_AFTER_SECONDS while the broker queue is empty lost its task (a broker
    restarted without persistence) and gets it again. Publishing twice is harmless: a study
    that is done, or held by a live worker, is not screened again.

    The watcher (and so `cxr up`) already runs this every CXR_REAP_INTERVAL_SECONDS; run it
    by hand, or from cron, where no watcher runs."""
    from cxr.queue import get_celery
    from cxr.reaper import reap as reap_once

    settings = get_settings()
    stop = _stop_on_signals() if loop else None
    while True:
        requeued = reap_once(settings, get_celery())
        typer.echo(f"re-queued {len(requeued)} studies", err=True)
        if stop is None or stop.wait(settings.reap_interval_seconds):
            break


def _register_trainer() -> None:
    from trainer.cli import register

    register(app)


_register_trainer()
