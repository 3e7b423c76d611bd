"""The benchmark's ``smoke`` profile end to end (``python -m experiments.bench --profile smoke``): every
section runs at toy size and the generated report has the expected sections, rows and figures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bench_smoke")
    env = dict(os.environ, STM_DLP_CACHE=str(out / "cache"), WANDB_MODE="disabled")
    proc = subprocess.run([sys.executable, "-m", "experiments.bench", "--profile", "smoke", "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return out


def test_report_sections_and_rows(smoke: Path) -> None:
    md = (smoke / "BENCHMARKS.md").read_text()
    for heading in ("# STM-DLP benchmarks", "## Accuracy against ground truth", "### MAE per condition",
                    "### RMSE per condition", "### R² per condition", "### Ratio model MAE / oSVD MAE",
                    "### Targets (reported, not asserted)", "### Label noise", "## Speed and memory",
                    "### Roofline reference", "### Training throughput and peak memory",
                    "### Inference: seconds per study", "### LSTM temporal encoder: packed (before) vs causal gather",
                    "## Data", "### Cached loader vs training consumption", "### DICOM parse rate",
                    "## Deconvolution", "## Profiling", "one training step", "one inference pass", "## Left out"):
        assert heading in md, heading
    for meta in ("- Date:", "- Machine:", "- Command: `python -m experiments.bench --profile smoke"):
        assert meta in md, meta
    for label in ("oSVD (calculation)", "STM-DLP CNN", "STM-DLP MLP-Mixer", "STM-DLP LSTM", "UniToBrain"):
        assert f"| regular | {label}" in md, label
    for cond in ("noisy", "motion", "dropped frames 20 %", "dropped frames 30 %", "dropped frames 40 %",
                 "jittered framing", "first 60 % of frames", "first 40 % of frames"):
        assert f"| {cond}" in md, cond
    for target in ("regular: STM-DLP-LSTM MAE ≤ 1.1 × oSVD", "MAE ≤ 0.6 × oSVD", "60 % of frames",
                   "better than UniToBrain"):
        assert target in md, target
    assert "## Error in section" not in md
    for model in ("cnn", "mlp_mixer", "lstm", "unitobrain"):
        assert f"| cpu | fp32 | {model} |" in md, model


def test_results_json_and_figures(smoke: Path) -> None:
    results = json.loads((smoke / "results.json").read_text())
    assert not results["errors"]
    acc = results["accuracy"]
    assert set(acc["models"]) == {"calc", "stm_dlp_cnn", "stm_dlp_mlp_mixer", "stm_dlp_lstm", "unitobrain"}
    for entry in acc["models"].values():
        assert set(entry["metrics"]) == set(acc["conditions"])
    assert all(isinstance(t["met"], bool) for t in acc["targets"])
    # the in-process evaluation path reproduces the run's own test metrics
    assert acc["consistency"]["max_rel_diff_mae"] < 1e-3
    figures = smoke / "figures"
    for name in acc["figures"].values():
        assert (figures / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert {"figure7", "maps_regular", "maps_noise", "maps_motion"} <= set(acc["figures"])
    lstm = results["speed"]["lstm_paths"][0]
    assert lstm["packed_max_abs_diff_vs_gather"] < 1e-4 and lstm["module_matches_gather"]


def test_report_only_regenerates(smoke: Path) -> None:
    md = smoke / "BENCHMARKS_again.md"  # same folder: the relative figure links are the same
    proc = subprocess.run([sys.executable, "-m", "experiments.bench", "--profile", "smoke", "--out", str(smoke),
                           "--report-only", "--md", str(md), "--figures", str(smoke / "figures")],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert md.read_text() == (smoke / "BENCHMARKS.md").read_text()
