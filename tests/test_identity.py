"""Identity at intake: same bytes, same SOP Instance UID, bad names; the study metadata and
the pseudonymised patient key. Real databases (SQLite and Postgres), a real filesystem broker."""

from __future__ import annotations

import os
import stat

import pytest
from celery import Celery
from sqlalchemy import select, text

from cxr.db import repo
from cxr.db.migrate import upgrade
from cxr.db.models import Study, StudyFile, StudyStatus
from cxr.db.session import session_scope
from cxr.dicom import pseudonymise
from cxr.intake import register
from cxr.settings import Settings
from cxr.store import put_stream
from tests.dicomgen import SECRET_PATIENT_ID, SECRET_PATIENT_NAME, chest_dataset, encode, to_bytes
from tests.imagegen import chest_like
from tests.badfiles import png_bytes


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.distributed)])
def env(request, tmp_path):
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'cxr.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
    settings = Settings(_env_file=None, home=tmp_path / "var", inbox=tmp_path / "inbox", database_url=url)
    settings.ensure_dirs()
    upgrade(settings.database_url)
    celery = Celery(broker="filesystem://")
    qdir = str(settings.broker_dir / "queue")
    celery.conf.broker_transport_options = {"data_folder_in": qdir, "data_folder_out": qdir,
                                            "control_folder": qdir + "-control"}
    return settings, celery


def submit(env, data: bytes, name: str, source: str = "watch"):
    import io

    settings, celery = env
    stored = put_stream(settings.store_dir, io.BytesIO(data))
    return register(settings, celery, stored=stored, filename=name, source=source)


def queued(settings) -> int:
    return len(list((settings.broker_dir / "queue").iterdir()))


def rows(settings, model):
    with session_scope(settings.database_url) as s:
        return s.scalars(select(model)).all()


def test_same_bytes_twice_through_watcher_and_api_give_one_study(env):
    settings, _ = env
    data = png_bytes(chest_like(300))
    first = submit(env, data, "film.png", "watch")
    second = submit(env, data, "film-again.png", "api")
    assert first.created and first.duplicate is None
    assert not second.created and second.duplicate == "same_bytes" and second.study_id == first.study_id
    assert len(rows(settings, Study)) == 1 and len(rows(settings, StudyFile)) == 1
    assert queued(settings) == 1  # screened once


def test_same_sop_instance_with_different_bytes_keeps_one_study_and_both_files(env):
    settings, _ = env
    ds = chest_dataset(320, seed=41)
    original, transcoded = to_bytes(ds), encode(ds, "j2k")
    assert original != transcoded
    first = submit(env, original, "film.dcm")
    second = submit(env, transcoded, "film-j2k.dcm", "api")
    assert second.study_id == first.study_id and second.duplicate == "same_sop_instance" and not second.created
    files = rows(settings, StudyFile)
    assert len(rows(settings, Study)) == 1 and len(files) == 2
    assert {f.transfer_syntax for f in files} == {"1.2.840.10008.1.2.1", "1.2.840.10008.1.2.4.90"}
    assert all(open(f.stored_path, "rb").read() in (original, transcoded) for f in files)
    assert queued(settings) == 1  # not screened twice
    (study,) = rows(settings, Study)
    assert study.sha256 == files[0].sha256 and study.sop_instance_uid == ds.SOPInstanceUID
    # Either copy sent again: still the same study, nothing new.
    assert submit(env, transcoded, "again.dcm").duplicate == "same_bytes"
    assert len(rows(settings, StudyFile)) == 2 and queued(settings) == 1


def test_a_rejected_study_is_requeued_when_a_new_copy_of_its_sop_instance_arrives(env):
    settings, _ = env
    ds = chest_dataset(320, seed=42)
    good = to_bytes(ds)
    cut = good[: len(good) // 2]  # a transfer broken off half way: same header, same SOP UID
    first = submit(env, cut, "film.dcm")
    with session_scope(settings.database_url) as s:  # what the worker records for it
        repo.mark_study(s, study_id=first.study_id, status=StudyStatus.rejected, error="unreadable: truncated",
                        reject_code="unreadable")
    again = submit(env, good, "film.dcm")
    assert again.study_id == first.study_id and again.status == "queued" and again.duplicate == "same_sop_instance"
    (study,) = rows(settings, Study)
    assert open(study.stored_path, "rb").read() == good and study.reject_code is None and study.error is None
    assert len(rows(settings, StudyFile)) == 2 and queued(settings) == 2


def test_a_path_in_the_file_name_is_rejected_and_the_bytes_kept(env):
    settings, _ = env
    data = png_bytes(chest_like(300, seed=3))
    bad = submit(env, data, "../../etc/film.png", "api")
    assert bad.status == "rejected" and bad.filename == "film.png"
    (study,) = rows(settings, Study)
    assert study.reject_code == "bad_filename" and "path separator" in study.error
    assert open(study.stored_path, "rb").read() == data
    assert queued(settings) == 0
    # The same bytes under a plain name: screened after all.
    good = submit(env, data, "film.png", "api")
    assert good.study_id == bad.study_id and good.status == "queued" and queued(settings) == 1
    assert submit(env, png_bytes(chest_like(300, seed=4)), "..", "api").status == "rejected"


def test_dicom_metadata_stored_with_pseudonymised_patient_key_only(env):
    settings, _ = env
    ds = chest_dataset(320, seed=43)
    submit(env, to_bytes(ds), "film.dcm")
    (study,) = rows(settings, Study)
    assert (study.sop_instance_uid, study.study_instance_uid, study.series_instance_uid) == (
        ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID)
    assert (study.accession_number, study.modality, study.body_part, study.view_position) == ("ACC00043", "CR",
                                                                                             "CHEST", "PA")
    assert (study.patient_age, study.patient_sex, study.manufacturer) == ("054Y", "F", "cxr-screen tests")
    assert (study.width, study.height, study.image_format) == (320, 320, "dicom")
    key_file = settings.pseudonym_key_file
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    assert study.patient_key == pseudonymise(SECRET_PATIENT_ID, key_file.read_text().strip().encode())
    # Nothing in any table holds the raw identifiers.
    with session_scope(settings.database_url) as s:
        dump = ""
        for table in ("studies", "study_files", "jobs", "job_studies", "results"):
            dump += repr(s.execute(text(f"SELECT * FROM {table}")).all())
    assert SECRET_PATIENT_ID not in dump and "Secretname" not in dump and SECRET_PATIENT_NAME not in dump


def test_configured_pseudonym_key_is_used_and_the_same_patient_links(tmp_path):
    settings = Settings(_env_file=None, home=tmp_path / "var", pseudonym_key="a-long-configured-secret-key")
    settings.ensure_dirs()
    upgrade(settings.database_url)
    celery = Celery(broker="filesystem://")
    qdir = str(settings.broker_dir / "queue")
    celery.conf.broker_transport_options = {"data_folder_in": qdir, "data_folder_out": qdir,
                                            "control_folder": qdir + "-control"}
    submit((settings, celery), to_bytes(chest_dataset(320, seed=44)), "a.dcm")
    submit((settings, celery), to_bytes(chest_dataset(320, seed=45)), "b.dcm")
    studies = rows(settings, Study)
    assert len(studies) == 2 and len({s.patient_key for s in studies}) == 1  # same patient, two films
    assert studies[0].patient_key == pseudonymise(SECRET_PATIENT_ID, b"a-long-configured-secret-key")
    assert not settings.pseudonym_key_file.exists()
    with pytest.raises(ValueError, match="at least 16"):
        from cxr.dicom import pseudonym_key

        pseudonym_key(Settings(_env_file=None, home=tmp_path / "v2", pseudonym_key="short"))


def test_generated_key_survives_restarts_and_is_shared(tmp_path):
    from cxr.dicom import load_or_create_key

    key_file = tmp_path / "home" / "pseudonym.key"
    k1 = load_or_create_key(key_file)
    assert load_or_create_key(key_file) == k1 and len(k1) == 64
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    assert [p.name for p in key_file.parent.iterdir()] == ["pseudonym.key"]  # no temporary left behind
