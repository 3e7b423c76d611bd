"""``python -m stm_dlp.calc input=STUDY_DIR output=OUT_DIR method=osvd`` — deconvolution maps.

"The calculation approach" (paper §2.1; :func:`stm_dlp.perfusion.maps.calculate_maps`) as a tool:

* ``input`` is a study in any layout :func:`stm_dlp.data.studies.read_any_study` reads (a patient
  folder with ``ctp/`` or ``ctp.nii.gz``, an ISLES 2018 case, an ISLES'24 subject, a UniToBrain case, a
  4-D NIfTI, a bare DICOM folder — classic, enhanced multi-frame, one series per time point) or a
  root of patients (:mod:`stm_dlp.cohort`); a root gives one output folder per patient
  (``OUT/<patient folder>``), a progress bar and, last on stdout, one summary table (per patient
  status, frames, core and TMAX > 6 s volumes); a patient that fails is reported and skipped, and
  the exit status is then 2.
* ``output_dicom=true`` also writes the maps for PACS into ``OUT/dicom/`` (one derived series per map,
  an RGB colour series; :mod:`stm_dlp.io.dicom_maps`).
* Each output folder gets ``{cbf,cbv,mtt,tmax}.nii.gz`` (+ ``mask.nii.gz``) with the scan's geometry,
  ``maps.png``, ``aif.png`` (the AIF and VOF curves and where they were taken) and ``summary.json``
  (units, method and parameters, AIF pixels and curves, timing, the clinical ``readout``) and
  ``readout.png`` (core red, penumbra green on the pre-contrast CT) — the same bundle as
  ``stm_dlp.predict``. For one study the last stdout line is the readout: core, TMAX > 6 s and
  mismatch volumes and the DEFUSE-3 profile (``readout_*`` options set the thresholds;
  :mod:`stm_dlp.perfusion.readout`); for a root, the summary table.
* ``aif=auto`` (default) selects the AIF automatically; ``aif=FILE.json`` holds either
  ``{"aif_pixels": [[slice, row, col], ...]}`` or ``{"times_s": [...], "aif": [...]}`` (enhancement
  in HU over baseline, times on the study clock: seconds from its first frame); ``aif=FILE.csv`` has
  columns ``time_s,aif_hu`` (header optional) or a single column with one value per frame.

Errors a user can act on (unreadable study, bad AIF file, no bolus) are one line on stderr and exit
status 2.
"""

from __future__ import annotations

import csv
import io
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from stm_dlp.cli import REQUIRED, parse_bool, parse_kv, run_cli
from stm_dlp.perfusion.maps import CalcParams, calculate_maps
from stm_dlp.perfusion.readout import CLI_OPTIONS as READOUT_OPTIONS
from stm_dlp.perfusion.readout import ReadoutThresholds, precontrast_image, readout_line, thresholds_from_options
from stm_dlp.types import UNITS, Study

#: calculate_maps' own defaults, so that the CLI and the library never disagree.
_DEFAULT = CalcParams().to_dict()

def _optional_float(text: str) -> float | None:
    """A number, or ``none`` / ``off`` for None."""
    return None if text.strip().lower() in ("none", "off") else float(text)


SPEC = {
    "input": (str, REQUIRED, "study folder (DICOM / patient with ctp/ / ISLES case) or a root of patients"),
    "output": (str, REQUIRED, "output folder (one sub-folder per patient for a root)"),
    "method": (str, "osvd", "osvd, bcsvd, ssvd or tikhonov"),
    "device": (str, "auto", "cpu, cuda or auto"),
    "dt": (float, _DEFAULT["dt_s"], "uniform deconvolution grid step in seconds"),
    "aif": (str, "auto", "auto, or a .json / .csv file with AIF pixels or an AIF curve"),
    "threshold": (float, _DEFAULT["threshold"], "sSVD/bcSVD relative SVD threshold"),
    "oi_target": (float, _DEFAULT["oi_target"], "oSVD oscillation-index target (CT 0.095, MR 0.035)"),
    "tmax": (str, _DEFAULT["tmax_method"], "TMAX estimator: calibrated_dispersion, calibrated, half_rise or argmax"),
    "cbv": (str, _DEFAULT["cbv_method"], "CBV from the area ratio (area) or the residue integral (residue)"),
    "temporal_sigma_s": (float, _DEFAULT["temporal_sigma_s"], "Gaussian temporal smoothing in seconds (0 = off)"),
    "spatial_sigma_mm": (float, _DEFAULT["spatial_sigma_mm"], "in-plane smoothing (mm), vessels out (0 = off)"),
    "spatial_sigma_px": (_optional_float, _DEFAULT["spatial_sigma_px"], "the same in px; overrides the mm (none = mm)"),
    "motion": (parse_bool, _DEFAULT["motion"], "rigid in-plane registration of every frame first"),
    "csf_max_hu": (_optional_float, _DEFAULT["csf_max_hu"], "brain below this pre-bolus HU is CSF (none = keep)"),
    "pv_correction": (parse_bool, _DEFAULT["pv_correction"], "scale the AIF area to the VOF's (partial volume)"),
    "frame_interval_s": (float, None, "NIfTI frame interval (s), only when the file gives no frame times"),
    "output_dicom": (parse_bool, False, "also write the maps as DICOM series for PACS (OUT/dicom/)"),
    **READOUT_OPTIONS,
    "progress": (parse_bool, True, "show a progress bar"),
}


def load_aif_file(path: str | Path) -> Any:
    """Read a user AIF: pixel list or curve, in a form :func:`calculate_maps` accepts (see module doc)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"AIF file {p} does not exist")
    text = p.read_text(encoding="utf-8")
    if p.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{p}: not valid JSON ({exc})") from None
        if isinstance(data, dict) and "aif_pixels" in data:
            data = data["aif_pixels"]
        if isinstance(data, dict):
            if "times_s" not in data or "aif" not in data:
                raise ValueError(f"{p}: an AIF JSON needs 'aif_pixels' or both 'times_s' and 'aif'")
            return {"times_s": np.asarray(data["times_s"], np.float64), "aif": np.asarray(data["aif"], np.float64)}
        arr = np.asarray(data, dtype=np.float64)
        if arr.ndim != 2 or arr.shape[1] != 3 or not np.allclose(arr, np.round(arr)):
            raise ValueError(f"{p}: AIF pixels must be a list of [slice, row, col] integer triples")
        return [tuple(int(v) for v in row) for row in arr]
    if p.suffix.lower() == ".csv":
        rows = [r for r in csv.reader(io.StringIO(text)) if r and any(c.strip() for c in r)]
        if rows and not _is_number(rows[0][0]):
            rows = rows[1:]  # header
        try:
            arr = np.asarray([[float(c) for c in r if c.strip()] for r in rows], np.float64)
        except ValueError:
            raise ValueError(f"{p}: the AIF CSV must hold numbers (time_s,aif_hu or one aif column)") from None
        if arr.ndim == 2 and arr.shape[1] == 2:
            return {"times_s": arr[:, 0], "aif": arr[:, 1]}
        if arr.ndim == 2 and arr.shape[1] == 1:
            return arr[:, 0]
        raise ValueError(f"{p}: the AIF CSV must have 2 columns (time_s, aif_hu) or 1 (one value per frame)")
    raise ValueError(f"{p}: AIF files must be .json or .csv")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def save_aif_png(path: str | Path, study: Study, info: dict[str, Any]) -> Path:
    """``aif.png``: AIF (and VOF) curves on the deconvolution grid and their pixels on a frame."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from stm_dlp.io.atomic import atomic_write_bytes

    a = info["aif"]
    t = np.asarray(a["grid_s"]) + float(info.get("time_origin_s", 0.0))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), gridspec_kw={"width_ratios": [1.4, 1]})
    ax = axes[0]
    ax.plot(t, a["aif_hu"], color="tab:red", lw=2, label=f"AIF ({a['source']})")
    if a.get("pv_scale", 1.0) != 1.0:
        ax.plot(t, a["aif_raw_hu"], color="tab:red", lw=1, ls="--", label=f"AIF before PV x{a['pv_scale']:.2f}")
    if a.get("vof_hu") is not None:
        ax.plot(t, a["vof_hu"], color="tab:blue", lw=2, label="VOF")
    ax.set_xlabel("time (s)")
    ax.set_ylabel("enhancement (HU)")
    ax.legend(loc="upper right", fontsize=8)
    ax.grid(alpha=0.3)
    ax.set_title(f"{info['method']}  AIF / VOF")
    ax = axes[1]
    pix = [tuple(p) for p in a["pixels_slice_row_col"]]
    vpix = [tuple(p) for p in a["vof_pixels_slice_row_col"]]
    s_show = int(np.bincount([p[0] for p in pix]).argmax()) if pix else study.n_slices // 2
    t_peak = float(t[int(np.argmax(a["aif_hu"]))])
    f_show = int(np.argmin(np.abs(np.asarray(study.times_s[s_show], np.float64) - t_peak)))
    ax.imshow(np.asarray(study.frames[s_show, f_show], np.float32), cmap="gray", vmin=-20, vmax=250)
    for pts, color, label in ((pix, "red", "AIF"), (vpix, "cyan", "VOF")):
        sel = [(r, c) for s, r, c in pts if s == s_show]
        if sel:
            ax.scatter([c for _, c in sel], [r for r, _ in sel], s=14, facecolors="none", edgecolors=color,
                       label=f"{label} ({len(sel)} of {len(pts)} px)")
    ax.set_title(f"slice {s_show}, frame {f_show} (AIF peak)")
    ax.axis("off")
    if pix or vpix:
        ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def calc_study(study: Study, output: str | Path, *, method: str = "osvd", device: str = "auto",
               dt: float = _DEFAULT["dt_s"],
               aif: Any = "auto", progress_cb: Any = None, readout_thresholds: ReadoutThresholds | None = None,
               output_dicom: bool = False, **params: Any) -> dict[str, Any]:
    """Maps of one study written to ``output`` (with ``output_dicom`` also as DICOM series in
    ``output/dicom/``, :mod:`stm_dlp.io.dicom_maps`); returns the summary written to ``summary.json``."""
    from stm_dlp.io.outputs import write_outputs

    t0 = time.perf_counter()
    maps, info = calculate_maps(np.asarray(study.frames), np.asarray(study.times_s), study.mask, method=method,
                                aif=aif, dt_s=dt, device=device, progress=progress_cb, affine=study.affine, **params)
    mask = maps.pop("mask")
    summary = {
        "method": info["method"],
        "approach": "calculation (deconvolution)",
        "patient_id": study.patient_id,
        "source": str(study.source),
        "layout": study.meta.get("layout"),
        "time_source": study.meta.get("time_source"),
        "shape_slices_rows_cols": [study.n_slices, *study.shape_hw],
        "n_frames": study.n_frames,
        "units": dict(UNITS),
        "device": info["device"],
        "params": info["params"],
        "aif": info["aif"],
        "mask_source": info["mask_source"],
        "arrival_frame": info["arrival_frame"],
        "baseline_frames": info["baseline_frames"],
        "arrival": info["arrival"],
        "exclusions": info["exclusions"],
        "motion": info["motion"],
        "scan_window": info["scan_window"],
        "pixel_mm": info["pixel_mm"],
        "median_threshold": info["threshold_used"]["median"],
        "timing_s": {**info["timing_s"], "calc_total": round(time.perf_counter() - t0, 4)},
    }
    out = Path(output)
    if output_dicom:
        from stm_dlp.io.dicom_maps import DICOM_DIR, reference_uids, write_maps_dicom

        series = write_maps_dicom(out, maps, study.affine, patient_id=study.patient_id, mask=mask,
                                  reference=reference_uids(study.meta), method=info["method"])
        summary["dicom"] = {name: f"{DICOM_DIR}/{files[0].parent.name}/ ({len(files)} files)"
                            for name, files in series.items()}
    write_outputs(out, maps, study.affine, summary, mask=mask, title=f"{study.patient_id} — {info['method']}",
                  baseline_hu=precontrast_image(study.frames, info["baseline_frames"]),
                  readout_thresholds=readout_thresholds)
    summary["readout"] = json.loads((out / "summary.json").read_text(encoding="utf-8"))["readout"]
    save_aif_png(out / "aif.png", study, info)
    return summary


def run_calc(input: str, output: str, method: str = "osvd", device: str = "auto", dt: float = _DEFAULT["dt_s"],
             aif: str = "auto", threshold: float = _DEFAULT["threshold"], oi_target: float = _DEFAULT["oi_target"],
             tmax: str = _DEFAULT["tmax_method"], cbv: str = _DEFAULT["cbv_method"],
             temporal_sigma_s: float = _DEFAULT["temporal_sigma_s"],
             spatial_sigma_mm: float = _DEFAULT["spatial_sigma_mm"],
             spatial_sigma_px: float | None = _DEFAULT["spatial_sigma_px"], motion: bool = _DEFAULT["motion"],
             pv_correction: bool = _DEFAULT["pv_correction"], csf_max_hu: float | None = _DEFAULT["csf_max_hu"],
             frame_interval_s: float | None = None, output_dicom: bool = False,
             progress: bool = True, readout_thresholds: ReadoutThresholds | None = None,
             results: list | None = None) -> list[dict[str, Any]]:
    """Read one study or a root of patients in any layout (:mod:`stm_dlp.cohort`), compute and write
    maps; returns the summaries of the studies done. For a root, a patient whose study cannot be used
    is reported and skipped; ``results`` (a list) receives every patient's
    :class:`~stm_dlp.cohort.PatientResult` for the summary table."""
    from stm_dlp.cohort import cohort_jobs, run_jobs
    from stm_dlp.data.studies import read_any_study
    from stm_dlp.perfusion.deconv import METHODS

    if method.lower() not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    src = Path(input)
    if not src.exists():
        raise FileNotFoundError(f"input {src} does not exist")
    aif_arg: Any = aif if aif == "auto" else load_aif_file(aif)
    params = dict(threshold=threshold, oi_target=oi_target, tmax_method=tmax, cbv_method=cbv,
                  temporal_sigma_s=temporal_sigma_s, spatial_sigma_px=spatial_sigma_px, pv_correction=pv_correction,
                  csf_max_hu=csf_max_hu, spatial_sigma_mm=spatial_sigma_mm, motion=motion)
    jobs, multi = cohort_jobs(src, output)
    pix_task: list[Any] = []

    def one(path: Path, out: Path, bar: Any) -> dict[str, Any]:
        if not pix_task:
            pix_task.append(bar.add_task("deconvolution (pixels)", total=None))
        bar.update(pix_task[0], description=f"{path.name}: pixels", completed=0, total=None)
        study = read_any_study(path, frame_interval_s=frame_interval_s)

        def cb(done: int, total: int) -> None:
            bar.update(pix_task[0], completed=done, total=total)

        return calc_study(study, out, method=method, device=device, dt=dt, aif=aif_arg, progress_cb=cb,
                          readout_thresholds=readout_thresholds, output_dicom=output_dicom, **params)

    done = run_jobs(jobs, one, progress=progress, keep_going=multi)
    if results is not None:
        results.extend(done)
    return [r.summary for r in done if r.summary is not None]


def main(argv: Sequence[str] | None = None) -> int:
    def _main() -> int:
        args = parse_kv(sys.argv[1:] if argv is None else list(argv), SPEC, prog="python -m stm_dlp.calc")
        readout_thresholds = thresholds_from_options(args)
        results: list = []
        summaries = run_calc(**args, readout_thresholds=readout_thresholds, results=results)
        n = len(summaries)
        print(f"wrote {args['method']} maps for {n} stud{'y' if n == 1 else 'ies'} to {args['output']}")
        from stm_dlp.cohort import cohort_jobs, summary_table

        if not cohort_jobs(args["input"], args["output"])[1]:
            print(readout_line(summaries[0]["readout"]))  # the clinical readout is the last line on stdout
            return 0

        print(summary_table(results))  # a cohort: one table, last on stdout
        failed = sum(r.status != "ok" for r in results)
        if failed:
            print(f"error: {failed} of {len(results)} studies failed (see the table)", file=sys.stderr)
        return 2 if failed else 0

    return run_cli(_main)


if __name__ == "__main__":
    sys.exit(main())
