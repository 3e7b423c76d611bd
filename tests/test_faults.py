"""Faults: a training run killed mid-epoch resumes to the same result, killed writers leave no half file,
a corrupted slice costs only that slice at inference, and SLURM pre-emption is Lightning's business.

* (a) ``python -m stm_dlp.run`` is SIGKILLed during epoch 2 (after the first ``last.ckpt``), resumed with
  ``ckpt_path=<run>/checkpoints/last.ckpt`` in the same run dir, and reaches exactly the test metrics of an
  uninterrupted run with the same seed (``trainer.deterministic=true``, CPU). This holds because the
  checkpoint carries the global RNG states (``PerfusionLitModule.on_save_checkpoint``): Lightning restores
  loops, optimiser and LR schedule but not the RNGs that draw the next epoch's shuffle and crops.
* (b) a process writing a big file through :mod:`stm_dlp.io.atomic`, or a cache entry through
  :class:`stm_dlp.data.cache.StudyCache`, is SIGKILLed mid-write (and just before the rename): the reader
  finds the complete old file (or no entry), never a half one.
* (c) ``predict`` on a study with one corrupted slice: ``mode=best_effort`` writes the other slices exactly
  as for the clean study and names the bad slice and file in ``summary.json``; ``mode=strict`` exits 2.
* (d) SLURM: with SLURM's environment, Lightning selects ``SLURMEnvironment(auto_requeue=True)`` and installs
  its SIGUSR1 (requeue) handler — checked through Lightning's own API, no fake cluster.
"""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from bad_studies import make_good
from conftest import subprocess_env, tiny_phantom
from test_robustness_input import tiny_checkpoint

from stm_dlp.data.cache import StudyCache, load_study
from stm_dlp.data.dicom import read_dicom_study
from stm_dlp.data.phantom import simulate_patient
from stm_dlp.lit import rng_state, set_rng_state

REPO = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------ (a) kill + resume
RUN_ARGS = ["trainer=smoke", "trainer.max_epochs=3", "trainer.limit_train_batches=6", "trainer.deterministic=true",
            "logger=csv", "seed=3"]


def _train(run_dir: Path, cache: Path, *extra: str) -> subprocess.Popen:
    env = subprocess_env(cache, WANDB_MODE="offline")
    return subprocess.Popen([sys.executable, "-m", "stm_dlp.run", *RUN_ARGS, f"hydra.run.dir={run_dir}", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted_run(tmp_path):
    cache = tmp_path / "cache"
    full, killed = tmp_path / "full", tmp_path / "killed"
    ref = _train(full, cache)
    ref_out = ref.communicate(timeout=600)[0]
    assert ref.returncode == 0, ref_out[-3000:]
    victim = _train(killed, cache)
    last = killed / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 600
    while not last.exists() and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert victim.poll() is None, "the run finished before it could be killed"
    time.sleep(0.5)  # into the next epoch's training steps
    victim.send_signal(signal.SIGKILL)
    victim.communicate(timeout=60)
    assert victim.returncode == -signal.SIGKILL
    assert not (killed / "metrics.json").exists()
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    assert ckpt["epoch"] < 2 and "stm_dlp_rng" in ckpt, "last.ckpt should be an early epoch's, with RNG states"
    resumed = _train(killed, cache, f"ckpt_path={last}")
    out = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, out[-3000:]
    a = json.loads((full / "metrics.json").read_text())
    b = json.loads((killed / "metrics.json").read_text())
    assert a["epochs"] == b["epochs"]
    for param, values in a["test"].items():
        for key, value in values.items():
            assert b["test"][param][key] == pytest.approx(value, rel=1e-6, abs=1e-9), (param, key)


def test_checkpoint_rng_state_round_trips_with_weights_only(tmp_path):
    """What makes the resume exact: the RNG states survive ``torch.load(weights_only=True)``."""
    torch.manual_seed(1)
    np.random.seed(2)
    state = rng_state()
    expected = (torch.rand(3), np.random.rand(3), __import__("random").random())
    torch.save({"stm_dlp_rng": state}, tmp_path / "c.ckpt")
    torch.manual_seed(99)
    np.random.seed(99)
    set_rng_state(torch.load(tmp_path / "c.ckpt", weights_only=True)["stm_dlp_rng"])
    again = (torch.rand(3), np.random.rand(3), __import__("random").random())
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1]) and expected[2] == again[2]


# ------------------------------------------------------------------------------ (b) atomic writes
WRITER = textwrap.dedent("""
    import os, sys, time, hashlib
    from stm_dlp.io.atomic import atomic_write
    path, version, size, pause_at_fsync = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
    real_fsync = os.fsync
    def slow_fsync(fd):
        real_fsync(fd)
        print("FSYNCED", flush=True)
        time.sleep(30)   # killed here: the temp file is complete but not yet renamed
    if pause_at_fsync:
        os.fsync = slow_fsync
    chunk = bytes([version]) * (1 << 20)
    body = hashlib.sha256()
    with atomic_write(path) as fh:
        for i in range(size):
            fh.write(chunk)
            body.update(chunk)
            if i == 1:
                print("WRITING", flush=True)
            if not pause_at_fsync:
                time.sleep(0.01)
        fh.write(body.digest())
    print("DONE", flush=True)
""")


def _write_version(path: Path, version: int, size_mb: int, pause_at_fsync: bool) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(version), str(size_mb),
                             "1" if pause_at_fsync else "0"], stdout=subprocess.PIPE, text=True, cwd=REPO)


def _intact_version(path: Path) -> int:
    data = path.read_bytes()
    body, digest = data[:-32], data[-32:]
    assert hashlib.sha256(body).digest() == digest, f"{path} is a half-written file ({len(data)} bytes)"
    return body[0]


@pytest.mark.parametrize("pause_at_fsync", [False, True], ids=["mid-write", "before-rename"])
def test_killed_atomic_writer_leaves_the_old_file(tmp_path, pause_at_fsync):
    target = tmp_path / "maps.bin"
    first = _write_version(target, 1, 8, False)
    assert first.communicate(timeout=120)[0].strip().endswith("DONE")
    assert _intact_version(target) == 1
    writer = _write_version(target, 2, 64, pause_at_fsync)
    marker = "FSYNCED" if pause_at_fsync else "WRITING"
    for line in writer.stdout:
        if line.strip() == marker:
            break
    writer.send_signal(signal.SIGKILL)
    writer.communicate(timeout=60)
    assert writer.returncode == -signal.SIGKILL
    assert _intact_version(target) == 1, "the old file must survive a killed writer"
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "maps.bin"]
    assert all(n.startswith(".maps.bin.") and n.endswith(".tmp") for n in leftovers), leftovers
    ok = _write_version(target, 3, 4, False)
    assert ok.communicate(timeout=120)[0].strip().endswith("DONE")
    assert _intact_version(target) == 3


CACHE_WRITER = textwrap.dedent("""
    import os, sys, time
    import numpy as np
    from stm_dlp.data import cache as K
    from stm_dlp.data.phantom import PhantomConfig, simulate_patient
    root = sys.argv[1]
    study = simulate_patient(PhantomConfig(height=16, width=16, n_slices=2, frames_min=6, frames_max=6), 1)
    study.frames = np.repeat(study.frames, 400, axis=0)      # ~10 MB of frames
    study.times_s = np.repeat(study.times_s, 400, axis=0)
    study.maps = study.mask = None
    real_fsync, calls = os.fsync, []
    def slow_fsync(fd):
        real_fsync(fd)
        calls.append(fd)
        if len(calls) == 2:          # frames.npy and times_s.npy are on disk, the rest is not
            print("HALF", flush=True)
            time.sleep(30)
    os.fsync = slow_fsync
    K.StudyCache(root).get({"k": 1}, lambda: study)
    print("DONE", flush=True)
""")


def test_killed_cache_writer_leaves_no_entry(tmp_path):
    root = tmp_path / "cache"
    writer = subprocess.Popen([sys.executable, "-c", CACHE_WRITER, str(root)], stdout=subprocess.PIPE, text=True,
                              cwd=REPO)
    for line in writer.stdout:
        if line.strip() == "HALF":
            break
    writer.send_signal(signal.SIGKILL)
    writer.communicate(timeout=60)
    assert writer.returncode == -signal.SIGKILL
    cache = StudyCache(root)
    entry = cache.entry({"k": 1})
    assert not entry.exists(), "a killed writer left a visible cache entry"
    assert [p.name.startswith(".") for p in root.iterdir()] == [True]  # only the hidden temp folder
    study = simulate_patient(tiny_phantom(noise_hu=3.0), 1)
    back = cache.get({"k": 1}, lambda: study)  # the next run rebuilds a complete entry
    np.testing.assert_array_equal(back.frames, study.frames)
    np.testing.assert_array_equal(load_study(entry).times_s, study.times_s)


# ------------------------------------------------------------------------------ (c) corrupted slice
def test_predict_keeps_the_good_slices_of_a_study_with_a_corrupted_slice(tmp_path, capsys):
    from stm_dlp.predict import main

    ckpt = tiny_checkpoint(tmp_path / "tiny.ckpt")
    patient = make_good(tmp_path / "study", seed=11)
    assert main([f"ckpt={ckpt}", f"input={patient}", f"output={tmp_path / 'clean'}", "device=cpu"]) == 0
    # slice 1 (along the normal) gets one frame whose HU are all NaN after rescale
    bad = patient / "ctp" / read_dicom_study(patient / "ctp").meta["files"][1][3]
    ds = pydicom.dcmread(bad)
    ds.RescaleIntercept = "NaN"
    ds.save_as(bad, enforce_file_format=True)

    assert main([f"ckpt={ckpt}", f"input={patient}", f"output={tmp_path / 'best'}", "device=cpu"]) == 0
    assert "1 slices failed" in capsys.readouterr().out
    summary = json.loads((tmp_path / "best" / "summary.json").read_text())
    (failed,) = summary["failed_slices"]
    assert failed["slice"] == 1 and bad.name in failed["error"] and "NaN or inf" in failed["error"]
    assert [Path(f["file"]).name for f in failed["frames"]] == [bad.name]
    for name in ("cbf", "cbv", "tmax", "mtt"):
        clean = np.asarray(nib.load(tmp_path / "clean" / f"{name}.nii.gz").dataobj)
        best = np.asarray(nib.load(tmp_path / "best" / f"{name}.nii.gz").dataobj)
        # the good slice, as without the fault (batched alone instead of in pairs: float rounding only)
        np.testing.assert_allclose(best[:, :, 0], clean[:, :, 0], rtol=1e-5, atol=1e-5)
        assert not best[:, :, 1].any()  # the bad slice: zeros, reported in summary.json

    with pytest.raises(SystemExit) as info:
        main([f"ckpt={ckpt}", f"input={patient}", f"output={tmp_path / 'strict'}", "mode=strict"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and bad.name in err and "NaN or inf" in err
    assert not (tmp_path / "strict").exists()


# ------------------------------------------------------------------------------ (d) SLURM
SLURM_ENV = {"SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_JOB_NAME": "stm-dlp-train",
             "SLURM_JOB_ID": "4242", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
             "SLURM_NODELIST": "node001"}


def test_slurm_environment_requeues_on_sigusr1(monkeypatch, tmp_path):
    import lightning as L
    from lightning.fabric.plugins.environments import SLURMEnvironment

    for key, value in SLURM_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    assert SLURMEnvironment.detect()
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, default_root_dir=str(tmp_path))
    env = trainer._accelerator_connector.cluster_environment
    assert isinstance(env, SLURMEnvironment) and env.auto_requeue and env.requeue_signal == signal.SIGUSR1
    assert env.job_id() == 4242
    before = signal.getsignal(signal.SIGUSR1)
    connector = trainer._signal_connector
    connector.register_signal_handlers()
    try:
        handler = signal.getsignal(signal.SIGUSR1)
        assert handler is not before
        names = [getattr(h, "__name__", "") for h in getattr(handler, "signal_handlers", [handler])]
        assert "_slurm_sigusr_handler_fn" in names  # saves hpc_ckpt_<n>.ckpt, then `scontrol requeue`
        term = signal.getsignal(signal.SIGTERM)
        names = [getattr(h, "__name__", "") for h in getattr(term, "signal_handlers", [term])]
        assert {"_sigterm_notifier_fn", "_sigterm_handler_fn"} <= set(names)  # noted, loops stop; not killed
    finally:
        connector.teardown()
    assert signal.getsignal(signal.SIGUSR1) == before
    # an interactive allocation (job name bash) is not treated as a batch job: no requeue handler
    monkeypatch.setenv("SLURM_JOB_NAME", "bash")
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, default_root_dir=str(tmp_path))
    assert not isinstance(trainer._accelerator_connector.cluster_environment, SLURMEnvironment)
