"""Security and privacy: untrusted checkpoints are not unpickled; no PHI leaves through anything a run writes.

* A checkpoint whose pickle runs ``os.system`` when loaded (``__reduce__``) is refused by
  ``python -m stm_dlp.predict`` (exit 2, one line) and by a resumed ``python -m stm_dlp.run`` — and the
  command never runs (its marker file is not created): both load with ``torch.load(weights_only=True)``.
* A 5-patient DICOM cohort carrying fake PHI (PatientName, PatientID, PatientBirthDate, AccessionNumber)
  is trained on (``data=dicom trainer=smoke``, once with ``logger=csv``, once with ``logger=wandb``
  offline), predicted and calculated; then every file written — run dirs with ``.hydra``, CSV logs,
  W&B offline dirs, metrics, checkpoints (unzipped), caches, predict/calc outputs (``.gz`` and PNG text
  chunks decompressed), file names, stdout/stderr — is scanned for every patient's PHI. The scanner is
  shown to find the PHI in the DICOM files themselves, so a clean result is not a blind one.
* DICOM written by ``synth``: no PHI of another patient (birth dates and accession numbers too; names and
  IDs are checked in ``tests/test_synth.py``) and valid UIDs unique across the whole cohort.
"""

from __future__ import annotations

import gzip
import io
import os
import re
import struct
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import pydicom
import pytest
import torch
from bad_studies import make_good
from conftest import subprocess_env, tiny_phantom
from test_robustness_input import tiny_checkpoint

from stm_dlp.synth import fake_phi, fake_phi_extra, synthesize_cohort

REPO = Path(__file__).resolve().parent.parent
SEED = 7
N_PATIENTS = 5
CFG = tiny_phantom(frames_min=10, frames_max=10)


# ------------------------------------------------------------------------------ malicious checkpoints
class _Evil:
    """Unpickling this runs ``touch <marker>``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _evil_checkpoints(tmp: Path) -> tuple[Path, list[Path]]:
    marker = tmp / "PWNED"
    zipped = tmp / "evil_zip.ckpt"
    state = torch.load(tiny_checkpoint(tmp / "good.ckpt"), weights_only=True)
    state["stm_dlp"]["payload"] = _Evil(marker)
    torch.save(state, zipped)  # torch's zip format, as Lightning writes
    legacy = tmp / "evil_pickle.ckpt"
    import pickle

    legacy.write_bytes(pickle.dumps({"state_dict": {}, "stm_dlp": _Evil(marker)}))  # a bare pickle
    return marker, [zipped, legacy]


def test_predict_refuses_a_malicious_checkpoint(tmp_path):
    marker, evil = _evil_checkpoints(tmp_path)
    patient = make_good(tmp_path / "study", seed=5)
    procs = [subprocess.Popen([sys.executable, "-m", "stm_dlp.predict", f"ckpt={ckpt}", f"input={patient}",
                               f"output={tmp_path / ('out_' + ckpt.stem)}"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=REPO) for ckpt in evil]
    for ckpt, proc in zip(evil, procs):
        _out, err = proc.communicate(timeout=300)
        assert proc.returncode == 2, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and "refused" in lines[0], err
        assert "weights_only=True" in lines[0] and "False" not in lines[0]  # no advice to load it unsafely
        assert ckpt.name in lines[0] and "Traceback" not in err
        assert not (tmp_path / ("out_" + ckpt.stem)).exists()
    assert not marker.exists(), "the checkpoint's pickle ran code"
    # a truncated checkpoint is a plain read error, not a refusal
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes((tmp_path / "good.ckpt").read_bytes()[:5000])
    from stm_dlp.predict import load_model
    from stm_dlp.types import StudyError

    with pytest.raises(StudyError, match="cannot be read as a PyTorch checkpoint"):
        load_model(cut)
    with pytest.raises(StudyError, match=r"refused .*GLOBAL posix\.system"):
        load_model(evil[0])
    # the same file loaded the unsafe way would have run it: the test's payload is real
    torch.load(evil[0], weights_only=False)
    assert marker.exists()


# ------------------------------------------------------------------------------ PHI scan
def _phi() -> list[tuple[str, re.Pattern]]:
    """``(label, pattern)`` for every patient's fake PHI (names also by their distinctive component)."""
    out = []
    for i in range(N_PATIENTS):
        name, pid = fake_phi(i, SEED)
        birth, accession = fake_phi_extra(i, SEED)
        for label, text in (("PatientName", name), ("PatientName", name.split("^")[1]), ("PatientID", pid),
                            ("AccessionNumber", accession)):
            out.append((f"{label} {text}", re.compile(re.escape(text).encode(), re.IGNORECASE)))
        digits = rf"(?<!\d){birth[:4]}[-./]?{birth[4:6]}[-./]?{birth[6:]}(?!\d)"
        out.append((f"PatientBirthDate {birth}", re.compile(digits.encode())))
    return out


def _png_text(data: bytes) -> bytes:
    """The text chunks of a PNG (tEXt as is, zTXt/iTXt decompressed)."""
    out, pos = [], 8
    while pos + 8 <= len(data):
        (length,), kind = struct.unpack(">I", data[pos:pos + 4]), data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        if kind == b"tEXt":
            out.append(body)
        elif kind == b"zTXt":
            key, _, rest = body.partition(b"\0")
            out.append(key + b" " + zlib.decompress(rest[1:]))
        elif kind == b"iTXt":
            key, _, rest = body.partition(b"\0")
            compressed, rest = rest[0], rest[2:]
            _lang, _, rest = rest.partition(b"\0")
            _tkey, _, text = rest.partition(b"\0")
            out.append(key + b" " + (zlib.decompress(text) if compressed else text))
        pos += 12 + length
    return b"\n".join(out)


def _contents(path: Path) -> list[tuple[str, bytes]]:
    """Everything readable in a file: raw bytes, plus gunzipped / unzipped / PNG-text views."""
    data = path.read_bytes()
    views = [(str(path), data)]
    if data[:2] == b"\x1f\x8b":
        views.append((f"{path} (gunzipped)", gzip.decompress(data)))
    elif data[:8] == b"\x89PNG\r\n\x1a\n":
        views.append((f"{path} (PNG text)", _png_text(data)))
    elif zipfile.is_zipfile(io.BytesIO(data)):
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            views += [(f"{path}:{n}", z.read(n)) for n in z.namelist()]
    return views


def scan_for_phi(roots: list[Path], texts: dict[str, str]) -> tuple[int, list[str]]:
    """``(files scanned, findings)`` over every file under ``roots`` (names and contents) and ``texts``."""
    patterns = _phi()
    findings, n = [], 0
    for root in roots:
        for path in sorted(root.rglob("*")):
            rel = str(path.relative_to(root.parent)).encode()
            findings += [f"file name {path}: {label}" for label, pat in patterns if pat.search(rel)]
            if not path.is_file() or path.is_symlink():
                continue
            n += 1
            for where, data in _contents(path):
                findings += [f"{where}: {label}" for label, pat in patterns if pat.search(data)]
    for where, text in texts.items():
        findings += [f"{where}: {label}" for label, pat in patterns if pat.search(text.encode())]
    return n, findings


@pytest.fixture(scope="module")
def phi_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("phi")
    cohort = tmp / "cohort"
    synthesize_cohort(cohort, N_PATIENTS, CFG, seed=SEED, progress=False)
    work = tmp / "work"  # everything the software writes goes under here
    wandb_dirs = {k: str(work / f"wandb_{k}") for k in ("dir", "cache", "config", "data", "artifacts")}
    env = subprocess_env(WANDB_MODE="offline", WANDB_SILENT="true", WANDB_DIR=wandb_dirs["dir"],
                         WANDB_CACHE_DIR=wandb_dirs["cache"], WANDB_CONFIG_DIR=wandb_dirs["config"],
                         WANDB_DATA_DIR=wandb_dirs["data"], WANDB_ARTIFACT_DIR=wandb_dirs["artifacts"],
                         MPLCONFIGDIR=str(work / "mpl"))
    env.pop("WANDB_API_KEY", None)
    marker, evil = _evil_checkpoints(tmp)

    def start(args, cache):
        return subprocess.Popen([sys.executable, "-m", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, cwd=REPO, env={**env, "STM_DLP_CACHE": str(cache)})

    train = ["stm_dlp.run", "data=dicom", f"data.root={cohort}", "trainer=smoke"]
    procs = {
        "train_csv": start([*train, "logger=csv", f"hydra.run.dir={work / 'run_csv'}"], work / "cache_csv"),
        "train_wandb": start([*train, "logger=wandb", f"hydra.run.dir={work / 'run_wandb'}"], work / "cache_wandb"),
        "resume_evil": start([*train, "logger=csv", f"ckpt_path={evil[0]}", f"hydra.run.dir={work / 'run_evil'}"],
                             work / "cache_evil"),
    }
    texts, codes = {}, {}

    def finish(name):
        out, err = procs[name].communicate(timeout=900)
        texts[f"{name} stdout"], texts[f"{name} stderr"], codes[name] = out, err, procs[name].returncode

    finish("train_csv")
    ckpt = work / "run_csv" / "checkpoints" / "last.ckpt"
    procs["predict"] = start(["stm_dlp.predict", f"ckpt={ckpt}", f"input={cohort / 'sub-0001'}",
                              f"output={work / 'predict'}"], work / "cache_predict")
    procs["calc"] = start(["stm_dlp.calc", f"input={cohort / 'sub-0002'}", f"output={work / 'calc'}",
                           "progress=false"], work / "cache_calc")
    for name in ("train_wandb", "resume_evil", "predict", "calc"):
        finish(name)
    return {"cohort": cohort, "work": work, "texts": texts, "codes": codes, "marker": marker}


@pytest.mark.slow
def test_no_phi_in_anything_a_run_writes(phi_runs):
    work, codes, texts = phi_runs["work"], phi_runs["codes"], phi_runs["texts"]
    for name in ("train_csv", "train_wandb", "predict", "calc"):
        assert codes[name] == 0, texts[f"{name} stderr"][-3000:]
    # what was written: the test must have something to scan in each place
    runs = [work / "run_csv", work / "run_wandb"]
    for run in runs:
        assert (run / ".hydra" / "config.yaml").is_file() and (run / "metrics.json").is_file()
        assert (run / "split.json").read_text().count('"pt-') == N_PATIENTS  # pseudonyms, not IDs
    assert list((work / "run_csv").rglob("metrics.csv"))
    assert list((work / "run_wandb").rglob("*.wandb")), "no W&B offline run written"
    assert list((work / "cache_csv").rglob("study.json")) and (work / "predict" / "summary.json").is_file()
    assert (work / "calc" / "summary.json").is_file()
    n, findings = scan_for_phi([work], texts)
    assert n > 50
    assert findings == [], "PHI leaked:\n" + "\n".join(findings[:20])
    # positive control: the same scanner finds every kind of PHI in the source DICOM
    _, in_source = scan_for_phi([phi_runs["cohort"]], {})
    for kind in ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber"):
        assert any(f": {kind} " in f for f in in_source), f"scanner misses {kind}"


@pytest.mark.slow
def test_resume_from_a_malicious_checkpoint_runs_no_code(phi_runs):
    assert phi_runs["codes"]["resume_evil"] != 0
    assert "Weights only load failed" in phi_runs["texts"]["resume_evil stderr"]
    assert not phi_runs["marker"].exists(), "resuming ran the checkpoint's pickle"
    assert not (phi_runs["work"] / "run_evil" / "metrics.json").exists()


# ------------------------------------------------------------------------------ synth DICOM
def test_synth_dicom_has_own_phi_only_and_unique_valid_uids(tmp_path):
    dirs = synthesize_cohort(tmp_path, 3, tiny_phantom(frames_min=4, frames_max=4, noise_hu=3.0), seed=SEED,
                             progress=False)
    extra = [fake_phi_extra(i, SEED) for i in range(3)]
    sops, series, studies, frames_of_ref = set(), {}, {}, {}
    for i, d in enumerate(dirs):
        for f in sorted((d / "ctp").rglob("*.dcm")):
            raw = f.read_bytes()
            ds = pydicom.dcmread(f)
            assert (ds.PatientBirthDate, ds.AccessionNumber) == extra[i]
            for j, (birth, accession) in enumerate(extra):
                if j != i:
                    assert birth.encode() not in raw and accession.encode() not in raw
            for uid in (ds.SOPInstanceUID, ds.SeriesInstanceUID, ds.StudyInstanceUID, ds.FrameOfReferenceUID):
                assert uid.is_valid and len(uid) <= 64
            assert ds.SOPInstanceUID not in sops
            sops.add(ds.SOPInstanceUID)
            series.setdefault(ds.SeriesInstanceUID, set()).add(i)
            studies.setdefault(ds.StudyInstanceUID, set()).add(i)
            frames_of_ref.setdefault(ds.FrameOfReferenceUID, set()).add(i)
    for uids in (series, studies, frames_of_ref):
        assert len(uids) == 3 and all(len(owners) == 1 for owners in uids.values())
    # another cohort seed gives fresh UIDs (no UID is reused from an earlier cohort)
    other = synthesize_cohort(tmp_path / "other", 1, tiny_phantom(frames_min=4, frames_max=4, noise_hu=3.0),
                              seed=SEED + 1, progress=False)
    for f in (other[0] / "ctp").rglob("*.dcm"):
        ds = pydicom.dcmread(f)
        assert ds.SOPInstanceUID not in sops and ds.SeriesInstanceUID not in series
