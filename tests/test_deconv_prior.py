"""The deconvolution prior: the calc's maps of a slice with its arterial reference as the AIF, carried in
the batch beside the frames (stm_dlp.data.context.deconvolution_prior, CTPBatch.prior_maps) and read by
STMDLP(deconv_prior=True)."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest
import torch

from stm_dlp.data.context import attach_arterial, deconvolution_prior, delay_tissue
from stm_dlp.data.datamodule import SliceDataset
from stm_dlp.data.phantom import PhantomConfig, simulate_patient
from stm_dlp.models import STMDLP
from stm_dlp.types import PARAMS, collate_slices

TINY = dict(encoder="cnn", spatial_channels=4, unet_depth=1, temporal_hidden=8, mpp_hidden=8,
            arterial_context=True)


@pytest.fixture(scope="module")
def study():
    return simulate_patient(PhantomConfig(height=40, width=40, n_slices=1, noise_hu=1.0, lesion_probability=1.0,
                                          frames_min=30, frames_max=30),
                            seed=3)


def test_prior_reads_the_phantom_tmax_and_is_zero_outside_the_brain(study) -> None:
    sample = attach_arterial(study.slice_sample(0), prior=True)
    prior = sample.prior_maps
    assert prior.shape == (len(PARAMS), 40, 40) and prior.dtype == np.float32
    assert not prior[:, ~sample.mask].any()
    tmax_true, tmax_prior = sample.maps[PARAMS.index("tmax")], prior[PARAMS.index("tmax")]
    lesion, normal = sample.mask & (tmax_true > 6), sample.mask & (tmax_true < 2) & (tmax_prior > 0)
    assert lesion.sum() > 10
    assert np.median(tmax_prior[lesion]) > 5.0 > 2.5 > np.median(tmax_prior[normal])
    cbf_true, cbf_prior = sample.maps[PARAMS.index("cbf")], prior[PARAMS.index("cbf")]
    both = normal & (cbf_prior > 0)
    assert np.corrcoef(cbf_true[both], cbf_prior[both])[0, 1] > 0.5


def test_prior_needs_the_reference_and_survives_a_flat_one(study, caplog) -> None:
    with pytest.raises(ValueError, match="arterial reference"):
        deconvolution_prior(study.slice_sample(0))
    sample = study.slice_sample(0)
    flat = dataclasses.replace(sample, frames=np.full_like(sample.frames, 30.0))
    with caplog.at_level(logging.WARNING):
        prior = attach_arterial(flat, prior=True).prior_maps
    assert prior.shape == (3, 40, 40) and not prior.any()
    assert "no deconvolution prior" in caplog.text


def test_crops_carry_their_part_of_the_whole_slice_prior(study) -> None:
    whole = SliceDataset([study], deconv_prior=True)[0]
    crops = SliceDataset([study], crop_size=8, deconv_prior=True)
    for _ in range(3):
        crop = crops[0]
        assert crop.prior_maps.shape == (3, 8, 8)
        # find the crop in the slice by its frames, then its prior must be that part of the whole one
        hits = [(y, x) for y in range(33) for x in range(33)
                if np.array_equal(whole.frames[:, y:y + 8, x:x + 8], crop.frames)]
        assert len(hits) == 1
        y, x = hits[0]
        np.testing.assert_array_equal(crop.prior_maps, whole.prior_maps[:, y:y + 8, x:x + 8])
    batch = collate_slices([crops[0], crops[0]])
    assert batch.prior_maps.shape == (2, 3, 8, 8)
    assert set(batch.model_inputs()) == {"frames", "times_s", "lengths", "arterial_hu", "prior_maps"}
    with pytest.raises(ValueError, match="with and without a deconvolution prior"):
        collate_slices([crops[0], dataclasses.replace(crops[0], prior_maps=None)])


def test_model_reads_the_prior_and_asks_for_it(study) -> None:
    torch.manual_seed(0)
    model = STMDLP(deconv_prior=True, **TINY).eval()
    batch = collate_slices([attach_arterial(study.slice_sample(0), prior=True)])
    with torch.no_grad():
        y = model(**batch.model_inputs())
        assert y.shape == (1, 3, 40, 40)
        changed = model(**{**batch.model_inputs(), "prior_maps": batch.prior_maps * 2})
        assert not torch.allclose(y, changed)
        with pytest.raises(ValueError, match="deconvolution prior"):
            model(**{**batch.model_inputs(), "prior_maps": None})
    plain = STMDLP(**TINY)
    assert plain.mpp.first.in_channels + 3 == model.mpp.first.in_channels


def test_noise_only_augmentation_keeps_the_acquired_prior_and_others_recompute(study) -> None:
    from stm_dlp.data.corrupt import Compose, GaussianNoise, RigidMotion

    acquired = SliceDataset([study], deconv_prior=True)[0].prior_maps
    noisy = SliceDataset([study], Compose([GaussianNoise(8.0)]), deconv_prior=True)
    assert noisy.prior_cache
    a, b = noisy[0], noisy[0]
    assert not np.array_equal(a.frames, b.frames)
    np.testing.assert_array_equal(a.prior_maps, acquired)
    np.testing.assert_array_equal(b.prior_maps, acquired)
    fresh = SliceDataset([study], Compose([GaussianNoise(8.0)]), deconv_prior=True, prior_cache=False)[0]
    assert not np.array_equal(fresh.prior_maps, acquired)
    moved = SliceDataset([study], Compose([RigidMotion()]), deconv_prior=True)
    assert not moved.prior_cache


def test_prior_bank_pairs_each_augmented_version_with_its_own_prior(study) -> None:
    """``prior_bank=K``: every sample is one of K augmented versions drawn once per slice, and its prior is
    that version's (as ``prior_cache=False`` would compute it on the same frames), not the acquired one."""
    from stm_dlp.data.corrupt import Compose, GaussianNoise

    acquired = SliceDataset([study], deconv_prior=True)[0].prior_maps
    bank = SliceDataset([study], Compose([GaussianNoise(20.0)]), deconv_prior=True, prior_bank=2)
    torch.manual_seed(0)
    samples = [bank[0] for _ in range(12)]
    versions = {s.frames.tobytes(): s for s in samples}
    assert len(versions) == 2  # two versions, each drawn again and again
    for s in versions.values():
        assert not np.array_equal(s.prior_maps, acquired)
        own = deconvolution_prior(s)  # the prior recomputed on this version's frames (with its reference)
        np.testing.assert_allclose(s.prior_maps, own, rtol=1e-5, atol=1e-5)
    again = SliceDataset([study], Compose([GaussianNoise(20.0)]), deconv_prior=True, prior_bank=2)
    assert {again[0].frames.tobytes() for _ in range(12)} <= set(versions)  # seeded by slice and version
    assert SliceDataset([study], Compose([GaussianNoise(20.0)]), prior_bank=2).prior_bank == 0  # no prior: off
    with pytest.raises(ValueError, match="prior_bank"):
        SliceDataset([study], Compose([GaussianNoise(20.0)]), deconv_prior=True, prior_bank=-1)


def test_tmax_from_prior_starts_at_the_prior_and_learns_corrections(study) -> None:
    """With ``tmax_from_prior`` a head output of 0 returns the prior's TMAX in the target space (over the TMAX
    target scale the LightningModule sets) and the head's output moves it both ways; CBV / CBF are
    unaffected by the option; the scale travels with the weights."""
    from stm_dlp.lit import PerfusionLitModule

    torch.manual_seed(0)
    model = STMDLP(deconv_prior=True, tmax_from_prior=True, **TINY).eval()
    PerfusionLitModule(model, target_scale=[4.0, 60.0, 2.5])
    assert float(model.tmax_unit_s) == 2.5
    batch = collate_slices([attach_arterial(study.slice_sample(0), prior=True)])
    i = PARAMS.index("tmax")
    prior_tmax = batch.prior_maps[:, i] / 2.5
    with torch.no_grad():
        model.mpp.out.weight[i].zero_()
        model.mpp.out.bias[i] = 0.0
        y = model(**batch.model_inputs())
        late = prior_tmax > 0.3  # above the sharp softplus's knee
        assert late.sum() > 20
        torch.testing.assert_close(y[:, i][late], prior_tmax[late], atol=1e-3, rtol=0)
        model.mpp.out.bias[i] = -0.2  # a correction lowers TMAX by the same amount
        lowered = model(**batch.model_inputs())[:, i]
        torch.testing.assert_close(lowered[prior_tmax > 0.6], prior_tmax[prior_tmax > 0.6] - 0.2, atol=1e-3, rtol=0)
        assert (lowered >= 0).all()
        plain = STMDLP(deconv_prior=True, **TINY).eval()
        plain.load_state_dict({k: v for k, v in model.state_dict().items() if k != "tmax_unit_s"})
        torch.testing.assert_close(plain(**batch.model_inputs())[:, :i], y[:, :i])
        reloaded = STMDLP(deconv_prior=True, tmax_from_prior=True, **TINY).eval()
        reloaded.load_state_dict(model.state_dict())
        torch.testing.assert_close(reloaded(**batch.model_inputs()), model(**batch.model_inputs()))
    with pytest.raises(ValueError, match="tmax_from_prior needs deconv_prior"):
        STMDLP(tmax_from_prior=True, **TINY)


def test_prior_alone_as_a_map_provider(study) -> None:
    """experiments.bench.accuracy.PriorMaps (the cross-family table's "prior alone" row): the prior of every
    slice, MTT from CBV / CBF, 0 outside the mask, evaluated like any method."""
    from experiments.bench.accuracy import PriorMaps
    from stm_dlp.calc_eval import evaluate_studies

    maps, _ = PriorMaps().maps(study)
    assert set(maps) == {"cbv", "cbf", "tmax", "mtt"} and maps["tmax"].shape == (1, 40, 40)
    assert (maps["tmax"][~np.asarray(study.mask, bool)] == 0).all()
    np.testing.assert_allclose(maps["tmax"][0], attach_arterial(study.slice_sample(0), prior=True).prior_maps[2])
    res = evaluate_studies(PriorMaps(), [study])
    assert res["tmax"]["r2"] > 0.5


@pytest.mark.parametrize("delay_s", [-0.8, 1.0, 2.0])
def test_delayed_tissue_reads_as_if_deconvolved_with_the_shifted_reference(study, delay_s, monkeypatch) -> None:
    """delay_tissue is physics: deconvolving the same frames with the shifted reference gives the original
    prior's TMAX moved by the delay and its CBV, which is what the augmentation writes without the cost."""
    import stm_dlp.data.context as context

    # Compare the two deconvolutions through the 9 x 9 TMAX median they had when this test was written: at this
    # 5.5 mm phantom the default (7 mm) is 3 x 3, and per-pixel TMAX noise of two independent deconvolutions
    # (mean |difference| 0.3-0.6 s) would hide what is tested here, the delay.
    monkeypatch.setitem(context.PRIOR_OPTIONS, "tmax_median_px", 4)
    sample = attach_arterial(study.slice_sample(0), prior=True)
    delayed = delay_tissue(sample, delay_s)
    k = PARAMS.index("tmax")
    brain = sample.mask & (sample.maps[PARAMS.index("cbf")] > 5)
    np.testing.assert_allclose(delayed.maps[k][brain], np.maximum(sample.maps[k][brain] + delay_s, 0), atol=1e-5)
    for p in ("cbv", "cbf"):  # the flow labels do not move
        np.testing.assert_array_equal(delayed.maps[PARAMS.index(p)], sample.maps[PARAMS.index(p)])
    assert not delayed.maps[k][~sample.mask].any()  # outside the brain stays 0
    recomputed = deconvolution_prior(dataclasses.replace(delayed, prior_maps=None))
    perfused = brain & (sample.prior_maps[PARAMS.index("cbf")] > 5)
    assert np.abs(recomputed[k][perfused] - delayed.prior_maps[k][perfused]).mean() < 0.25
    assert np.abs(recomputed[k][perfused] - sample.prior_maps[k][perfused]).mean() > 0.5 * abs(delay_s)
    cbv = PARAMS.index("cbv")
    assert np.median(recomputed[cbv][perfused]) == pytest.approx(np.median(sample.prior_maps[cbv][perfused]), rel=0.05)


def test_tissue_delay_augmentation_moves_each_sample_by_one_delay(study) -> None:
    acquired = SliceDataset([study], deconv_prior=True)[0]
    augmented = SliceDataset([study], deconv_prior=True, tissue_delay_s=(-1.0, 2.0))
    k = PARAMS.index("tmax")
    moved = acquired.mask & (acquired.maps[k] > 0)
    delays = []
    for _ in range(8):
        sample = augmented[0]
        shift = sample.maps[k][moved] - acquired.maps[k][moved]
        assert np.ptp(shift[acquired.maps[k][moved] > 1.0]) < 1e-4  # one delay per sample
        delays.append(float(np.median(shift)))
        np.testing.assert_array_equal(sample.frames, acquired.frames)  # the frames are the acquired ones
    assert -1.0 - 1e-6 <= min(delays) and max(delays) <= 2.0 + 1e-6 and np.ptp(delays) > 0.3
    # a negative delay never takes more than the slice's 5th-percentile TMAX: hardly any pixel is floored at 0
    floor = np.percentile(acquired.maps[k][moved], 5)
    assert min(delays) >= -floor - 1e-6
    with pytest.raises(ValueError, match="tissue_delay_s"):
        SliceDataset([study], tissue_delay_s=(2.0, 1.0))


def test_tmax_correction_bound_keeps_inference_near_the_prior(study) -> None:
    """``tmax_correction_s``: at inference TMAX is within the bound of the prior's wherever the prior has a
    value; training sees the unbounded output; CBV / CBF are untouched."""
    from stm_dlp.lit import PerfusionLitModule
    from stm_dlp.models.stm_dlp import bounded_tmax

    pred, prior = torch.tensor([0.5, 4.0, 9.0, 3.0]), torch.tensor([1.0, 1.0, 8.5, 0.0])
    torch.testing.assert_close(bounded_tmax(pred, prior, 1.0), torch.tensor([0.5, 2.0, 9.0, 3.0]))
    torch.manual_seed(0)
    model = STMDLP(deconv_prior=True, tmax_correction_s=0.5, **TINY)
    PerfusionLitModule(model, target_scale=[4.0, 60.0, 2.5])
    batch = collate_slices([attach_arterial(study.slice_sample(0), prior=True)])
    i = PARAMS.index("tmax")
    prior_s = batch.prior_maps[:, i]
    with torch.no_grad():
        model.mpp.out.bias[i] = 3.0  # an untrained head far from the prior
        free = model.train()(**batch.model_inputs())
        bounded = model.eval()(**batch.model_inputs())
    has_prior = prior_s > 0
    assert has_prior.sum() > 20
    assert (free[:, i] * 2.5 - prior_s)[has_prior].abs().max() > 1.0  # the unbounded output strays ...
    assert (bounded[:, i] * 2.5 - prior_s)[has_prior].abs().max() <= 0.5 + 1e-4  # ... inference does not
    torch.testing.assert_close(bounded[:, i][~has_prior], free[:, i][~has_prior])
    torch.testing.assert_close(bounded[:, :i], free[:, :i])
    with pytest.raises(ValueError, match="tmax_correction_s needs deconv_prior"):
        STMDLP(tmax_correction_s=1.0, **TINY)


def test_tmax_level_from_prior_shifts_each_slice_to_the_priors_normal_tissue(study) -> None:
    """``prior_levelled_tmax``: a network that reads every pixel 1.7 s late (its training generator's level)
    reads normal tissue at the prior's level after levelling, and keeps its lesion contrast; a slice without
    enough normal tissue is left alone; the model applies it at inference only."""
    from stm_dlp.lit import PerfusionLitModule
    from stm_dlp.models.stm_dlp import NORMAL_TISSUE_TMAX_S, prior_levelled_tmax
    from stm_dlp.perfusion.readout import ReadoutThresholds

    # models/ does not import perfusion/: the constant mirrors the readout's threshold and must not drift
    assert NORMAL_TISSUE_TMAX_S == ReadoutThresholds().hypoperfusion_tmax_s
    g = torch.Generator().manual_seed(0)
    prior = 1.0 + 0.3 * torch.rand(2, 12, 12, generator=g)
    prior[:, :3] = 9.0  # a lesion the prior reads
    prior[:, :, :2] = 0.0  # outside the brain
    truth = prior.clone()
    truth[:, :3] = 10.0
    pred = truth + 1.7  # the generator's level carried over
    pred[1] = truth[1] - 0.5
    levelled = prior_levelled_tmax(pred, prior)
    normal = (prior > 0) & (prior < 6)
    assert (levelled - prior)[normal].abs().max() < 1e-5  # normal tissue at the prior's level
    torch.testing.assert_close(levelled[:, :3, 2:], truth[:, :3, 2:])  # the lesion's contrast is the network's
    few = torch.zeros(1, 12, 12)
    few[0, 0, :5] = 1.0
    torch.testing.assert_close(prior_levelled_tmax(torch.full((1, 12, 12), 3.0), few), torch.full((1, 12, 12), 3.0))
    assert prior_levelled_tmax(torch.zeros(1, 4, 4), torch.full((1, 4, 4), 2.0)).min() >= 0.0  # never negative

    torch.manual_seed(0)
    model = STMDLP(deconv_prior=True, tmax_level_from_prior=True, **TINY)
    PerfusionLitModule(model, target_scale=[4.0, 60.0, 2.5])
    batch = collate_slices([attach_arterial(study.slice_sample(0), prior=True)])
    i = PARAMS.index("tmax")
    prior_s = batch.prior_maps[:, i]
    with torch.no_grad():
        model.mpp.out.bias[i] = 3.0
        free = model.train()(**batch.model_inputs())
        level = model.eval()(**batch.model_inputs())
    normal = (prior_s > 0) & (prior_s < 6)
    assert normal.sum() > 20
    assert (free[:, i] * 2.5 - prior_s)[normal].median().abs() > 1.0
    assert (level[:, i] * 2.5 - prior_s)[normal].median().abs() < 1e-3
    torch.testing.assert_close(level[:, :i], free[:, :i])
    with pytest.raises(ValueError, match="tmax_level_from_prior needs deconv_prior"):
        STMDLP(tmax_level_from_prior=True, **TINY)
