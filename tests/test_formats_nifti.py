"""NIfTI with real frame times and the public dataset layouts (ISLES 2018, ISLES'24, UniToBrain):
round trips of a phantom written by our own writers, the time sources in order, the background →
mask rule, per-parameter labels, and the same calc maps as the classic DICOM of the same study."""

from __future__ import annotations

import dataclasses
import json
import warnings

import nibabel as nib
import numpy as np
import pytest
from conftest import tiny_phantom

from stm_dlp.data.nifti4d import read_nifti4d
from stm_dlp.data.phantom import CORE, PENUMBRA, simulate_patient
from stm_dlp.data.studies import list_patients, read_any_study, study_layout, study_sources
from stm_dlp.io.dicom_writer import write_study_dicom
from stm_dlp.io.layouts import (
    UNITOBRAIN_MAPS,
    sidecar_timing,
    write_isles2018_case,
    write_isles2024_case,
    write_nifti4d,
    write_nifti_patient,
    write_unitobrain_case,
)
from stm_dlp.perfusion.maps import calculate_maps
from stm_dlp.types import PARAMS, Study, StudyError

CFG = tiny_phantom(height=24, width=24, frames_min=20, frames_max=20)


@pytest.fixture(scope="module")
def truth() -> Study:
    st = simulate_patient(CFG, seed=23)
    # whole HU, so that int16 DICOM holds the frames exactly and every layout has the same input
    return dataclasses.replace(st, frames=np.round(st.frames).astype(np.float32))


@pytest.fixture(scope="module")
def uniform(truth) -> Study:
    """The same frames on a uniform 1.5 s clock (what pixdim can hold)."""
    times = np.repeat((np.arange(truth.n_frames) * 1.5)[None], truth.n_slices, axis=0).astype(np.float32)
    return dataclasses.replace(truth, times_s=times)


def _calc(study: Study, mask: np.ndarray) -> dict[str, np.ndarray]:
    maps, _ = calculate_maps(study.frames, study.times_s, mask, spatial_sigma_px=0, device="cpu")
    return maps


def _same_calc(study: Study, reference: Study, mask: np.ndarray) -> None:
    a, b = _calc(study, mask), _calc(reference, mask)
    for p in ("cbv", "cbf", "tmax", "mtt"):
        np.testing.assert_allclose(a[p], b[p], rtol=1e-4, atol=1e-4, err_msg=p)


@pytest.fixture(scope="module")
def classic(truth, tmp_path_factory) -> Study:
    d = tmp_path_factory.mktemp("classic")
    write_study_dicom(truth, d, seed=1)
    return read_any_study(d)


def _assert_round_trip(back: Study, truth: Study, labelled=PARAMS) -> None:
    np.testing.assert_array_equal(back.frames, truth.frames)
    np.testing.assert_allclose(back.times_s, truth.times_s, atol=1e-4)
    np.testing.assert_allclose(back.affine, truth.affine, atol=1e-4)
    assert back.labelled == tuple(labelled)
    for i, p in enumerate(PARAMS):
        if p in labelled:
            np.testing.assert_allclose(back.maps[:, i][truth.mask], truth.maps[:, i][truth.mask], atol=1e-6)
        else:
            assert not back.maps[:, i].any()  # zero-filled, skipped by losses and metrics


# ------------------------------------------------------------------------------ 4-D NIfTI times
def test_nifti_patient_round_trip_and_classic_calc(truth, classic, tmp_path):
    patient = write_nifti_patient(tmp_path / "sub-0001", truth)
    assert study_layout(patient) == "nifti_labelled"
    back = read_any_study(patient)
    _assert_round_trip(back, truth)
    np.testing.assert_array_equal(back.mask, truth.mask)
    assert back.meta["time_source"] == "BIDS sidecar ctp.json: FrameTimesStart"
    _same_calc(back, classic, truth.mask)


@pytest.mark.parametrize("times,source", [("pixdim", "pixdim[4]"), ("five_d", "pixdim[5]")])
def test_header_time_step(uniform, tmp_path, times, source):
    back = read_nifti4d(write_nifti4d(uniform, tmp_path / "ctp.nii.gz", times=times))
    np.testing.assert_allclose(back.times_s, uniform.times_s, atol=1e-5)
    assert source in back.meta["time_source"]


def test_milliseconds_and_the_configured_interval(uniform, tmp_path):
    path = write_nifti4d(uniform, tmp_path / "ms.nii", times="pixdim")
    img = nib.load(path, mmap=False)  # not memory-mapped: the file is rewritten below
    img = nib.Nifti1Image(np.asarray(img.dataobj), img.affine, img.header)
    img.header.set_xyzt_units("mm", "msec")
    img.header.set_zooms((*img.header.get_zooms()[:3], 1500.0))
    nib.save(img, path)
    np.testing.assert_allclose(read_nifti4d(path).times_s, uniform.times_s, atol=1e-4)
    with pytest.warns(UserWarning, match="contradicts"):  # the file's times win over a wrong configured one
        np.testing.assert_allclose(read_nifti4d(path, frame_interval_s=2.0).times_s, uniform.times_s, atol=1e-4)
    bare = write_nifti4d(uniform, tmp_path / "bare.nii.gz", times="none")
    with pytest.raises(StudyError, match="never guessed") as info:
        read_nifti4d(bare)
    assert "bare.nii.gz" in str(info.value)
    with pytest.warns(UserWarning, match="configured frame_interval_s"):
        back = read_nifti4d(bare, frame_interval_s=1.5)
    assert back.meta["time_source"].startswith("configured")
    np.testing.assert_allclose(back.times_s, uniform.times_s, atol=1e-5)


def test_sidecar_acquisition_duration_and_slice_timing(uniform, tmp_path):
    path = write_nifti4d(uniform, tmp_path / "ctp.nii.gz", times="none")
    side = tmp_path / "ctp.json"
    side.write_text(json.dumps({"AcquisitionDuration": 1.5 * uniform.n_frames}))
    np.testing.assert_allclose(read_nifti4d(path).times_s, uniform.times_s, atol=1e-5)
    side.write_text(json.dumps({"AcquisitionDuration": [1.5] * uniform.n_frames, "SliceTiming": [0.0, 0.7]}))
    back = read_nifti4d(path)
    np.testing.assert_allclose(back.times_s[1] - back.times_s[0], 0.7, atol=1e-5)
    assert "SliceTiming" in back.meta["time_source"]


def test_sidecar_timing_holds_per_slice_offsets_only():
    times = np.array([[0.0, 1.0, 3.0], [0.5, 1.5, 3.5]])
    assert sidecar_timing(times) == {"FrameTimesStart": [0.0, 1.0, 3.0], "SliceTiming": [0.0, 0.5]}
    with pytest.raises(ValueError, match="constant offset"):
        sidecar_timing(np.array([[0.0, 1.0, 3.0], [0.5, 2.0, 3.5]]))


# ------------------------------------------------------------------------------ ISLES 2018
def test_isles2018_writer_round_trip_and_classic_calc(uniform, tmp_path):
    case = write_isles2018_case(tmp_path / "case_1", uniform)
    assert study_layout(case) == "isles2018"
    back = read_any_study(case)
    np.testing.assert_array_equal(back.frames, uniform.frames)
    np.testing.assert_allclose(back.times_s, uniform.times_s, atol=1e-5)
    assert "pixdim[5]" in back.meta["time_source"]
    for i in range(3):
        np.testing.assert_allclose(back.maps[:, i][uniform.mask], uniform.maps[:, i][uniform.mask], atol=1e-6)
    write_study_dicom(uniform, tmp_path / "classic", seed=1)
    _same_calc(back, read_any_study(tmp_path / "classic"), uniform.mask)


# ------------------------------------------------------------------------------ ISLES'24
def test_isles2024_release_round_trip(truth, classic, tmp_path):
    lesion = np.isin(truth.meta["labels"], [CORE, PENUMBRA])
    write_isles2024_case(tmp_path, truth, space="ncct", lesion=lesion)
    subject = write_isles2024_case(tmp_path, truth)
    assert list_patients(tmp_path) == [subject] and study_layout(subject) == "isles2024"
    assert tmp_path / "derivatives" / subject.name in study_sources(subject)
    back = read_any_study(subject)
    assert back.meta["space"] == "native"
    np.testing.assert_array_equal(back.meta["lesion"], lesion)  # the ncct lesion mask is on this grid too
    _assert_round_trip(back, truth)
    np.testing.assert_array_equal(back.mask, truth.mask)  # the negative TMAX fill became the mask
    assert not back.maps[np.broadcast_to(~truth.mask[:, None], back.maps.shape)].any()  # no fill in the labels
    _same_calc(back, classic, truth.mask)
    from stm_dlp.data.isles2024 import read_isles2024_case

    ncct = read_isles2024_case(subject, space="ncct")
    assert ncct.meta["space"] == "ncct"
    np.testing.assert_array_equal(ncct.meta["lesion"], lesion)


def test_isles2024_other_spelling_zero_fill_and_missing_map(truth, tmp_path):
    subject = write_isles2024_case(tmp_path, truth, subject="sub-strokecase0001", session="ses-0001",
                                   tmax_fill=0.0)
    (next(subject.rglob("*_tmax.nii.gz"))).unlink()
    back = read_any_study(list_patients(tmp_path)[0])
    assert back.labelled == ("cbv", "cbf") and not back.maps[:, 2].any()
    # a zero fill: the brain is where a map is non-zero (all-zero CSF voxels fall outside)
    expected = truth.mask & (truth.maps[:, :2] != 0).any(axis=1)
    np.testing.assert_array_equal(back.mask, expected)


def test_isles2024_nan_fill_is_background(truth, tmp_path):
    subject = write_isles2024_case(tmp_path, truth)
    path = next(subject.rglob("*_cbf.nii.gz"))
    img = nib.load(path)
    data = np.asarray(img.dataobj, np.float32)
    data[np.transpose(~truth.mask, (2, 1, 0))] = np.nan
    nib.save(nib.Nifti1Image(data, img.affine, img.header), path)
    back = read_any_study(subject)
    np.testing.assert_array_equal(back.mask, truth.mask)
    assert np.isfinite(back.maps).all()


# ------------------------------------------------------------------------------ UniToBrain
@pytest.mark.parametrize("layout", ["release", "patient"])
def test_unitobrain_round_trip_without_tmax(truth, classic, tmp_path, layout):
    case = write_unitobrain_case(tmp_path, truth, layout=layout, patient_name="UNITO^SECRET", patient_id="U-77")
    assert list_patients(tmp_path) == [case] and study_layout(case) == "unitobrain"
    back = read_any_study(case)
    assert back.labelled == ("cbv", "cbf")
    np.testing.assert_array_equal(back.frames, truth.frames)
    np.testing.assert_allclose(back.times_s, truth.times_s, atol=1e-3)
    np.testing.assert_allclose(back.affine, truth.affine, atol=1e-6)
    for i, key in ((0, "NLR_CBV"), (1, "NLR_CBF")):  # each map with its own rescale
        np.testing.assert_allclose(back.maps[:, i][back.mask], truth.maps[:, i][back.mask],
                                   atol=UNITOBRAIN_MAPS[key][0] / 2 + 1e-6)
    assert not back.maps[:, 2].any()
    assert back.mask.sum() > 0.9 * truth.mask.sum() and not (back.mask & ~truth.mask).any()
    assert back.meta["nlr_mtt"].shape == back.mask.shape and "nlr_ttp" in back.meta
    assert "UNITO" not in repr(back.meta) and "U-77" not in repr(back.meta)
    _same_calc(back, classic, truth.mask)


def test_unitobrain_labels_reach_the_batch(truth, tmp_path):
    from stm_dlp.types import collate_slices

    back = read_any_study(write_unitobrain_case(tmp_path, truth))
    batch = collate_slices([back.slice_sample(s) for s in range(back.n_slices)])
    assert batch.labelled.tolist() == [[True, True, False]] * back.n_slices


def test_layout_detection_of_a_mixed_root(truth, uniform, tmp_path):
    write_nifti_patient(tmp_path / "a_nifti", truth)
    write_isles2018_case(tmp_path / "b_case", uniform)
    write_unitobrain_case(tmp_path, truth, name="MOL-003")
    (tmp_path / "notes").mkdir()
    names = [p.name for p in list_patients(tmp_path)]
    assert names == ["MOL-003_Registered_Filtered_3mm_20HU", "a_nifti", "b_case"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layouts = [read_any_study(p).meta["layout"] for p in list_patients(tmp_path)]
    assert layouts == ["unitobrain", "nifti_labelled", "isles2018"]
