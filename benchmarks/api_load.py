#!/usr/bin/env python3
"""API load on loopback: POST /jobs upload throughput and POST /predict latency.

Starts `cxr api` and one `cxr worker` (default settings) in a temporary CXR_HOME, on the
database and broker given (default: CXR_DATABASE_URL / CXR_BROKER_URL from the
environment, else the embedded SQLite + filesystem broker), with the shipped model unless
--checkpoint or CXR_CHECKPOINT says otherwise. Then:

1. the bare model forward time, in this process (same bundle, CXR_TORCH_THREADS threads);
2. POST /predict one at a time, --predict distinct files, each sent once the worker has
   finished the previous one (heatmap included): p50/p95 latency on an idle worker, next to
   the worker's own timings (decode + preprocess, forward, Grad-CAM) from the results.
   /predict answers once the scores are stored, before Grad-CAM runs;
3. POST /jobs with --uploads files of about 500 KB, one per request, --concurrency at a
   time (an httpx async loop): files/s and MB/s until every 202 is back.

    python benchmarks/api_load.py [--predict 30] [--uploads 60] [--concurrency 4] [--no-heatmaps]

--burst measures instead what probes and bursts of clients do (README "Security and
limits"): --studies films are sent and screened first, then 40 concurrent GET /health
(no key, as load balancers and probes send them), twice, then 200 concurrent GET /worklist
with a key. It prints each phase's status counts, errors (exceptions and 5xx other than
a 503 with Retry-After), p50/p95/max latency, and whether the API still answers /health
and /worklist afterwards (target: no errors, it answers, p95 under 2 s).

    python benchmarks/api_load.py --burst [--studies 40] [--database-url ... --broker-url ...]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from tests.stack import Stack, clean_env, cxr, free_port, wait_until  # noqa: E402

BURST_KEY = "bench-" + uuid.uuid4().hex


def png_500k(seed: int) -> bytes:
    """A grey PNG of about 500 KB: a smooth chest-like gradient with noise (noise does not compress)."""
    rng = np.random.default_rng(seed)
    side = 720
    y, x = np.mgrid[0:side, 0:side] / side
    base = 120 + 60 * np.sin(3 * x) * np.cos(2 * y)
    arr = np.clip(base + rng.normal(0, 40, (side, side)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q * (len(values) - 1))))]


def forward_ms(bundle: Path, threads: int, n: int = 30) -> list[float]:
    """The bare forward pass the worker runs: its engine (CXR_ENGINE, onnx on the CPU by
    default), batch 1, a tensor already in memory."""
    import tempfile

    import torch

    from cxr.settings import Settings
    from worker.screening.model import load_bundle
    from worker.screening.pipeline import ScreenOptions, Screener

    torch.set_num_threads(threads)
    engine = Settings(_env_file=None).engine
    screener = Screener(load_bundle(bundle), ScreenOptions(engine=engine, threads=threads,
                                                           cache_dir=Path(tempfile.mkdtemp())))
    m = screener.meta
    x = np.random.default_rng(0).normal(size=(1, m.in_chans, m.input_size, m.input_size)).astype(np.float32)
    for _ in range(3):
        screener.forward(x)
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        screener.forward(x)
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def phase_breakdown(database_url: str, sent: list[tuple[uuid.UUID, float, float]]) -> dict[str, list[float]]:
    """Where a /predict's time goes, from the rows' own timestamps (one clock: this machine):
    the request until the study row exists (upload, sha256, fsync'd store, row), the row until
    a worker claims it (commit, queue, task pick-up), the claim until the scores are stored
    (read, decode, forward, Grad-CAM map, write), and the stored scores until the answer
    (the API's polling and response)."""
    from sqlalchemy import select

    from cxr.db.models import Result, Study, StudyEvent
    from cxr.db.session import session_scope

    out: dict[str, list[float]] = {"request -> row": [], "row -> claimed": [], "claimed -> scores stored": [],
                                   "scores stored -> answer": []}
    with session_scope(database_url) as session:
        for sid, w0, w1 in sent:
            created = session.get(Study, sid).created_at.timestamp()
            claimed = session.scalar(select(StudyEvent.at).where(StudyEvent.study_id == sid,
                                                                 StudyEvent.status == "processing")
                                     .order_by(StudyEvent.at)).timestamp()
            scored = session.scalar(select(Result.created_at).where(Result.study_id == sid)).timestamp()
            for key, ms in zip(out, (created - w0, claimed - created, scored - claimed, w1 - scored)):
                out[key].append(ms * 1e3)
    return out


async def upload_all(base: str, files: list[bytes], concurrency: int, headers: dict[str, str] | None = None) -> float:
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=base, timeout=120, headers=headers or {}) as client:
        async def one(i: int, data: bytes) -> None:
            async with sem:
                r = await client.post("/jobs", files=[("files", (f"u{i}.png", data, "image/png"))])
                if r.status_code != 202:
                    raise RuntimeError(f"POST /jobs answered {r.status_code}: {r.text[:300]}")

        t0 = time.perf_counter()
        await asyncio.gather(*(one(i, d) for i, d in enumerate(files)))
        return time.perf_counter() - t0


async def burst(base: str, path: str, n: int, headers: dict[str, str] | None = None) -> list[tuple[object, float, bool]]:
    """``n`` GET ``path`` at once, each on its own connection: [(status code or exception
    name, seconds, answered with Retry-After)]."""
    async with httpx.AsyncClient(base_url=base, timeout=60, headers=headers or {},
                                 limits=httpx.Limits(max_connections=n, max_keepalive_connections=0)) as client:
        start = asyncio.Event()

        async def one() -> tuple[object, float, bool]:
            await start.wait()
            t0 = time.perf_counter()
            try:
                r = await client.get(path)
                return r.status_code, time.perf_counter() - t0, "retry-after" in r.headers
            except httpx.HTTPError as e:
                return type(e).__name__, time.perf_counter() - t0, False

        tasks = [asyncio.create_task(one()) for _ in range(n)]
        await asyncio.sleep(0)
        start.set()
        return await asyncio.gather(*tasks)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def burst_row(name: str, results: list[tuple[object, float, bool]], cpu: float) -> str:
    counts: dict[str, int] = {}
    for code, _, _ in results:
        counts[str(code)] = counts.get(str(code), 0) + 1
    errors = sum(1 for code, _, retry in results
                 if not isinstance(code, int) or (code >= 500 and not (code == 503 and retry)))
    secs = [t for _, t, _ in results]
    return (f"| {name} | {len(results)} | {', '.join(f'{k}: {v}' for k, v in sorted(counts.items()))} | {errors} | "
            f"{statistics.median(secs) * 1e3:.0f} / {pct(secs, 0.95) * 1e3:.0f} / {max(secs) * 1e3:.0f} ms | "
            f"{cpu:.2f} s ({cpu / len(results) * 1e3:.1f} ms each) |")


def run_burst(args, env: dict[str, str], tmp: Path) -> int:
    env["CXR_API_KEYS"] = BURST_KEY
    key = {"X-API-Key": BURST_KEY}
    cxr("db", "upgrade", env=env)
    (tmp / "logs").mkdir()
    stack = Stack(log_dir=tmp / "logs", env=env)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    stack.start("api", "api", "--port", str(port))
    stack.start("worker", "worker")
    rows, after = [], {}
    try:
        stack.wait_http(f"{base}/health")
        asyncio.run(upload_all(base, [png_500k(7000 + i) for i in range(args.studies)], 4, headers=key))
        wait_until(lambda: sum(1 for s in httpx.get(f"{base}/worklist", params={"limit": 1000}, headers=key,
                                                    timeout=30).json()["items"]
                               if s["status"] in ("done", "rejected", "failed")) == args.studies,
                   timeout=600, describe=stack.logs)
        wait_until(lambda: httpx.get(f"{base}/health", timeout=10).json().get("workers") == 1, timeout=120,
                   describe=stack.logs)
        api_pid = stack.procs["api"].pid
        for name, path, n, headers in (("GET /health x40 (no key), 1st", "/health", 40, None),
                                       ("GET /health x40 (no key), 2nd", "/health", 40, None),
                                       (f"GET /worklist x200 (key; {args.studies} studies, default limit)",
                                        "/worklist", 200, key)):
            cpu0 = cpu_seconds(api_pid)
            results = asyncio.run(burst(base, path, n, headers=headers))
            rows.append(burst_row(name, results, cpu_seconds(api_pid) - cpu0))
        for path, headers in (("/health", {}), ("/worklist", key)):
            try:
                after[path] = str(httpx.get(f"{base}{path}", headers=headers, timeout=10).status_code)
            except httpx.HTTPError as e:
                after[path] = type(e).__name__
    finally:
        codes = stack.stop()
    print("| phase | requests | status counts | errors | p50 / p95 / max | API process CPU |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(row)
    print(f"| afterwards: GET /health, GET /worklist (10 s timeout) | | {after.get('/health')}, "
          f"{after.get('/worklist')} | | | |")
    print(f"| exit codes after SIGTERM | | {codes} | | | |")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--predict", type=int, default=30, help="POST /predict requests (one at a time)")
    ap.add_argument("--uploads", type=int, default=60, help="files of ~500 KB sent to POST /jobs")
    ap.add_argument("--concurrency", type=int, default=4, help="POST /jobs requests in flight")
    ap.add_argument("--checkpoint", type=Path, help="bundle (default: CXR_CHECKPOINT or the shipped model)")
    ap.add_argument("--database-url", default=os.environ.get("CXR_DATABASE_URL", ""))
    ap.add_argument("--broker-url", default=os.environ.get("CXR_BROKER_URL", ""))
    ap.add_argument("--no-heatmaps", action="store_true", help="workers skip Grad-CAM (CXR_HEATMAPS=none)")
    ap.add_argument("--burst", action="store_true", help="the burst mode (see above) instead of the latency runs")
    ap.add_argument("--studies", type=int, default=40, help="--burst: films screened before the bursts")
    args = ap.parse_args()

    from cxr.settings import DEFAULT_BUNDLE, Settings

    bundle = (args.checkpoint or Path(os.environ.get("CXR_CHECKPOINT") or DEFAULT_BUNDLE)).resolve()
    threads = int(os.environ.get("CXR_TORCH_THREADS", "1"))
    tmp = Path(tempfile.mkdtemp(prefix="cxr-apiload-"))
    env = clean_env(CXR_HOME=str(tmp / "var"), CXR_CHECKPOINT=str(bundle), CXR_TORCH_THREADS=str(threads),
                    CXR_QUEUE=f"cxr-bench-{uuid.uuid4().hex[:8]}", CXR_HEATMAPS="none" if args.no_heatmaps else "all")
    if args.database_url:
        env["CXR_DATABASE_URL"] = args.database_url
    if args.broker_url:
        env["CXR_BROKER_URL"] = args.broker_url
    print(f"database {args.database_url or 'SQLite (embedded)'}, broker {args.broker_url or 'filesystem://'}, "
          f"bundle {bundle.name}, heatmaps {'off' if args.no_heatmaps else 'on'}, torch threads {threads}",
          file=sys.stderr)
    if args.burst:
        return run_burst(args, env, tmp)
    fwd = forward_ms(bundle, threads)
    predict_files = [png_500k(1000 + i) for i in range(args.predict + 2)]
    upload_files = [png_500k(5000 + i) for i in range(args.uploads)]

    cxr("db", "upgrade", env=env)
    (tmp / "logs").mkdir()
    stack = Stack(log_dir=tmp / "logs", env=env)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    stack.start("api", "api", "--port", str(port))
    stack.start("worker", "worker")
    lat, worker_t, sent = [], [], []  # sent: (study id, wall-clock request start, wall-clock answer)
    try:
        stack.wait_http(f"{base}/health")
        with httpx.Client(base_url=base, timeout=120) as c:
            for i, data in enumerate(predict_files):
                w0, t0 = time.time(), time.perf_counter()
                r = c.post("/predict", files=[("file", (f"p{i}.png", data, "image/png"))])
                dt = (time.perf_counter() - t0) * 1e3
                w1 = time.time()
                if r.status_code != 200:
                    raise RuntimeError(f"/predict answered {r.status_code}: {r.text[:300]}\n{stack.logs()}")
                # Let the worker finish this study (its Grad-CAM runs after the answer) so the
                # next request meets an idle worker: this measures latency, not queueing.
                sid = r.json()["study_id"]
                while (study := c.get(f"/studies/{sid}").json())["status"] not in ("done", "rejected", "failed"):
                    time.sleep(0.01)
                if i >= 2:  # the first two warm the worker and the API's connection pools
                    lat.append(dt)
                    worker_t.append(study["timings_ms"])
                    sent.append((uuid.UUID(sid), w0, w1))
        elapsed = asyncio.run(upload_all(base, upload_files, args.concurrency))
    finally:
        stack.stop()
    mb = sum(len(d) for d in upload_files) / 1e6
    phases = phase_breakdown(env.get("CXR_DATABASE_URL") or Settings(home=tmp / "var", _env_file=None).database_url,
                             sent)

    def med(key: str) -> float:
        return statistics.median(t.get(key, 0.0) for t in worker_t)

    f50 = statistics.median(fwd)
    p50 = statistics.median(lat)
    print("| measure | value |")
    print("|---|---|")
    print(f"| bare model forward p50 (this process, engine {Settings(_env_file=None).engine}, {threads} thread, batch 1) | {f50:.1f} ms |")
    print(f"| /predict p50 / p95 (n={len(lat)}, ~{len(predict_files[0]) / 1e3:.0f} KB PNG) | "
          f"{p50:.1f} / {pct(lat, 0.95):.1f} ms |")
    print(f"| worker: decode+preprocess / forward / Grad-CAM (p50) | {med('decode_preprocess'):.1f} / "
          f"{med('infer'):.1f} / {med('gradcam'):.1f} ms |")
    print(f"| /predict p50 - bare forward (target <= 30 ms) | {p50 - f50:.1f} ms |")
    print(f"| /predict p50 - worker decode+preprocess+forward (API + queue + DB) | "
          f"{p50 - med('decode_preprocess') - med('infer'):.1f} ms |")
    for name, values in phases.items():
        print(f"| /predict phase: {name} (p50) | {statistics.median(values):.1f} ms |")
    print(f"| POST /jobs upload ({len(upload_files)} files, {mb / len(upload_files) * 1e3:.0f} KB each, "
          f"{args.concurrency} in flight) | {len(upload_files) / elapsed:.1f} files/s, {mb / elapsed:.1f} MB/s |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
