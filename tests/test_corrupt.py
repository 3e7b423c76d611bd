"""Corruption transforms: seeded, composable, shape-consistent, usable on slices and studies."""

from __future__ import annotations

import numpy as np
import pytest

from stm_dlp.data import corrupt as C


@pytest.mark.parametrize("name", list(C.NAMED_CORRUPTIONS))
def test_named_corruptions_are_seeded_and_valid(tiny_study, name):
    tr = C.named_corruption(name)
    a = C.corrupt_study(tiny_study, tr, seed=7)
    b = C.corrupt_study(tiny_study, tr, seed=7)
    np.testing.assert_array_equal(a.frames, b.frames)
    np.testing.assert_array_equal(a.maps, tiny_study.maps)  # labels never change
    assert a.frames.shape[0] == tiny_study.frames.shape[0]
    assert np.all(np.diff(a.times_s, axis=1) > 0)
    if name != "none":
        assert a.frames.shape != tiny_study.frames.shape or not np.allclose(a.frames, tiny_study.frames)


def test_single_slice_and_study_inputs(tiny_study):
    rng = np.random.default_rng(0)
    f, t = C.RigidMotion(fraction=1.0)(tiny_study.frames[0], tiny_study.times_s[0], rng)
    assert f.shape == tiny_study.frames[0].shape and t.shape == tiny_study.times_s[0].shape


def test_drop_frames_keeps_times_and_first_frame(tiny_study):
    f, t = C.DropFrames(fraction=0.3, min_frames=4)(tiny_study.frames, tiny_study.times_s,
                                                     np.random.default_rng(1))
    n = tiny_study.n_frames
    assert f.shape[1] == n - round(0.3 * n)
    assert t[0, 0] == tiny_study.times_s[0, 0]
    assert set(t[0].tolist()) <= set(tiny_study.times_s[0].tolist())  # kept frames keep their times
    k = list(tiny_study.times_s[0]).index(t[0, 3])
    np.testing.assert_array_equal(f[:, 3], tiny_study.frames[:, k])


def test_truncate_first_k(tiny_study):
    f, t = C.Truncate(keep_fraction=0.5)(tiny_study.frames, tiny_study.times_s, np.random.default_rng(0))
    k = round(0.5 * tiny_study.n_frames)
    np.testing.assert_array_equal(f, tiny_study.frames[:, :k])
    with pytest.raises(ValueError, match="keep_fraction"):
        C.Truncate(keep_fraction=0.0)


def test_rigid_warp_identity_and_shift():
    img = np.zeros((1, 16, 16), np.float32)
    img[0, 8, 8] = 1.0
    same = C.rigid_warp(img, np.zeros((1, 2)), np.zeros(1))
    np.testing.assert_allclose(same, img, atol=1e-5)
    moved = C.rigid_warp(img, np.array([[0.0, 2.0]]), np.zeros(1))
    assert moved[0, 8, 10] == pytest.approx(1.0, abs=1e-4)


def test_jitter_interpolates_linear_signals_exactly():
    times = np.arange(20, dtype=np.float32) * 2.0
    frames = (3.0 * times[:, None, None] + np.zeros((20, 4, 4))).astype(np.float32)
    f, t = C.JitterFraming(sigma_fraction=0.3)(frames, times, np.random.default_rng(3))
    assert not np.allclose(t, times)
    np.testing.assert_allclose(f[:, 0, 0], 3.0 * t, rtol=1e-4, atol=1e-3)


def test_compose_and_noise_level(tiny_study):
    tr = C.Compose([C.GaussianNoise(sigma_hu=10.0), C.Truncate(keep_frames=6)])
    f, _ = tr(tiny_study.frames, tiny_study.times_s, np.random.default_rng(0))
    assert f.shape[1] == 6
    assert 8.5 < float((f - tiny_study.frames[:, :6]).std()) < 11.5


def test_unknown_corruption_lists_valid_names():
    with pytest.raises(ValueError, match="motion"):
        C.named_corruption("earthquake")


def test_base_class_probability_check_and_study_view(tiny_study):
    """p gates every transform the same way (one draw per call); a StudyTransform sees a study even for a slice."""
    seen = []

    class Record(C.StudyTransform):
        def apply_study(self, frames, times_s, rng):
            seen.append(frames.shape)
            return frames + 1.0, times_s

    f, t = tiny_study.frames[0], tiny_study.times_s[0]
    rng = np.random.default_rng(5)
    out_f, out_t = Record(p=0.0)(f, t, rng)
    assert out_f is f and out_t is t and not seen  # skipped, input returned as is
    assert rng.uniform() == np.random.default_rng(5).uniform(size=2)[1]  # exactly one draw was used
    out_f, out_t = Record()(f, t, np.random.default_rng(5))
    assert seen == [(1, *f.shape)] and out_f.shape == f.shape and out_t.shape == t.shape
    np.testing.assert_array_equal(out_f, f + 1.0)
    # every named corruption is a RandomTransform or a Compose of them (the empty one: "none"); p stays keyword-only
    for name, tr in C.NAMED_CORRUPTIONS.items():
        parts = tr.transforms if isinstance(tr, C.Compose) else [tr]
        assert all(isinstance(t, C.RandomTransform) for t in parts) and (parts or name == "none"), name
    assert C.GaussianNoise(4.0, p=0.5).sigma_hu == 4.0
    with pytest.raises(TypeError):
        C.GaussianNoise(4.0, 0.5)


# ----------------------------------------------------------------------------- scanner-spanning augmentations
def test_noise_level_is_drawn_per_sample_in_a_range_that_includes_none(tiny_study):
    f, t = tiny_study.frames[0], tiny_study.times_s[0]
    tr = C.GaussianNoise(sigma_hu_range=[0, 30])  # a config gives a list
    assert tr.sigma_hu_range == (0.0, 30.0)
    levels = [float((tr(f, t, np.random.default_rng(s))[0] - f).std()) for s in range(40)]
    assert min(levels) < 3 and max(levels) > 25 and max(levels) < 31  # from (almost) none to 30 HU
    a, _ = tr(f, t, np.random.default_rng(3))
    np.testing.assert_array_equal(a, tr(f, t, np.random.default_rng(3))[0])
    assert a.dtype == np.float32
    np.testing.assert_array_equal(C.GaussianNoise(sigma_hu_range=(0, 0))(f, t, np.random.default_rng(0))[0], f)
    with pytest.raises(ValueError, match="sigma_hu_range"):
        C.GaussianNoise(sigma_hu_range=(5, 1))
    # structured noise draws its level the same way
    fixed = C.StructuredNoise(sigma_hu_range=(12, 12), streak_probability=0.0)
    assert float((fixed(f, t, np.random.default_rng(1))[0] - f).std()) == pytest.approx(12, rel=0.1)


def test_impulse_noise_adds_sparse_signed_spikes(tiny_study):
    f, t = tiny_study.frames, tiny_study.times_s
    out, t2 = C.ImpulseNoise(fraction_range=(0.02, 0.02), amplitude_hu_range=(300, 800))(f, t, np.random.default_rng(4))
    assert t2 is t and out.shape == f.shape and out.dtype == np.float32
    delta = (out - f)[out != f]
    assert 0.01 < delta.size / f.size < 0.03
    assert np.all((np.abs(delta) > 299.9) & (np.abs(delta) < 800.1))
    assert (delta > 0).any() and (delta < 0).any()  # salt and pepper
    np.testing.assert_array_equal(C.ImpulseNoise(fraction_range=(0, 0))(f, t, np.random.default_rng(4))[0], f)


def test_reframe_puts_frames_on_a_new_1_to_3_s_grid_by_linear_interpolation():
    times = np.cumsum(np.r_[0.0, np.full(39, 1.5)]).astype(np.float32)  # 0 .. 58.5 s
    frames = (5.0 + 2.0 * times[:, None, None] + np.zeros((40, 4, 4))).astype(np.float32)
    f, t = C.Reframe(interval_s_range=(1.0, 3.0))(frames, times, np.random.default_rng(2))
    steps = np.diff(t)
    assert t[0] == times[0] and t[-1] <= times[-1] and t[-1] > times[-1] - 3.0
    assert steps.min() >= 1.0 - 1e-5 and steps.max() <= 3.0 + 1e-5 and steps.std() > 0.2  # irregular
    assert f.shape == (t.size, 4, 4)
    np.testing.assert_allclose(f[:, 0, 0], 5.0 + 2.0 * t, rtol=1e-5)  # exact on a linear curve
    # a whole study: one grid for every slice (shifted to each slice's own first time), labels untouched
    two = np.stack([times, times + 0.7])
    f4, t4 = C.Reframe()(np.stack([frames, frames]), two, np.random.default_rng(5))
    assert f4.shape[:2] == t4.shape and t4.shape[0] == 2
    np.testing.assert_allclose(t4[1] - t4[0], 0.7, atol=1e-5)
    few, few_t = frames[:3], times[:3]  # 3 s: at most 4 new frames
    same_f, same_t = C.Reframe(min_frames=5)(few, few_t, np.random.default_rng(0))  # too short: unchanged
    np.testing.assert_array_equal(same_f, few)
    np.testing.assert_array_equal(same_t, few_t)


def test_reframe_on_a_study_keeps_labels_and_valid_times(tiny_study):
    out = C.corrupt_study(tiny_study, C.Reframe(interval_s_range=(1.0, 3.0)), seed=1)
    np.testing.assert_array_equal(out.maps, tiny_study.maps)
    assert np.all(np.diff(out.times_s, axis=1) >= 1.0 - 1e-5)
    assert out.times_s.shape != tiny_study.times_s.shape or not np.allclose(out.times_s, tiny_study.times_s)


def test_drop_frames_fraction_drawn_per_sample(tiny_study):
    tr = C.DropFrames(fraction_range=(0.0, 0.5), min_frames=2)
    kept = {tr(tiny_study.frames, tiny_study.times_s, np.random.default_rng(s))[0].shape[1] for s in range(20)}
    n = tiny_study.n_frames
    assert len(kept) > 2 and max(kept) <= n and min(kept) >= n - round(0.5 * n)
    with pytest.raises(ValueError, match="fraction_range"):
        C.DropFrames(fraction_range=(0.0, 1.0))


def test_default_training_augmentations_from_the_config(tiny_study):
    """The data.augment list of scale=paper (conf/scale/paper.yaml; data.augment points at it):
    scanner-spanning transforms, each applied with a moderate probability (clean samples stay common),
    seeded, never touching labels. scale=laptop keeps light noise and rigid motion, with a prior bank."""
    from conftest import REPO
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        augment = instantiate(compose("config", overrides=["scale=paper"]).data.augment, _convert_="all")
        laptop = instantiate(compose("config").data.augment, _convert_="all")
    assert [type(t) for t in laptop] == [C.GaussianNoise, C.RigidMotion]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        assert compose("config").data.prior_bank == 4  # motion is not noise: each banked version has its own prior
        assert compose("config", overrides=["scale=paper"]).data.prior_bank == 0
    kinds = {type(t) for t in augment}
    assert {C.GaussianNoise, C.ImpulseNoise, C.StructuredNoise, C.Reframe, C.DropFrames, C.RigidMotion} <= kinds
    assert all(0.25 <= t.p <= 0.5 for t in augment)
    clean = np.prod([1 - t.p for t in augment])
    assert clean > 0.1
    tr = C.Compose(augment)
    f, t = tiny_study.frames[0], tiny_study.times_s[0]
    outs = [tr(f, t, np.random.default_rng(s)) for s in range(30)]
    assert sum(o[0] is f for o in outs) >= 1  # some samples pass untouched
    for of, ot in outs:
        assert of.shape[1:] == f.shape[1:] and np.all(np.isfinite(of)) and np.all(np.diff(ot) > 0)
    np.testing.assert_array_equal(tr(f, t, np.random.default_rng(9))[0], tr(f, t, np.random.default_rng(9))[0])
