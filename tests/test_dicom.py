"""DICOM reader: round trips through the writer for every vendor time style, PHI, and bad studies."""

from __future__ import annotations

import time

import numpy as np
import pydicom
import pytest
from bad_studies import CASES, PHI, Corpus
from conftest import tiny_phantom

from stm_dlp.data.dicom import (
    parse_da,
    parse_dt,
    parse_tm,
    pseudonymise,
    read_dicom_study,
)
from stm_dlp.data.phantom import PhantomConfig, simulate_patient
from stm_dlp.data.studies import read_any_study, read_labelled_study
from stm_dlp.io.dicom_writer import CT_IMAGE_STORAGE, TIME_STYLES, write_study_dicom
from stm_dlp.types import StudyError

CFG = tiny_phantom(n_slices=3, frames_min=12, frames_max=12, noise_hu=2.0)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return Corpus(tmp_path_factory.mktemp("bad_studies"))


@pytest.mark.parametrize("style", TIME_STYLES)
def test_round_trip_every_time_style(tmp_path, style):
    study = simulate_patient(CFG, seed=11)
    write_study_dicom(study, tmp_path / "ctp", time_style=style, patient_name="DOE^JANE", patient_id="ID-77",
                      seed=5)
    back = read_dicom_study(tmp_path / "ctp")
    assert back.frames.shape == study.frames.shape
    assert np.max(np.abs(back.frames - study.frames)) <= 0.5 + 1e-3
    assert np.max(np.abs(back.times_s - study.times_s)) < 1e-3
    np.testing.assert_allclose(back.affine, study.affine, atol=1e-6)
    assert back.meta["crosses_midnight"] == (style == "midnight")
    expected_tag = {"acquisition_time": "AcquisitionDate+AcquisitionTime",
                    "content_trigger": "ContentDate+ContentTime+TriggerTime",
                    "acquisition_datetime": "AcquisitionDateTime", "midnight": "AcquisitionTime"}[style]
    assert back.meta["time_tag"] == expected_tag
    assert back.patient_id == pseudonymise("ID-77") and back.patient_id.startswith("pt-")
    text = repr(back.meta) + back.patient_id + back.source
    assert "DOE" not in text and "ID-77" not in text


def test_files_are_valid_ct_with_unique_uids(tmp_path):
    study = simulate_patient(CFG, seed=2)
    paths = write_study_dicom(study, tmp_path / "a", time_style="acquisition_time", patient_name="ALPHA^ONE",
                              patient_id="A-1", seed=1)
    write_study_dicom(simulate_patient(CFG, seed=3), tmp_path / "b", time_style="midnight",
                      patient_name="BETA^TWO", patient_id="B-2", seed=2)
    flat = [p for row in paths for p in row]
    assert len(flat) == 3 * 12 and len({p.name for p in flat}) == len(flat)
    sops, series = set(), set()
    for p in flat:
        ds = pydicom.dcmread(p)
        assert ds.SOPClassUID == CT_IMAGE_STORAGE == ds.file_meta.MediaStorageSOPClassUID
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert ds.SOPInstanceUID.is_valid and ds.SeriesInstanceUID.is_valid and ds.StudyInstanceUID.is_valid
        assert ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID
        sops.add(ds.SOPInstanceUID)
        series.add(ds.SeriesInstanceUID)
        assert ds.pixel_array.shape == (16, 16)
    assert len(sops) == len(flat) and len(series) == 1
    for p in (tmp_path / "b").rglob("*.dcm"):
        raw = p.read_bytes()
        assert b"ALPHA" not in raw and b"A-1" not in raw
        assert pydicom.dcmread(p).SeriesInstanceUID not in series


def test_reader_ignores_names_hidden_files_dicomdir_and_non_image_objects(tmp_path):
    study = simulate_patient(CFG, seed=4)
    paths = write_study_dicom(study, tmp_path / "ctp", time_style="content_trigger", seed=9)
    # rename files to meaningless names in reversed order, add hidden junk, a DICOMDIR and an SR
    flat = [p for row in paths for p in row]
    for i, p in enumerate(flat):
        p.rename(p.with_name(f"z{len(flat) - i:04d}"))
    (tmp_path / "ctp" / ".DS_Store").write_bytes(b"junk")
    (tmp_path / "ctp" / "DICOMDIR").write_bytes(b"not parsed")
    sr = pydicom.dcmread(next((tmp_path / "ctp").rglob("z0001")))
    sr.SOPClassUID = sr.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.22"
    sr.Modality = "SR"
    sr.SOPInstanceUID = sr.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    del sr.PixelData
    sr.save_as(tmp_path / "ctp" / "dose_report", enforce_file_format=True)
    back = read_dicom_study(tmp_path / "ctp")
    assert np.max(np.abs(back.frames - study.frames)) <= 0.5 + 1e-3
    assert any("dose_report" in s for s in back.meta["skipped"])


def test_time_parsers():
    assert parse_tm("101530.25") == pytest.approx(10 * 3600 + 15 * 60 + 30.25)
    assert parse_tm("10:15:30") == pytest.approx(36930.0)
    assert parse_tm("1015") == pytest.approx(36900.0)
    assert parse_dt("20240102000000.5") - parse_dt("20240101235959.5") == pytest.approx(1.0)
    assert parse_dt("20240101120000+0100") == pytest.approx(parse_dt("20240101110000"))
    assert parse_da("20240102") - parse_da("20231231") == 2
    for bad in ("25:00:00", "abc", "1"):
        with pytest.raises(ValueError):
            parse_tm(bad)


def test_pseudonymise_is_keyed_and_stable():
    a, b = pseudonymise("12345"), pseudonymise("12345", b"site-secret")
    assert a == pseudonymise("12345") and a != b and len(a) == 3 + 12


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_study_is_refused_with_a_useful_message(corpus, name):
    case = CASES[name](corpus)
    reader = {"labelled": read_labelled_study, "dicom": read_dicom_study, "any": read_any_study}[case.reader]
    with pytest.raises(StudyError) as info:
        reader(case.path)
    msg = str(info.value)
    assert "\n" not in msg.strip(), f"{name}: multi-line message {msg!r}"
    for needle in case.needles:
        assert needle in msg, f"{name}: {needle!r} not in {msg!r}"
    assert any(k in msg.lower() for k in case.keywords), f"{name}: none of {case.keywords} in {msg!r}"
    for phi in (*PHI, "PHANTOM^", "SOMEONE-ELSE"):
        assert phi not in msg, f"{name}: PHI {phi!r} leaked into {msg!r}"


@pytest.mark.slow
def test_parse_rate(tmp_path):
    """Benchmark: a 4-patient 64×64, 4-slice, 50-frame cohort (800 files); reports files/s."""
    from stm_dlp.synth import synthesize_cohort

    cfg = PhantomConfig(height=64, width=64, n_slices=4, frames_min=50, frames_max=50)
    dirs = synthesize_cohort(tmp_path, 4, cfg, progress=False)
    n_files = sum(1 for d in dirs for _ in (d / "ctp").rglob("*.dcm"))
    t0 = time.perf_counter()
    for d in dirs:
        read_dicom_study(d / "ctp")
    rate = n_files / (time.perf_counter() - t0)
    print(f"DICOM parse rate: {rate:.0f} files/s ({n_files} files)")
    assert rate > 300


def _rewrite_all(folder, fn):
    for p in sorted(folder.rglob("*.dcm")):
        ds = pydicom.dcmread(p)
        kwargs = fn(ds) or {}
        ds.save_as(p, enforce_file_format=True, **kwargs)


def test_implicit_vr_and_12_bit_pixels(tmp_path):
    study = simulate_patient(CFG, seed=6)
    write_study_dicom(study, tmp_path / "ctp", seed=3)
    ref = read_dicom_study(tmp_path / "ctp")

    def to_12_bit_implicit(ds):
        stored = np.frombuffer(ds.PixelData, "<i2").astype(np.int32) + 1024  # HU + 2048 >= 0
        assert stored.min() >= 0 and stored.max() < 4096
        junk = (np.arange(stored.size) % 16).astype(np.int32) << 12  # overlay bits above BitsStored
        ds.PixelData = (stored | junk).astype("<u2").tobytes()
        ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 12, 11, 0
        ds.RescaleIntercept = "-2048"
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
        return {"implicit_vr": True, "little_endian": True}

    _rewrite_all(tmp_path / "ctp", to_12_bit_implicit)
    back = read_dicom_study(tmp_path / "ctp")
    np.testing.assert_array_equal(back.frames, ref.frames)
    np.testing.assert_array_equal(back.times_s, ref.times_s)


def test_midnight_with_the_date_kept_at_series_start(tmp_path):
    study = simulate_patient(CFG, seed=8)
    write_study_dicom(study, tmp_path / "ctp", time_style="midnight", seed=4)

    def add_date(ds):
        ds.AcquisitionDate = "20240229"  # the scanner keeps the series date after 00:00

    _rewrite_all(tmp_path / "ctp", add_date)
    back = read_dicom_study(tmp_path / "ctp")
    assert back.meta["time_tag"] == "AcquisitionDate+AcquisitionTime" and back.meta["crosses_midnight"]
    assert np.max(np.abs(back.times_s - study.times_s)) < 1e-3


def test_frames_a_day_apart_are_refused(tmp_path):
    study = simulate_patient(CFG, seed=9)
    paths = write_study_dicom(study, tmp_path / "ctp", time_style="acquisition_time", seed=4)
    ds = pydicom.dcmread(paths[1][5])
    ds.AcquisitionDate = (np.datetime64(f"{ds.AcquisitionDate[:4]}-{ds.AcquisitionDate[4:6]}-"
                                        f"{ds.AcquisitionDate[6:]}") + 1).astype(str).replace("-", "")
    ds.save_as(paths[1][5], enforce_file_format=True)
    with pytest.raises(StudyError, match="mixes acquisitions") as info:
        read_dicom_study(tmp_path / "ctp")
    assert paths[1][5].name in str(info.value)


def test_localizer_is_skipped(tmp_path):
    study = simulate_patient(CFG, seed=10)
    paths = write_study_dicom(study, tmp_path / "ctp", seed=4)
    scout = pydicom.dcmread(paths[0][0])
    scout.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    scout.SeriesInstanceUID = pydicom.uid.generate_uid()
    scout.SOPInstanceUID = scout.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    scout.save_as(tmp_path / "ctp" / "scout.dcm", enforce_file_format=True)
    back = read_dicom_study(tmp_path / "ctp")
    assert back.frames.shape == study.frames.shape
    assert any(s.startswith("scout.dcm") for s in back.meta["skipped"])


def test_decodable_compressed_files_go_through_pydicom(tmp_path):
    study = simulate_patient(CFG, seed=12)
    write_study_dicom(study, tmp_path / "ctp", seed=3)
    ref = read_dicom_study(tmp_path / "ctp")
    for p in sorted((tmp_path / "ctp").rglob("*.dcm"))[::2]:
        ds = pydicom.dcmread(p)
        ds.compress(pydicom.uid.RLELossless)
        ds.save_as(p, enforce_file_format=True)
    back = read_dicom_study(tmp_path / "ctp")
    np.testing.assert_array_equal(back.frames, ref.frames)
