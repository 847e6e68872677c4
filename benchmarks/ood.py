"""How much non-chest material the service refuses, and how many chest films it wrongly refuses.

    python benchmarks/ood.py --checkpoint models/cxr-default.safetensors \
        --chest-csv reports/model-default/test_split.csv [--limit 400] [--out reports/ood]

Kinds of input, all obtainable offline:
- chest films: the rows of ``--chest-csv`` (a held-out split), and the same films inverted to
  negatives (a MONOCHROME1 export without its inversion), saved as PNG;
- pydicom's own test files, grouped by modality (CT, MR, US, NM, OT/SC ...), and the CR
  extremity films among them;
- scikit-image's sample photographs and illustrations (``pip install scikit-image``);
- rendered documents (pages of text in several sizes);
- blank images (uniform black, grey, white, with and without a little noise) and noise.

For each file it prints whether the whole service refuses it (``Screener.screen``: the header
gate, decode, the content checks and the out-of-distribution gate, any code), and whether the
out-of-distribution score alone would (decoded without the gate). A table; nothing is asserted.
"""

from __future__ import annotations

import argparse
import collections
import csv
import io
import json
import logging
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from worker.screening.decode import ImageDecodeError  # noqa: E402
from worker.screening.model import load_bundle  # noqa: E402
from worker.screening.pipeline import ScreenOptions, Screener, model_input  # noqa: E402
from worker.screening.reliability import pooled_features  # noqa: E402


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def chest_inputs(csv_path: Path, limit: int) -> tuple[list[tuple[str, bytes]], list[tuple[str, bytes]]]:
    rows = list(csv.DictReader(csv_path.open(newline="")))[:limit]
    films, inverted = [], []
    for r in rows:
        p = Path(r["path"])
        if not p.is_absolute():
            p = (csv_path.parent / p).resolve()
        data = p.read_bytes()
        films.append((p.name, data))
        grey = np.asarray(Image.open(io.BytesIO(data)).convert("L"))
        inverted.append((f"inverted {p.name}", png(255 - grey)))
    return films, inverted


def pydicom_inputs() -> dict[str, list[tuple[str, bytes]]]:
    import pydicom
    from pydicom.data import get_testdata_files

    kinds: dict[str, list[tuple[str, bytes]]] = collections.defaultdict(list)
    seen = set()
    for f in get_testdata_files("*.dcm"):
        name = Path(f).name
        if name in seen:
            continue
        seen.add(name)
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True, force=True)
        except Exception:  # noqa: BLE001 - pydicom's deliberately broken test files
            continue
        if "PixelData" not in ds and (0x7FE0, 0x0010) not in ds:
            try:
                if "PixelData" not in pydicom.dcmread(f, force=True):
                    continue
            except Exception:  # noqa: BLE001
                continue
        modality = str(ds.get("Modality") or "none")
        body = str(ds.get("BodyPartExamined") or "").upper()
        if modality in ("CR", "DX") and body == "CHEST":
            continue  # chest films: not non-chest material
        kind = f"DICOM {modality} {body.lower()}" if modality in ("CR", "DX") else f"DICOM {modality}"
        kinds[kind].append((name, Path(f).read_bytes()))
    return kinds


def skimage_inputs() -> list[tuple[str, bytes]]:
    try:
        import skimage.data as d
    except ImportError:
        logging.warning("scikit-image is not installed: no sample photographs (pip install scikit-image)")
        return []
    out = []
    for name in ("astronaut", "brick", "camera", "cat", "checkerboard", "chelsea", "clock", "coffee", "coins",
                 "colorwheel", "grass", "gravel", "horse", "hubble_deep_field", "immunohistochemistry", "logo",
                 "microaneurysms", "moon", "page", "retina", "rocket", "text", "shepp_logan_phantom", "cell",
                 "binary_blobs"):
        try:
            im = np.asarray(getattr(d, name)())
        except Exception:  # noqa: BLE001 - a sample that needs a download (pooch) is skipped
            continue
        if im.dtype == bool:
            im = im.astype(np.uint8) * 255
        if im.dtype != np.uint8:
            im = (255 * (im - im.min()) / max(1e-9, float(im.max() - im.min()))).astype(np.uint8)
        if im.ndim == 3 and im.shape[2] == 4:
            im = im[:, :, :3]
        if min(im.shape[:2]) < 300:  # upscale small samples so the size gate does not decide alone
            scale = int(np.ceil(300 / min(im.shape[:2])))
            im = np.asarray(Image.fromarray(im).resize((im.shape[1] * scale, im.shape[0] * scale)))
        out.append((name, png(im)))
    return out


def document_inputs(n: int = 12) -> list[tuple[str, bytes]]:
    rng = np.random.default_rng(3)
    words = "patient screening report chest radiograph findings impression normal lungs clear heart size".split()
    out = []
    for i in range(n):
        w, h = (850, 1100) if i % 2 else (1100, 850)
        im = Image.new("L", (w, h), 255 if i % 3 else 235)
        draw = ImageDraw.Draw(im)
        size = 12 + 4 * (i % 4)
        try:
            font = ImageFont.load_default(size=size)
        except TypeError:
            font = ImageFont.load_default()
        y = 40
        while y < h - 40:
            draw.text((40, y), " ".join(rng.choice(words, 8)), fill=0, font=font)
            y += size + 8
        out.append((f"document {i}", png(np.asarray(im))))
    return out


def blank_and_noise_inputs() -> list[tuple[str, bytes]]:
    rng = np.random.default_rng(5)
    out = []
    for v in (0, 40, 128, 200, 255):
        out.append((f"uniform {v}", png(np.full((512, 512), v, np.uint8))))
        noisy = np.clip(v + rng.normal(0, 3, (512, 512)), 0, 255).astype(np.uint8)
        out.append((f"uniform {v} + noise", png(noisy)))
    out.append(("gradient", png(np.tile(np.linspace(0, 255, 512).astype(np.uint8), (512, 1)))))
    for i in range(5):
        out.append((f"uniform noise {i}", png(rng.integers(0, 256, (512, 512), dtype=np.uint8))))
        out.append((f"gaussian noise {i}", png(np.clip(rng.normal(128, 50, (512, 512)), 0, 255).astype(np.uint8))))
    return out


def ood_alone(screener: Screener, data: bytes) -> bool | None:
    """True when the OOD score alone (no header gate, no content checks) is above the threshold."""
    meta, loaded = screener.meta, screener.loaded
    try:
        _, x, _ = model_input(data, meta)
    except ImageDecodeError:
        return None
    with torch.no_grad():
        pooled = pooled_features(loaded.model, loaded.model.last_conv(torch.from_numpy(x[None])))
    return bool(loaded.ood.score(pooled)[0] > meta.ood_threshold)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, required=True, help="a bundle with OOD statistics (cxr calibrate --ood-fit)")
    ap.add_argument("--chest-csv", type=Path, help="held-out chest films (path,label,...); paths relative to the CSV")
    ap.add_argument("--limit", type=int, default=400, help="at most this many chest films")
    ap.add_argument("--out", type=Path, help="also write the figures as JSON here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    loaded = load_bundle(args.checkpoint)
    if loaded.ood is None:
        ap.error(f"{args.checkpoint} has no out-of-distribution statistics; fit them with "
                 "`cxr calibrate --ood-fit train.csv ...`")
    torch.set_num_threads(1)
    screener = Screener(loaded, ScreenOptions(heatmaps="none"))
    kinds: dict[str, list[tuple[str, bytes]]] = {}
    if args.chest_csv:
        kinds["chest films (held out)"], kinds["chest films inverted (negatives)"] = chest_inputs(args.chest_csv,
                                                                                                  args.limit)
    kinds.update(sorted(pydicom_inputs().items()))
    kinds["photographs and illustrations (scikit-image)"] = skimage_inputs()
    kinds["rendered documents"] = document_inputs()
    kinds["blank and noise images"] = blank_and_noise_inputs()
    rows, report = [], {}
    for kind, items in kinds.items():
        if not items:
            continue
        refused, alone, decodable, codes = 0, 0, 0, collections.Counter()
        for _, data in items:
            out = screener.screen(data)
            if out.status != "done":
                refused += 1
                codes[out.reject_code] += 1
            a = ood_alone(screener, data)
            if a is not None:
                decodable += 1
                alone += a
        report[kind] = {"n": len(items), "refused": refused, "ood_alone": alone, "ood_decodable": decodable,
                        "codes": dict(codes)}
        rows.append((kind, len(items), f"{refused}/{len(items)} ({refused / len(items):.0%})",
                     f"{alone}/{decodable} ({alone / decodable:.0%})" if decodable else "-",
                     ", ".join(f"{c} {n}" for c, n in codes.most_common())))
    head = ("kind", "n", "refused by the service", "refused by the OOD score alone", "codes")
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    print(f"bundle {args.checkpoint} (version {loaded.meta.version}), OOD threshold {loaded.meta.ood_threshold:.1f}")
    for r in [head, tuple("-" * w for w in widths), *rows]:
        print("| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |")
    non_chest = [v for k, v in report.items() if not k.startswith("chest films")]
    total = sum(v["n"] for v in non_chest)
    print(f"non-chest material refused by the service: {sum(v['refused'] for v in non_chest)}/{total}; "
          f"by the OOD score alone: {sum(v['ood_alone'] for v in non_chest)}/"
          f"{sum(v['ood_decodable'] for v in non_chest)} of those that decode")
    for k in ("chest films (held out)", "chest films inverted (negatives)"):
        if k in report:
            print(f"{k}: {report[k]['refused']}/{report[k]['n']} refused (negatives are inverted back by the "
                  "polarity check and screened, not refused)" if "inverted" in k else
                  f"{k}: {report[k]['refused']}/{report[k]['n']} refused")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "ood.json").write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
