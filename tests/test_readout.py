"""The clinical readout (stm_dlp.perfusion.readout): volumes, reference, clusters, agreement, outputs, CLI."""

from __future__ import annotations

import json
import math
from collections import deque
from pathlib import Path

import numpy as np
import pytest

from stm_dlp.data import phantom as ph
from stm_dlp.perfusion.readout import (
    CLI_OPTIONS,
    ReadoutThresholds,
    bland_altman,
    cbf_reference,
    clinical_readout,
    dice,
    label_components,
    pearson_r,
    precontrast_image,
    readout_agreement,
    readout_line,
    readout_regions,
    remove_small_clusters,
    split_channels,
    thresholds_from_options,
    voxel_volume_ml,
)


def _strict_json(text: str) -> dict:
    """json.loads that refuses NaN / Infinity (not valid JSON)."""
    def bad(name: str) -> None:
        raise ValueError(f"invalid JSON constant {name}")
    return json.loads(text, parse_constant=bad)


def _anisotropic_affine(dx: float = 0.8, dy: float = 1.3, dz: float = 5.0) -> np.ndarray:
    """An oblique, anisotropic affine: a rotation times the voxel sizes (|det| = dx * dy * dz)."""
    a, b = math.radians(20.0), math.radians(-7.0)
    rz = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
    aff = np.eye(4)
    aff[:3, :3] = rz @ rx @ np.diag([dx, dy, dz])
    aff[:3, 3] = [-100.0, 20.0, 3.0]
    return aff


def _study(shape=(2, 32, 40), normal_low=50.0, normal_high=50.0):
    """Synthetic maps: CBF ``normal_low`` / ``normal_high`` on the two image halves, TMAX 1 s, brain =
    all but a 2-pixel border."""
    s, h, w = shape
    cbf = np.full(shape, normal_low, np.float32)
    cbf[:, :, w // 2:] = normal_high
    tmax = np.full(shape, 1.0, np.float32)
    cbv = np.full(shape, 3.0, np.float32)
    mask = np.zeros(shape, bool)
    mask[:, 2:-2, 2:-2] = True
    return {"cbf": cbf, "cbv": cbv, "tmax": tmax}, mask


# ----------------------------------------------------------------------------------- volumes
def test_voxel_volume_from_an_oblique_anisotropic_affine():
    assert voxel_volume_ml(_anisotropic_affine(0.8, 1.3, 5.0)) == pytest.approx(0.8 * 1.3 * 5.0 / 1000, rel=1e-12)
    with pytest.raises(ValueError, match="4x4"):
        voxel_volume_ml(np.eye(3))


def test_volumes_of_known_regions_are_exact():
    maps, mask = _study()
    aff = _anisotropic_affine()
    vml = voxel_volume_ml(aff)
    # right-hand lesion: penumbra rectangle with TMAX 7 s and CBF 40 (rCBF 0.8); a core inside it
    # (TMAX 12 s, CBF 5 = rCBF 0.1) on both slices; another 4 s < TMAX 5 s < 6 s band elsewhere.
    maps["tmax"][:, 5:20, 22:34] = 7.0
    maps["cbf"][:, 5:20, 22:34] = 40.0
    maps["tmax"][:, 8:14, 25:31] = 12.0
    maps["cbf"][:, 8:14, 25:31] = 5.0
    maps["tmax"][0, 24:28, 22:34] = 5.0
    thr = ReadoutThresholds(min_cluster_ml=0.0)
    r = clinical_readout(maps, mask, vml, thr, affine=aff)
    n_hypo, n_core, n_band = 2 * 15 * 12, 2 * 6 * 6, 4 * 12
    assert abs(r["core_ml"] - n_core * vml) < vml
    assert abs(r["hypoperfusion_ml"] - n_hypo * vml) < vml
    assert r["penumbra_ml"] == pytest.approx((n_hypo - n_core) * vml)
    assert r["tmax_gt_4_ml"] == pytest.approx((n_hypo + n_band) * vml)
    assert r["tmax_gt_6_ml"] == pytest.approx(n_hypo * vml)
    assert r["tmax_gt_8_ml"] == pytest.approx(n_core * vml) == pytest.approx(r["tmax_gt_10_ml"])
    assert r["mismatch_ml"] == pytest.approx((n_hypo - n_core) * vml)
    assert r["mismatch_ratio"] == pytest.approx(n_hypo / n_core)
    assert r["hypoperfusion_intensity_ratio"] == pytest.approx(n_core / n_hypo)
    assert r["reference"]["side"] == "low_columns" and r["reference"]["cbf_ml_100g_min"] == pytest.approx(50.0)
    assert r["brain_ml"] == pytest.approx(mask.sum() * vml)
    regions = readout_regions(maps, mask, vml, thr)
    assert regions["core"].sum() == n_core and regions["penumbra"].sum() == n_hypo - n_core
    assert not (regions["core"] & ~mask).any()
    _strict_json(json.dumps(r, allow_nan=False))


def test_defuse3_profile_and_the_ratio_without_core():
    maps, mask = _study(shape=(2, 60, 40))
    aff = np.diag([2.0, 2.0, 10.0, 1.0])  # 0.04 ml voxels
    maps["tmax"][:, 5:55, 21:37] = 8.0  # 2 * 50 * 16 = 1600 voxels = 64 ml, right of the midline
    r = clinical_readout(maps, mask, voxel_volume_ml(aff))
    assert r["core_ml"] == 0.0 and r["mismatch_ratio"] is None  # infinite -> null, and valid JSON
    assert r["defuse3_target"] and r["defuse3_criteria"]["ratio_ge_min"]
    assert "infinite" in r["defuse3_reasons"][1]
    maps["cbf"][:, 5:55, 21:31] = 5.0  # core 2 * 50 * 10 = 1000 voxels = 40 ml: ratio 1.6 < 1.8
    r = clinical_readout(maps, mask, voxel_volume_ml(aff))
    assert r["core_ml"] == pytest.approx(40.0) and r["mismatch_ratio"] == pytest.approx(1.6)
    assert not r["defuse3_target"] and r["defuse3_criteria"] == {
        "core_lt_max": True, "ratio_ge_min": False, "mismatch_ge_min": True}
    line = readout_line(r)
    assert line == "core 40.0 ml · TMAX>6 s 64.0 ml · mismatch 24.0 ml (ratio 1.6) · DEFUSE-3 target: no"
    maps["cbf"][:, 5:55, 21:31] = 50.0
    maps["cbf"][:, 5:55, 21:25] = 5.0  # core 16 ml: ratio 4, mismatch 48 ml -> target
    assert clinical_readout(maps, mask, voxel_volume_ml(aff))["defuse3_target"]
    maps["tmax"][:] = 1.0
    maps["cbf"][:] = 50.0
    r = clinical_readout(maps, mask, voxel_volume_ml(aff))
    assert r["hypoperfusion_ml"] == 0 and r["mismatch_ratio"] is None and r["hypoperfusion_intensity_ratio"] is None
    assert not r["defuse3_target"]


def test_no_flow_pixels_are_neither_reference_nor_core():
    maps, mask = _study()
    maps["cbf"][:, 10:14, 5:9] = 0.0  # "CSF": no flow, TMAX 0
    maps["tmax"][:, 10:14, 5:9] = 0.0
    r = clinical_readout(maps, mask, 0.01)
    assert r["core_ml"] == 0.0 and r["reference"]["cbf_ml_100g_min"] == pytest.approx(50.0)


# ----------------------------------------------------------------------------------- reference
@pytest.mark.parametrize("lesion_side", ["left", "right"])
def test_contralateral_reference_is_the_unaffected_side(lesion_side):
    maps, mask = _study(normal_low=40.0, normal_high=60.0)
    cols = slice(6, 16) if lesion_side == "left" else slice(24, 34)
    maps["tmax"][:, 6:26, cols] = 9.0
    maps["cbf"][:, 6:26, cols] = 8.0
    ref = cbf_reference(maps["cbf"], mask, "contralateral", maps["tmax"], affine=np.diag([-2.0, 2.0, 5.0, 1.0]))
    expect_side, expect_cbf = ("high_columns", 60.0) if lesion_side == "left" else ("low_columns", 40.0)
    assert ref["side"] == expect_side and ref["cbf_ml_100g_min"] == pytest.approx(expect_cbf)
    assert ref["midline_column"] == pytest.approx((2 + 37) / 2)
    # affine[0, 0] < 0: higher columns lie toward the patient's left (the DICOM axial convention)
    assert ref["side_anatomical"] == ("left" if expect_side == "high_columns" else "right")
    glob = cbf_reference(maps["cbf"], mask, "global", maps["tmax"])
    assert glob["method_used"] == "global"
    assert glob["cbf_ml_100g_min"] == pytest.approx(float(np.median(maps["cbf"][mask])))
    # without TMAX the side with the higher median CBF is normal
    assert cbf_reference(maps["cbf"], mask, "contralateral")["cbf_ml_100g_min"] == pytest.approx(60.0)


def test_reference_without_tissue():
    maps, mask = _study()
    maps["cbf"][:] = 0.0
    ref = cbf_reference(maps["cbf"], mask, "contralateral", maps["tmax"])
    assert ref["cbf_ml_100g_min"] is None and ref["method_used"] == "global"
    assert clinical_readout(maps, mask, 0.01)["core_ml"] == 0.0
    with pytest.raises(ValueError, match="reference"):
        ReadoutThresholds(reference="median")


# ----------------------------------------------------------------------------------- clusters
def _bfs_labels(m: np.ndarray, three_d: bool) -> int:
    offs = [(a, b, c) for a in (-1, 0, 1) for b in (-1, 0, 1) for c in (-1, 0, 1)
            if (a, b, c) != (0, 0, 0) and (three_d or a == 0)]
    seen = np.zeros(m.shape, bool)
    n = 0
    for start in zip(*np.nonzero(m)):
        if seen[start]:
            continue
        n += 1
        seen[start] = True
        queue = deque([start])
        while queue:
            p = queue.popleft()
            for o in offs:
                q = tuple(int(p[i] + o[i]) for i in range(3))
                if all(0 <= q[i] < m.shape[i] for i in range(3)) and m[q] and not seen[q]:
                    seen[q] = True
                    queue.append(q)
    return n


def test_connected_components_match_a_breadth_first_search():
    rng = np.random.default_rng(3)
    for _ in range(6):
        m = rng.uniform(size=(3, 11, 13)) < rng.uniform(0.2, 0.6)
        for conn in ("3d", "2d"):
            labels, n = label_components(m, conn)
            assert n == _bfs_labels(m, conn == "3d")
            assert ((labels > 0) == m).all()
            assert len(set(zip(labels[m].tolist()))) == n


def test_cluster_filter_removes_a_speck_and_keeps_a_region():
    m = np.zeros((3, 20, 20), bool)
    m[1, 4:12, 4:12] = True  # 64 voxels
    m[1, 16, 17] = True  # a 1-voxel speck
    m[2, 10, 10] = True  # touches the region through a slice (3-D) but not within its slice
    vml = 0.002  # 0.1 ml = 50 voxels
    kept = remove_small_clusters(m, vml, 0.1, "3d")
    assert kept[1, 4:12, 4:12].all() and not kept[1, 16, 17] and kept[2, 10, 10]
    assert kept.sum() == 65
    kept2d = remove_small_clusters(m, vml, 0.1, "2d")
    assert kept2d.sum() == 64 and not kept2d[2, 10, 10]
    assert remove_small_clusters(m, vml, 0.0).sum() == m.sum()
    # the same through the readout
    maps, mask = _study(shape=(3, 20, 20))
    maps["tmax"][m] = 9.0
    r = clinical_readout(maps, np.ones_like(mask), vml, ReadoutThresholds(min_cluster_ml=0.1))
    assert r["hypoperfusion_ml"] == pytest.approx(65 * vml)


# ----------------------------------------------------------------------------------- phantom truth
# Measured (tests below, and seeds 0-29 at 48² x 2 and 64² x 4 slices, 39 patients with a lesion):
# penumbra delays are >= 6.003 s and core/penumbra labels are exactly the TMAX > 6 s tissue, so the
# hypoperfusion volume is exact (0 ml error). The phantom's core CBF (8 x 0.9-1.1 x (1 +- 0.1 field)
# ml/100g/min) has rCBF up to 0.36 against its normal-hemisphere median (25-31 ml/100g/min: the phantom
# brain is mostly white matter), while penumbra rCBF is >= 0.55: at rCBF < 0.30 the readout finds a
# median 70 % (21-100 %) of the labelled core; any threshold in the gap (0.5 here) recovers it exactly.
PHANTOM = ph.PhantomConfig(height=48, width=48, n_slices=2, noise_hu=0.0)
SEED_WITH_LESION = 0


@pytest.fixture(scope="module")
def phantom_patient():
    study = ph.simulate_patient(PHANTOM, SEED_WITH_LESION)
    labels = study.meta["labels"]
    assert (labels == ph.CORE).any(), "the seed must give a lesion"
    return study, labels


def test_truth_readout_of_a_phantom_patient_is_its_lesion(phantom_patient):
    study, labels = phantom_patient
    vml = voxel_volume_ml(study.affine)
    true_core = float((labels == ph.CORE).sum()) * vml
    true_hypo = float(np.isin(labels, [ph.CORE, ph.PENUMBRA]).sum()) * vml
    maps = split_channels(study.maps)
    r = clinical_readout(maps, study.mask, vml, affine=study.affine)
    assert r["hypoperfusion_ml"] == pytest.approx(true_hypo, abs=0.5 * vml)
    assert r["core_ml"] == pytest.approx(true_core, abs=0.5 * vml)
    assert r["penumbra_ml"] == pytest.approx(true_hypo - true_core, abs=0.5 * vml)
    regions = readout_regions(maps, study.mask, vml)
    assert (regions["core"] == (labels == ph.CORE)).all()
    assert (regions["hypoperfusion"] == np.isin(labels, [ph.CORE, ph.PENUMBRA])).all()
    # the reference is taken on the side without the lesion
    lesion_cols = np.nonzero(np.isin(labels, [ph.CORE, ph.PENUMBRA]))[2]
    lesion_high = lesion_cols.mean() > r["reference"]["midline_column"]
    assert r["reference"]["side"] == ("low_columns" if lesion_high else "high_columns")


def test_truth_core_at_the_clinical_threshold(phantom_patient):
    """At the clinical rCBF < 30 % the truth readout is the simulated core (the phantom's core CBF was lowered
    to 4.5 ml/100g/min for this: at 8 (5-12) it reached 0.36 of the normal median)."""
    study, labels = phantom_patient
    vml = voxel_volume_ml(study.affine)
    r = clinical_readout(split_channels(study.maps), study.mask, vml)
    assert r["core_ml"] == pytest.approx(float((labels == ph.CORE).sum()) * vml, abs=0.5 * vml)


# ----------------------------------------------------------------------------------- agreement
def test_dice_bland_altman_pearson_by_hand():
    a = np.array([1, 1, 0, 0], bool)
    b = np.array([1, 0, 1, 0], bool)
    assert dice(a, b) == pytest.approx(0.5)
    assert dice(np.zeros(4, bool), np.zeros(4, bool)) == 1.0
    assert dice(a, np.zeros(4, bool)) == 0.0
    ba = bland_altman([10.0, 20.0, 30.0], [8.0, 21.0, 27.0])  # differences 2, -1, 3
    sd = math.sqrt(((2 - 4 / 3) ** 2 + (-1 - 4 / 3) ** 2 + (3 - 4 / 3) ** 2) / 2)
    assert ba["n"] == 3 and ba["bias"] == pytest.approx(4 / 3) and ba["sd"] == pytest.approx(sd)
    assert ba["loa_low"] == pytest.approx(4 / 3 - 1.96 * sd) and ba["loa_high"] == pytest.approx(4 / 3 + 1.96 * sd)
    assert bland_altman([5.0], [4.0]) == {"bias": 1.0, "sd": None, "loa_low": None, "loa_high": None, "n": 1}
    assert pearson_r([1, 2, 3, 4], [2, 4, 5, 9]) == pytest.approx(11 / math.sqrt(5 * 26))
    assert pearson_r([1, 2, 3], [7, 7, 7]) is None
    assert pearson_r([1, 2, 3, 100], [1, 2, 3, -50], mask=[True, True, True, False]) == pytest.approx(1.0)


def test_readout_agreement_against_the_truth():
    maps, mask = _study()
    maps["tmax"][:, 5:15, 22:32] = 8.0  # 200 voxels
    maps["cbf"][:, 8:12, 25:29] = 5.0  # core 32 voxels
    pred = {k: v.copy() for k, v in maps.items()}
    pred["tmax"][:, 5:15, 22:27] = 1.0  # the method misses half of the TMAX > 6 s region
    vml = 0.01
    thr = ReadoutThresholds(min_cluster_ml=0.0)
    same = readout_agreement(maps, maps, mask, vml, thr)
    assert same["dice_hypoperfusion"] == 1.0 and same["dice_core"] == 1.0 and same["core_ml_error"] == 0.0
    assert same["pearson_r_cbf"] == pytest.approx(1.0) and same["pearson_r_mtt"] == pytest.approx(1.0)
    ag = readout_agreement(pred, maps, mask, vml, thr)
    assert ag["dice_tmax_gt_6"] == pytest.approx(2 * 100 / (100 + 200)) == ag["dice_hypoperfusion"]
    assert ag["hypoperfusion_ml_error"] == pytest.approx(-100 * vml)
    assert ag["hypoperfusion_ml_true"] == pytest.approx(200 * vml) and ag["dice_core"] == 1.0
    assert 0 < ag["pearson_r_tmax"] < 1
    _strict_json(json.dumps(ag, allow_nan=False))


# ----------------------------------------------------------------------------------- helpers
def test_precontrast_image_and_cli_options():
    frames = np.zeros((2, 6, 4, 4), np.float32)
    frames[:, :3] = 30.0
    frames[:, 3:] = 200.0  # the bolus from frame 3
    frames[0, 1, 0, 0] = np.nan
    base = precontrast_image(frames, [2, 3])
    assert base.shape == (2, 4, 4) and np.allclose(base, 30.0)
    assert np.allclose(precontrast_image(frames, 4)[1], (3 * 30 + 200) / 4)
    opts = {"readout_core_rcbf": 0.38, "readout_tmax_s": 5.6, "readout_min_cluster_ml": 0.0,
            "readout_reference": "global", "other": 1}
    thr = thresholds_from_options(opts)
    assert opts == {"other": 1} and set(CLI_OPTIONS) == {"readout_core_rcbf", "readout_tmax_s",
                                                        "readout_min_cluster_ml", "readout_reference"}
    assert (thr.core_rcbf, thr.hypoperfusion_tmax_s, thr.min_cluster_ml, thr.reference) == (0.38, 5.6, 0.0, "global")


# ----------------------------------------------------------------------------------- outputs and CLI
def test_write_outputs_has_a_readout(tmp_path, phantom_patient):
    from stm_dlp.io.outputs import write_outputs

    study, labels = phantom_patient
    maps = split_channels(study.maps)
    paths = write_outputs(tmp_path / "o", maps, study.affine, {"method": "truth"}, mask=study.mask,
                          title="truth", baseline_hu=study.meta["baseline_hu"])
    assert paths["readout_png"].name == "readout.png" and paths["readout_png"].stat().st_size > 5000
    summary = _strict_json(paths["summary"].read_text())
    ro = summary["readout"]
    vml = voxel_volume_ml(study.affine)
    assert ro["hypoperfusion_ml"] == pytest.approx(np.isin(labels, [ph.CORE, ph.PENUMBRA]).sum() * vml)
    assert ro["voxel_ml"] == pytest.approx(vml) and summary["files"]["readout_png"] == "readout.png"
    with pytest.raises(ValueError, match="pre-contrast"):
        write_outputs(tmp_path / "bad", maps, study.affine, mask=study.mask, baseline_hu=np.zeros((1, 2, 2)))


@pytest.fixture(scope="module")
def tiny_dicom_study(tmp_path_factory) -> Path:
    from stm_dlp.synth import synthesize_cohort

    root = tmp_path_factory.mktemp("readout_cohort")
    cfg = ph.PhantomConfig(height=32, width=32, n_slices=2, frames_min=24, frames_max=26, noise_hu=1.0)
    synthesize_cohort(root, 1, cfg, seed=4, progress=False)
    return next(p for p in sorted(root.iterdir()) if p.is_dir())


def test_calc_cli_last_line_is_the_readout(tiny_dicom_study, tmp_path, capsys):
    from stm_dlp.calc import main

    out = tmp_path / "calc"
    assert main([f"input={tiny_dicom_study}", f"output={out}", "device=cpu", "progress=false",
                 "readout_min_cluster_ml=0"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    ro = _strict_json((out / "summary.json").read_text())["readout"]
    assert last == readout_line(ro)
    assert f"core {ro['core_ml']:.1f} ml" in last and f"TMAX>6 s {ro['hypoperfusion_ml']:.1f} ml" in last
    assert f"mismatch {ro['mismatch_ml']:.1f} ml" in last and "DEFUSE-3 target:" in last
    assert ro["thresholds"]["min_cluster_ml"] == 0.0 and (out / "readout.png").is_file()


def test_predict_cli_last_line_is_the_readout(tmp_path, capsys):
    from bad_studies import make_good
    from test_robustness_input import tiny_checkpoint

    from stm_dlp.predict import main

    ckpt = tiny_checkpoint(tmp_path / "tiny.ckpt")
    patient = make_good(tmp_path / "study", seed=11)
    out = tmp_path / "pred"
    assert main([f"ckpt={ckpt}", f"input={patient}", f"output={out}", "device=cpu", "readout_reference=global"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    ro = _strict_json((out / "summary.json").read_text())["readout"]
    assert last == readout_line(ro) and last.startswith(f"core {ro['core_ml']:.1f} ml · TMAX>6 s")
    assert ro["reference"]["method"] == "global" and (out / "readout.png").is_file()


# ----------------------------------------------------------------------------- readout metrics (training, calc)
def test_study_readouts_collect_slices_and_summarise(phantom_patient):
    """Slices arrive out of order from the test loop; the per-patient agreement equals the one computed on
    the whole study, and the summary's Dice ignores lesion-free patients."""
    from stm_dlp.metrics import StudyReadouts
    from stm_dlp.perfusion.readout import readout_agreement

    study, _labels = phantom_patient
    truth = split_channels(study.maps)
    rng = np.random.default_rng(0)
    pred = {k: v + rng.normal(0, 0.5, v.shape).astype(np.float32) for k, v in truth.items()}
    acc = StudyReadouts()
    for s in reversed(range(study.n_slices)):
        acc.update("lesion", s, {k: v[s] for k, v in pred.items()}, {k: v[s] for k, v in truth.items()},
                   study.mask[s], study.voxel_ml)
    flat = {k: np.zeros_like(v) + (40.0 if k == "cbf" else 1.0) for k, v in truth.items()}
    acc.update("healthy", 0, flat, flat, study.mask, study.voxel_ml)  # no lesion: Dice 1 by convention
    out = acc.compute()
    assert out["per_patient"]["lesion"] == readout_agreement(pred, truth, study.mask, study.voxel_ml)
    assert out["per_patient"]["healthy"]["dice_tmax_gt_6"] == 1.0
    summary = out["summary"]
    assert summary["n_patients"] == 2 and summary["dice_tmax_gt_6"]["n"] == 1
    assert summary["dice_tmax_gt_6"]["median"] == out["per_patient"]["lesion"]["dice_tmax_gt_6"] < 1.0
    errors = [out["per_patient"][p]["hypoperfusion_ml_error"] for p in ("lesion", "healthy")]
    assert summary["hypoperfusion_ml_error"]["bias"] == pytest.approx(np.mean(errors))
    assert len(acc) == 2


def test_mtt_is_zero_without_measurable_flow():
    """MTT = CBV / CBF · 60 only where CBF reaches the no-flow floor (0.5 ml/100g/min, the calc's and the
    readout's): a near-zero CBF next to CSF must not read as an MTT of minutes (numpy and torch alike)."""
    import torch

    from stm_dlp.types import NO_FLOW_CBF, mtt_from_cbv_cbf

    cbv, cbf = np.array([4.0, 0.3, 0.3]), np.array([50.0, 0.02, NO_FLOW_CBF])
    np.testing.assert_allclose(mtt_from_cbv_cbf(cbv, cbf), [4.8, 0.0, 0.3 / NO_FLOW_CBF * 60], rtol=1e-6)
    torch.testing.assert_close(mtt_from_cbv_cbf(torch.tensor(cbv), torch.tensor(cbf)),
                               torch.tensor([4.8, 0.0, 0.3 / NO_FLOW_CBF * 60], dtype=torch.float64))
