"""logger=wandb in a multirun, offline: one W&B run per job, one group per sweep, no patient identifier.

The robustness sweep (STM-DLP-LSTM trained once and tested on clean and noisy input, the calculation
approach beside it) doubles as the end-to-end test of ``eval_conditions`` and ``model=calc``.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

from experiments import tables


def read_wandb_records(path: Path) -> list:
    """Records of a ``.wandb`` transaction log (LevelDB-style log of ``wandb_internal_pb2.Record``)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    ident, _magic, _version = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B", f"{path} is not a W&B transaction log"
    block, pos, pending, raw = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:  # zero padding up to the next block
            pos += left
            continue
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 1:  # full
            raw.append(chunk)
        elif kind == 2:  # first
            pending = chunk
        elif kind == 3:  # middle
            pending += chunk
        elif kind == 4:  # last
            raw.append(pending + chunk)
            pending = b""
    records = []
    for r in raw:
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(r)
        records.append(rec)
    return records


def test_wandb_offline_multirun_one_run_per_job(tmp_path):
    sweep = tmp_path / "multirun" / "robustness" / "2026-01-02_03-04-05"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "WANDB_MODE": "offline", "WANDB_SILENT": "true",
           "WANDB_DIR": str(tmp_path / "wandb_home"), "WANDB_CACHE_DIR": str(tmp_path / "wandb_cache"),
           "WANDB_CONFIG_DIR": str(tmp_path / "wandb_config"), "WANDB_DATA_DIR": str(tmp_path / "wandb_data")}
    env.pop("WANDB_API_KEY", None)
    res = subprocess.run(
        [sys.executable, "-m", "stm_dlp.run", "-m", "experiment=robustness", "trainer=smoke", "logger=wandb",
         "+experiment/variant=stm_dlp_lstm,calc", "eval_conditions=[{eval_corruption:noise}]",
         f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name for p in jobs] == ["0", "1"]
    runs = []
    for job in jobs:
        offline = list((job / "wandb").glob("offline-run-*"))
        assert len(offline) == 1, f"{job}: expected one offline W&B run, got {offline}"
        logs = list(offline[0].glob("run-*.wandb"))
        assert len(logs) == 1
        records = read_wandb_records(logs[0])
        kinds = [r.WhichOneof("record_type") for r in records]
        assert "exit" in kinds  # wandb.finish() ran before the next job started
        run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
        history_keys = {item.key or "/".join(item.nested_key) for r in records
                        if r.WhichOneof("record_type") == "history" for item in r.history.item}
        config_keys = {item.key or "/".join(item.nested_key) for r in records
                       if r.WhichOneof("record_type") == "config" for item in r.config.update}
        runs.append((run, history_keys, config_keys))
        # pseudonymised patient IDs stay out of everything W&B stores
        for f in (job / "wandb").rglob("*"):
            if f.is_file():
                assert b"phantom-0" not in f.read_bytes(), f
        metrics = json.loads((job / "metrics.json").read_text())
        assert set(metrics["conditions"]) == {"noise"} and (job / "metrics_noise.json").is_file()

    (model_run, model_hist, model_cfg), (calc_run, calc_hist, _) = runs
    assert model_run.run_group == calc_run.run_group == f"robustness-{sweep.name}"
    assert model_run.run_id != calc_run.run_id
    assert model_run.display_name == "stm_dlp_lstm-seed0-job0" and calc_run.display_name == "calc-seed0-job1"
    assert {"experiment_name", "model", "trainer", "data"} <= model_cfg  # the resolved config
    assert any(k.startswith("train/loss") for k in model_hist)  # per-epoch losses
    assert any(k.startswith("val/mae_cbf") for k in model_hist)  # per-epoch validation metrics
    assert any(k.startswith("val/maps") for k in model_hist)  # colour-mapped images
    assert any(k.startswith("test/metrics") for k in model_hist)  # the final metrics table
    assert "noise/mae_cbf" in model_hist and "noise/mae_cbf" in calc_hist
    assert "test/mae_cbf" in calc_hist

    calc = json.loads((jobs[1] / "metrics.json").read_text())
    assert calc["model"] == "stm_dlp.calc_eval.CalcBaseline" and calc["epochs"] == 0
    assert not (jobs[1] / "checkpoints").exists()  # the calculation approach is not trained
    assert calc["n_test_patients"] == json.loads((jobs[0] / "metrics.json").read_text())["n_test_patients"]

    written = tables.summarise([sweep], tmp_path / "out", qualitative=False)
    body = [line for line in (tmp_path / "out" / "robustness.md").read_text().splitlines() if line.startswith("| ")]
    assert [tuple(c.strip() for c in line.split(" | ")[:2]) for line in body[1:]] == [
        ("| regular", "STM-DLP LSTM"), ("| regular", "oSVD (calculation)"),
        ("| noise", "STM-DLP LSTM"), ("| noise", "oSVD (calculation)")]
    assert tmp_path / "out" / "robustness_robustness.png" in written["robustness"]
