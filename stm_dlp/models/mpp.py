"""Multi-Parameter Predictor (MPP, paper §3.3 and §4.3, Fig. 2c).

One branch per task (CBV, CBF, TMAX), five layers per branch:

1. a convolution on the shared ``F_st`` giving each branch its own features;
2.–4. three middle layers; the first ``exchange_layers`` of them are *feature-exchange* layers
   (each branch's input is the concatenation of all branches' features), the rest are
   independent per-branch layers;
5. one output convolution per task (1×1, one channel).

Implementation: the branches are stacked along the channel axis (``n_tasks * hidden``
channels). A feature-exchange layer is then a dense convolution over all stacked channels (each
branch's output sees every branch), and an independent layer is the same convolution with
``groups=n_tasks`` (each branch sees only itself). Layers 1–4 are 3×3 convolutions + ReLU
(``kernel_size``; 1 makes the MPP purely per-pixel); there is no normalisation, so the MPP is
per-sample and per-branch exactly.
"""

from __future__ import annotations

from torch import Tensor, nn

#: Valid numbers of feature-exchange layers (3 middle layers in total).
EXCHANGE_LAYERS: tuple[int, ...] = (0, 1, 2, 3)


class MultiParameterPredictor(nn.Module):
    """Task branches with ``exchange_layers`` feature-exchange layers.

    Args:
        in_ch: channels of ``F_st``.
        hidden: channels per branch.
        exchange_layers: 0–3 of the 3 middle layers exchange features (paper default 2).
        n_tasks: number of outputs (3: CBV, CBF, TMAX).
        kernel_size: spatial kernel of layers 1–4 (odd; the output layer is 1×1).

    Shapes: ``(B, in_ch, H, W) -> (B, n_tasks, H, W)`` raw (unconstrained) outputs.
    """

    def __init__(
        self, in_ch: int, hidden: int = 64, exchange_layers: int = 2, n_tasks: int = 3, kernel_size: int = 3
    ) -> None:
        super().__init__()
        if exchange_layers not in EXCHANGE_LAYERS:
            valid = ", ".join(map(str, EXCHANGE_LAYERS))
            raise ValueError(f"exchange_layers must be one of {valid}, got {exchange_layers!r}")
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        self.n_tasks = n_tasks
        self.exchange_layers = exchange_layers
        width = n_tasks * hidden
        pad = kernel_size // 2
        self.first = nn.Conv2d(in_ch, width, kernel_size, padding=pad)
        self.middle = nn.ModuleList(
            nn.Conv2d(width, width, kernel_size, padding=pad, groups=1 if i < exchange_layers else n_tasks)
            for i in range(3)
        )
        self.act = nn.ReLU(inplace=True)
        self.out = nn.Conv2d(width, n_tasks, 1, groups=n_tasks)

    def forward(self, f_st: Tensor) -> Tensor:
        """``f_st`` (B, in_ch, H, W) -> (B, n_tasks, H, W)."""
        h = self.act(self.first(f_st))
        for layer in self.middle:
            h = self.act(layer(h))
        return self.out(h)
