"""Bad input: reader edge cases found by fuzzing, best-effort reading, and the CLIs' contract.

The bad-study corpus itself lives in ``tests/bad_studies.py`` (run by ``tests/test_dicom.py``). Here:

* reader cases the fuzzer (``tests/test_fuzz_dicom.py``) found, pinned as plain tests;
* agreeing AcquisitionDateTime + AcquisitionTime are accepted (the contradiction check has no false
  alarm), contradictory ones are in the corpus;
* ``on_bad_frame="nan"`` (what ``predict mode=best_effort`` uses) keeps the good frames and lists the bad;
* ``python -m stm_dlp.predict`` / ``stm_dlp.synth`` / ``stm_dlp.calc`` on a missing path, a bad study or
  bad arguments: exit status 2, exactly one line on stderr (``error: ...``), no traceback, and nothing
  half-written in the output folder.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from bad_studies import Corpus
from conftest import tiny_phantom

from stm_dlp.data.dicom import read_dicom_study
from stm_dlp.data.phantom import simulate_patient
from stm_dlp.data.studies import read_any_study
from stm_dlp.io.dicom_writer import write_study_dicom
from stm_dlp.types import PARAMS, StudyError

CFG = tiny_phantom()
REPO = Path(__file__).resolve().parent.parent


def _series(tmp: Path, style: str = "acquisition_time", seed: int = 3) -> list[list[Path]]:
    return write_study_dicom(simulate_patient(CFG, seed), tmp / "ctp", time_style=style, seed=seed,
                             patient_name="EDGE^CASE", patient_id="EDGE-1")


def _edit(path: Path, fn) -> None:
    ds = pydicom.dcmread(path)
    fn(ds)
    ds.save_as(path, enforce_file_format=True)


def tiny_checkpoint(path: Path) -> Path:
    """A checkpoint as ``stm_dlp.run`` writes it (state_dict + ``stm_dlp`` model description), untrained."""
    from hydra.utils import instantiate

    cfg = {"_target_": "stm_dlp.models.STMDLP", "encoder": "cnn", "spatial_channels": 4, "temporal_hidden": 8,
           "mpp_hidden": 8, "unet_depth": 1}
    model = instantiate(cfg)
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "stm_dlp": {"model_config": cfg, "target_scale": [5.0, 60.0, 10.0], "params": list(PARAMS)}}, path)
    return path


# ------------------------------------------------------------------------------ reader edge cases
def test_zero_rows_everywhere_is_refused(tmp_path):
    paths = _series(tmp_path)
    for row in paths:
        for p in row:
            _edit(p, lambda ds: setattr(ds, "Rows", 0))
    with pytest.raises(StudyError, match=r"Rows×Columns is 0×16"):
        read_dicom_study(tmp_path / "ctp")


def test_trigger_time_missing_from_one_file(tmp_path):
    """ContentTime is the series start (constant), TriggerTime gives the frame: one file lacks it."""
    paths = _series(tmp_path, "content_trigger")
    _edit(paths[1][3], lambda ds: delattr(ds, "TriggerTime"))
    with pytest.raises(StudyError, match="lacks TriggerTime") as info:
        read_dicom_study(tmp_path / "ctp")
    assert paths[1][3].name in str(info.value)


def test_binary_value_of_the_wrong_length(tmp_path):
    paths = _series(tmp_path)
    raw = paths[0][2].read_bytes()
    at = raw.find(b"\x28\x00\x10\x00US\x02\x00")  # Rows, explicit VR little endian
    paths[0][2].write_bytes(raw[:at] + b"\x28\x00\x10\x00US\x01\x00" + raw[at + 8:at + 9] + raw[at + 10:])
    with pytest.raises(StudyError, match="Rows has 1 bytes") as info:
        read_dicom_study(tmp_path / "ctp")
    assert paths[0][2].name in str(info.value)


def test_empty_transfer_syntax_is_a_study_error(tmp_path):
    paths = _series(tmp_path)
    raw = paths[1][1].read_bytes()
    at = raw.find(b"\x02\x00\x10\x00UI")
    n = struct.unpack("<H", raw[at + 6:at + 8])[0]
    gl = raw.find(b"\x02\x00\x00\x00UL\x04\x00")
    raw = raw[:at + 6] + b"\x00\x00" + raw[at + 8 + n:]
    raw = raw[:gl + 8] + struct.pack("<I", struct.unpack("<I", raw[gl + 8:gl + 12])[0] - n) + raw[gl + 12:]
    paths[1][1].write_bytes(raw)
    with pytest.raises(StudyError, match="transfer syntax missing") as info:
        read_dicom_study(tmp_path / "ctp")
    assert paths[1][1].name in str(info.value)


@pytest.mark.parametrize("style", ["acquisition_time", "midnight"])
def test_agreeing_acquisition_datetime_and_time_are_accepted(tmp_path, style):
    """A scanner writing AcquisitionDateTime *and* AcquisitionTime (consistent) is read as before."""
    paths = _series(tmp_path, style)
    ref = read_dicom_study(tmp_path / "ctp")

    def add(ds):
        date = getattr(ds, "AcquisitionDate", "") or "20240229"
        ds.AcquisitionDateTime = date + ds.AcquisitionTime  # the date kept at the series start
    for row in paths:
        for p in row:
            _edit(p, add)
    back = read_dicom_study(tmp_path / "ctp")
    assert back.meta["time_tag"] == "AcquisitionDateTime"
    np.testing.assert_allclose(back.times_s, ref.times_s, atol=1e-3)


# ------------------------------------------------------------------------------ best-effort reading
def test_best_effort_reading_marks_only_the_bad_frames(tmp_path):
    paths = _series(tmp_path)
    ref = read_dicom_study(tmp_path / "ctp")
    _edit(paths[1][2], lambda ds: setattr(ds, "RescaleSlope", "1e+38"))  # inf HU
    raw = paths[1][4].read_bytes()
    paths[1][4].write_bytes(raw[:-50])  # pixel data cut short
    with pytest.raises(StudyError, match="NaN or inf HU|truncated"):
        read_dicom_study(tmp_path / "ctp")
    study = read_any_study(tmp_path / "ctp", on_bad_frame="nan")
    bad = study.meta["bad_frames"]
    assert [(b["slice"], b["frame"]) for b in bad] == [(1, 2), (1, 4)]
    assert bad[0]["file"].endswith(paths[1][2].name) and "RescaleSlope" in bad[0]["error"]
    assert "truncated" in bad[1]["error"]
    np.testing.assert_array_equal(study.frames[0], ref.frames[0])
    assert np.isnan(study.frames[1, 2]).all() and np.isnan(study.frames[1, 4]).all()
    np.testing.assert_array_equal(study.frames[1, [0, 1, 3, 5]], ref.frames[1, [0, 1, 3, 5]])
    with pytest.raises(ValueError, match="on_bad_frame"):
        read_dicom_study(tmp_path / "ctp", on_bad_frame="skip")


def test_best_effort_reading_still_needs_one_usable_frame(tmp_path):
    paths = _series(tmp_path)
    for row in paths:
        for p in row:
            _edit(p, lambda ds: setattr(ds, "RescaleIntercept", "NaN"))
    with pytest.raises(StudyError, match="no frame of the series is usable"):
        read_dicom_study(tmp_path / "ctp", on_bad_frame="nan")


# ------------------------------------------------------------------------------ the CLIs
@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    """Run every failing command line at once; ``{name: (returncode, stderr, output folder)}``."""
    tmp = tmp_path_factory.mktemp("cli")
    corpus = Corpus(tmp / "corpus")
    from bad_studies import truncated_pixels

    bad_study = truncated_pixels(corpus).path
    ckpt = tiny_checkpoint(tmp / "tiny.ckpt")
    a_file = tmp / "a_file.txt"
    a_file.write_text("not a folder\n")
    out = {name: tmp / f"out_{name}" for name in (
        "predict_missing_input", "predict_bad_study", "synth_out_is_file", "calc_bad_study")}
    commands = {
        "predict_missing_input": ["stm_dlp.predict", f"ckpt={ckpt}", f"input={tmp / 'nowhere'}",
                                  f"output={out['predict_missing_input']}"],
        "predict_bad_study": ["stm_dlp.predict", f"ckpt={ckpt}", f"input={bad_study}",
                              f"output={out['predict_bad_study']}", "mode=strict"],
        "synth_out_is_file": ["stm_dlp.synth", f"out={a_file}", "patients=1", "height=16", "width=16",
                              "frames_min=4", "frames_max=4", "progress=false"],
        "calc_bad_study": ["stm_dlp.calc", f"input={bad_study}", f"output={out['calc_bad_study']}",
                           "progress=false"],
    }
    procs = {name: subprocess.Popen([sys.executable, "-m", *cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True, cwd=REPO) for name, cmd in commands.items()}
    results = {}
    for name, proc in procs.items():
        _stdout, stderr = proc.communicate(timeout=300)
        results[name] = (proc.returncode, stderr, out[name])
    results["_a_file"] = (0, a_file.read_text(), a_file)
    results["_tmp"] = (0, "", tmp)
    return results


CLI_EXPECT = {
    "predict_missing_input": ("nowhere", "does not exist"),
    "predict_bad_study": ("truncated",),
    "synth_out_is_file": ("a_file.txt",),
    "calc_bad_study": ("truncated",),
}


@pytest.mark.parametrize("name", sorted(CLI_EXPECT))
def test_cli_error_is_one_line_exit_2_nothing_half_written(cli_runs, name):
    code, stderr, out = cli_runs[name]
    lines = stderr.strip().splitlines()
    assert code == 2, stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert "Traceback" not in stderr
    for needle in CLI_EXPECT[name]:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    assert "EDGE" not in stderr and "PHANTOM^" not in stderr  # no PHI in messages
    written = [p for p in out.rglob("*") if p.is_file()] if out.exists() else []
    assert written == [], f"{name}: files written despite the error: {written}"
    if name == "synth_out_is_file":
        assert cli_runs["_a_file"][1] == "not a folder\n"


def _in_process(main, argv, capsys) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err
    return err


def test_more_cli_errors_in_process(cli_runs, capsys):
    """The same contract for a missing checkpoint, a bad mode and impossible synth settings (in-process:
    the subprocess cases above already cover the interpreter's own start-up and exit)."""
    from stm_dlp import predict, synth

    tmp = cli_runs["_tmp"][2]
    good, ckpt = tmp / "corpus" / "good", tmp / "tiny.ckpt"
    err = _in_process(predict.main, [f"ckpt={tmp / 'none.ckpt'}", f"input={good}", f"output={tmp / 'o1'}"], capsys)
    assert "none.ckpt" in err and "not found" in err
    err = _in_process(predict.main, [f"ckpt={ckpt}", f"input={good}", f"output={tmp / 'o2'}", "mode=lenient"],
                      capsys)
    assert "best_effort" in err and "strict" in err
    err = _in_process(synth.main, [f"out={tmp / 'o3'}", "patients=2", "height=16", "width=16", "frames_min=1",
                                   "frames_max=4", "progress=false"], capsys)
    assert "frames_min" in err
    for name in ("o1", "o2"):
        assert not (tmp / name).exists()
    assert not [p for p in (tmp / "o3").rglob("*") if p.is_file()] if (tmp / "o3").exists() else True


def test_predict_runs_on_the_good_study(tmp_path):
    """The same tiny checkpoint on the good study succeeds (the failures above are the input's fault)."""
    from stm_dlp.predict import run_predict

    corpus_dir = tmp_path / "corpus"
    corpus = Corpus(corpus_dir)
    summary = run_predict(str(tiny_checkpoint(tmp_path / "t.ckpt")), str(corpus.good), str(tmp_path / "o"))
    assert summary["failed_slices"] == []
    assert {"cbf.nii.gz", "summary.json", "maps.png"} <= {p.name for p in (tmp_path / "o").iterdir()}
    shutil.rmtree(corpus_dir)
