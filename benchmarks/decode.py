"""Decode + preprocess cost per image, for each input format the worker accepts.

    python benchmarks/decode.py [--repeats 5] [--input-size 224]

Images are generated (the synthetic chest of tests/imagegen.py: smooth anatomy plus 5 %
noise, so they compress worse than real films). Each row times the worker's own code:
``open_image`` + ``decode_pixels`` (DICOM: Modality LUT, VOI, MONOCHROME1), then
``preprocess`` to the model input. The median of ``--repeats`` runs, after one warm-up.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from tests.dicomgen import chest_dataset, encode, missing_encoder, to_bytes  # noqa: E402
from tests.imagegen import chest_like  # noqa: E402
from worker.screening.decode import decode_pixels, open_image  # noqa: E402
from worker.screening.preprocess import preprocess  # noqa: E402


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def jpeg(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def inputs() -> list[tuple[str, Callable[[], bytes] | str]]:
    """(label, bytes factory or the reason it cannot be made here)."""
    dicom = chest_dataset(2048, bits=12)

    def dcm(key: str) -> Callable[[], bytes] | str:
        return missing_encoder(key) or (lambda: encode(dicom, key))

    return [
        ("PNG 8-bit 1024²", lambda: png(chest_like(1024))),
        ("PNG 16-bit 2048²", lambda: png(chest_like(2048, bits=16))),
        ("JPEG 8-bit 2048² (q90)", lambda: jpeg(chest_like(2048))),
        ("DICOM uncompressed 2048² 12-bit", lambda: to_bytes(dicom)),
        ("DICOM JPEG 2000 lossless 2048²", dcm("j2k")),
        ("DICOM JPEG-LS lossless 2048²", dcm("jpeg_ls")),
        ("DICOM RLE 2048²", dcm("rle")),
        ("DICOM JPEG Lossless SV1 2048²", dcm("jpeg_lossless_sv1")),
    ]


def bench(data: bytes, *, repeats: int, input_size: int) -> tuple[float, float]:
    dec, total = [], []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        pixels = decode_pixels(open_image(data))
        t1 = time.perf_counter()
        preprocess(pixels, input_size=input_size, in_chans=1, mean=[0.5], std=[0.5])
        t2 = time.perf_counter()
        if i:  # the first run warms caches and imports
            dec.append((t1 - t0) * 1e3)
            total.append((t2 - t0) * 1e3)
    return statistics.median(dec), statistics.median(total)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--input-size", type=int, default=224)
    args = ap.parse_args()
    rows = []
    for label, make in inputs():
        if isinstance(make, str):
            rows.append((label, "-", "-", "-", f"not measured: {make}"))
            continue
        data = make()
        d, t = bench(data, repeats=args.repeats, input_size=args.input_size)
        rows.append((label, f"{len(data) / 1e6:.2f}", f"{d:.1f}", f"{t:.1f}", ""))
    header = ("input", "MB", "decode ms", f"decode + preprocess to {args.input_size}² ms", "note")
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    print(line(header))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print(line(r))
    print(f"\nmedian of {args.repeats} runs after a warm-up; one process, {sys.platform}, "
          f"numpy {np.__version__}")


if __name__ == "__main__":
    main()
