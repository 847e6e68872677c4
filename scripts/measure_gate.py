"""Measure the quality gate on a labelled set of real films (not a test: needs the films).

    python scripts/measure_gate.py DATA_DIR/labels.csv [--input-size 224]

For every film listed (CSV column ``path``, relative to the CSV): the gate's verdict as the
service would give it for a model of ``--input-size`` (refusals by code), the least
``content.detail`` seen (the blank check's margin), and the polarity check on the film and
on its inverted copy (films called negative; negatives caught).
"""

from __future__ import annotations

import argparse
import csv
import logging
from collections import Counter
from pathlib import Path

import numpy as np

from worker.screening.content import detail, polarity_score
from worker.screening.decode import ImageDecodeError, decode
from worker.screening.gate import MIN_DETAIL, POLARITY_THRESHOLD
from worker.screening.pipeline import ScreenOptions, gated_pixels

log = logging.getLogger("measure_gate")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("labels", type=Path)
    ap.add_argument("--input-size", type=int, default=224)
    args = ap.parse_args()
    rows = list(csv.DictReader(args.labels.open(newline="")))
    options = ScreenOptions().for_input_size(args.input_size)
    refused, details, scores, inverted_scores = Counter(), [], [], []
    for r in rows:
        data = (args.labels.parent / r["path"]).read_bytes()
        try:
            gated_pixels(data, options)
        except ImageDecodeError as e:
            refused[e.code] += 1
            log.info("refused %s: %s", r["path"], e)
        pixels = decode(data).pixels
        details.append(detail(pixels))
        if decode(data).format in ("png", "jpeg"):
            scores.append(polarity_score(pixels))
            inverted_scores.append(polarity_score(1.0 - pixels))
    d, s, si = np.array(details), np.array(scores), np.array(inverted_scores)
    log.info("%d films, gate for a %d px model (shortest side %d px): refused %d %s", len(rows), args.input_size,
             options.gate.effective_min_size, sum(refused.values()), dict(refused))
    log.info("blank check: %d films under %.2f; least detail %.3f (1st percentile %.3f)", int((d < MIN_DETAIL).sum()),
             MIN_DETAIL, d.min(), np.percentile(d, 1))
    log.info("polarity (PNG/JPEG, %d films): films called negative %d (%.4f); inverted copies caught %d (%.4f)",
             len(s), int((s < -POLARITY_THRESHOLD).sum()), float((s < -POLARITY_THRESHOLD).mean()),
             int((si < -POLARITY_THRESHOLD).sum()), float((si < -POLARITY_THRESHOLD).mean()))


if __name__ == "__main__":
    main()
