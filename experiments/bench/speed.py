"""Speed and memory: training throughput, inference per study, LSTM packed vs causal gather, profiler top ops,
each against a roofline (FLOPs per slice vs the machine's measured matmul peak).

Every measurement that reports memory runs in its own subprocess (``python -m experiments.bench.speed
'<json spec>'``) so that its peak resident memory (``ru_maxrss``) or ``torch.cuda.max_memory_allocated``
belongs to that configuration alone.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
ENCODERS = ("cnn", "mlp_mixer", "lstm")
MODELS = (*ENCODERS, "unitobrain")
#: Size at which FLOPs are counted; every op of the models is per pixel or a convolution, so FLOPs scale
#: exactly with H×W (the sizes used are multiples of the U-Net's padding multiple).
FLOP_COUNT_SIZE = 32


# --------------------------------------------------------------------------------- machine peak
def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def matmul_peak(n: int, device: str = "cpu", dtype: torch.dtype = torch.float32, reps: int = 5) -> float:
    """Measured GFLOP/s of an ``n × n`` matmul (the machine's practical compute peak)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2.0 * n**3 * reps / (time.perf_counter() - t0) / 1e9


def copy_bandwidth(mbytes: int = 256, device: str = "cpu", reps: int = 5) -> float:
    """Measured GB/s of a large tensor copy (bytes read + written)."""
    n = mbytes * 2**20 // 4
    a = torch.empty(n, device=device)
    a.uniform_()
    b = torch.empty_like(a)
    b.copy_(a)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        b.copy_(a)
    _sync(device)
    return 2.0 * a.numel() * 4 * reps / (time.perf_counter() - t0) / 1e9


def machine_peaks(n: int, devices: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {"threads": torch.get_num_threads()}
    for dev in devices:
        if dev == "cuda" and not torch.cuda.is_available():
            continue
        out[dev] = {"matmul_fp32_gflops": round(matmul_peak(n, dev), 1),
                    "copy_gbps": round(copy_bandwidth(256 if dev == "cpu" else 2048, dev), 1)}
        if dev == "cuda":
            out[dev]["matmul_bf16_gflops"] = round(matmul_peak(n, dev, torch.bfloat16), 1)
            out[dev]["name"] = torch.cuda.get_device_name()
    return out


# --------------------------------------------------------------------------------- models and data
def scale_widths(scale: str) -> dict[str, Any]:
    from experiments.bench.profiles import scale_values

    return scale_values(scale)


def build_model(name: str, scale: str) -> torch.nn.Module:
    """The model as ``python -m stm_dlp.run`` builds it (conf/model/*.yaml, conf/scale/<scale>.yaml)."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    s = scale_widths(scale)
    if name == "unitobrain":
        cfg = OmegaConf.load(REPO / "conf" / "model" / "unitobrain.yaml").model
    else:
        cfg = OmegaConf.load(REPO / "conf" / "model" / "stm_dlp.yaml").model
        cfg.encoder = name
        cfg.temporal_hidden, cfg.spatial_channels, cfg.mpp_hidden = (s["temporal_hidden"], s["spatial_channels"],
                                                                    s["mpp_hidden"])
    return instantiate(cfg)


def phantom_batch(batch: int, size: int, frames: int, seed: int = 0):
    """A padded batch of ``batch`` phantom slices of ``size``² and ``frames`` frames (one simulated
    slice repeated: timing does not depend on content), with its arterial reference and deconvolution prior
    (models that do not read them ignore them)."""
    from stm_dlp.data.context import attach_arterial
    from stm_dlp.data.phantom import PhantomConfig, simulate_patient
    from stm_dlp.types import collate_slices

    study = simulate_patient(PhantomConfig(height=size, width=size, n_slices=1, frames_min=frames,
                                           frames_max=frames), seed, "bench")
    return collate_slices([attach_arterial(study.slice_sample(0), prior=True)] * batch), study


def lstm_flops(model: torch.nn.Module, n_pixels: int, t: int, train: bool) -> float:
    """Analytic FLOPs of the model's LSTMs (torch's FLOP counter does not count fused RNN kernels):
    per layer and time step 2·4h·(in+h) multiply-adds per sequence; backward ≈ 2× forward."""
    total = 0.0
    for m in model.modules():
        if isinstance(m, torch.nn.LSTM):
            for layer in range(m.num_layers):
                inp = m.input_size if layer == 0 else m.hidden_size
                total += 2.0 * 4 * m.hidden_size * (inp + m.hidden_size) * n_pixels * t
    return total * (3.0 if train else 1.0)


def count_flops(model: torch.nn.Module, frames: int, size: int, train: bool) -> float:
    """FLOPs per slice at ``size``² (counted at :data:`FLOP_COUNT_SIZE`², scaled by the pixel count)."""
    from torch.utils.flop_counter import FlopCounterMode

    from stm_dlp.lit import PerfusionLitModule

    batch, _ = phantom_batch(1, FLOP_COUNT_SIZE, frames)
    dev = next(model.parameters()).device
    batch = batch.to(dev)
    lit = PerfusionLitModule(model, target_scale=torch.ones(3)).to(dev)
    with FlopCounterMode(display=False) as fc:
        if train:
            loss, _ = lit._loss(lit(batch), batch)
            loss.backward()
        else:
            with torch.no_grad():
                lit(batch)
    model.zero_grad(set_to_none=True)
    flops = fc.get_total_flops() + lstm_flops(model, FLOP_COUNT_SIZE**2, frames, train)
    return float(flops) * (size / FLOP_COUNT_SIZE) ** 2


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _variant_context(variant: str, device: str):
    stack = contextlib.ExitStack()
    if "bf16" in variant:
        stack.enter_context(torch.autocast(device_type="cuda" if device.startswith("cuda") else "cpu",
                                           dtype=torch.bfloat16))
    if "cudnn_off" in variant:
        stack.enter_context(torch.backends.cudnn.flags(enabled=False))
    return stack


# --------------------------------------------------------------------------------- worker measurements
def measure_train(spec: dict[str, Any]) -> dict[str, Any]:
    from stm_dlp.lit import PerfusionLitModule

    device, variant = spec.get("device", "cpu"), spec.get("variant", "fp32")
    torch.manual_seed(0)
    batch, _ = phantom_batch(spec["batch"], spec["size"], spec["frames"])
    model = build_model(spec["model"], spec["scale"])
    flops = count_flops(model, spec["frames"], spec["size"], train=True)
    model = model.to(device)
    batch = batch.to(device)
    if "channels_last" in variant:
        model = model.to(memory_format=torch.channels_last)
        batch.frames = batch.frames.contiguous(memory_format=torch.channels_last)
    lit = PerfusionLitModule(model, target_scale=torch.ones(3)).to(device)
    step_model = torch.compile(lit) if "compile" in variant else lit
    opt = torch.optim.Adam(lit.parameters(), lr=1e-4)
    rss0 = _rss_mb()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()

    def step() -> None:
        with _variant_context(variant, device):
            loss, _ = lit._loss(step_model(batch), batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(spec.get("warmup", 1)):
        step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(spec["steps"]):
        step()
    _sync(device)
    dt = (time.perf_counter() - t0) / spec["steps"]
    out = {"step_s": dt, "slices_per_s": spec["batch"] / dt, "flops_per_slice": flops,
           "achieved_gflops": flops * spec["batch"] / dt / 1e9, "peak_rss_mb": _maxrss_mb(),
           "peak_rss_over_start_mb": max(0.0, _maxrss_mb() - rss0)}
    if device.startswith("cuda"):
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def measure_infer(spec: dict[str, Any]) -> dict[str, Any]:
    """Seconds per study (``study_slices`` slices of ``size``² × ``frames``) for the model and for oSVD."""
    from dataclasses import replace

    from stm_dlp.calc_eval import CalcBaseline
    from stm_dlp.predict import predict_study

    device = spec.get("device", "cpu")
    torch.manual_seed(0)
    _, one = phantom_batch(1, spec["size"], spec["frames"])
    s = spec["slices"]
    study = replace(one, frames=np.repeat(one.frames, s, 0), times_s=np.repeat(one.times_s, s, 0),
                    maps=np.repeat(one.maps, s, 0), mask=np.repeat(one.mask, s, 0))
    model = build_model(spec["model"], spec["scale"])
    flops = count_flops(model, spec["frames"], spec["size"], train=False)
    model = model.to(device).eval()
    scale = torch.ones(3, device=device)
    warm = replace(study, frames=study.frames[:1], times_s=study.times_s[:1], maps=study.maps[:1],
                   mask=study.mask[:1])
    predict_study(model, scale, warm, spec.get("batch", 4), device)
    rss0 = _rss_mb()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    _sync(device)
    t0 = time.perf_counter()
    predict_study(model, scale, study, spec.get("batch", 4), device)
    _sync(device)
    dt = time.perf_counter() - t0
    out = {"model_s": dt, "model_s_per_study": dt * spec["study_slices"] / s, "flops_per_slice": flops,
           "achieved_gflops": flops * s / dt / 1e9, "peak_rss_mb": _maxrss_mb(),
           "peak_rss_over_start_mb": max(0.0, _maxrss_mb() - rss0)}
    # what `stm_dlp.predict` does with a default checkpoint: resample to its pixel size, predict, restore
    from omegaconf import OmegaConf

    from stm_dlp.predict import predict_on_scan_grid

    spacing = OmegaConf.load(REPO / "conf" / "scale" / f"{spec['scale']}.yaml").get("target_spacing_mm")
    _sync(device)
    t0 = time.perf_counter()
    predict_on_scan_grid(model, scale, study, spacing, spec.get("batch", 4), device)
    _sync(device)
    out.update(default_path_s_per_study=(time.perf_counter() - t0) * spec["study_slices"] / s,
               default_path_spacing_mm=spacing)
    if device.startswith("cuda"):
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    # oSVD on the whole study (cheap enough; a per-study AIF search would be overcounted by extrapolation)
    n = spec["study_slices"]
    full = replace(one, frames=np.repeat(one.frames, n, 0), times_s=np.repeat(one.times_s, n, 0),
                   maps=np.repeat(one.maps, n, 0), mask=np.repeat(one.mask, n, 0))
    calc = CalcBaseline(method="osvd", aif="auto", device=device)
    try:
        calc.maps(warm)
        _sync(device)
        t0 = time.perf_counter()
        calc.maps(full)
        _sync(device)
        out.update(osvd_s_per_study=time.perf_counter() - t0)
    except (ImportError, ValueError) as exc:
        out["osvd_error"] = str(exc).splitlines()[0][:200]
    return out


def _lstm_gather(enc, x, lengths):
    out, _ = enc.lstm(x)
    idx = (lengths.to(x.device, torch.int64) - 1).clamp(min=0)
    return enc.head(out[torch.arange(out.shape[0], device=x.device), idx])


def _lstm_packed(enc, x, lengths):
    from torch.nn.utils.rnn import pack_padded_sequence

    packed = pack_padded_sequence(x, lengths.to("cpu", torch.int64), batch_first=True, enforce_sorted=False)
    _, (h_n, _) = enc.lstm(packed)
    return enc.head(h_n[-1])


def measure_lstm_paths(spec: dict[str, Any]) -> dict[str, Any]:
    """The LSTM temporal encoder's two paths (packed by length vs causal run + gather at the last valid
    frame) on the same ``N × T`` variable-length sequences: forward + backward time and agreement."""
    from stm_dlp.models.temporal import LSTMTemporalEncoder

    device = spec.get("device", "cpu")
    s = scale_widths(spec["scale"])
    torch.manual_seed(0)
    enc = LSTMTemporalEncoder(in_features=s["spatial_channels"] + 1, hidden=s["temporal_hidden"],
                               pool="last").to(device)  # the two paths compared read the final state
    n, t = spec["n"], spec["t"]
    x = torch.randn(n, t, s["spatial_channels"] + 1, device=device)
    lengths = torch.randint(max(1, t // 2), t + 1, (n,), device=device)
    out: dict[str, Any] = {"n_sequences": n, "t": t}
    ref = None
    for name, fn in (("gather", _lstm_gather), ("packed", _lstm_packed)):
        times = []
        for _ in range(spec.get("reps", 2) + 1):
            enc.zero_grad(set_to_none=True)
            _sync(device)
            t0 = time.perf_counter()
            y = fn(enc, x, lengths)
            y.sum().backward()
            _sync(device)
            times.append(time.perf_counter() - t0)
        out[f"{name}_s"] = float(np.median(times[1:]))
        with torch.no_grad():
            y = fn(enc, x, lengths)
            ref = y if ref is None else ref
            out[f"{name}_max_abs_diff_vs_gather"] = float((y - ref).abs().max())
            out[f"module_matches_{name}"] = bool(torch.allclose(enc(x, lengths), y, atol=1e-5))
    out["packed_over_gather"] = out["packed_s"] / out["gather_s"]
    return out


def _top_ops(prof, device: str, n: int = 10) -> list[dict[str, Any]]:
    key = "self_cpu_time_total"
    if device.startswith("cuda"):
        first = next(iter(prof.key_averages()), None)
        key = "self_device_time_total" if first is not None and hasattr(first, "self_device_time_total") \
            else "self_cuda_time_total"
    rows = []
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key, 0.0) or 0.0, reverse=True)
    total = sum((getattr(e, key, 0.0) or 0.0) for e in prof.key_averages()) or 1.0
    for e in events[:n]:
        rows.append({"op": e.key, "self_ms": (getattr(e, key, 0.0) or 0.0) / 1e3,
                     "share": (getattr(e, key, 0.0) or 0.0) / total, "calls": e.count})
    return rows


def measure_profile(spec: dict[str, Any]) -> dict[str, Any]:
    """torch.profiler top ops of one LSTM training step and one inference pass."""
    from torch.profiler import ProfilerActivity, profile

    from stm_dlp.lit import PerfusionLitModule

    device = spec.get("device", "cpu")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    model = build_model("lstm", spec["scale"]).to(device)
    lit = PerfusionLitModule(model, target_scale=torch.ones(3)).to(device)
    opt = torch.optim.Adam(lit.parameters(), lr=1e-4)
    batch, _ = phantom_batch(spec["batch"], spec["crop"], spec["frames"])
    batch = batch.to(device)

    def step() -> None:
        loss, _ = lit._loss(lit(batch), batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()
    _sync(device)
    with profile(activities=activities) as prof:
        step()
        _sync(device)
    train_rows = _top_ops(prof, device)
    ib, _ = phantom_batch(1, spec["infer_size"], spec["frames"])
    ib = ib.to(device)
    with torch.inference_mode():
        lit(ib)
        _sync(device)
        with profile(activities=activities) as prof:
            lit(ib)
            _sync(device)
    return {"train_step": train_rows, "inference": _top_ops(prof, device),
            "train_shape": f"{spec['batch']}×{spec['frames']}×{spec['crop']}²",
            "infer_shape": f"1×{spec['frames']}×{spec['infer_size']}²"}


KINDS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "train": measure_train, "infer": measure_infer, "lstm_paths": measure_lstm_paths, "profile": measure_profile,
}


def run_worker(spec: dict[str, Any], timeout_s: int = 1800, isolate: bool = True) -> dict[str, Any]:
    """Run one measurement in a fresh subprocess (``isolate``; else in this process, whose peak memory then
    covers every earlier measurement too); returns its result (or ``{"error": ...}``)."""
    if not isolate:
        t0 = time.perf_counter()
        try:
            result = KINDS[spec["kind"]](spec)
        except Exception as exc:  # noqa: BLE001 - reported in the table
            return {"spec": spec, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:250]}"}
        return {**result, "spec": spec, "wall_s": round(time.perf_counter() - t0, 1), "in_process": True}
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "experiments.bench.speed", json.dumps(spec)], cwd=REPO,
                              env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"spec": spec, "error": f"timed out after {timeout_s} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"spec": spec, "error": (proc.stderr or proc.stdout).strip().splitlines()[-1:][0][:300]
                if (proc.stderr or proc.stdout).strip() else f"exit {proc.returncode}"}
    result = json.loads(lines[-1])
    result["spec"] = spec
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    return result


# --------------------------------------------------------------------------------- the section
def run_speed(profile, log: Callable[[str], None] = print) -> dict[str, Any]:
    t_section = time.perf_counter()
    devices = tuple(d for d in profile.devices if d == "cpu" or torch.cuda.is_available())
    res: dict[str, Any] = {"peaks": machine_peaks(profile.matmul_n, devices), "train": [], "infer": [],
                           "lstm_paths": [], "devices": list(devices), "scale": profile.speed_scale}
    log(f"  peaks: {res['peaks']}")
    for dev in devices:
        variants = ("fp32",) if dev == "cpu" else profile.speed_variants
        for size in profile.speed_sizes:
            for model in MODELS:
                for variant in variants:
                    if variant == "cudnn_off" and model != "lstm":
                        continue
                    spec = {"kind": "train", "model": model, "size": size, "frames": profile.speed_frames,
                            "batch": profile.speed_batch, "steps": profile.speed_steps,
                            "warmup": max(2, profile.speed_warmup) if "compile" in variant else profile.speed_warmup,
                            "device": dev, "variant": variant, "scale": profile.speed_scale}
                    r = run_worker(spec, isolate=profile.speed_isolate)
                    res["train"].append(r)
                    log(f"  train {dev} {variant} {model} {size}²: "
                        + (f"{r['slices_per_s']:.3g} slices/s" if "error" not in r else r["error"]))
        spec = {"kind": "infer", "model": "lstm", "size": profile.infer_size, "frames": profile.infer_frames,
                "slices": profile.infer_slices, "study_slices": 16, "device": dev, "scale": profile.speed_scale}
        r = run_worker(spec, isolate=profile.speed_isolate)
        res["infer"].append(r)
        log(f"  infer {dev}: " + (f"{r['model_s_per_study']:.3g} s/study" if "error" not in r else r["error"]))
        spec = {"kind": "lstm_paths", "n": profile.lstm_compare_n, "t": profile.lstm_compare_t, "device": dev,
                "scale": "laptop"}
        r = run_worker(spec, isolate=profile.speed_isolate)
        res["lstm_paths"].append(r)
        log(f"  lstm paths {dev}: " + (f"packed/gather {r['packed_over_gather']:.3g}" if "error" not in r
                                       else r["error"]))
    res["seconds"] = round(time.perf_counter() - t_section, 1)
    return res


def run_profiling(profile, log: Callable[[str], None] = print) -> dict[str, Any]:
    t0 = time.perf_counter()
    out = {}
    for dev in (d for d in profile.devices if d == "cpu" or torch.cuda.is_available()):
        out[dev] = run_worker({"kind": "profile", "device": dev, "scale": "laptop" if dev == "cpu"
                               else profile.speed_scale, "batch": profile.profile_batch,
                               "crop": profile.profile_crop, "frames": profile.profile_frames,
                               "infer_size": profile.profile_infer_size}, isolate=profile.speed_isolate)
        log(f"  profile {dev}: {'ok' if 'error' not in out[dev] else out[dev]['error']}")
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def _worker_main(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    result = KINDS[spec["kind"]](spec)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
