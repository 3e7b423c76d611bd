"""DataModule: patient-wise splits, variable-length collation, augmentation, truncation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from stm_dlp.data.corrupt import GaussianNoise
from stm_dlp.data.datamodule import CTPDataModule
from stm_dlp.data.splits import split_patients
from stm_dlp.types import SliceSample, collate_slices

PHANTOM = dict(height=16, width=16, n_slices=2, frames_min=10, frames_max=14, noise_hu=1.0)


def test_split_is_patient_wise_deterministic_and_disjoint():
    ids = [f"p{i}" for i in range(23)]
    a = split_patients(ids, seed=4, val_fraction=0.15, test_fraction=0.25)
    b = split_patients(list(reversed(ids)), seed=4, val_fraction=0.15, test_fraction=0.25)
    assert a == b
    sets = [set(a[k]) for k in ("train", "val", "test")]
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    assert set().union(*sets) == set(ids)
    assert a != split_patients(ids, seed=5, val_fraction=0.15, test_fraction=0.25)
    with pytest.raises(ValueError, match="too few"):
        split_patients(["a", "b"], 0, 0.5, 0.5)


def test_collate_pads_and_never_truncates():
    rng = np.random.default_rng(0)
    samples = []
    for i, t in enumerate((46, 50, 55)):
        times = np.cumsum(rng.uniform(1, 2, t)).astype(np.float32)
        samples.append(SliceSample(frames=rng.normal(size=(t, 8, 8)).astype(np.float32), times_s=times - times[0],
                                   maps=np.zeros((3, 8, 8), np.float32), mask=np.ones((8, 8), bool),
                                   patient_id=f"p{i}", slice_index=0))
    b = collate_slices(samples)
    assert b.frames.shape == (3, 55, 8, 8) and b.lengths.tolist() == [46, 50, 55]
    assert torch.equal(b.frames[0, :46], torch.from_numpy(samples[0].frames))
    assert torch.all(b.frames[0, 46:] == 0)
    assert torch.all(b.times_s[0, 46:] == b.times_s[0, 45])
    assert b.valid_frames.sum().item() == 46 + 50 + 55


def test_datamodule_end_to_end(tmp_path):
    dm = CTPDataModule(n_patients=6, phantom=PHANTOM, batch_size=3, crop_size=8,
                       augment=[GaussianNoise(sigma_hu=5.0)], cache_dir=str(tmp_path / "c"))
    dm.setup("fit")
    splits = dm.splits
    assert not set(splits["train"]) & set(splits["test"]) and not set(splits["train"]) & set(splits["val"])
    batch = next(iter(dm.train_dataloader()))
    assert batch.frames.shape[0] == 3 and batch.frames.shape[-2:] == (8, 8)
    assert batch.maps.shape == (3, 3, 8, 8) and batch.mask.dtype == torch.bool
    tb = next(iter(dm.test_dataloader()))
    assert tb.frames.shape[-2:] == (16, 16)
    scale = dm.target_scale()
    assert scale.shape == (3,) and torch.all(scale > 0)
    dm.save_split(tmp_path / "split.json")
    assert json.loads((tmp_path / "split.json").read_text())["test"] == splits["test"]
    # the cache makes a second DataModule read, not simulate
    dm2 = CTPDataModule(n_patients=6, phantom=PHANTOM, cache_dir=str(tmp_path / "c"))
    dm2.setup("fit")
    pid = splits["train"][0]
    np.testing.assert_array_equal(dm2.studies[pid].frames, dm.studies[pid].frames)


def test_eval_truncation_and_corruption(tmp_path):
    base = CTPDataModule(n_patients=5, phantom=PHANTOM, cache_dir=str(tmp_path / "c"))
    base.setup()
    trunc = CTPDataModule(n_patients=5, phantom=PHANTOM, frame_fraction=0.5, cache_dir=str(tmp_path / "c"))
    trunc.setup()
    full_t = base.test_set[0].n_frames
    assert trunc.test_set[0].n_frames == round(full_t * 0.5)
    noisy = CTPDataModule(n_patients=5, phantom=PHANTOM, eval_corruption="noise", cache_dir=str(tmp_path / "c"))
    noisy.setup()
    assert not np.allclose(noisy.test_set[0].frames, base.test_set[0].frames)
    assert np.array_equal(noisy.train_set.studies[0].frames, base.train_set.studies[0].frames)


def test_config_errors_before_reading_data():
    with pytest.raises(ValueError, match="phantom"):
        CTPDataModule(source="pacs")
    with pytest.raises(ValueError, match="frame_fraction"):
        CTPDataModule(frame_fraction=0.0)
    with pytest.raises(ValueError, match="noise"):
        CTPDataModule(eval_corruption="quake")
    with pytest.raises(ValueError, match="root"):
        CTPDataModule(source="dicom")


def test_label_source_calc_labels_with_our_deconvolution(tmp_path):
    truth = CTPDataModule(n_patients=3, phantom=dict(PHANTOM, height=24, width=24, frames_min=30, frames_max=30),
                          val_fraction=0.2, test_fraction=0.2, cache_dir=str(tmp_path / "c"))
    truth.setup()
    calc = CTPDataModule(n_patients=3, phantom=dict(PHANTOM, height=24, width=24, frames_min=30, frames_max=30),
                         val_fraction=0.2, test_fraction=0.2, label_source="calc", cache_dir=str(tmp_path / "c"))
    calc.setup()
    pid = calc.splits["train"][0]
    lab, ref = np.asarray(calc.studies[pid].maps), np.asarray(truth.studies[pid].maps)
    m = np.asarray(truth.studies[pid].mask)
    assert lab.shape == ref.shape and np.all(np.isfinite(lab))
    assert not np.allclose(lab, ref)  # labels really come from the deconvolution ...
    cbv_lab, cbv_ref = lab[:, 0][m], ref[:, 0][m]
    assert np.corrcoef(cbv_lab, cbv_ref)[0, 1] > 0.5  # ... and still follow the truth
