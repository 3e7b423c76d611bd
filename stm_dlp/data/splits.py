"""Patient-wise train / val / test splits that never leak between the runs of a study.

A split is computed once — deterministic from a seed (:func:`split_patients`) — and saved as a split
file (``ROOT/splits.json`` for a dataset root, or ``data.split_file``). Every later run reads it back
(:func:`resolve_split`) instead of recomputing it, as nnU-Net does: when the cohort grows, the new
patients go to one split (training by default) with a warning naming them, patients that left the
cohort are reported, and no patient ever moves between splits — a former test patient can never end
up in training. The file is never rewritten; the split a run really used is ``split.json`` in its run
dir.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from stm_dlp.types import StudyError

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
#: Where patients missing from an existing split file go (``ignore``: left out of every split).
NEW_PATIENT_POLICIES = (*SPLITS, "ignore")


def split_patients(patient_ids: Sequence[str], seed: int, val_fraction: float,
                   test_fraction: float) -> dict[str, list[str]]:
    """Deterministic patient-wise split ``{"train", "val", "test"}`` (no patient in two splits).

    Patients are sorted, shuffled with ``seed``, then cut; with ≥ 3 patients val and test get at
    least one each. Depends only on the set of IDs and the seed, not on their order.
    """
    ids = sorted(set(patient_ids))
    if len(ids) != len(patient_ids):
        raise ValueError("duplicate patient IDs in the dataset")
    rng = np.random.default_rng(seed)
    order = [ids[i] for i in rng.permutation(len(ids))]
    n = len(order)
    n_test = int(round(test_fraction * n))
    n_val = int(round(val_fraction * n))
    if n >= 3:
        n_test = max(1, n_test) if test_fraction > 0 else 0
        n_val = max(1, n_val) if val_fraction > 0 else 0
    if n_test + n_val >= n:
        raise ValueError(f"{n} patients are too few for val_fraction={val_fraction}, "
                         f"test_fraction={test_fraction}: training would be empty")
    return {"test": sorted(order[:n_test]), "val": sorted(order[n_test:n_test + n_val]),
            "train": sorted(order[n_test + n_val:])}


def read_split_file(path: str | Path) -> dict[str, list[str]]:
    """A split file's ``{"train", "val", "test"}`` lists; :class:`StudyError` naming the file if it is
    not JSON, lacks a split, or puts a patient in two splits."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise StudyError(f"{path}: cannot be read as a split file ({type(exc).__name__}: {exc})") from None
    if not isinstance(data, dict) or any(not isinstance(data.get(k), list) for k in SPLITS):
        raise StudyError(f"{path}: a split file needs lists 'train', 'val' and 'test' of patient IDs")
    splits = {k: [str(p) for p in data[k]] for k in SPLITS}
    seen: dict[str, str] = {}
    for k in SPLITS:
        for p in splits[k]:
            if p in seen:
                raise StudyError(f"{path}: patient {p} is in both '{seen[p]}' and '{k}'")
            seen[p] = k
    return splits


def resolve_split(patient_ids: Sequence[str], seed: int, val_fraction: float, test_fraction: float,
                  split_file: str | Path | None = None, new_patients: str = "train") -> dict[str, list[str]]:
    """The split of ``patient_ids``: read back from ``split_file`` when it exists, else computed with
    :func:`split_patients` (and written to ``split_file`` when one is given).

    Args:
        patient_ids: the cohort's (pseudonymised) IDs.
        seed, val_fraction, test_fraction: for a new split.
        split_file: the file to read or create; ``None`` computes the split every time (the phantom,
            whose cohort is itself a function of the seed).
        new_patients: split for patients the file does not know (``train``, ``val``, ``test`` or
            ``ignore``); they are listed in a warning.

    Returns:
        ``{"train", "val", "test"}``: sorted lists; patients of the file that are not in the cohort are
        dropped (with a warning).
    """
    if new_patients not in NEW_PATIENT_POLICIES:
        raise ValueError(f"data.new_patients must be one of {NEW_PATIENT_POLICIES}, got {new_patients!r}")
    ids = sorted(set(patient_ids))
    if len(ids) != len(patient_ids):
        raise ValueError("duplicate patient IDs in the dataset")
    if split_file is None or not Path(split_file).is_file():
        splits = split_patients(ids, seed, val_fraction, test_fraction)
        if split_file is not None:
            from stm_dlp.io.atomic import atomic_write_text

            try:
                atomic_write_text(Path(split_file), json.dumps({"seed": seed, **splits}, indent=2) + "\n")
                log.info("patient split written to %s; later runs read it back", split_file)
            except OSError as exc:
                log.warning("could not write the split file %s (%s): the split is recomputed on every run; "
                            "give data.split_file=<a writable path> to keep it", split_file, exc)
        return splits
    stored = read_split_file(split_file)
    known = {p for k in SPLITS for p in stored[k]}
    present = set(ids)
    missing = sorted(known - present)
    if missing:
        log.warning("%d patient(s) of the split file %s are not in the dataset: %s", len(missing), split_file,
                    ", ".join(missing))
    splits = {k: sorted(p for p in stored[k] if p in present) for k in SPLITS}
    new = sorted(present - known)
    if new:
        where = "no split (left out)" if new_patients == "ignore" else f"'{new_patients}'"
        log.warning("%d patient(s) are not in the split file %s and go to %s: %s", len(new), split_file, where,
                    ", ".join(new))
        if new_patients != "ignore":
            splits[new_patients] = sorted(splits[new_patients] + new)
    if not splits["train"]:
        raise StudyError(f"{split_file}: no training patient of this split file is in the dataset")
    return splits
