"""Cost of the training augmentations: milliseconds per slice for each transform and the default list.

    python -m experiments.bench_augment [--size 64] [--frames 50] [--repeats 50] [--out FILE.json]

The DataLoader runs the augmentation per sample on the CPU (2 cores on a laptop), so every transform
must stay cheap. Times one ``(frames, size, size)`` slice with irregular 1-2.5 s framing through each
transform of ``data.augment`` in ``conf/data/_common.yaml`` forced on (``p=1``), the whole list forced
on (the worst case) and the list with its configured probabilities (the average). Run it with
``OMP_NUM_THREADS=1`` to see the per-worker cost.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time
from pathlib import Path

import numpy as np
from hydra.utils import instantiate
from omegaconf import OmegaConf

from stm_dlp.data.corrupt import Compose

COMMON = Path(__file__).resolve().parents[1] / "conf" / "data" / "_common.yaml"


def default_augment() -> list:
    """The transforms of ``data.augment`` (``conf/data/_common.yaml``), instantiated."""
    return list(instantiate(OmegaConf.load(COMMON).augment, _convert_="all"))


def ms_per_call(transform, frames: np.ndarray, times: np.ndarray, repeats: int, seed: int = 0) -> float:
    """Median over ``repeats`` calls of one call's wall time (ms), each with its own seeded generator."""
    transform(frames, times, np.random.default_rng(seed))  # warm-up (imports, FFT plans)
    laps = []
    for i in range(repeats):
        rng = np.random.default_rng(seed + 1 + i)
        t0 = time.perf_counter()
        transform(frames, times, rng)
        laps.append(time.perf_counter() - t0)
    return float(np.median(laps) * 1000)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--frames", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--out", type=str, default=None)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    times = np.cumsum(np.r_[0.0, rng.uniform(1.0, 2.5, args.frames - 1)]).astype(np.float32)
    frames = (40 + 30 * rng.random((args.frames, args.size, args.size))).astype(np.float32)
    augment = default_augment()
    rows = {f"{type(t).__name__} (p={t.p:g})": ms_per_call(dataclasses.replace(t, p=1.0), frames, times, args.repeats)
            for t in augment}
    rows["all applied (worst case)"] = ms_per_call(Compose([dataclasses.replace(t, p=1.0) for t in augment]),
                                                    frames, times, args.repeats)
    rows["configured p (mean)"] = float(np.mean([ms_per_call(Compose(augment), frames, times, 1, seed=s)
                                                 for s in range(4 * args.repeats)]))
    print(f"augmentation cost per {args.frames}-frame {args.size}² slice (ms, median of {args.repeats}):")
    for name, ms in rows.items():
        print(f"  {name:34s} {ms:7.2f}")
    result = {"size": args.size, "frames": args.frames, "ms": rows,
              "machine": platform.processor() or platform.machine()}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
