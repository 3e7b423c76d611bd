"""ISLES 2018 adapter on a tiny synthetic case built with nibabel."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from stm_dlp.data.isles import find_isles_files, is_isles_case, read_isles_case
from stm_dlp.data.studies import list_patients, read_any_study
from stm_dlp.types import StudyError

X, Y, Z, T = 12, 10, 3, 8
AFFINE = np.array([[-0.9, 0, 0, 50.0], [0, 0.9, 0, -40.0], [0, 0, 5.0, -10.0], [0, 0, 0, 1]])


def _save(path, data, time_step=None, time_unit="sec", ext=".nii"):
    img = nib.Nifti1Image(np.asarray(data, np.float32), AFFINE)
    if time_step is not None:
        zooms = list(img.header.get_zooms())
        zooms[-1] = time_step
        img.header.set_zooms(zooms)
    img.header.set_xyzt_units("mm", time_unit)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path) + ext)


def make_case(root, name="case_1", time_step=1.5, time_unit="sec", five_d=False, maps=("CBV", "CBF", "Tmax")):
    case = root / name
    rng = np.random.default_rng(0)
    pwi = rng.normal(40, 5, (X, Y, Z, T)).astype(np.float32)
    data = pwi[:, :, :, None, :] if five_d else pwi
    _save(case / "SMIR.Brain.XX.O.CT_4DPWI.345" / "SMIR.Brain.XX.O.CT_4DPWI.345", data, time_step, time_unit)
    vols = {}
    for i, m in enumerate(maps):
        vol = rng.uniform(0.5, 60, (X, Y, Z)).astype(np.float32) * (i + 1)
        vol[0, 0, :] = 0.0  # background
        vols[m] = vol
        stem = f"SMIR.Brain.XX.O.CT_{m}.{346 + i}"
        _save(case / stem / stem, vol, ext=".nii.gz")
    _save(case / "SMIR.Brain.XX.O.CT_MTT.350" / "SMIR.Brain.XX.O.CT_MTT.350", np.ones((X, Y, Z)))
    ot = np.zeros((X, Y, Z))
    ot[3:5, 2:4, 1] = 1
    _save(case / "SMIR.Brain.XX.O.OT.351" / "SMIR.Brain.XX.O.OT.351", ot)
    _save(case / "SMIR.Brain.XX.O.CT.352" / "SMIR.Brain.XX.O.CT.352", np.full((X, Y, Z), 30.0))
    return case, pwi, vols


def test_reads_frames_times_maps_in_our_convention(tmp_path):
    case, pwi, vols = make_case(tmp_path)
    files = find_isles_files(case)
    assert set(files) == {"4dpwi", "cbv", "cbf", "tmax", "mtt", "ot", "ct"}
    study = read_isles_case(case)
    assert study.frames.shape == (Z, T, Y, X)
    for c, r, s, t in [(0, 0, 0, 0), (11, 9, 2, 7), (4, 7, 1, 3)]:
        assert study.frames[s, t, r, c] == pwi[c, r, s, t]
        assert study.maps[s, 0, r, c] == vols["CBV"][c, r, s]
        assert study.maps[s, 1, r, c] == vols["CBF"][c, r, s]
        assert study.maps[s, 2, r, c] == vols["Tmax"][c, r, s]
    np.testing.assert_allclose(study.times_s[1], np.arange(T) * 1.5)
    np.testing.assert_allclose(study.affine, AFFINE, atol=1e-5)
    assert not study.mask[:, 0, 0].any() and study.mask[:, 5, 5].all()
    assert study.meta["lesion"][1, 2, 3] and study.meta["lesion"].sum() == 4
    assert study.patient_id.startswith("pt-") and "case_1" not in study.patient_id


def test_time_units_and_explicit_interval(tmp_path):
    case, _, _ = make_case(tmp_path, "case_ms", time_step=1200.0, time_unit="msec")
    np.testing.assert_allclose(read_isles_case(case).times_s[0], np.arange(T) * 1.2, rtol=1e-6)
    case, _, _ = make_case(tmp_path, "case_unknown", time_step=1.0, time_unit="unknown")
    with pytest.raises(StudyError, match="frame_interval_s") as info:
        read_isles_case(case)
    assert "CT_4DPWI" in str(info.value)
    np.testing.assert_allclose(read_isles_case(case, frame_interval_s=2.0).times_s[0], np.arange(T) * 2.0)
    case, _, _ = make_case(tmp_path, "case_zero", time_step=0.0)
    with pytest.raises(StudyError, match="never guessed"):
        read_isles_case(case)


def test_five_d_and_unlabelled_and_partial(tmp_path):
    case, pwi, _ = make_case(tmp_path, "case_5d", five_d=True)
    assert read_isles_case(case).frames.shape == (Z, T, Y, X)
    case, _, _ = make_case(tmp_path, "case_test", maps=())
    study = read_isles_case(case)
    assert study.maps is None and study.mask is None
    case, _, _ = make_case(tmp_path, "case_partial", maps=("CBV", "CBF"))
    with pytest.raises(StudyError, match="CT_Tmax"):
        read_isles_case(case)


def test_listing_and_dispatch(tmp_path):
    make_case(tmp_path, "case_2")
    make_case(tmp_path, "case_1")
    (tmp_path / "notes").mkdir()
    (tmp_path / "README.txt").write_text("x")
    patients = list_patients(tmp_path)
    assert [p.name for p in patients] == ["case_1", "case_2"]
    assert is_isles_case(patients[0]) and not is_isles_case(tmp_path / "notes")
    assert read_any_study(patients[1]).frames.shape == (Z, T, Y, X)
    with pytest.raises(StudyError, match="does not exist"):
        read_isles_case(tmp_path / "case_9")
