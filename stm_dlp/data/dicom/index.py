"""Indexing: find the files of a study folder and read each header once into a :class:`FrameRecord`.

Two *sources of frames* share the one header read per file
(``pydicom.dcmread(stop_before_pixels=True)``, raw header values, the pixel byte offset remembered so
the pixels are read later without parsing the file again): a classic single-frame file gives one
:class:`FrameRecord`; an enhanced multi-frame file one record per frame, from its functional groups
(:mod:`stm_dlp.data.dicom.enhanced`). The steps after :func:`index_folder` only read records.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.errors import InvalidDicomError
from pydicom.tag import BaseTag

from stm_dlp.data.dicom.enhanced import expand_enhanced, is_enhanced
from stm_dlp.data.dicom.pixels import NATIVE_LE, native_dtype
from stm_dlp.data.dicom.record import FrameRecord, short_error
from stm_dlp.data.dicom.times import TIME_TAGS
from stm_dlp.types import StudyError

#: SOP classes that hold no image (skipped): SR, presentation states, encapsulated documents, raw
#: data, spatial registration, RT, key objects, waveforms.
_NON_IMAGE_SOP_PREFIXES = ("1.2.840.10008.5.1.4.1.1.88.", "1.2.840.10008.5.1.4.1.1.11.",
                           "1.2.840.10008.5.1.4.1.1.104.", "1.2.840.10008.5.1.4.1.1.66",
                           "1.2.840.10008.5.1.4.1.1.481.", "1.2.840.10008.5.1.4.1.1.9.",
                           "1.2.840.10008.5.1.4.1.1.131", "1.2.840.10008.5.1.4.1.1.11")
_NON_IMAGE_MODALITIES = {"SR", "KO", "PR", "DOC", "REG", "RTSTRUCT", "RTPLAN", "RTDOSE", "RAW", "FID"}
_PIXEL_TAG = b"\xe0\x7f\x10\x00"


def list_files(root: Path) -> list[Path]:
    """Every file under ``root`` at any depth, in sorted order, except hidden files and folders and DICOMDIR."""
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


def _dictionary_vr(keyword: str) -> str | None:
    """The VR the DICOM dictionary gives ``keyword`` (implicit-VR files carry none), or None."""
    try:
        return dictionary_VR(tag_for_keyword(keyword))
    except (KeyError, TypeError):
        return None


class Header:
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
            vr = elem.VR or ("US" if keyword in _US_TAGS else _dictionary_vr(keyword))
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


def index_file(path: Path, root: Path, *, any_modality: bool = False) -> list[FrameRecord] | tuple[str, str]:
    """Index one file: its records (one per frame), or ``(rel, reason)`` for a skipped object — a
    non-image object, a localizer, or (unless ``any_modality``) an image of another modality than CT."""
    rel = path.relative_to(root).as_posix()
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            ds = pydicom.dcmread(fh, stop_before_pixels=True)
            stop = fh.tell()
            meta = getattr(ds, "file_meta", None)
            ts = str(getattr(meta, "TransferSyntaxUID", "") or "")
            pix = None
            if ts in NATIVE_LE and stop < size:
                pix = _pixel_element(fh, stop, size, implicit=ts == "1.2.840.10008.1.2")
    except InvalidDicomError:
        raise StudyError(f"{path}: not a DICOM file (no 'DICM' marker); every file under {root} must be "
                         "DICOM — remove or move the non-DICOM file") from None
    except StudyError:
        raise
    except Exception as exc:  # pydicom raises many kinds on corrupt input
        raise StudyError(f"{path}: cannot be read as DICOM, the file is truncated or corrupt "
                         f"({short_error(exc)})") from None
    if len(ds) == 0:
        raise StudyError(f"{path}: truncated or empty DICOM file (no data elements after the header)")
    hd = Header(ds, path)
    sop_class = hd.text("SOPClassUID") or str(getattr(meta, "MediaStorageSOPClassUID", "") or "")
    modality = (hd.text("Modality") or "").upper()
    if _is_non_image(sop_class, modality):
        return rel, f"non-image object (SOP class {sop_class or '?'}, modality {modality or '?'})"
    if modality and modality != "CT" and not any_modality:
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
    rec = FrameRecord(
        path=path, rel=rel, series_uid=series, sop_uid=hd.text("SOPInstanceUID") or rel, modality=modality,
        patient=hd.text("PatientID", "utf-8") or hd.text("PatientName", "utf-8") or "",
        rows=rows, cols=cols,
        ipp=hd.floats("ImagePositionPatient", 3), iop=hd.floats("ImageOrientationPatient", 6),
        slice_location=hd.number("SliceLocation"),
        pixel_spacing=None if spacing is None else (float(spacing[0]), float(spacing[1])),
        slice_spacing=hd.number("SpacingBetweenSlices") or hd.number("SliceThickness"),
        tags={k: v for k in TIME_TAGS if (v := hd.text(k)) is not None},
        transfer_syntax=ts,
        slope=float(hd.number("RescaleSlope", 1.0)),  # type: ignore[arg-type]
        intercept=float(hd.number("RescaleIntercept", 0.0)),  # type: ignore[arg-type]
        bits_allocated=bits_allocated, bits_stored=hd.integer("BitsStored") or bits_allocated,
        pixel_representation=hd.integer("PixelRepresentation") or 0,
        samples=hd.integer("SamplesPerPixel") or 1, n_frames=hd.integer("NumberOfFrames") or 1,
        study_uid=hd.text("StudyInstanceUID"), frame_of_reference_uid=hd.text("FrameOfReferenceUID"),
        image_type=hd.text("ImageType"),
    )
    # Pixel problems are kept with the record: the reader raises them when the frame is read, or with
    # on_bad_frame="nan" marks just that frame as bad.
    if ts in NATIVE_LE:
        if stop >= size:
            rec.pixel_error = (f"{path}: PixelData (7FE0,0010) is missing — the file holds no image or is "
                               "truncated")
        elif pix is not None:
            offset, length = pix
            need = rows * cols * native_dtype(rec).itemsize
            if offset + length > size:
                rec.pixel_error = (f"{path}: truncated — PixelData (7FE0,0010) declares {length} bytes but the "
                                   f"file ends after {size - offset}")
            elif length != 0xFFFFFFFF and length < need:  # known before any memory is set aside for frames
                rec.pixel_error = (f"{path}: PixelData (7FE0,0010) has {length} bytes, but Rows×Columns = "
                                   f"{rows}×{cols} at {bits_allocated} bits need {need} (truncated?)")
            else:
                rec.pixel_offset, rec.pixel_length, rec.has_pixels = offset, length, True
    if is_enhanced(ds, sop_class):
        return expand_enhanced(rec, ds)
    return [rec]



def index_folder(root: Path, *, any_modality: bool = False) -> tuple[list[FrameRecord], list[str]]:
    """Index every file under folder ``root``: the CT image records (one per frame), and the skipped
    objects as ``"relative path: reason"`` (non-image objects, localizers, other modalities unless
    ``any_modality``, e.g. for derived maps).

    Raises:
        StudyError: ``root`` is missing, not a folder or empty; a file is not DICOM or is corrupt; no
            file is a CT image with pixel data.
    """
    if not root.exists():
        raise StudyError(f"{root}: path does not exist")
    if not root.is_dir():
        raise StudyError(f"{root}: expected a folder holding a DICOM series, got a file")
    files = list_files(root)
    if not files:
        raise StudyError(f"{root}: empty folder — no DICOM files found (hidden files and DICOMDIR "
                         "are ignored)")
    recs: list[FrameRecord] = []
    skipped: list[str] = []
    for f in files:
        item = index_file(f, root, any_modality=any_modality)
        if isinstance(item, list):
            recs.extend(item)
        else:
            skipped.append(f"{item[0]}: {item[1]}")
    if not recs:
        raise StudyError(f"{root}: no CT image with pixel data among {len(files)} DICOM files "
                         f"(e.g. {skipped[0] if skipped else '?'})")
    return recs, skipped
