"""DICOM layouts beyond the classic series: enhanced multi-frame (one file, one per time point), one
series per time point, shuttle mode — round trips against the phantom, the same calc maps as the
classic DICOM of the same study, and the vendor quirks (Canon, Siemens, Philips)."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from conftest import tiny_phantom

from stm_dlp.data.dicom import read_dicom_study
from stm_dlp.data.phantom import simulate_patient
from stm_dlp.data.studies import read_any_study
from stm_dlp.io.dicom_writer import (
    ENHANCED_CT_IMAGE_STORAGE,
    shuttle_study,
    write_study_dicom,
    write_study_enhanced,
)
from stm_dlp.io.nifti import write_maps_nifti
from stm_dlp.perfusion.maps import calculate_maps
from stm_dlp.types import Study, StudyError, collate_slices, maps_by_name

CFG = tiny_phantom(height=24, width=24, frames_min=20, frames_max=20)
PHI = ("QUIRK^PATIENT", "QUIRK-ID-9")

WRITERS = {
    "classic": lambda st, d: write_study_dicom(st, d, seed=1, patient_name=PHI[0], patient_id=PHI[1]),
    "series_per_time_point": lambda st, d: write_study_dicom(st, d, seed=1, patient_name=PHI[0], patient_id=PHI[1],
                                                             series_per_time_point=True),
    "enhanced_single": lambda st, d: write_study_enhanced(st, d, seed=1, patient_name=PHI[0], patient_id=PHI[1]),
    "enhanced_per_time_point": lambda st, d: write_study_enhanced(st, d, seed=1, files="per_time_point",
                                                                  patient_name=PHI[0], patient_id=PHI[1]),
    # Canon/Toshiba: one file per volume, each its own series, TemporalPositionIndex = 1 everywhere
    "enhanced_canon": lambda st, d: write_study_enhanced(st, d, seed=1, files="per_time_point", series_per_file=True,
                                                         temporal_position_index="constant", patient_name=PHI[0],
                                                         patient_id=PHI[1]),
}


@pytest.fixture(scope="module")
def truth() -> Study:
    return simulate_patient(CFG, seed=21)


def _patient(tmp, study: Study, layout: str):
    WRITERS[layout](study, tmp / "ctp")
    write_maps_nifti(tmp / "maps", {**maps_by_name(study.maps), "mask": study.mask}, study.affine)
    return tmp


def _calc(study: Study) -> dict[str, np.ndarray]:
    maps, _ = calculate_maps(study.frames, study.times_s, study.mask, spatial_sigma_px=0, device="cpu")
    return maps


@pytest.fixture(scope="module")
def classic_calc(truth, tmp_path_factory):
    return _calc(read_any_study(_patient(tmp_path_factory.mktemp("classic"), truth, "classic")))


@pytest.mark.parametrize("layout", sorted(WRITERS))
def test_layout_round_trips_and_gives_the_classic_calc_maps(layout, truth, classic_calc, tmp_path):
    back = read_any_study(_patient(tmp_path, truth, layout))
    assert back.frames.shape == truth.frames.shape
    assert np.max(np.abs(back.frames - truth.frames)) <= 0.5 + 1e-3  # int16 storage
    assert np.max(np.abs(back.times_s - truth.times_s)) < 1e-3
    np.testing.assert_allclose(back.affine, truth.affine, atol=1e-6)
    np.testing.assert_array_equal(back.maps, truth.maps)
    np.testing.assert_array_equal(back.mask, truth.mask)
    expected_layout = "one series per time point" if layout in ("series_per_time_point", "enhanced_canon") \
        else "one series"
    assert back.meta["series_layout"] == expected_layout
    assert back.meta["dicom_format"].startswith("enhanced" if layout.startswith("enhanced") else "single-frame")
    assert not any(phi in repr(back.meta) for phi in PHI)
    maps = _calc(back)
    for p in ("cbv", "cbf", "tmax", "mtt"):
        np.testing.assert_allclose(maps[p], classic_calc[p], rtol=1e-3, atol=1e-3, err_msg=f"{layout}: {p}")


def test_enhanced_file_is_enhanced_ct_with_frames_in_shuffled_order(truth, tmp_path):
    (path,) = write_study_enhanced(truth, tmp_path, seed=4)
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == ENHANCED_CT_IMAGE_STORAGE and int(ds.NumberOfFrames) == truth.n_slices * truth.n_frames
    content = [f.FrameContentSequence[0] for f in ds.PerFrameFunctionalGroupsSequence]
    order = [(int(c.InStackPositionNumber), int(c.TemporalPositionIndex)) for c in content]
    assert order != sorted(order)  # a reader cannot rely on the order of the frames
    assert ds.pixel_array.shape == (len(order), *truth.shape_hw)


def test_enhanced_compressed_file_is_decoded_once_and_read(truth, tmp_path):
    (path,) = write_study_enhanced(truth, tmp_path, seed=2)
    ref = read_dicom_study(tmp_path)
    ds = pydicom.dcmread(path)
    ds.compress(pydicom.uid.RLELossless)
    ds.save_as(path, enforce_file_format=True)
    back = read_dicom_study(tmp_path)
    np.testing.assert_array_equal(back.frames, ref.frames)
    np.testing.assert_array_equal(back.times_s, ref.times_s)


def test_canon_constant_temporal_position_index_is_not_trusted(truth, tmp_path):
    paths = WRITERS["enhanced_canon"](truth, tmp_path)
    assert {int(f.FrameContentSequence[0].TemporalPositionIndex) for p in paths
            for f in pydicom.dcmread(p).PerFrameFunctionalGroupsSequence} == {1}
    back = read_dicom_study(tmp_path)
    assert back.meta["time_tag"] == "FrameAcquisitionDateTime"
    assert np.max(np.abs(back.times_s - truth.times_s)) < 1e-3


def _scramble(paths, keyword: str, rng: np.random.Generator) -> None:
    """De-identification that shuffles ``keyword`` among the frames of each slice (Siemens exports)."""
    for p in paths:
        ds = pydicom.dcmread(p)
        by_slice: dict[int, list] = {}
        for f in ds.PerFrameFunctionalGroupsSequence:
            item = f.FrameContentSequence[0]
            by_slice.setdefault(int(item.InStackPositionNumber), []).append(item)
        for items in by_slice.values():
            values = [getattr(i, keyword) for i in items]
            for i, v in zip(items, rng.permutation(values)):
                setattr(i, keyword, str(v))
        ds.save_as(p, enforce_file_format=True)


def test_siemens_scrambled_frame_acquisition_datetime_falls_back(truth, tmp_path):
    paths = write_study_enhanced(truth, tmp_path, seed=3)
    _scramble(paths, "FrameAcquisitionDateTime", np.random.default_rng(0))
    back = read_dicom_study(tmp_path)
    assert back.meta["time_tag"] == "FrameReferenceDateTime"  # the intact per-frame time
    assert np.max(np.abs(back.times_s - truth.times_s)) < 1e-3
    assert np.max(np.abs(back.frames - truth.frames)) <= 0.5 + 1e-3


def test_scrambled_times_without_a_fallback_are_refused(truth, tmp_path):
    paths = write_study_enhanced(truth, tmp_path, seed=3, time_tags=("FrameAcquisitionDateTime",))
    _scramble(paths, "FrameAcquisitionDateTime", np.random.default_rng(1))
    with pytest.raises(StudyError) as info:
        read_dicom_study(tmp_path)
    msg = str(info.value)
    assert paths[0].name in msg and "FrameAcquisitionDateTime" in msg and "TemporalPositionIndex" in msg
    assert "\n" not in msg and not any(phi in msg for phi in PHI)


def test_duplicate_frame_times_fall_back_to_the_temporal_offset(truth, tmp_path):
    """De-identification that sets every FrameAcquisitionDateTime of a slice to one value."""
    (path,) = write_study_enhanced(truth, tmp_path, seed=5,
                                   time_tags=("FrameAcquisitionDateTime", "TemporalPositionTimeOffset"))
    ds = pydicom.dcmread(path)
    for f in ds.PerFrameFunctionalGroupsSequence:
        f.FrameContentSequence[0].FrameAcquisitionDateTime = "20240101120000"
    ds.save_as(path, enforce_file_format=True)
    back = read_dicom_study(tmp_path)
    assert back.meta["time_tag"] == "TemporalPositionTimeOffset"
    assert np.max(np.abs(back.times_s - truth.times_s)) < 1e-3


@pytest.mark.parametrize("layout", ["classic", "enhanced_per_time_point"])
def test_philips_random_instance_numbers_change_nothing(layout, truth, tmp_path):
    ref = read_dicom_study(_patient(tmp_path / "ref", truth, layout) / "ctp")
    WRITERS[layout](truth, tmp_path / "philips")
    rng = np.random.default_rng(7)
    for p in sorted((tmp_path / "philips").rglob("*.dcm")):
        ds = pydicom.dcmread(p)
        ds.InstanceNumber = int(rng.integers(1, 4))  # repeated and random
        ds.save_as(p, enforce_file_format=True)
    back = read_dicom_study(tmp_path / "philips")
    np.testing.assert_array_equal(back.frames, ref.frames)
    np.testing.assert_array_equal(back.times_s, ref.times_s)


def test_a_cta_beside_the_ctp_is_refused_naming_both(truth, tmp_path):
    write_study_dicom(truth, tmp_path, seed=1)
    cta = simulate_patient(tiny_phantom(height=16, width=16, n_slices=3, frames_min=2, frames_max=2), seed=2)
    # a single volume (one image per slice), another geometry: a CTA, not a time point
    vol = write_study_dicom(cta, tmp_path / "cta", seed=9)
    for row in vol:
        row[1].unlink()
    with pytest.raises(StudyError, match="more than one CT series") as info:
        read_dicom_study(tmp_path)
    assert str(info.value).count("series ") >= 2


# ------------------------------------------------------------------------------ shuttle mode
@pytest.fixture(scope="module")
def shuttle_pair():
    """A 40-frame phantom and its 2-position shuttle acquisition (slab 1 imaged at the odd frames)."""
    full = simulate_patient(tiny_phantom(height=24, width=24, frames_min=40, frames_max=40, noise_hu=0.0), seed=31)
    return full, shuttle_study(full, positions=2)


def test_shuttle_round_trip_keeps_per_slice_times(shuttle_pair, tmp_path):
    _full, sh = shuttle_pair
    assert not np.allclose(sh.times_s[0], sh.times_s[1])
    write_study_dicom(sh, tmp_path, seed=2)
    back = read_dicom_study(tmp_path)
    np.testing.assert_allclose(back.times_s, sh.times_s, atol=1e-3)
    assert np.max(np.abs(back.frames - sh.frames)) <= 0.5 + 1e-3


def test_shuttle_calc_uses_per_slice_times(shuttle_pair):
    """calculate_maps on per-slice times: slab 1's TMAX agrees with the full acquisition's; given slab 0's
    times instead (a shared clock), slab 1 reads late or early by the interleave."""
    full, sh = shuttle_pair
    aif = {"times_s": full.times_s[0].astype(np.float64), "aif": full.meta["aif_hu"][0].astype(np.float64)}
    # one TMAX pass, exponential-only calibration: the default TMAX pass reads a third of this
    # phantom's normal tissue (TMAX ~0-1 s) as 0, which hides the interleave
    kw = dict(aif=aif, spatial_sigma_px=0, device="cpu", tmax_method="calibrated", tmax_oi_target=None)
    ref, _ = calculate_maps(full.frames, full.times_s, full.mask, **kw)
    good, _ = calculate_maps(sh.frames, sh.times_s, sh.mask, **kw)
    shared = np.repeat(sh.times_s[:1], sh.n_slices, axis=0)
    bad, _ = calculate_maps(sh.frames, shared, sh.mask, **kw)
    tissue = full.mask[1] & (ref["cbf"][1] > 5)
    err_good = float(np.median(np.abs(good["tmax"][1] - ref["tmax"][1])[tissue]))
    err_bad = float(np.median(np.abs(bad["tmax"][1] - ref["tmax"][1])[tissue]))
    shift = float(np.median(sh.times_s[1] - sh.times_s[0]))
    assert err_good < 0.35 * shift < err_bad, (err_good, err_bad, shift)


def test_shuttle_model_input_is_the_slice_own_times(shuttle_pair):
    """Study.slice_sample and the batch carry each slice's own frame times (re-zeroed at its first frame)."""
    _full, sh = shuttle_pair
    samples = [sh.slice_sample(s) for s in range(sh.n_slices)]
    batch = collate_slices(samples)
    for s in range(sh.n_slices):
        np.testing.assert_allclose(batch.times_s[s].numpy(), sh.times_s[s] - sh.times_s[s, 0], atol=1e-6)
    assert not np.allclose(batch.times_s[0].numpy(), batch.times_s[1].numpy())


def test_predict_feeds_the_model_each_slice_own_times(shuttle_pair):
    import torch

    from stm_dlp.predict import predict_study

    _full, sh = shuttle_pair
    seen: list[torch.Tensor] = []

    class Spy(torch.nn.Module):
        def forward(self, frames, times_s, lengths, *args, **kwargs):
            seen.append(times_s.clone())
            return torch.zeros(frames.shape[0], 3, *frames.shape[2:])

    predict_study(Spy(), torch.ones(3), sh, batch_size=4, device="cpu")
    times = torch.cat(seen).numpy()
    for s in range(sh.n_slices):
        np.testing.assert_allclose(times[s, :sh.n_frames], sh.times_s[s] - sh.times_s[s, 0], atol=1e-6)


def test_implicit_vr_enhanced_file(truth, tmp_path):
    """Implicit VR carries no VR for the binary per-frame integers (TemporalPositionIndex is UL)."""
    (path,) = write_study_enhanced(truth, tmp_path, seed=6)
    ref = read_dicom_study(tmp_path)
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    ds.save_as(path, implicit_vr=True, little_endian=True, enforce_file_format=True)
    back = read_dicom_study(tmp_path)
    np.testing.assert_array_equal(back.frames, ref.frames)
    np.testing.assert_array_equal(back.times_s, ref.times_s)
