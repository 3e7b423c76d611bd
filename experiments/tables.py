"""Aggregate a sweep into the paper's tables and figures.

    python -m experiments.tables SWEEP_DIR [SWEEP_DIR ...] [--out DIR] [--no-qualitative]
                                 [--patient N] [--slice N] [--condition NAME]

Reads every job's ``metrics.json`` and resolved ``config.yaml`` (+ ``.hydra/overrides.yaml``) under the
sweep dirs and writes, per experiment, into ``--out`` (default ``SWEEP_DIR/summary``):

* ``<experiment>.md`` / ``<experiment>.csv`` — rows = models / variants (the paper's order for
  ``table1`` and ``table2``, where one run may fill two rows), columns = MAE / RMSE / R² × CBV / CBF /
  TMAX, then the clinical readout (:mod:`stm_dlp.perfusion.readout`, from ``metrics.json["readout"]``):
  median Dice of TMAX > 6 s and of the core over the test patients with that lesion, and the TMAX > 6 s
  volume's Bland-Altman bias [95 % limits of agreement] (ml); mean ± std over seeds, the best value per
  column in bold (lowest MAE / RMSE / |bias|, highest R² / Dice). "—" where a run has no readout (an
  older ``metrics.json``) or no test patient has the lesion.
  When jobs were tested under several conditions (frames / robustness experiments), the rows are
  grouped by condition and the best is marked within each condition.
* ``<experiment>_frames.png`` — paper Figure 7 (MAE, RMSE, R² vs the fraction of frames kept, every
  method, ±1 std over seeds) when the sweep varies the number of frames.
* ``<experiment>_robustness.png`` — MAE per corruption and method when the sweep has corruptions.
* ``<experiment>_qualitative.png`` — one test slice: the input frame, the truth, each model's maps
  (best checkpoint of its lowest-seed job) and oSVD's, one colour scale per parameter (Figures 5-6).

No patient identifier is written: patients are named by their index in the test split.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from stm_dlp.types import PARAMS, UNITS

METRICS = ("mae", "rmse", "r2")
METRIC_HEADERS = {"mae": "MAE", "rmse": "RMSE", "r2": "R²"}
LOWER_IS_BETTER = {"mae": True, "rmse": True, "r2": False}
#: Clinical readout columns: key → header. Dice = median over the test patients whose true region is not
#: empty (:func:`stm_dlp.metrics.summarise_agreement`); the bias column also shows the limits of agreement.
READOUT_COLUMNS: dict[str, str] = {"dice_tmax_gt_6": "Dice TMAX>6 s", "dice_core": "Dice core",
                                   "tmax6_bias_ml": "TMAX>6 s vol. bias [LoA] ml"}
#: Per-seed readout values aggregated over seeds (the limits are shown beside the bias, not ranked).
READOUT_VALUES = ("dice_tmax_gt_6", "dice_core", "tmax6_bias_ml", "tmax6_loa_low_ml", "tmax6_loa_high_ml")

#: The paper's row order (label, variant); a variant may fill several rows (Table 2 reuses the paper's design).
TABLE_LAYOUTS: dict[str, list[tuple[str, str]]] = {
    "table1": [
        ("UniToBrain", "unitobrain"),
        ("STM-DLP CNN", "stm_dlp_cnn"),
        ("STM-DLP MLP-Mixer", "stm_dlp_mlp_mixer"),
        ("STM-DLP LSTM", "stm_dlp_lstm"),
        ("STM-DLP + arterial context", "stm_dlp_arterial"),
    ],
    "table2": [
        ("Temporal First", "temporal_first"),
        ("Spatial First - Time in Temporal", "stm_dlp_lstm"),
        ("Spatial First - Time in Spatial", "sf_time_spatial"),
        ("Spatial First - Time in both", "sf_time_both"),
        ("Joint Encoder", "joint"),
        ("MPP with 1-layer Feature Exchange", "mpp1"),
        ("MPP with 2-layer Feature Exchange", "stm_dlp_lstm"),
        ("MPP with 3-layer Feature Exchange", "mpp3"),
        ("STM-DLP + arterial context", "stm_dlp_arterial"),
    ],
}
TITLES = {
    "table1": "Table 1 — UniToBrain vs STM-DLP temporal encoders",
    "table2": "Table 2 — IRFE design and MPP feature-exchange ablation (LSTM)",
    "frames": "Figure 7 — reduced number of frames (trained on all frames)",
    "frames_trained": "Figure 7 — reduced number of frames (trained on the same frames)",
    "robustness": "Robustness — zero-shot on corrupted acquisitions (D_fail-like)",
}


# --------------------------------------------------------------------------------- reading
@dataclass
class Job:
    """One finished sweep job."""

    path: Path
    metrics: dict[str, Any]
    config: dict[str, Any]
    overrides: list[str] = field(default_factory=list)
    row: str = ""
    label: str = ""

    @property
    def experiment(self) -> str:
        return str(self.metrics.get("experiment") or self.config.get("experiment_name") or "default")

    @property
    def seed(self) -> int:
        return int(self.metrics.get("seed", self.config.get("seed", 0)))

    @property
    def is_calc(self) -> bool:
        return str(self.metrics.get("model", "")).endswith("CalcBaseline")

    def points(self) -> list[dict[str, Any]]:
        """Every evaluation of this job: its own test, then each ``eval_conditions`` entry."""
        m = self.metrics
        base = {"eval_corruption": m.get("eval_corruption", "none"), "frame_fraction": m.get("frame_fraction", 1.0),
                "test": m["test"], "failed_studies": m.get("failed_studies"), "readout": readout_values(m)}
        out = [base]
        for rec in (m.get("conditions") or {}).values():
            out.append({"eval_corruption": rec.get("eval_corruption", "none"),
                        "frame_fraction": rec.get("frame_fraction", 1.0), "test": rec["test"],
                        "failed_studies": rec.get("failed_studies"), "readout": readout_values(rec)})
        return out


def readout_values(record: dict[str, Any]) -> dict[str, float | None]:
    """The readout numbers of one evaluation (``metrics.json`` or one of its ``conditions``): median Dice
    of TMAX > 6 s and of the core, and the TMAX > 6 s volume error's Bland-Altman bias and limits (ml);
    ``None`` where the record has no readout (older runs) or the value is undefined."""
    summary = (record.get("readout") or {}).get("summary") or {}
    ba = summary.get("hypoperfusion_ml_error") or {}

    def num(x: Any) -> float | None:
        return None if x is None or not math.isfinite(float(x)) else float(x)

    return {"dice_tmax_gt_6": num((summary.get("dice_tmax_gt_6") or {}).get("median")),
            "dice_core": num((summary.get("dice_core") or {}).get("median")),
            "tmax6_bias_ml": num(ba.get("bias")), "tmax6_loa_low_ml": num(ba.get("loa_low")),
            "tmax6_loa_high_ml": num(ba.get("loa_high"))}


def _job_sort_key(path: Path) -> tuple:
    parts = path.parts
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts)


def load_jobs(sweep_dirs: Sequence[str | Path]) -> list[Job]:
    """Every job dir (a folder with ``metrics.json``) under the given sweep dirs, in job order."""
    jobs = []
    for sweep in sweep_dirs:
        sweep = Path(sweep)
        if not sweep.is_dir():
            raise FileNotFoundError(f"{sweep}: sweep directory not found")
        found = [p.parent for p in sweep.rglob("metrics.json") if "wandb" not in p.parts]
        unfinished = [p.parent for p in sweep.rglob("config.yaml")
                      if p.parent.name != ".hydra" and not (p.parent / "metrics.json").is_file()]
        if unfinished:
            print(f"note: {len(unfinished)} job(s) under {sweep} have no metrics.json (still running or failed): "
                  + ", ".join(sorted(str(p.relative_to(sweep)) for p in unfinished)), file=sys.stderr)
        for job_dir in sorted(found, key=_job_sort_key):
            metrics = json.loads((job_dir / "metrics.json").read_text())
            cfg_path = job_dir / "config.yaml"
            config = yaml.safe_load(cfg_path.read_text()) if cfg_path.is_file() else {}
            ov_path = job_dir / ".hydra" / "overrides.yaml"
            overrides = yaml.safe_load(ov_path.read_text()) if ov_path.is_file() else []
            jobs.append(Job(job_dir, metrics, config or {}, [str(o) for o in overrides or []]))
    if not jobs:
        raise FileNotFoundError(f"no finished job (metrics.json) under {', '.join(map(str, sweep_dirs))}")
    _assign_rows(jobs)
    return jobs


def _assign_rows(jobs: list[Job]) -> None:
    """Row key and label of each job: its variant, else the overrides that differ between jobs."""
    varying = set()
    keyed = defaultdict(set)
    for j in jobs:
        for o in j.overrides:
            k, _, v = o.partition("=")
            keyed[k.lstrip("+~")].add(v)
    for k, values in keyed.items():
        present_everywhere = all(any(o.partition("=")[0].lstrip("+~") == k for o in j.overrides) for j in jobs)
        if len(values) > 1 or not present_everywhere:
            varying.add(k)
    varying -= {"seed"}
    for j in jobs:
        variant = j.metrics.get("variant") or (j.config.get("variant") or {}).get("name")
        if variant:
            j.row = str(variant)
            j.label = str(j.metrics.get("label") or (j.config.get("variant") or {}).get("label") or variant)
        else:
            diff = [o.lstrip("+~") for o in j.overrides if o.partition("=")[0].lstrip("+~") in varying
                    and not o.partition("=")[0].startswith("data.frame_fraction")]
            j.row = " ".join(sorted(diff)) or _model_label(j)
            j.label = j.row


def _model_label(job: Job) -> str:
    target = str(job.metrics.get("model") or "model").rsplit(".", 1)[-1]
    if job.is_calc:
        return f"{str(job.metrics.get('method', 'osvd'))} (calculation)"
    enc = job.metrics.get("encoder")
    return f"{target} {enc}" if enc else target


# --------------------------------------------------------------------------------- aggregating
def condition_label(eval_corruption: str | None, frame_fraction: float | None) -> str:
    corruption = eval_corruption or "none"
    ff = 1.0 if frame_fraction is None else float(frame_fraction)
    parts = []
    if corruption != "none":
        parts.append(corruption)
    if ff < 1.0:
        parts.append(f"{ff * 100:.0f}% frames")
    return ", ".join(parts) or "regular"


@dataclass
class Cell:
    mean: float
    std: float
    n: int


@dataclass
class Row:
    condition: str
    eval_corruption: str
    frame_fraction: float
    key: str
    label: str
    seeds: list[int]
    values: dict[str, dict[str, Cell]]  # metric -> param -> cell
    failed_studies: int | None = None
    n_test_patients: int | None = None
    readout: dict[str, Cell] = field(default_factory=dict)  # READOUT_VALUES key -> cell (n = seeds with a value)

    def cell(self, metric: str, param: str) -> Cell:
        return self.values[metric][param]

    def readout_cell(self, key: str) -> Cell:
        return self.readout.get(key) or Cell(math.nan, math.nan, 0)


def _mean_std(xs: Sequence[float]) -> tuple[float, float]:
    arr = np.asarray(xs, float)
    if arr.size == 0:
        return math.nan, math.nan
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else math.nan


def aggregate(jobs: Sequence[Job]) -> list[Row]:
    """Rows of one experiment: mean ± std over seeds per (condition, row key), in display order."""
    groups: dict[tuple, list[tuple[Job, dict]]] = defaultdict(list)
    corruption_order: dict[str, int] = {}
    for j in jobs:
        for pt in j.points():
            cond = (str(pt["eval_corruption"] or "none"), float(pt["frame_fraction"] or 1.0))
            corruption_order.setdefault(cond[0], len(corruption_order))
            groups[(cond, j.row)].append((j, pt))
    experiment = jobs[0].experiment
    layout = _layout(experiment, jobs)
    rows = []

    conditions = sorted({c for c, _ in groups}, key=lambda c: (c[0] != "none", corruption_order[c[0]], -c[1]))
    for cond in conditions:
        for label, key in layout:
            members = groups.get((cond, key))
            if not members:
                continue
            values = {m: {p: Cell(*_mean_std([pt["test"][p][m] for _, pt in members]), len(members))
                          for p in PARAMS} for m in METRICS}
            failed = [pt.get("failed_studies") for _, pt in members if pt.get("failed_studies") is not None]
            readout = {}
            for k in READOUT_VALUES:  # seeds without the value (no readout / no lesion) are left out
                xs = [v for _, pt in members if (v := (pt.get("readout") or {}).get(k)) is not None]
                readout[k] = Cell(*_mean_std(xs), len(xs))
            rows.append(Row(condition=condition_label(*cond), eval_corruption=cond[0], frame_fraction=cond[1],
                            key=key, label=label, seeds=sorted(j.seed for j, _ in members), values=values,
                            failed_studies=max(failed) if failed else None,
                            n_test_patients=members[0][0].metrics.get("n_test_patients"), readout=readout))
    return rows


def _layout(experiment: str, jobs: Sequence[Job]) -> list[tuple[str, str]]:
    present = list(dict.fromkeys(j.row for j in jobs))
    labels = {j.row: j.label for j in jobs}
    layout = [(label, key) for label, key in TABLE_LAYOUTS.get(experiment, []) if key in present]
    used = {key for _, key in layout}
    calc_last = sorted((k for k in present if k not in used), key=lambda k: any(j.is_calc for j in jobs if j.row == k))
    return layout + [(labels[k], k) for k in calc_last]


def best_flags(rows: Sequence[Row]) -> dict[tuple[int, str, str], bool]:
    """``(row index, metric, param) → True`` for the best mean within each condition; the readout columns
    are ``(row index, "readout", key)`` (highest Dice, smallest |bias|)."""
    flags: dict[tuple[int, str, str], bool] = {}
    by_cond: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(rows):
        by_cond[r.condition].append(i)
    for idx in by_cond.values():
        if len(idx) < 2:
            continue
        for m in METRICS:
            for p in PARAMS:
                vals = [rows[i].cell(m, p).mean for i in idx]
                finite = [v for v in vals if math.isfinite(v)]
                if not finite:
                    continue
                best = min(finite) if LOWER_IS_BETTER[m] else max(finite)
                for i, v in zip(idx, vals):
                    flags[(i, m, p)] = math.isfinite(v) and math.isclose(v, best, rel_tol=0, abs_tol=5e-4)
        for key in READOUT_COLUMNS:
            vals = [rows[i].readout_cell(key).mean for i in idx]
            score = [abs(v) if key.endswith("_bias_ml") else -v for v in vals]  # lower score is better
            finite = [s for s in score if math.isfinite(s)]
            if len(finite) < 2:
                continue
            best = min(finite)
            for i, s in zip(idx, score):
                flags[(i, "readout", key)] = math.isfinite(s) and math.isclose(s, best, rel_tol=0, abs_tol=5e-4)
    return flags


# --------------------------------------------------------------------------------- writing
def _fmt(cell: Cell, digits: int = 3, sign: bool = False) -> str:
    """``mean ± std`` (std when more than one seed has a value); "—" when there is no value."""
    if not math.isfinite(cell.mean):
        return "—"
    text = f"{cell.mean:{'+' if sign else ''}.{digits}f}"
    if cell.n > 1 and math.isfinite(cell.std):
        text += f" ± {cell.std:.{digits}f}"
    return text


def _readout_text(row: Row, key: str) -> str:
    """A readout cell: Dice as ``mean ± std``; the volume bias with its limits of agreement (means over
    seeds) in brackets, e.g. ``+1.2 ± 0.3 [-4.0, 6.4]``."""
    if not key.endswith("_bias_ml"):
        return _fmt(row.readout_cell(key))
    text = _fmt(row.readout_cell(key), digits=1, sign=True)
    lo, hi = row.readout_cell("tmax6_loa_low_ml"), row.readout_cell("tmax6_loa_high_ml")
    if text != "—" and math.isfinite(lo.mean) and math.isfinite(hi.mean):
        text += f" [{lo.mean:.1f}, {hi.mean:.1f}]"
    return text


def markdown_table(rows: Sequence[Row], experiment: str, source: str = "") -> str:
    """The paper-format table in Markdown (best per column, within each condition, in bold)."""
    flags = best_flags(rows)
    multi_cond = len({r.condition for r in rows}) > 1
    seeds = sorted({s for r in rows for s in r.seeds})
    n_test = next((r.n_test_patients for r in rows if r.n_test_patients), None)
    lines = [f"## {TITLES.get(experiment, experiment)}", ""]
    notes = [f"Experiment `{experiment}`" + (f", sweep `{source}`" if source else "") + "."]
    if n_test:
        notes.append(f"Test split: {n_test} held-out patients, metrics inside the brain mask in physical units "
                     f"(CBV {UNITS['cbv']}, CBF {UNITS['cbf']}, TMAX {UNITS['tmax']}).")
    notes.append(f"Seeds {', '.join(map(str, seeds))}" + (": mean ± std (sample) over seeds." if len(seeds) > 1
                                                           else " (one seed: no std)."))
    notes.append("Clinical readout: Dice = median over the test patients with that lesion (— when none has it "
                 "or the run has no readout); TMAX>6 s volume: Bland-Altman bias (predicted − true, ml) "
                 "[95 % limits of agreement], over the test patients.")
    notes.append("Best per column in **bold** (lowest MAE / RMSE / |bias|, highest R² / Dice)"
                 + (", within each condition." if multi_cond else "."))
    lines += [" ".join(notes), ""]
    header = (["Condition"] if multi_cond else []) + ["Model"] + [
        f"{METRIC_HEADERS[m]} {p.upper()}" for m in METRICS for p in PARAMS] + list(READOUT_COLUMNS.values())
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join([":--"] * (2 if multi_cond else 1)
                                + ["--:"] * (len(METRICS) * len(PARAMS) + len(READOUT_COLUMNS))) + "|")
    footnote = False
    for i, r in enumerate(rows):
        label = r.label
        if r.failed_studies:
            label += " †"
            footnote = True
        cells = []
        for m in METRICS:
            for p in PARAMS:
                text = _fmt(r.cell(m, p))
                cells.append(f"**{text}**" if flags.get((i, m, p)) else text)
        for key in READOUT_COLUMNS:
            text = _readout_text(r, key)
            cells.append(f"**{text}**" if flags.get((i, "readout", key)) else text)
        lines.append("| " + " | ".join(([r.condition] if multi_cond else []) + [label] + cells) + " |")
    if footnote:
        lines += ["", "† the calculation approach produced no maps for some test studies (scored as zero maps): "
                  + "; ".join(f"{r.label}, {r.condition}: {r.failed_studies}"
                              + (f" of {r.n_test_patients}" if r.n_test_patients else "")
                              for r in rows if r.failed_studies) + "."]
    return "\n".join(lines) + "\n"


def csv_table(rows: Sequence[Row], experiment: str) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    cols = [f"{m}_{p}" for m in METRICS for p in PARAMS]
    w.writerow(["experiment", "condition", "eval_corruption", "frame_fraction", "row", "label", "n_seeds", "seeds",
                "failed_studies", *[c for col in (*cols, *READOUT_VALUES) for c in (col, f"{col}_std")]])
    for r in rows:
        vals = []
        cells = [r.cell(m, p) for m in METRICS for p in PARAMS] + [r.readout_cell(k) for k in READOUT_VALUES]
        for c in cells:  # empty where there is no value (no readout, no lesion, one seed's std)
            vals += ["" if not math.isfinite(c.mean) else f"{c.mean:.6g}",
                     "" if not math.isfinite(c.std) else f"{c.std:.6g}"]
        w.writerow([experiment, r.condition, r.eval_corruption, f"{r.frame_fraction:g}", r.key, r.label,
                    len(r.seeds), " ".join(map(str, r.seeds)),
                    "" if r.failed_studies is None else r.failed_studies, *vals])
    return buf.getvalue()


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path


def frames_curves(rows: Sequence[Row]) -> dict[str, dict[float, dict[str, dict[str, tuple]]]]:
    """Figure 7 data from the uncorrupted rows: label → fraction → param → metric → (mean, std)."""
    curves: dict[str, dict[float, dict]] = defaultdict(dict)
    for r in rows:
        if r.eval_corruption != "none":
            continue
        curves[r.label][r.frame_fraction] = {p: {m: (r.cell(m, p).mean, r.cell(m, p).std) for m in METRICS}
                                             for p in PARAMS}
    return {k: v for k, v in curves.items() if len(v) > 1}


def condition_values(rows: Sequence[Row], metric: str = "mae") -> dict[str, dict[str, dict[str, tuple]]]:
    """Corruption bars: condition → label → param → (mean, std), for full-length input."""
    out: dict[str, dict[str, dict]] = defaultdict(dict)
    for r in rows:
        if r.frame_fraction < 1.0:
            continue
        out[r.condition][r.label] = {p: (r.cell(metric, p).mean, r.cell(metric, p).std) for p in PARAMS}
    return dict(out)


# --------------------------------------------------------------------------------- qualitative figure
def _resolve_checkpoint(job: Job) -> Path | None:
    best = job.metrics.get("best_checkpoint")
    if best and Path(best).is_file():
        return Path(best)
    candidates = sorted((job.path / "checkpoints").glob("best-*.ckpt")) or sorted(
        (job.path / "checkpoints").glob("last.ckpt"))
    return candidates[-1] if candidates else None


def qualitative_figure(jobs: Sequence[Job], rows: Sequence[Row], path: Path, patient: int = 0,
                       slice_index: int | None = None, condition: str | None = None) -> Path:
    """Input frame, truth, each model's maps and oSVD's on one test slice (see module docstring)."""
    import torch
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from experiments.figures import plot_qualitative
    from stm_dlp.calc_eval import CalcBaseline
    from stm_dlp.conditions import CONDITION_KEYS
    from stm_dlp.predict import load_model, predict_study
    from stm_dlp.types import maps_by_name

    reference = next((j for j in jobs if not j.is_calc), jobs[0])
    data_cfg = dict(reference.config.get("data") or {})
    if not data_cfg:
        raise ValueError(f"{reference.path}: config.yaml has no data section; cannot rebuild the test split")
    overrides: dict[str, Any] = {}
    if condition:
        conds = reference.metrics.get("conditions") or {}
        if condition not in conds:
            raise ValueError(f"condition {condition!r} not in this sweep; known: {', '.join(conds) or 'none'}")
        overrides = {k: conds[condition][k] for k in CONDITION_KEYS if k in conds[condition]}
    data_cfg.update(overrides)
    dm = instantiate(OmegaConf.create(data_cfg))
    dm.setup("test")
    studies = dm.test_set.studies
    if not 0 <= patient < len(studies):
        raise ValueError(f"--patient {patient}: the test split has {len(studies)} patients (0-{len(studies) - 1})")
    study = studies[patient]
    s = study.n_slices // 2 if slice_index is None else slice_index
    if not 0 <= s < study.n_slices:
        raise ValueError(f"--slice {s}: the study has {study.n_slices} slices")
    mask = np.asarray(study.mask[s], bool) if study.mask is not None else None
    truth = maps_by_name(study.maps[s], axis=0)
    panels: dict[str, dict[str, np.ndarray]] = {"Truth": truth}
    order = list(dict.fromkeys(r.key for r in rows))
    first_job = {}
    for j in sorted(jobs, key=lambda j: j.seed):
        first_job.setdefault(j.row, j)
    calc_done = False
    for key in order:
        job = first_job.get(key)
        if job is None:
            continue
        if job.is_calc:
            params = {k: v for k, v in (job.config.get("model") or {}).items() if k != "_target_"}
            maps, _ = CalcBaseline(**params).maps(study)
            calc_done = True
        else:
            ckpt = _resolve_checkpoint(job)
            if ckpt is None:
                continue
            model, scale, _ = load_model(ckpt, "cpu")
            with torch.inference_mode():
                maps, _failed = predict_study(model, scale, study, device="cpu")
        panels[job.label] = {p: np.asarray(maps[p])[s] for p in ("cbv", "cbf", "tmax", "mtt")}
    if not calc_done:
        try:
            maps, _ = CalcBaseline().maps(study)
            panels["oSVD (calculation)"] = {p: np.asarray(maps[p])[s] for p in ("cbv", "cbf", "tmax", "mtt")}
        except ValueError as exc:
            print(f"note: oSVD gave no maps for the figure's study ({exc})", file=sys.stderr)
    errors = {}
    m = mask if mask is not None else np.ones_like(truth["cbv"], bool)
    for label, maps in panels.items():
        if label != "Truth":
            errors[label] = {p: float(np.abs(maps[p][m] - truth[p][m]).mean()) if m.any() else math.nan
                             for p in maps}
    frames = np.asarray(study.frames[s], np.float32)
    inside = frames[:, m] if m.any() else frames.reshape(frames.shape[0], -1)
    peak = int(np.argmax(inside.mean(axis=1)))
    t_peak = float(study.times_s[s, peak] - study.times_s[s, 0])
    cond_text = condition_label(overrides.get("eval_corruption", data_cfg.get("eval_corruption")),
                                overrides.get("frame_fraction", data_cfg.get("frame_fraction")))
    title = (f"{TITLES.get(reference.experiment, reference.experiment)} — test patient #{patient}, slice {s}, "
             f"{cond_text} input")
    return plot_qualitative(path, frames[peak], panels, mask, title=title, errors=errors,
                            frame_caption=f"input, frame {peak} ({t_peak:.0f} s)")


# --------------------------------------------------------------------------------- CLI
def summarise(sweep_dirs: Sequence[str | Path], out: str | Path | None = None, qualitative: bool = True,
              patient: int = 0, slice_index: int | None = None, condition: str | None = None) -> dict[str, list[Path]]:
    """Write every table and figure; returns experiment → written files."""
    jobs = load_jobs(sweep_dirs)
    out_dir = Path(out) if out else Path(sweep_dirs[0]) / "summary"
    source = ", ".join(Path(d).name for d in sweep_dirs)
    by_exp: dict[str, list[Job]] = defaultdict(list)
    for j in jobs:
        by_exp[j.experiment].append(j)
    written: dict[str, list[Path]] = {}
    for experiment, exp_jobs in by_exp.items():
        from experiments.figures import plot_condition_bars, plot_frames_curves

        rows = aggregate(exp_jobs)
        files = [_write(out_dir / f"{experiment}.md", markdown_table(rows, experiment, source)),
                 _write(out_dir / f"{experiment}.csv", csv_table(rows, experiment))]
        curves = frames_curves(rows)
        if curves:
            files.append(plot_frames_curves(out_dir / f"{experiment}_frames.png", curves,
                                            title=TITLES.get(experiment, "metrics vs fraction of frames")))
        bars = condition_values(rows)
        if len(bars) > 1:
            files.append(plot_condition_bars(out_dir / f"{experiment}_robustness.png", bars, "mae",
                                             title=TITLES.get(experiment, "MAE per condition")))
        if qualitative:
            files.append(qualitative_figure(exp_jobs, rows, out_dir / f"{experiment}_qualitative.png", patient,
                                            slice_index, condition))
        written[experiment] = files
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.tables", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dirs", nargs="+", help="multirun sweep dir(s) (multirun/<experiment>/<time>)")
    parser.add_argument("--out", help="output folder (default SWEEP_DIR/summary)")
    parser.add_argument("--no-qualitative", action="store_true", help="skip the qualitative figure")
    parser.add_argument("--patient", type=int, default=0, help="test patient (index in the test split) for the figure")
    parser.add_argument("--slice", type=int, default=None, help="slice of that patient (default: middle)")
    parser.add_argument("--condition", default=None,
                        help="evaluation condition for the figure (e.g. noise, frames0.5; default: the run's own test)")
    args = parser.parse_args(argv)
    try:
        written = summarise(args.sweep_dirs, args.out, not args.no_qualitative, args.patient, args.slice,
                            args.condition)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for files in written.values():
        print(Path(files[0]).read_text())
        for f in files:
            print(f"wrote {f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

