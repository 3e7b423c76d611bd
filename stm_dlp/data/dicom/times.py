"""Frame times: DICOM DA/TM/DT parsing, the choice of one time tag per series, midnight crossing.

The rules (step 4 of :mod:`stm_dlp.data.dicom`): the first of :data:`TIME_CANDIDATES` that every
file carries *and* that varies between the frames of a slice is used; a tag constant within every
slice (a series start time) is combined with ``TriggerTime``; ``TriggerTime`` alone is the last
resort. Time-of-day values that wrap at 00:00 get 86400 s added after the wrap.

Frames of enhanced multi-frame files (:mod:`stm_dlp.data.dicom.enhanced`) first try their per-frame
times, :data:`ENHANCED_TIME_CANDIDATES` in order. A per-frame tag is *not trusted* when it repeats
within a slice, or when the frames carry a ``TemporalPositionIndex`` that is distinct within every
slice and the tag does not increase with it — de-identification (seen on Siemens exports) can
scramble ``FrameAcquisitionDateTime``. The next source is then tried (``FrameReferenceDateTime``,
``TemporalPositionTimeOffset``, then the file-level tags above, which differ between the files of a
one-file-per-time-point export); when none is left the error names the file, the frame and the
tag. ``TemporalPositionIndex`` alone never orders frames: Canon writes 1 in every file.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import numpy as np

from stm_dlp.data.dicom.record import FrameRecord
from stm_dlp.types import StudyError

#: Time-tag candidates in order of preference: (name, tags, carries a date).
TIME_CANDIDATES: tuple[tuple[str, tuple[str, ...], bool], ...] = (
    ("AcquisitionDateTime", ("AcquisitionDateTime",), True),
    ("AcquisitionDate+AcquisitionTime", ("AcquisitionDate", "AcquisitionTime"), True),
    ("ContentDate+ContentTime", ("ContentDate", "ContentTime"), True),
    ("AcquisitionTime", ("AcquisitionTime",), False),
    ("ContentTime", ("ContentTime",), False),
)
#: Per-frame time sources of enhanced frames, tried before :data:`TIME_CANDIDATES`: (name, is a
#: DICOM DT; else seconds).
ENHANCED_TIME_CANDIDATES: tuple[tuple[str, bool], ...] = (
    ("FrameAcquisitionDateTime", True),
    ("FrameReferenceDateTime", True),
    ("TemporalPositionTimeOffset", False),
)
#: Every time tag the indexing pass keeps (raw text) in :attr:`FrameRecord.tags`.
TIME_TAGS = ("AcquisitionDateTime", "AcquisitionDate", "AcquisitionTime", "ContentDate", "ContentTime",
             "TriggerTime")
#: Frames of one slice closer in time than this (s) are the same frame (a duplicate).
DUP_TIME_S = 1e-6


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



def _unwrap_midnight(times: np.ndarray) -> tuple[np.ndarray, bool]:
    """Time-of-day values (s) of a series that may cross 00:00: add 86400 s after the wrap."""
    if times.size == 0 or float(times.max() - times.min()) <= 43200.0:
        return times, False
    uniq = np.unique(times)
    gaps = np.diff(uniq)
    k = int(np.argmax(gaps))  # the wrap: the largest gap inside one day
    return np.where(times <= uniq[k], times + 86400.0, times), True


def _times_for(recs: list[FrameRecord], name: str, tags: tuple[str, ...]) -> np.ndarray:
    out = np.empty(len(recs), np.float64)
    for i, r in enumerate(recs):
        tag = tags[0]
        try:
            if name == "TemporalPositionTimeOffset":
                out[i] = float(r.tags[tag])
                if not np.isfinite(out[i]):
                    raise ValueError(f"not finite: {r.tags[tag]!r}")
            elif name in ("AcquisitionDateTime", "FrameAcquisitionDateTime", "FrameReferenceDateTime"):
                out[i] = parse_dt(r.tags[tag])
            elif len(tags) == 2:
                out[i] = parse_da(r.tags[tags[0]]) * 86400.0 + parse_tm(r.tags[(tag := tags[1])])
            else:
                out[i] = parse_tm(r.tags[tag])
        except ValueError as exc:
            raise StudyError(f"{r.where}: {tag} cannot be read as a DICOM time ({exc})") from None
    return out


def _trigger_s(recs: list[FrameRecord]) -> np.ndarray:
    out = np.empty(len(recs), np.float64)
    for i, r in enumerate(recs):
        try:
            out[i] = float(r.tags["TriggerTime"]) / 1000.0
        except ValueError:
            raise StudyError(f"{r.where}: TriggerTime is not a number ({r.tags['TriggerTime']!r})") from None
        if not np.isfinite(out[i]):
            raise StudyError(f"{r.where}: TriggerTime is not finite ({r.tags['TriggerTime']!r})")
    return out


#: Acquisition-time tags that must agree with each other when a file carries both (ContentTime is the
#: time the image was made, which may legitimately lag and reorder, so it is not compared).
_ACQUISITION_FAMILY = {"AcquisitionDateTime": "AcquisitionDateTime",
                       "AcquisitionDate+AcquisitionTime": "AcquisitionTime", "AcquisitionTime": "AcquisitionTime"}
_AGREE_S = 1.0


def _check_agreement(recs: list[FrameRecord], chosen: str, times: np.ndarray, constant: Any) -> None:
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
            raise StudyError(f"{recs[k].where}: contradictory time tags — {chosen} puts this frame at "
                             f"{times[k] - times.min():.2f} s but {name} at {other[k] - other.min():.2f} s "
                             "(seconds from the series' first frame); fix or remove one of them")


def _untrusted(recs: list[FrameRecord], t: np.ndarray, multi: list[np.ndarray], name: str) -> str | None:
    """Why the per-frame times ``t`` (tag ``name``) cannot order the frames, or None when they can."""
    for sl in multi:
        order = sl[np.argsort(t[sl], kind="stable")]
        close = np.nonzero(np.diff(t[order]) <= DUP_TIME_S)[0]
        if close.size:
            a, b = recs[int(order[close[0]])], recs[int(order[close[0] + 1])]
            return (f"{b.where}: {name} repeats within a slice (the same time as {a.where}; de-identified or "
                    "a series-level value?)")
    index = [r.temporal_index for r in recs]
    if any(i is None for i in index):
        return None
    idx = np.asarray(index, np.int64)
    if not all(np.unique(idx[sl]).size == sl.size for sl in multi):
        return None  # not distinct within a slice (Canon: 1 everywhere): nothing to check against
    for sl in multi:
        by_index = sl[np.argsort(idx[sl], kind="stable")]
        back = np.nonzero(np.diff(t[by_index]) <= 0)[0]
        if back.size:
            a, b = recs[int(by_index[back[0]])], recs[int(by_index[back[0] + 1])]
            return (f"{b.where}: {name} does not increase with TemporalPositionIndex (index {b.temporal_index} at "
                    f"{t[by_index[back[0] + 1]] - t.min():.2f} s, index {a.temporal_index} of {a.where} at "
                    f"{t[by_index[back[0]]] - t.min():.2f} s) — scrambled, e.g. by de-identification")
    return None


def _enhanced_times(recs: list[FrameRecord], multi: list[np.ndarray],
                    constant: Any) -> tuple[np.ndarray | None, str, list[str]]:
    """Per-frame times of enhanced frames: ``(times, tag, [])``, or ``(None, "", reasons)`` with why
    each per-frame tag present was not trusted."""
    reasons: list[str] = []
    for name, _dated in ENHANCED_TIME_CANDIDATES:
        if not all(name in r.tags for r in recs):
            continue
        t = _times_for(recs, name, (name,))
        if constant(t):
            reasons.append(f"{recs[0].where}: {name} is the same for every frame of a slice")
            continue
        why = _untrusted(recs, t, multi, name)
        if why is not None:
            reasons.append(why)
            continue
        return t, name, []
    return None, "", reasons


def frame_times(recs: list[FrameRecord], slices: list[list[int]]) -> tuple[np.ndarray, str, bool]:
    """Absolute time (s) of every record, the tag used, and whether the series crossed midnight.

    ``slices`` are the record indices of each slice (:func:`~stm_dlp.data.dicom.slices.group_slices`):
    a tag must vary within a slice to order its frames.
    """
    multi = [np.asarray(sl) for sl in slices if len(sl) > 1]
    has_trigger = all("TriggerTime" in r.tags for r in recs)

    def constant(t: np.ndarray) -> bool:
        return all(float(np.ptp(t[sl])) <= DUP_TIME_S for sl in multi)

    def checked(t: np.ndarray, name: str, crossed: bool) -> tuple[np.ndarray, str, bool]:
        if float(t.max() - t.min()) > 43200.0:
            lo, hi = recs[int(np.argmin(t))], recs[int(np.argmax(t))]
            raise StudyError(f"{hi.where}: {name} is {(t.max() - t.min()) / 3600:.1f} h after that of "
                             f"{lo.where}; a perfusion series lasts minutes — the folder mixes acquisitions "
                             "or the time tags are wrong")
        return t, name, crossed

    enhanced = any(r.frame_index is not None for r in recs)
    distrusted: list[str] = []
    if enhanced:
        t_frame, name, distrusted = _enhanced_times(recs, multi, constant)
        if t_frame is not None:
            return checked(t_frame, name, False)
    for name, tags, dated in TIME_CANDIDATES:
        if not all(all(t in r.tags for t in tags) for r in recs):
            continue
        base, crossed = _times_for(recs, name, tags), False
        if enhanced:  # file-level times of one-file-per-time-point exports: checked like per-frame ones
            if not constant(base) and _untrusted(recs, base, multi, name) is not None:
                distrusted.append(_untrusted(recs, base, multi, name))  # type: ignore[arg-type]
                continue
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
    if enhanced:
        sources = ", ".join([n for n, _ in ENHANCED_TIME_CANDIDATES] + [n for n, _, _ in TIME_CANDIDATES])
        if distrusted:
            raise StudyError(f"{distrusted[0]}; no other time source ({sources}) orders the frames, so they "
                             "cannot be ordered in time — export the series without altering its times")
        first = next(r for r in recs if r.frame_index is not None)
        raise StudyError(f"{first.where}: enhanced multi-frame CT without per-frame times — FrameContentSequence "
                         "(0020,9111) has no FrameAcquisitionDateTime or FrameReferenceDateTime and there is no "
                         f"TemporalPositionTimeOffset, and no other time tag ({sources}) varies between the "
                         "frames of a slice; frames cannot be ordered in time")
    names = ", ".join(n for n, _, _ in TIME_CANDIDATES) + ", TriggerTime"
    for r in recs:
        if not r.tags:
            raise StudyError(f"{r.where}: no usable time tag — none of {names}; "
                             "frames cannot be ordered in time")
    best = max(TIME_CANDIDATES, key=lambda c: sum(all(t in r.tags for t in c[1]) for r in recs))
    have = sum(all(t in r.tags for t in best[1]) for r in recs)
    lacking = next((r for r in recs if not all(t in r.tags for t in best[1])), None)
    if lacking is None:  # every file has `best`, but it is the same for all frames of a slice
        with_trigger = sum("TriggerTime" in r.tags for r in recs)
        if with_trigger:
            lacking = next(r for r in recs if "TriggerTime" not in r.tags)
            raise StudyError(f"{lacking.where}: lacks TriggerTime that {with_trigger} other files of the series "
                             f"use; {best[0]} is the same for every frame of a slice, so frames cannot be "
                             "ordered in time")
        raise StudyError(f"{recs[0].where}: {best[0]} is the same for every frame of a slice and no other time "
                         f"tag ({names}) varies; frames cannot be ordered in time")
    if have == 0 or not any(r.tags for r in recs):
        raise StudyError(f"{lacking.where}: no usable time tag ({names}) varies between frames; frames cannot "
                         "be ordered in time")
    raise StudyError(f"{lacking.where}: lacks the time tag {best[0]} that {have} other files of the series "
                     f"use; no time tag ({names}) is present in every file, so frames cannot be "
                     "ordered in time")

