"""The gate's new outcomes through the real embedded service (SQLite, filesystem broker, the
worker's own process_study): a negative PNG is screened inverted and the inversion is in the
audit trail, `GET /studies/{id}` and `cxr study show`; a bare DICOM is taken in by its SOP
Instance UID and noted; a blank image is rejected without a heatmap."""

from __future__ import annotations

import json

from celery import Celery

from api.main import get_study
from cxr.db import repo
from cxr.db.migrate import upgrade
from cxr.db.session import session_scope
from cxr.intake import register
from cxr.settings import Settings
from cxr.store import put_file
from tests.badfiles import png_bytes
from tests.dicomgen import chest_dataset
from tests.imagegen import chest_like
from tests.stack import clean_env, cxr
from tests.test_dicom_readers import bare
from worker.service import process_study


def test_notes_and_blank_rejections_reach_the_database_api_and_cli(tmp_path, tiny_bundle):
    settings = Settings(_env_file=None, home=tmp_path / "var", checkpoint=tiny_bundle)
    settings.ensure_dirs()
    upgrade(settings.database_url)
    celery = Celery(broker="filesystem://")
    qdir = str(settings.broker_dir / "queue")
    celery.conf.broker_transport_options = {"data_folder_in": qdir, "data_folder_out": qdir,
                                            "control_folder": qdir + "-control"}
    ds = chest_dataset(256, seed=41)
    files = {"negative.png": png_bytes(255 - chest_like(320, seed=40)),
             "bare.dcm": bare(ds, implicit=True),
             "black.png": png_bytes(chest_like(320, seed=42) * 0)}
    ids = {}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        ids[name] = register(settings, celery, stored=put_file(settings.store_dir, tmp_path / name),
                             filename=name, source="watch").study_id
        assert process_study(settings, ids[name]) in ("done", "rejected")
    with session_scope(settings.database_url) as session:
        neg = get_study(ids["negative.png"], session)
        bare_study = get_study(ids["bare.dcm"], session)
        black = get_study(ids["black.png"], session)
        assert repo.study_notes(session, study_id=ids["black.png"]) == []
    assert neg["status"] == "done" and len(neg["notes"]) == 1 and neg["notes"][0].startswith("polarity_inverted:")
    assert bare_study["status"] == "done" and bare_study["notes"][0].startswith("dicom_no_meta:")
    assert bare_study["metadata"]["sop_instance_uid"] == ds.SOPInstanceUID
    assert bare_study["metadata"]["transfer_syntax"] == "1.2.840.10008.1.2"
    assert black["status"] == "rejected" and black["reject_code"] == "blank_image" and black["notes"] == []
    assert black["heatmap_path"] is None and not list(settings.heatmap_dir.glob(f"{ids['black.png']}*"))
    env = clean_env(CXR_HOME=str(settings.home))
    shown = json.loads(cxr("study", "show", str(ids["negative.png"]), "--format", "json", env=env).stdout)
    assert shown["notes"] == neg["notes"]
    assert [h["status"] for h in shown["history"]] == ["queued", "processing", "note", "done"]
    table = cxr("study", "show", str(ids["bare.dcm"]), env=env).stdout
    assert "dicom_no_meta" in table
