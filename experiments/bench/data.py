"""Data rates: the cached loader vs the training step's consumption (``experiments/bench_loader.py``), the
DICOM parse rate on first load (a synthesized cohort, ``stm_dlp.synth``), and the deconvolution benchmark
(``experiments/bench_deconv.py``, our oSVD vs the peer ``osipy``), whose output is included as it reports it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def run_loader(profile, cache_dir: Path, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Loader slices/s per worker count vs LSTM training slices/s on the same batches (bench_loader)."""
    from experiments.bench_loader import loader_rate, train_rate
    from stm_dlp.data.corrupt import GaussianNoise
    from stm_dlp.data.datamodule import CTPDataModule

    t0 = time.perf_counter()
    dm = CTPDataModule(n_patients=profile.n_patients,
                       phantom=dict(height=profile.height, width=profile.height, n_slices=profile.n_slices,
                                    frames_min=profile.frames_min, frames_max=profile.frames_max),
                       crop_size=profile.crop_size, batch_size=profile.batch_size,
                       augment=[GaussianNoise(4.0, p=0.5)], cache_dir=str(cache_dir))
    dm.setup("fit")
    build_s = time.perf_counter() - t0
    rates = {str(w): loader_rate(dm, w, passes=profile.loader_passes) for w in profile.loader_workers}
    train = train_rate(dm, steps=profile.train_rate_steps)
    out = {"cache_open_s": round(build_s, 2), "loader_slices_per_s": rates, "train_slices_per_s": train,
           "loader_over_training": {w: r / train for w, r in rates.items()},
           "batch": profile.batch_size, "crop": profile.crop_size,
           "frames": f"{profile.frames_min}-{profile.frames_max}", "seconds": round(time.perf_counter() - t0, 1)}
    log(f"  loader: {out['loader_over_training']}")
    return out


def run_dicom(profile, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Write a small phantom cohort as DICOM, then time :func:`read_dicom_study` on each study (first load)."""
    from stm_dlp.data.dicom import read_dicom_study
    from stm_dlp.data.phantom import PhantomConfig
    from stm_dlp.synth import synthesize_cohort

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="stm_dlp_bench_dicom_") as tmp:
        cfg = PhantomConfig(height=profile.dicom_size, width=profile.dicom_size, n_slices=profile.dicom_slices,
                            frames_min=profile.dicom_frames, frames_max=profile.dicom_frames)
        folders = synthesize_cohort(Path(tmp) / "cohort", profile.dicom_patients, cfg, progress=False)
        write_s = time.perf_counter() - t0
        n_files, n_bytes, read_s, slices, frames = 0, 0, 0.0, 0, 0
        for folder in folders:
            files = [p for p in (folder / "ctp").rglob("*") if p.is_file()]
            n_files += len(files)
            n_bytes += sum(p.stat().st_size for p in files)
            t1 = time.perf_counter()
            study = read_dicom_study(folder / "ctp")
            read_s += time.perf_counter() - t1
            slices += study.n_slices
            frames += study.n_slices * study.n_frames
    out = {"patients": len(folders), "size": profile.dicom_size, "slices_per_study": profile.dicom_slices,
           "frames": profile.dicom_frames, "files": n_files, "mbytes": n_bytes / 2**20, "read_s": read_s,
           "files_per_s": n_files / read_s, "mb_per_s": n_bytes / 2**20 / read_s, "slices_per_s": slices / read_s,
           "s_per_study": read_s / len(folders), "write_s": round(write_s, 2),
           "seconds": round(time.perf_counter() - t0, 1)}
    log(f"  dicom: {out['files_per_s']:.0f} files/s, {out['mb_per_s']:.1f} MB/s")
    return out


def run_deconv(profile, out_dir: Path, log: Callable[[str], None] = print) -> dict[str, Any]:
    """``python -m experiments.bench_deconv`` (it owns the osipy comparison and its throwaway venv).

    Its JSON is read when it writes one (``--out FILE`` when its ``--help`` offers it, else the last JSON
    object on stdout); its stdout tail is kept either way.
    """
    if not (REPO / "experiments" / "bench_deconv.py").is_file():
        return {"available": False, "note": "experiments/bench_deconv.py is not in this checkout"}
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    base = [sys.executable, "-m", "experiments.bench_deconv"]
    try:
        helptext = subprocess.run([*base, "--help"], cwd=REPO, env=env, capture_output=True, text=True,
                                  timeout=120).stdout
    except subprocess.TimeoutExpired:
        helptext = ""
    args = ["--profile", profile.deconv_profile] if "--profile" in helptext else []
    json_path = out_dir / "bench_deconv.json"
    if "--out" in helptext:
        args += ["--out", str(json_path)]
    cmd = [*base, *args]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=profile.deconv_timeout_s)
        rc, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as exc:
        rc, stdout, stderr = -1, (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) \
            else (exc.stdout or ""), f"timed out after {profile.deconv_timeout_s} s"
    result: dict[str, Any] = {"available": True, "command": "python -m experiments.bench_deconv " + " ".join(args),
                              "returncode": rc, "seconds": round(time.perf_counter() - t0, 1),
                              "stdout_tail": stdout[-4000:], "stderr_tail": (stderr or "")[-1500:]}
    data = None
    if json_path.is_file():
        try:
            data = json.loads(json_path.read_text())
        except json.JSONDecodeError:
            data = None
    if data is None:
        text = stdout.strip()
        start = text.rfind("\n{")
        for candidate in (text, text[start + 1:] if start >= 0 else ""):
            try:
                data = json.loads(candidate)
                break
            except json.JSONDecodeError:
                continue
    result["json"] = data
    log(f"  deconv: exit {rc} in {result['seconds']} s")
    return result
