"""DICOM outputs (CXR_DICOM_OUTBOX): a Comprehensive SR and a heatmap Secondary Capture per
DICOM study, from real RG1 chest files (pydicom-data), written by real worker processes.

Re-read with pydicom, references checked, values compared with the database, and validated
by dicom3tools' dciodvfy where it is installed (apt-get install dicom3tools; CI installs it).
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import uuid
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
from celery import Celery
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.uid import ComprehensiveSRStorage, SecondaryCaptureImageStorage
from sqlalchemy import select

from cxr import DISCLAIMER
from cxr.db.models import Result, Study
from cxr.db.session import session_scope
from cxr.settings import Settings
from tests.conftest import IN_CI
from tests.imagegen import write_dicom, write_png
from tests.stack import Stack, clean_env, cxr, wait_until
from worker.dicom_out import LABEL

LOCAL = "99CXRSCR"


def rg1(name: str) -> Path:
    path = get_testdata_file(name)  # shipped in the pydicom-data wheel, found locally
    assert path is not None, f"{name} not found: pip install pydicom-data"
    return Path(path)


def dciodvfy(path: Path) -> list[str]:
    """dciodvfy's error lines for a file (warnings are allowed). Skips where the tool is
    missing, except under CI=true, where .ci/run installs it and its absence fails."""
    if shutil.which("dciodvfy") is None:
        why = "dciodvfy not installed (apt-get install -y dicom3tools)"
        if IN_CI:
            pytest.fail(f"CI=true requires {why}")
        pytest.skip(why)
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    lines = (out.stdout + out.stderr).splitlines()
    assert any(line.strip() in ("ComprehensiveSR", "SCImage") for line in lines), lines  # it did recognise the IOD
    return [line for line in lines if line.startswith("Error")]


def content_items(ds) -> list:
    """Every content item of an SR tree, depth first."""
    out = []
    for item in ds.get("ContentSequence", []):
        out.append(item)
        out.extend(content_items(item))
    return out


def named(items, meaning: str):
    found = [i for i in items if i.ConceptNameCodeSequence[0].CodeMeaning == meaning]
    assert len(found) == 1, (meaning, [i.ConceptNameCodeSequence[0].CodeMeaning for i in items])
    return found[0]


def check_sr(path: Path, source: pydicom.Dataset, result: Result, *, version: str,
             thresholds: dict[str, float]) -> pydicom.Dataset:
    sr = pydicom.dcmread(path)
    assert sr.SOPClassUID == ComprehensiveSRStorage and sr.Modality == "SR"
    assert sr.StudyInstanceUID == source.StudyInstanceUID
    assert sr.SeriesInstanceUID not in (source.SeriesInstanceUID, "")
    assert sr.SOPInstanceUID != source.SOPInstanceUID
    assert sr.PatientID == source.PatientID and sr.AccessionNumber == source.AccessionNumber  # back to its study
    assert sr.CompletionFlag == "COMPLETE"
    # Evidence: the source instance, in its own study and series.
    (ev_study,) = sr.CurrentRequestedProcedureEvidenceSequence
    assert ev_study.StudyInstanceUID == source.StudyInstanceUID
    (ev_series,) = ev_study.ReferencedSeriesSequence
    assert ev_series.SeriesInstanceUID == source.SeriesInstanceUID
    (ev_sop,) = ev_series.ReferencedSOPSequence
    assert (ev_sop.ReferencedSOPClassUID, ev_sop.ReferencedSOPInstanceUID) == (source.SOPClassUID,
                                                                              source.SOPInstanceUID)
    items = content_items(sr)
    image = named(items, "Source")
    assert image.ValueType == "IMAGE"
    assert image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert image.ReferencedSOPSequence[0].ReferencedSOPClassUID == source.SOPClassUID
    # The values are the stored result's.
    for c, p in result.probabilities.items():
        num = named(items, f"Probability of {c}")
        assert abs(float(num.MeasuredValueSequence[0].NumericValue) - p) < 1e-6
        assert num.ConceptNameCodeSequence[0].CodingSchemeDesignator == LOCAL
    assert abs(float(named(items, "Risk score (1 - P(Normal))").MeasuredValueSequence[0].NumericValue)
               - result.risk) < 1e-6
    flag = named(items, "Flagged for review").ConceptCodeSequence[0]
    assert (flag.CodeValue, flag.CodingSchemeDesignator) == (("373066001" if result.flagged else "373067005"), "SCT")
    finding = named(items, "Finding").ConceptCodeSequence[0]
    assert finding.CodeMeaning == result.predicted_class and finding.CodingSchemeDesignator == "SCT"
    for c in result.probabilities:
        thresh = [i for i in items if i.ConceptNameCodeSequence[0].CodeMeaning == f"Operating point threshold for {c}"]
        if c in thresholds:
            assert abs(float(thresh[0].MeasuredValueSequence[0].NumericValue) - thresholds[c]) < 1e-6
        else:
            assert thresh == []
    assert named(items, "Algorithm Version").TextValue == version
    assert named(items, "Algorithm Name").TextValue == "efficientnet_b0"
    texts = [i.TextValue for i in items if i.ValueType == "TEXT"]
    assert any(DISCLAIMER in t and "not for clinical use" in t for t in texts)
    return sr


def check_sc(path: Path, source: pydicom.Dataset, overlay_png: Path) -> pydicom.Dataset:
    sc = pydicom.dcmread(path)
    assert sc.SOPClassUID == SecondaryCaptureImageStorage
    assert sc.StudyInstanceUID == source.StudyInstanceUID
    assert sc.SeriesInstanceUID not in (source.SeriesInstanceUID, "")
    assert sc.PatientID == source.PatientID
    assert sc.BurnedInAnnotation == "YES" and sc.ImageType[0] == "DERIVED"
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert sc.SourceImageSequence[0].ReferencedSOPClassUID == source.SOPClassUID
    assert sc.PhotometricInterpretation == "RGB" and sc.SamplesPerPixel == 3
    overlay = np.asarray(Image.open(overlay_png).convert("RGB"))
    pixels = sc.pixel_array
    band = pixels.shape[0] - overlay.shape[0]
    assert band > 0 and pixels.shape[1:] == overlay.shape[1:]
    assert np.array_equal(pixels[band:], overlay)  # the overlay itself, lossless, below the label
    label = pixels[:band]
    assert (label == 255).all(axis=2).sum() > 100 and (label == 0).all(axis=2).mean() > 0.5  # white text on black
    assert LABEL in sc.ImageComments
    return sc


def test_worker_writes_sr_and_sc_for_dicom_studies_only(tmp_path, tiny_bundle):
    """The embedded default (SQLite, filesystem broker), real watcher and worker processes."""
    home, inbox, outbox = tmp_path / "var", tmp_path / "inbox", tmp_path / "outbox"
    env = clean_env(CXR_HOME=str(home), CXR_INBOX=str(inbox), CXR_CHECKPOINT=str(tiny_bundle),
                    CXR_DICOM_OUTBOX=str(outbox), CXR_WATCH_SETTLE_SECONDS="0.3")
    cxr("db", "upgrade", env=env)
    (tmp_path / "logs").mkdir()
    stack = Stack(log_dir=tmp_path / "logs", env=env)
    stack.start("worker", "worker")
    stack.start("watcher", "watch")
    try:
        inbox.mkdir(exist_ok=True)
        source_path = rg1("RG1_UNCR.dcm")
        shutil.copy(source_path, inbox / "chest.dcm")
        write_png(inbox / "plain.png")
        db_url = f"sqlite:///{home / 'cxr.db'}"

        def finished():
            stack.assert_running()
            with session_scope(db_url) as s:
                rows = s.execute(select(Study.filename, Study.status)).all()
            done = len(rows) == 2 and all(r.status == "done" for r in rows)
            return done and len(list(outbox.glob("*.dcm"))) == 2

        wait_until(finished, timeout=240, describe=stack.logs)
        with session_scope(db_url) as s:
            study, result = s.execute(select(Study, Result).join(Result).where(Study.filename == "chest.dcm")).one()
            s.expunge_all()
        assert sorted(p.name for p in outbox.iterdir()) == [f"{study.id}.SC.dcm", f"{study.id}.SR.dcm"]  # not the PNG
    finally:
        stack.stop()
    source = pydicom.dcmread(source_path, stop_before_pixels=True)
    sr = check_sr(outbox / f"{study.id}.SR.dcm", source, result, version="test-random", thresholds={})
    sc = check_sc(outbox / f"{study.id}.SC.dcm", source, Path(result.heatmap_path))
    assert sr.SeriesInstanceUID != sc.SeriesInstanceUID
    assert dciodvfy(outbox / f"{study.id}.SR.dcm") == []
    assert dciodvfy(outbox / f"{study.id}.SC.dcm") == []


@pytest.fixture
def embedded(tmp_path, tiny_bundle):
    """A migrated SQLite database, a bundle with operating points, and a register() helper."""
    from worker.screening.model import load_bundle, save_bundle

    loaded = load_bundle(tiny_bundle)
    thresholds = {"Pneumonia": 0.25, "Tuberculosis": 0.4}
    bundle = save_bundle(tmp_path / "op.safetensors", loaded.model,
                         replace(loaded.meta, version="with-op", thresholds=thresholds))
    home = tmp_path / "var"
    cxr("db", "upgrade", env=clean_env(CXR_HOME=str(home)))
    celery = Celery(broker="filesystem://")
    qdir = tmp_path / "q"
    qdir.mkdir()
    celery.conf.broker_transport_options = {"data_folder_in": str(qdir), "data_folder_out": str(qdir)}

    def register(settings: Settings, path: Path) -> uuid.UUID:
        from cxr.intake import register as intake
        from cxr.store import put_file

        return intake(settings, celery, stored=put_file(settings.store_dir, path), filename=path.name,
                      source="api").study_id

    return home, bundle, thresholds, register


def test_operating_points_in_the_sr_and_no_sc_without_a_heatmap(tmp_path, embedded):
    from worker.service import process_study

    home, bundle, thresholds, register = embedded
    outbox = tmp_path / "outbox"
    settings = Settings(_env_file=None, home=home, checkpoint=bundle, dicom_outbox=outbox, heatmaps="none")
    source_path = rg1("RG1_J2KR.dcm")  # JPEG 2000 lossless: the SR needs only the header
    sid = register(settings, source_path)
    assert process_study(settings, sid) == "done"
    assert [p.name for p in outbox.iterdir()] == [f"{sid}.SR.dcm"]  # no overlay, no Secondary Capture
    with session_scope(settings.database_url) as s:
        result = s.execute(select(Result).where(Result.study_id == sid)).scalar_one()
        s.expunge_all()
    source = pydicom.dcmread(source_path, stop_before_pixels=True)
    check_sr(outbox / f"{sid}.SR.dcm", source, result, version="with-op", thresholds=thresholds)
    assert dciodvfy(outbox / f"{sid}.SR.dcm") == []


def test_an_unwritable_outbox_is_logged_and_the_result_stands(tmp_path, embedded, caplog):
    from worker.service import process_study

    home, bundle, _, register = embedded
    outbox = tmp_path / "outbox"
    outbox.write_text("a file where the outbox folder should be")
    settings = Settings(_env_file=None, home=home, checkpoint=bundle, dicom_outbox=outbox)
    sid = register(settings, rg1("RG1_UNCR.dcm"))
    with caplog.at_level(logging.ERROR, logger="worker.dicom_out"):
        assert process_study(settings, sid) == "done"
    with session_scope(settings.database_url) as s:
        study = s.get(Study, sid)
        assert study.status == "done" and study.error is None
        assert s.execute(select(Result).where(Result.study_id == sid)).scalar_one().heatmap_path
    (record,) = [r for r in caplog.records if r.name == "worker.dicom_out"]
    assert f"study {sid}: DICOM outputs not written" in record.getMessage()
    assert "FileExistsError" in record.getMessage() or "NotADirectoryError" in record.getMessage()
    assert "RG1" not in record.getMessage() and "CompressedSamples" not in record.getMessage()  # no patient data


def test_a_minimal_source_and_a_custom_class_still_give_valid_outputs(tmp_path):
    """A generated CR with no PatientOrientation, StudyDate or accession, and a bundle with a
    class SNOMED has no code for here: local codes, an empty orientation, still no errors."""
    from worker.dicom_out import Findings, build_sc, build_sr

    source = pydicom.dcmread(write_dicom(tmp_path / "src.dcm", seed=5), stop_before_pixels=True)
    assert "PatientOrientation" not in source
    findings = Findings(probabilities={"Normal": 0.1, "Nodule": 0.9}, predicted_class="Nodule", risk=0.9,
                        flagged=True, model_name="resnet18", model_version="custom-1", thresholds={"Nodule": 0.5})
    sr_path, sc_path = tmp_path / "out.SR.dcm", tmp_path / "out.SC.dcm"
    build_sr(source, findings).save_as(sr_path, enforce_file_format=True)
    overlay = np.zeros((64, 80, 3), np.uint8)
    overlay[..., 0] = np.arange(80, dtype=np.uint8)
    build_sc(source, overlay).save_as(sc_path, enforce_file_format=True)
    items = content_items(pydicom.dcmread(sr_path))
    finding = named(items, "Finding").ConceptCodeSequence[0]
    assert (finding.CodeMeaning, finding.CodingSchemeDesignator) == ("Nodule", LOCAL)
    assert float(named(items, "Operating point threshold for Nodule").MeasuredValueSequence[0].NumericValue) == 0.5
    sc = pydicom.dcmread(sc_path)
    assert sc.PatientOrientation == "" and sc.StudyInstanceUID == source.StudyInstanceUID
    assert np.array_equal(sc.pixel_array[-64:], overlay)
    assert dciodvfy(sr_path) == []
    assert dciodvfy(sc_path) == []


def test_a_source_without_uids_is_refused_clearly(tmp_path):
    from worker.dicom_out import DicomOutputError, Findings, build_sr

    source = pydicom.dcmread(write_dicom(tmp_path / "src.dcm"), stop_before_pixels=True)
    del source.StudyInstanceUID
    findings = Findings(probabilities={"Normal": 1.0}, predicted_class="Normal", risk=0.0, flagged=False,
                        model_name="m", model_version="v")
    with pytest.raises(DicomOutputError, match="the source header has no StudyInstanceUID"):
        build_sr(source, findings)
