"""``experiments.calc_settings``: the cross-family benchmark of the calculation approach (smoke run)."""

from __future__ import annotations

import numpy as np
import pytest

from experiments.calc_settings import FAMILIES, Impulses, Setting, markdown, metrics, run


def test_metrics_and_impulses():
    t = {"cbf": [np.array([50.0, 20.0, 0.0, 10.0])], "cbv": [np.ones(4)], "tmax": [np.array([1.0, 2.0, 0.0, 8.0])]}
    e = {"cbf": [np.array([40.0, 0.0, 0.0, 12.0])], "cbv": [np.ones(4)], "tmax": [np.array([1.0, 7.0, 0.0, 8.0])],
         "in_mask": [np.array([True, True, False, True])]}
    m = metrics(e, t, failed=0)
    assert m["mae_cbf"] == 8.0 and m["dice_tmax6"] == round(2 / 3, 4)
    assert m["zero_pct"] == round(100 / 3, 3)  # of the 3 perfused pixels, one reads CBF 0
    no_lesion = metrics(e, {**t, "tmax": [np.zeros(4)]}, failed=0)
    assert no_lesion["dice_tmax6"] is None
    frames = np.zeros((2, 10, 8, 8), np.float32)
    out, _ = Impulses(rate=0.05)(frames, np.zeros((2, 10)), np.random.default_rng(0))
    hit = out != 0
    assert 0.02 < hit.mean() < 0.09 and np.abs(out[hit]).min() >= 300


@pytest.mark.slow  # ~5 s: 2 families x 7 conditions x 3 methods on 32² studies
def test_micro_benchmark_runs_and_chooses():
    doc = run("micro", [Setting(), Setting(tmax_method="calibrated")], motion_check=False, log=lambda m: None)
    assert set(doc["results"]) == set(FAMILIES)
    for fam in FAMILIES:
        for cond, by_method in doc["results"][fam].items():
            assert "plain" in by_method and len(by_method) == 3, (fam, cond)
    assert doc["chosen_label"] in doc["labels"]
    md = markdown(doc)
    assert "Chosen by cross-validation" in md and "| ribbon | motion |" in md


def test_a_scan_cut_soon_after_the_arterial_peak_is_not_long_enough():
    from experiments.calc_settings import PROFILES, make_studies, scan_long_enough
    from stm_dlp.data.corrupt import Truncate, corrupt_study

    studies = make_studies("classic", 0, PROFILES["micro"])
    full = studies["regular"]
    peak_s = float(full.times_s[0][int(np.argmax(full.meta["aif_hu"][0]))])
    assert scan_long_enough(full, full)  # the whole scan: ~35 s after the peak
    n_keep = int(np.searchsorted(full.times_s[0], peak_s + 4.0)) + 1  # ends ~4 s after the arterial peak
    cut = corrupt_study(full, Truncate(keep_fraction=n_keep / full.n_frames), seed=0)
    assert cut.n_frames < full.n_frames and not scan_long_enough(cut, full)


def test_motion_target_judges_the_corrected_row():
    """The issue's motion target (CBF MAE ≤ 1.5 × regular) is "with motion correction": the uncorrected row,
    shown for contrast, is not judged by it; the corrected one is (the stored full run, its numbers altered)."""
    import copy
    import json
    from pathlib import Path

    doc = json.loads((Path(__file__).parents[1] / "docs" / "calc" / "calc_settings.json").read_text())

    def row(d: dict, name: str) -> str:
        return next(line for line in markdown(d).splitlines() if line.startswith(f"| classic | {name} |"))

    res = doc["results"]["classic"]
    worse = copy.deepcopy(doc)
    worse["results"]["classic"]["motion"][doc["chosen_label"]]["mae_cbf"] = 3 * res["regular"][doc["chosen_label"]][
        "mae_cbf"]
    worse["results"]["classic"]["motion"][doc["motion_label"]]["mae_cbf"] = 2 * res["regular"][doc["chosen_label"]][
        "mae_cbf"]
    assert row(worse, "motion").endswith("✓ |")
    assert row(worse, "motion, corrected").endswith("✗ 1 |")


def test_truncation_table_compares_each_study_with_its_noise_free_bound():
    from experiments.calc_truncation import COLUMNS, run, table
    from stm_dlp.perfusion.arterial import MIN_SCAN_AFTER_ARTERIAL_PEAK_S

    rows = run(["classic"], "micro")
    assert len(rows) == 1 and set(rows[0]["dice"]) == set(COLUMNS)
    assert all(0.0 <= v <= 1.0 for v in rows[0]["dice"].values())
    r = rows[0]
    assert r["short"] == (r["after_peak_s"] < MIN_SCAN_AFTER_ARTERIAL_PEAK_S) and r["scan_s"] > 0
    text = table(rows)
    assert text.count("\n") == 2 and "| classic | 0 |" in text
