#!/usr/bin/env python3
"""What CXR_DICOM_OUTBOX costs a worker per DICOM study: building and writing the SR and the
Secondary Capture (512 px RGB overlay) for pydicom-data's RG1 chest, median of N runs.

    python benchmarks/dicom_outputs.py [--runs 20]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    import numpy as np
    from PIL import Image
    from pydicom.data import get_testdata_file

    from worker.dicom_out import Findings, write_outputs

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    source = Path(get_testdata_file("RG1_UNCR.dcm"))
    findings = Findings(probabilities={"Normal": 0.2, "Pneumonia": 0.3, "Tuberculosis": 0.5},
                        predicted_class="Tuberculosis", risk=0.8, flagged=True, model_name="efficientnet_b0",
                        model_version="bench", thresholds={"Tuberculosis": 0.3})
    with tempfile.TemporaryDirectory() as tmp:
        overlay = Path(tmp) / "overlay.png"
        Image.fromarray((np.random.default_rng(0).random((512, 482, 3)) * 255).astype(np.uint8)).save(overlay)
        outbox = Path(tmp) / "outbox"
        write_outputs(outbox, name="warm-up", source_path=source, findings=findings, overlay_path=overlay)
        for label, ov in (("SR + SC", overlay), ("SR only", None)):
            times = []
            for i in range(args.runs):
                t = time.perf_counter()
                write_outputs(outbox, name=f"s{i}", source_path=source, findings=findings, overlay_path=ov)
                times.append((time.perf_counter() - t) * 1e3)
            print(f"{label}: median {statistics.median(times):.1f} ms, max {max(times):.1f} ms over {args.runs} runs")


if __name__ == "__main__":
    main()
