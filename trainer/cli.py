"""Trainer commands, registered on the ``cxr`` command line (and ``python -m trainer``)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Optional

import typer

log = logging.getLogger("cxr.trainer")


def register(app: typer.Typer) -> None:
    app.command("train")(train_cmd)
    app.command("evaluate")(evaluate_cmd)
    app.command("calibrate")(calibrate_cmd)
    app.command("download")(download_cmd)


def train_cmd(
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML config (see configs/).")] = None,
    data: Annotated[Optional[str], typer.Option(help="Override data.source: a CSV or a folder per class.")] = None,
    out: Annotated[Optional[str], typer.Option(help="Override the output folder.")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Override the number of epochs.")] = None,
    resume: Annotated[Optional[Path], typer.Option(help="Resume from a last.pt checkpoint.")] = None,
) -> None:
    """Train a model and write a bundle (`<out>/model.safetensors`) the workers can load.

    The recipe (architecture, progressive unfreezing, AdamW, warm-up + cosine, label
    smoothing, class weights, early stopping on validation macro AUC, augmentation) is all in
    the YAML config. Images are decoded by the worker's own code. The split is by patient or
    duplicate group, never by image; the held-out test split is written to `<out>/test.csv`
    for `cxr evaluate`. After training, a temperature and per-class operating points are
    fitted on the validation split and stored in the bundle.
    """
    from trainer.config import load_config
    from trainer.train import train

    cfg = load_config(config, **{"data.source": data, "out": out, "epochs": epochs})
    if not cfg.data.source:
        raise typer.BadParameter("no training data: set data.source in the config or pass --data")
    bundle = train(cfg, resume=resume)
    typer.echo(str(bundle))


def evaluate_cmd(
    checkpoint: Annotated[Path, typer.Option(help="Bundle to evaluate.")],
    data: Annotated[str, typer.Option(help="A CSV (path,label[,patient_id][,source]) or a folder per class.")],
    out: Annotated[Path, typer.Option(help="Report folder.")] = Path("reports/eval"),
    source_column: Annotated[str, typer.Option(
        help="CSV column for the per-source breakdown; `auto`: `source` if the CSV has it, else `source_repo` "
             "(the shared development set's column).")] = "auto",
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples for the AUC CIs (0 = none).")] = 1000,
) -> None:
    """Evaluate a bundle: metrics.json (accuracy, per-class precision/recall/F1/AUC with
    bootstrap 95% CIs, macro AUC, confusion matrix, ECE, sensitivity/specificity at the
    bundle's operating points, per-source breakdown), roc.png, confusion.png,
    calibration.png, gradcam_grid.png and summary.md."""
    from trainer.config import DataConfig
    from trainer.evaluate import evaluate

    if source_column == "auto":
        source_column = detect_source_column(Path(data))
    m = evaluate(checkpoint, DataConfig(source=data, source_column=source_column), out, bootstrap=bootstrap)
    typer.echo((out / "summary.md").read_text())
    gate = m["data"]["gate"]
    refused = ", ".join(f"{c} {n}" for c, n in gate["refused"].items()) or "none"
    notes = ", ".join(f"{c} {n}" for c, n in gate["notes"].items())
    typer.echo(f"quality gate (as the service runs it): {gate['n_refused']} of {m['data']['n_listed']} films "
               f"refused ({refused})" + (f"; changed on the way: {notes}" if notes else ""))
    log.info("accuracy %.4f, macro AUC %.4f, ECE %.4f -> %s", m["accuracy"], m["macro_auc"], m["ece"], out)


def detect_source_column(data: Path) -> str:
    """``source`` when the CSV has that column, else ``source_repo`` when it has that, else ``source``."""
    import csv

    if data.is_file():
        with data.open(newline="") as f:
            header = next(csv.reader(f), [])
        for name in ("source", "source_repo"):
            if name in header:
                return name
    return "source"


def calibrate_cmd(
    checkpoint: Annotated[Path, typer.Option(help="Bundle to calibrate again (left unchanged).")],
    data: Annotated[str, typer.Option(help="Labelled images never trained on: a CSV (path,label[,...]) such as the "
                                           "val.csv `cxr train` writes, or a folder per class.")],
    out: Annotated[Path, typer.Option(help="The new bundle: same weights, new calibration and operating points.")],
    method: Annotated[str, typer.Option(help="temperature, or temperature+bias (also per-class logit offsets).")]
        = "temperature+bias",
    target: Annotated[Optional[list[str]], typer.Option(
        help="CLASS=SENSITIVITY for an operating point, e.g. Tuberculosis=0.95; repeat for several. "
             "Default: the targets the bundle was trained with.")] = None,
    ood_fit: Annotated[Optional[str], typer.Option(
        help="The films the network was trained on (e.g. the train.csv `cxr train` writes): also fit the "
             "out-of-distribution gate on them and the OOD and uncertainty thresholds on --data.")] = None,
    ood_quantile: Annotated[float, typer.Option(
        help="With --ood-fit: refuse films whose OOD score is above this quantile of --data's scores.")] = 0.99,
    refer_fraction: Annotated[float, typer.Option(
        help="With --ood-fit: the fraction of --data the uncertainty threshold marks uncertain (refer for "
             "review).")] = 0.2,
    uncertainty: Annotated[Optional[str], typer.Option(
        help="With --ood-fit: the uncertainty measure (mc-dropout-bald, mc-dropout-entropy, softmax-response); "
             "default: the one with the lowest area under --data's risk-coverage curve.")] = None,
) -> None:
    """Fit the calibration (temperature and per-class logit offsets) and the operating points
    again on labelled data, and write a new bundle with the same weights.

    For a programme whose population or scanners differ from the training data: calibrate on
    a few hundred of its own labelled films, check the result with `cxr evaluate` on others,
    then `cxr model activate` it. Ranking (AUC) does not change; probabilities, argmax
    classes and the `flagged` operating points do.

    With --ood-fit TRAIN.csv it also fits the out-of-distribution gate (Mahalanobis distance of
    the pooled features, Lee et al. 2018; refused as `not_chest`) and the MC-dropout
    uncertainty threshold (`uncertain`: refer for review)."""
    from trainer.calibrate import METHODS
    from trainer.config import DataConfig
    from trainer.recalibrate import recalibrate

    if method not in METHODS:
        raise typer.BadParameter(f"use one of {', '.join(METHODS)}", param_hint="--method")
    targets = None
    if target:
        try:
            targets = {k: float(v) for k, v in (t.split("=", 1) for t in target)}
        except ValueError:
            raise typer.BadParameter("write CLASS=SENSITIVITY, e.g. Tuberculosis=0.95", param_hint="--target")
    try:
        r = recalibrate(checkpoint, DataConfig(source=data), out, method=method, targets=targets,
                        ood_fit=DataConfig(source=ood_fit) if ood_fit else None, ood_quantile=ood_quantile,
                        refer_fraction=refer_fraction, uncertainty_method=uncertainty)
    except ValueError as e:
        typer.secho(str(e), err=True, fg=typer.colors.RED)
        raise typer.Exit(2)
    typer.echo(f"{out} (version {r['version']}), calibrated on {r['n']} images with {r['method']}:")
    typer.echo("| | before | after |\n|---|---|---|")
    typer.echo(f"| temperature | {r['temperature'][0]:.3f} | {r['temperature'][1]:.3f} |")
    typer.echo(f"| logit offsets | {', '.join(f'{b:+.3f}' for b in r['logit_bias'][0])} | "
               f"{', '.join(f'{b:+.3f}' for b in r['logit_bias'][1])} |")
    typer.echo(f"| negative log-likelihood | {r['nll'][0]:.4f} | {r['nll'][1]:.4f} |")
    typer.echo(f"| accuracy | {r['accuracy'][0]:.3f} | {r['accuracy'][1]:.3f} |")
    typer.echo(f"| ECE | {r['ece'][0]:.3f} | {r['ece'][1]:.3f} |")
    for cls, t in r["thresholds"][1].items():
        typer.echo(f"| {cls} threshold | {r['thresholds'][0].get(cls, float('nan')):.3f} | {t:.3f} |")
    if r.get("reliability"):
        rel = r["reliability"]
        typer.echo(f"| OOD threshold ({rel['ood']['method']}) | | {rel['ood']['threshold']:.1f} |")
        typer.echo(f"| refused by the OOD gate on --data | | {rel['ood']['val_refused']:.1%} |")
        typer.echo(f"| uncertainty threshold ({rel['uncertainty']['method']}, "
                   f"{rel['uncertainty']['chosen_by']}) | | {rel['uncertainty']['threshold']:.4f} |")
        for name, v in rel["measures"].items():
            typer.echo(f"| {name}: accuracy at 80% coverage / AURC | | {v['accuracy_at_80pct_coverage']:.3f} / "
                       f"{v['aurc']:.4f} |")
    typer.echo("These figures are on the calibration data itself; judge the bundle with `cxr evaluate` on other films.")


DEFAULT_DATASETS = [
    "paultimothymooney/chest-xray-pneumonia",  # Kermany et al. 2018, paediatric, NORMAL/PNEUMONIA, CC BY 4.0
    "tawsifurrahman/tuberculosis-tb-chest-xray-dataset",  # Rahman et al. 2020, Normal/Tuberculosis
]


def download_cmd(
    dataset: Annotated[Optional[list[str]], typer.Option(help="Kaggle dataset OWNER/SLUG; repeat for several.")] = None,
    dest: Annotated[Path, typer.Option(help="Where the DEST/ClassName/ folders are written.")] = Path("data/raw"),
) -> None:
    """Download Kaggle datasets and normalise them into DEST/ClassName/ image folders.

    Default: the Kermany paediatric pneumonia set and the TB Chest X-ray Database. Any
    archive whose folders are named after the classes (any case) works. Credentials come
    from KAGGLE_USERNAME/KAGGLE_KEY or ~/.kaggle/kaggle.json. Then: `cxr train --data DEST`.
    """
    from cxr import CLASS_NAMES_DEFAULT
    from trainer.download import DownloadError, download

    totals = {c: 0 for c in CLASS_NAMES_DEFAULT}
    for slug in dataset or DEFAULT_DATASETS:
        try:
            counts = download(slug, dest, list(CLASS_NAMES_DEFAULT))
        except DownloadError as e:
            typer.secho(str(e), err=True, fg=typer.colors.RED)
            raise typer.Exit(2)
        for c, n in counts.items():
            totals[c] += n
    typer.echo(" ".join(f"{c}={n}" for c, n in totals.items()) + f" -> {dest}")
