"""Indicator-dilution physics and the calculation approach (deconvolution), pure torch.

The entry point for maps from a study is :func:`calculate_maps`.
"""

from stm_dlp.perfusion.maps import calculate_maps

__all__ = ["calculate_maps"]
