"""Indicator-dilution physics and the calculation approach (deconvolution), pure torch.

* :func:`calculate_maps` — CBV, CBF, MTT, TMAX maps of a study (options: :class:`CalcParams`);
* :func:`brain_mask` — the one automatic CT brain mask (cortex kept, noise-robust);
* :func:`correct_motion` — rigid in-plane registration of every frame to the pre-contrast frames.
"""

from stm_dlp.perfusion.maps import CalcParams, calculate_maps
from stm_dlp.perfusion.mask import brain_mask
from stm_dlp.perfusion.motion import correct_motion

__all__ = ["CalcParams", "brain_mask", "calculate_maps", "correct_motion"]
