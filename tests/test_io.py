"""Writers: atomic files, NIfTI orientation/affine, PNG pictures, the output bundle, CLI helpers."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pydicom
import pytest
from conftest import tiny_phantom
from PIL import Image

from stm_dlp.cli import REQUIRED, parse_kv, run_cli
from stm_dlp.data.dicom import read_dicom_study
from stm_dlp.data.phantom import simulate_patient
from stm_dlp.geometry import LPS_TO_RAS, affine_from_dicom_geometry
from stm_dlp.io.atomic import atomic_save_npz, atomic_write, atomic_write_text
from stm_dlp.io.dicom_writer import choose_rescale, geometry_from_affine, write_study_dicom
from stm_dlp.io.nifti import read_nifti_maps, write_maps_nifti
from stm_dlp.io.outputs import write_outputs
from stm_dlp.io.png import DEFAULT_WINDOWS, colorize, save_comparison_png, save_maps_png
from stm_dlp.types import StudyError

CFG = tiny_phantom(width=20, n_slices=3)


@pytest.fixture(scope="module")
def study():
    return simulate_patient(CFG, seed=5)


# ------------------------------------------------------------------------------ atomic
def test_atomic_write_replaces_or_leaves_old_file(tmp_path):
    target = tmp_path / "sub" / "a.txt"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_write(target, "w") as fh:
            fh.write("half")
            raise RuntimeError("crash")
    assert target.read_text() == "old"
    assert [p.name for p in target.parent.iterdir()] == ["a.txt"]
    atomic_save_npz(tmp_path / "x.npz", a=np.arange(3))
    assert np.load(tmp_path / "x.npz")["a"].tolist() == [0, 1, 2]


# ------------------------------------------------------------------------------ NIfTI
def test_nifti_order_and_affine(tmp_path, study):
    s, h, w = 3, 16, 20
    m = np.arange(s * h * w, dtype=np.float32).reshape(s, h, w)
    (path,) = write_maps_nifti(tmp_path, {"cbf": m}, study.affine)
    img = nib.load(path)
    data = np.asanyarray(img.dataobj)
    assert data.shape == (w, h, s) and data.dtype == np.float32
    for c, r, k in [(0, 0, 0), (19, 3, 1), (5, 15, 2)]:
        assert data[c, r, k] == m[k, r, c]
    np.testing.assert_allclose(img.affine, study.affine, atol=1e-4)
    assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1
    assert img.header.get_xyzt_units() == ("mm", "sec")
    back, aff = read_nifti_maps(path)
    np.testing.assert_array_equal(back, m)
    np.testing.assert_allclose(aff, study.affine, atol=1e-4)


def test_affine_maps_voxels_to_dicom_positions(tmp_path, study):
    write_study_dicom(study, tmp_path / "ctp", seed=1)
    back = read_dicom_study(tmp_path / "ctp")
    for k in range(3):
        ds = pydicom.dcmread(tmp_path / "ctp" / back.meta["files"][k][0])
        ipp_ras = LPS_TO_RAS[:3, :3] @ np.array([float(v) for v in ds.ImagePositionPatient])
        np.testing.assert_allclose((back.affine @ [0, 0, k, 1])[:3], ipp_ras, atol=1e-4)
        # one column step moves along the row direction cosine by the column spacing
        iop = np.array([float(v) for v in ds.ImageOrientationPatient])
        dc = float(ds.PixelSpacing[1])
        expected = ipp_ras + LPS_TO_RAS[:3, :3] @ (iop[:3] * dc * 4)
        np.testing.assert_allclose((back.affine @ [4, 0, k, 1])[:3], expected, atol=1e-4)
    np.testing.assert_allclose(back.affine, study.affine, atol=1e-6)


def test_geometry_inverts_affine_for_oblique_scans():
    theta = np.deg2rad(12.0)
    iop = np.array([np.cos(theta), np.sin(theta), 0, -np.sin(theta), np.cos(theta), 0.0])
    normal = np.cross(iop[:3], iop[3:])
    aff = affine_from_dicom_geometry(np.array([-100.0, -90.0, 30.0]), iop, (0.8, 0.7), normal * 4.5)
    geo = geometry_from_affine(aff, 5)
    np.testing.assert_allclose(geo["orientation"], iop, atol=1e-12)
    np.testing.assert_allclose(geo["pixel_spacing"], (0.8, 0.7))
    assert geo["slice_thickness"] == pytest.approx(4.5)
    again = affine_from_dicom_geometry(geo["positions"][0], geo["orientation"], geo["pixel_spacing"],
                                       geo["slice_step"])
    np.testing.assert_allclose(again, aff, atol=1e-12)


def test_rescale_choice_keeps_half_hu():
    assert choose_rescale(np.array([-1000.0, 3000.0])) == (1.0, -1024.0)
    slope, intercept = choose_rescale(np.array([-40000.0, 40000.0]))
    assert slope > 1 and abs(80000 / slope) < 65536


# ------------------------------------------------------------------------------ PNG
def _png_size(path):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        return im.size


def test_maps_png(tmp_path, study):
    maps = {"cbv": study.maps[:, 0], "cbf": study.maps[:, 1], "tmax": study.maps[:, 2],
            "mtt": study.maps[:, 0] / np.maximum(study.maps[:, 1], 1e-3) * 60}
    w, h = _png_size(save_maps_png(tmp_path / "maps.png", maps, mask=study.mask, title="test"))
    assert 300 < w < 2000 and 300 < h < 3000 and h > w * 0.5
    rows = {"truth": {p: m[0] for p, m in maps.items()}, "model": {p: m[0] * 0.9 for p, m in maps.items()}}
    w2, h2 = _png_size(save_comparison_png(tmp_path / "cmp.png", rows, mask=study.mask[0]))
    assert w2 > 300 and h2 > 200


def test_colorize_window_and_mask():
    m = np.array([[0.0, 80.0, 200.0], [np.nan, 40.0, -5.0]])
    mask = np.array([[True, True, True], [True, True, False]])
    rgb = colorize(m, "cbf", mask)
    assert rgb.shape == (2, 3, 3) and rgb.dtype == np.uint8
    assert rgb[1, 0].tolist() == [0, 0, 0] and rgb[1, 2].tolist() == [0, 0, 0]
    assert rgb[0, 1].tolist() == rgb[0, 2].tolist()  # clipped at the window's top
    assert rgb[0, 0].tolist() != rgb[0, 1].tolist()
    assert DEFAULT_WINDOWS["cbv"] == (0.0, 8.0) and DEFAULT_WINDOWS["tmax"] == (0.0, 16.0)


# ------------------------------------------------------------------------------ output bundle
def test_write_outputs(tmp_path, study):
    maps = {"cbv": study.maps[:, 0], "cbf": study.maps[:, 1], "tmax": study.maps[:, 2]}
    paths = write_outputs(tmp_path / "out", maps, study.affine, {"method": "truth", "timing_s": {"x": 1.0}},
                          mask=study.mask)
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["cbf.nii.gz", "cbv.nii.gz", "maps.png", "mask.nii.gz", "mtt.nii.gz", "readout.png",
                     "summary.json", "tmax.nii.gz"]
    summary = json.loads(paths["summary"].read_text())
    assert summary["method"] == "truth" and summary["units"]["cbf"] == "ml/100g/min"
    assert summary["shape_shw"] == [3, 16, 20] and summary["nifti_shape_whs"] == [20, 16, 3]
    assert summary["spacing_mm"]["slice"] == pytest.approx(5.0)
    mtt, _ = read_nifti_maps(paths["mtt"])
    sel = study.maps[:, 1] > 1
    np.testing.assert_allclose(mtt[sel], study.maps[:, 0][sel] / study.maps[:, 1][sel] * 60, rtol=1e-5)
    with pytest.raises(ValueError, match="tmax"):
        write_outputs(tmp_path / "bad", {"cbv": maps["cbv"], "cbf": maps["cbf"]}, study.affine)


# ------------------------------------------------------------------------------ CLI helpers
SPEC = {"out": (str, REQUIRED, "folder"), "n": (int, 2, "count"), "x": (float, 0.5, "value"),
        "flag": (bool, False, "switch")}


def test_parse_kv():
    args = parse_kv(["out=/tmp/a", "n=5", "flag=yes"], SPEC)
    assert args == {"out": "/tmp/a", "n": 5, "x": 0.5, "flag": True}
    with pytest.raises(ValueError, match="valid keys: out, n, x, flag"):
        parse_kv(["out=a", "bogus=1"], SPEC)
    with pytest.raises(ValueError, match="missing required key out"):
        parse_kv(["n=1"], SPEC)
    with pytest.raises(ValueError, match="n='abc'"):
        parse_kv(["out=a", "n=abc"], SPEC)
    with pytest.raises(ValueError, match="key=value"):
        parse_kv(["out"], SPEC)


def test_run_cli_turns_errors_into_exit_2(capsys):
    def fails():
        raise StudyError("/data/p1/ctp/x.dcm: broken\nsecond line")

    with pytest.raises(SystemExit) as info:
        run_cli(fails)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err == "error: /data/p1/ctp/x.dcm: broken second line\n"
    assert run_cli(lambda a: a + 1, 1) == 2
    with pytest.raises(SystemExit) as info:
        run_cli(lambda: open("/no/such/file"))
    assert info.value.code == 2
