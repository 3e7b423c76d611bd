"""Sweeps (conf/experiment), the calculation approach as a model, eval_conditions and the aggregation
into the paper's tables and figures (experiments.tables / experiments.figures)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import subprocess_env
from omegaconf import OmegaConf

import stm_dlp.launch  # noqa: F401 - registers the resolvers the configs use
from experiments import tables
from stm_dlp.conditions import condition_name

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"
PARAM_COLUMNS = [f"{m} {p}" for m in ("MAE", "RMSE", "R²") for p in ("CBV", "CBF", "TMAX")]
#: The paper's columns, then the clinical readout's.
COLUMNS = PARAM_COLUMNS + ["Dice TMAX>6 s", "Dice core", "TMAX>6 s vol. bias [LoA] ml"]


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=overrides, return_hydra_config=True)


def _sweep_variants(cfg) -> list[str]:
    return str(cfg.hydra.sweeper.params["+experiment/variant"]).split(",")


# ----------------------------------------------------------------------------- configs
@pytest.mark.parametrize("experiment, variants", [
    ("table1", ["unitobrain", "stm_dlp_cnn", "stm_dlp_mlp_mixer", "stm_dlp_lstm", "stm_dlp_arterial"]),
    ("table2", ["temporal_first", "stm_dlp_lstm", "sf_time_spatial", "sf_time_both", "joint", "mpp1", "mpp3",
                "stm_dlp_arterial"]),
    ("frames", ["stm_dlp_lstm", "stm_dlp_arterial", "calc"]),
    ("robustness", ["stm_dlp_lstm", "stm_dlp_arterial", "calc"]),
    ("frames_trained", ["stm_dlp_lstm", "stm_dlp_arterial", "calc"]),
])
def test_experiment_sweeps_compose(experiment, variants):
    cfg = _compose([f"experiment={experiment}"])
    assert cfg.experiment_name == experiment
    assert _sweep_variants(cfg) == variants
    assert "seed" not in cfg.hydra.sweeper.params  # seeds are an axis the user adds: seed=0,1,2


def test_variants_set_the_paper_rows():
    expect = {
        "unitobrain": ("stm_dlp.models.UniToBrain", {}),
        "stm_dlp_cnn": ("stm_dlp.models.STMDLP", {"encoder": "cnn", "order": "spatial_first"}),
        "stm_dlp_mlp_mixer": ("stm_dlp.models.STMDLP", {"encoder": "mlp_mixer"}),
        "stm_dlp_lstm": ("stm_dlp.models.STMDLP", {"encoder": "lstm", "order": "spatial_first",
                                                   "time_input": "temporal", "exchange_layers": 2}),
        "temporal_first": ("stm_dlp.models.STMDLP", {"encoder": "lstm", "order": "temporal_first"}),
        "sf_time_spatial": ("stm_dlp.models.STMDLP", {"order": "spatial_first", "time_input": "spatial"}),
        "sf_time_both": ("stm_dlp.models.STMDLP", {"order": "spatial_first", "time_input": "both"}),
        "joint": ("stm_dlp.models.STMDLP", {"order": "joint"}),
        "mpp1": ("stm_dlp.models.STMDLP", {"exchange_layers": 1, "order": "spatial_first"}),
        "mpp3": ("stm_dlp.models.STMDLP", {"exchange_layers": 3}),
        "calc": ("stm_dlp.calc_eval.CalcBaseline", {"method": "osvd"}),
    }
    for variant, (target, fields) in expect.items():
        cfg = _compose(["experiment=table2", f"+experiment/variant={variant}"])
        assert cfg.model._target_ == target, variant
        assert cfg.variant.name == variant
        for k, v in fields.items():
            assert cfg.model[k] == v, (variant, k)
    assert _compose(["+experiment/variant=unitobrain"]).lit.loss == "mse"  # UniToBrain's own recipe
    # the paper's rows stay the paper's model whatever the project's defaults become (each starts from
    # variant/_paper.yaml, composed after the defaults); the new row adds context
    variant_dir = ROOT / "conf" / "experiment" / "variant"
    for variant in ("stm_dlp_lstm", "stm_dlp_cnn", "stm_dlp_mlp_mixer", "temporal_first", "sf_time_spatial",
                    "sf_time_both", "joint", "mpp1", "mpp3"):
        assert "_paper" in yaml.safe_load((variant_dir / f"{variant}.yaml").read_text())["defaults"], variant
        cfg = _compose([f"+experiment/variant={variant}"])
        assert cfg.model.arterial_context is False and cfg.lit.loss == "charbonnier", variant
        assert cfg.data.lesion_crop_fraction == 0.0 and cfg.lit.mtt_weight == 0.0, variant
    new_row = _compose(["+experiment/variant=stm_dlp_arterial"])
    assert new_row.model.arterial_context is True and new_row.lit.mtt_weight > 0
    assert _compose([]).lit.mtt_weight == new_row.lit.mtt_weight  # the new row is the default model
    assert _compose(["model=unitobrain"]).lit.mtt_weight == 0.0


def test_frames_and_robustness_conditions():
    frames = _compose(["experiment=frames"])
    assert [c["frame_fraction"] for c in frames.eval_conditions] == [0.9, 0.8, 0.7, 0.6, 0.5, 0.4]
    robust = _compose(["experiment=robustness"])
    from stm_dlp.data.corrupt import NAMED_CORRUPTIONS

    assert {c["eval_corruption"] for c in robust.eval_conditions} == set(NAMED_CORRUPTIONS) - {"none"}
    trained = _compose(["experiment=frames_trained", "data.frame_fraction=0.6"])
    assert trained.data.train_frame_fraction == 0.6
    assert condition_name({"frame_fraction": 0.6}) == "frames0.6"
    assert condition_name({"eval_corruption": "noise"}) == "noise"
    assert condition_name({"eval_corruption": "motion", "frame_fraction": 0.5}) == "motion+frames0.5"
    assert condition_name({"name": "a b/c"}) == "a_b_c"


def test_calc_model_config():
    cfg = _compose(["model=calc"])
    from hydra.utils import instantiate

    from stm_dlp.calc_eval import CalcBaseline

    baseline = instantiate(cfg.model)
    assert isinstance(baseline, CalcBaseline) and baseline.method == "osvd" and baseline.aif == "auto"


def test_calc_evaluation_matches_lit_metrics(tiny_study):
    """CalcBaseline scored by evaluate_studies equals torchmetrics over the masked pixels."""
    import torch
    from torchmetrics.functional import mean_absolute_error, r2_score

    from stm_dlp.calc_eval import CalcBaseline, evaluate_studies

    baseline = CalcBaseline()
    res = evaluate_studies(baseline, [tiny_study])
    maps, _ = baseline.maps(tiny_study)
    m = torch.from_numpy(np.asarray(tiny_study.mask, bool))
    pred = torch.from_numpy(maps["cbf"])[m]
    truth = torch.from_numpy(np.asarray(tiny_study.maps[:, 1], np.float32))[m]
    assert res["cbf"]["mae"] == pytest.approx(float(mean_absolute_error(pred, truth)), rel=1e-5)
    assert res["cbf"]["r2"] == pytest.approx(float(r2_score(pred, truth)), rel=1e-4, abs=1e-5)
    assert res["failed_studies"] == 0 and set(res["per_patient_mae"]) == {tiny_study.patient_id}


# ----------------------------------------------------------------------------- aggregation (synthetic jobs)
def _readout(dice_tmax: float | None, dice_core: float | None, bias: float, sd: float | None) -> dict:
    """A ``metrics.json`` readout block (summary only, as :func:`stm_dlp.metrics.summarise_agreement` writes)."""
    ba = {"bias": bias, "sd": sd, "loa_low": None if sd is None else bias - 1.96 * sd,
          "loa_high": None if sd is None else bias + 1.96 * sd, "n": 3}
    return {"per_patient": {}, "summary": {
        "n_patients": 3, "dice_tmax_gt_6": {"median": dice_tmax, "mean": dice_tmax, "n": 0 if dice_tmax is None else 2},
        "dice_core": {"median": dice_core, "mean": dice_core, "n": 0 if dice_core is None else 1},
        "hypoperfusion_ml_error": ba, "core_ml_error": ba, "mismatch_ml_error": ba}}


def _fake_job(root: Path, num: int, experiment: str, variant: str, label: str, seed: int, mae: float,
              conditions: dict | None = None, model: str = "stm_dlp.models.STMDLP", failed: int | None = None,
              readout: dict | None = None):
    d = root / str(num)
    d.mkdir(parents=True)

    def scaled(scale):
        return {p: {"mae": mae * scale, "rmse": 2 * mae * scale, "r2": 1 - mae * scale / 10}
                for p in ("cbv", "cbf", "tmax", "mtt")}

    metrics = {"test": scaled(1.0), "experiment": experiment, "variant": variant, "label": label, "seed": seed,
               "model": model, "eval_corruption": "none", "frame_fraction": 1.0, "n_test_patients": 3,
               "conditions": {}}
    if readout is not None:
        metrics["readout"] = readout
    if failed is not None:
        metrics["failed_studies"] = 0
    for name, (corruption, ff, scale) in (conditions or {}).items():
        metrics["conditions"][name] = {"eval_corruption": corruption, "frame_fraction": ff, "test": scaled(scale),
                                       **({"failed_studies": failed} if failed is not None else {})}
    (d / "metrics.json").write_text(json.dumps(metrics))
    (d / "config.yaml").write_text(yaml.safe_dump({"experiment_name": experiment, "seed": seed,
                                                   "variant": {"name": variant, "label": label}}))
    (d / ".hydra").mkdir()
    (d / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"+experiment/variant={variant}",
                                                                 f"seed={seed}"]))


def test_table2_layout_reuses_rows_and_bolds_best(tmp_path):
    sweep = tmp_path / "sweep"
    n = 0
    for variant, label, mae in (("temporal_first", "Temporal First", 3.0), ("stm_dlp_lstm", "STM-DLP LSTM", 1.0),
                                ("mpp3", "MPP with 3-layer Feature Exchange", 2.0)):
        for seed, jitter in ((0, 0.0), (1, 0.2)):
            _fake_job(sweep, n, "table2", variant, label, seed, mae + jitter)
            n += 1
    written = tables.summarise([sweep], tmp_path / "out", qualitative=False)
    md = (tmp_path / "out" / "table2.md").read_text()
    body = [line for line in md.splitlines() if line.startswith("| ")]
    assert body[0] == "| Model | " + " | ".join(COLUMNS) + " |"
    labels = [line.split(" | ")[0].lstrip("| ") for line in body[1:]]
    assert labels == ["Temporal First", "Spatial First - Time in Temporal", "MPP with 2-layer Feature Exchange",
                      "MPP with 3-layer Feature Exchange"]  # one run, two rows; paper order
    lstm_row = body[2]
    assert "**1.100 ± 0.141**" in lstm_row  # mean ± sample std over seeds 0, 1; lowest MAE in bold
    assert lstm_row.count("**") == 2 * 9  # best in every column (R² highest)
    assert "**" not in body[1]
    rows = list(csv.DictReader(io_open(tmp_path / "out" / "table2.csv")))
    assert [r["row"] for r in rows] == ["temporal_first", "stm_dlp_lstm", "stm_dlp_lstm", "mpp3"]
    assert rows[1]["n_seeds"] == "2" and float(rows[1]["mae_cbv"]) == pytest.approx(1.1)
    assert float(rows[1]["mae_cbv_std"]) == pytest.approx(np.std([1.0, 1.2], ddof=1), rel=1e-5)
    assert sorted(p.name for p in written["table2"]) == ["table2.csv", "table2.md"]


def test_readout_columns_mean_std_over_seeds_and_dash_without_readout(tmp_path):
    sweep = tmp_path / "sweep"
    _fake_job(sweep, 0, "table1", "stm_dlp_lstm", "STM-DLP LSTM", 0, 1.0, readout=_readout(0.8, 0.5, 2.0, 1.0))
    _fake_job(sweep, 1, "table1", "stm_dlp_lstm", "STM-DLP LSTM", 1, 1.0, readout=_readout(0.6, None, 4.0, 2.0))
    _fake_job(sweep, 2, "table1", "stm_dlp_cnn", "STM-DLP CNN", 0, 2.0, readout=_readout(0.9, 0.2, -1.0, None))
    _fake_job(sweep, 3, "table1", "unitobrain", "UniToBrain", 0, 3.0)  # an older metrics.json: no readout
    tables.summarise([sweep], tmp_path / "out", qualitative=False)
    body = [line for line in (tmp_path / "out" / "table1.md").read_text().splitlines() if line.startswith("| ")]
    assert body[0] == "| Model | " + " | ".join(COLUMNS) + " |"
    cells = {line.split(" | ")[0].lstrip("| "): [c.strip(" |") for c in line.split(" | ")[-3:]] for line in body[1:]}
    assert cells["UniToBrain"] == ["—", "—", "—"]
    lstm, cnn = cells["STM-DLP LSTM"], cells["STM-DLP CNN"]
    assert lstm[0] == f"0.700 ± {np.std([0.8, 0.6], ddof=1):.3f}"  # mean ± std over seeds, not bold (CNN higher)
    assert lstm[1] == "**0.500**"  # seed 1 has no core lesion: left out, not counted as 0; best core Dice
    # bias mean ± std over seeds, limits of agreement (means over seeds) in brackets
    lo, hi = np.mean([2 - 1.96, 4 - 3.92]), np.mean([2 + 1.96, 4 + 3.92])
    assert lstm[2] == f"+3.0 ± {np.std([2.0, 4.0], ddof=1):.1f} [{lo:.1f}, {hi:.1f}]"
    assert cnn == ["**0.900**", "0.200", "**-1.0**"]  # highest Dice, smallest |bias|; one patient: no limits
    rows = {r["row"]: r for r in csv.DictReader(io_open(tmp_path / "out" / "table1.csv"))}
    assert float(rows["stm_dlp_lstm"]["dice_tmax_gt_6"]) == pytest.approx(0.7)
    assert float(rows["stm_dlp_lstm"]["tmax6_loa_high_ml"]) == pytest.approx(hi)
    assert rows["unitobrain"]["dice_tmax_gt_6"] == "" and rows["stm_dlp_cnn"]["tmax6_loa_low_ml"] == ""


def io_open(path: Path):
    return open(path, newline="")


def test_frames_and_robustness_aggregation(tmp_path):
    sweep = tmp_path / "frames"
    conds = {f"frames{f:g}": ("none", f, 1 + (1 - f)) for f in (0.8, 0.6)}
    _fake_job(sweep, 0, "frames", "stm_dlp_lstm", "STM-DLP LSTM", 0, 1.0, conds)
    calc_conds = {f"frames{f:g}": ("none", f, 1 + 3 * (1 - f)) for f in (0.8, 0.6)}
    _fake_job(sweep, 1, "frames", "calc", "oSVD (calculation)", 0, 1.5, calc_conds,
              model="stm_dlp.calc_eval.CalcBaseline", failed=1)
    written = tables.summarise([sweep], tmp_path / "out", qualitative=False)
    names = sorted(p.name for p in written["frames"])
    assert names == ["frames.csv", "frames.md", "frames_frames.png"]
    md = (tmp_path / "out" / "frames.md").read_text()
    body = [line for line in md.splitlines() if line.startswith("| ")]
    assert body[0].startswith("| Condition | Model | MAE CBV")
    assert [line.split(" | ")[0].lstrip("| ") for line in body[1:]] == [
        "regular", "regular", "80% frames", "80% frames", "60% frames", "60% frames"]
    assert "oSVD (calculation) †" in md and "scored as zero maps" in md
    assert (tmp_path / "out" / "frames_frames.png").stat().st_size > 10_000

    rob = tmp_path / "robust"
    _fake_job(rob, 0, "robustness", "stm_dlp_lstm", "STM-DLP LSTM", 0, 1.0,
              {"noise": ("noise", 1.0, 1.2), "motion": ("motion", 1.0, 1.5)})
    _fake_job(rob, 1, "robustness", "calc", "oSVD (calculation)", 0, 1.4,
              {"noise": ("noise", 1.0, 2.0), "motion": ("motion", 1.0, 1.0)}, model="stm_dlp.calc_eval.CalcBaseline")
    written = tables.summarise([rob], tmp_path / "out2", qualitative=False)
    assert "robustness_robustness.png" in [p.name for p in written["robustness"]]
    body = [line for line in (tmp_path / "out2" / "robustness.md").read_text().splitlines() if line.startswith("| ")]
    assert [line.split(" | ")[0].lstrip("| ") for line in body[1:]] == [
        "regular", "regular", "noise", "noise", "motion", "motion"]
    motion_calc = body[6]
    assert motion_calc.split(" | ")[2].startswith("**")  # calc better on "motion" here: best within condition


def test_tables_cli_errors(tmp_path, capsys):
    assert tables.main([str(tmp_path / "nope")]) == 2
    assert "not found" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert tables.main([str(tmp_path / "empty")]) == 2


# ----------------------------------------------------------------------------- a real smoke sweep
def test_table1_two_job_smoke_sweep_through_the_cli(tmp_path):
    """`-m experiment=table1 trainer=smoke`, restricted to two rows, then the tables and figures."""
    sweep = tmp_path / "sweep"
    env = subprocess_env()
    res = subprocess.run(
        [sys.executable, "-m", "stm_dlp.run", "-m", "experiment=table1", "trainer=smoke",
         "+experiment/variant=unitobrain,stm_dlp_cnn", f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name for p in jobs] == ["0", "1"]
    for job in jobs:
        metrics = json.loads((job / "metrics.json").read_text())
        assert metrics["experiment"] == "table1" and metrics["conditions"] == {}
        assert OmegaConf.load(job / "config.yaml").experiment_name == "table1"
    written = tables.summarise([sweep], tmp_path / "out")
    md = (tmp_path / "out" / "table1.md").read_text()
    body = [line for line in md.splitlines() if line.startswith("| ")]
    assert body[0] == "| Model | " + " | ".join(COLUMNS) + " |"
    assert [line.split(" | ")[0].lstrip("| ") for line in body[1:]] == ["UniToBrain", "STM-DLP CNN"]
    assert all(len(line.split(" | ")) == 13 for line in body)
    for line in body[1:]:  # a real run carries the readout: the TMAX>6 s volume bias is a number
        assert line.split(" | ")[-1].rstrip(" |").lstrip("*")[:1] in "+-"
    assert md.count("**") >= 2 * 9  # a best value in each of the 9 columns
    assert "phantom-" not in md and "phantom-" not in (tmp_path / "out" / "table1.csv").read_text()
    header = next(csv.reader(io_open(tmp_path / "out" / "table1.csv")))
    assert {"mae_cbv", "rmse_cbf", "r2_tmax", "r2_tmax_std", "label"} <= set(header)
    figure = tmp_path / "out" / "table1_qualitative.png"
    assert figure in written["table1"] and figure.stat().st_size > 20_000


def test_mtt_diagnostics_splits_the_error_by_tissue_class():
    """The MTT error report: each truth class's share of the squared error, and CSF's error gone once the
    maps leave CSF out (synthetic arrays; the command itself runs on a finished run directory)."""
    from experiments.mtt_diagnostics import report

    truth = {"cbv": np.array([0.0, 0.0, 2.0, 2.0]), "cbf": np.array([0.0, 0.0, 30.0, 30.0]),
             "tmax": np.array([0.0, 0.0, 1.0, 8.0]), "mtt": np.array([0.0, 0.0, 4.0, 4.0])}
    raw = {**truth, "mtt": np.array([9.0, 9.0, 4.0, 4.0])}
    kept = {**truth, "mtt": np.array([0.0, 0.0, 4.0, 4.0])}
    text = report({"raw": raw, "csf_out": kept, "truth": truth})
    csf_row = next(line for line in text.splitlines() if line.startswith("| CSF"))
    assert "| 50.0 % | 10.12 | 0.00 |" in csf_row   # 2·81 / SST 16
    assert "1.000" in text.splitlines()[-1]             # CSF left out: MTT exact, R² 1


def test_cross_family_table_and_arterial_check_rows():
    """experiments.cross_family's table reads run_cross_family's result layout; experiments.arterial_check's
    per-slice errors are small on a clean classic study (the reference follows the true AIF)."""
    import numpy as np

    from experiments.arterial_check import slice_errors
    from experiments.arterial_check import table as arterial_table
    from experiments.cross_family import table
    from stm_dlp.data.phantom import PhantomConfig, simulate_patient

    def metrics(d: float) -> dict:
        return {**{p: {"mae": 1.0 + d, "rmse": 2.0, "r2": 0.5 - d} for p in ("cbv", "cbf", "tmax", "mtt")},
                "readout": {"dice_tmax_gt_6": {"median": 0.8 - d, "n": 2}}}

    fams = ["classic", "ribbon"]
    res = {"families": fams, "model": {f"{a}->{b}": {c: metrics(0.1 if a != b else 0.0)
                                                     for c in ("regular", "noise", "motion")}
                                       for a in fams for b in fams},
           "calc": {b: {c: metrics(0.3) for c in ("regular", "noise", "motion")} for b in fams}}
    text = table(res)
    lines = text.splitlines()
    assert len(lines) == 2 + 2 * 3 * 3  # header, rule, (2 models + oSVD) per tested family and condition
    assert "| ribbon | classic | regular | STM-DLP LSTM | 0.7 |" in text
    assert "| — | ribbon | motion | oSVD | 0.5 |" in text
    res["prior"] = {b: {c: metrics(0.2) for c in ("regular", "noise", "motion")} for b in fams}
    with_prior = table(res)
    assert len(with_prior.splitlines()) == len(lines) + 2 * 3
    assert "| — | classic | noise | prior alone | 0.6 |" in with_prior

    study = simulate_patient(PhantomConfig(height=32, width=32, n_slices=1, frames_min=20, frames_max=20), seed=3)
    errs = slice_errors(study, study)
    assert len(errs) == 1 and abs(errs[0][0]) < 0.3 and 0.7 < errs[0][1] < 1.3
    row = {"family": "classic", "grid": "native", "condition": "none", "slices": 1, "mean": errs[0][0],
           "abs": abs(errs[0][0]), "p90": abs(errs[0][0]), "ratio": errs[0][1], "ratio_lo": errs[0][1],
           "ratio_hi": errs[0][1]}
    assert arterial_table([row]).count("\n") == 2 and np.isfinite(errs[0][1])


def test_tmax_bound_scores_and_table():
    import numpy as np

    from experiments.tmax_bound import r2_dice, table

    truth = np.array([1.0, 2.0, 8.0, 9.0])
    assert r2_dice(truth, truth) == (1.0, 1.0)
    r2, dice = r2_dice(truth, np.array([1.0, 2.0, 8.0, 3.0]))  # one lesion pixel missed
    assert r2 < 0.5 and dice == pytest.approx(2 / 3)
    row = {"unbounded": (0.5, 0.8), 1.0: (0.6, 0.7), "levelled": (0.65, 0.75)}
    text = table({"classic": {"prior": (0.7, 0.9), "classic": row, "ribbon": row}}, [1.0])
    assert "| ribbon | classic | 0.50 / 0.80 | 0.60 / 0.70 | 0.65 / 0.75 | 0.70 / 0.90 |" in text


def test_pooled_reference_check_options_and_plain_osvd_provider(tiny_study, monkeypatch):
    """experiments.pooled_reference_check refuses unknown conditions / poolings by name, and its plain-oSVD
    provider gives the four maps on the study's grid, 0 outside the brain mask."""
    import numpy as np

    from experiments import pooled_reference_check as prc

    for bad in (["--conditions", "regular,fog"], ["--pooling", "patient"],
                ["--prior-variants", '{"x": {"tmax_noise_widenin": 1.0}}']):
        monkeypatch.setattr("sys.argv", ["prc", "--bench-out", "/nonexistent", *bad])
        with pytest.raises(SystemExit):
            prc.main()
    maps, _ = prc.PlainOSVDMaps().maps(tiny_study)
    mask = np.asarray(tiny_study.mask, bool)
    assert set(maps) == {"cbv", "cbf", "tmax", "mtt"}
    for m in maps.values():
        assert m.shape == mask.shape and np.isfinite(m).all() and not m[~mask].any()
    assert maps["cbf"][mask].mean() > 0
