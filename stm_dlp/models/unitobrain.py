"""UniToBrain baseline (paper ref. [11]): independent single-task 2-D U-Nets on stacked frames.

The network takes a *fixed* number of frames as input channels, so each slice's sequence is first
resampled by linear interpolation in time onto ``n_frames`` uniformly spaced times spanning
``[0, t_end]`` (:func:`resample_frames`). With the default ``time_grid_s=None``, ``t_end`` is the
slice's own valid duration ``times_s[length - 1]``, so the network sees frame *order* but not
seconds; with a fixed ``time_grid_s`` the grid is the same for every slice (frames past the end of
a short scan repeat its last frame). Either way, this resampling is the only use the baseline
makes of the timestamps — unlike STM-DLP it cannot read irregular frame times or a variable
number of frames directly.

Three U-Nets (one per task, no shared weights: "we train 3 independent models for each parameter",
paper §4.4) read the same resampled input; their outputs are stacked in CBV, CBF, TMAX order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stm_dlp.models.irfe import normalise_frames
from stm_dlp.models.spatial import UNet2d, crop_to, pad_to_multiple
from stm_dlp.models.stm_dlp import check_inputs


def resample_frames(
    frames: Tensor, times_s: Tensor, lengths: Tensor, n_out: int, t_end: Tensor | float | None = None
) -> Tensor:
    """Linearly interpolate each slice's valid frames onto ``n_out`` uniform times in ``[0, t_end]``.

    Only frames ``< lengths[b]`` are used. Grid times before the first or after the last valid
    frame take the first / last valid frame (constant extrapolation). Vectorised over the batch
    and pixels: one ``searchsorted`` per call, two gathers.

    Args:
        frames: ``(B, T, H, W)`` (any units).
        times_s: ``(B, T)`` seconds, strictly increasing over the valid frames.
        lengths: int ``(B,)`` valid frames per slice, each ≥ 1.
        n_out: number of output frames (≥ 1; with 1 the single frame is at t=0).
        t_end: grid end in seconds, a float, a ``(B,)`` tensor, or None for each slice's last
            valid time ``times_s[b, lengths[b] - 1]``.

    Returns:
        ``(B, n_out, H, W)``.
    """
    b, t_max = times_s.shape
    lengths = lengths.to(times_s.device)
    last = (lengths - 1).clamp_min(0)
    if t_end is None:
        t_end_b = times_s.gather(1, last[:, None])[:, 0]
    else:
        t_end_b = torch.as_tensor(t_end, dtype=times_s.dtype, device=times_s.device).expand(b)
    steps = torch.linspace(0.0, 1.0, n_out, dtype=times_s.dtype, device=times_s.device)  # [0.] if n_out == 1
    grid = t_end_b[:, None] * steps[None, :]  # (B, n_out)
    valid = torch.arange(t_max, device=times_s.device)[None, :] < lengths[:, None]
    sorted_times = torch.where(valid, times_s, torch.full_like(times_s, float("inf")))
    # i0: last valid frame with time <= grid time (clamped so that i0 + 1 is a valid frame too).
    i0 = torch.searchsorted(sorted_times.contiguous(), grid.contiguous(), right=True) - 1
    i0 = torch.minimum(i0.clamp_min(0), (lengths - 2).clamp_min(0)[:, None])
    i1 = torch.minimum(i0 + 1, last[:, None])
    t0, t1 = times_s.gather(1, i0), times_s.gather(1, i1)
    span = t1 - t0
    safe_span = torch.where(span > 0, span, torch.ones_like(span))
    w = torch.where(span > 0, (grid - t0) / safe_span, torch.zeros_like(span))
    w = w.clamp(0.0, 1.0)[:, :, None, None]  # (B, n_out, 1, 1)
    rows = torch.arange(b, device=frames.device)[:, None]
    return frames[rows, i0] * (1 - w) + frames[rows, i1] * w


class UniToBrain(nn.Module):
    """UniToBrain baseline: resample to ``n_frames`` frames, one 2-D U-Net per task.

    Input normalisation is STM-DLP's (:func:`~stm_dlp.models.irfe.normalise_frames`: baseline
    of the first ``baseline_frames`` frames subtracted, divided by ``hu_scale`` HU), done before
    resampling. Any H, W is accepted (padded to a multiple of ``2 ** depth`` and cropped back).

    Args:
        n_frames: frames after resampling (input channels of each U-Net).
        base: U-Net base channels.
        depth: U-Net pooling steps.
        tasks: number of independent U-Nets / output maps.
        time_grid_s: end of the resampling grid in seconds (None: each slice's valid duration).
        hu_scale: HU per unit of the intensity input.
        baseline_frames: frames averaged for the per-pixel baseline.
        positive_output: softplus on the outputs (≥ 0 after the caller's scale-only de-normalisation).

    Forward: same signature as :class:`~stm_dlp.models.STMDLP`; returns ``(B, tasks, H, W)``.
    """

    def __init__(
        self,
        n_frames: int = 89,
        base: int = 16,
        depth: int = 2,
        tasks: int = 3,
        time_grid_s: float | None = None,
        hu_scale: float = 50.0,
        baseline_frames: int = 2,
        positive_output: bool = True,
    ) -> None:
        super().__init__()
        if n_frames < 2:
            raise ValueError(f"n_frames must be >= 2, got {n_frames}")
        if time_grid_s is not None and time_grid_s <= 0:
            raise ValueError(f"time_grid_s must be > 0 or None, got {time_grid_s}")
        self.n_frames = n_frames
        self.time_grid_s = time_grid_s
        self.hu_scale = float(hu_scale)
        self.baseline_frames = int(baseline_frames)
        self.positive_output = positive_output
        self.multiple = 2**depth
        self.nets = nn.ModuleList(UNet2d(n_frames, 1, base, depth) for _ in range(tasks))

    def forward(self, frames: Tensor, times_s: Tensor, lengths: Tensor, arterial_hu: Tensor | None = None,
                prior_maps: Tensor | None = None) -> Tensor:
        """``frames`` (B,T,H,W) HU, ``times_s`` (B,T) s, ``lengths`` (B,) -> (B, tasks, H, W).

        ``arterial_hu`` and ``prior_maps`` are accepted for a uniform model interface and ignored: the
        baseline, as published, sees only the frames."""
        check_inputs(frames, times_s, lengths)
        x, _ = normalise_frames(frames, times_s, lengths, self.hu_scale, 1.0, self.baseline_frames)
        x = resample_frames(x, times_s, lengths, self.n_frames, self.time_grid_s)
        x, hw = pad_to_multiple(x, self.multiple)
        y = crop_to(torch.cat([net(x) for net in self.nets], dim=1), hw)
        return F.softplus(y) if self.positive_output else y
