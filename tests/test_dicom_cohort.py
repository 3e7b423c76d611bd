"""A dataset root whose sub-folders each hold one patient's DICOM directly is a cohort (``input=ROOT``);
sub-folders of one study are not."""

from __future__ import annotations

from conftest import tiny_phantom

from stm_dlp.data.phantom import simulate_patient
from stm_dlp.data.studies import list_patients
from stm_dlp.io.dicom_writer import write_study_dicom


def test_folders_of_bare_dicom_patients_are_a_cohort(tmp_path):
    root = tmp_path / "cohort"
    for i in range(2):
        write_study_dicom(simulate_patient(tiny_phantom(), i), root / f"patient{i}" / "series")
    assert list_patients(root) == [root / "patient0", root / "patient1"]


def test_subfolders_of_one_study_are_not_patients(tmp_path):
    root = tmp_path / "one_study"
    study = simulate_patient(tiny_phantom(), 3)
    for part in ("a", "b"):  # the same study (same StudyInstanceUID) split over two folders
        write_study_dicom(study, root / part, seed=7)
    assert list_patients(root) == []
