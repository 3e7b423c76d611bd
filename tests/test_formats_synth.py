"""``synth layout=…`` writes a phantom cohort in every layout, each read back as the simulation by the
one reading path; the DataModule trains from the new sources; the time source reaches summary.json."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from conftest import tiny_phantom

from stm_dlp.data.phantom import cohort_member, simulate_patient
from stm_dlp.data.studies import list_patients, read_any_study
from stm_dlp.io.dicom_writer import shuttle_study
from stm_dlp.synth import LAYOUTS, synthesize_cohort
from stm_dlp.types import PARAMS

CFG = tiny_phantom(frames_min=8, frames_max=8)
SEED = 5
EXPECTED = {"dicom": "dicom_labelled", "dicom_series_per_time_point": "dicom_labelled",
            "dicom_enhanced": "dicom_labelled", "dicom_enhanced_per_time_point": "dicom_labelled",
            "dicom_shuttle": "dicom_labelled", "nifti": "nifti_labelled", "isles2018": "isles2018",
            "isles2024": "isles2024", "unitobrain": "unitobrain"}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_round_trips_the_phantom(layout, tmp_path):
    dirs = synthesize_cohort(tmp_path, 2, CFG, seed=SEED, progress=False, layout=layout)
    assert list_patients(tmp_path) == dirs
    assert not [p for p in tmp_path.rglob(".*")], "temporary folders left behind"
    for i, d in enumerate(dirs):
        truth = simulate_patient(CFG, cohort_member(i, SEED)[0])
        if layout == "dicom_shuttle":
            truth = shuttle_study(truth, positions=2)
        back = read_any_study(d)
        assert back.meta["layout"] == EXPECTED[layout]
        tol = 0.5 + 1e-3 if layout.startswith("dicom") or layout == "unitobrain" else 0.0
        assert back.frames.shape == truth.frames.shape and np.max(np.abs(back.frames - truth.frames)) <= tol
        np.testing.assert_allclose(back.times_s, truth.times_s, atol=1e-3)  # per slice
        np.testing.assert_allclose(back.affine, truth.affine, atol=1e-4)
        labelled = ("cbv", "cbf") if layout == "unitobrain" else PARAMS
        assert back.labelled == labelled
        for k, p in enumerate(PARAMS):
            if p in labelled:
                np.testing.assert_allclose(back.maps[:, k][back.mask], truth.maps[:, k][back.mask], atol=5e-3)
        assert not (back.mask & ~truth.mask).any()
        assert "PHANTOM" not in repr(back.meta) + back.patient_id


def test_unknown_layout_is_refused(tmp_path):
    with pytest.raises(ValueError, match="layout must be one of"):
        synthesize_cohort(tmp_path, 1, CFG, layout="pacs")


@pytest.mark.parametrize("source,layout", [("unitobrain", "unitobrain"), ("isles2024", "isles2024")])
def test_datamodule_reads_the_new_sources(source, layout, tmp_path):
    from stm_dlp.data.datamodule import CTPDataModule

    root = tmp_path / "root"
    synthesize_cohort(root, 4, CFG, seed=SEED, progress=False, layout=layout)
    dm = CTPDataModule(source=source, root=str(root), batch_size=2, crop_size=8, augment=[],
                       cache_dir=str(tmp_path / "cache"), val_fraction=0.25, test_fraction=0.25)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    expected = [True, True, False] if source == "unitobrain" else [True, True, True]
    assert batch.labelled.tolist() == [expected] * batch.batch_size
    assert len(dm.studies) == 4


def test_configured_interval_is_said_in_summary_json(tmp_path):
    from stm_dlp.calc import main
    from stm_dlp.io.layouts import write_nifti_patient

    st = simulate_patient(tiny_phantom(height=24, width=24, frames_min=16, frames_max=16), seed=3)
    uniform = st.times_s * 0 + np.arange(st.n_frames, dtype=np.float32) * 2.0
    from dataclasses import replace

    patient = write_nifti_patient(tmp_path / "p", replace(st, times_s=uniform), times="none")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main([f"input={patient}", f"output={tmp_path / 'out'}", "frame_interval_s=2.0", "progress=false",
                     "device=cpu"]) == 0
    assert any("configured frame_interval_s" in str(w.message) for w in caught)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["time_source"] == "configured frame_interval_s = 2 s" and summary["layout"] == "nifti_labelled"
