"""Time-curve primitives shared by the physics (:mod:`stm_dlp.perfusion`) and the models
(:mod:`stm_dlp.models`), which may not import each other (pure torch)."""

from __future__ import annotations

import torch

#: Arrival = where a curve rises through this fraction of its peak.
ARRIVAL_FRACTION = 0.3


def rise_time(curves: torch.Tensor, times: torch.Tensor, valid: torch.Tensor | None = None,
              fraction: float = ARRIVAL_FRACTION) -> torch.Tensor:
    """When each curve rises through ``fraction`` of its peak, searched backwards from the peak.

    Args:
        curves: ``(..., T)`` enhancement.
        times: ``(..., T)`` or ``(T,)`` frame times.
        valid: optional ``(..., T)`` bool/float, the real frames (padding is never the peak).
        fraction: of each curve's peak.

    Returns:
        ``(...)`` times, linearly interpolated between the last frame below the level before the peak and
        the next; the first frame's time when the curve starts above it. Searching backwards from the peak
        means an excursion of the baseline above the level (noise, a spike) cannot set the arrival, as a
        forward search for the first crossing would.
    """
    t_n = curves.shape[-1]
    times = times.expand_as(curves).to(curves.dtype)
    a = curves if valid is None else torch.where(valid.to(torch.bool), curves, torch.full_like(curves, -torch.inf))
    peak, i_peak = a.max(-1, keepdim=True)
    level = fraction * peak
    frame = torch.arange(t_n, device=curves.device)
    below = (curves < level) & (frame < i_peak)
    j0 = torch.where(below, frame, torch.full_like(frame, -1)).amax(-1, keepdim=True)
    found = j0 >= 0
    j0 = j0.clamp_min(0)
    j1 = (j0 + 1).clamp_max(t_n - 1)
    c0, c1 = curves.gather(-1, j0), curves.gather(-1, j1)
    t0, t1 = times.gather(-1, j0), times.gather(-1, j1)
    w = ((level - c0) / (c1 - c0).clamp_min(1e-6)).clamp(0.0, 1.0)
    return torch.where(found, t0 + w * (t1 - t0), times[..., :1])[..., 0]
