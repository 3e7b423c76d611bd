"""DataModule: patient-wise splits, variable-length collation, augmentation, truncation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from stm_dlp.data.corrupt import GaussianNoise
from stm_dlp.data.datamodule import CTPDataModule
from stm_dlp.data.splits import split_patients
from stm_dlp.types import SliceSample, StudyError, collate_slices

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


# ----------------------------------------------------------------------------- the split file
def test_growing_a_cohort_never_moves_a_test_patient(tmp_path, caplog):
    """The split is read back from the split file: new patients go to training (with a warning naming
    them), nobody changes split. Recomputing the split (the old behaviour) reshuffles 6 → 12 patients."""
    split_file = tmp_path / "splits.json"
    small = CTPDataModule(n_patients=6, phantom=PHANTOM, split_file=str(split_file), cache_dir=str(tmp_path / "c"))
    small.setup("fit")
    assert split_file.is_file() and json.loads(split_file.read_text())["test"] == small.splits["test"]
    big = CTPDataModule(n_patients=12, phantom=PHANTOM, split_file=str(split_file), cache_dir=str(tmp_path / "c"))
    with caplog.at_level("WARNING"):
        big.setup("fit")
    for name in ("train", "val", "test"):
        assert set(small.splits[name]) <= set(big.splits[name]), name
    assert big.splits["test"] == small.splits["test"] and big.splits["val"] == small.splits["val"]
    new = sorted(set(big.studies) - set(small.studies))
    assert set(new) <= set(big.splits["train"])
    assert "6 patient(s) are not in the split file" in caplog.text and new[0] in caplog.text
    # the split file is read back, never rewritten
    assert json.loads(split_file.read_text())["train"] == small.splits["train"]


def test_split_file_problems_are_reported(tmp_path, caplog):
    split_file = tmp_path / "splits.json"
    CTPDataModule(n_patients=6, phantom=PHANTOM, split_file=str(split_file), cache_dir=str(tmp_path / "c")).setup()
    fewer = CTPDataModule(n_patients=4, phantom=PHANTOM, split_file=str(split_file), cache_dir=str(tmp_path / "c"))
    with caplog.at_level("WARNING"):
        fewer.setup()
    assert "2 patient(s) of the split file" in caplog.text
    data = json.loads(split_file.read_text())
    data["val"].append(data["test"][0])
    split_file.write_text(json.dumps(data))
    with pytest.raises(StudyError, match="is in both"):
        CTPDataModule(n_patients=6, phantom=PHANTOM, split_file=str(split_file), cache_dir=str(tmp_path / "c")).setup()


def test_dataset_root_keeps_its_split_in_splits_json(tmp_path):
    from test_isles import make_case

    root = tmp_path / "isles"
    for i in range(4):
        make_case(root, name=f"case_{i}")
    dm = CTPDataModule(source="isles2018", root=str(root), frame_interval_s=1.0, val_fraction=0.25,
                       test_fraction=0.25, cache_dir=str(tmp_path / "c"))
    dm.setup()
    assert json.loads((root / "splits.json").read_text())["test"] == dm.splits["test"]


# ----------------------------------------------------------------------------- one reading path
def test_isles_training_data_uses_the_pseudonym_key(tmp_path):
    """Training reads studies exactly as predict/calc do (``read_any_study``), so ``data.pseudonym_key``
    pseudonymises ISLES cases too (it was silently ignored by the DataModule's own ISLES branch)."""
    from test_isles import make_case

    from stm_dlp.data.studies import read_any_study

    root = tmp_path / "isles"
    for i in range(3):
        make_case(root, name=f"case_{i}")
    ids = {}
    for key in ("key-one", "key-two"):
        dm = CTPDataModule(source="isles2018", root=str(root), frame_interval_s=1.0, pseudonym_key=key,
                           split_file=str(tmp_path / f"split-{key}.json"), cache_dir=str(tmp_path / "c"))
        dm.setup()
        ids[key] = sorted(dm.studies)
    assert ids["key-one"] != ids["key-two"]
    expected = read_any_study(root / "case_0", pseudonym_key=b"key-one", frame_interval_s=1.0).patient_id
    assert expected in ids["key-one"]


# ----------------------------------------------------------------------------- per-parameter labels
def test_missing_label_is_skipped_by_loss_and_metrics():
    """A dataset without TMAX (UniToBrain): the TMAX loss is 0 and the TMAX metrics are NaN ("—"), while
    CBV, CBF and MTT (derived from them) are scored as usual."""
    from stm_dlp.lit import PerfusionLitModule, masked_loss
    from stm_dlp.reporting import metrics_table

    rng = np.random.default_rng(0)
    samples = [SliceSample(frames=rng.normal(size=(6, 8, 8)).astype(np.float32),
                           times_s=np.arange(6, dtype=np.float32), maps=rng.uniform(1, 5, (3, 8, 8)).astype(np.float32),
                           mask=np.ones((8, 8), bool), patient_id="p", slice_index=i, labelled=("cbv", "cbf"))
               for i in range(2)]
    batch = collate_slices(samples)
    assert batch.labelled.tolist() == [[True, True, False]] * 2
    pred = torch.zeros_like(batch.maps)
    loss = masked_loss(pred, batch.maps, batch.mask, labelled=batch.label_mask)
    assert loss[2] == 0 and loss[0] > 0 and loss[1] > 0

    class Zero(torch.nn.Module):
        def forward(self, frames, times_s, lengths, arterial_hu=None):
            return torch.ones(frames.shape[0], 3, *frames.shape[-2:])

    lit = PerfusionLitModule(Zero())
    lit.test_step(batch, 0)
    lit.log = lambda *a, **k: None  # no Trainer attached
    lit.on_test_epoch_end()
    res = lit.test_results
    assert res["cbv"]["mae"] > 0 and res["mtt"]["mae"] > 0 and np.isnan(res["tmax"]["mae"])
    assert "tmax" not in res["per_patient_mae"]["p"] and "mtt" in res["per_patient_mae"]["p"]
    table = metrics_table(res)
    assert "TMAX" in table and "—" in table.splitlines()[3]


def test_lesion_crops_hold_hypoperfused_tissue():
    from stm_dlp.data.datamodule import SliceDataset
    from stm_dlp.data.phantom import PhantomConfig, simulate_patient

    study = simulate_patient(PhantomConfig(height=48, width=48, n_slices=2, frames_min=8, frames_max=8,
                                           lesion_probability=1.0), seed=1)
    has_lesion = [(study.maps[s, 2][study.mask[s]] > 6).any() for s in range(2)]
    s = int(np.argmax(has_lesion))
    assert has_lesion[s]
    focused = SliceDataset([study], crop_size=8, lesion_crop_fraction=1.0)
    uniform = SliceDataset([study], crop_size=8)
    torch.manual_seed(0)
    hits = [bool((c.maps[2][c.mask] > 6).any()) for c in (focused[s] for _ in range(20))]
    base = [bool((c.maps[2][c.mask] > 6).any()) for c in (uniform[s] for _ in range(40))]
    assert all(hits) and np.mean(base) < 1.0
    with pytest.raises(ValueError, match="lesion_crop_fraction"):
        SliceDataset([study], crop_size=8, lesion_crop_fraction=1.5)


def test_one_loss_per_task():
    from stm_dlp.lit import PerfusionLitModule, masked_loss

    pred = torch.zeros(1, 3, 2, 2)
    target = torch.full((1, 3, 2, 2), 3.0)
    mask = torch.ones(1, 2, 2, dtype=torch.bool)
    loss = masked_loss(pred, target, mask, ["l1", "l1", "mse"])
    torch.testing.assert_close(loss, torch.tensor([3.0, 3.0, 9.0]))
    with pytest.raises(ValueError, match="one loss per task"):
        masked_loss(pred, target, mask, ["l1", "mse"])
    with pytest.raises(ValueError, match="lit.loss"):
        PerfusionLitModule(torch.nn.Identity(), loss=["l1", "huber", "mse"])


def test_mtt_loss_sees_what_the_per_map_losses_do_not():
    """CBV 10 % high and CBF 10 % low: small per-map errors, a 22 % MTT error that ``mtt_loss`` measures
    (in normalised MTT units, where the true CBF has flow); 0 for an exact prediction; pixels without flow
    (true CBF below the no-flow floor) and slices without CBV/CBF labels do not count."""
    from stm_dlp.lit import mtt_loss

    scale = torch.tensor([4.0, 60.0, 5.0])
    target = torch.zeros(2, 3, 2, 2)
    target[:, 0], target[:, 1] = 0.5, 0.5           # CBV 2 ml/100g, CBF 30 ml/100g/min: MTT 4 s
    mask = torch.ones(2, 2, 2, dtype=torch.bool)
    pred = target.clone()
    pred[:, 0] *= 1.1
    pred[:, 1] *= 0.9
    assert float(mtt_loss(target, target, mask, scale)) == pytest.approx(0.0, abs=2e-3)
    assert float(mtt_loss(pred, target, mask, scale)) == pytest.approx(1.1 / 0.9 - 1.0, rel=1e-2)
    no_flow = target.clone()
    no_flow[:, 1] = 0.0
    assert float(mtt_loss(pred, no_flow, mask, scale)) == 0.0
    unlabelled = torch.tensor([[False, False, True], [False, True, True]])
    assert float(mtt_loss(pred, target, mask, scale, labelled=unlabelled)) == 0.0
    pred.requires_grad_(True)
    mtt_loss(pred, target, mask, scale).backward()
    assert (pred.grad[:, 0] > 0).all() and (pred.grad[:, 1] < 0).all()   # lower CBV, raise CBF
    from stm_dlp.lit import PerfusionLitModule

    with pytest.raises(ValueError, match="lit.mtt_weight"):
        PerfusionLitModule(torch.nn.Identity(), mtt_weight=-1.0)
