"""STM-DLP: the Impulse Response Feature Encoder followed by the Multi-Parameter Predictor."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stm_dlp.models.irfe import (
    ARTERIAL_CHANNELS,
    IRFE,
    arterial_channels,
    arterial_gain,
    check_irfe_args,
    normalise_frames,
)
from stm_dlp.models.mpp import MultiParameterPredictor
from stm_dlp.models.spatial import crop_to, pad_to_multiple
from stm_dlp.types import ARTERIAL_POOLING, PARAMS

#: Physical units per unit of the deconvolution prior's channels (CBV ml/100g, CBF ml/100g/min, TMAX s),
#: and the largest normalised value kept (a failed pixel's residue can peak anywhere in its window).
PRIOR_SCALE: tuple[float, ...] = (5.0, 60.0, 10.0)
PRIOR_CLIP = 5.0
#: TMAX's place in the outputs and in the prior (PARAMS order), and the sharpness of its output softplus
#: with ``tmax_from_prior`` (in normalised units: ~identity above 0.1).
TMAX_CHANNEL = PARAMS.index("tmax")
TMAX_BETA = 20.0


def check_inputs(frames: Tensor, times_s: Tensor, lengths: Tensor) -> None:
    """Raise ``ValueError`` unless frames (B,T,H,W), times_s (B,T), lengths (B,) with 1 <= lengths <= T."""
    if frames.ndim != 4:
        raise ValueError(f"frames must be (B, T, H, W), got shape {tuple(frames.shape)}")
    b, t = frames.shape[:2]
    if times_s.shape != (b, t):
        raise ValueError(f"times_s must have shape {(b, t)}, got {tuple(times_s.shape)}")
    if lengths.shape != (b,):
        raise ValueError(f"lengths must have shape {(b,)}, got {tuple(lengths.shape)}")
    if bool(((lengths < 1) | (lengths > t)).any()):
        raise ValueError(f"lengths must lie in [1, {t}], got {lengths.tolist()}")


class STMDLP(nn.Module):
    """Spatial-Temporal Multitask Deep Learning Pipeline (paper §3).

    ``frames`` → input normalisation → :class:`~stm_dlp.models.irfe.IRFE` → ``F_st`` →
    :class:`~stm_dlp.models.mpp.MultiParameterPredictor` → CBV, CBF, TMAX.

    Input normalisation (:func:`~stm_dlp.models.irfe.normalise_frames`): per pixel, the mean of
    the first ``baseline_frames`` valid frames (pre-bolus baseline) is subtracted and the result
    divided by ``hu_scale`` HU; frame times are divided by ``time_scale_s``.

    Any H, W is accepted: the input is zero-padded (bottom/right) to a multiple of
    ``2 ** unet_depth`` and the output cropped back.

    Outputs are in the caller's *normalised* target space (the LightningModule divides each
    parameter by a positive scale, no shift). With ``positive_output`` a softplus makes them
    ≥ 0, hence ≥ 0 in physical units after de-normalisation.

    Args:
        encoder: temporal encoder, ``"cnn"``, ``"mlp_mixer"`` or ``"lstm"`` (paper's best).
        order: ``"spatial_first"`` (paper), ``"temporal_first"`` or ``"joint"``.
        time_input: ``"temporal"`` (paper), ``"spatial"`` or ``"both"``; only ``"temporal"`` for
            ``temporal_first``/``joint`` (there the time goes in with the frames).
        exchange_layers: feature-exchange layers of the MPP, 0–3 (paper: 2).
        spatial_channels: U-Net base channels (and ``C`` of ``F_spatial``).
        unet_depth: U-Net pooling steps.
        temporal_hidden: temporal encoder width and ``C'`` of ``F_st``.
        mpp_hidden: channels per MPP branch.
        time_scale_s: seconds per unit of the time input.
        hu_scale: HU per unit of the intensity input.
        baseline_frames: frames averaged for the per-pixel baseline.
        temporal_layers: temporal encoder depth (None: cnn 4, mlp_mixer 2, lstm 2).
        mpp_kernel_size: kernel of the MPP's hidden layers (3, or 1 for per-pixel).
        positive_output: apply softplus to the outputs.
        chunk_size: encode at most this many pixel sequences at once (None: all).
        max_tokens: longest sequence for ``mlp_mixer``.
        n_tasks: number of predicted maps (3: CBV, CBF, TMAX).
        arterial_context: feed the slice's arterial reference curve (``arterial_hu`` of the batch, from
            the whole slice before any crop) to the temporal encoder at every time step, as three channels
            (:func:`~stm_dlp.models.irfe.arterial_channels`): the curve over its own peak (shape and timing),
            over ``arterial_scale_hu`` (amplitude) and the time since the arterial arrival. Beyond the paper,
            whose configuration is ``False``.
        arterial_scale_hu: HU per unit of the arterial amplitude channel.
        arterial_normalise: with ``arterial_context``, also divide every pixel's enhancement by the area of
            its slice's arterial curve (:func:`~stm_dlp.models.irfe.arterial_gain`): CBV is the tissue curve's
            area over the AIF's, so the network then reads a quantity that no longer depends on the injection
            (amplitude, recirculation, tail) and need not learn the division — which a network trained on one
            cohort's AIFs does not extrapolate.
        deconv_prior: also give the MPP, beside ``F_st``, the deconvolution of every pixel with its slice's
            arterial reference (``prior_maps`` of the batch, :func:`stm_dlp.data.context.deconvolution_prior`),
            over :data:`PRIOR_SCALE`: the division by the arterial input is physics, the same on any
            generator, so the network refines it instead of learning it from one cohort's AIFs. Beyond the
            paper (``False``).
        tmax_from_prior: with ``deconv_prior``, predict TMAX as a correction of the prior's TMAX
            (``softplus_sharp(prior_tmax / tmax_unit_s + head)`` in the normalised target space; a head output of
            0 returns the prior's TMAX exactly) instead of from scratch: the prior's timing comes from the
            division by the arterial input, which holds on any generator, so a network trained on one cohort
            starts from it on another and only its corrections are cohort-specific. ``tmax_unit_s`` is the
            TMAX target scale (:meth:`set_target_scale`, called by the LightningModule; stored with the
            weights). TMAX only: the prior's CBV and CBF amplitudes carry the reference curve's partial volume,
            which differs between cohorts (docs/tmax.md §8).
        tmax_correction_s: with ``deconv_prior``, at inference (``eval()``) the predicted TMAX stays within this
            many seconds of the prior's wherever the prior has a value (:func:`bounded_tmax`); training sees the
            unbounded output. ``None``: no bound. The deconvolution's TMAX is generator-independent physics;
            the bound limits how far a generator's own normal-tissue TMAX level, learnt with the weights, can
            carry to another cohort (docs/tmax.md §10).
        tmax_level_from_prior: with ``deconv_prior``, at inference each slice's TMAX map is shifted so that its
            normal tissue (pixels whose prior TMAX lies in ``(0, 6)`` s) reads, in the median, what the prior
            reads (:func:`prior_levelled_tmax`); the network's contrast (how much later a lesion is than normal
            tissue) is kept. A network's absolute normal-tissue level is a convention of its training
            generator (each family's residue shapes set it), the deconvolution's is not (docs/tmax.md §11).
        arterial_pooling: how the data side obtains each slice's arterial reference, for ``arterial_context`` and
            ``deconv_prior``: ``study`` (the median over the study's slices) or ``slice`` (its own)
            (:func:`~stm_dlp.perfusion.arterial.pool_references`). The network does not use it; it is kept with
            the weights so that prediction gives the model the reference it was trained with.
    """

    def __init__(
        self,
        encoder: str = "lstm",
        order: str = "spatial_first",
        time_input: str = "temporal",
        exchange_layers: int = 2,
        spatial_channels: int = 16,
        unet_depth: int = 2,
        temporal_hidden: int = 64,
        mpp_hidden: int = 64,
        time_scale_s: float = 60.0,
        hu_scale: float = 50.0,
        baseline_frames: int = 2,
        temporal_layers: int | None = None,
        mpp_kernel_size: int = 3,
        positive_output: bool = True,
        chunk_size: int | None = None,
        max_tokens: int = 128,
        n_tasks: int = 3,
        arterial_context: bool = False,
        arterial_scale_hu: float = 300.0,
        arterial_normalise: bool = False,
        deconv_prior: bool = False,
        tmax_from_prior: bool = False,
        tmax_correction_s: float | None = None,
        tmax_level_from_prior: bool = False,
        arterial_pooling: str = "slice",
    ) -> None:
        super().__init__()
        if arterial_pooling not in ARTERIAL_POOLING:
            raise ValueError(f"arterial_pooling must be one of {ARTERIAL_POOLING}, got {arterial_pooling!r}")
        self.arterial_pooling = arterial_pooling
        check_irfe_args(encoder, order, time_input)
        if time_scale_s <= 0 or hu_scale <= 0:
            raise ValueError(f"time_scale_s and hu_scale must be > 0, got {time_scale_s}, {hu_scale}")
        if baseline_frames < 1:
            raise ValueError(f"baseline_frames must be >= 1, got {baseline_frames}")
        self.time_scale_s = float(time_scale_s)
        self.hu_scale = float(hu_scale)
        self.baseline_frames = int(baseline_frames)
        self.positive_output = positive_output
        self.arterial_context = bool(arterial_context)
        self.arterial_scale_hu = float(arterial_scale_hu)
        self.arterial_normalise = bool(arterial_normalise)
        self.deconv_prior = bool(deconv_prior)
        if self.deconv_prior and n_tasks != len(PRIOR_SCALE):
            raise ValueError(f"deconv_prior needs the {len(PRIOR_SCALE)} tasks CBV, CBF, TMAX, got n_tasks={n_tasks}")
        if tmax_from_prior and not (self.deconv_prior and positive_output):
            raise ValueError("tmax_from_prior needs deconv_prior=true and positive_output=true")
        self.tmax_from_prior = bool(tmax_from_prior)
        if tmax_correction_s is not None and not (self.deconv_prior and float(tmax_correction_s) >= 0):
            raise ValueError(f"tmax_correction_s needs deconv_prior=true and a bound >= 0 s, got {tmax_correction_s}")
        self.tmax_correction_s = None if tmax_correction_s is None else float(tmax_correction_s)
        if tmax_level_from_prior and not self.deconv_prior:
            raise ValueError("tmax_level_from_prior needs deconv_prior=true")
        self.tmax_level_from_prior = bool(tmax_level_from_prior)
        if self.tmax_from_prior or self.tmax_correction_s is not None or self.tmax_level_from_prior:
            # seconds per unit of normalised TMAX: a buffer, so checkpoints carry it
            self.register_buffer("tmax_unit_s", torch.tensor(PRIOR_SCALE[TMAX_CHANNEL]))
        self.register_buffer("prior_scale", torch.tensor(PRIOR_SCALE).view(1, -1, 1, 1), persistent=False)
        self.irfe = IRFE(
            encoder=encoder,
            order=order,
            time_input=time_input,
            spatial_channels=spatial_channels,
            unet_depth=unet_depth,
            temporal_hidden=temporal_hidden,
            temporal_layers=temporal_layers,
            chunk_size=chunk_size,
            max_tokens=max_tokens,
            context_channels=ARTERIAL_CHANNELS if self.arterial_context else 0,
        )
        self.mpp = MultiParameterPredictor(
            self.irfe.out_channels + (len(PRIOR_SCALE) if self.deconv_prior else 0), mpp_hidden, exchange_layers,
            n_tasks, mpp_kernel_size
        )

    def set_target_scale(self, target_scale: Tensor) -> None:
        """Tell the network the normalised targets' scale ``(3,)`` (CBV, CBF, TMAX per unit), which
        ``tmax_from_prior`` needs to add the prior's TMAX in the target space; a no-op otherwise."""
        if hasattr(self, "tmax_unit_s"):
            self.tmax_unit_s.fill_(float(torch.as_tensor(target_scale)[TMAX_CHANNEL]))

    def forward(self, frames: Tensor, times_s: Tensor, lengths: Tensor, arterial_hu: Tensor | None = None,
                prior_maps: Tensor | None = None) -> Tensor:
        """Predict the maps of a batch of slices.

        Args:
            frames: ``(B, T, H, W)`` HU, zero padded past ``lengths``.
            times_s: ``(B, T)`` seconds from each slice's first frame.
            lengths: int ``(B,)`` valid frames per slice.
            arterial_hu: ``(B, T)`` arterial reference curves (HU over baseline), needed with
                ``arterial_context`` (ignored otherwise).
            prior_maps: ``(B, 3, H, W)`` the deconvolution prior (CBV, CBF, TMAX, physical units), needed
                with ``deconv_prior`` (ignored otherwise).

        Returns:
            ``(B, n_tasks, H, W)`` in the normalised target space, CBV, CBF, TMAX order.
        """
        check_inputs(frames, times_s, lengths)
        x, t = normalise_frames(
            frames, times_s, lengths, self.hu_scale, self.time_scale_s, self.baseline_frames
        )
        context = None
        if self.arterial_context:
            if arterial_hu is None or arterial_hu.shape != times_s.shape:
                raise ValueError("this model uses arterial context: pass arterial_hu (B, T), the batch's arterial "
                                 f"reference curves (got {None if arterial_hu is None else tuple(arterial_hu.shape)})")
            context = arterial_channels(arterial_hu, lengths, t, self.arterial_scale_hu)
            if self.arterial_normalise:
                x = x * arterial_gain(arterial_hu, times_s, lengths)[:, None, None, None]
        x, hw = pad_to_multiple(x, self.irfe.multiple)
        features = self.irfe(x, t, lengths, context)
        if self.deconv_prior:
            if prior_maps is None or prior_maps.shape != (frames.shape[0], len(PRIOR_SCALE), *frames.shape[2:]):
                raise ValueError("this model uses a deconvolution prior: pass prior_maps (B, 3, H, W), the batch's "
                                 f"prior maps (got {None if prior_maps is None else tuple(prior_maps.shape)})")
            prior = (prior_maps.to(features.dtype) / self.prior_scale).clamp(0.0, PRIOR_CLIP)
            features = torch.cat([features, pad_to_multiple(prior, self.irfe.multiple)[0]], dim=1)
        y = crop_to(self.mpp(features), hw)
        out = self._outputs(y, prior_maps)
        if (self.tmax_correction_s is not None or self.tmax_level_from_prior) and not self.training:
            prior_tmax_s = prior_maps[:, TMAX_CHANNEL].to(out.dtype)
            tmax_s = out[:, TMAX_CHANNEL] * self.tmax_unit_s
            if self.tmax_level_from_prior:
                tmax_s = prior_levelled_tmax(tmax_s, prior_tmax_s)
            if self.tmax_correction_s is not None:
                tmax_s = bounded_tmax(tmax_s, prior_tmax_s, self.tmax_correction_s)
            out = torch.cat([out[:, :TMAX_CHANNEL], (tmax_s / self.tmax_unit_s)[:, None], out[:, TMAX_CHANNEL + 1:]], 1)
        return out

    def _outputs(self, y: Tensor, prior_maps: Tensor | None) -> Tensor:
        """The MPP's output ``y`` ``(B, P, H, W)`` as maps in the normalised target space."""
        if self.tmax_from_prior:
            # a sharp softplus: ~identity above 0.1 (1 s at a 10 s target scale), so a head output of 0 keeps
            # the prior's TMAX; CBV and CBF keep the ordinary softplus
            prior_tmax = prior_maps[:, TMAX_CHANNEL].to(y.dtype).clamp(0.0, PRIOR_CLIP * PRIOR_SCALE[TMAX_CHANNEL])
            tmax = F.softplus(prior_tmax / self.tmax_unit_s + y[:, TMAX_CHANNEL], beta=TMAX_BETA)
            return torch.cat([F.softplus(y[:, :TMAX_CHANNEL]), tmax[:, None]], dim=1)
        return F.softplus(y) if self.positive_output else y


#: below this prior TMAX (s) a pixel counts as normal tissue for :func:`prior_levelled_tmax` (the readout's
#: hypoperfusion threshold, :class:`stm_dlp.perfusion.readout.ReadoutThresholds`)
NORMAL_TISSUE_TMAX_S = 6.0
#: fewer normal pixels than this in a slice: its level is left as the network gives it
MIN_NORMAL_PIXELS = 16


def prior_levelled_tmax(tmax_s: Tensor, prior_tmax_s: Tensor, normal_below_s: float = NORMAL_TISSUE_TMAX_S,
                        min_pixels: int = MIN_NORMAL_PIXELS) -> Tensor:
    """``tmax_s`` ``(B, H, W)`` seconds, each slice shifted by the median of ``tmax_s - prior_tmax_s`` over its
    normal tissue (``0 < prior_tmax_s < normal_below_s``) and clamped at 0 s. A slice with fewer than
    ``min_pixels`` such pixels is returned unchanged."""
    normal = (prior_tmax_s > 0) & (prior_tmax_s < normal_below_s)
    diff = torch.where(normal, tmax_s - prior_tmax_s, torch.full_like(tmax_s, float("nan"))).flatten(1)
    offset = torch.nan_to_num(diff.nanmedian(dim=1).values, nan=0.0)
    offset = torch.where(normal.flatten(1).sum(1) >= min_pixels, offset, torch.zeros_like(offset))
    return (tmax_s - offset[:, None, None]).clamp_min(0.0)


def bounded_tmax(tmax_s: Tensor, prior_tmax_s: Tensor, bound_s: float) -> Tensor:
    """``tmax_s`` kept within ``bound_s`` seconds of ``prior_tmax_s`` (same shape, seconds) where the prior is
    above 0; elsewhere (outside the brain, CSF, a slice without a prior) ``tmax_s`` as it is."""
    bounded = prior_tmax_s + (tmax_s - prior_tmax_s).clamp(-bound_s, bound_s)
    return torch.where(prior_tmax_s > 0, bounded, tmax_s)
