#!/usr/bin/env python3
"""Throughput of every stage, measured in one run on the same images, with the ratios.

Rows (see issue #5):
  bare forward      studies/s at batch 1/8/16 (64 on CUDA) on tensors already in memory, per
                    engine: torch eager, onnxruntime (CPU) and torch.compile where it works.
  decode ceiling    decode + preprocess alone, one process per core.
  cxr predict       in-process decode + infer (the `cxr predict` code), default settings.
  pipeline          files dropped into the inbox -> `done` rows: studies/s and p50/p95 latency
                    per study (received -> done), heatmaps none and all.
                    embedded: `cxr up` (SQLite + filesystem broker);
                    distributed: Postgres + Redis, `cxr watch` + one `cxr worker` process.
  worker memory     (--soak N) peak RSS and RSS after each 1,000 studies of an N-study run.

    python benchmarks/pipeline.py [--n 300] [--images DIR] [--device cpu|cuda] [--soak 5000]
        [--postgres postgresql+psycopg://127.0.0.1:5432/postgres] [--redis redis://127.0.0.1:6379/11]

Default images: generated 1024 px PNGs (tests/imagegen.py). `--images ../shared/data/cxr/images`
for real films. Nothing is asserted: it prints tables.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from sqlalchemy import create_engine, func, select, text  # noqa: E402

from cxr.db.models import Study  # noqa: E402
from cxr.db.session import session_scope  # noqa: E402
from cxr.settings import DEFAULT_BUNDLE, Settings  # noqa: E402

TERMINAL = ("done", "failed", "rejected")


# --- bare forward -------------------------------------------------------------------------

def _rate(fn, batch: int, seconds: float, sync=lambda: None) -> float:
    fn()
    fn()  # warm-up (and compilation)
    sync()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        n += batch
    sync()
    return n / (time.perf_counter() - t0)


def bare_forward(checkpoint: Path, device: str, threads: int, batches: list[int], seconds: float
                 ) -> dict[tuple[str, int], float | str]:
    from worker.screening.model import load_bundle
    from worker.screening.pipeline import ScreenOptions, Screener

    torch.set_num_threads(threads)
    loaded = load_bundle(checkpoint, device=device)
    meta = loaded.meta
    sync = torch.cuda.synchronize if loaded.device.type == "cuda" else (lambda: None)
    engines: dict[str, object] = {"torch eager": Screener(loaded, ScreenOptions(engine="torch", threads=threads))}
    if loaded.device.type == "cpu":
        cache = Path(tempfile.mkdtemp(prefix="cxr-onnx-"))
        engines["onnxruntime"] = Screener(loaded, ScreenOptions(engine="onnx", threads=threads, cache_dir=cache))
    rows: dict[tuple[str, int], float | str] = {}
    for b in batches:
        x = np.random.default_rng(0).standard_normal((b, meta.in_chans, meta.input_size, meta.input_size),
                                                     dtype=np.float32)
        for name, screener in engines.items():
            rows[(name, b)] = _rate(lambda: screener.forward(x), b, seconds, sync)
    # torch.compile: the same forward (logits + features, AMP on CUDA), compiled.
    try:
        model = loaded.model
        compiled_last = torch.compile(model.last_conv, dynamic=False)
        compiled_head = torch.compile(model.from_last_conv, dynamic=False)

        def fwd(x: np.ndarray):
            t = torch.from_numpy(x).to(loaded.device)
            if loaded.device.type == "cuda":
                t = t.contiguous(memory_format=torch.channels_last)
                ctx = torch.autocast("cuda", dtype=torch.bfloat16)
            else:
                ctx = torch.autocast("cpu", enabled=False)
            with torch.no_grad(), ctx:
                f = compiled_last(t)
                return compiled_head(f), f

        for b in batches:
            x = np.random.default_rng(0).standard_normal((b, meta.in_chans, meta.input_size, meta.input_size),
                                                         dtype=np.float32)
            rows[("torch.compile", b)] = _rate(lambda: fwd(x), b, seconds, sync)
    except Exception as e:  # reported in the table, not hidden
        for b in batches:
            rows.setdefault(("torch.compile", b), f"failed: {type(e).__name__}")
    return rows


# --- decode ceiling and cxr predict -------------------------------------------------------

def _decode_one(args: tuple[str, str]) -> int:
    from cxr.bundle import read_meta
    from worker.screening.pipeline import gated_pixels, to_model

    path, ckpt = args
    pixels, _ = gated_pixels(Path(path).read_bytes())
    to_model(pixels, read_meta(Path(ckpt)))
    return 1


def decode_ceiling(files: list[Path], checkpoint: Path) -> tuple[float, int]:
    cores = os.cpu_count() or 1
    with ProcessPoolExecutor(cores) as pool:
        list(pool.map(_decode_one, [(str(files[0]), str(checkpoint))] * cores))  # start-up
        t0 = time.perf_counter()
        n = sum(pool.map(_decode_one, [(str(f), str(checkpoint)) for f in files], chunksize=4))
    return n / (time.perf_counter() - t0), cores


def predict_rate(files: list[Path], checkpoint: Path, device: str) -> float:
    from cxr.cli import predict_rows
    from worker.screening.model import load_bundle
    from worker.screening.pipeline import Screener
    from worker.service import screen_options

    settings = Settings(_env_file=None, device=device, heatmaps="none", home=Path(tempfile.mkdtemp()))
    torch.set_num_threads(settings.torch_threads)
    screener = Screener(load_bundle(checkpoint, device=settings.device), screen_options(settings))
    predict_rows(screener, files[:8], workers=settings.max_batch)  # warm-up
    t0 = time.perf_counter()
    predict_rows(screener, files, workers=settings.max_batch)
    return len(files) / (time.perf_counter() - t0)


# --- pipelines ----------------------------------------------------------------------------

def _rss_kb(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _worker_pid(root: int) -> int | None:
    """The celery worker process under ``root`` (the `cxr worker` process, or `cxr up`'s child)."""
    todo = [root]
    while todo:
        pid = todo.pop()
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except FileNotFoundError:
            continue
        if b"worker" in cmd:
            return pid
        try:
            kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except FileNotFoundError:
            kids = []
        todo += [int(k) for k in kids]
    return None


def run_pipeline(files: list[Path], env_extra: dict[str, str], *, distributed: dict[str, str] | None,
                 device: str, soak_every: int = 0) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="cxr-pipeline-"))
    home, inbox = tmp / "var", tmp / "inbox"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CXR_")}
    env.update(CXR_HOME=str(home), CXR_INBOX=str(inbox), CXR_WATCH_SETTLE_SECONDS="0.2", CXR_LOG_LEVEL="WARNING",
               CXR_DEVICE=device, **env_extra)
    procs: list[subprocess.Popen] = []
    logf = tmp / "log.txt"
    log = logf.open("w")

    def start(*args: str) -> subprocess.Popen:
        p = subprocess.Popen([sys.executable, "-m", "cxr", "--log-level", "INFO", *args], env=env, cwd=ROOT,
                             stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(p)
        return p

    if distributed:
        env.update(CXR_DATABASE_URL=distributed["database_url"], CXR_BROKER_URL=distributed["broker_url"],
                   CXR_QUEUE=f"bench-{uuid.uuid4().hex[:8]}")
        db = distributed["database_url"]
        subprocess.run([sys.executable, "-m", "cxr", "db", "upgrade"], env=env, cwd=ROOT, check=True,
                       capture_output=True)
        worker = start("worker")
        start("watch")
    else:
        db = f"sqlite:///{home / 'cxr.db'}"
        worker = start("up", "--port", "0")
    try:
        deadline = time.monotonic() + 300
        while "loaded model bundle" not in logf.read_text():
            if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
                raise RuntimeError(logf.read_text()[-3000:])
            time.sleep(0.2)
        time.sleep(2.0)  # warm-up (ONNX export) settles
        wpid = _worker_pid(worker.pid)
        inbox.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        for f in files:
            shutil.copy(f, inbox / f.name)
        rss_marks: list[tuple[int, float]] = []
        next_mark = soak_every
        while True:
            with session_scope(db) as s:
                finished = s.scalar(select(func.count()).select_from(Study).where(Study.status.in_(TERMINAL)))
            if soak_every and wpid and finished >= next_mark:
                rss_marks.append((next_mark, _rss_kb(wpid) / 1024))
                next_mark += soak_every
            if finished >= len(files):
                break
            if any(p.poll() is not None for p in procs):
                keep = Path(tempfile.mkdtemp(prefix="cxr-pipeline-failed-")) / "log.txt"
                shutil.copy(logf, keep)
                lines = [ln for ln in logf.read_text().splitlines()
                         if any(w in ln for w in ("ERROR", "CRITICAL", "Traceback", "exited", "Error", "Killed"))]
                raise RuntimeError(f"a process exited ({[(p.args[-1], p.returncode) for p in procs]}); whole log "
                                   f"kept at {keep}:\n" + "\n".join(lines[-40:]))
            if time.monotonic() - t0 > 3600:
                raise TimeoutError("the pipeline did not finish in an hour")
            time.sleep(0.05)
        wall = time.monotonic() - t0
        with session_scope(db) as s:
            rows = s.execute(select(Study.status, Study.created_at, Study.finished_at)
                             .where(Study.status.in_(TERMINAL))).all()
        lat = sorted((r.finished_at - r.created_at).total_seconds() for r in rows if r.finished_at)
        peak = _rss_kb(wpid, "VmHWM") / 1024 if wpid else float("nan")
        return {"studies_s": len(files) / wall, "p50": statistics.median(lat),
                "p95": lat[min(len(lat) - 1, int(0.95 * len(lat)))], "done": sum(r.status == "done" for r in rows),
                "rss_marks": rss_marks, "peak_rss_mb": peak}
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT if "up" in p.args else signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=120)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(tmp, ignore_errors=True)


def fresh_postgres(admin_url: str) -> str:
    name = f"cxr_bench_{uuid.uuid4().hex[:8]}"
    eng = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with eng.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    eng.dispose()
    return admin_url.rsplit("/", 1)[0] + "/" + name


# --- main ---------------------------------------------------------------------------------

def generate(n: int, size: int) -> list[Path]:
    from tests.imagegen import write_png

    gen = Path(tempfile.mkdtemp(prefix="cxr-gen-"))
    return [write_png(gen / f"film{i:05d}.png", size=size, seed=i) for i in range(n)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=300, help="studies per pipeline row")
    ap.add_argument("--images", type=Path, help="folder of input files (default: generated 1024 px PNGs)")
    ap.add_argument("--checkpoint", type=Path, default=DEFAULT_BUNDLE)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--threads", type=int, default=Settings(_env_file=None).torch_threads,
                    help="threads for the bare forward rows (the worker's CXR_TORCH_THREADS)")
    ap.add_argument("--seconds", type=float, default=3.0, help="seconds per bare-forward cell")
    ap.add_argument("--postgres", default="postgresql+psycopg://127.0.0.1:5432/postgres",
                    help="admin URL: a fresh database is created on this server for the distributed row")
    ap.add_argument("--redis", default="redis://127.0.0.1:6379/11")
    ap.add_argument("--skip", default="", help="comma-separated rows to skip: forward,decode,predict,embedded,"
                                               "distributed")
    ap.add_argument("--soak", type=int, default=0, help="also run an N-study embedded soak and report worker RSS")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    if args.images:
        files = sorted(p for p in args.images.rglob("*") if p.is_file() and not p.name.startswith("."))[: args.n]
        source = f"{len(files)} files from {args.images}"
    else:
        files = generate(args.n, 1024)
        source = f"{len(files)} generated 1024 px PNGs"
    cuda = args.device.startswith("cuda")
    batches = [1, 8, 16, 64] if cuda else [1, 8, 16]
    out: list[str] = [f"# cxr-screen pipeline benchmark: {source}, device {args.device}, "
                      f"{os.cpu_count()} cores, torch {torch.__version__}\n"]

    best_forward = None
    if "forward" not in skip:
        fw = bare_forward(args.checkpoint, args.device, args.threads, batches, args.seconds)
        names = list(dict.fromkeys(k[0] for k in fw))
        out.append(f"## Bare forward ({args.threads} thread(s)), studies/s\n")
        out.append("| engine | " + " | ".join(f"batch {b}" for b in batches) + " |")
        out.append("|---|" + "---|" * len(batches))
        for name in names:
            cells = [fw[(name, b)] for b in batches]
            out.append(f"| {name} | " + " | ".join(c if isinstance(c, str) else f"{c:.1f}" for c in cells) + " |")
        numeric = {k: v for k, v in fw.items() if not isinstance(v, str)}
        best_forward = max(numeric.items(), key=lambda kv: kv[1])
        out.append(f"\nfastest: {best_forward[0][0]} at batch {best_forward[0][1]}: {best_forward[1]:.1f} studies/s\n")
        print("\n".join(out), file=sys.stderr, flush=True)  # progress; the whole table follows at the end

    extra_rows: list[str] = []
    decode = None
    if "decode" not in skip:
        decode = rate, cores = decode_ceiling(files, args.checkpoint)
        extra_rows.append(f"| decode ceiling (decode + preprocess, {cores} processes) | {rate:.1f} | | |")
    if "predict" not in skip:
        extra_rows.append(f"| `cxr predict` (in-process, default settings, heatmaps none) | "
                          f"{predict_rate(files, args.checkpoint, args.device):.1f} | | |")
    pipes: dict[str, dict] = {}
    for heat in ("none", "all"):
        if "embedded" not in skip:
            pipes[f"embedded, heatmaps {heat}"] = run_pipeline(files, {"CXR_HEATMAPS": heat}, distributed=None,
                                                               device=args.device)
        if "distributed" not in skip:
            dist = {"database_url": fresh_postgres(args.postgres), "broker_url": args.redis}
            pipes[f"distributed (Postgres + Redis, 1 worker), heatmaps {heat}"] = run_pipeline(
                files, {"CXR_HEATMAPS": heat}, distributed=dist, device=args.device)
    s = Settings(_env_file=None, device=args.device)
    out.append(f"## Stages (default settings: engine {s.engine}, max batch {s.max_batch}, "
               f"{s.torch_threads} torch thread(s))\n")
    out.append("| row | studies/s | p50 latency s | p95 latency s |")
    out.append("|---|---|---|---|")
    out += extra_rows
    for name, r in pipes.items():
        out.append(f"| pipeline {name} | {r['studies_s']:.1f} | {r['p50']:.2f} | {r['p95']:.2f} |")
    out.append("")
    for kind in ("embedded", "distributed (Postgres + Redis, 1 worker)"):
        none, all_ = pipes.get(f"{kind}, heatmaps none"), pipes.get(f"{kind}, heatmaps all")
        if none and best_forward:
            out.append(f"- {kind}: pipeline (heatmaps none) / fastest bare forward = "
                       f"{none['studies_s']:.1f} / {best_forward[1]:.1f} = **{none['studies_s'] / best_forward[1]:.2f}**")
        if none and all_:
            out.append(f"- {kind}: heatmaps all costs {none['studies_s'] / all_['studies_s']:.2f} x heatmaps none "
                       f"(time per study)")
    if decode and best_forward and not cuda:
        # Derived, not measured: every study must be decoded and go through the model, and on the
        # CPU both take core time. With C cores, decode costs C / (decode ceiling) core-seconds per
        # study and the fastest forward 1 / rate * threads; no pipeline can beat C over their sum,
        # whatever its intake, queue and database cost (which come on top).
        rate, cores = decode
        per_study = cores / rate + args.threads / best_forward[1]
        bound = cores / per_study
        out.append(f"- bound from core time alone (derived from the rows above, not measured): {cores} cores / "
                   f"({cores / rate * 1e3:.1f} ms decode + {args.threads / best_forward[1] * 1e3:.1f} ms forward per "
                   f"study) = {bound:.1f} studies/s = **{bound / best_forward[1]:.2f}** x the fastest bare forward")
    if args.soak:
        soak_files = generate(args.soak, 512) if not args.images else files
        r = run_pipeline(soak_files, {"CXR_HEATMAPS": "all"}, distributed=None, device=args.device,
                         soak_every=1000)
        out.append(f"\n## Worker memory: {len(soak_files)}-study soak, embedded, heatmaps all "
                   f"({r['studies_s']:.1f} studies/s)\n")
        out.append("| studies finished | worker RSS MB |")
        out.append("|---|---|")
        out += [f"| {n} | {mb:.0f} |" for n, mb in r["rss_marks"]]
        out.append(f"\npeak RSS {r['peak_rss_mb']:.0f} MB")
        marks = dict(r["rss_marks"])
        if 1000 in marks and max(marks) >= 5000:
            out.append(f"RSS after {max(marks)} / after 1000 = **{marks[max(marks)] / marks[1000]:.3f}**")
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
