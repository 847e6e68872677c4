"""Fit the polarity weights of worker/screening/content.py on real films and their inverted copies.

    python scripts/fit_polarity.py DATA_DIR/labels.csv [--write]

Reads every film listed in the CSV's ``path`` column (relative to the CSV) through the
worker's own decode, fits a logistic regression without intercept (inverted copy = 0,
film = 1) on ``content.polarity_features``, reports 5-fold cross-validated rates (films
called inverted, inverted copies caught) at the gate's threshold, and with ``--write``
stores the weights fitted on all films in worker/screening/polarity_weights.py.
"""

from __future__ import annotations

import argparse
import csv
import logging
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import KFold

from worker.screening.content import polarity_features, thumbnail
from worker.screening.decode import decode
from worker.screening.gate import POLARITY_THRESHOLD

log = logging.getLogger("fit_polarity")
OUT = Path(__file__).resolve().parents[1] / "worker" / "screening" / "polarity_weights.py"


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("labels", type=Path)
    ap.add_argument("--write", action="store_true", help=f"write the weights to {OUT}")
    ap.add_argument("--C", type=float, default=0.1, help="inverse L2 strength")
    args = ap.parse_args()
    rows = list(csv.DictReader(args.labels.open(newline="")))
    thumbs = [thumbnail(decode((args.labels.parent / r["path"]).read_bytes()).pixels) for r in rows]
    x = np.array([polarity_features(t) for t in thumbs])
    xi = np.array([polarity_features(1.0 - t) for t in thumbs])
    s, si = np.zeros(len(x)), np.zeros(len(x))
    for train, test in KFold(5, shuffle=True, random_state=0).split(x):
        m = LogisticRegression(C=args.C, fit_intercept=False, max_iter=5000)
        m.fit(np.vstack([x[train], xi[train]]), np.r_[np.ones(len(train)), np.zeros(len(train))])
        s[test], si[test] = x[test] @ m.coef_[0], xi[test] @ m.coef_[0]
    t = -POLARITY_THRESHOLD
    log.info("5-fold CV on %d films: films called inverted (score < %g) %d (%.4f); inverted copies caught %d (%.4f)",
             len(x), t, int((s < t).sum()), float((s < t).mean()), int((si < t).sum()), float((si < t).mean()))
    if args.write:
        m = LogisticRegression(C=args.C, fit_intercept=False, max_iter=5000)
        m.fit(np.vstack([x, xi]), np.r_[np.ones(len(x)), np.zeros(len(x))])
        values = ",\n    ".join(", ".join(f"{v:.6f}" for v in m.coef_[0][i:i + 8]) for i in range(0, x.shape[1], 8))
        OUT.write_text(
            '"""Polarity weights for worker.screening.content.polarity_score (written by scripts/fit_polarity.py:\n'
            f'logistic regression, C={args.C}, no intercept, {len(x)} films and their inverted copies)."""\n\n'
            f"WEIGHTS = (\n    {values},\n)\n")
        log.info("wrote %s", OUT)


if __name__ == "__main__":
    main()
