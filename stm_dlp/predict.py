"""``python -m stm_dlp.predict ckpt=PATH input=STUDY_DIR output=OUT_DIR`` — model maps for a study.

Reads a study in any layout :func:`stm_dlp.data.studies.read_any_study` reads (DICOM — classic, enhanced
multi-frame, one series per time point, shuttle mode —, a 4-D NIfTI, an ISLES 2018 case, an ISLES'24
subject, a UniToBrain case), runs the model slice by slice in batches (GPU when present,
``torch.inference_mode``) at the pixel size the model was trained at (the checkpoint's
``target_spacing_mm``: the study is resampled in-plane to it and the maps brought back to the scan's own
grid), and writes ``{cbf,cbv,mtt,tmax}.nii.gz`` with the scan's geometry, ``maps.png``, ``readout.png``
and ``summary.json`` with the clinical readout (:mod:`stm_dlp.perfusion.readout`), whose one-line form
(core, TMAX > 6 s and mismatch volumes, DEFUSE-3 profile) is the last line on stdout.
``output_dicom=true`` adds ``OUT/dicom/`` for PACS (:mod:`stm_dlp.io.dicom_maps`). ``input=ROOT`` of a
whole cohort (:mod:`stm_dlp.cohort`) writes ``OUT/<patient>/`` for each, with a progress bar, and prints
one summary table last (per patient status, frames, core and TMAX > 6 s volumes); a patient that fails
is reported and skipped, and the exit status is then 2.

Checkpoints are loaded with ``torch.load(weights_only=True)``: a checkpoint that needs unpickling of
arbitrary objects is refused. Slices that fail (e.g. non-finite input) are reported and, with
``mode=best_effort`` (default), written as zeros while the other slices are kept; ``mode=strict``
fails the whole study instead.
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate

from stm_dlp.cli import REQUIRED, parse_bool
from stm_dlp.data.context import attach_arterial, batch_csf, exclude_csf, study_references, study_scan_window
from stm_dlp.data.resample import pixel_spacing_mm, resample_study, restore_maps
from stm_dlp.perfusion.readout import CLI_OPTIONS as READOUT_OPTIONS
from stm_dlp.perfusion.readout import ReadoutThresholds, precontrast_image, readout_line, thresholds_from_options
from stm_dlp.types import ALL_PARAMS, PARAMS, UNITS, Study, StudyError, collate_slices, physical_maps


def load_model(ckpt: str | Path, device: torch.device | str = "cpu") -> tuple[torch.nn.Module, torch.Tensor, dict]:
    """Rebuild the network of a training checkpoint; returns ``(model, target_scale (3,), info)``."""
    path = Path(ckpt)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        with warnings.catch_warnings():  # e.g. torch's note on a foreign pickle protocol: one stderr line only
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means "not a safe checkpoint"
        text = str(exc)
        if "weights only load failed" in text.lower() or "weights_only" in text:
            detail = next((ln.strip() for ln in text.splitlines() if "GLOBAL" in ln or "Unsupported" in ln), "")
            raise StudyError(f"{path}: refused — loading it needs unpickling of arbitrary Python objects, which "
                             f"can run code{f' ({detail[:160]})' if detail else ''}; checkpoints are loaded "
                             "with weights_only=True only (use one written by stm_dlp.run)") from None
        raise StudyError(f"{path}: cannot be read as a PyTorch checkpoint, truncated or corrupt? "
                         f"({type(exc).__name__}: {' '.join(text.split())[:200]})") from None
    info = state.get("stm_dlp") if isinstance(state, dict) else None
    if not info or "model_config" not in info:
        raise StudyError(f"{path}: checkpoint has no STM-DLP model description (was it written by stm_dlp.run?)")
    model = instantiate(info["model_config"])
    weights = {k[len("model."):]: v for k, v in state["state_dict"].items() if k.startswith("model.")}
    model.load_state_dict(weights)
    model.to(device).eval()
    return model, torch.tensor(info["target_scale"], dtype=torch.float32, device=device), info


@torch.inference_mode()
def predict_study(model: torch.nn.Module, target_scale: torch.Tensor, study: Study, batch_size: int = 4,
                  device: torch.device | str = "cpu", mode: str = "best_effort",
                  apply_mask: bool = True) -> tuple[dict, list[dict]]:
    """Maps ``{cbv, cbf, tmax, mtt}`` each ``(S, H, W)`` float32, and a list of failed slices.

    The maps are 0 on CSF inside ``study.mask`` (:func:`~stm_dlp.data.context.exclude_csf`) and, with
    ``apply_mask``, outside ``study.mask``."""
    if mode not in ("best_effort", "strict"):
        raise ValueError(f"mode must be best_effort or strict, got {mode!r}")
    s_count, (h, w) = study.n_slices, study.shape_hw
    out = {p: np.zeros((s_count, h, w), np.float32) for p in ALL_PARAMS}
    failed: list[dict] = []
    good: list[int] = []
    unreadable: dict[int, list[dict]] = {}
    for bad in study.meta.get("bad_frames") or []:
        unreadable.setdefault(int(bad["slice"]), []).append(bad)
    for s in range(s_count):
        fr = np.asarray(study.frames[s])
        if not np.all(np.isfinite(fr)):
            problem: dict[str, Any] = {"slice": s, "error": "non-finite values in the frames"}
            if s in unreadable:
                frames = unreadable[s]
                problem = {"slice": s, "error": f"{len(frames)} unusable frame(s), e.g. {frames[0]['error']}",
                           "frames": [{"frame": b["frame"], "file": b["file"]} for b in frames]}
            if mode == "strict":
                raise StudyError(f"{study.source}: slice {s}: {problem['error']}")
            failed.append(problem)
        else:
            good.append(s)
    prior = bool(getattr(model, "deconv_prior", False))
    # the arterial reference the model was trained with: its study's (the median over the readable slices) or
    # each slice's own
    references = np.zeros((s_count, study.times_s.shape[1]), np.float32)
    if good:
        references[good] = study_references(study, getattr(model, "arterial_pooling", "slice"), good)
    for i in range(0, len(good), batch_size):
        idx = good[i:i + batch_size]
        batch = collate_slices([attach_arterial(study.slice_sample(s), prior, references[s]) for s in idx]).to(device)
        maps = physical_maps(model(**batch.model_inputs()).float(),
                             target_scale)
        maps = exclude_csf(maps, batch_csf(batch))
        for p in ALL_PARAMS:
            out[p][idx] = maps[p].cpu().numpy()
    if apply_mask and study.mask is not None:
        for p in ALL_PARAMS:
            out[p] *= np.asarray(study.mask)
    return out, failed


def predict_on_scan_grid(model: torch.nn.Module, target_scale: torch.Tensor, study: Study,
                         target_spacing_mm: float | None, batch_size: int = 4, device: torch.device | str = "cpu",
                         mode: str = "best_effort") -> tuple[dict, list[dict]]:
    """:func:`predict_study` at the checkpoint's pixel size ``target_spacing_mm`` (mm; ``None``: the scan's
    own grid): the study is resampled in-plane to it (:func:`~stm_dlp.data.resample.resample_study`), the
    maps ``{cbv, cbf, tmax, mtt}`` come back ``(S, H, W)`` on the scan's own grid
    (:func:`~stm_dlp.data.resample.restore_maps`; MTT derived again from the restored CBV and CBF) and are
    masked with the scan's own brain mask."""
    if target_spacing_mm is None:
        return predict_study(model, target_scale, study, batch_size, device, mode)
    # unmasked on the model's grid (masking before restoring would bleed zeros into the brain's edge);
    # the resampled mask only bounds the CSF exclusion there
    work = resample_study(study, float(target_spacing_mm))
    maps, failed = predict_study(model, target_scale, work, batch_size, device, mode, apply_mask=False)
    maps = restore_maps(maps, work)
    if study.mask is not None:
        for p in maps:
            maps[p] = (maps[p] * np.asarray(study.mask)).astype(np.float32)
    return maps, failed


def run_predict(ckpt: str, input: str, output: str, device: str = "auto", batch_size: int = 4,
                mode: str = "best_effort", frame_interval_s: float | None = None,
                readout_thresholds: ReadoutThresholds | None = None, output_dicom: bool = False,
                motion: bool = True) -> dict[str, Any]:
    """Read one study (any layout :func:`~stm_dlp.data.studies.read_any_study` reads), predict, write.
    Returns the summary written to ``summary.json``. ``motion``: register the frames first
    (:func:`~stm_dlp.data.motion.motion_corrected`; still studies are left as they are)."""
    if mode not in ("best_effort", "strict"):
        raise ValueError(f"mode must be best_effort or strict, got {mode!r}")
    dev = _device(device)
    model, scale, info = load_model(ckpt, dev)
    return _predict_to(model, scale, info, dev, ckpt, input, output, batch_size=batch_size, mode=mode,
                       frame_interval_s=frame_interval_s, readout_thresholds=readout_thresholds,
                       output_dicom=output_dicom, motion=motion)


def run_predict_cohort(ckpt: str, input: str, output: str, device: str = "auto", batch_size: int = 4,
                       mode: str = "best_effort", frame_interval_s: float | None = None,
                       readout_thresholds: ReadoutThresholds | None = None, output_dicom: bool = False,
                       progress: bool = True, motion: bool = True) -> list:
    """Every patient of the root ``input`` (any layout, :mod:`stm_dlp.cohort`) into ``output/<patient>``
    with the model loaded once and one progress bar; returns each patient's
    :class:`~stm_dlp.cohort.PatientResult` (a patient that fails is reported and skipped)."""
    from stm_dlp.cohort import cohort_jobs, run_jobs

    if mode not in ("best_effort", "strict"):
        raise ValueError(f"mode must be best_effort or strict, got {mode!r}")
    jobs, multi = cohort_jobs(input, output)
    dev = _device(device)
    model, scale, info = load_model(ckpt, dev)
    return run_jobs(jobs, lambda path, out, _bar: _predict_to(
        model, scale, info, dev, ckpt, path, out, batch_size=batch_size, mode=mode,
        frame_interval_s=frame_interval_s, readout_thresholds=readout_thresholds, output_dicom=output_dicom,
        motion=motion), progress=progress, keep_going=multi)


def _device(device: str) -> torch.device:
    return torch.device("cuda" if (device == "auto" and torch.cuda.is_available()) else
                        ("cpu" if device == "auto" else device))


def _predict_to(model: torch.nn.Module, scale: torch.Tensor, info: dict, dev: torch.device, ckpt: str | Path,
                input: str | Path, output: str | Path, *, batch_size: int, mode: str, frame_interval_s: float | None,
                readout_thresholds: ReadoutThresholds | None, output_dicom: bool,
                motion: bool = True) -> dict[str, Any]:
    """One study through a loaded model into ``output``; the summary written to ``summary.json``."""
    from stm_dlp.data.studies import read_any_study
    from stm_dlp.io.outputs import write_outputs

    t0 = time.perf_counter()
    # best effort: a frame with unusable pixels becomes NaN and only its slice is lost
    study = read_any_study(input, frame_interval_s=frame_interval_s,
                           on_bad_frame="nan" if mode == "best_effort" else "raise")
    t_read = time.perf_counter() - t0
    t0 = time.perf_counter()
    if motion:
        from stm_dlp.data.motion import motion_corrected

        study = motion_corrected(study)
    t_motion = time.perf_counter() - t0
    t0 = time.perf_counter()
    maps, failed = predict_on_scan_grid(model, scale, study, info.get("target_spacing_mm"), batch_size, dev, mode)
    t_pred = time.perf_counter() - t0
    summary = {
        "method": "stm_dlp",
        "model": info["model_config"].get("_target_"),
        "encoder": info["model_config"].get("encoder"),
        "checkpoint": str(ckpt),
        "patient_id": study.patient_id,
        "layout": study.meta.get("layout"),
        "time_source": study.meta.get("time_source"),
        "shape_slices_rows_cols": [study.n_slices, *study.shape_hw],
        "n_frames": study.n_frames,
        "params_predicted": list(PARAMS),
        "units": dict(UNITS),
        "device": str(dev),
        "timing_s": {"read": round(t_read, 3), "motion": round(t_motion, 3), "predict": round(t_pred, 3)},
        "motion_correction": study.meta.get("motion_correction", {"enabled": False}),
        "failed_slices": failed,
        "scan_window": study_scan_window(study),
        # the scan's own pixels (rows, columns) and the pixel size the model ran at (maps are on the scan's grid)
        "pixel_spacing_mm": {"scan": [round(v, 4) for v in pixel_spacing_mm(study.affine)],
                             "model": info.get("target_spacing_mm")},
    }
    if output_dicom:
        from stm_dlp.io.dicom_maps import DICOM_DIR, reference_uids, write_maps_dicom

        series = write_maps_dicom(output, maps, study.affine, patient_id=study.patient_id, mask=study.mask,
                                  reference=reference_uids(study.meta), method="stm_dlp")
        summary["dicom"] = {name: f"{DICOM_DIR}/{files[0].parent.name}/ ({len(files)} files)"
                            for name, files in series.items()}
    # readout.png's background: the frames before the bolus arrives, detected as the calculation does
    write_outputs(output, maps, study.affine, summary, mask=study.mask, baseline_hu=precontrast_image(study.frames),
                  readout_thresholds=readout_thresholds)
    summary["readout"] = json.loads((Path(output) / "summary.json").read_text(encoding="utf-8"))["readout"]
    return summary


SPEC = {
    "ckpt": (str, REQUIRED, "training checkpoint (.ckpt)"),
    "input": (str, REQUIRED, "a study in any layout (DICOM, NIfTI, ISLES, UniToBrain) or a root of patients"),
    "output": (str, REQUIRED, "output folder"),
    "device": (str, "auto", "cpu, cuda or auto"),
    "batch_size": (int, 4, "slices per forward pass"),
    "mode": (str, "best_effort", "best_effort (skip bad slices) or strict"),
    "frame_interval_s": (float, None, "NIfTI frame interval (s), only when the file gives no frame times"),
    "output_dicom": (parse_bool, False, "also write the maps as DICOM series for PACS (OUT/dicom/)"),
    "motion": (parse_bool, True, "rigid in-plane registration of every frame first (as the calc's motion=true)"),
    "progress": (parse_bool, True, "show a progress bar (a root of patients)"),
    **READOUT_OPTIONS,
}


def main(argv: list[str] | None = None) -> int:
    from stm_dlp.cli import parse_kv, run_cli

    def _main() -> int:
        args = parse_kv(sys.argv[1:] if argv is None else argv, SPEC)
        readout_thresholds = thresholds_from_options(args)
        from stm_dlp.cohort import cohort_jobs, summary_table

        if cohort_jobs(args["input"], args["output"])[1]:  # a root of patients: one table, last on stdout
            results = run_predict_cohort(**args, readout_thresholds=readout_thresholds)
            print(f"wrote maps for {sum(r.status == 'ok' for r in results)} studies to {args['output']}")
            print(summary_table(results))
            failed = sum(r.status != "ok" for r in results)
            if failed:
                print(f"error: {failed} of {len(results)} studies failed (see the table)", file=sys.stderr)
            return 2 if failed else 0
        args.pop("progress")
        summary = run_predict(**args, readout_thresholds=readout_thresholds)
        print(f"wrote maps for {summary['shape_slices_rows_cols'][0]} slices to {args['output']}"
              + (f" ({len(summary['failed_slices'])} slices failed, see summary.json)"
                 if summary["failed_slices"] else ""))
        print(readout_line(summary["readout"]))  # the clinical readout is the last line on stdout
        return 0

    return run_cli(_main)


if __name__ == "__main__":
    sys.exit(main())
