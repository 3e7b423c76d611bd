"""``python -m stm_dlp.synth out=DIR patients=N [...]`` — write a phantom cohort to disk.

Each patient becomes, in DESIGN.md's labelled-dataset layout::

    DIR/<patient>/ctp/SExxxxxx/[partN/]IM_xxxxx.dcm   the CT perfusion series (DICOM)
    DIR/<patient>/maps/{cbv,cbf,tmax,mtt,mask}.nii.gz  exact truth (write_maps_nifti)
    DIR/<patient>/truth.json                           AIF parameters, residue, seeds, time style

plus ``DIR/cohort.json`` (the settings). ``layout=`` writes the cohort in another layout the readers
take (:data:`LAYOUTS`): the DICOM variants ``dicom_series_per_time_point``, ``dicom_enhanced`` (one
Enhanced CT file per patient), ``dicom_enhanced_per_time_point`` (one per time point, Canon-style
TemporalPositionIndex = 1), ``dicom_shuttle`` (two table positions, per-slice times) keep the layout
above; ``nifti`` writes ``DIR/<patient>/ctp.nii.gz`` + ``ctp.json`` + ``maps/``; ``isles2018``
``DIR/case_N/``; ``isles2024`` an ISLES'24 release (``raw_data/`` and ``derivatives/`` with the lesion);
``unitobrain`` a UniToBrain release (``MOL-NNN_Registered_Filtered_3mm_20HU[_Maps]``). Outside the
``ctp/`` layouts the truth goes to ``DIR/truth/<patient>.json``. Patients cycle through the DICOM time-tag styles of
:data:`stm_dlp.io.dicom_writer.TIME_STYLES`, so a 4-patient cohort has all of them. Patient
``i`` is ``simulate_patient(cfg, cohort_member(i, seed)[0])`` — the same phantom as the in-memory
dataset. The fake PHI (PatientName ``PHANTOM^PATIENT0001``, PatientID ``PHANTOM-<seed>-0001``,
a PatientBirthDate and an AccessionNumber ``ACC<seed>-0001``, see :func:`fake_phi_extra`) is written
only inside the DICOM files, never in folder names, so tests can check that it never
leaks. Each patient is written to a hidden temporary folder and renamed when complete.

Run ``python -m stm_dlp.synth help`` for every key.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from stm_dlp.cli import REQUIRED, parse_kv, run_cli
from stm_dlp.data.dicom import pseudonymise
from stm_dlp.data.phantom import PhantomConfig, cohort_member, simulate_patient
from stm_dlp.io.atomic import atomic_write_text, replace_dir
from stm_dlp.io.dicom_writer import TIME_STYLES, shuttle_study, write_study_dicom, write_study_enhanced
from stm_dlp.io.nifti import write_maps_nifti
from stm_dlp.types import Study, maps_by_name

#: Layouts :func:`synthesize_cohort` writes (see the module docstring).
DICOM_LAYOUTS = ("dicom", "dicom_series_per_time_point", "dicom_enhanced", "dicom_enhanced_per_time_point",
                 "dicom_shuttle")
LAYOUTS = (*DICOM_LAYOUTS, "nifti", "isles2018", "isles2024", "unitobrain")

SPEC: dict[str, tuple[Any, Any, str]] = {
    "out": (str, REQUIRED, "output folder (created)"),
    "layout": (str, "dicom", f"how the cohort is written: {', '.join(LAYOUTS)}"),
    "patients": (int, 4, "number of patients"),
    "height": (int, 64, "rows per slice"),
    "width": (int, 64, "columns per slice"),
    "slices": (int, 4, "slices per patient"),
    "seed": (int, 0, "cohort seed (patient i is phantom.cohort_member(i, seed))"),
    "noise_hu": (float, 3.0, "Gaussian noise, HU"),
    "residue": (str, "exponential", "residue function: exponential, box, gamma, ... or mixed"),
    "frames_min": (int, 40, "fewest frames per study"),
    "frames_max": (int, 60, "most frames per study"),
    "lesion_probability": (float, 0.8, "chance that a patient has a lesion"),
    "styles": (str, "all", "DICOM time-tag styles to cycle, comma-separated, or all "
               f"({','.join(TIME_STYLES)})"),
    "overwrite": (bool, False, "replace patient folders that already exist"),
    "progress": (bool, True, "show a progress bar"),
}


def patient_dir_name(index: int) -> str:
    """Folder name of patient ``index`` (0-based): ``sub-0001``, ... (no PHI in names)."""
    return f"sub-{index + 1:04d}"


def fake_phi(index: int, seed: int) -> tuple[str, str]:
    """``(PatientName, PatientID)`` of phantom patient ``index``: fake PHI written only into DICOM."""
    return f"PHANTOM^PATIENT{index + 1:04d}", f"PHANTOM-{seed:03d}-{index + 1:04d}"


def fake_phi_extra(index: int, seed: int) -> tuple[str, str]:
    """``(PatientBirthDate, AccessionNumber)`` of phantom patient ``index``: fake PHI written only into DICOM."""
    year, month, day = 1930 + (seed * 7 + index) % 60, index % 12 + 1, (seed + index) % 28 + 1
    return f"{year:04d}{month:02d}{day:02d}", f"ACC{seed:03d}-{index + 1:04d}"


def parse_styles(text: str) -> tuple[str, ...]:
    """``"all"`` or a comma-separated list of :data:`TIME_STYLES` → tuple of styles."""
    if text.strip() == "all":
        return TIME_STYLES
    styles = tuple(s.strip() for s in text.split(",") if s.strip())
    bad = [s for s in styles if s not in TIME_STYLES]
    if bad or not styles:
        raise ValueError(f"styles: unknown {bad or text!r}; use all or a comma-separated subset of "
                         f"{','.join(TIME_STYLES)}")
    return styles


def write_patient(patient_dir: str | Path, study: Study, *, time_style: str, patient_name: str,
                  patient_id: str, seed: int, truth: dict[str, Any] | None = None,
                  overwrite: bool = False, patient_birth_date: str = "", accession_number: str = "",
                  layout: str = "dicom") -> Path:
    """Write one labelled patient (``ctp/`` DICOM, ``maps/`` NIfTI truth, ``truth.json``) atomically.

    ``layout`` is one of :data:`DICOM_LAYOUTS` (``dicom_shuttle`` writes ``study`` as given: make it
    with :func:`~stm_dlp.io.dicom_writer.shuttle_study` first).

    Everything goes into a hidden temporary sibling folder that is renamed to ``patient_dir`` when
    complete, so an interrupted run leaves no half patient (readers skip hidden folders).

    Args:
        patient_dir: final folder ``ROOT/<patient>``.
        study: a labelled study (``maps`` (S, 3, H, W) and ``mask`` (S, H, W) required).
        time_style, patient_name, patient_id, seed, patient_birth_date, accession_number: passed to
            :func:`write_study_dicom`.
        truth: extra facts for ``truth.json``.
        overwrite: replace an existing ``patient_dir``; otherwise it is an error.
    """
    final = Path(patient_dir)
    if layout not in DICOM_LAYOUTS:
        raise ValueError(f"write_patient writes the DICOM layouts {DICOM_LAYOUTS}, got {layout!r}")
    if study.maps is None or study.mask is None:
        raise ValueError(f"{study.source}: write_patient needs a labelled study with a mask")
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} already exists (pass overwrite=true to replace it)")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        if layout.startswith("dicom_enhanced"):
            per_time = layout == "dicom_enhanced_per_time_point"
            write_study_enhanced(study, tmp / "ctp", files="per_time_point" if per_time else "single",
                                 temporal_position_index="constant" if per_time else "per_time",
                                 patient_name=patient_name, patient_id=patient_id, seed=seed)
        else:
            write_study_dicom(study, tmp / "ctp", time_style=time_style, patient_name=patient_name,
                              patient_id=patient_id, patient_birth_date=patient_birth_date,
                              accession_number=accession_number, seed=seed,
                              series_per_time_point=layout == "dicom_series_per_time_point")
        maps = maps_by_name(study.maps)
        maps["mask"] = np.asarray(study.mask, bool)
        write_maps_nifti(tmp / "maps", maps, study.affine)
        atomic_write_text(tmp / "truth.json", json.dumps(truth or {}, indent=2, default=_json_default) + "\n")
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _json_default(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


def _target(root: Path, i: int, layout: str) -> Path:
    """Where patient ``i`` of a cohort in ``layout`` goes (the folder a reader is given)."""
    if layout == "isles2018":
        return root / f"case_{i + 1}"
    if layout == "isles2024":
        return root / "raw_data" / f"sub-stroke{i + 1:04d}"
    if layout == "unitobrain":
        return root / f"MOL-{i + 1:03d}_Registered_Filtered_3mm_20HU"
    return root / patient_dir_name(i)


def _write_other(target: Path, study: Study, layout: str, name: str, pid: str, seed: int, overwrite: bool) -> Path:
    """One patient in a non-``ctp/`` layout (see the module docstring)."""
    from stm_dlp.data.phantom import CORE, PENUMBRA
    from stm_dlp.io.layouts import (
        write_isles2018_case,
        write_isles2024_case,
        write_nifti_patient,
        write_unitobrain_case,
    )

    if layout == "nifti":
        return write_nifti_patient(target, study, overwrite=overwrite)
    if layout == "isles2018":
        return write_isles2018_case(target, study, times="sidecar", overwrite=overwrite)
    if layout == "isles2024":
        labels = study.meta.get("labels")
        lesion = np.isin(labels, [CORE, PENUMBRA]) if isinstance(labels, np.ndarray) else None
        write_isles2024_case(target.parent.parent, study, subject=target.name, space="ncct", lesion=lesion,
                             overwrite=overwrite)
        return write_isles2024_case(target.parent.parent, study, subject=target.name, overwrite=overwrite)
    name_key = target.name.split("_")[0]
    return write_unitobrain_case(target.parent, study, name=name_key, seed=seed, patient_name=name, patient_id=pid,
                                 overwrite=overwrite)


def synthesize_cohort(out: str | Path, n_patients: int, cfg: PhantomConfig | None = None, seed: int = 0,
                      styles: Sequence[str] = TIME_STYLES, overwrite: bool = False,
                      progress: bool = True, layout: str = "dicom") -> list[Path]:
    """Write ``n_patients`` phantom patients under ``out`` in ``layout`` (one of :data:`LAYOUTS`); returns
    the folder of each (what a reader is given; see module doc)."""
    if n_patients < 1:
        raise ValueError(f"patients must be >= 1, got {n_patients}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    cfg = cfg or PhantomConfig()
    styles = tuple(styles)
    for s in styles:
        if s not in TIME_STYLES:
            raise ValueError(f"unknown time style {s!r}; use some of {TIME_STYLES}")
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    targets = [_target(root, i, layout) for i in range(n_patients)]
    existing = [t for t in targets if t.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{existing[0]} already exists ({len(existing)} of the patient folders do); "
                              "pass overwrite=true to replace them or choose another out=")
    from rich.console import Console
    from rich.progress import track

    written = []
    for i in track(range(n_patients), description="Writing phantom patients",
                   console=Console(stderr=True), disable=not progress):
        patient_seed, _ = cohort_member(i, seed)
        study = simulate_patient(cfg, patient_seed)
        if layout == "dicom_shuttle":
            study = shuttle_study(study, positions=2)
        name, pid = fake_phi(i, seed)
        birth_date, accession = fake_phi_extra(i, seed)
        style = styles[i % len(styles)]
        truth = {
            "patient_dir": targets[i].name,
            "pseudonym_default_key": pseudonymise(pid, None),
            "phantom_seed": patient_seed,
            "cohort_seed": seed,
            "index": i,
            "time_style": style,
            "residue": study.meta["residue"],
            "aif_params": study.meta["aif_params"],
            "n_slices": study.n_slices,
            "n_frames": study.n_frames,
            "shape_hw": list(study.shape_hw),
            "layout": layout,
            "times_s": study.times_s[0].tolist(),
            **({"times_s_per_slice": study.times_s.tolist()} if layout == "dicom_shuttle" else {}),
            "units": {"cbv": "ml/100g", "cbf": "ml/100g/min", "tmax": "s", "mtt": "s"},
            "config": asdict(cfg),
        }
        if layout in DICOM_LAYOUTS:
            written.append(write_patient(targets[i], study, time_style=style, patient_name=name, patient_id=pid,
                                         seed=patient_seed, truth=truth, overwrite=overwrite,
                                         patient_birth_date=birth_date, accession_number=accession, layout=layout))
        else:
            written.append(_write_other(targets[i], study, layout, name, pid, patient_seed, overwrite))
            atomic_write_text(root / "truth" / f"{targets[i].name}.json",
                              json.dumps(truth, indent=2, default=_json_default) + "\n")
    cohort = {"patients": [t.name for t in targets], "seed": seed, "styles": list(styles), "layout": layout,
              "config": asdict(cfg)}
    atomic_write_text(root / "cohort.json", json.dumps(cohort, indent=2) + "\n")
    return written


def synth(argv: Sequence[str]) -> list[Path]:
    """Parse ``key=value`` arguments (see :data:`SPEC`) and write the cohort."""
    args = parse_kv(argv, SPEC, prog="python -m stm_dlp.synth")
    cfg = PhantomConfig(height=args["height"], width=args["width"], n_slices=args["slices"],
                        frames_min=args["frames_min"], frames_max=args["frames_max"],
                        noise_hu=args["noise_hu"],
                        residue=args["residue"], lesion_probability=args["lesion_probability"])
    paths = synthesize_cohort(args["out"], args["patients"], cfg, seed=args["seed"],
                              styles=parse_styles(args["styles"]), overwrite=args["overwrite"],
                              progress=args["progress"], layout=args["layout"])
    print(f"wrote {len(paths)} patients to {args['out']}")
    return paths


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point (``stm-dlp-synth`` / ``python -m stm_dlp.synth``)."""
    run_cli(synth, list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
