#!/usr/bin/env python3
"""Bare forward throughput per engine: tensors already in memory, studies/s by batch size.

    python benchmarks/engines.py [--checkpoint models/cxr-default.safetensors] [--threads 1] [--seconds 3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from worker.screening.model import load_bundle  # noqa: E402
from worker.screening.pipeline import ScreenOptions, Screener  # noqa: E402


def rate(fn, batch: int, seconds: float) -> float:
    fn()  # warm-up
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        n += batch
    return n / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, default=ROOT / "models" / "cxr-default.safetensors")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--batches", default="1,8,16")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_bundle(args.checkpoint)
    meta = loaded.meta
    batches = [int(b) for b in args.batches.split(",")]
    with tempfile.TemporaryDirectory() as cache:
        engines = {name: Screener(loaded, ScreenOptions(engine=name, threads=args.threads, cache_dir=Path(cache)))
                   for name in ("torch", "onnx")}
        rows = {}
        for name, screener in engines.items():
            for b in batches:
                x = np.random.default_rng(0).standard_normal((b, meta.in_chans, meta.input_size, meta.input_size),
                                                             dtype=np.float32)
                rows[(name, b)] = rate(lambda: screener.forward(x), b, args.seconds)
    print(f"{meta.architecture}, {meta.input_size} px, {args.threads} thread(s), {args.seconds:.0f} s per cell; "
          "studies/s (logits + conv_head features)\n")
    print("| engine | " + " | ".join(f"batch {b}" for b in batches) + " |")
    print("|---|" + "---|" * len(batches))
    for name in engines:
        print(f"| {name} | " + " | ".join(f"{rows[(name, b)]:.1f}" for b in batches) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
