"""Maps out to PACS (``output_dicom=true``) read back with pydicom, and ``input=ROOT`` of a cohort in
mixed layouts through calc and predict (progress bar, one summary table last, failures reported)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import tiny_phantom

from stm_dlp.data.phantom import simulate_patient
from stm_dlp.io import dicom_maps
from stm_dlp.io.dicom_maps import RESEARCH_NOTE, SECONDARY_CAPTURE_STORAGE, write_maps_dicom
from stm_dlp.io.dicom_writer import CT_IMAGE_STORAGE
from stm_dlp.io.layouts import write_isles2018_case, write_nifti_patient, write_unitobrain_case
from stm_dlp.io.nifti import read_nifti_maps
from stm_dlp.synth import fake_phi, write_patient
from stm_dlp.types import maps_by_name

CFG = tiny_phantom(height=24, width=24, frames_min=20, frames_max=20)
MAPS = ("cbf", "cbv", "mtt", "tmax")


def _series(folder: Path) -> tuple[list[pydicom.Dataset], np.ndarray]:
    """The datasets of one map series, ordered along the slice normal, and their values (S, H, W)."""
    dss = [pydicom.dcmread(p) for p in sorted(folder.iterdir())]
    iop = np.asarray(dss[0].ImageOrientationPatient, float)
    normal = np.cross(iop[:3], iop[3:])
    dss.sort(key=lambda d: float(np.asarray(d.ImagePositionPatient, float) @ normal))
    values = np.stack([d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in dss])
    return dss, values


@pytest.fixture(scope="module")
def dicom_patient(tmp_path_factory) -> Path:
    study = simulate_patient(CFG, seed=41)
    name, pid = fake_phi(0, 41)
    return write_patient(tmp_path_factory.mktemp("pacs") / "sub-0001", study, time_style="acquisition_time",
                         patient_name=name, patient_id=pid, seed=41)


def test_calc_output_dicom_reads_back_as_the_nifti_maps(dicom_patient, tmp_path):
    from stm_dlp.calc import main

    out = tmp_path / "out"
    assert main([f"input={dicom_patient}", f"output={out}", "output_dicom=true", "progress=false",
                 "device=cpu"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["dicom"]) == {*MAPS, "colour"}
    source = pydicom.dcmread(next((dicom_patient / "ctp").rglob("*.dcm")))
    name, pid = fake_phi(0, 41)
    uids = set()
    for p in MAPS:
        dss, values = _series(out / "dicom" / p.upper())
        nifti, _ = read_nifti_maps(out / f"{p}.nii.gz")
        assert values.shape == nifti.shape
        slope = float(dss[0].RescaleSlope)
        assert np.max(np.abs(values - nifti)) <= slope / 2 + 1e-6, p
        for ds in dss:
            assert ds.SOPClassUID == CT_IMAGE_STORAGE and "DERIVED" in ds.ImageType
            assert ds.FrameOfReferenceUID == source.FrameOfReferenceUID  # overlays the input
            assert ds.StudyInstanceUID != source.StudyInstanceUID and ds.SeriesInstanceUID != source.SeriesInstanceUID
            assert ds.PatientName == ds.PatientID == summary["patient_id"]
            assert RESEARCH_NOTE in ds.SeriesDescription and len(ds.SeriesDescription) <= 64
            rwvm = ds.RealWorldValueMappingSequence[0]
            assert rwvm.RealWorldValueSlope == pytest.approx(slope)
            assert rwvm.MeasurementUnitsCodeSequence[0].CodingSchemeDesignator == "UCUM"
            raw = (out / "dicom" / p.upper() / sorted(x.name for x in (out / "dicom" / p.upper()).iterdir())[0])
            assert name.encode() not in raw.read_bytes() and pid.encode() not in raw.read_bytes()
            uids.add(ds.SOPInstanceUID)
        first = pydicom.dcmread(_first_slice(dicom_patient))
        np.testing.assert_allclose(np.asarray(dss[0].ImagePositionPatient, float),
                                   np.asarray(first.ImagePositionPatient, float), atol=1e-4)
    colour = [pydicom.dcmread(p) for p in sorted((out / "dicom" / "COLOUR").iterdir())]
    assert len(colour) == CFG.n_slices and all(c.SOPClassUID == SECONDARY_CAPTURE_STORAGE for c in colour)
    rgb = colour[0].pixel_array
    assert colour[0].SamplesPerPixel == 3 and rgb.ndim == 3 and rgb.shape[2] == 3 and rgb.std() > 0
    assert len(uids) == len(MAPS) * CFG.n_slices


def _first_slice(patient: Path) -> Path:
    from stm_dlp.data.dicom import read_dicom_study

    study = read_dicom_study(patient / "ctp")
    return patient / "ctp" / study.meta["files"][0][0]


def test_dicom_output_is_never_half_written(tmp_path, monkeypatch):
    study = simulate_patient(CFG, seed=42)
    maps = maps_by_name(study.maps)
    first = write_maps_dicom(tmp_path, maps, study.affine, patient_id="pt-x", colour=False)
    real, calls = pydicom.dcmwrite, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) > 3:
            raise OSError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(dicom_maps.pydicom, "dcmwrite", failing)
    with pytest.raises(OSError, match="disk full"):
        write_maps_dicom(tmp_path, maps, study.affine, patient_id="pt-x", colour=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dicom"]  # no temporary folder left
    assert all(p.is_file() for files in first.values() for p in files)  # the previous series intact
    assert pydicom.dcmread(first["cbf"][0]).PatientID == "pt-x"


def test_nifti_input_gets_a_new_frame_of_reference(tmp_path):
    study = simulate_patient(CFG, seed=43)
    paths = write_maps_dicom(tmp_path, maps_by_name(study.maps), study.affine, patient_id="pt-n", colour=False)
    fors = {pydicom.dcmread(p).FrameOfReferenceUID for files in paths.values() for p in files}
    assert len(fors) == 1 and pydicom.uid.UID(fors.pop()).is_valid


# ------------------------------------------------------------------------------ cohorts
def _mixed_root(root: Path, layouts: tuple[str, ...]) -> Path:
    """Patients in the given layouts (p1_classic, p2_enhanced, p3_nifti, p4_case, p5 UniToBrain) and
    p6_broken, whose ctp/ holds a non-DICOM file."""
    from dataclasses import replace

    st = [simulate_patient(CFG, seed=50 + i) for i in range(5)]
    if "classic" in layouts:
        write_patient(root / "p1_classic", st[0], time_style="content_trigger", patient_name="A^B",
                      patient_id="A-1", seed=1)
    if "enhanced" in layouts:
        write_patient(root / "p2_enhanced", st[1], time_style="acquisition_time", patient_name="C^D",
                      patient_id="C-2", seed=2, layout="dicom_enhanced")
    if "nifti" in layouts:
        write_nifti_patient(root / "p3_nifti", st[2])
    if "isles2018" in layouts:
        uniform = st[3].times_s * 0 + np.arange(st[3].n_frames, dtype=np.float32) * 1.5
        write_isles2018_case(root / "p4_case", replace(st[3], times_s=uniform))
    if "unitobrain" in layouts:
        write_unitobrain_case(root, st[4], name="p5", layout="patient")
    write_patient(root / "p6_broken", st[0], time_style="acquisition_time", patient_name="E^F", patient_id="E-3",
                  seed=3)
    (next((root / "p6_broken" / "ctp").rglob("*.dcm")).parent / "notes.txt").write_text("not an image\n")
    return root


def _check_table(lines: list[str], out: Path, names: list[str], n_ok: int) -> dict[str, list[str]]:
    assert lines[-1] == f"{n_ok} of {len(names)} studies ok"
    table = lines[-len(names) - 2:-1]
    assert table[0].split()[:5] == ["patient", "status", "frames", "core_ml", "tmax>6s_ml"]
    rows = {line.split()[0]: line.split() for line in table[1:]}
    assert sorted(rows) == names
    for name, row in rows.items():
        if name == "p6_broken":
            assert row[1] == "failed" and "notes.txt" in " ".join(row) and not (out / name).exists()
        else:
            summary = json.loads((out / name / "summary.json").read_text())
            assert row[1] == "ok" and row[2] == str(summary["n_frames"]) == str(CFG.frames_max)
            ro = summary["readout"]
            assert row[3] == f"{ro['core_ml']:.1f}" and row[4] == f"{ro['hypoperfusion_ml']:.1f}"
    return rows


def test_calc_cohort_table_is_last_and_failures_are_reported(tmp_path, capsys):
    from stm_dlp.calc import main

    root, out = _mixed_root(tmp_path / "root", ("classic", "nifti")), tmp_path / "out"
    assert main([f"input={root}", f"output={out}", "progress=false", "device=cpu"]) == 2
    captured = capsys.readouterr()
    _check_table(captured.out.strip().splitlines(), out, ["p1_classic", "p3_nifti", "p6_broken"], 2)
    assert "notes.txt" in captured.err and "1 of 3 studies failed" in captured.err


def test_predict_cohort_table(tmp_path, capsys):
    from test_robustness_input import tiny_checkpoint

    from stm_dlp.predict import main

    root, out = _mixed_root(tmp_path / "root", ("enhanced",)), tmp_path / "pred"
    ckpt = tiny_checkpoint(tmp_path / "tiny.ckpt")
    assert main([f"ckpt={ckpt}", f"input={root}", f"output={out}", "device=cpu", "progress=false"]) == 2
    _check_table(capsys.readouterr().out.strip().splitlines(), out, ["p2_enhanced", "p6_broken"], 1)


@pytest.mark.slow
def test_calc_cohort_of_every_layout(tmp_path, capsys):
    from stm_dlp.calc import main

    root = _mixed_root(tmp_path / "root", ("classic", "enhanced", "nifti", "isles2018", "unitobrain"))
    out = tmp_path / "out"
    assert main([f"input={root}", f"output={out}", "progress=false", "device=cpu"]) == 2
    rows = _check_table(capsys.readouterr().out.strip().splitlines(), out,
                        ["p1_classic", "p2_enhanced", "p3_nifti", "p4_case", "p5", "p6_broken"], 5)
    layouts = {json.loads((out / n / "summary.json").read_text())["layout"] for n in rows if n != "p6_broken"}
    assert layouts == {"dicom_labelled", "nifti_labelled", "isles2018", "unitobrain"}
