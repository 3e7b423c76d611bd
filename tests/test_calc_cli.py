"""``python -m stm_dlp.calc``: DICOM in (written by ``stm_dlp.synth``), the predict-style bundle out."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from stm_dlp.calc import load_aif_file, main
from stm_dlp.data.phantom import PhantomConfig
from stm_dlp.synth import synthesize_cohort

FILES = {"cbf.nii.gz", "cbv.nii.gz", "mtt.nii.gz", "tmax.nii.gz", "maps.png", "aif.png", "summary.json"}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cohort")
    cfg = PhantomConfig(height=32, width=32, n_slices=2, frames_min=30, frames_max=34, noise_hu=1.0)
    synthesize_cohort(root, 2, cfg, seed=4, progress=False)
    return root


def _check_bundle(out: Path, shape_shw: tuple[int, int, int]) -> dict:
    assert FILES <= {p.name for p in out.iterdir()}
    s, h, w = shape_shw
    for name in ("cbf", "cbv", "mtt", "tmax"):
        img = nib.load(out / f"{name}.nii.gz")
        data = np.asarray(img.dataobj)
        assert data.shape == (w, h, s) and data.dtype == np.float32 and np.isfinite(data).all()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["approach"].startswith("calculation")
    assert summary["units"]["cbf"] == "ml/100g/min"
    assert len(summary["aif"]["pixels_slice_row_col"]) > 0 and len(summary["aif"]["aif_hu"]) > 0
    assert "deconvolution" in summary["timing_s"]
    return summary


def test_calc_single_study_and_root(cohort, tmp_path, capsys):
    patient = cohort / "sub-0001"
    assert main([f"input={patient}", f"output={tmp_path / 'one'}", "method=osvd", "device=cpu",
                 "progress=false"]) == 0
    summary = _check_bundle(tmp_path / "one", (2, 32, 32))
    assert summary["method"] == "osvd" and summary["device"] == "cpu"
    truth = json.loads((patient / "truth.json").read_text())
    assert summary["n_frames"] == truth["n_frames"]
    cbf = np.asarray(nib.load(tmp_path / "one" / "cbf.nii.gz").dataobj)
    label = np.asarray(nib.load(patient / "maps" / "cbf.nii.gz").dataobj)
    brain = label > 0
    assert 0.4 < np.median(cbf[brain] / label[brain]) < 1.2  # oSVD on 1 HU noise: CBF reads ~20-40 % low
    assert main([f"input={cohort}", f"output={tmp_path / 'all'}", "method=bcsvd", "progress=false",
                 "csf_max_hu=none"]) == 0
    assert sorted(p.name for p in (tmp_path / "all").iterdir()) == ["sub-0001", "sub-0002"]
    for p in (tmp_path / "all").iterdir():
        summary = _check_bundle(p, (2, 32, 32))
        assert summary["method"] == "bcsvd" and summary["params"]["csf_max_hu"] is None
    assert "2 studies" in capsys.readouterr().out


def test_calc_manual_aif_files(cohort, tmp_path):
    patient = cohort / "sub-0002"
    auto_out = tmp_path / "auto"
    assert main([f"input={patient}", f"output={auto_out}", "progress=false"]) == 0
    auto = json.loads((auto_out / "summary.json").read_text())["aif"]
    pix_file = tmp_path / "aif.json"
    pix_file.write_text(json.dumps({"aif_pixels": auto["pixels_slice_row_col"]}))
    assert main([f"input={patient}", f"output={tmp_path / 'pix'}", f"aif={pix_file}", "progress=false"]) == 0
    pix = json.loads((tmp_path / "pix" / "summary.json").read_text())["aif"]
    assert pix["source"] == "pixels" and pix["pixels_slice_row_col"] == auto["pixels_slice_row_col"]
    csv_file = tmp_path / "aif.csv"
    rows = "\n".join(f"{t},{v}" for t, v in zip(auto["grid_s"], auto["aif_hu"]))
    csv_file.write_text("time_s,aif_hu\n" + rows + "\n")
    assert main([f"input={patient}", f"output={tmp_path / 'csv'}", f"aif={csv_file}", "progress=false"]) == 0
    a = np.asarray(nib.load(auto_out / "cbf.nii.gz").dataobj)
    c = np.asarray(nib.load(tmp_path / "csv" / "cbf.nii.gz").dataobj)
    np.testing.assert_allclose(c, a, rtol=0.02, atol=0.5)
    assert isinstance(load_aif_file(csv_file), dict)


@pytest.mark.parametrize("content,suffix,match", [
    ("{\"nope\": 1}", ".json", "aif_pixels"),
    ("[[0, 1]]", ".json", "triples"),
    ("a,b\nx,y\n", ".csv", "numbers"),
    ("1,2,3\n", ".csv", "columns"),
    ("x", ".txt", "json or .csv"),
])
def test_bad_aif_files(tmp_path, content, suffix, match):
    f = tmp_path / f"aif{suffix}"
    f.write_text(content)
    with pytest.raises(ValueError, match=match):
        load_aif_file(f)


def test_calc_bad_input_is_one_line_exit_2(tmp_path, cohort):
    env_py = sys.executable
    r = subprocess.run([env_py, "-m", "stm_dlp.calc", f"input={tmp_path / 'missing'}", f"output={tmp_path / 'o'}"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error:") and "missing" in r.stderr
    with pytest.raises(SystemExit) as exc:
        main([f"input={cohort / 'sub-0001'}", f"output={tmp_path / 'o'}", "method=magic", "progress=false"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main(["output=x"])
    assert exc.value.code == 2
