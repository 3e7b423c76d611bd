"""The study-level arterial reference (stm_dlp.perfusion.arterial.pool_references,
stm_dlp.data.context.study_references): one curve for every slice of a study, carried by training,
evaluation and prediction alike; shuttle-mode studies and ``arterial_pooling="slice"`` keep each slice's own."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from stm_dlp.curves import rise_time
from stm_dlp.data.context import reference_on, study_references
from stm_dlp.data.corrupt import Reframe
from stm_dlp.data.datamodule import SliceDataset
from stm_dlp.perfusion.arterial import pool_references
from stm_dlp.predict import predict_study
from stm_dlp.types import PARAMS, Study

SIZE, T = 32, 30
TIMES = np.arange(T, dtype=np.float32) * 1.5  # s
ARTERIES = ((10, 12), (10, 19), (20, 11), (21, 20))


def gamma(t: np.ndarray, t0: float, peak: float, beta: float = 1.5) -> np.ndarray:
    s = np.clip(t - t0, 0.0, None)
    g = s**3 * np.exp(-s / beta)
    return peak * g / g.max()


def head_study(rng: np.random.Generator, n_slices: int = 5, t0: float = 9.0, noise_hu: float = 2.0,
               arteryless: tuple[int, ...] = (0,)) -> Study:
    """A study of ``n_slices`` ``(T, 32, 32)`` head slices (30 HU brain in a 1000 HU skull), four artery pixels at
    30 % partial volume of a 400 HU AIF arriving at ``t0`` s, a full-volume sinus (3 s later) against the skull
    and 5 HU tissue enhancement; the ``arteryless`` slices have no artery (e.g. the vertex)."""
    yy, xx = np.mgrid[:SIZE, :SIZE]
    r = np.hypot(yy - SIZE / 2 + 0.5, xx - SIZE / 2 + 0.5)
    base = np.where(r < 12, 30.0, np.where(r < 14, 1000.0, -1000.0))
    aif, tissue = gamma(TIMES, t0, 400.0), gamma(TIMES, t0 + 1.5, 5.0, beta=3.0)
    vof = gamma(TIMES, t0 + 3.0, 250.0, beta=2.5)
    slices = []
    for s in range(n_slices):
        frames = np.repeat(base[None], T, 0) + (r < 12)[None] * tissue[:, None, None]
        if s not in arteryless:
            for (y, x) in ARTERIES:
                frames[:, y, x] = base[y, x] + 0.3 * aif + 0.7 * tissue
        frames[:, 23:26, 15:18] = 30.0 + vof[:, None, None]
        slices.append(frames + rng.normal(0.0, noise_hu, frames.shape))
    maps = np.zeros((n_slices, len(PARAMS), SIZE, SIZE), np.float32)
    return Study(frames=np.stack(slices).astype(np.float32), times_s=np.repeat(TIMES[None], n_slices, 0),
                 affine=np.eye(4), maps=maps, mask=np.repeat((r < 12)[None], n_slices, 0), patient_id="p")


def arrival(curve: np.ndarray) -> float:
    return float(rise_time(torch.as_tensor(curve, dtype=torch.float32), torch.from_numpy(TIMES)))


def test_a_slice_without_an_artery_gets_its_studys_arterial_input() -> None:
    study = head_study(np.random.default_rng(0))
    own, pooled = study_references(study, "slice"), study_references(study, "study")
    true_arrival = arrival(gamma(TIMES, 9.0, 400.0))
    # the vertex slice's own search finds the sinus, seconds late; with the study's reference every slice reads
    # the arteries' timing
    assert arrival(own[0]) - true_arrival > 1.5
    assert all(abs(arrival(own[s]) - true_arrival) < 0.5 for s in range(1, study.n_slices))
    assert np.array_equal(pooled, np.repeat(pooled[:1], study.n_slices, 0))
    assert abs(arrival(pooled[0]) - true_arrival) < 0.5


def test_shuttle_mode_and_slice_pooling_keep_each_slices_own() -> None:
    curves = torch.stack([torch.from_numpy(gamma(TIMES, t0, peak)) for t0, peak in ((9.0, 200.0), (9.0, 300.0),
                                                                                    (3.0, 500.0))])
    same = torch.from_numpy(np.repeat(TIMES[None], 3, 0))
    pooled = pool_references(curves, same)  # one noise peak's early "arrival" does not move the median
    assert torch.equal(pooled, pooled[:1].expand(3, -1))
    assert abs(arrival(pooled[0].numpy()) - arrival(curves[1].numpy())) < 0.5
    shuttle = same + torch.tensor([[0.0], [0.7], [1.4]])  # slices scanned at different times
    assert torch.equal(pool_references(curves, shuttle), curves)
    assert torch.equal(pool_references(curves, same, "slice"), curves)
    with pytest.raises(ValueError, match="arterial pooling must be one of"):
        pool_references(curves, same, "mean")


def test_training_samples_carry_the_study_reference_on_their_own_framing() -> None:
    study = head_study(np.random.default_rng(1))
    pooled = study_references(study)[0]
    plain = SliceDataset([study])
    assert all(np.array_equal(plain[i].arterial_hu, pooled) for i in range(study.n_slices))
    reframed = SliceDataset([study], transform=Reframe(interval_s_range=(2.0, 3.0), p=1.0), crop_size=16)
    torch.manual_seed(0)
    sample = reframed[0]
    assert sample.frames.shape[0] == sample.arterial_hu.shape[0] < T
    np.testing.assert_allclose(sample.arterial_hu, reference_on(pooled, TIMES, sample.times_s), atol=1e-4)
    own = SliceDataset([study], transform=Reframe(interval_s_range=(2.0, 3.0), p=1.0), arterial_pooling="slice")
    vertex = own[0]  # its own reference, from its augmented frames
    assert arrival(np.interp(TIMES, vertex.times_s, vertex.arterial_hu)) - arrival(pooled) > 1.5
    with pytest.raises(ValueError, match="data.arterial_pooling"):
        SliceDataset([study], arterial_pooling="median")


class _Recorder(nn.Module):
    """A stand-in network that records the arterial references prediction gives it."""

    def __init__(self, arterial_pooling: str) -> None:
        super().__init__()
        self.arterial_pooling, self.seen = arterial_pooling, []

    def forward(self, frames, times_s, lengths, arterial_hu=None, **_):
        self.seen.append(arterial_hu.clone())
        return torch.ones(frames.shape[0], len(PARAMS), *frames.shape[-2:])


@pytest.mark.parametrize("pooling", ["study", "slice"])
def test_prediction_gives_the_model_the_reference_it_was_trained_with(pooling) -> None:
    study = head_study(np.random.default_rng(2))
    model = _Recorder(pooling)
    predict_study(model, torch.ones(len(PARAMS)), study, batch_size=2)
    seen = torch.cat(model.seen).numpy()
    np.testing.assert_allclose(seen, study_references(study, pooling), atol=1e-5)
    assert np.array_equal(seen[0], seen[1]) == (pooling == "study")


def test_the_model_keeps_its_pooling_and_refuses_an_unknown_one() -> None:
    from stm_dlp.models import STMDLP

    assert STMDLP(encoder="cnn", spatial_channels=4, unet_depth=1, temporal_hidden=8, mpp_hidden=8,
                  arterial_pooling="study").arterial_pooling == "study"
    with pytest.raises(ValueError, match="arterial_pooling must be one of"):
        STMDLP(arterial_pooling="mean")
