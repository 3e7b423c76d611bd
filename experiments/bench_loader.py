"""Data-loading throughput: cached-loader slices/s vs the training step's consumption.

    python -m experiments.bench_loader [--patients 16] [--size 64] [--workers 0 1 2] [--out FILE.json]

Builds (or reuses) the phantom cache, then times full passes of the training DataLoader (random
crops + augmentation, variable-length collation) for each worker count, and one training step of
the default model on the same batches, so the ratio "loader slices/s ÷ training slices/s" says how
far the loader is from being the bottleneck (it must be ≫ 1).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from datetime import date

import torch

from stm_dlp.data.corrupt import GaussianNoise
from stm_dlp.data.datamodule import CTPDataModule
from stm_dlp.lit import PerfusionLitModule
from stm_dlp.models import STMDLP


def loader_rate(dm: CTPDataModule, workers: int, passes: int = 2) -> float:
    dm.num_workers = workers
    loader = dm.train_dataloader()
    n, t0 = 0, None
    for p in range(passes + 1):
        if p == 1:  # first pass warms up workers and the page cache
            n, t0 = 0, time.perf_counter()
        for batch in loader:
            n += batch.batch_size
    return n / (time.perf_counter() - t0)


def train_rate(dm: CTPDataModule, steps: int = 4) -> float:
    model = STMDLP(encoder="lstm", spatial_channels=8, temporal_hidden=32, mpp_hidden=32)
    lit = PerfusionLitModule(model, target_scale=dm.target_scale())
    opt = torch.optim.Adam(lit.parameters(), lr=5e-4)
    dm.num_workers = 0
    batches = [b for _, b in zip(range(steps + 1), dm.train_dataloader())]
    n, t0 = 0, None
    for i, b in enumerate(batches):
        if i == 1:
            n, t0 = 0, time.perf_counter()
        loss, _ = lit._loss(lit(b), b)
        opt.zero_grad()
        loss.backward()
        opt.step()
        n += b.batch_size
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patients", type=int, default=16)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--crop", type=int, default=24)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    cache = os.environ.get("STM_DLP_CACHE") or tempfile.mkdtemp(prefix="stm_dlp_bench_cache_")
    dm = CTPDataModule(n_patients=args.patients, phantom=dict(height=args.size, width=args.size),
                       crop_size=args.crop, batch_size=4, augment=[GaussianNoise(4.0, p=0.5)],
                       cache_dir=cache)
    t0 = time.perf_counter()
    dm.setup("fit")
    build_s = time.perf_counter() - t0
    rates = {w: loader_rate(dm, w) for w in args.workers}
    train = train_rate(dm)
    result = {
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, torch {torch.__version__}",
        "patients": args.patients, "size": args.size, "crop": args.crop,
        "cache_build_or_open_s": round(build_s, 2),
        "loader_slices_per_s": {str(w): round(r, 1) for w, r in rates.items()},
        "train_step_slices_per_s_lstm_cpu": round(train, 2),
        "loader_over_training": {str(w): round(r / train, 1) for w, r in rates.items()},
    }
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
