"""python -m stm_dlp.synth: the cohort round-trips through DICOM + NIfTI, fake PHI stays in its files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import tiny_phantom

from stm_dlp.data.phantom import simulate_patient
from stm_dlp.data.studies import list_patients, read_any_study, read_labelled_study
from stm_dlp.io.dicom_writer import TIME_STYLES
from stm_dlp.synth import fake_phi, parse_styles, synthesize_cohort

CFG = tiny_phantom(frames_min=12, frames_max=12)
SEED = 3


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("cohort")
    return root, synthesize_cohort(root, 4, CFG, seed=SEED, progress=False)


def _run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stm_dlp.synth", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=120)


def test_layout_and_all_time_styles(cohort):
    root, dirs = cohort
    assert [d.name for d in dirs] == ["sub-0001", "sub-0002", "sub-0003", "sub-0004"]
    assert list_patients(root) == dirs
    assert not [p for p in root.iterdir() if p.name.startswith(".")], "temporary folders left behind"
    styles = [json.loads((d / "truth.json").read_text())["time_style"] for d in dirs]
    assert styles == list(TIME_STYLES)
    for d in dirs:
        assert sorted(p.name for p in (d / "maps").iterdir()) == [
            "cbf.nii.gz", "cbv.nii.gz", "mask.nii.gz", "mtt.nii.gz", "tmax.nii.gz"]
        assert len(list((d / "ctp").rglob("*.dcm"))) == CFG.n_slices * CFG.frames_max
    assert json.loads((root / "cohort.json").read_text())["patients"] == [d.name for d in dirs]


@pytest.mark.parametrize("index", range(4))
def test_round_trip_matches_the_phantom(cohort, index):
    _, dirs = cohort
    truth = simulate_patient(CFG, SEED * 100003 + index)
    study = read_labelled_study(dirs[index])
    assert study.frames.shape == truth.frames.shape
    assert np.max(np.abs(study.frames - truth.frames)) <= 0.5 + 1e-3
    assert np.max(np.abs(study.times_s - truth.times_s)) < 1e-3
    assert study.maps is not None and study.maps.dtype == np.float32
    np.testing.assert_array_equal(study.maps, truth.maps)
    np.testing.assert_array_equal(study.mask, truth.mask)
    np.testing.assert_allclose(study.affine, truth.affine, atol=1e-6)
    info = json.loads((dirs[index] / "truth.json").read_text())
    assert info["residue"] == truth.meta["residue"] and info["phantom_seed"] == SEED * 100003 + index
    assert study.patient_id == info["pseudonym_default_key"]
    assert read_any_study(dirs[index]).patient_id == study.patient_id
    if TIME_STYLES[index] == "midnight":
        assert study.meta["crosses_midnight"]


def test_fake_phi_never_leaks(cohort):
    root, dirs = cohort
    phi = [fake_phi(i, SEED) for i in range(len(dirs))]
    for i, d in enumerate(dirs):
        mine, others = phi[i], [p for j, p in enumerate(phi) if j != i]
        files = list((d / "ctp").rglob("*.dcm"))
        ds = pydicom.dcmread(files[0])
        assert str(ds.PatientName) == mine[0] and ds.PatientID == mine[1]
        for f in files:
            raw = f.read_bytes()
            for name, pid in others:
                assert name.encode() not in raw and pid.encode() not in raw
        study = read_labelled_study(d)
        text = json.dumps(study.meta) + study.patient_id + study.source
        text += (d / "truth.json").read_text()
        for name, pid in phi:
            assert name not in text and pid not in text
            assert name.split("^")[1] not in str(d) and pid not in str(d)


def test_cli_writes_the_layout(tmp_path):
    out = tmp_path / "cli"
    res = _run(f"out={out}", "patients=2", "height=16", "width=16", "slices=2", "frames_min=10",
               "frames_max=10", "progress=false")
    assert res.returncode == 0, res.stderr
    for name in ("sub-0001", "sub-0002"):
        assert (out / name / "maps" / "cbf.nii.gz").is_file()
        assert len(list((out / name / "ctp").rglob("*.dcm"))) == 20
    again = _run(f"out={out}", "patients=1", "height=16", "width=16", "slices=2", "frames_min=10",
                 "frames_max=10", "progress=false")
    assert again.returncode == 2
    assert again.stderr.startswith("error: ") and "overwrite=true" in again.stderr


def test_cli_unknown_key_is_one_line_with_valid_keys():
    res = _run("bogus=1")
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert "bogus" in lines[0] and "out" in lines[0] and "patients" in lines[0] and "frames_min" in lines[0]


def test_parse_styles():
    assert parse_styles("all") == TIME_STYLES
    assert parse_styles("midnight, content_trigger") == ("midnight", "content_trigger")
    with pytest.raises(ValueError, match="unknown"):
        parse_styles("philips")
