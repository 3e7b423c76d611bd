"""Motion correction as the model's preprocessing (``data.motion_correction``, ``predict motion=…``)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import tiny_phantom

from stm_dlp.data.corrupt import corrupt_study, named_corruption
from stm_dlp.data.motion import motion_corrected
from stm_dlp.data.phantom import simulate_patient


@pytest.fixture(scope="module")
def still():
    return simulate_patient(tiny_phantom(height=48, width=48, n_slices=1, frames_min=40, frames_max=40), seed=3)


def test_moving_frames_are_brought_back_and_still_ones_left_alone(still):
    """The evaluation's motion corruption (jitter of 30 % of the frames, ≤ 2 px, ≤ 3°) is undone to well
    under its own size inside the brain; a still study comes back bit for bit, with the report saying so."""
    same = motion_corrected(still)
    np.testing.assert_array_equal(same.frames, still.frames)
    assert same.meta["motion_correction"]["moved_frames"] == 0
    moved = corrupt_study(still, named_corruption("motion"), seed=1)
    fixed = motion_corrected(moved)
    brain = still.mask[0].astype(bool)
    err_before = np.abs(moved.frames[0][:, brain] - still.frames[0][:, brain]).mean()
    err_after = np.abs(fixed.frames[0][:, brain] - still.frames[0][:, brain]).mean()
    report = fixed.meta["motion_correction"]
    assert report["moved_frames"] + len(report["failed_frames"]) > 0   # registered, or interpolated in time
    assert err_after < 0.35 * err_before
    assert moved.frames is not fixed.frames and np.isfinite(fixed.frames).all()


def test_unreadable_frames_skip_the_correction(still):
    bad = still.frames.copy()
    bad[0, 3, :4, :4] = np.nan
    import dataclasses

    out = motion_corrected(dataclasses.replace(still, frames=bad))
    assert "non-finite" in out.meta["motion_correction"]["skipped"]
    assert np.isnan(out.frames[0, 3, 0, 0])


def test_datamodule_corrects_the_evaluation_studies_after_their_corruption(tmp_path):
    from stm_dlp.data.datamodule import CTPDataModule

    phantom = dict(height=48, width=48, n_slices=1, frames_min=40, frames_max=40, noise_hu=1.0)
    kw = dict(source="phantom", n_patients=4, phantom=phantom, cache_dir=str(tmp_path), eval_corruption="motion")
    on, off = CTPDataModule(**kw), CTPDataModule(**kw, motion_correction=False)
    on.setup(), off.setup()
    clean = CTPDataModule(source="phantom", n_patients=4, phantom=phantom, cache_dir=str(tmp_path))
    clean.setup()
    for a, b, c in zip(on.test_set.studies, off.test_set.studies, clean.test_set.studies):
        assert "motion_correction" in a.meta and "motion_correction" not in b.meta
        brain = c.mask[0].astype(bool)
        assert np.abs(a.frames - c.frames)[0][:, brain].mean() < 0.5 * np.abs(b.frames - c.frames)[0][:, brain].mean()
    # training studies are used as they are (augmentation, if any, happens per sample)
    assert all("motion_correction" not in s.meta for s in on.train_set.studies)
