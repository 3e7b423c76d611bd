"""Read one CT perfusion series from a folder of DICOM files into a :class:`~stm_dlp.types.Study`.

What the reader does (DESIGN.md, "DICOM reading"):

1. **Find files.** Every file under the folder, at any depth and with any name, except hidden files
   and folders (names starting with ``.``) and ``DICOMDIR``. Every file must be DICOM: a non-DICOM,
   empty or truncated file is an error naming it.
2. **Index** (``pydicom.dcmread(stop_before_pixels=True)``, one pass). Non-image objects (structured
   reports, presentation states, ...), localizer (scout) images and image series of other
   modalities (e.g. secondary captures of vendor maps) are skipped and listed in
   ``meta["skipped"]``. More than one CT series (SeriesInstanceUID) with pixel data is an error
   naming both (hashed) UIDs and a file of each — unless they are one series per time point (below).
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

Other inputs, through the same records:

* **Enhanced multi-frame CT** (Enhanced CT Image Storage; one file, or one file per time point):
  :mod:`.enhanced` turns each frame of such a file into a record, from its per-frame and shared
  functional groups; frames may be in any order. Per-frame times (FrameAcquisitionDateTime, else
  FrameReferenceDateTime, else TemporalPositionTimeOffset) are checked before use — a time that
  repeats within a slice, or disagrees with a distinct TemporalPositionIndex (scrambled by
  de-identification), is not trusted and the next source is tried; TemporalPositionIndex alone never
  orders frames (Canon writes 1 in every file). InstanceNumber is never used (Philips may repeat it).
* **One series per time point**: series with one StudyInstanceUID and FrameOfReferenceUID, each a
  single volume of the same geometry and ImageType, are one acquisition (:func:`.slices.select_series`);
  two genuinely different series stay an error naming both.
* **Shuttle (jog) mode**: slices imaged at different times keep their own times (``times_s`` is per
  slice); nothing is resampled onto a shared clock.
* **Volumes** (derived maps, one image per slice): :func:`.volume.read_dicom_volume`.

Layout (one job per module; the pipeline itself is :func:`~stm_dlp.data.dicom.reader.read_dicom_study`):

* ``record.py`` — :class:`FrameRecord`, what the header of one frame says; the steps after indexing
  read only records.
* ``index.py`` — steps 1–2: the file walk and one header read per file (the *sources of frames*).
* ``enhanced.py`` — the records of an enhanced multi-frame file.
* ``slices.py`` — step 3: one acquisition, consistent geometry, the ``[slice][frame]`` grid, the affine.
* ``times.py`` — step 4: DA/TM/DT parsing, the time tag, midnight, per-frame time checks.
* ``pixels.py`` — step 5: stored values → HU, bad frames (``on_bad_frame``).
* ``pseudonym.py`` — patient pseudonyms and UID hashes.
* ``reader.py`` — :func:`read_dicom_study`, the steps in order.
* ``volume.py`` — :func:`read_dicom_volume`, a one-image-per-slice series (maps).
"""

from stm_dlp.data.dicom.pixels import ON_BAD_FRAME, validate_study
from stm_dlp.data.dicom.pseudonym import DEFAULT_PSEUDONYM_KEY, hash_uid, pseudonymise
from stm_dlp.data.dicom.reader import read_dicom_study
from stm_dlp.data.dicom.record import FrameRecord
from stm_dlp.data.dicom.times import TIME_CANDIDATES, parse_da, parse_dt, parse_tm
from stm_dlp.data.dicom.volume import DicomVolume, read_dicom_volume

__all__ = [
    "DEFAULT_PSEUDONYM_KEY",
    "ON_BAD_FRAME",
    "TIME_CANDIDATES",
    "DicomVolume",
    "FrameRecord",
    "hash_uid",
    "parse_da",
    "parse_dt",
    "parse_tm",
    "pseudonymise",
    "read_dicom_study",
    "read_dicom_volume",
    "validate_study",
]
