"""Micro-batching: batched probabilities equal single calls; one bad file fails alone; a real
threads-pool worker screens a burst through shared forward passes."""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import select

from cxr.db.models import Result, Study
from cxr.db.session import session_scope
from tests.imagegen import write_png
from tests.stack import Stack, clean_env, free_port, wait_until
from worker.screening.model import load_bundle
from worker.screening.pipeline import ScreenOptions, Screener


def test_batch_of_16_equals_16_single_calls_and_a_bad_file_fails_alone(tmp_path, tiny_bundle):
    loaded = load_bundle(tiny_bundle)
    single = Screener(loaded, ScreenOptions(heatmaps="none"))
    batched = Screener(loaded, ScreenOptions(heatmaps="none", max_batch=16, max_wait_ms=500))
    files = [write_png(tmp_path / f"{i}.png", seed=i).read_bytes() for i in range(16)]
    files[7] = b"\x89PNG\r\n\x1a\n" + b"\x00" * 50  # a corrupt file in the middle of the burst
    with ThreadPoolExecutor(16) as pool:
        outs = list(pool.map(batched.screen, files))
    assert max(o.timings_ms["batch_size"] for o in outs if o.status == "done") > 1  # passes were shared
    for i, (data, out) in enumerate(zip(files, outs)):
        ref = single.screen(data)
        assert out.status == ref.status, i
        if i == 7:
            assert out.status == "rejected" and out.reject_code == "unreadable"
            continue
        assert max(abs(out.probabilities[c] - ref.probabilities[c]) for c in ref.probabilities) <= 1e-5, i


def test_threads_pool_worker_batches_a_burst(tmp_path, tiny_bundle):
    home, inbox = tmp_path / "var", tmp_path / "inbox"
    env = clean_env(CXR_HOME=str(home), CXR_INBOX=str(inbox), CXR_CHECKPOINT=str(tiny_bundle),
                    CXR_WATCH_SETTLE_SECONDS="0.3", CXR_MAX_BATCH="8", CXR_MAX_WAIT_MS="200",
                    # Batches wait up to 200 ms to fill: with the eager default a fast worker
                    # may screen a trickling burst one by one, which is right, but proves nothing here.
                    CXR_BATCH_EAGER="false")
    (tmp_path / "logs").mkdir()
    stack = Stack(log_dir=tmp_path / "logs", env=env)
    stack.start("up", "up", "--port", str(free_port()))
    try:
        db = f"sqlite:///{home / 'cxr.db'}"
        wait_until(lambda: "loaded model bundle" in stack.logs() or stack.assert_running(), timeout=120,
                   describe=stack.logs)
        src = tmp_path / "src"
        src.mkdir()
        for i in range(12):
            write_png(src / f"b{i}.png", seed=50 + i)
        for f in src.iterdir():
            shutil.copy(f, inbox / f.name)

        def done():
            with session_scope(db) as s:
                st = s.scalars(select(Study.status)).all()
            return len(st) == 12 and all(x == "done" for x in st)

        wait_until(done, timeout=180, describe=stack.logs)
        with session_scope(db) as s:
            sizes = [t["batch_size"] for t in s.scalars(select(Result.timings_ms)).all()]
        assert len(sizes) == 12 and max(sizes) > 1, sizes  # studies shared forward passes
    finally:
        codes = stack.stop()
    assert codes["up"] == 0, stack.logs()


@pytest.mark.timeout(120)
def test_a_lone_study_does_not_wait_for_a_batch(tmp_path, tiny_bundle):
    """With nobody else decoding, the batcher runs at once instead of waiting max_wait_ms
    for company (an interactive /predict must not pay for batching). The wait here is ten
    minutes, so only the no-wait path can finish inside the test's timeout."""
    screener = Screener(load_bundle(tiny_bundle), ScreenOptions(heatmaps="none", max_batch=16,
                                                                max_wait_ms=600_000))
    out = screener.screen(write_png(tmp_path / "alone.png", seed=3).read_bytes())
    assert out.status == "done" and out.timings_ms["batch_size"] == 1


@pytest.mark.timeout(120)
def test_a_patient_batcher_waits_to_fill_its_batch(tmp_path, tiny_bundle):
    """With batch_eager off, two studies screened a little apart share one forward pass:
    the first waits (up to max_wait_ms) for company instead of running alone."""
    import threading
    import time

    screener = Screener(load_bundle(tiny_bundle), ScreenOptions(heatmaps="none", max_batch=2, max_wait_ms=60_000,
                                                                batch_eager=False))
    data = [write_png(tmp_path / f"p{i}.png", seed=10 + i).read_bytes() for i in range(2)]
    outs = [None, None]
    first = threading.Thread(target=lambda: outs.__setitem__(0, screener.screen(data[0])))
    first.start()
    time.sleep(1.0)  # the first is alone in the batcher by now
    outs[1] = screener.screen(data[1])
    first.join(timeout=60)
    assert [o.timings_ms["batch_size"] for o in outs] == [2, 2]
