"""What the model knows it does not know: the out-of-distribution gate and the uncertainty.

Generated films and the tests' tiny random bundle only (no ../shared)."""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from cxr.bundle import BundleError, read_meta
from tests.imagegen import write_png


def _loaded(bundle: Path):
    from worker.screening.model import load_bundle

    return load_bundle(bundle)


def _pooled_of(loaded, files: list[Path]) -> torch.Tensor:
    from worker.screening.pipeline import gated_pixels, to_model
    from worker.screening.reliability import pooled_features

    x = np.stack([to_model(gated_pixels(f.read_bytes())[0], loaded.meta) for f in files])
    with torch.no_grad():
        return pooled_features(loaded.model, loaded.model.last_conv(torch.from_numpy(x)))


def bundle_with_knowledge(tmp_path: Path, tiny_bundle: Path, films: list[Path], *, ood_threshold: float,
                          uncertainty: dict | None = None, name: str = "knows.safetensors") -> Path:
    """The tiny bundle plus OOD statistics fitted on ``films`` (labelled round-robin)."""
    from worker.screening.model import save_bundle
    from worker.screening.reliability import OOD_METHOD, fit_ood

    loaded = _loaded(tiny_bundle)
    pooled = _pooled_of(loaded, films).numpy()
    labels = np.arange(len(films)) % len(loaded.meta.classes)
    stats = fit_ood(pooled, labels, len(loaded.meta.classes))
    meta = replace(loaded.meta, version=f"knows-{ood_threshold:g}",
                   ood={"method": OOD_METHOD, "threshold": ood_threshold, "features": pooled.shape[1]},
                   uncertainty=uncertainty or {})
    return save_bundle(tmp_path / name, loaded.model, meta, ood=stats)


@pytest.fixture(scope="module")
def films(tmp_path_factory) -> list[Path]:
    d = tmp_path_factory.mktemp("films")
    return [write_png(d / f"f{i}.png", seed=100 + i) for i in range(12)]


def test_ood_statistics_round_trip_through_the_bundle(tmp_path, tiny_bundle, films):
    b = bundle_with_knowledge(tmp_path, tiny_bundle, films, ood_threshold=123.5)
    meta = read_meta(b)  # without torch
    assert meta.ood_threshold == 123.5 and meta.ood["features"] > 0
    loaded = _loaded(b)
    assert loaded.ood is not None
    k = len(meta.classes)
    assert loaded.ood.class_means.shape == (k, meta.ood["features"])
    assert loaded.ood.precision.shape == (meta.ood["features"],) * 2
    # The statistics come back exactly as written (float32), and the network's weights are untouched.
    from safetensors.torch import load_file

    stored = load_file(str(b))
    assert torch.equal(stored["ood.precision"], loaded.ood.precision)
    plain = _loaded(tiny_bundle)
    for (ka, va), (kb, vb) in zip(plain.model.state_dict().items(), loaded.model.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    # A bundle whose metadata promises an OOD gate but lacks the statistics is refused by name.
    from safetensors.torch import save_file

    broken = tmp_path / "broken.safetensors"
    save_file({k: v for k, v in stored.items() if not k.startswith("ood.")}, str(broken),
              metadata={"cxr_bundle": meta.to_json()})
    with pytest.raises(BundleError, match="ood"):
        _loaded(broken)


def test_mahalanobis_score_is_the_distance_to_the_nearest_class_mean():
    from worker.screening.reliability import OodStats

    stats = OodStats(class_means=torch.tensor([[0.0, 0.0], [10.0, 0.0]]), precision=torch.diag(torch.tensor([1.0, 4.0])))
    got = stats.score(torch.tensor([[0.0, 0.0], [9.0, 1.0], [5.0, 0.0]]))
    np.testing.assert_allclose(got, [0.0, 1.0 + 4.0, 25.0])


def test_far_film_is_refused_as_not_chest_before_anything_is_stored(tmp_path, tiny_bundle, films):
    """A film above the bundle's threshold is refused with `not_chest` and a sentence, with no
    probabilities, flag or heatmap; the same film under a higher threshold is scored."""
    from celery import Celery

    from cxr.db.models import Result, Study
    from cxr.db.session import session_scope
    from cxr.intake import register
    from cxr.settings import Settings
    from cxr.store import put_file
    from tests.stack import clean_env, cxr
    from worker.screening.model import load_bundle
    from worker.screening.pipeline import Screener
    from worker.service import process_study

    probe = tmp_path / "probe.png"
    from PIL import Image

    yy, xx = np.mgrid[0:320, 0:320]
    board = ((yy // 40 + xx // 40) % 2 * 180 + 40).astype(np.uint8)  # a checkerboard: structure, but no chest
    Image.fromarray(board).save(probe)
    loaded = _loaded(bundle_with_knowledge(tmp_path, tiny_bundle, films, ood_threshold=1.0, name="probe.safetensors"))
    score = float(loaded.ood.score(_pooled_of(loaded, [probe]))[0])
    in_dist = loaded.ood.score(_pooled_of(loaded, films[:3]))
    assert score > in_dist.max()  # the board is further from the films than they are

    strict = bundle_with_knowledge(tmp_path, tiny_bundle, films, ood_threshold=score - 1.0, name="strict.safetensors")
    lenient = bundle_with_knowledge(tmp_path, tiny_bundle, films, ood_threshold=score + 1.0,
                                    name="lenient.safetensors")
    heat = tmp_path / "h.jpg"
    out = Screener(load_bundle(strict)).screen(probe.read_bytes(), heatmap_to=heat)
    assert (out.status, out.reject_code) == ("rejected", "not_chest")
    assert out.probabilities is None and out.flagged is None and not heat.exists()
    assert "frontal" in out.error and f"{score:.0f}" in out.error
    ok = Screener(load_bundle(lenient)).screen(probe.read_bytes(), heatmap_to=heat)
    assert ok.status == "done" and abs(ok.ood_score - score) < 1e-3 * score

    # Through the worker's service on the embedded database: no result row is ever written.
    home = tmp_path / "home"
    env = clean_env(CXR_HOME=str(home))
    cxr("db", "upgrade", env=env)
    settings = Settings(home=home, checkpoint=strict)
    celery = Celery(broker="filesystem://")
    q = tmp_path / "q"
    q.mkdir()
    celery.conf.broker_transport_options = {"data_folder_in": str(q), "data_folder_out": str(q),
                                            "control_folder": str(q) + "-control"}
    study = register(settings, celery, stored=put_file(settings.store_dir, probe), filename="probe.png", source="api")
    assert process_study(settings, study.study_id) == "rejected"
    with session_scope(settings.database_url) as s:
        row = s.get(Study, study.study_id)
        assert (row.status, row.reject_code) == ("rejected", "not_chest")
        assert s.query(Result).filter(Result.study_id == study.study_id).count() == 0
    assert not (settings.heatmap_dir / f"{study.study_id}.jpg").exists()


def test_uncertain_follows_the_stored_threshold(tmp_path, tiny_bundle, films):
    from worker.screening.model import load_bundle
    from worker.screening.pipeline import Screener
    from worker.screening.reliability import BALD, MC_ENTROPY, SOFTMAX_RESPONSE

    for method in (BALD, MC_ENTROPY, SOFTMAX_RESPONSE):
        base = bundle_with_knowledge(tmp_path, tiny_bundle, films, ood_threshold=1e12,
                                     uncertainty={"method": method, "threshold": 0.0}, name=f"{method}.safetensors")
        first = Screener(load_bundle(base)).screen(films[0].read_bytes())
        u = first.uncertainty
        assert u is not None and u >= 0 and first.uncertain is True  # threshold 0: everything at or above
        for threshold, expect in ((u - 1e-9, True), (u + 1e-6, False)):
            b = bundle_with_knowledge(tmp_path, tiny_bundle, films, ood_threshold=1e12,
                                      uncertainty={"method": method, "threshold": threshold},
                                      name=f"{method}-{expect}.safetensors")
            out = Screener(load_bundle(b)).screen(films[0].read_bytes())
            assert out.uncertainty == pytest.approx(u, abs=1e-9)
            assert out.uncertain is expect, (method, threshold, u)
    # softmax response is 1 - the top calibrated probability the film was given
    assert first.uncertainty == pytest.approx(1 - max(first.probabilities.values()), abs=1e-9)


def test_mc_dropout_is_deterministic_and_independent_of_the_batch(tiny_bundle, films):
    from worker.screening.reliability import bald, mc_dropout_logits, mc_probs

    loaded = _loaded(tiny_bundle)
    pooled = _pooled_of(loaded, films[:5])
    a = bald(mc_probs(loaded.model.head, pooled, temperature=1.0, bias=None))
    b = np.concatenate([bald(mc_probs(loaded.model.head, pooled[i:i + 1], temperature=1.0, bias=None))
                        for i in range(5)])
    np.testing.assert_allclose(a, b, atol=1e-6)
    logits = mc_dropout_logits(loaded.model.head, pooled)
    assert logits.shape[1:] == (5, 3) and logits.std(dim=0).max() > 0  # the masks do vary between passes
    assert (a >= 0).all()


def test_bald_and_risk_coverage_by_hand():
    from trainer.reliability import accuracy_at_coverage, aurc, risk_coverage
    from worker.screening.reliability import bald

    agree = np.array([[[0.9, 0.1]], [[0.9, 0.1]]])
    disagree = np.array([[[1.0, 0.0]], [[0.0, 1.0]]])
    assert bald(agree)[0] == pytest.approx(0.0, abs=1e-9)
    assert bald(disagree)[0] == pytest.approx(np.log(2), abs=1e-6)
    correct = np.array([True, False, True, True])
    unc = np.array([0.1, 0.9, 0.2, 0.3])
    cov, acc = risk_coverage(correct, unc)
    np.testing.assert_allclose(cov, [0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(acc, [1.0, 1.0, 1.0, 0.75])
    assert accuracy_at_coverage(correct, unc, 0.75) == 1.0
    assert aurc(correct, unc) == pytest.approx(0.25 / 4)


def test_pairwise_auc_within_a_source_by_hand():
    from trainer.evaluate import pairwise_auc

    y = np.array([0, 0, 1, 1])  # two classes present of three: one pair
    probs = np.array([[0.8, 0.1, 0.1], [0.3, 0.6, 0.1], [0.5, 0.4, 0.1], [0.1, 0.8, 0.1]])
    # P(Pneumonia) ranks 0.6 (a normal) above 0.4 (a pneumonia): 3 of 4 pairs in order
    assert pairwise_auc(y, probs, ["Normal", "Pneumonia", "Tuberculosis"]) == {"Normal vs Pneumonia": 0.75}


def test_calibrate_fits_the_gate_and_evaluate_reports_it(tmp_path, tiny_bundle):
    """`cxr calibrate --ood-fit` on generated films writes a bundle with both thresholds; the
    gate refuses about the asked quantile of the calibration films; `cxr evaluate` reports
    the risk-coverage figures and draws the curve."""
    from tests.stack import clean_env, cxr

    d = tmp_path / "films"
    d.mkdir()
    rows = []
    for i in range(36):
        label = ("Normal", "Pneumonia", "Tuberculosis")[i % 3]
        rows.append((str(write_png(d / f"{i}.png", seed=300 + i)), label, f"P{i}", "gen-a" if i % 2 else "gen-b"))
    for name, part in (("train", rows[:24]), ("val", rows[24:])):
        with (tmp_path / f"{name}.csv").open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path", "label", "patient_id", "source_repo"])
            w.writerows(part)
    out = tmp_path / "calibrated.safetensors"
    env = clean_env()
    r = cxr("calibrate", "--checkpoint", str(tiny_bundle), "--data", str(tmp_path / "val.csv"), "--ood-fit",
            str(tmp_path / "train.csv"), "--out", str(out), "--ood-quantile", "0.9", "--refer-fraction", "0.25",
            env=env)
    assert "OOD threshold" in r.stdout and "uncertainty threshold" in r.stdout
    meta = read_meta(out)
    assert meta.ood["quantile"] == 0.9 and meta.ood["n_train"] == 24 and meta.ood_threshold > 0
    assert meta.uncertainty["method"] in ("mc-dropout-bald", "mc-dropout-entropy", "softmax-response")
    assert meta.uncertainty["refer_fraction"] == 0.25
    from trainer.cli import detect_source_column
    from trainer.config import DataConfig
    from trainer.evaluate import evaluate

    ev = tmp_path / "eval"
    column = detect_source_column(tmp_path / "val.csv")  # what `cxr evaluate --source-column auto` uses
    assert column == "source_repo"
    evaluate(out, DataConfig(source=str(tmp_path / "val.csv"), source_column=column), ev, bootstrap=0,
             cam_per_class=1)
    m = json.loads((ev / "metrics.json").read_text())
    rel = m["reliability"]
    assert rel["method"] == meta.uncertainty["method"]
    assert 0 <= rel["ood"]["refused"] <= 0.2  # the 0.9 quantile of these 12 films refuses one (or none on ties)
    assert rel["uncertain"]["fraction"] == pytest.approx(0.25, abs=0.09)
    assert set(rel["measures"]) == {"mc-dropout-bald", "mc-dropout-entropy", "softmax-response"}
    assert (ev / "risk_coverage.png").stat().st_size > 1000
    assert set(m["per_source"]) == {"gen-a", "gen-b"}
    assert all(0.0 <= v <= 1.0 for sm in m["per_source"].values() for v in sm["pairwise_auc"].values())
    assert "AUC within the source" in (ev / "summary.md").read_text()
    assert "accuracy at 80% coverage" in (ev / "summary.md").read_text()


def test_a_dicom_whose_header_names_the_chest_is_screened_and_referred_not_refused(tmp_path, tiny_bundle, films):
    """A real chest DICOM that renders unlike the training films (its window, say) is above the
    OOD threshold: the header's own anatomy outranks the learned check, so it is screened,
    marked uncertain and noted; the same film with no anatomy in its header is refused."""
    import pydicom

    from tests.imagegen import write_dicom
    from worker.screening.model import load_bundle
    from worker.screening.pipeline import Screener

    chest = write_dicom(tmp_path / "chest.dcm", seed=5)  # BodyPartExamined CHEST
    ds = pydicom.dcmread(chest)
    del ds.BodyPartExamined
    unlabelled = tmp_path / "unlabelled.dcm"
    ds.save_as(unlabelled)
    loaded = _loaded(bundle_with_knowledge(tmp_path, tiny_bundle, films, ood_threshold=1e12, name="probe.safetensors"))
    from worker.screening.pipeline import gated_pixels, to_model
    from worker.screening.reliability import pooled_features

    x = to_model(gated_pixels(chest.read_bytes())[0], loaded.meta)[None]
    with torch.no_grad():
        score = float(loaded.ood.score(pooled_features(loaded.model, loaded.model.last_conv(torch.from_numpy(x))))[0])
    strict = bundle_with_knowledge(tmp_path, tiny_bundle, films, ood_threshold=score - 1.0, name="strict.safetensors",
                                   uncertainty={"method": "softmax-response", "threshold": 2.0})  # never uncertain
    screener = Screener(load_bundle(strict))
    out = screener.screen(chest.read_bytes())
    assert out.status == "done" and out.uncertain is True
    assert any(n.startswith("ood_exceeded:") for n in out.notes)
    refused = screener.screen(unlabelled.read_bytes())
    assert (refused.status, refused.reject_code) == ("rejected", "not_chest")
