"""DICOM outputs for PACS: a Structured Report and a heatmap Secondary Capture per study.

For each screened study that came in as DICOM, with CXR_DICOM_OUTBOX set, two files are
written into the outbox, both in the source's study (same StudyInstanceUID, patient and
accession), each in a new series of its own:

* ``<study id>.SR.dcm``: a Comprehensive SR (built with highdicom) with coded findings:
  the predicted class (SNOMED CT where one exists), per-class probabilities, the risk, the
  flag, the operating-point threshold of each class, the algorithm's name and version (the
  DCM codes of TID 4019), the "not for clinical use" statement, and an IMAGE reference to
  the source SOP instance (also listed as evidence).
* ``<study id>.SC.dcm``: the Grad-CAM overlay as a Secondary Capture (RGB), with a band
  burned in above the image that says "AI OUTPUT - NOT FOR CLINICAL USE"
  (BurnedInAnnotation YES), referencing the source image (SourceImageSequence). Written only
  when the study has an overlay (CXR_HEATMAPS=all, or flagged and the study is flagged).

Each file is written to a temporary name in the outbox and renamed, so whatever reads the
outbox never sees a half-written file. The builders are pure functions of the source header
and the result; :func:`write_outputs` is what the worker calls.
"""

from __future__ import annotations

import logging
import os
import uuid
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset

from cxr import DISCLAIMER, __version__

log = logging.getLogger(__name__)

MANUFACTURER = "cxr-screen"
LABEL = "AI OUTPUT - NOT FOR CLINICAL USE"
SC_SERIES_NUMBER = 9901  # series numbers of our outputs, out of the way of the modality's
SR_SERIES_NUMBER = 9902
SC_SERIES_DESCRIPTION = "AI heatmap overlay - not for clinical use"
SR_SERIES_DESCRIPTION = "AI screening report - not for clinical use"

LOCAL = "99CXRSCR"  # private coding scheme for what no standard code names
UNITLESS = hd.sr.CodedConcept("1", "UCUM", "no units")
YES = hd.sr.CodedConcept("373066001", "SCT", "Yes")
NO = hd.sr.CodedConcept("373067005", "SCT", "No")
FINDING_CODES = {
    "normal": hd.sr.CodedConcept("17621005", "SCT", "Normal"),
    "pneumonia": hd.sr.CodedConcept("233604007", "SCT", "Pneumonia"),
    "tuberculosis": hd.sr.CodedConcept("56717001", "SCT", "Tuberculosis"),
}
REPORT_TITLE = hd.sr.CodedConcept("18748-4", "LN", "Diagnostic imaging report")
PROCEDURE_REPORTED = hd.sr.CodedConcept("121058", "DCM", "Procedure reported")
CHEST_XRAY = hd.sr.CodedConcept("399208008", "SCT", "Plain chest X-ray")
FINDINGS = hd.sr.CodedConcept("121070", "DCM", "Findings")
FINDING = hd.sr.CodedConcept("121071", "DCM", "Finding")
SOURCE = hd.sr.CodedConcept("260753009", "SCT", "Source")
ALGORITHM_NAME = hd.sr.CodedConcept("111001", "DCM", "Algorithm Name")
ALGORITHM_VERSION = hd.sr.CodedConcept("111003", "DCM", "Algorithm Version")
COMMENT = hd.sr.CodedConcept("121106", "DCM", "Comment")
RISK = hd.sr.CodedConcept("RISK", LOCAL, "Risk score (1 - P(Normal))")
FLAGGED = hd.sr.CodedConcept("FLAGGED", LOCAL, "Flagged for review")
UNCERTAINTY = hd.sr.CodedConcept("UNCERT", LOCAL, "Model uncertainty (MC dropout mutual information)")
UNCERTAIN = hd.sr.CodedConcept("UNCERTAIN", LOCAL, "Uncertain: refer for review")
OOD_SCORE = hd.sr.CodedConcept("OODSCORE", LOCAL, "Out-of-distribution score")

STATEMENT = f"{DISCLAIMER} AI output of an automated screening aid; not a diagnosis."


class DicomOutputError(Exception):
    """The outputs cannot be built from this source (e.g. its header lacks a UID)."""


@dataclass(frozen=True)
class Findings:
    """What the SR says: one study's result and the model that produced it."""

    probabilities: dict[str, float]
    predicted_class: str
    risk: float
    flagged: bool
    model_name: str
    model_version: str
    thresholds: dict[str, float] = field(default_factory=dict)  # operating point per class; empty: argmax rule
    uncertainty: float | None = None  # None: the model computes none
    uncertain: bool | None = None
    ood_score: float | None = None


def finding_code(class_name: str, index: int) -> hd.sr.CodedConcept:
    """SNOMED CT for the classes that have one, else a local code."""
    return FINDING_CODES.get(class_name.lower()) or hd.sr.CodedConcept(f"CLASS{index}", LOCAL, class_name[:64])


def _num(code: str, meaning: str, value: float) -> hd.sr.NumContentItem:
    return hd.sr.NumContentItem(name=hd.sr.CodedConcept(code, LOCAL, meaning[:64]), value=round(float(value), 6),
                                unit=UNITLESS, relationship_type="CONTAINS")


@contextmanager
def _quiet_names():
    """highdicom warns about oddly formed person names in the source, quoting the name: a
    patient's or physician's name must not reach the logs, and the name is the source's."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"The string .* is unlikely to represent", category=UserWarning)
        yield


# Patient and study attributes the outputs copy from the source. They are type 2 (present,
# maybe empty) in the source's IOD and in ours; a source that omits one gets it empty here.
TYPE2_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                "ReferringPhysicianName", "StudyID", "AccessionNumber")


def _source_header(source: Dataset) -> Dataset:
    """A copy of the source header fit to copy from: its UIDs checked, type 2 attributes present."""
    missing = [k for k in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
               if not source.get(k)]
    if missing:
        raise DicomOutputError(f"the source header has no {', '.join(missing)}")
    header = Dataset()
    header.update({elem.tag: elem for elem in source if elem.tag != 0x7FE00010})  # never the pixels
    for keyword in TYPE2_COPIED:
        if keyword not in header:
            setattr(header, keyword, "")
    return header


def build_sr(source: Dataset, findings: Findings) -> hd.sr.ComprehensiveSR:
    """The Structured Report for one source image (its header is enough)."""
    source = _source_header(source)
    classes = list(findings.probabilities)
    results = [hd.sr.CodeContentItem(name=FINDING, value=finding_code(findings.predicted_class,
                                                                      classes.index(findings.predicted_class)),
                                     relationship_type="CONTAINS")]
    results += [_num(f"PROB{i}", f"Probability of {c}", findings.probabilities[c]) for i, c in enumerate(classes)]
    results.append(hd.sr.NumContentItem(name=RISK, value=round(findings.risk, 6), unit=UNITLESS,
                                        relationship_type="CONTAINS"))
    results += [_num(f"THRESH{i}", f"Operating point threshold for {c}", findings.thresholds[c])
                for i, c in enumerate(classes) if c in findings.thresholds]
    results.append(hd.sr.CodeContentItem(name=FLAGGED, value=YES if findings.flagged else NO,
                                         relationship_type="CONTAINS"))
    if findings.uncertainty is not None:
        results.append(hd.sr.NumContentItem(name=UNCERTAINTY, value=round(findings.uncertainty, 6), unit=UNITLESS,
                                            relationship_type="CONTAINS"))
    if findings.uncertain is not None:
        results.append(hd.sr.CodeContentItem(name=UNCERTAIN, value=YES if findings.uncertain else NO,
                                             relationship_type="CONTAINS"))
    if findings.ood_score is not None:
        results.append(hd.sr.NumContentItem(name=OOD_SCORE, value=round(findings.ood_score, 3), unit=UNITLESS,
                                            relationship_type="CONTAINS"))
    if not findings.thresholds:
        results.append(hd.sr.TextContentItem(name=COMMENT, value="No operating points in this model: flagged "
                                             "when the most probable class is not Normal.",
                                             relationship_type="CONTAINS"))
    findings_container = hd.sr.ContainerContentItem(name=FINDINGS, relationship_type="CONTAINS")
    findings_container.ContentSequence = hd.sr.ContentSequence(results)

    root = hd.sr.ContainerContentItem(name=REPORT_TITLE, is_content_continuous=False)
    root.ContentSequence = hd.sr.ContentSequence([
        hd.sr.CodeContentItem(name=PROCEDURE_REPORTED, value=CHEST_XRAY, relationship_type="HAS CONCEPT MOD"),
        hd.sr.TextContentItem(name=COMMENT, value=STATEMENT, relationship_type="CONTAINS"),
        hd.sr.TextContentItem(name=ALGORITHM_NAME, value=findings.model_name, relationship_type="CONTAINS"),
        hd.sr.TextContentItem(name=ALGORITHM_VERSION, value=findings.model_version, relationship_type="CONTAINS"),
        hd.sr.ImageContentItem(name=SOURCE, referenced_sop_class_uid=source.SOPClassUID,
                               referenced_sop_instance_uid=source.SOPInstanceUID, relationship_type="CONTAINS"),
        findings_container,
    ])
    with _quiet_names():
        sr = hd.sr.ComprehensiveSR(
            evidence=[source], content=root, series_instance_uid=hd.UID(), series_number=SR_SERIES_NUMBER,
            sop_instance_uid=hd.UID(), instance_number=1, manufacturer=MANUFACTURER, is_complete=True,
            series_description=SR_SERIES_DESCRIPTION,
        )
    scheme = Dataset()  # declares the private coding scheme the local codes come from
    scheme.CodingSchemeDesignator = LOCAL
    scheme.CodingSchemeName = "cxr-screen screening codes"
    sr.CodingSchemeIdentificationSequence = [scheme]
    sr.SoftwareVersions = __version__
    return sr


def burn_in_label(overlay: np.ndarray, text: str = LABEL) -> np.ndarray:
    """(H, W, 3) uint8 -> the same image below a black band with ``text`` in white."""
    h, w = overlay.shape[:2]
    size = max(10, w // 28)
    font = ImageFont.load_default(size=size)
    band = size * 2
    canvas = Image.new("RGB", (w, h + band), (0, 0, 0))
    canvas.paste(Image.fromarray(overlay), (0, band))
    draw = ImageDraw.Draw(canvas)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    draw.text(((w - (right - left)) // 2, (band - (bottom - top)) // 2 - top), text, fill=(255, 255, 255), font=font)
    return np.asarray(canvas, dtype=np.uint8)


def build_sc(source: Dataset, overlay: np.ndarray) -> hd.sc.SCImage:
    """The overlay (H, W, 3 uint8 RGB) as a Secondary Capture in the source's study, new series."""
    source = _source_header(source)
    if overlay.ndim != 3 or overlay.shape[2] != 3 or overlay.dtype != np.uint8:
        raise DicomOutputError(f"the overlay must be an RGB uint8 image, not {overlay.dtype} {overlay.shape}")
    orientation = tuple(source.get("PatientOrientation") or ())
    with _quiet_names():
        sc = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=source, pixel_array=burn_in_label(overlay), photometric_interpretation="RGB",
            bits_allocated=8, coordinate_system="PATIENT",
            # Rows and columns keep the source's directions (the overlay is only resized).
            # highdicom wants two values; a source that gives none gets the attribute empty below.
            patient_orientation=orientation if len(orientation) == 2 else ("L", "F"),
            series_instance_uid=hd.UID(), series_number=SC_SERIES_NUMBER, sop_instance_uid=hd.UID(),
            instance_number=1, manufacturer=MANUFACTURER, series_description=SC_SERIES_DESCRIPTION,
        )
    if len(orientation) != 2:
        sc.PatientOrientation = ""  # type 2: present, unknown
    sc.Laterality = source.get("Laterality") or ""  # type 2C; the source's, or present and empty
    sc.BurnedInAnnotation = "YES"
    sc.ImageComments = f"{LABEL}. Grad-CAM heatmap over the source image. {DISCLAIMER}"[:10240]
    sc.DerivationDescription = "Grad-CAM heatmap of an AI screening model blended over the source image, " \
                               "resized; labelled as AI output"
    ref = Dataset()
    ref.ReferencedSOPClassUID = source.SOPClassUID
    ref.ReferencedSOPInstanceUID = source.SOPInstanceUID
    sc.SourceImageSequence = [ref]
    sc.SoftwareVersions = __version__
    return sc


def _write_atomic(ds: Dataset, dest: Path) -> Path:
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.tmp")
    try:
        ds.save_as(tmp, enforce_file_format=True)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def write_outputs(outbox: Path, *, name: str, source_path: Path, findings: Findings,
                  overlay_path: Path | None) -> list[Path]:
    """Write ``<name>.SR.dcm`` and, given an overlay, ``<name>.SC.dcm`` into ``outbox``.

    Raises DicomOutputError, OSError or pydicom's errors when the source or the outbox is
    unusable; the caller decides what that means for the study."""
    from cxr.dicom import read_dataset  # Part 10, or a bare data set (no file meta)

    with source_path.open("rb") as f:
        source, _bare, _inferred = read_dataset(f, stop_before_pixels=True)
    outbox.mkdir(parents=True, exist_ok=True)
    written = [_write_atomic(build_sr(source, findings), outbox / f"{name}.SR.dcm")]
    if overlay_path is not None:
        with Image.open(overlay_path) as im:
            overlay = np.asarray(im.convert("RGB"), dtype=np.uint8)
        written.append(_write_atomic(build_sc(source, overlay), outbox / f"{name}.SC.dcm"))
    return written


def write_for_study(outbox: Path, *, study_id: uuid.UUID, outcome, meta, source_path: Path) -> list[Path]:
    """The worker's hook: write the outputs of one screened study (an Outcome of
    worker.screening.pipeline, screened with the bundle ``meta``) if it came in as DICOM.

    A failure here never changes the study's result, which is already stored: it is logged
    as an error with its reason (the study id only, no patient identifier) and counted in
    ``cxr_dicom_outputs_total{result="failed"}``; the study stays ``done``."""
    from cxr.metrics import worker_metrics

    if outcome.status != "done" or outcome.metadata.get("image_format") != "dicom":
        return []
    findings = Findings(probabilities=outcome.probabilities, predicted_class=outcome.predicted_class,
                        risk=outcome.risk, flagged=outcome.flagged, model_name=meta.architecture,
                        model_version=meta.version, thresholds=dict(meta.thresholds or {}),
                        uncertainty=outcome.uncertainty, uncertain=outcome.uncertain, ood_score=outcome.ood_score)
    try:
        written = write_outputs(outbox, name=str(study_id), source_path=source_path, findings=findings,
                                overlay_path=Path(outcome.heatmap_path) if outcome.heatmap_path else None)
    except Exception as e:  # any reason (outbox, header, highdicom): logged with its traceback and counted
        log.exception("study %s: DICOM outputs not written to %s (%s: %s); the screening result stands",
                      study_id, outbox, type(e).__name__, e)
        worker_metrics().dicom_outputs.labels("failed").inc()
        return []
    worker_metrics().dicom_outputs.labels("written").inc()
    log.info("study %s: DICOM outputs written: %s", study_id, ", ".join(p.name for p in written))
    return written
