"""Tests of the models in stm_dlp.models (tiny sizes, CPU, a few seconds)."""

from __future__ import annotations

import pytest
import torch

from stm_dlp.models import (
    ENCODERS,
    STMDLP,
    MultiParameterPredictor,
    UNet2d,
    UniToBrain,
    build_temporal_encoder,
    crop_to,
    pad_to_multiple,
    resample_frames,
)
from stm_dlp.models.temporal import MixerTemporalEncoder

ATOL = 1e-5
TINY = dict(spatial_channels=4, unet_depth=2, temporal_hidden=8, mpp_hidden=4)
#: Every valid (order, time_input) combination.
IRFE_CONFIGS = [
    ("spatial_first", "temporal"),
    ("spatial_first", "spatial"),
    ("spatial_first", "both"),
    ("temporal_first", "temporal"),
    ("joint", "temporal"),
]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def make_batch(
    b: int = 3, t: int = 10, h: int = 8, w: int = 8, lengths: list[int] | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A CTPBatch-like (frames HU, times_s, lengths): irregular times, padding as collate makes it."""
    lengths_t = torch.tensor(lengths if lengths is not None else [t] * b)
    times = torch.cumsum(torch.rand(b, t) * 2.0 + 0.5, dim=1)
    times = times - times[:, :1]
    base = 30.0 + 10.0 * torch.rand(b, 1, h, w)
    peak = 5.0 + 20.0 * torch.rand(b, 1, h, w)
    bolus = torch.exp(-(((times[:, :, None, None] - 8.0) / 4.0) ** 2))
    frames = base + peak * bolus + torch.randn(b, t, h, w)
    valid = torch.arange(t)[None, :] < lengths_t[:, None]
    frames = frames * valid[:, :, None, None]
    last = times.gather(1, (lengths_t - 1)[:, None])
    times = torch.where(valid, times, last)
    return frames, times, lengths_t


def pad_time(frames: torch.Tensor, times: torch.Tensor, extra: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Append ``extra`` zero frames (times repeat the last entry), lengths unchanged."""
    b, _, h, w = frames.shape
    frames = torch.cat([frames, frames.new_zeros(b, extra, h, w)], dim=1)
    times = torch.cat([times, times[:, -1:].expand(b, extra)], dim=1)
    return frames, times


# --------------------------------------------------------------------------- temporal encoders


@pytest.mark.parametrize("name", ENCODERS)
def test_temporal_encoder_padding_invariance(name: str) -> None:
    enc = build_temporal_encoder(name, in_features=5, hidden=8)
    lengths = torch.tensor([8, 3, 5, 1, 8, 2])
    x = torch.randn(6, 8, 5)
    valid = (torch.arange(8)[None, :] < lengths[:, None])[:, :, None]
    x = x * valid
    ref = enc(x, lengths)
    assert ref.shape == (6, enc.out_features)

    # Extra zero-padded frames, lengths unchanged.
    x_zero = torch.cat([x, torch.zeros(6, 4, 5)], dim=1)
    torch.testing.assert_close(enc(x_zero, lengths), ref, atol=ATOL, rtol=0)
    # Whatever sits in the padding (here random values) is ignored too.
    x_junk = torch.where(valid, x, torch.randn_like(x))
    x_junk = torch.cat([x_junk, torch.randn(6, 4, 5)], dim=1)
    torch.testing.assert_close(enc(x_junk, lengths), ref, atol=ATOL, rtol=0)
    # Each sequence alone (trimmed to its length) gives its row of the mixed batch.
    for i, n in enumerate(lengths.tolist()):
        alone = enc(x[i : i + 1, :n], lengths[i : i + 1])
        torch.testing.assert_close(alone, ref[i : i + 1], atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ENCODERS)
def test_temporal_encoder_chunking_matches(name: str) -> None:
    x, lengths = torch.randn(10, 6, 3), torch.tensor([6, 2, 3, 6, 1, 4, 5, 6, 2, 3])
    whole = build_temporal_encoder(name, in_features=3, hidden=8)
    chunked = build_temporal_encoder(name, in_features=3, hidden=8, chunk_size=3)
    chunked.load_state_dict(whole.state_dict())
    torch.testing.assert_close(chunked(x, lengths), whole(x, lengths), atol=ATOL, rtol=0)


def test_mixer_max_tokens() -> None:
    enc = MixerTemporalEncoder(in_features=2, hidden=8, max_tokens=6)
    x = torch.randn(3, 9, 2)
    lengths = torch.tensor([6, 4, 2])
    # Padded beyond max_tokens but every valid length fits: trimmed, same as the unpadded input.
    torch.testing.assert_close(enc(x, lengths), enc(x[:, :6], lengths), atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="max_tokens"):
        enc(x, torch.tensor([7, 4, 2]))


# --------------------------------------------------------------------------- full STM-DLP


@pytest.mark.parametrize(
    ("encoder", "order"),
    [(e, o) for o in ("spatial_first", "temporal_first") for e in ENCODERS] + [("lstm", "joint")],
)
def test_stmdlp_padding_and_batch_invariance(encoder: str, order: str) -> None:
    model = STMDLP(encoder=encoder, order=order, **TINY)
    frames, times, lengths = make_batch(b=3, t=10, lengths=[10, 6, 4])
    ref = model(frames, times, lengths)
    assert ref.shape == (3, 3, 8, 8)

    frames_p, times_p = pad_time(frames, times, extra=3)
    torch.testing.assert_close(model(frames_p, times_p, lengths), ref, atol=ATOL, rtol=0)
    for i, n in enumerate(lengths.tolist()):
        alone = model(frames[i : i + 1, :n], times[i : i + 1, :n], lengths[i : i + 1])
        torch.testing.assert_close(alone, ref[i : i + 1], atol=ATOL, rtol=0)


def assert_grads(model: torch.nn.Module) -> None:
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"parameters without gradient: {missing}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert sum(float(p.grad.abs().sum()) for p in model.parameters()) > 0


@pytest.mark.parametrize(("order", "time_input"), IRFE_CONFIGS)
@pytest.mark.parametrize("exchange_layers", [0, 1, 2, 3])
def test_stmdlp_configs_forward_backward(order: str, time_input: str, exchange_layers: int) -> None:
    model = STMDLP(encoder="cnn", order=order, time_input=time_input, exchange_layers=exchange_layers, **TINY)
    frames, times, lengths = make_batch(b=2, t=7, lengths=[7, 5])
    out = model(frames, times, lengths)
    assert out.shape == (2, 3, 8, 8)
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    assert_grads(model)


@pytest.mark.parametrize("encoder", ENCODERS)
def test_stmdlp_encoders_forward_backward(encoder: str) -> None:
    model = STMDLP(encoder=encoder, time_input="both", **TINY)
    frames, times, lengths = make_batch(b=2, t=6, lengths=[6, 3])
    out = model(frames, times, lengths)
    out.square().mean().backward()
    assert_grads(model)


@pytest.mark.parametrize(("order", "time_input"), IRFE_CONFIGS)
def test_odd_sizes(order: str, time_input: str) -> None:
    model = STMDLP(encoder="cnn", order=order, time_input=time_input, **TINY)
    frames, times, lengths = make_batch(b=2, t=5, h=13, w=17, lengths=[5, 4])
    out = model(frames, times, lengths)
    assert out.shape == (2, 3, 13, 17)
    assert torch.isfinite(out).all()


def test_pad_and_crop_roundtrip() -> None:
    x = torch.randn(2, 3, 13, 17)
    padded, hw = pad_to_multiple(x, 4)
    assert padded.shape == (2, 3, 16, 20) and hw == (13, 17)
    assert torch.equal(crop_to(padded, hw), x)
    assert pad_to_multiple(padded, 4)[0].shape == padded.shape
    with pytest.raises(ValueError, match="divisible by 4"):
        UNet2d(3, 5, base=4, depth=2)(x)
    assert UNet2d(3, 5, base=4, depth=2)(padded).shape == (2, 5, 16, 20)


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        (dict(encoder="gru"), ["cnn", "mlp_mixer", "lstm"]),
        (dict(order="sideways"), ["spatial_first", "temporal_first", "joint"]),
        (dict(time_input="never"), ["temporal", "spatial", "both"]),
        (dict(order="joint", time_input="spatial"), ["temporal"]),
        (dict(order="temporal_first", time_input="both"), ["temporal"]),
        (dict(exchange_layers=4), ["0, 1, 2, 3"]),
        (dict(exchange_layers=-1), ["0, 1, 2, 3"]),
    ],
)
def test_invalid_arguments(kwargs: dict, words: list[str]) -> None:
    with pytest.raises(ValueError) as err:
        STMDLP(**kwargs, **TINY)
    for word in words:
        assert word in str(err.value)


def test_invalid_inputs() -> None:
    model = STMDLP(encoder="cnn", **TINY)
    frames, times, lengths = make_batch(b=2, t=5)
    with pytest.raises(ValueError, match="lengths"):
        model(frames, times, torch.tensor([5, 6]))
    with pytest.raises(ValueError, match="times_s"):
        model(frames, times[:, :4], lengths)


@pytest.mark.parametrize("time_input", ["temporal", "spatial", "both"])
def test_time_input_matters(time_input: str) -> None:
    model = STMDLP(encoder="lstm", time_input=time_input, **TINY)
    frames, times, lengths = make_batch(b=2, t=6)
    a = model(frames, times, lengths)
    b = model(frames, times * 1.7, lengths)
    assert (a - b).abs().max() > 1e-6  # small at random initialisation, but not zero
    times = times.clone().requires_grad_(True)
    model(frames, times, lengths).sum().backward()
    assert times.grad is not None and times.grad.abs().sum() > 0


def test_positive_output() -> None:
    frames, times, lengths = make_batch(b=2, t=5)
    for model in (STMDLP(encoder="cnn", **TINY), UniToBrain(n_frames=6, base=4)):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))  # push raw outputs to both signs
        assert (model(frames, times, lengths) >= 0).all()
    raw = STMDLP(encoder="cnn", positive_output=False, **TINY)
    with torch.no_grad():
        raw.mpp.out.bias.fill_(-100.0)
    assert (raw(frames, times, lengths) < 0).all()


@pytest.mark.parametrize("exchange_layers", [0, 1])
def test_mpp_branches_independent_without_exchange(exchange_layers: int) -> None:
    mpp = MultiParameterPredictor(in_ch=5, hidden=4, exchange_layers=exchange_layers)
    mpp(torch.randn(2, 5, 6, 6))[:, 0].sum().backward()
    other_branches = mpp.first.weight.grad[4:]  # branch 1 and 2 channels of layer 1
    if exchange_layers == 0:
        assert torch.count_nonzero(other_branches) == 0
    else:
        assert torch.count_nonzero(other_branches) > 0


# --------------------------------------------------------------------------- UniToBrain


def test_resample_frames_exact_on_linear_data() -> None:
    b, t, h, w = 3, 9, 4, 5
    lengths = torch.tensor([9, 5, 2])
    times = torch.cumsum(torch.rand(b, t) * 3 + 0.2, dim=1)
    times = times - times[:, :1]
    a, c = torch.randn(b, 1, h, w), torch.randn(b, 1, h, w)
    frames = a + c * times[:, :, None, None]
    junk = torch.arange(t)[None, :, None, None] >= lengths[:, None, None, None]
    frames = torch.where(junk, torch.full_like(frames, 1e4), frames)  # padding must be ignored

    out = resample_frames(frames, times, lengths, n_out=7)
    t_end = times.gather(1, (lengths - 1)[:, None])
    grid = t_end * torch.linspace(0, 1, 7)[None, :]
    torch.testing.assert_close(out, a + c * grid[:, :, None, None], atol=1e-4, rtol=1e-5)

    # Fixed grid: inside the scan exact, past its end the last valid frame is held.
    out = resample_frames(frames, times, lengths, n_out=11, t_end=10.0)
    grid = torch.linspace(0, 10.0, 11)[None, :].expand(b, 11)
    held = torch.minimum(grid, t_end)
    torch.testing.assert_close(out, a + c * held[:, :, None, None], atol=1e-4, rtol=1e-5)


def test_unitobrain_shape_and_padding() -> None:
    model = UniToBrain(n_frames=6, base=4, depth=2)
    frames, times, lengths = make_batch(b=3, t=8, h=13, w=17, lengths=[8, 5, 3])
    out = model(frames, times, lengths)
    assert out.shape == (3, 3, 13, 17)
    frames_p, times_p = pad_time(frames, times, extra=4)
    torch.testing.assert_close(model(frames_p, times_p, lengths), out, atol=ATOL, rtol=0)
    for i, n in enumerate(lengths.tolist()):
        alone = model(frames[i : i + 1, :n], times[i : i + 1, :n], lengths[i : i + 1])
        torch.testing.assert_close(alone, out[i : i + 1], atol=ATOL, rtol=0)
    out.sum().backward()
    assert_grads(model)
    with pytest.raises(ValueError, match="n_frames"):
        UniToBrain(n_frames=1)


# --------------------------------------------------------------------------- arterial context
def _arterial(times: torch.Tensor, lengths: torch.Tensor, delay_s: float = 0.0) -> torch.Tensor:
    """Reference curves ``(B, T)`` as collate pads them (zero past lengths)."""
    curve = 300.0 * torch.exp(-(((times - 6.0 - delay_s) / 3.0) ** 2))
    return curve * (torch.arange(times.shape[1])[None, :] < lengths[:, None])


@pytest.mark.parametrize(
    ("encoder", "order"),
    [(e, o) for o in ("spatial_first", "temporal_first") for e in ENCODERS] + [("lstm", "joint")],
)
def test_arterial_context_is_padding_invariant_and_matters(encoder: str, order: str) -> None:
    model = STMDLP(encoder=encoder, order=order, arterial_context=True, **TINY)
    frames, times, lengths = make_batch(b=3, t=10, lengths=[10, 6, 4])
    arterial = _arterial(times, lengths)
    ref = model(frames, times, lengths, arterial_hu=arterial)
    frames_p, times_p = pad_time(frames, times, extra=3)
    arterial_p = torch.cat([arterial, torch.full((3, 3), 123.0)], dim=1)  # junk in the padding is ignored
    torch.testing.assert_close(model(frames_p, times_p, lengths, arterial_hu=arterial_p), ref, atol=ATOL, rtol=0)
    for i, n in enumerate(lengths.tolist()):
        one = slice(i, i + 1)
        alone = model(frames[one, :n], times[one, :n], lengths[one], arterial_hu=arterial[one, :n])
        torch.testing.assert_close(alone, ref[i : i + 1], atol=ATOL, rtol=0)
    later = model(frames, times, lengths, arterial_hu=_arterial(times, lengths, delay_s=3.0))
    assert (later - ref).abs().max() > 1e-7, "the arterial curve must reach the output (exactly 0 if unused)"
    with pytest.raises(ValueError, match="arterial_hu"):
        model(frames, times, lengths)


def test_paper_model_ignores_the_arterial_curve() -> None:
    model = STMDLP(encoder="cnn", **TINY)
    frames, times, lengths = make_batch(b=2, t=8)
    torch.testing.assert_close(model(frames, times, lengths, arterial_hu=_arterial(times, lengths)),
                               model(frames, times, lengths), atol=0, rtol=0)


def test_arterial_reference_finds_the_phantom_aif_and_crops_carry_it() -> None:
    """The label-free reference follows the phantom's true AIF (timing exact, shape r > 0.99 at 3 HU), and a
    training crop — which rarely holds an artery — carries its whole slice's curve."""
    import numpy as np

    from stm_dlp.data.datamodule import SliceDataset
    from stm_dlp.data.phantom import PhantomConfig, simulate_patient
    from stm_dlp.perfusion.arterial import arterial_reference

    study = simulate_patient(PhantomConfig(height=48, width=48, n_slices=2, noise_hu=3.0), seed=4)
    for s in range(study.n_slices):
        ref = arterial_reference(torch.from_numpy(study.frames[s]), torch.from_numpy(study.times_s[s]))
        true = study.meta["aif_hu"][s]
        assert np.corrcoef(ref.curve_hu.numpy(), true)[0, 1] > 0.99
        assert ref.time_to_peak_s == pytest.approx(float(study.times_s[s][true.argmax()] - study.times_s[s][0]))
    whole = SliceDataset([study])[0]
    crops = SliceDataset([study], crop_size=8)
    for _ in range(3):
        crop = crops[0]
        assert crop.frames.shape[-2:] == (8, 8)
        np.testing.assert_array_equal(crop.arterial_hu, whole.arterial_hu)


def test_arterial_arrival_and_clock() -> None:
    from stm_dlp.models.irfe import arterial_arrival, arterial_channels

    times = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0, 5.0]])
    curve = torch.tensor([[0.0, 0.0, 10.0, 50.0, 100.0, 60.0]])  # 30 % of the peak (30) between t=2 and 3
    valid = torch.ones_like(times)
    assert float(arterial_arrival(curve, times, valid)[0]) == pytest.approx(2.5)
    ch = arterial_channels(curve, torch.tensor([6]), times)
    torch.testing.assert_close(ch[0, :, 2], times[0] - 2.5)
    torch.testing.assert_close(ch[0, :, 0], curve[0] / 100.0)
    short = arterial_channels(curve, torch.tensor([4]), times)  # the peak past lengths is not seen
    assert float(short[0, 3, 0]) == pytest.approx(1.0) and float(short[0, 4:].abs().sum()) == 0.0


def test_arterial_reference_ignores_impulse_noise() -> None:
    """One-frame HU spikes (impulse noise, 0.5 % of the pixels of every frame, ±200–1000 HU) must not pass for
    the arterial peak: the degraded context stays the arterial curve."""
    import numpy as np

    from stm_dlp.data.phantom import PhantomConfig, simulate_patient
    from stm_dlp.perfusion.arterial import arterial_reference

    study = simulate_patient(PhantomConfig(height=48, width=48, n_slices=1, noise_hu=3.0), seed=4)
    rng = np.random.default_rng(0)
    frames = study.frames[0].copy()
    hit = rng.uniform(size=frames.shape) < 0.005
    frames[hit] += rng.choice([-1.0, 1.0], hit.sum()) * rng.uniform(200, 1000, hit.sum())
    ref = arterial_reference(torch.from_numpy(frames), torch.from_numpy(study.times_s[0]))
    assert np.corrcoef(ref.curve_hu.numpy(), study.meta["aif_hu"][0])[0, 1] > 0.98
