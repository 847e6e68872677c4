#!/usr/bin/env python3
"""Cost of a heatmap: forward pass vs full-model Grad-CAM vs Grad-CAM from the saved
feature map (head only), per image, on one bundle. Prints a table.

    python benchmarks/gradcam.py [--checkpoint models/cxr-default.safetensors] [--threads 1] [--n 20]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from tests.imagegen import chest_like  # noqa: E402
from worker.screening.explain import gradcam, gradcam_from_features  # noqa: E402
from worker.screening.model import load_bundle  # noqa: E402
from worker.screening.preprocess import preprocess  # noqa: E402


def timed(fn, n: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, default=ROOT / "models" / "cxr-default.safetensors")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--n", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_bundle(args.checkpoint)
    m, meta = loaded.model, loaded.meta
    x = preprocess(chest_like(1024).astype(np.float32) / 255, input_size=meta.input_size, in_chans=meta.in_chans,
                   mean=meta.mean, std=meta.std)
    t = torch.from_numpy(x[None])
    with torch.no_grad():
        feats = m.last_conv(t)

    def forward():
        with torch.no_grad():
            m(t)

    fwd = timed(forward, args.n)
    full = timed(lambda: gradcam(m, x, target_class=2), args.n)
    head = timed(lambda: gradcam_from_features(m, feats, target_classes=[2], size=x.shape[1:]), args.n)
    print(f"{meta.architecture}, {meta.input_size} px, {args.threads} thread(s), median of {args.n}\n")
    print("| step | ms / image | × forward |")
    print("|---|---|---|")
    for name, v in (("forward pass (no grad)", fwd), ("Grad-CAM, full model (grad-cam on the network)", full),
                    ("Grad-CAM from the saved feature map (head only)", head)):
        print(f"| {name} | {v:.1f} | {v / fwd:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
