"""``python -m experiments.tmax_probe`` — can a per-pixel temporal encoder learn TMAX, and what does it need?

A controlled probe, faster than training the whole model: phantom pixels' enhancement curves (optionally
smoothed in-plane, as the U-Net could), the time input and the slice's arterial context
(:func:`stm_dlp.models.irfe.arterial_channels` of :func:`stm_dlp.perfusion.arterial.arterial_reference`)
are fed to one temporal encoder with a linear head, trained for a fixed number of steps on 8 patients and
scored on 2 held-out ones (R² of TMAX over brain pixels; mean prediction inside the lesion). Each row of
the default grid changes one thing against the reference (CNN, context, 1.5 px smoothing, MSE, 600 steps).

    python -m experiments.tmax_probe                 # the grid (docs/tmax.md), ~6 min on one core
    python -m experiments.tmax_probe --encoder lstm --steps 2000
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, replace

import numpy as np
import torch

from stm_dlp.data.phantom import PhantomConfig, cohort_member, simulate_patient
from stm_dlp.models.irfe import arterial_channels
from stm_dlp.models.temporal import build_temporal_encoder
from stm_dlp.perfusion.arterial import arterial_reference


@dataclass(frozen=True)
class Setting:
    encoder: str = "cnn"
    context: bool = True
    smooth_px: float = 1.5
    loss: str = "mse"
    steps: int = 600
    label: str = "reference"


GRID = (
    Setting(),
    Setting(context=False, label="no arterial context"),
    Setting(loss="l1", label="L1 loss (≈ Charbonnier)"),
    Setting(smooth_px=0.0, label="no in-plane smoothing"),
    Setting(encoder="lstm", label="LSTM, 600 steps"),
    Setting(encoder="lstm", steps=2000, label="LSTM, 2000 steps"),
)


def _smooth(x: torch.Tensor, sigma: float) -> torch.Tensor:
    if sigma <= 0:
        return x
    k = int(3 * sigma) * 2 + 1
    g = torch.exp(-((torch.arange(k) - k // 2) ** 2) / (2 * sigma**2))
    g = g / g.sum()
    return torch.nn.functional.conv2d(x[:, None], (g[:, None] * g[None])[None, None], padding=k // 2)[:, 0]


def pixel_sequences(patients: range, s: Setting) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per slice: ``(N, T, C)`` brain-pixel sequences and their ``(N,)`` true TMAX."""
    seqs, targets = [], []
    for i in patients:
        seed, pid = cohort_member(i, 0)
        st = simulate_patient(PhantomConfig(lesion_probability=1.0), seed, pid)
        for k in range(st.n_slices):
            frames = torch.from_numpy(st.frames[k])
            t = torch.from_numpy(st.times_s[k] - st.times_s[k, 0])
            x = _smooth((frames - frames[:2].mean(0)) / 50.0, s.smooth_px)
            m = torch.from_numpy(st.mask[k])
            pix = x[:, m].T
            n, n_t = pix.shape
            feats = [pix[..., None], (t / 60.0)[None, :, None].expand(n, n_t, 1)]
            if s.context:
                ref = arterial_reference(frames, t)
                ctx = arterial_channels(ref.curve_hu[None], torch.tensor([n_t]), (t / 60.0)[None])[0]
                feats.append(ctx[None].expand(n, n_t, ctx.shape[-1]))
            seqs.append(torch.cat(feats, -1))
            targets.append(torch.from_numpy(st.maps[k, 2][st.mask[k]]))
    return seqs, targets


def probe(s: Setting, seed: int = 0, batch: int = 512) -> dict[str, float]:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    train_x, train_y = pixel_sequences(range(0, 8), s)
    test_x, test_y = pixel_sequences(range(8, 10), s)
    enc = build_temporal_encoder(s.encoder, train_x[0].shape[-1], hidden=16)
    head = torch.nn.Linear(16, 1)
    opt = torch.optim.Adam([*enc.parameters(), *head.parameters()], 3e-3)
    t0 = time.perf_counter()
    for _ in range(s.steps):
        j = int(rng.integers(len(train_x)))
        idx = torch.from_numpy(rng.integers(0, train_x[j].shape[0], batch))
        xb, yb = train_x[j][idx], train_y[j][idx] / 10.0
        pred = head(enc(xb, torch.full((batch,), xb.shape[1])))[:, 0]
        err = pred - yb
        loss = (err * err).mean() if s.loss == "mse" else err.abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        pred = torch.cat([head(enc(x, torch.full((x.shape[0],), x.shape[1])))[:, 0] * 10.0 for x in test_x])
    y = torch.cat(test_y)
    lesion = y > 6
    return {"r2_tmax": float(1 - ((pred - y) ** 2).mean() / y.var()), "lesion_true_s": float(y[lesion].mean()),
            "lesion_pred_s": float(pred[lesion].mean()), "normal_pred_s": float(pred[~lesion].mean()),
            "seconds": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--encoder", choices=("cnn", "lstm", "mlp_mixer"))
    ap.add_argument("--steps", type=int)
    ap.add_argument("--loss", choices=("mse", "l1"))
    ap.add_argument("--no-context", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    grid = GRID
    if args.encoder or args.steps or args.loss or args.no_context:
        one = Setting(label="custom")
        one = replace(one, encoder=args.encoder or one.encoder, steps=args.steps or one.steps,
                      loss=args.loss or one.loss, context=not args.no_context)
        grid = (one,)
    print("| setting | encoder | context | smoothing px | loss | steps | TMAX R² | lesion TMAX true / predicted s "
          "| normal predicted s | train s |")
    print("|:--|:--|:--|--:|:--|--:|--:|--:|--:|--:|")
    for s in grid:
        r = probe(s)
        print(f"| {s.label} | {s.encoder} | {'yes' if s.context else 'no'} | {s.smooth_px:g} | {s.loss} | {s.steps} "
              f"| {r['r2_tmax']:.3f} | {r['lesion_true_s']:.1f} / {r['lesion_pred_s']:.1f} | {r['normal_pred_s']:.2f} "
              f"| {r['seconds']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
