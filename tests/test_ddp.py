"""Multi-GPU and cluster plumbing, tested on a CPU machine: DDP through the real CLI (two gloo
processes), the refusal of DDP inside a multirun, one-job-per-GPU assignment, SLURM submission."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import subprocess_env
from omegaconf import OmegaConf

from stm_dlp import launch
from stm_dlp.conditions import check_conditions
from stm_dlp.launch import check_launch, is_global_zero_env, resume_checkpoint

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"


def _cli(args: list[str], cwd: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stm_dlp.run", *args], cwd=cwd, env=subprocess_env(),
                          capture_output=True, text=True, timeout=timeout)


def _hydra(mode: str = "MULTIRUN", launcher: str = "hydra._internal.core_plugins.basic_launcher.BasicLauncher",
           job_num: int = 0, sweep_dir: str = "/tmp/none", overrides_hydra: list[str] | None = None):
    return OmegaConf.create({"mode": mode, "launcher": {"_target_": launcher}, "job": {"num": job_num},
                             "sweep": {"dir": sweep_dir, "subdir": str(job_num)},
                             "overrides": {"hydra": overrides_hydra or []}})


def _cfg(**trainer) -> OmegaConf:
    base = {"accelerator": "cpu", "devices": 1}
    base.update(trainer)
    return OmegaConf.create({"trainer": base, "model": {"_target_": "x"}})


# ----------------------------------------------------------------------------- DDP through the CLI
# two gloo processes each importing torch and Lightning: the suite's slowest test (~30 s on 2 cores), so it
# runs with `make test-slow`; the launch rules, rank-zero writing and resume below stay in `make test`
@pytest.mark.slow
def test_ddp_two_cpu_processes_one_run_dir_same_metrics(tmp_path):
    """trainer=smoke with strategy=ddp, devices=2 (gloo): one run dir, one config, and — with a learning
    rate that leaves the initial weights unchanged — the same test metrics as one process, which
    shows the metrics are synchronised over the whole test split and the split is the same on every rank."""
    common = ["trainer=smoke", "lit.lr=1e-12", "logger=csv"]
    ddp = _cli([*common, "+trainer.strategy=ddp", "trainer.devices=2", "experiment_name=ddp"], tmp_path)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    run_dirs = [p for p in (tmp_path / "outputs" / "ddp").iterdir() if p.is_dir()]
    assert len(run_dirs) == 1, f"DDP children must share the run dir, got {run_dirs}"
    run = run_dirs[0]
    assert (run / "config.yaml").is_file() and (run / "metrics.json").is_file()
    assert len(list(run.rglob("config.yaml"))) == 2  # ours + Hydra's .hydra/config.yaml, written once
    assert not any(p.name.startswith(".pl_hydra") for p in run.iterdir())
    assert (run / "train_ddp_process_1.log").exists()  # the child ran Hydra in the same dir
    ddp_metrics = json.loads((run / "metrics.json").read_text())

    single = _cli([*common, "hydra.run.dir=single"], tmp_path)
    assert single.returncode == 0, single.stderr[-3000:]
    one = json.loads((tmp_path / "single" / "metrics.json").read_text())
    assert set(ddp_metrics) == set(one)
    assert set(ddp_metrics["per_patient_mae"]) == set(one["per_patient_mae"])  # same test patients
    assert json.loads((run / "split.json").read_text()) == json.loads((tmp_path / "single" / "split.json").read_text())
    for p, values in one["test"].items():
        for k, v in values.items():
            assert ddp_metrics["test"][p][k] == pytest.approx(v, rel=1e-4, abs=1e-4), (p, k)


def test_cli_refuses_ddp_in_multirun(tmp_path):
    res = _cli(["-m", "trainer=smoke", "+trainer.strategy=ddp", "trainer.devices=2", "seed=0,1"], tmp_path, 120)
    assert res.returncode == 2
    assert "multirun" in res.stderr and "replay the whole sweep" in res.stderr
    assert not list(tmp_path.rglob("metrics.json"))


# ----------------------------------------------------------------------------- check_launch
def test_check_launch_rules():
    ddp = _cfg(accelerator="gpu", devices=2, strategy="ddp")
    with pytest.raises(ValueError, match="multirun"):
        check_launch(ddp, _hydra("MULTIRUN"), env={})
    with pytest.raises(ValueError, match="multirun"):  # devices=auto on a GPU: possibly many processes
        check_launch(_cfg(accelerator="gpu", devices="auto"), _hydra("MULTIRUN"), env={})
    check_launch(_cfg(accelerator="gpu", devices=1), _hydra("MULTIRUN"), env={})
    check_launch(_cfg(accelerator="gpu", devices=[3]), _hydra("MULTIRUN"), env={})
    check_launch(ddp, _hydra("RUN"), env={})  # a single DDP run is fine
    slurm = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    check_launch(ddp, _hydra("MULTIRUN", launcher=slurm), env={"SLURM_JOB_ID": "1"})
    torchrun = {"TORCHELASTIC_RUN_ID": "x", "WORLD_SIZE": "4", "RANK": "0"}
    with pytest.raises(ValueError, match="hydra.run.dir"):
        check_launch(ddp, _hydra("RUN"), env=torchrun)
    check_launch(ddp, _hydra("RUN", overrides_hydra=["hydra.run.dir=outputs/ddp"]), env=torchrun)
    bad = OmegaConf.merge(_cfg(), {"eval_conditions": [{"frame_fraction": 0.5, "lr": 1}]})
    with pytest.raises(ValueError, match="unknown key"):
        check_conditions(bad)


def test_rank_zero_and_resume(tmp_path):
    assert is_global_zero_env({})
    assert not is_global_zero_env({"LOCAL_RANK": "1"})
    assert not is_global_zero_env({"SLURM_PROCID": "3"})
    assert not is_global_zero_env({"RANK": "2", "LOCAL_RANK": "0"})
    assert is_global_zero_env({"RANK": "0", "LOCAL_RANK": "0", "SLURM_PROCID": "0"})
    cfg = OmegaConf.create({"ckpt_path": None})
    assert resume_checkpoint(cfg, tmp_path, {}) is None
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"x")
    assert resume_checkpoint(cfg, tmp_path, {}) is None  # a fresh job never resumes by itself
    assert resume_checkpoint(cfg, tmp_path, {"SLURM_RESTART_COUNT": "1"}).endswith("last.ckpt")
    (tmp_path / "hpc_ckpt_1.ckpt").write_bytes(b"x")
    assert resume_checkpoint(cfg, tmp_path, {"SLURM_RESTART_COUNT": "1"}) is None  # Lightning's own
    assert resume_checkpoint(OmegaConf.create({"ckpt_path": "a.ckpt"}), tmp_path, {}) == "a.ckpt"


# ----------------------------------------------------------------------------- one job per GPU
def test_device_counting():
    assert launch.visible_gpu_count({"CUDA_VISIBLE_DEVICES": "0,3,5"}) == 3
    assert launch.visible_gpu_count({"CUDA_VISIBLE_DEVICES": ""}) == 0
    assert launch.visible_gpu_count({"CUDA_VISIBLE_DEVICES": "1,-1,2"}) == 1
    assert launch.device_count(2) == 2 and launch.device_count([0, 1, 2]) == 3 and launch.device_count("0,1") == 2
    assert launch.device_count("auto") is None and launch.device_count(-1) is None
    assert launch.world_size({"accelerator": "gpu", "devices": 4, "num_nodes": 2}) == 8
    assert launch.world_size({"accelerator": "cpu", "devices": "auto"}) == 1
    assert launch.slurm_tasks_per_node(4) == 4
    assert launch.slurm_gpus_per_node("cpu", 1) is None and launch.slurm_gpus_per_node("gpu", 2) == 2
    with pytest.raises(ValueError, match="trainer.devices"):
        launch.slurm_tasks_per_node("auto")


def test_gpu_preference_round_robin():
    assert launch.gpu_preference(0, 4) == [0, 1, 2, 3]
    assert launch.gpu_preference(5, 4) == [1, 2, 3, 0]
    assert [launch.gpu_preference(j, 3)[0] for j in range(6)] == [0, 1, 2, 0, 1, 2]


def test_gpu_slots_are_exclusive(tmp_path):
    """Jobs finishing out of order never share a GPU: job 2 prefers GPU 0, finds it busy, takes GPU 1."""
    with launch.gpu_slot(tmp_path, 2, job_num=0) as a:
        assert a == 0
        with launch.gpu_slot(tmp_path, 2, job_num=2) as b:
            assert b == 1
            with pytest.raises(TimeoutError):
                with launch.gpu_slot(tmp_path, 2, job_num=4, poll_s=0.01, timeout_s=0.05):
                    pass
    with launch.gpu_slot(tmp_path, 2, job_num=1) as c:
        assert c == 1  # released slots are free again


def test_gpu_slot_waits_for_a_free_gpu(tmp_path):
    order = []

    def holder():
        with launch.gpu_slot(tmp_path, 1, job_num=0):
            order.append("held")
            time.sleep(0.3)
        order.append("released")

    t = threading.Thread(target=holder)
    t.start()
    while not order:
        time.sleep(0.01)
    with launch.gpu_slot(tmp_path, 1, job_num=1, poll_s=0.02) as i:
        order.append(f"got {i}")
    t.join()
    assert order == ["held", "released", "got 0"]


def test_pinned_gpu_rewrites_the_job_config(tmp_path):
    joblib = "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"
    cfg = OmegaConf.create({"trainer": {"accelerator": "gpu", "devices": 1},
                            "model": {"_target_": "stm_dlp.calc_eval.CalcBaseline", "device": "cuda"}})
    hc = _hydra("MULTIRUN", launcher=joblib, job_num=3, sweep_dir=str(tmp_path))
    with launch.pinned_gpu(cfg, hc, n_gpus=2) as index:
        assert index == 1
        assert list(cfg.trainer.devices) == [1] and cfg.model.device == "cuda:1"
        assert (tmp_path / ".gpu_locks" / "gpu1.lock").exists()
    for hc_other, c in ((_hydra("RUN", launcher=joblib), _cfg(accelerator="gpu")),  # single run
                        (_hydra("MULTIRUN"), _cfg(accelerator="gpu")),  # basic launcher
                        (_hydra("MULTIRUN", launcher=joblib), _cfg(accelerator="cpu"))):  # CPU job
        with launch.pinned_gpu(c, hc_other, n_gpus=2) as index:
            assert index is None
    with launch.pinned_gpu(_cfg(accelerator="gpu"), _hydra("MULTIRUN", launcher=joblib), n_gpus=0) as index:
        assert index is None  # no GPU on this machine


# ----------------------------------------------------------------------------- launcher configs
@pytest.fixture(autouse=True)
def _reset_hydra_config():
    yield
    from hydra.core.hydra_config import HydraConfig

    HydraConfig.instance().cfg = None


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=overrides, return_hydra_config=True)


def test_joblib_gpu_launcher_composes():
    cfg = _compose(["experiment=table1", "trainer=gpu", "hydra/launcher=joblib_gpu"])
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("JoblibLauncher")
    assert launcher.n_jobs >= 1  # one worker per visible GPU (1 on a machine without GPUs)
    assert cfg.trainer.devices == 1


def test_trainer_ddp_composes():
    cfg = _compose(["trainer=ddp", "trainer.devices=4"])
    assert cfg.trainer.strategy == "ddp" and cfg.trainer.devices == 4 and cfg.trainer.accelerator == "gpu"


def test_slurm_submission_parameters(tmp_path, monkeypatch):
    """The real submitit launcher builds the sbatch script: an array of 2 jobs, one task per GPU for DDP,
    Lightning's requeue signal, submitit's own timeout-resubmission off."""
    import submitit
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import instantiate

    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "srun").write_text("#!/bin/sh\nexit 0\n")
    (fake_bin / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}{os.environ['PATH']}")
    cfg = _compose(["experiment=table1", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2",
                    "hydra/launcher=slurm", "hydra.launcher.partition=gpu", f"hydra.sweep.dir={tmp_path / 'sweep'}"])
    HydraConfig.instance().set_config(cfg)
    params = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert params["tasks_per_node"] == 4 and params["gpus_per_node"] == 4 and params["nodes"] == 2
    assert params["max_num_timeout"] == 0
    captured = {}

    def fake_map_array(self, fn, *args):
        ex = self._executor
        ex.parameters["map_count"] = len(args[0])
        captured["sbatch"] = ex._make_submission_file_text("python -u -m submitit.core._submit X", "uid")
        captured["max_num_timeout"] = ex.max_num_timeout
        return [SimpleNamespace(results=lambda: ["done"]) for _ in args[0]]

    monkeypatch.setattr(submitit.AutoExecutor, "map_array", fake_map_array)
    launcher = instantiate(cfg.hydra.launcher)
    launcher.setup(hydra_context=None, task_function=None, config=cfg)
    assert launcher.launch([["+experiment/variant=unitobrain"], ["+experiment/variant=stm_dlp_cnn"]], 0) == [
        "done", "done"]
    sbatch = captured["sbatch"]
    for line in ("--array=0-1%2", "--ntasks-per-node=4", "--gpus-per-node=4", "--nodes=2", "--partition=gpu",
                 "--signal=USR1@120", "--requeue", "--time=1440"):
        assert f"#SBATCH {line}" in sbatch, line
    assert "USR2" not in sbatch  # submitit's own pre-emption signal is not requested: Lightning owns requeue
    assert captured["max_num_timeout"] == 0
    cpu = _compose(["trainer=cpu", "hydra/launcher=slurm"])
    HydraConfig.instance().set_config(cpu)
    cpu_params = OmegaConf.to_container(cpu.hydra.launcher, resolve=True)
    assert cpu_params["gpus_per_node"] is None and cpu_params["tasks_per_node"] == 1
