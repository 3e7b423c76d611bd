"""Read one CT perfusion series from a folder of DICOM files into a :class:`~stm_dlp.types.Study`.

What the reader does (DESIGN.md, "DICOM reading"):

1. **Find files.** Every file under the folder, at any depth and with any name, except hidden files
   and folders (names starting with ``.``) and ``DICOMDIR``. Every file must be DICOM: a non-DICOM,
   empty or truncated file is an error naming it.
2. **Index** (``pydicom.dcmread(stop_before_pixels=True)``, one pass). Non-image objects (structured
   reports, presentation states, ...), localizer (scout) images and image series of other
   modalities (e.g. secondary captures of vendor maps) are skipped and listed in
   ``meta["skipped"]``. More than one CT series (SeriesInstanceUID) with pixel data is an error
   naming both (hashed) UIDs and a file of each.
3. **Slices.** Position of a file = ImagePositionPatient · normal, with normal =
   row cosine × column cosine of ImageOrientationPatient; SliceLocation when no file has
   ImagePositionPatient. Positions within 0.05 mm are the same slice; slices are ordered along
   the normal (ascending).
4. **Frame times.** One time tag is chosen for the whole series, the first of
   ``AcquisitionDateTime``, ``AcquisitionDate+AcquisitionTime``, ``ContentDate+ContentTime``,
   ``AcquisitionTime``, ``ContentTime`` that every file carries *and* that varies between the
   frames of a slice. A tag that is constant within every slice (a series start time, as some
   vendors write ContentTime) is combined with ``TriggerTime`` (ms since the series start) when
   every file has it; ``TriggerTime`` alone is the last resort. A series that crosses midnight
   with time-only tags (no date), or with a date kept at the series start, shows a jump back of
   ~24 h: 86400 s are added after the jump. Frame times spanning more than 12 h are an error. Times
   are returned in seconds from the study's earliest frame.
5. **Pixels.** Read once per file (uncompressed little-endian: the pixel bytes directly; anything
   else through pydicom's decoders), RescaleSlope/RescaleIntercept applied → float32 HU.

Every slice must have the same number of frames: a slice with more or fewer frames than the
others (a missing or extra file) is rejected rather than padded or resampled, because the frame
times of the slices would no longer match the images.

Every problem is a :class:`~stm_dlp.types.StudyError` whose message names the file and the DICOM
tag. Patient names and IDs never appear in the study or in any message: the patient is
identified by :func:`pseudonymise` (keyed HMAC-SHA256).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import hmac
import os
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.datadict import tag_for_keyword
from pydicom.errors import InvalidDicomError
from pydicom.tag import BaseTag

from stm_dlp.geometry import affine_from_dicom_geometry
from stm_dlp.types import Study, StudyError

#: Default HMAC key for :func:`pseudonymise`. Pass your own key (``pseudonym_key``) for real data:
#: with a public key, a known PatientID can be matched to its pseudonym.
DEFAULT_PSEUDONYM_KEY = b"stm-dlp/pseudonym/v1"

#: Time-tag candidates in order of preference: (name, tags, carries a date).
TIME_CANDIDATES: tuple[tuple[str, tuple[str, ...], bool], ...] = (
    ("AcquisitionDateTime", ("AcquisitionDateTime",), True),
    ("AcquisitionDate+AcquisitionTime", ("AcquisitionDate", "AcquisitionTime"), True),
    ("ContentDate+ContentTime", ("ContentDate", "ContentTime"), True),
    ("AcquisitionTime", ("AcquisitionTime",), False),
    ("ContentTime", ("ContentTime",), False),
)
_TIME_TAGS = ("AcquisitionDateTime", "AcquisitionDate", "AcquisitionTime", "ContentDate", "ContentTime",
              "TriggerTime")
#: SOP classes that hold no image (skipped): SR, presentation states, encapsulated documents, raw
#: data, spatial registration, RT, key objects, waveforms.
_NON_IMAGE_SOP_PREFIXES = ("1.2.840.10008.5.1.4.1.1.88.", "1.2.840.10008.5.1.4.1.1.11.",
                           "1.2.840.10008.5.1.4.1.1.104.", "1.2.840.10008.5.1.4.1.1.66",
                           "1.2.840.10008.5.1.4.1.1.481.", "1.2.840.10008.5.1.4.1.1.9.",
                           "1.2.840.10008.5.1.4.1.1.131", "1.2.840.10008.5.1.4.1.1.11")
_NON_IMAGE_MODALITIES = {"SR", "KO", "PR", "DOC", "REG", "RTSTRUCT", "RTPLAN", "RTDOSE", "RAW", "FID"}
_NATIVE_LE = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"}  # implicit / explicit VR little endian
_PIXEL_TAG = b"\xe0\x7f\x10\x00"
_SLICE_TOL_MM = 0.05
_DUP_TIME_S = 1e-6


def _short(exc: BaseException, limit: int = 300) -> str:
    """``Type: message`` on one line, at most ``limit`` characters."""
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def pseudonymise(patient_id: str, key: bytes | None = None) -> str:
    """``"pt-"`` + the first 12 hex digits of HMAC-SHA256(``key``, ``patient_id``).

    Deterministic for a given key, so a patient's series map to the same pseudonym; the real ID
    cannot be recovered without the key. ``key=None`` uses :data:`DEFAULT_PSEUDONYM_KEY`.
    """
    digest = hmac.new(key or DEFAULT_PSEUDONYM_KEY, str(patient_id).encode("utf-8"), hashlib.sha256)
    return "pt-" + digest.hexdigest()[:12]


def hash_uid(uid: str) -> str:
    """Short stable hash (12 hex digits of SHA-256) of a DICOM UID, for messages and metadata."""
    return hashlib.sha256(str(uid).encode()).hexdigest()[:12]


# ------------------------------------------------------------------------------ time parsing
def parse_tm(text: str) -> float:
    """DICOM TM (``HHMMSS.FFFFFF``, ``HHMM``, ``HH``, or ACR-NEMA ``HH:MM:SS.frac``) → seconds of day."""
    t = str(text).strip().replace(":", "")
    if not t or not t.split(".")[0].isdigit():
        raise ValueError(f"not a DICOM time: {text!r}")
    whole, _, frac = t.partition(".")
    if len(whole) not in (2, 4, 6) or (frac and not frac.isdigit()):
        raise ValueError(f"not a DICOM time: {text!r}")
    h = int(whole[0:2])
    m = int(whole[2:4]) if len(whole) >= 4 else 0
    s = int(whole[4:6]) if len(whole) >= 6 else 0
    if h > 23 or m > 59 or s > 60:
        raise ValueError(f"not a DICOM time: {text!r}")
    return h * 3600.0 + m * 60.0 + s + (float("0." + frac) if frac else 0.0)


def parse_da(text: str) -> int:
    """DICOM DA (``YYYYMMDD`` or ACR-NEMA ``YYYY.MM.DD``) → proleptic Gregorian ordinal (days)."""
    d = str(text).strip().replace(".", "").replace("-", "")
    if len(d) != 8 or not d.isdigit():
        raise ValueError(f"not a DICOM date: {text!r}")
    return dt.date(int(d[:4]), int(d[4:6]), int(d[6:8])).toordinal()


def parse_dt(text: str) -> float:
    """DICOM DT (``YYYYMMDDHHMMSS.FFFFFF&ZZXX``, trailing parts optional) → seconds (UTC if an offset)."""
    d = str(text).strip()
    offset = 0.0
    for sign in ("+", "-"):
        if sign in d[4:]:
            d, _, zone = d.rpartition(sign)
            if len(zone) != 4 or not zone.isdigit():
                raise ValueError(f"not a DICOM datetime: {text!r}")
            offset = (int(zone[:2]) * 3600 + int(zone[2:]) * 60) * (1 if sign == "+" else -1)
            break
    whole = d.partition(".")[0]
    if len(whole) < 4 or not whole.isdigit():
        raise ValueError(f"not a DICOM datetime: {text!r}")
    year = int(whole[0:4])
    month = int(whole[4:6]) if len(whole) >= 6 else 1
    day = int(whole[6:8]) if len(whole) >= 8 else 1
    secs = parse_tm(d[8:]) if len(d) > 8 else 0.0
    return dt.date(year, month, day).toordinal() * 86400.0 + secs - offset


# ------------------------------------------------------------------------------ indexing
@dataclass
class _Rec:
    """What the indexing pass learns about one image file."""

    path: Path
    rel: str
    series_uid: str
    sop_uid: str
    modality: str
    patient: str
    rows: int
    cols: int
    ipp: np.ndarray | None
    iop: np.ndarray | None
    slice_location: float | None
    pixel_spacing: tuple[float, float] | None
    slice_spacing: float | None
    tags: dict[str, str]
    transfer_syntax: str
    slope: float
    intercept: float
    bits_allocated: int
    bits_stored: int
    pixel_representation: int
    samples: int
    n_frames: int
    pixel_offset: int | None = None  # where the pixel bytes start (native little endian only)
    pixel_length: int | None = None
    has_pixels: bool | None = None  # None: unknown until the pixels are read
    pixel_error: str | None = None  # pixel data missing or truncated (raised when the frame is read)
    extra: dict[str, Any] = field(default_factory=dict)


def _list_files(root: Path) -> list[Path]:
    out: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith(".") or name.upper() == "DICOMDIR":
                continue
            out.append(Path(dirpath) / name)
    return out


_BINARY_INT_VRS = {"US": "H", "SS": "h", "UL": "I", "SL": "i"}
#: Integer tags that are binary US even when an implicit-VR file gives no VR.
_US_TAGS = {"Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
            "SamplesPerPixel"}


_TAG_CACHE: dict[str, BaseTag] = {}


class _Header:
    """Fast access to raw (unconverted) header values; pydicom's value conversion is slow."""

    def __init__(self, ds: pydicom.Dataset, path: Path):
        self.ds, self.path = ds, path

    def _elem(self, keyword: str) -> Any:
        tag = _TAG_CACHE.get(keyword)
        if tag is None:
            tag = _TAG_CACHE[keyword] = BaseTag(tag_for_keyword(keyword))
        return self.ds.get_item(tag)  # the raw element, unconverted

    def text(self, keyword: str, encoding: str = "latin-1") -> str | None:
        elem = self._elem(keyword)
        if elem is None or elem.value is None:
            return None
        value = elem.value
        if isinstance(value, (bytes, bytearray)):
            out = bytes(value).decode(encoding, errors="replace")
        elif isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
            out = "\\".join(str(v) for v in value)
        else:
            out = str(value)
        out = out.strip(" \x00")
        return out or None

    def integer(self, keyword: str) -> int | None:
        elem = self._elem(keyword)
        if elem is None or elem.value is None:
            return None
        value = elem.value
        if isinstance(value, (bytes, bytearray)):
            vr = elem.VR or ("US" if keyword in _US_TAGS else None)
            if vr in _BINARY_INT_VRS:
                if len(value) == 0:
                    return None
                code = ("<" if getattr(elem, "is_little_endian", True) else ">") + _BINARY_INT_VRS[vr]
                if len(value) < struct.calcsize(code):
                    raise StudyError(f"{self.path}: {keyword} has {len(value)} bytes, a {vr} value needs "
                                     f"{struct.calcsize(code)} (file corrupt?)")
                return int(struct.unpack(code, bytes(value[: struct.calcsize(code)]))[0])
            value = bytes(value).decode("latin-1").strip(" \x00")
            if not value:
                return None
        try:
            return int(float(str(value).split("\\")[0]))
        except ValueError:
            raise StudyError(f"{self.path}: {keyword} is not an integer ({value!r})") from None

    def floats(self, keyword: str, n: int) -> np.ndarray | None:
        text = self.text(keyword)
        if text is None:
            return None
        try:
            arr = np.asarray([float(v) for v in text.split("\\")], np.float64)
        except ValueError:
            raise StudyError(f"{self.path}: {keyword} is not numeric ({text!r})") from None
        if arr.shape != (n,) or not np.all(np.isfinite(arr)):
            raise StudyError(f"{self.path}: {keyword} must be {n} finite numbers, got {text!r}")
        return arr

    def number(self, keyword: str, default: float | None = None) -> float | None:
        text = self.text(keyword)
        if text is None:
            return default
        try:
            return float(text.split("\\")[0])
        except ValueError:
            raise StudyError(f"{self.path}: {keyword} is not a number ({text!r})") from None


def _is_non_image(sop_class: str, modality: str) -> bool:
    return sop_class.startswith(_NON_IMAGE_SOP_PREFIXES) or modality in _NON_IMAGE_MODALITIES


def _pixel_element(fh: Any, pos: int, size: int, implicit: bool) -> tuple[int, int] | None:
    """``(value offset, length)`` of a PixelData element starting at ``pos``, or None if not there."""
    fh.seek(pos)
    head = fh.read(12)
    if len(head) < 8 or head[:4] != _PIXEL_TAG:
        return None
    if implicit:
        return pos + 8, struct.unpack("<I", head[4:8])[0]
    vr = head[4:6]
    if vr in (b"OB", b"OW", b"OF", b"OD", b"OL", b"UN", b"OV"):
        if len(head) < 12:
            return None
        return pos + 12, struct.unpack("<I", head[8:12])[0]
    return pos + 8, struct.unpack("<H", head[6:8])[0]


def _index_file(path: Path, root: Path) -> _Rec | tuple[str, str]:
    """Index one file; a non-image object or non-CT image returns ``(rel, reason)`` (skipped)."""
    rel = path.relative_to(root).as_posix()
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            ds = pydicom.dcmread(fh, stop_before_pixels=True)
            stop = fh.tell()
            meta = getattr(ds, "file_meta", None)
            ts = str(getattr(meta, "TransferSyntaxUID", "") or "")
            pix = None
            if ts in _NATIVE_LE and stop < size:
                pix = _pixel_element(fh, stop, size, implicit=ts == "1.2.840.10008.1.2")
    except InvalidDicomError:
        raise StudyError(f"{path}: not a DICOM file (no 'DICM' marker); every file under {root} must be "
                         "DICOM — remove or move the non-DICOM file") from None
    except StudyError:
        raise
    except Exception as exc:  # pydicom raises many kinds on corrupt input
        raise StudyError(f"{path}: cannot be read as DICOM, the file is truncated or corrupt "
                         f"({_short(exc)})") from None
    if len(ds) == 0:
        raise StudyError(f"{path}: truncated or empty DICOM file (no data elements after the header)")
    hd = _Header(ds, path)
    sop_class = hd.text("SOPClassUID") or str(getattr(meta, "MediaStorageSOPClassUID", "") or "")
    modality = (hd.text("Modality") or "").upper()
    if _is_non_image(sop_class, modality):
        return rel, f"non-image object (SOP class {sop_class or '?'}, modality {modality or '?'})"
    if modality and modality != "CT":
        return rel, f"image of modality {modality}, not CT"
    if "LOCALIZER" in (hd.text("ImageType") or "").upper():
        return rel, "localizer (scout) image"
    series = hd.text("SeriesInstanceUID")
    if series is None:
        raise StudyError(f"{path}: SeriesInstanceUID (0020,000E) is missing; cannot tell which series it "
                         "belongs to (file truncated?)")

    def need_int(keyword: str) -> int:
        value = hd.integer(keyword)
        if value is None:
            raise StudyError(f"{path}: {keyword} is missing from an image file (file truncated?)")
        return value

    rows, cols = need_int("Rows"), need_int("Columns")
    if rows < 1 or cols < 1:
        raise StudyError(f"{path}: Rows×Columns is {rows}×{cols}; an image needs at least one row and column")
    bits_allocated = need_int("BitsAllocated")
    spacing = hd.floats("PixelSpacing", 2)
    rec = _Rec(
        path=path, rel=rel, series_uid=series, sop_uid=hd.text("SOPInstanceUID") or rel, modality=modality,
        patient=hd.text("PatientID", "utf-8") or hd.text("PatientName", "utf-8") or "",
        rows=rows, cols=cols,
        ipp=hd.floats("ImagePositionPatient", 3), iop=hd.floats("ImageOrientationPatient", 6),
        slice_location=hd.number("SliceLocation"),
        pixel_spacing=None if spacing is None else (float(spacing[0]), float(spacing[1])),
        slice_spacing=hd.number("SpacingBetweenSlices") or hd.number("SliceThickness"),
        tags={k: v for k in _TIME_TAGS if (v := hd.text(k)) is not None},
        transfer_syntax=ts,
        slope=float(hd.number("RescaleSlope", 1.0)),  # type: ignore[arg-type]
        intercept=float(hd.number("RescaleIntercept", 0.0)),  # type: ignore[arg-type]
        bits_allocated=bits_allocated, bits_stored=hd.integer("BitsStored") or bits_allocated,
        pixel_representation=hd.integer("PixelRepresentation") or 0,
        samples=hd.integer("SamplesPerPixel") or 1, n_frames=hd.integer("NumberOfFrames") or 1,
    )
    # Pixel problems are kept with the record: the reader raises them when the frame is read, or with
    # on_bad_frame="nan" marks just that frame as bad.
    if ts in _NATIVE_LE:
        if stop >= size:
            rec.pixel_error = (f"{path}: PixelData (7FE0,0010) is missing — the file holds no image or is "
                               "truncated")
        elif pix is not None:
            offset, length = pix
            need = rows * cols * _native_dtype(rec).itemsize
            if offset + length > size:
                rec.pixel_error = (f"{path}: truncated — PixelData (7FE0,0010) declares {length} bytes but the "
                                   f"file ends after {size - offset}")
            elif length != 0xFFFFFFFF and length < need:  # known before any memory is set aside for frames
                rec.pixel_error = (f"{path}: PixelData (7FE0,0010) has {length} bytes, but Rows×Columns = "
                                   f"{rows}×{cols} at {bits_allocated} bits need {need} (truncated?)")
            else:
                rec.pixel_offset, rec.pixel_length, rec.has_pixels = offset, length, True
    return rec


# ------------------------------------------------------------------------------ frame times
def _unwrap_midnight(times: np.ndarray) -> tuple[np.ndarray, bool]:
    """Time-of-day values (s) of a series that may cross 00:00: add 86400 s after the wrap."""
    if times.size == 0 or float(times.max() - times.min()) <= 43200.0:
        return times, False
    uniq = np.unique(times)
    gaps = np.diff(uniq)
    k = int(np.argmax(gaps))  # the wrap: the largest gap inside one day
    return np.where(times <= uniq[k], times + 86400.0, times), True


def _times_for(recs: list[_Rec], name: str, tags: tuple[str, ...]) -> np.ndarray:
    out = np.empty(len(recs), np.float64)
    for i, r in enumerate(recs):
        tag = tags[0]
        try:
            if name == "AcquisitionDateTime":
                out[i] = parse_dt(r.tags[tag])
            elif len(tags) == 2:
                out[i] = parse_da(r.tags[tags[0]]) * 86400.0 + parse_tm(r.tags[(tag := tags[1])])
            else:
                out[i] = parse_tm(r.tags[tag])
        except ValueError as exc:
            raise StudyError(f"{r.path}: {tag} cannot be read as a DICOM time ({exc})") from None
    return out


def _trigger_s(recs: list[_Rec]) -> np.ndarray:
    out = np.empty(len(recs), np.float64)
    for i, r in enumerate(recs):
        try:
            out[i] = float(r.tags["TriggerTime"]) / 1000.0
        except ValueError:
            raise StudyError(f"{r.path}: TriggerTime is not a number ({r.tags['TriggerTime']!r})") from None
        if not np.isfinite(out[i]):
            raise StudyError(f"{r.path}: TriggerTime is not finite ({r.tags['TriggerTime']!r})")
    return out


#: Acquisition-time tags that must agree with each other when a file carries both (ContentTime is the
#: time the image was made, which may legitimately lag and reorder, so it is not compared).
_ACQUISITION_FAMILY = {"AcquisitionDateTime": "AcquisitionDateTime",
                       "AcquisitionDate+AcquisitionTime": "AcquisitionTime", "AcquisitionTime": "AcquisitionTime"}
_AGREE_S = 1.0


def _check_agreement(recs: list[_Rec], chosen: str, times: np.ndarray, constant: Any) -> None:
    """Refuse a series whose AcquisitionDateTime and AcquisitionTime tell different frame timings."""
    if chosen not in _ACQUISITION_FAMILY:
        return
    for name, tags, dated in TIME_CANDIDATES:
        if name not in _ACQUISITION_FAMILY or _ACQUISITION_FAMILY[name] == _ACQUISITION_FAMILY[chosen]:
            continue
        if not all(all(t in r.tags for t in tags) for r in recs):
            continue
        try:
            other = _times_for(recs, name, tags)
        except StudyError:
            continue  # unreadable, so not used: nothing to contradict
        if not dated or np.unique(np.floor(other / 86400.0)).size == 1:
            other, _ = _unwrap_midnight(other)
        if constant(other):
            continue  # a series-level value, not a per-frame time
        diff = np.abs((times - times.min()) - (other - other.min()))
        k = int(np.argmax(diff))
        if diff[k] > _AGREE_S:
            raise StudyError(f"{recs[k].path}: contradictory time tags — {chosen} puts this frame at "
                             f"{times[k] - times.min():.2f} s but {name} at {other[k] - other.min():.2f} s "
                             "(seconds from the series' first frame); fix or remove one of them")


def _frame_times(recs: list[_Rec], slices: list[list[int]]) -> tuple[np.ndarray, str, bool]:
    """Absolute time (s) of every record, the tag used, and whether the series crossed midnight."""
    multi = [np.asarray(sl) for sl in slices if len(sl) > 1]
    has_trigger = all("TriggerTime" in r.tags for r in recs)

    def constant(t: np.ndarray) -> bool:
        return all(float(np.ptp(t[sl])) <= _DUP_TIME_S for sl in multi)

    def checked(t: np.ndarray, name: str, crossed: bool) -> tuple[np.ndarray, str, bool]:
        if float(t.max() - t.min()) > 43200.0:
            lo, hi = recs[int(np.argmin(t))], recs[int(np.argmax(t))]
            raise StudyError(f"{hi.path}: {name} is {(t.max() - t.min()) / 3600:.1f} h after that of "
                             f"{lo.path}; a perfusion series lasts minutes — the folder mixes acquisitions "
                             "or the time tags are wrong")
        return t, name, crossed

    for name, tags, dated in TIME_CANDIDATES:
        if not all(all(t in r.tags for t in tags) for r in recs):
            continue
        base, crossed = _times_for(recs, name, tags), False
        # Time-only tags wrap at midnight; so do dated ones from scanners that keep the series date
        # (one date on every file). Different dates are taken as they are.
        if not dated or np.unique(np.floor(base / 86400.0)).size == 1:
            base, crossed = _unwrap_midnight(base)
        if constant(base):
            if has_trigger:
                return checked(base + _trigger_s(recs), f"{name}+TriggerTime", crossed)
            continue  # a series-level time, not a per-frame one
        _check_agreement(recs, name, base, constant)
        return checked(base, name, crossed)
    if has_trigger:
        return checked(_trigger_s(recs), "TriggerTime", False)
    names = ", ".join(n for n, _, _ in TIME_CANDIDATES) + ", TriggerTime"
    for r in recs:
        if not r.tags:
            raise StudyError(f"{r.path}: no usable time tag — none of {names}; "
                             "frames cannot be ordered in time")
    best = max(TIME_CANDIDATES, key=lambda c: sum(all(t in r.tags for t in c[1]) for r in recs))
    have = sum(all(t in r.tags for t in best[1]) for r in recs)
    lacking = next((r for r in recs if not all(t in r.tags for t in best[1])), None)
    if lacking is None:  # every file has `best`, but it is the same for all frames of a slice
        with_trigger = sum("TriggerTime" in r.tags for r in recs)
        if with_trigger:
            lacking = next(r for r in recs if "TriggerTime" not in r.tags)
            raise StudyError(f"{lacking.path}: lacks TriggerTime that {with_trigger} other files of the series "
                             f"use; {best[0]} is the same for every frame of a slice, so frames cannot be "
                             "ordered in time")
        raise StudyError(f"{recs[0].path}: {best[0]} is the same for every frame of a slice and no other time "
                         f"tag ({names}) varies; frames cannot be ordered in time")
    if have == 0 or not any(r.tags for r in recs):
        raise StudyError(f"{lacking.path}: no usable time tag ({names}) varies between frames; frames cannot "
                         "be ordered in time")
    raise StudyError(f"{lacking.path}: lacks the time tag {best[0]} that {have} other files of the series "
                     f"use; no time tag ({names}) is present in every file, so frames cannot be "
                     "ordered in time")


# ------------------------------------------------------------------------------ pixels
def _native_dtype(rec: _Rec) -> np.dtype:
    kinds = {8: "u1", 16: "u2", 32: "u4"}
    if rec.bits_allocated not in kinds:
        raise StudyError(f"{rec.path}: BitsAllocated {rec.bits_allocated} is not supported (8, 16 or 32)")
    code = kinds[rec.bits_allocated]
    return np.dtype("<" + (code.replace("u", "i") if rec.pixel_representation == 1 else code))


def _read_pixels(rec: _Rec) -> np.ndarray:
    """Stored pixel values of one file, ``(rows, cols)`` (before rescale)."""
    n = rec.rows * rec.cols
    if rec.pixel_offset is not None and rec.pixel_length is not None and rec.pixel_length != 0xFFFFFFFF:
        dtype = _native_dtype(rec)
        need = n * dtype.itemsize
        if rec.pixel_length < need:
            raise StudyError(f"{rec.path}: PixelData (7FE0,0010) has {rec.pixel_length} bytes, but "
                             f"Rows×Columns = {rec.rows}×{rec.cols} at {rec.bits_allocated} bits need "
                             f"{need} (truncated?)")
        with open(rec.path, "rb") as fh:
            fh.seek(rec.pixel_offset)
            raw = fh.read(need)
        if len(raw) < need:
            raise StudyError(f"{rec.path}: truncated — PixelData (7FE0,0010) ends after {len(raw)} of "
                             f"{need} bytes")
        arr = np.frombuffer(raw, dtype=dtype, count=n)
        bits = rec.bits_allocated
        if rec.bits_stored < bits:
            shift = bits - rec.bits_stored
            if rec.pixel_representation == 1:  # sign-extend the stored bits
                arr = (arr << shift) >> shift
            else:
                arr = arr & ((1 << rec.bits_stored) - 1)
        return arr.reshape(rec.rows, rec.cols)
    # Compressed, big-endian or deflated transfer syntaxes: let pydicom decode.
    try:
        ds = pydicom.dcmread(rec.path)
    except Exception as exc:
        raise StudyError(f"{rec.path}: cannot be read as DICOM, truncated or corrupt "
                         f"({_short(exc)})") from None
    if "PixelData" not in ds:
        raise StudyError(f"{rec.path}: PixelData (7FE0,0010) is missing — the file holds no image or is "
                         "truncated")
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None) or ""
    ts_name = getattr(ts, "name", "") or "missing"
    try:
        arr = ds.pixel_array
    except Exception as exc:
        raise StudyError(f"{rec.path}: cannot decode the pixel data of transfer syntax {ts_name} ({ts}); "
                         f"install a decoder (e.g. pylibjpeg) or export uncompressed "
                         f"({_short(exc)})") from None
    if arr.shape != (rec.rows, rec.cols):
        raise StudyError(f"{rec.path}: decoded pixel data has shape {arr.shape}, Rows×Columns say "
                         f"{(rec.rows, rec.cols)}")
    return arr


# ------------------------------------------------------------------------------ the reader
def _select_series(recs: list[_Rec], root: Path) -> list[_Rec]:
    by_series: dict[str, list[_Rec]] = {}
    for r in recs:
        by_series.setdefault(r.series_uid, []).append(r)
    if len(by_series) > 1:
        parts = [f"series {hash_uid(uid)} ({len(rs)} files, e.g. {rs[0].path})"
                 for uid, rs in by_series.items()]
        raise StudyError(f"{root}: more than one CT series with pixel data (SeriesInstanceUID): "
                         + "; ".join(parts) + ". Put each series in its own folder.")
    return next(iter(by_series.values()))


def _check_consistent(recs: list[_Rec]) -> None:
    first = recs[0]
    sizes: dict[tuple[int, int], int] = {}
    for r in recs:
        sizes[(r.rows, r.cols)] = sizes.get((r.rows, r.cols), 0) + 1
    if len(sizes) > 1:
        common = max(sizes, key=lambda k: sizes[k])
        odd = next(r for r in recs if (r.rows, r.cols) != common)
        raise StudyError(f"{odd.path}: Rows/Columns {odd.rows}×{odd.cols} differ from the "
                         f"{common[0]}×{common[1]} of the other files in the series")
    seen: dict[str, _Rec] = {}
    patients: dict[str, _Rec] = {}
    for r in recs:
        if r.sop_uid in seen:
            raise StudyError(f"{r.path}: duplicate SOPInstanceUID — the same image as "
                             f"{seen[r.sop_uid].path}; remove one copy")
        seen[r.sop_uid] = r
        patients.setdefault(r.patient, r)
        if r.n_frames != 1:
            raise StudyError(f"{r.path}: NumberOfFrames is {r.n_frames}; multi-frame (enhanced) CT is not "
                             "supported, export one file per image")
        if r.samples != 1:
            raise StudyError(f"{r.path}: SamplesPerPixel is {r.samples}; a CT image has 1 "
                             "(is it a screenshot?)")
        if r.iop is not None and first.iop is not None and np.max(np.abs(r.iop - first.iop)) > 1e-4:
            raise StudyError(f"{r.path}: ImageOrientationPatient differs from {first.path}; the series mixes "
                             "orientations")
        if (r.pixel_spacing is not None and first.pixel_spacing is not None
                and np.max(np.abs(np.subtract(r.pixel_spacing, first.pixel_spacing))) > 1e-4):
            raise StudyError(f"{r.path}: PixelSpacing {r.pixel_spacing} differs from {first.pixel_spacing} "
                             f"of {first.path}")
    if len(patients) > 1:
        a, b = list(patients.values())[:2]
        raise StudyError(f"{a.path} and {b.path}: PatientID differs — the series mixes patients (IDs not "
                         "shown); a study folder must hold one patient's series")


def _slice_positions(recs: list[_Rec]) -> tuple[np.ndarray, np.ndarray, str]:
    """Position (mm) of every record along the slice normal, the normal, and the tag used."""
    iop = next((r.iop for r in recs if r.iop is not None), None)
    if iop is None:
        normal = np.array([0.0, 0.0, 1.0])
    else:
        normal = np.cross(iop[:3], iop[3:])
        norm = float(np.linalg.norm(normal))
        if norm < 1e-6:
            raise StudyError(f"{recs[0].path}: ImageOrientationPatient rows and columns are parallel")
        normal = normal / norm
    if all(r.ipp is not None for r in recs) and iop is not None:
        if any(r.iop is None for r in recs):
            r = next(r for r in recs if r.iop is None)
            raise StudyError(f"{r.path}: ImageOrientationPatient is missing (other files have it)")
        return np.array([float(r.ipp @ normal) for r in recs]), normal, "ImagePositionPatient"  # type: ignore[operator]
    if all(r.slice_location is not None for r in recs):
        return np.array([float(r.slice_location) for r in recs]), normal, "SliceLocation"  # type: ignore[arg-type]
    r = next(r for r in recs if r.ipp is None or r.iop is None)
    raise StudyError(f"{r.path}: neither ImagePositionPatient/ImageOrientationPatient nor SliceLocation is "
                     "present in every file; cannot tell which slice it is")


def _group_slices(positions: np.ndarray) -> list[list[int]]:
    order = np.argsort(positions, kind="stable")
    groups: list[list[int]] = []
    last = None
    for i in order:
        if last is None or positions[i] - last > _SLICE_TOL_MM:
            groups.append([])
        groups[-1].append(int(i))
        last = positions[i]
    return groups


def _frame_count_error(recs: list[_Rec], ordered: list[list[int]], counts: list[int], times: np.ndarray,
                       positions: np.ndarray) -> None:
    """Raise for slices with differing frame counts, naming the odd slice and, if possible, the gap."""
    # the most common count is the reference (ties: the larger, as a lost file is likelier than an extra)
    common = max(set(counts), key=lambda c: (counts.count(c), c))
    k = next(i for i, c in enumerate(counts) if c != common)
    ref = next(i for i, c in enumerate(counts) if c == common)
    odd_t = times[ordered[k]] - times[ordered[k][0]]
    ref_t = times[ordered[ref]] - times[ordered[ref][0]]
    hint = ""
    if counts[k] < common:
        tol = 0.5 * float(np.min(np.diff(ref_t))) if len(ref_t) > 1 else 0.5
        j = next((j for j, t in enumerate(ref_t) if np.min(np.abs(odd_t - t)) > tol), None)
        if j is not None and j > 0:
            before = recs[ordered[k][min(j, len(ordered[k])) - 1]]
            hint = f"; its frame {j} (~{ref_t[j]:.2f} s) is missing, after {before.path.name}"
    example = recs[ordered[k][0]]
    raise StudyError(
        f"{example.path.parent}: slice {k} (position {positions[ordered[k][0]]:.2f} mm, e.g. "
        f"{example.path.name}) has {counts[k]} frames but slice {ref} has {common} (frames per slice: "
        f"{counts}){hint}; every slice must have the same number of frames (a missing or extra file?)")


#: What the reader does with a frame whose pixels cannot be used (see :func:`read_dicom_study`).
ON_BAD_FRAME = ("raise", "nan")


def validate_study(study: Study) -> Study:
    """``study.validate()``, except that frames listed in ``meta["bad_frames"]`` may be NaN."""
    if study.meta.get("bad_frames"):
        frames = np.asarray(study.frames)
        dataclasses.replace(study, frames=np.where(np.isfinite(frames), frames, np.float32(0))).validate()
        return study
    return study.validate()


def read_dicom_study(path: str | Path, *, pseudonym_key: bytes | None = None,
                     on_bad_frame: str = "raise") -> Study:
    """Read the CT perfusion series in folder ``path`` (see the module docstring for the rules).

    Args:
        path: a folder holding one CT perfusion series (any file names, any nesting).
        pseudonym_key: HMAC key for :func:`pseudonymise` (``None`` → project default key).
        on_bad_frame: a frame whose pixel data is missing, truncated, undecodable or NaN/inf after
            rescale is an error (``"raise"``, default), or (``"nan"``, for best-effort inference) is
            filled with NaN and listed in ``meta["bad_frames"]`` as ``{slice, frame, file, error}``
            while the rest of the study is read. Problems of headers, times or geometry are errors
            either way, and so is a study with no usable frame.

    Returns:
        A validated :class:`Study`: ``frames`` float32 ``(S, T, H, W)`` HU, ``times_s`` float32
        ``(S, T)`` seconds from the study's earliest frame, ``affine`` (4, 4) RAS+ mm for arrays in
        ``(W, H, S)`` order, ``maps``/``mask`` None, ``patient_id`` pseudonymised, ``source`` the
        folder, and ``meta`` with ``series_uid_hash``, ``time_tag``, ``crosses_midnight``,
        ``geometry_tag``, ``files`` (``[slice][frame]`` paths relative to the folder),
        ``slice_positions_mm``, ``pixel_spacing_mm``, ``skipped`` (non-CT objects ignored) and
        ``bad_frames`` (empty unless ``on_bad_frame="nan"``).

    Raises:
        StudyError: with the offending file (or folder) and DICOM tag named; see the module docstring.
    """
    if on_bad_frame not in ON_BAD_FRAME:
        raise ValueError(f"on_bad_frame must be one of {', '.join(ON_BAD_FRAME)}, got {on_bad_frame!r}")
    root = Path(path)
    if not root.exists():
        raise StudyError(f"{root}: path does not exist")
    if not root.is_dir():
        raise StudyError(f"{root}: expected a folder holding a DICOM series, got a file")
    files = _list_files(root)
    if not files:
        raise StudyError(f"{root}: empty folder — no DICOM files found (hidden files and DICOMDIR "
                         "are ignored)")
    recs: list[_Rec] = []
    skipped: list[str] = []
    for f in files:
        item = _index_file(f, root)
        if isinstance(item, _Rec):
            recs.append(item)
        else:
            skipped.append(f"{item[0]}: {item[1]}")
    if not recs:
        raise StudyError(f"{root}: no CT image with pixel data among {len(files)} DICOM files "
                         f"(e.g. {skipped[0] if skipped else '?'})")
    recs = _select_series(recs, root)
    _check_consistent(recs)
    positions, normal, geometry_tag = _slice_positions(recs)
    slices = _group_slices(positions)
    if max(len(sl) for sl in slices) < 2:
        raise StudyError(f"{root}: every slice position has a single image ({len(recs)} files); a perfusion "
                         "series needs several frames per slice (is this a plain CT?)")
    times, time_tag, crossed = _frame_times(recs, slices)

    ordered: list[list[int]] = []
    for sl in slices:
        sl = sorted(sl, key=lambda i: (times[i], recs[i].rel))
        for a, b in zip(sl[:-1], sl[1:]):
            if times[b] - times[a] <= _DUP_TIME_S:
                raise StudyError(f"{recs[b].path}: duplicate frame — same slice position and same time "
                                 f"({time_tag}) as {recs[a].path}; frame times must increase within a slice")
        ordered.append(sl)
    counts = [len(sl) for sl in ordered]
    if len(set(counts)) > 1:
        _frame_count_error(recs, ordered, counts, times, positions)

    n_s, n_t = len(ordered), counts[0]
    h, w = recs[0].rows, recs[0].cols
    first_error = next((recs[i].pixel_error for sl in ordered for i in sl if recs[i].pixel_error), None)
    if first_error is not None and (on_bad_frame == "raise"
                                    or all(recs[i].pixel_error for sl in ordered for i in sl)):
        raise StudyError(first_error)
    frames = np.empty((n_s, n_t, h, w), np.float32)
    bad_frames: list[dict[str, Any]] = []
    for s, sl in enumerate(ordered):
        for t, i in enumerate(sl):
            r = recs[i]
            try:
                if r.pixel_error:
                    raise StudyError(r.pixel_error)
                with np.errstate(over="ignore", invalid="ignore"):
                    hu = _read_pixels(r).astype(np.float32) * np.float32(r.slope) + np.float32(r.intercept)
                if not np.all(np.isfinite(hu)):
                    raise StudyError(f"{r.path}: NaN or inf HU after rescale (RescaleSlope {r.slope}, "
                                     f"RescaleIntercept {r.intercept})")
            except StudyError as exc:
                if on_bad_frame == "raise":
                    raise
                frames[s, t] = np.nan
                bad_frames.append({"slice": s, "frame": t, "file": r.rel, "error": str(exc)})
                continue
            frames[s, t] = hu
    if len(bad_frames) == n_s * n_t:
        raise StudyError(f"{root}: no frame of the series is usable (e.g. {bad_frames[0]['error']})")
    abs_times = np.array([[times[i] for i in sl] for sl in ordered], np.float64)
    times_s = (abs_times - abs_times.min()).astype(np.float32)

    first = recs[ordered[0][0]]
    spacing = first.pixel_spacing
    notes = []
    if spacing is None:
        spacing = (1.0, 1.0)
        notes.append("PixelSpacing missing: 1 mm assumed")
    iop = first.iop if first.iop is not None else np.array([1.0, 0.0, 0.0, 0.0, 1.0, 0.0])
    if first.iop is None:
        notes.append("ImageOrientationPatient missing: axial assumed")
    slice_pos = np.array([positions[sl[0]] for sl in ordered])
    if geometry_tag == "ImagePositionPatient":
        origin = first.ipp
        last = recs[ordered[-1][0]].ipp
        step = (last - origin) / (n_s - 1) if n_s > 1 else normal * (first.slice_spacing or 1.0)  # type: ignore[operator]
    else:
        origin = normal * slice_pos[0]
        gap = (slice_pos[-1] - slice_pos[0]) / (n_s - 1) if n_s > 1 else (first.slice_spacing or 1.0)
        step = normal * gap
        notes.append("ImagePositionPatient missing: affine origin from SliceLocation (approximate)")
    if n_s > 2:
        gaps = np.diff(slice_pos)
        if np.max(np.abs(gaps - gaps.mean())) > 0.01 * abs(gaps.mean()) + 0.01:
            notes.append(f"irregular slice spacing {np.round(gaps, 3).tolist()} mm: affine uses the mean")
    for note in notes:
        warnings.warn(f"{root}: {note}", stacklevel=2)
    affine = affine_from_dicom_geometry(origin, iop, spacing, step)  # type: ignore[arg-type]

    study = Study(
        frames=frames,
        times_s=times_s,
        affine=affine,
        patient_id=pseudonymise(first.patient or recs[0].series_uid, pseudonym_key),
        source=str(root),
        meta={
            "series_uid_hash": hash_uid(first.series_uid),
            "time_tag": time_tag,
            "crosses_midnight": bool(crossed),
            "geometry_tag": geometry_tag,
            "files": [[recs[i].rel for i in sl] for sl in ordered],
            "slice_positions_mm": [float(p) for p in slice_pos],
            "pixel_spacing_mm": [float(spacing[0]), float(spacing[1])],
            "skipped": skipped,
            "notes": notes,
            "bad_frames": bad_frames,
        },
    )
    return validate_study(study)
