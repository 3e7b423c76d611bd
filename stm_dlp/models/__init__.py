"""Models of STM-DLP as plain ``torch.nn.Module`` s (no Lightning, Hydra or file I/O here).

Both models share one forward signature::

    model(frames, times_s, lengths) -> (B, 3, H, W)

with ``frames`` (B, T, H, W) HU zero-padded past ``lengths``, ``times_s`` (B, T) seconds and
``lengths`` (B,) valid frames; outputs are in the normalised target space, CBV, CBF, TMAX order.
Hydra instantiates them by ``_target_: stm_dlp.models.STMDLP`` / ``stm_dlp.models.UniToBrain``.
"""

from stm_dlp.models.irfe import IRFE, ORDERS, TIME_INPUTS, normalise_frames
from stm_dlp.models.mpp import EXCHANGE_LAYERS, MultiParameterPredictor
from stm_dlp.models.spatial import UNet2d, crop_to, pad_to_multiple
from stm_dlp.models.stm_dlp import STMDLP
from stm_dlp.models.temporal import (
    ENCODERS,
    CNNTemporalEncoder,
    LSTMTemporalEncoder,
    MixerTemporalEncoder,
    build_temporal_encoder,
)
from stm_dlp.models.unitobrain import UniToBrain, resample_frames

__all__ = [
    "ENCODERS",
    "EXCHANGE_LAYERS",
    "IRFE",
    "ORDERS",
    "STMDLP",
    "TIME_INPUTS",
    "CNNTemporalEncoder",
    "LSTMTemporalEncoder",
    "MixerTemporalEncoder",
    "MultiParameterPredictor",
    "UNet2d",
    "UniToBrain",
    "build_temporal_encoder",
    "crop_to",
    "normalise_frames",
    "pad_to_multiple",
    "resample_frames",
]
