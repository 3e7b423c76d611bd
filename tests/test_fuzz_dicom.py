"""Property-based fuzzing of the DICOM reader (hypothesis).

Valid series written by :func:`stm_dlp.io.dicom_writer.write_study_dicom` (every vendor time style)
are mutated — bytes truncated, flipped, inserted or deleted; tags deleted or given hostile values
(Rows, PixelData length, time tags, ImagePositionPatient, transfer syntax, rescale, bit depths, ...).
Whatever the mutation, :func:`~stm_dlp.data.dicom.read_dicom_study` must either return a study that
passes ``Study.validate()`` or raise :class:`~stm_dlp.types.StudyError`: never another exception type,
never a hang (a per-example alarm), and never PHI in the error message.

The bases include the layouts of issue 15 — one series per time point, enhanced multi-frame CT (one
file, and one file per time point) — and a second property mutates the enhanced files' functional
groups (per-frame items, positions, per-frame times, TemporalPositionIndex, rescale); a third gives a
4-D NIfTI hostile BIDS sidecars and headers. Each must be read or refused with a one-line
:class:`~stm_dlp.types.StudyError`.

The number of examples is bounded and the search derandomised, so the test is reproducible and
takes well under 30 s; ``STM_DLP_FUZZ_EXAMPLES=5000`` runs a longer campaign (the enhanced and NIfTI
properties run a fifth of it each).
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import struct
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from conftest import tiny_phantom
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stm_dlp.data.dicom import read_dicom_study
from stm_dlp.data.phantom import simulate_patient
from stm_dlp.io.dicom_writer import TIME_STYLES, write_study_dicom, write_study_enhanced
from stm_dlp.types import Study, StudyError

CFG = tiny_phantom(frames_min=4, frames_max=4)
PHI = ("FUZZ^PATIENT", "FUZZ-ID-0042")
N_EXAMPLES = int(os.environ.get("STM_DLP_FUZZ_EXAMPLES", "400"))
N_FORMAT_EXAMPLES = max(20, N_EXAMPLES // 5)
HANG_S = 10  # an example taking this long is a hang (normal: a few ms)


def _base_series() -> dict[str, dict[str, bytes]]:
    """``{time_style: {relative path: file bytes}}`` of one small valid series per time style."""
    study = simulate_patient(CFG, seed=5)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for style in TIME_STYLES:
            root = Path(tmp) / style
            write_study_dicom(study, root, time_style=style, patient_name=PHI[0], patient_id=PHI[1], seed=3)
            out[style] = {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.dcm"))}
        writers = {
            "series_per_time_point": lambda r: write_study_dicom(study, r, patient_name=PHI[0], patient_id=PHI[1],
                                                                 seed=3, series_per_time_point=True),
            "enhanced": lambda r: write_study_enhanced(study, r, patient_name=PHI[0], patient_id=PHI[1], seed=3),
            "enhanced_per_time_point": lambda r: write_study_enhanced(
                study, r, files="per_time_point", series_per_file=True, temporal_position_index="constant",
                patient_name=PHI[0], patient_id=PHI[1], seed=3),
        }
        for name, write in writers.items():
            root = Path(tmp) / name
            write(root)
            out[name] = {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.dcm"))}
    return out


BASE = _base_series()
N_FILES = max(len(files) for files in BASE.values())
ENHANCED = ("enhanced", "enhanced_per_time_point")

# ------------------------------------------------------------------------------ mutations
TAGS_TO_DELETE = (
    "Rows", "Columns", "BitsAllocated", "BitsStored", "PixelRepresentation", "SamplesPerPixel", "PixelData",
    "AcquisitionTime", "AcquisitionDate", "AcquisitionDateTime", "ContentTime", "ContentDate", "TriggerTime",
    "ImagePositionPatient", "ImageOrientationPatient", "SliceLocation", "PixelSpacing", "SeriesInstanceUID",
    "SOPInstanceUID", "SOPClassUID", "RescaleSlope", "RescaleIntercept", "Modality", "PatientID", "PatientName",
)
TIME_TEXT = st.one_of(
    st.sampled_from(["", "0", "25", "2400", "235960", "999999", "12:00:00", "120000.", "120000.123456789", "nan",
                     "-1", "1e9", "20240101", "20240230120000", "00000000000000", "19700101000000+9999",
                     "20240101120000.5-0500", "abc", "\\", "1\\2"]),
    st.from_regex(r"\A[0-9]{0,16}(\.[0-9]{0,8})?\Z", fullmatch=True),
)
NUMBER_TEXT = st.sampled_from(["nan", "inf", "-inf", "0", "-1", "1e38", "1e400", "1e-300", "", "x", "1\\2", "3.5"])
TRANSFER_SYNTAXES = (
    "1.2.840.10008.1.2", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.4.50",
    "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.5", "1.2.3.4", "", "1.2.840.10008.1.2.4.201",
)


@st.composite
def tag_values(draw):
    """``(keyword, value)`` hostile values for the tags the reader depends on."""
    kind = draw(st.sampled_from(["rows", "bits", "samples", "frames", "time", "ipp", "iop", "spacing", "rescale",
                                 "pixels", "uid", "slice_location", "trigger"]))
    if kind == "rows":
        return draw(st.sampled_from(["Rows", "Columns"])), draw(st.sampled_from([0, 1, 8, 15, 17, 32, 65535]))
    if kind == "bits":
        key = draw(st.sampled_from(["BitsAllocated", "BitsStored", "PixelRepresentation", "HighBit"]))
        return key, draw(st.sampled_from([0, 1, 2, 7, 8, 12, 17, 32, 64, 65535]))
    if kind == "samples":
        return "SamplesPerPixel", draw(st.sampled_from([0, 2, 3, 65535]))
    if kind == "frames":
        return "NumberOfFrames", draw(st.sampled_from(["0", "1", "2", "-1", "inf", "nan", "1e400", "x", ""]))
    if kind == "time":
        key = draw(st.sampled_from(["AcquisitionTime", "AcquisitionDate", "AcquisitionDateTime", "ContentTime",
                                    "ContentDate"]))
        return key, draw(TIME_TEXT)
    if kind == "trigger":
        return "TriggerTime", draw(NUMBER_TEXT)
    if kind == "ipp":
        n = draw(st.integers(0, 4))
        vals = draw(st.lists(st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32), NUMBER_TEXT),
                             min_size=n, max_size=n))
        return "ImagePositionPatient", "\\".join(str(v) for v in vals)
    if kind == "iop":
        return "ImageOrientationPatient", draw(st.sampled_from(
            ["0\\0\\0\\0\\0\\0", "1\\0\\0\\1\\0\\0", "1\\0\\0", "nan\\0\\0\\0\\1\\0", "0\\1\\0\\0\\0\\-1",
             "1e400\\0\\0\\0\\1\\0", ""]))
    if kind == "spacing":
        return "PixelSpacing", draw(st.sampled_from(["0\\0", "-1\\1", "nan\\1", "1", "1\\2\\3", "x\\y", ""]))
    if kind == "rescale":
        return draw(st.sampled_from(["RescaleSlope", "RescaleIntercept"])), draw(NUMBER_TEXT)
    if kind == "slice_location":
        return "SliceLocation", draw(NUMBER_TEXT)
    if kind == "uid":
        return draw(st.sampled_from(["SeriesInstanceUID", "SOPInstanceUID"])), draw(
            st.sampled_from(["", "1.2.3", "1.2.826.0.1.3680043.8.498.1"]))
    # pixels: a PixelData value of the wrong length
    size = draw(st.sampled_from([0, 1, 2, 511, 512, 513, 1024, 4096]))
    return "PixelData", bytes(draw(st.binary(min_size=min(size, 8), max_size=min(size, 8)))) * (size // 8 or 1)


def _set_transfer_syntax_raw(raw: bytes, uid: str) -> bytes:
    """Rewrite (0002,0010) TransferSyntaxUID in place (the header then lies about the encoding)."""
    at = raw.find(b"\x02\x00\x10\x00UI")
    if at < 0:
        return raw
    old_len = struct.unpack("<H", raw[at + 6:at + 8])[0]
    value = uid.encode() + (b"\x00" if len(uid) % 2 else b"")
    out = raw[:at + 6] + struct.pack("<H", len(value)) + value + raw[at + 8 + old_len:]
    gl = out.find(b"\x02\x00\x00\x00UL\x04\x00")
    if gl >= 0:
        (group_len,) = struct.unpack("<I", out[gl + 8:gl + 12])
        out = out[:gl + 8] + struct.pack("<I", group_len + len(value) - old_len) + out[gl + 12:]
    return out


#: binary (US) tags of the image pixel module, as they appear in explicit VR little endian
_US_ELEMENTS = {"Rows": b"\x28\x00\x10\x00US", "Columns": b"\x28\x00\x11\x00US",
                "BitsAllocated": b"\x28\x00\x00\x01US", "PixelRepresentation": b"\x28\x00\x03\x01US"}


def _set_length_raw(raw: bytes, keyword: str, length: int) -> bytes:
    """Give a binary US element a wrong value length (0, 1, 3, 4 bytes), shifting what follows."""
    at = raw.find(_US_ELEMENTS[keyword])
    if at < 0:
        return raw
    old_len = struct.unpack("<H", raw[at + 6:at + 8])[0]
    value = (raw[at + 8:at + 8 + old_len] + b"\x00" * 4)[:length]
    return raw[:at + 6] + struct.pack("<H", length) + value + raw[at + 8 + old_len:]


def _edit_tags(raw: bytes, fn) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(raw))
    fn(ds)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@st.composite
def mutations(draw):
    """A callable ``bytes -> bytes`` and a description (for the failure report)."""
    kind = draw(st.sampled_from(["truncate", "flip", "insert", "delete_bytes", "delete_tag", "set_tag",
                                 "transfer_syntax", "value_length", "empty"]))
    if kind == "truncate":
        frac = draw(st.floats(0.0, 1.0))
        return (lambda b: b[:int(len(b) * frac)]), f"truncate to {frac:.3f}"
    if kind == "flip":
        edits = draw(st.lists(st.tuples(st.floats(0.0, 1.0, exclude_max=True), st.integers(1, 255)),
                              min_size=1, max_size=8))

        def flip(b: bytes) -> bytes:
            arr = bytearray(b)
            for where, x in edits:
                arr[int(where * len(arr))] ^= x
            return bytes(arr)

        return flip, f"flip {edits}"
    if kind == "insert":
        where, data = draw(st.floats(0.0, 1.0)), draw(st.binary(min_size=1, max_size=64))
        return (lambda b: b[:int(where * len(b))] + data + b[int(where * len(b)):]), f"insert {data!r} at {where:.3f}"
    if kind == "delete_bytes":
        where, n = draw(st.floats(0.0, 1.0)), draw(st.integers(1, 256))
        return (lambda b: b[:int(where * len(b))] + b[int(where * len(b)) + n:]), f"delete {n} bytes at {where:.3f}"
    if kind == "delete_tag":
        key = draw(st.sampled_from(TAGS_TO_DELETE))
        return (lambda b: _edit_tags(b, lambda ds: delattr(ds, key) if key in ds else None)), f"delete {key}"
    if kind == "set_tag":
        key, value = draw(tag_values())
        return (lambda b: _edit_tags(b, lambda ds: setattr(ds, key, value))), f"set {key}={value!r:.60}"
    if kind == "transfer_syntax":
        uid = draw(st.sampled_from(TRANSFER_SYNTAXES))
        return (lambda b: _set_transfer_syntax_raw(b, uid)), f"transfer syntax {uid!r}"
    if kind == "value_length":
        key, length = draw(st.sampled_from(sorted(_US_ELEMENTS))), draw(st.sampled_from([0, 1, 3, 4]))
        return (lambda b: _set_length_raw(b, key, length)), f"{key} value length {length}"
    return (lambda b: b""), "empty file"


class _Hang(Exception):
    pass


@contextlib.contextmanager
def _alarm(seconds: int):
    def on_alarm(signum, frame):
        raise _Hang(f"read_dicom_study did not return within {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _check_read(root: Path, what: str) -> Study | None:
    try:
        with _alarm(HANG_S):
            study = read_dicom_study(root)
    except StudyError as exc:
        msg = str(exc)
        assert msg and "\n" not in msg.strip(), f"{what}: multi-line error {msg!r}"
        for phi in PHI:
            assert phi not in msg, f"{what}: PHI {phi!r} in {msg!r}"
        return None
    except _Hang:
        pytest.fail(f"{what}: hang")
    except Exception as exc:  # noqa: BLE001 - the property under test
        pytest.fail(f"{what}: {type(exc).__name__} escaped the reader: {exc}")
    assert study.validate() is study
    assert np.all(np.isfinite(study.frames)) and study.frames.dtype == np.float32
    assert study.frames.shape[2] > 0 and study.frames.shape[3] > 0
    assert study.patient_id.startswith("pt-")
    assert not any(phi in repr(study.meta) for phi in PHI)
    return study


@settings(max_examples=N_EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(style=st.sampled_from(sorted(BASE)),
       edits=st.lists(st.tuples(st.integers(-1, N_FILES - 1), mutations()), min_size=1, max_size=3))
def test_mutated_series_is_read_or_refused_with_study_error(style, edits):
    """``edits``: ``(file index, mutation)``; index -1 applies the mutation to every file (a vendor quirk)."""
    _mutate_and_read(style, edits)


def _mutate_and_read(style: str, edits) -> None:
    files = dict(BASE[style])
    names = sorted(files)
    applied = []
    for index, (mutate, text) in edits:
        targets = names if index < 0 else [names[index % len(names)]]
        try:
            files.update({name: mutate(files[name]) for name in targets})
        except Exception:  # noqa: BLE001 - pydicom could not re-encode this edit; try the next one
            continue
        applied.append(f"{'every file' if index < 0 else targets[0]}: {text}")
    tmp = Path(tempfile.mkdtemp(prefix="fuzz_"))
    try:
        for rel, data in files.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_bytes(data)
        _check_read(tmp, f"[{style}] " + "; ".join(applied))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@st.composite
def group_mutations(draw):
    """A ``bytes -> bytes`` edit of an enhanced file's functional groups, and its description."""
    kind = draw(st.sampled_from(["drop_item", "drop_macro", "frame_time", "temporal_index", "position", "rescale",
                                 "frames", "drop_shared", "orientation"]))
    frame = draw(st.integers(0, 7))

    def on_item(fn):
        def edit(ds):
            items = ds.PerFrameFunctionalGroupsSequence
            fn(items[frame % len(items)])
        return edit

    if kind == "drop_item":
        return (lambda b: _edit_tags(b, lambda ds: ds.PerFrameFunctionalGroupsSequence.pop(frame % 4))), kind
    if kind == "drop_macro":
        macro = draw(st.sampled_from(["PlanePositionSequence", "FrameContentSequence", "CTImageFrameTypeSequence"]))
        return (lambda b: _edit_tags(b, on_item(lambda it: delattr(it, macro) if macro in it else None))), \
            f"frame {frame}: delete {macro}"
    if kind == "frame_time":
        key = draw(st.sampled_from(["FrameAcquisitionDateTime", "FrameReferenceDateTime"]))
        value = draw(TIME_TEXT)
        return (lambda b: _edit_tags(b, on_item(lambda it: setattr(it.FrameContentSequence[0], key, value)))), \
            f"frame {frame}: {key}={value!r}"
    if kind == "temporal_index":
        value = draw(st.sampled_from([0, 1, 2, 3, 4, 65535]))
        return (lambda b: _edit_tags(b, on_item(lambda it: setattr(it.FrameContentSequence[0],
                                                                   "TemporalPositionIndex", value)))), \
            f"frame {frame}: TemporalPositionIndex={value}"
    if kind == "position":
        value = draw(st.sampled_from(["nan\\0\\0", "1\\2", "", "0\\0\\0", "1e400\\0\\0"]))
        return (lambda b: _edit_tags(b, on_item(lambda it: setattr(it.PlanePositionSequence[0],
                                                                   "ImagePositionPatient", value)))), \
            f"frame {frame}: ImagePositionPatient={value!r}"
    if kind == "rescale":
        key, value = draw(st.sampled_from(["RescaleSlope", "RescaleIntercept"])), draw(NUMBER_TEXT)

        def rescale(ds):
            setattr(ds.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence[0], key, value)
        return (lambda b: _edit_tags(b, rescale)), f"shared {key}={value!r}"
    if kind == "frames":
        value = draw(st.sampled_from(["0", "1", "3", "9", "-1", "x", ""]))
        return (lambda b: _edit_tags(b, lambda ds: setattr(ds, "NumberOfFrames", value))), f"NumberOfFrames={value!r}"
    if kind == "orientation":
        value = draw(st.sampled_from(["0\\0\\0\\0\\0\\0", "1\\0\\0", "nan\\0\\0\\0\\1\\0"]))

        def orient(ds):
            ds.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient = value
        return (lambda b: _edit_tags(b, orient)), f"ImageOrientationPatient={value!r}"
    return (lambda b: _edit_tags(b, lambda ds: delattr(ds, "SharedFunctionalGroupsSequence"))), kind


@settings(max_examples=N_FORMAT_EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(style=st.sampled_from(ENHANCED),
       edits=st.lists(st.tuples(st.integers(-1, N_FILES - 1), st.one_of(group_mutations(), mutations())),
                      min_size=1, max_size=3))
def test_mutated_enhanced_functional_groups_are_read_or_refused(style, edits):
    _mutate_and_read(style, edits)


SIDECAR_VALUES = st.one_of(
    st.sampled_from([None, "abc", [], {}, [[0, 1]], float("nan"), -5, 0, 1e308, True, [0.0] * 4, [3, 2, 1, 0]]),
    st.lists(st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-10, 10), st.text(max_size=3)),
             max_size=6),
)


@settings(max_examples=N_FORMAT_EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(fields=st.dictionaries(st.sampled_from(["FrameTimesStart", "AcquisitionDuration", "SliceTiming"]),
                              SIDECAR_VALUES, max_size=3),
       raw=st.sampled_from([None, "", "{", "[]", "null", "\x00\xff"]),
       unit=st.sampled_from(["sec", "msec", "usec", "unknown"]), step=st.sampled_from([0.0, -1.0, 1.5, float("nan")]))
def test_hostile_nifti_sidecar_and_header_are_read_or_refused(fields, raw, unit, step):
    import json

    from stm_dlp.data.nifti4d import read_nifti4d
    from stm_dlp.io.layouts import write_nifti4d

    tmp = Path(tempfile.mkdtemp(prefix="fuzz_nifti_"))
    try:
        path = write_nifti4d(NIFTI_STUDY, tmp / "ctp.nii", times="none")
        img = nib.load(path, mmap=False)
        img = nib.Nifti1Image(np.asarray(img.dataobj), img.affine, img.header)
        img.header.set_xyzt_units("mm", unit)
        img.header["pixdim"][4] = step
        nib.save(img, path)
        if raw is not None or fields:
            text = raw if raw is not None else json.dumps(fields, allow_nan=True)
            (tmp / "ctp.json").write_text(text, encoding="utf-8", errors="surrogateescape")
        what = f"sidecar {raw if raw is not None else fields!r:.80}, unit {unit}, step {step}"
        try:
            with _alarm(HANG_S):
                study = read_nifti4d(path)
        except StudyError as exc:
            assert str(exc) and "\n" not in str(exc).strip(), f"{what}: multi-line error"
            return
        except Exception as exc:  # noqa: BLE001 - the property under test
            pytest.fail(f"{what}: {type(exc).__name__} escaped the reader: {exc}")
        assert study.validate() is study and np.all(np.diff(study.times_s, axis=1) > 0)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


NIFTI_STUDY = simulate_patient(CFG, seed=6)


def _case_base(layout: str) -> dict[str, bytes]:
    """``{relative path: bytes}`` of one good ISLES'24 release or UniToBrain (patient layout) case."""
    from stm_dlp.io.layouts import write_isles2024_case, write_unitobrain_case

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if layout == "isles2024":
            write_isles2024_case(root, NIFTI_STUDY)
        else:
            write_unitobrain_case(root, NIFTI_STUDY, layout="patient", patient_name=PHI[0], patient_id=PHI[1])
        return {f.relative_to(root).as_posix(): f.read_bytes() for f in sorted(root.rglob("*")) if f.is_file()}


CASE_BASES = {layout: _case_base(layout) for layout in ("isles2024", "unitobrain")}


@st.composite
def map_file_edits(draw):
    """An edit of a map file (NIfTI array edits or DICOM mutations), and its description."""
    kind = draw(st.sampled_from(["crop", "fill", "ndim", "garbage", "truncate", "dicom"]))
    if kind == "dicom":
        mutate, text = draw(mutations())
        return "dcm", mutate, text
    if kind in ("garbage", "truncate"):
        frac = draw(st.floats(0.0, 1.0))
        return "nii", (lambda b: b[:int(len(b) * frac)] if kind == "truncate" else b"not a nifti"), f"{kind} {frac:.2f}"
    value = draw(st.sampled_from([float("nan"), float("inf"), -1e30, -1.0, 0.0, 1e30]))
    axis = draw(st.integers(0, 2))

    def edit(raw: bytes) -> bytes:
        import gzip
        import io as _io

        img = nib.Nifti1Image.from_bytes(gzip.decompress(raw))
        data = np.asarray(img.dataobj, np.float32)
        if kind == "crop":
            data = np.take(data, range(max(1, data.shape[axis] - 1)), axis=axis)
        elif kind == "fill":
            data = data.copy()
            data.reshape(-1)[:: 3 + axis] = value
        else:
            data = data[..., None, None]
        out = nib.Nifti1Image(data, img.affine)
        buf = _io.BytesIO(gzip.compress(out.to_bytes()))
        return buf.getvalue()

    return "nii", edit, f"{kind} axis {axis} value {value}"


@settings(max_examples=max(20, N_FORMAT_EXAMPLES // 2), deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(layout=st.sampled_from(sorted(CASE_BASES)), pick=st.integers(0, 10_000), edit=map_file_edits())
def test_mutated_isles2024_and_unitobrain_maps_are_read_or_refused(layout, pick, edit):
    from stm_dlp.data.studies import list_patients, read_any_study

    suffix, mutate, text = edit
    files = dict(CASE_BASES[layout])
    maps = sorted(k for k in files if ("perfusion-maps" in k or "/NLR_" in k) and k.endswith(
        ".nii.gz" if suffix == "nii" else ".dcm"))
    if not maps:
        return
    target = maps[pick % len(maps)]
    try:
        files[target] = mutate(files[target])
    except Exception:  # noqa: BLE001 - this edit cannot be encoded; nothing to test
        return
    tmp = Path(tempfile.mkdtemp(prefix="fuzz_case_"))
    try:
        for rel, data in files.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_bytes(data)
        what = f"[{layout}] {target}: {text}"
        try:
            with _alarm(HANG_S):
                study = read_any_study(list_patients(tmp)[0])
        except StudyError as exc:
            msg = str(exc)
            assert msg and "\n" not in msg.strip(), f"{what}: multi-line error {msg!r}"
            assert not any(phi in msg for phi in PHI), f"{what}: PHI in {msg!r}"
            return
        except Exception as exc:  # noqa: BLE001 - the property under test
            pytest.fail(f"{what}: {type(exc).__name__} escaped the reader: {exc}")
        assert study.validate() is study and np.all(np.isfinite(study.maps))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def test_unmutated_series_read_back():
    """The fuzz starts from series the reader accepts (else every example would be a refusal)."""
    for style, files in BASE.items():
        tmp = Path(tempfile.mkdtemp(prefix="fuzz_"))
        try:
            for rel, data in files.items():
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                (tmp / rel).write_bytes(data)
            study = _check_read(tmp, style)
            assert study is not None and study.frames.shape == (CFG.n_slices, CFG.frames_max, 16, 16)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
