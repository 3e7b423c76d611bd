"""One automatic brain mask for every study without one: reading gives it (training, predict and calc all
read through ``read_any_study``), and predict writes it and zeroes the maps outside it."""

from __future__ import annotations

import numpy as np
from conftest import tiny_phantom

from stm_dlp.data.phantom import simulate_patient
from stm_dlp.data.studies import read_any_study
from stm_dlp.io.dicom_writer import write_study_dicom


def test_unlabelled_dicom_study_gets_the_automatic_brain_mask(tmp_path):
    study = simulate_patient(tiny_phantom(height=48, width=48, frames_min=12, frames_max=12, noise_hu=3.0), 2)
    write_study_dicom(study, tmp_path / "series")
    back = read_any_study(tmp_path / "series")
    assert back.meta["mask_source"] == "automatic" and back.mask is not None
    truth = study.mask
    kept = (back.mask & truth).sum() / truth.sum()
    outside = (back.mask & (study.meta["labels"] <= 1)).sum()  # air (0) or skull (1)
    assert kept > 0.95, kept
    assert outside <= 0.02 * back.mask.sum(), outside  # a pixel of the skull's partial-volume rim at most
    labelled = read_any_study(tmp_path / "series")
    assert np.array_equal(labelled.mask, back.mask)
