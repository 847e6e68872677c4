"""Identity at intake: same bytes, same SOP Instance UID, bad names; the study metadata and
the pseudonymised patient key. Real databases (SQLite and Postgres), a real filesystem broker."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from celery import Celery
from sqlalchemy import func, select, text

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


def test_nul_bytes_inside_header_values_do_not_stop_intake(env):
    """Some writers embed NUL in text values; Postgres text cannot hold it, so the study row
    could not be written (a 500 from the API, a watched file retried for ever)."""
    settings, _ = env
    tags = dict(Manufacturer="ACME\x00CR", AccessionNumber="A\x00123", BodyPartExamined="CH\x00EST")
    res = submit(env, to_bytes(chest_dataset(320, seed=62, **tags)), "nul.dcm")
    (study,) = rows(settings, Study)
    assert study.id == res.study_id and study.status == "queued"
    assert (study.manufacturer, study.accession_number, study.body_part) == ("ACMECR", "A123", "CHEST")


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


# --- One SOP Instance UID, two different films ------------------------------------------

def same_uid_as(ds, *, seed: int | None = None, **tags):
    """A film claiming ``ds``'s SOP Instance UID: ``ds`` itself (or the pixels of another
    seed), with the same Study/Series UIDs and accession unless ``tags`` change them."""
    import copy

    other = copy.deepcopy(ds) if seed is None else chest_dataset(320, seed=seed, bits=int(ds.BitsStored))
    for keyword in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "AccessionNumber"):
        setattr(other, keyword, getattr(ds, keyword))
    other.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for keyword, value in tags.items():
        setattr(other, keyword, value)
    return other


def events(settings, study_id):
    with session_scope(settings.database_url) as s:
        return [(e.status, e.detail) for e in repo.study_events(s, study_id=study_id)]


@pytest.mark.parametrize("syntax", ["implicit", "deflated", "big_endian", "rle", "jpeg_ls", "j2k",
                                    "jpeg_lossless_sv1", "jpeg_lossless"])
def test_a_lossless_transcoding_is_still_a_resend(env, syntax):
    """Same dataset, other transfer syntax: the decoded pixels agree, so one study, not screened twice."""
    from tests.dicomgen import missing_encoder

    if (why := missing_encoder(syntax)) is not None:
        pytest.skip(why)
    settings, _ = env
    ds = chest_dataset(320, seed=60)
    first = submit(env, to_bytes(ds), "film.dcm")
    again = submit(env, encode(ds, syntax), f"film-{syntax}.dcm", "api")
    assert (again.study_id, again.duplicate, again.marker, again.created) == (
        first.study_id, "same_sop_instance", None, False)
    (study,) = rows(settings, Study)
    assert study.marker is None and study.conflicts_with is None
    files = rows(settings, StudyFile)
    assert len(files) == 2 and len({f.pixel_sha256 for f in files}) == 1 and files[0].pixel_sha256
    assert queued(settings) == 1


@pytest.mark.parametrize("form", ["bare_implicit", "bare_explicit", "part10_without_syntax"])
def test_a_resend_without_its_part10_header_is_still_a_resend(env, form):
    """The same film again as a bare data set (no preamble, 'DICM' or file meta) or with a file
    meta that lacks its Transfer Syntax UID: the worker reads both, so their pixels are compared
    as its (they were 'pixels that could not be compared': a conflict, screened twice)."""
    from tests.test_dicom_readers import bare, part10_without_syntax

    settings, _ = env
    ds = chest_dataset(320, seed=61)
    first = submit(env, to_bytes(ds), "film.dcm")
    data = (part10_without_syntax(ds, implicit=True) if form == "part10_without_syntax"
            else bare(ds, implicit=form == "bare_implicit"))
    again = submit(env, data, f"film-{form}.dcm", "api")
    assert (again.study_id, again.duplicate, again.marker, again.created) == (
        first.study_id, "same_sop_instance", None, False)
    files = rows(settings, StudyFile)
    assert len(files) == 2 and len({f.pixel_sha256 for f in files}) == 1 and files[0].pixel_sha256


CONFLICTS = {
    # name: (changes to the first film, the difference named in the sentence)
    "other_patient": (dict(PatientID="PID-other-patient-0002"), "another patient"),
    "no_patient_id": (dict(PatientID=""), "another patient"),
    "other_pixels": (dict(seed=71), "other pixels"),
    "other_study_uid": (dict(StudyInstanceUID="1.2.826.0.1.3680043.8.498.777"), "another StudyInstanceUID"),
    "other_series_uid": (dict(SeriesInstanceUID="1.2.826.0.1.3680043.8.498.778"), "another SeriesInstanceUID"),
    "other_patient_and_pixels": (dict(seed=72, PatientID="PID-other-patient-0003"), "another patient"),
}


@pytest.mark.parametrize("kind", sorted(CONFLICTS))
def test_a_different_film_with_a_known_uid_is_its_own_marked_study(env, kind):
    settings, _ = env
    changes, said = CONFLICTS[kind]
    ds = chest_dataset(320, seed=70)
    first = submit(env, to_bytes(ds), "first.dcm")
    second = submit(env, to_bytes(same_uid_as(ds, **changes)), "second.dcm", "api")
    assert second.created and second.study_id != first.study_id and second.duplicate is None
    assert second.marker == "uid_conflict" and second.status == "queued"
    assert queued(settings) == 2  # both screened
    with session_scope(settings.database_url) as s:
        owner, newcomer = s.get(Study, first.study_id), s.get(Study, second.study_id)
        assert owner.marker is None and owner.conflicts_with is None
        assert newcomer.sop_instance_uid == owner.sop_instance_uid == ds.SOPInstanceUID
        assert newcomer.conflicts_with == owner.id
        assert newcomer.marker_detail.startswith("uid_conflict: ") and said in newcomer.marker_detail
        assert str(owner.id) in newcomer.marker_detail and "PID-other" not in newcomer.marker_detail
        summary = repo.study_summary(newcomer, None)
        assert (summary["marker"], summary["conflicts_with"]) == ("uid_conflict", str(owner.id))
        files = {f.study_id: f for f in s.scalars(select(StudyFile))}
        assert set(files) == {owner.id, newcomer.id}  # nothing merged
    assert any(d and d.startswith("uid_conflict: ") for _, d in events(settings, second.study_id))
    assert any(d and d.startswith("uid_conflict: ") and str(second.study_id) in d
               for _, d in events(settings, first.study_id))


@pytest.mark.parametrize("syntax", ["j2k_lossy", "jpeg_ls_near"])
def test_a_lossy_transcoding_changes_the_pixels_so_it_is_kept_apart_and_marked(env, syntax):
    from tests.dicomgen import missing_encoder

    if (why := missing_encoder(syntax)) is not None:
        pytest.skip(why)
    ds = chest_dataset(320, seed=75)
    first = submit(env, to_bytes(ds), "film.dcm")
    lossy = submit(env, encode(ds, syntax), f"film-{syntax}.dcm")
    assert lossy.study_id != first.study_id and lossy.marker == "uid_conflict"
    settings, _ = env
    with session_scope(settings.database_url) as s:
        assert "other pixels" in s.get(Study, lossy.study_id).marker_detail


def test_a_resend_of_the_conflicting_film_joins_it_and_a_third_film_is_marked_too(env):
    settings, _ = env
    ds = chest_dataset(320, seed=80)
    other = same_uid_as(ds, seed=81)
    first = submit(env, to_bytes(ds), "first.dcm")
    second = submit(env, to_bytes(other), "second.dcm")
    assert second.marker == "uid_conflict"
    # Each film re-sent in another syntax joins its own study.
    assert submit(env, encode(other, "rle"), "second-rle.dcm").study_id == second.study_id
    assert submit(env, encode(ds, "implicit"), "first-implicit.dcm").study_id == first.study_id
    third = submit(env, to_bytes(same_uid_as(ds, seed=82)), "third.dcm")
    assert third.marker == "uid_conflict" and third.study_id not in (first.study_id, second.study_id)
    with session_scope(settings.database_url) as s:
        assert s.get(Study, third.study_id).conflicts_with == first.study_id  # the owner, not the other newcomer
    assert len(rows(settings, Study)) == 3 and len(rows(settings, StudyFile)) == 5 and queued(settings) == 3


def test_a_copy_whose_pixels_cannot_be_compared_is_not_merged_into_a_screened_study(env):
    """The first copy is fine and queued; a truncated copy with the same header cannot be
    compared: it is kept apart (screened, so rejected as unreadable), marked, not merged."""
    settings, _ = env
    ds = chest_dataset(320, seed=90)
    good = to_bytes(ds)
    first = submit(env, good, "film.dcm")
    cut = submit(env, good[: len(good) // 2], "film-cut.dcm")
    assert cut.study_id != first.study_id and cut.marker == "uid_conflict"
    with session_scope(settings.database_url) as s:
        assert "could not be compared" in s.get(Study, cut.study_id).marker_detail


def test_a_readable_copy_replaces_a_queued_copy_that_does_not_decode(env):
    """A copy cut short arrived first (the watcher takes one in after its stalled limit) and is
    still queued; the complete copy then arrives: it joins that study as its primary file (the
    queued task screens the complete bytes), no second study, no marker."""
    settings, _ = env
    good = to_bytes(chest_dataset(320, seed=91))
    cut = submit(env, good[: len(good) // 2], "film-cut.dcm")
    whole = submit(env, good, "film.dcm")
    assert whole.study_id == cut.study_id and whole.marker is None
    with session_scope(settings.database_url) as s:
        study = s.get(Study, cut.study_id)
        assert study.status == "queued" and study.marker is None
        assert Path(study.stored_path).read_bytes() == good
    assert len(rows(settings, Study)) == 1


def test_a_copy_that_does_not_decode_never_displaces_a_readable_one(env):
    """A film the gate refused (here: rejected by hand, as not_chest would) and then a truncated
    re-send of it: the cut copy is recorded on the study, which keeps its complete file and its
    reason and is not queued again."""
    settings, _ = env
    good = to_bytes(chest_dataset(320, seed=92))
    first = submit(env, good, "film.dcm")
    with session_scope(settings.database_url) as s:
        repo.mark_study(s, study_id=first.study_id, status=StudyStatus.rejected, reject_code="not_chest",
                        error="not_chest: refused")
    cut = submit(env, good[: len(good) * 3 // 4], "film-cut.dcm")
    assert cut.study_id == first.study_id and cut.status == "rejected" and cut.duplicate == "same_sop_instance"
    with session_scope(settings.database_url) as s:
        study = s.get(Study, first.study_id)
        assert (study.status, study.reject_code, study.filename) == ("rejected", "not_chest", "film.dcm")
        assert Path(study.stored_path).read_bytes() == good
        assert s.query(StudyFile).filter(StudyFile.study_id == study.id).count() == 2


def test_conflicting_films_racing_in_two_threads_are_never_merged(env):
    """Two films with one UID (and a re-send of each) arriving at once, through both routes:
    one owner, one conflicting study, each file on its own film's study."""
    import threading

    settings, _ = env
    ds = chest_dataset(320, seed=95)
    other = same_uid_as(ds, PatientID="PID-other-patient-0005")
    inputs = [(to_bytes(ds), "a.dcm", "watch"), (to_bytes(other), "b.dcm", "api"),
              (encode(ds, "implicit"), "a2.dcm", "api"), (encode(other, "implicit"), "b2.dcm", "watch")]
    out: dict[str, object] = {}
    threads = [threading.Thread(target=lambda i=i: out.__setitem__(i[1], submit(env, *i))) for i in inputs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert out["a.dcm"].study_id == out["a2.dcm"].study_id and out["b.dcm"].study_id == out["b2.dcm"].study_id
    assert out["a.dcm"].study_id != out["b.dcm"].study_id
    studies = rows(settings, Study)
    assert len(studies) == 2 and sum(1 for s in studies if s.marker == "uid_conflict") == 1


def test_uid_conflicts_through_the_embedded_stack(tmp_path, tiny_bundle):
    """`cxr up` (API, watcher, worker; SQLite, filesystem broker). The owner film and a film of
    another patient with its UID come through the inbox (as the field case: JPEG baseline CR),
    a lossless re-send and a film with other pixels through POST /jobs. The re-send joins the
    owner without a second screening; both conflicting films are screened, and every view says
    uid_conflict: the worklist (table, CSV, JSON, HTML), `cxr study show`, GET /studies/{id}."""
    import csv
    import io as _io
    import json

    import httpx

    from cxr.db.models import Result
    from tests.dicomgen import missing_encoder
    from tests.stack import Stack, clean_env, cxr, free_port, wait_until

    home, inbox = tmp_path / "var", tmp_path / "inbox"
    (tmp_path / "logs").mkdir()
    port = free_port()
    env = clean_env(CXR_HOME=str(home), CXR_INBOX=str(inbox), CXR_CHECKPOINT=str(tiny_bundle),
                    CXR_WATCH_SETTLE_SECONDS="0.3")
    jpeg = missing_encoder("jpeg_baseline") is None
    owner_ds = chest_dataset(320, seed=100, bits=8 if jpeg else 12)
    patient_b = same_uid_as(owner_ds, seed=101, PatientID="PID-second-patient-0101")
    encode_as = (lambda ds: encode(ds, "jpeg_baseline")) if jpeg else to_bytes
    db_url = f"sqlite:///{home / 'cxr.db'}"
    stack = Stack(log_dir=tmp_path / "logs", env=env)
    stack.start("up", "up", "--port", str(port))
    try:
        base = f"http://127.0.0.1:{port}"
        stack.wait_http(f"{base}/health")

        def studies(count: int):
            stack.assert_running()
            with session_scope(db_url) as s:
                found = s.scalars(select(Study).order_by(Study.created_at)).all()
            return found if len(found) == count and all(st.status == "done" for st in found) else None

        owner_bytes = encode_as(owner_ds)
        (inbox / "owner.dcm").write_bytes(owner_bytes)
        (owner,) = wait_until(lambda: studies(1), timeout=120, describe=stack.logs)
        (inbox / "patient-b.dcm").write_bytes(encode_as(patient_b))
        owner, b = wait_until(lambda: studies(2), timeout=120, describe=stack.logs)
        assert list(inbox.iterdir()) == []  # taken in, not deleted as a re-send

        # Through the API: a true re-send of the owner (lossless: RLE of its decoded pixels) and
        # a film of the owner's patient with the same UIDs but other pixels.
        from pydicom import dcmread

        resend = dcmread(_io.BytesIO(owner_bytes))
        resend.decompress(generate_instance_uid=False)
        other_pixels = same_uid_as(owner_ds, seed=102)
        r = httpx.post(f"{base}/jobs", files=[("files", ("resend.dcm", encode(resend, "rle"), "application/dicom")),
                                              ("files", ("other.dcm", to_bytes(other_pixels), "application/dicom"))],
                       timeout=60)
        assert r.status_code == 202, r.text
        ref_resend, ref_other = r.json()["studies"]
        assert (ref_resend["study_id"], ref_resend["duplicate"], ref_resend["marker"]) == (
            str(owner.id), "same_sop_instance", None)
        assert ref_other["marker"] == "uid_conflict" and ref_other["duplicate"] is None
        owner, b, c = wait_until(lambda: studies(3), timeout=120, describe=stack.logs)
        assert str(c.id) == ref_other["study_id"]
        with session_scope(db_url) as s:
            assert s.scalar(select(func.count(Result.id)).where(Result.study_id == owner.id)) == 1  # once
            assert s.scalar(select(func.count(StudyFile.id)).where(StudyFile.study_id == owner.id)) == 2
        for st, said in ((b, "another patient"), (c, "other pixels")):
            assert st.marker == "uid_conflict" and st.conflicts_with == owner.id and said in st.marker_detail

        # Every view shows it.
        body = httpx.get(f"{base}/studies/{b.id}", timeout=30).json()
        assert (body["marker"], body["conflicts_with"]) == ("uid_conflict", str(owner.id))
        assert httpx.get(f"{base}/studies/{owner.id}", timeout=30).json()["marker"] is None
        wl = {w["study_id"]: w for w in json.loads(cxr("worklist", "-f", "json", env=env).stdout)}
        assert [wl[str(x.id)]["marker"] for x in (owner, b, c)] == [None, "uid_conflict", "uid_conflict"]
        listed = cxr("worklist", "-f", "csv", env=env).stdout
        rows_csv = {r["study_id"]: r for r in csv.DictReader(_io.StringIO(listed))}
        assert rows_csv[str(b.id)]["marker"] == "uid_conflict" and rows_csv[str(owner.id)]["marker"] == ""
        assert "another patient" in rows_csv[str(b.id)]["marker_detail"]
        table = cxr("worklist", env=env).stdout
        assert table.count("uid_conflict") == 2 and "marker" in table.splitlines()[1]
        html = cxr("worklist", "-f", "html", env=env).stdout
        assert html.count('class="badge mark"') == 2 and "another patient" in html
        shown = cxr("study", "show", str(b.id), env=env).stdout
        assert "uid_conflict" in shown and str(owner.id) in shown
        history = json.loads(cxr("study", "show", str(owner.id), "-f", "json", env=env).stdout)["history"]
        assert any((h["detail"] or "").startswith("uid_conflict: ") and str(b.id) in h["detail"] for h in history)
        stack.assert_running()
    finally:
        codes = stack.stop()
    assert codes["up"] == 0, stack.logs()
    logs = stack.logs()
    assert "uid_conflict" in logs and "PID-second-patient" not in logs and SECRET_PATIENT_ID not in logs
