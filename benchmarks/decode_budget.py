"""Peak RSS of a worker's screening threads on images that decode to far more than they weigh.

    python benchmarks/decode_budget.py [--size 5000] [--n 3] [--budgets 100,0]

Each run is a fresh process: it loads the shipped model, generates ``--n`` deflated RGB DICOMs
of ``--size`` x ``--size`` (a few hundred KB each, ``size² x 3`` bytes decoded), and screens
them at once from ``--n`` threads through the worker's own Screener, with
CXR_DECODE_BUDGET_MB set to each of ``--budgets`` (0: no budget). It prints the process's
peak RSS and the budget's peak bytes in flight.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

log = logging.getLogger("decode_budget")


def one_run(size: int, n: int, budget_mb: float) -> dict:
    from cxr.settings import DEFAULT_BUNDLE, Settings
    from tests.test_decode_budget import deflated_dicom
    from worker.screening.model import load_bundle
    from worker.screening.pipeline import Screener
    from worker.service import screen_options

    settings = Settings(checkpoint=DEFAULT_BUNDLE, decode_budget_mb=budget_mb or 1e9, heatmaps="none", max_batch=1)
    screener = Screener(load_bundle(DEFAULT_BUNDLE, device="cpu"), screen_options(settings))
    files = [deflated_dicom(size, size, samples=3, value=40 + 10 * i) for i in range(n)]
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with ThreadPoolExecutor(n) as pool:
        outcomes = list(pool.map(screener.screen, files))
    return {"budget_mb": budget_mb, "file_kb": round(len(files[0]) / 1024), "statuses": [o.status for o in outcomes],
            "rss_before_mb": round(base / 1024), "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                                                                     / 1024),
            "budget_peak_mb": round(screener.budget.peak / 1048576, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=5000)
    ap.add_argument("--n", type=int, default=3)
    ap.add_argument("--budgets", default="100,0", help="CXR_DECODE_BUDGET_MB values, comma-separated; 0: none")
    ap.add_argument("--one", type=float, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one is not None:
        sys.stdout.write(json.dumps(one_run(args.size, args.n, args.one)) + "\n")
        return
    logging.basicConfig(level="INFO", format="%(message)s")
    log.info("%d x %d RGB deflated DICOM, %d at once; decoded %.0f MB each", args.size, args.size, args.n,
             args.size * args.size * 3 / 1048576)
    for budget in (float(b) for b in args.budgets.split(",")):
        out = subprocess.run([sys.executable, __file__, "--size", str(args.size), "--n", str(args.n), "--one",
                              str(budget)], capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        log.info("budget %s: file %s KB, peak RSS %s MB (%s MB before screening), budget peak %s MB, %s",
                 f"{budget:g} MB" if budget else "none", r["file_kb"], r["peak_rss_mb"], r["rss_before_mb"],
                 r["budget_peak_mb"], r["statuses"])


if __name__ == "__main__":
    main()
