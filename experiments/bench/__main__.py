"""``python -m experiments.bench --profile smoke|cpu|gpu [--out DIR]`` — see :mod:`experiments.bench`."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from experiments.bench.profiles import PROFILES

REPO = Path(__file__).resolve().parents[2]
SECTION_NAMES = ("accuracy", "speed", "data", "deconv", "profile")
MARKER = ".stm_dlp_bench"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    import torch

    mem = ""
    try:
        lines = Path("/proc/meminfo").read_text().splitlines()
        kb = int(next(ln for ln in lines if ln.startswith("MemTotal")).split()[1])
        mem = f", {kb / 2**20:.0f} GiB RAM"
    except (OSError, StopIteration, ValueError):
        pass
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"
    load = ""
    if hasattr(os, "getloadavg"):
        load = f", load average at start {os.getloadavg()[0]:.1f} (shared machine)"
    return f"{_cpu_name()}, {os.cpu_count()} CPUs{mem}{gpu}, {platform.system()} {platform.release()}{load}"


def software() -> str:
    import lightning
    import torch

    return f"Python {platform.python_version()}, torch {torch.__version__}, lightning {lightning.__version__}"


def commit() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return rev + (" (working tree has uncommitted changes)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "?"


def left_out(profile, results: dict[str, Any]) -> list[str]:
    import torch

    out = []
    if profile.name != "gpu" or not torch.cuda.is_available():
        out.append("GPU figures (bf16 autocast, channels_last, torch.compile on/off, cuDNN LSTM, GPU inference): "
                   "this run had no GPU; they come from `python -m experiments.bench --profile gpu`")
    out.append("Robustness conditions beyond the issue's list (structured noise, misalignment) are not tabulated "
               "here; `python -m stm_dlp.run -m experiment=robustness` covers them")
    out.append("One training seed per model (no seed spread); the paper-scale 200-epoch training is the gpu profile's")
    if len(profile.cross_family) > 1:
        out.append("Cross-family: only the default model (STM-DLP LSTM) is trained on the second family, and it is "
                   "tested under the regular, noise, heavy-noise and motion conditions only")
    if profile.name != "gpu":
        out.append("py-spy sampling (torch.profiler only); multi-GPU / DDP scaling")
    for section, err in results.get("errors", {}).items():
        out.append(f"section `{section}` failed in this run: {err.splitlines()[-1][:200]}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.bench", description=__doc__.splitlines()[0])
    ap.add_argument("--profile", choices=sorted(PROFILES), default="cpu")
    ap.add_argument("--out", default=None, help="work dir for runs and results.json (default outputs/bench/<profile>)")
    ap.add_argument("--md", default=None, help="report path (default: BENCHMARKS.md for cpu, BENCHMARKS_gpu.md "
                                                "for gpu, OUT/BENCHMARKS.md for smoke)")
    ap.add_argument("--figures", default=None, help="PNG dir (default docs/bench[/gpu]; OUT/figures for smoke)")
    ap.add_argument("--skip", nargs="*", default=[], choices=SECTION_NAMES)
    ap.add_argument("--resume", action="store_true", help="reuse finished training runs in OUT/runs")
    ap.add_argument("--report-only", action="store_true", help="rewrite the report from OUT/results.json")
    args = ap.parse_args(argv)
    profile = PROFILES[args.profile]
    out = Path(args.out or REPO / "outputs" / "bench" / profile.name).resolve()
    md = Path(args.md) if args.md else (out / "BENCHMARKS.md" if profile.name == "smoke" else
                                        REPO / ("BENCHMARKS.md" if profile.name == "cpu" else "BENCHMARKS_gpu.md"))
    default_figures = REPO / "docs" / "bench" / ("" if profile.name == "cpu" else "gpu")
    figures = Path(args.figures) if args.figures else (out / "figures" if profile.name == "smoke" else
                                                       default_figures)
    md, figures = md.resolve(), figures.resolve()
    from experiments.bench.report import render

    results_path = out / "results.json"
    if args.report_only:
        results = json.loads(results_path.read_text())
        md.write_text(render(results, md, figures))
        print(f"wrote {md}")
        return 0

    out.mkdir(parents=True, exist_ok=True)
    if (out / "runs").exists() and not args.resume:
        if not (out / MARKER).exists():
            print(f"error: {out}/runs exists and is not a benchmark work dir; choose another --out", file=sys.stderr)
            return 2
        shutil.rmtree(out / "runs")
    (out / MARKER).write_text(profile.name)
    os.environ.setdefault("STM_DLP_CACHE", str(out / "cache"))
    os.environ.setdefault("WANDB_MODE", "disabled")
    log_file = open(out / "bench.log", "a")

    def log(msg: str) -> None:
        line = f"[{datetime.now().strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        log_file.write(line + "\n")
        log_file.flush()

    command = "python -m experiments.bench " + " ".join(shlex.quote(a) for a in (argv if argv is not None
                                                                                   else sys.argv[1:]))
    results: dict[str, Any] = {"meta": {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine(),
        "software": software(), "commit": commit(), "command": command, "profile": profile.name,
        "profile_settings": profile.as_dict(), "notes": list(profile.notes), "section_seconds": {}},
        "errors": {}}
    t_start = time.perf_counter()

    def save() -> None:
        results["meta"]["total_seconds"] = round(time.perf_counter() - t_start, 1)
        results["meta"]["left_out"] = left_out(profile, results)
        tmp = results_path.with_name(".results.json.tmp")
        tmp.write_text(json.dumps(results, indent=2, default=str))
        tmp.replace(results_path)
        md.parent.mkdir(parents=True, exist_ok=True)
        md.write_text(render(results, md, figures))

    def section(name: str, fn) -> None:
        if name in args.skip:
            log(f"{name}: skipped")
            return
        log(f"{name}: start")
        t0 = time.perf_counter()
        try:
            results[name] = fn()
        except Exception:  # noqa: BLE001 - a failed section is reported, the others still run
            results["errors"][name] = traceback.format_exc()
            log(f"{name}: FAILED\n{results['errors'][name]}")
        results["meta"]["section_seconds"][name] = round(time.perf_counter() - t0, 1)
        log(f"{name}: {results['meta']['section_seconds'][name]:.0f} s")
        save()

    from experiments.bench import accuracy, data, speed

    section("accuracy", lambda: accuracy.run_accuracy(profile, out, figures, log))
    section("speed", lambda: speed.run_speed(profile, log))
    section("data", lambda: {"loader": data.run_loader(profile, Path(os.environ["STM_DLP_CACHE"]), log),
                             "dicom": data.run_dicom(profile, log)})
    section("deconv", lambda: data.run_deconv(profile, out, log))
    section("profile", lambda: speed.run_profiling(profile, log))
    save()
    log(f"done in {results['meta']['total_seconds'] / 60:.1f} min: {md}")
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
