"""``BENCHMARKS.md`` from ``results.json`` — every number in it comes from the run that wrote the JSON."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from stm_dlp.types import ALL_PARAMS, UNITS

SECTIONS = ("## Accuracy", "## Speed and memory", "## Data", "## Deconvolution", "## Profiling", "## Left out")


def _f(x: Any) -> str:
    """A number for a table: 3 significant digits, scientific outside [1e-3, 1e5)."""
    if x is None:
        return "—"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        if x != x:
            return "nan"
        ax = abs(x)
        if ax == 0:
            return "0"
        if ax >= 1e5 or ax < 1e-3:
            return f"{x:.2e}"
        return f"{x:.1f}" if ax >= 100 else f"{x:.3g}"
    return str(x)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_f(c) if not isinstance(c, str) else c for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _rel(path: str | Path, md_dir: Path) -> str:
    return os.path.relpath(Path(path), md_dir)


# --------------------------------------------------------------------------------- clinical readout cells
def _dice(m: dict[str, Any] | None, key: str) -> str:
    """Median Dice over the patients with that lesion, with their count: ``0.812 (n 3)``; "—" when none."""
    rec = ((m or {}).get("readout") or {}).get(key) or {}
    if rec.get("median") is None:
        return "—" if not (m or {}).get("readout") else f"— (n {rec.get('n', 0)})"
    return f"{_f(float(rec['median']))} (n {rec.get('n')})"


def _bias(m: dict[str, Any] | None, name: str) -> str:
    """Bland-Altman bias of a volume error with its 95 % limits: ``+1.2 [-3.4, 5.8]`` ml."""
    ba = ((m or {}).get("readout") or {}).get(f"{name}_ml_error") or {}
    if ba.get("bias") is None:
        return "—"
    text = f"{ba['bias']:+.2f}"
    if ba.get("loa_low") is not None and ba.get("loa_high") is not None:
        text += f" [{ba['loa_low']:.2f}, {ba['loa_high']:.2f}]"
    return text


def _readout_cells(m: dict[str, Any] | None) -> list[str]:
    return [_dice(m, "dice_tmax_gt_6"), _dice(m, "dice_core"), _bias(m, "hypoperfusion"), _bias(m, "core"),
            _bias(m, "mismatch")]


READOUT_HEADER = ["Dice TMAX>6 s", "Dice core", "TMAX>6 s vol. error ml", "core vol. error ml",
                  "mismatch vol. error ml"]
READOUT_NOTE = ("Clinical readout (`stm_dlp.perfusion.readout`, default thresholds) of each method's maps "
                "against the truth's readout: Dice = median over the held-out patients whose true region is not "
                "empty (n = how many; — when none has it); volume error = method − truth (ml) per patient, "
                "Bland-Altman bias [95 % limits of agreement] over the patients (no limits with one patient).")


def _pearson(m: dict[str, Any] | None) -> list[Any]:
    ro = (m or {}).get("readout") or {}
    return [ro.get(f"pearson_r_{p}") for p in ALL_PARAMS]


def _target_rows(targets: list[dict[str, Any]]) -> list[list[Any]]:
    rows = []
    for t in targets:
        measured = " / ".join(f"{k.upper() if k in ALL_PARAMS else k} {_f(v)}" for k, v in t["values"].items())
        limit = t["limit"] if isinstance(t["limit"], str) else f"≤ {t['limit']}"
        result = "not measured" if t["met"] is None else ("**met**" if t["met"] else "not met")
        rows.append([t["target"], measured, limit, result, t.get("note") or ""])
    return rows


# --------------------------------------------------------------------------------- accuracy
def _accuracy(acc: dict[str, Any], md_dir: Path, fig_dir: Path, settings: dict[str, Any],
              results: dict[str, Any] | None = None) -> list[str]:
    from experiments.bench.accuracy import CALC_LABEL, LABEL_NOISE, MAIN, MODELS, clinical_targets, trained

    out = ["## Accuracy against ground truth", "",
           "Held-out phantom patients (never seen in training), inside the brain mask, physical units "
           f"({', '.join(f'{p.upper()} {UNITS[p]}' for p in ALL_PARAMS)}). Every model is trained once on "
           "regular data (with the configured augmentation) by `python -m stm_dlp.run` and tested under each "
           "condition from its best checkpoint; the calculation approach is `model=calc` (oSVD, automatic AIF) "
           "on exactly the same input. Dropped-frame severities other than 30 % are evaluated in-process from "
           "the same checkpoints.", ""]
    names = ["calc", *trained({"models": acc["models"]})]
    rows = []
    for n in names:
        r = acc["runs"].get(n, {})
        rows.append([acc["models"][n]["label"], r.get("epochs"), r.get("fit_seconds"), r.get("wall_seconds"),
                     r.get("n_test_patients")])
    r = acc["runs"].get(LABEL_NOISE, {})
    rows.append(["STM-DLP LSTM on oSVD labels", r.get("epochs"), r.get("fit_seconds"), r.get("wall_seconds"),
                 r.get("n_test_patients")])
    budget = (f"Cohort: {settings.get('n_patients')} phantom patients of {settings.get('n_slices')} slices × "
              f"{settings.get('height')}² × {settings.get('frames_min')}–{settings.get('frames_max')} frames "
              "(patient split train / val / test by the DataModule's seed). "
              f"Training: trainer={settings.get('trainer')}, "
              f"scale={settings.get('scale')}, at most {settings.get('max_epochs')} epochs"
              + (f" or {settings['max_time_s']} s of training" if settings.get("max_time_s") else "")
              + f", batch {settings.get('batch_size')}, random {settings.get('crop_size')}² crops.")
    header = ["model", "epochs", "fit s", "wall s (train + all tests)", "test patients"]
    out += ["### Runs", "", budget, "", _table(header, rows), ""]
    cons = acc.get("consistency")
    if cons:
        out += [f"Consistency check — {cons['what']}: largest relative difference "
                f"{_f(cons['max_rel_diff_mae'])}.", ""]
    for metric, title in (("mae", "MAE"), ("rmse", "RMSE"), ("r2", "R²")):
        rows = []
        for cond, label in acc["conditions"].items():
            for n in names:
                m = acc["models"][n]["metrics"].get(cond)
                if m is None:
                    continue
                failed = m.get("failed_studies")
                lab = acc["models"][n]["label"] + (f" ({failed} failed)" if failed else "")
                rows.append([label, lab, *[m[p][metric] for p in ALL_PARAMS]])
        out += [f"### {title} per condition", "",
                _table(["condition", "method", *[p.upper() for p in ALL_PARAMS]], rows), ""]
    rows, prows = [], []
    for cond, label in acc["conditions"].items():
        for n in names:
            m = acc["models"][n]["metrics"].get(cond)
            if m is None:
                continue
            rows.append([label, acc["models"][n]["label"], *_readout_cells(m)])
            prows.append([label, acc["models"][n]["label"], *_pearson(m)])
    out += ["### Clinical readout per condition", "", READOUT_NOTE, "",
            _table(["condition", "method", *READOUT_HEADER], rows), ""]
    out += ["### Voxelwise Pearson r per condition", "",
            "Pearson r of each map against the truth over the brain-mask voxels of a patient, median over the "
            "held-out patients (— where a map is constant, e.g. a failed calculation).", "",
            _table(["condition", "method", *[p.upper() for p in ALL_PARAMS]], prows), ""]
    out += ["### Ratio model MAE / oSVD MAE per condition", "",
            "Below 1: the model is closer to the truth than the calculation approach on the same input.", ""]
    rows = []
    for cond, label in acc["conditions"].items():
        for n in trained({"models": acc["models"]}):
            rr = acc["ratios"][cond][n]
            rows.append([label, acc["models"][n]["label"], *[rr[p] for p in ALL_PARAMS]])
    out += [_table(["condition", "model", *[p.upper() for p in ALL_PARAMS]], rows), ""]
    out += _cross_family(acc.get("cross_family"), CALC_LABEL, MODELS[MAIN][0])
    out += ["### Targets (reported, not asserted)", "",
            "The MAE-ratio targets of the benchmark's first issue, then issue 13's (same family held-out "
            "patients, cross-family, CPU inference); *not measured*: a value they need is undefined here (no "
            "test patient with a lesion, a section not run, or a study of another size).", ""]
    targets = list(acc["targets"]) + clinical_targets(results or {"accuracy": acc})
    out += [_table(["target", "measured", "limit", "result", "note"], _target_rows(targets)), ""]
    ln = acc["label_noise"]
    out += ["### Label noise: trained on oSVD-derived labels, evaluated against truth", ""]
    if "not_run" in ln:
        out += [f"Not run: {ln['not_run']} (`python -m experiments.bench --profile smoke` or `gpu` runs it).", ""]
    elif "error" in ln:
        tail = [line for line in ln["error"].strip().splitlines() if line.strip()][-3:]
        out += ["The run with `data.label_source=calc` failed in this run:", "", "```", *tail, "```", ""]
    else:
        out += _label_noise(ln, MODELS[MAIN][0], CALC_LABEL)
    return out + _figures(acc, md_dir, fig_dir)


def _cross_family(cf: dict[str, Any] | None, calc_label: str, main_label: str) -> list[str]:
    out = ["### Cross-family: trained on one phantom family, tested on the other", ""]
    if not cf:
        return out + ["Not run (the profile has no second phantom family, or this results.json predates it).", ""]
    fams = cf.get("families") or []
    if "error" in cf:
        return out + [f"Failed in this run ({' / '.join(fams)}): `{str(cf['error'])[-400:]}`", ""]
    runs = cf.get("runs") or {}
    out += [f"{main_label} (the default model) trained once per phantom family (`data.phantom.family=…`, the "
            f"same budget and overrides as above; {fams[0]} is the main runs' family), its best checkpoint "
            "tested in-process on each family's held-out patients, regular and under the noise, heavy-noise and motion "
            f"conditions; {calc_label} and a plain textbook oSVD (`experiments/plain_osvd.py`: automatic AIF, 1.5 px "
            "smoothing, no partial-volume or noise handling — where *it* fails is what the paper's claim is about) on "
            "exactly the same studies. *Same family*: held-out patients of the "
            "family trained on (the tuned-on setting); *held-out family*: a generator the model never saw.", ""]
    rows = [[f, r.get("run"), r.get("epochs"), r.get("fit_seconds"), r.get("n_test_patients"),
             (cf.get("consistency") or {}).get(f)] for f, r in runs.items()]
    out += [_table(["family trained on", "run", "epochs", "fit s", "test patients",
                    "in-process vs own test MAE, max rel. diff"], rows), ""]
    header = ["condition", "trained on", "tested on", "method", "Dice TMAX>6 s", "Dice core", "TMAX>6 s vol. error ml",
              *[f"R² {p.upper()}" for p in ALL_PARAMS], *[f"MAE {p.upper()}" for p in ALL_PARAMS]]

    def row(cond: str, train: str, test: str, label: str, m: dict[str, Any] | None) -> list[Any]:
        if m is None:
            return [cond, train, test, label] + ["—"] * (len(header) - 4)
        return [cond, train, test, label, _dice(m, "dice_tmax_gt_6"), _dice(m, "dice_core"),
                _bias(m, "hypoperfusion"), *[m[p]["r2"] for p in ALL_PARAMS], *[m[p]["mae"] for p in ALL_PARAMS]]

    for title, same in (("Same family (tuned-on)", True), ("Held-out family", False)):
        rows = []
        for cond, clabel in (cf.get("conditions") or {}).items():
            for test in fams:
                for train in fams:
                    if (train == test) != same:
                        continue
                    m = (cf.get("model") or {}).get(f"{train}->{test}", {}).get(cond)
                    rows.append(row(clabel, train, test, main_label, m))
                rows.append(row(clabel, "—", test, calc_label, (cf.get("calc") or {}).get(test, {}).get(cond)))
                if "plain" in cf:  # the textbook oSVD (experiments/plain_osvd.py); older results have none
                    rows.append(row(clabel, "—", test, "plain oSVD (textbook)", cf["plain"].get(test, {}).get(cond)))
        out += [f"**{title}**", "", _table(header, rows), ""]
    return out


def _label_noise(ln: dict[str, Any], main_label: str, calc_label: str) -> list[str]:
    out = [
            "STM-DLP LSTM trained with `data.label_source=calc` (labels from our oSVD instead of the truth), "
            "tested on the same held-out patients against the exact truth. MAE:", ""]
    rows = [[f"{main_label} trained on truth, vs truth", *[ln["truth_trained_vs_truth"][p]["mae"] for p in ALL_PARAMS]],
            [f"{main_label} trained on oSVD labels, vs truth", *[ln["vs_truth"][p]["mae"] for p in ALL_PARAMS]],
            [f"{main_label} trained on oSVD labels, vs oSVD labels", *[ln["vs_osvd_labels"][p]["mae"]
                                                                     for p in ALL_PARAMS]],
            [f"{calc_label} itself, vs truth", *[ln["osvd_vs_truth"][p]["mae"] for p in ALL_PARAMS]]]
    return out + [_table(["", *[p.upper() for p in ALL_PARAMS]], rows), ""]


def _figures(acc: dict[str, Any], md_dir: Path, fig_dir: Path) -> list[str]:
    out: list[str] = []
    figs = acc.get("figures", {})
    out += ["### Figures", ""]
    if "figure7" in figs:
        out += ["Paper Figure 7 — MAE / RMSE / R² vs the fraction of frames kept (first frames, original timing):",
                "", f"![Figure 7]({_rel(fig_dir / figs['figure7'], md_dir)})", ""]
    if "conditions_mae" in figs:
        out += [f"![MAE per condition]({_rel(fig_dir / figs['conditions_mae'], md_dir)})", ""]
    maps = [(k, v) for k, v in figs.items() if k.startswith("maps_")]
    if maps:
        out += ["Colour maps per condition (paper Figures 5–6 style; STM-DLP LSTM / oSVD / truth, same slice of "
                "a held-out patient, same colour window per parameter):", ""]
        for k, v in maps:
            cond = k[len("maps_"):]
            out += [f"**{acc['conditions'].get(cond, cond)}**", "", f"![{cond}]({_rel(fig_dir / v, md_dir)})", ""]
    return out


# --------------------------------------------------------------------------------- speed
def _peak_for(peaks: dict[str, Any], dev: str, variant: str) -> float | None:
    p = peaks.get(dev) or {}
    if "bf16" in variant and "matmul_bf16_gflops" in p:
        return p["matmul_bf16_gflops"]
    return p.get("matmul_fp32_gflops")


def _speed(sp: dict[str, Any]) -> list[str]:
    out = ["## Speed and memory", ""]
    peaks = sp["peaks"]
    rows = [[dev, p.get("name", "CPU"), p["matmul_fp32_gflops"], p.get("matmul_bf16_gflops"), p["copy_gbps"]]
            for dev, p in peaks.items() if isinstance(p, dict)]
    out += ["### Roofline reference (measured in this run)", "",
            f"Torch threads: {peaks.get('threads')}. The peak is a large square matmul; each figure below states "
            "FLOPs per slice (torch.utils.flop_counter over one step at 32², scaled by the pixel count, plus the "
            "LSTM's analytic FLOPs, which the counter does not see) and the resulting % of that peak.", "",
            _table(["device", "name", "matmul fp32 GFLOP/s", "matmul bf16 GFLOP/s", "copy GB/s"], rows), ""]
    rows = []
    for r in sp["train"]:
        s = r["spec"]
        if "error" in r:
            rows.append([s["device"], s["variant"], s["model"], f"{s['size']}²", "error: " + r["error"][:80],
                         None, None, None, None, None])
            continue
        peak = _peak_for(peaks, s["device"], s["variant"])
        mem = r.get("peak_cuda_mb", r["peak_rss_mb"])
        rows.append([s["device"], s["variant"], s["model"], f"{s['size']}²×{s['frames']}", r["slices_per_s"],
                     r["step_s"], mem, r["flops_per_slice"] / 1e9, r["achieved_gflops"],
                     100.0 * r["achieved_gflops"] / peak if peak else None])
    if sp["train"]:
        s0 = sp["train"][0]["spec"]
        out += ["### Training throughput and peak memory", "",
                f"Batch {s0['batch']}, {s0['steps']} timed step(s) after {s0['warmup']} warm-up, model widths of "
                f"scale={sp['scale']}, "
                + ("all rows in one process (peak memory is cumulative). " if sp["train"][0].get("in_process")
                   else "one subprocess per row. ")
                + "Memory: peak resident set of the process (CPU) or "
                "torch.cuda.max_memory_allocated (GPU), MB.", "",
                _table(["device", "variant", "model", "slice", "slices/s", "s/step", "peak MB", "GFLOP/slice",
                        "GFLOP/s", "% of peak"], rows), ""]
    rows = []
    for r in sp["infer"]:
        s = r["spec"]
        if "error" in r:
            rows.append([s["device"], "error: " + r["error"][:80]] + [None] * 7)
            continue
        peak = _peak_for(peaks, s["device"], "fp32")
        factor = s["study_slices"] / s["slices"]
        note = "" if s["slices"] == s["study_slices"] else f" (ran {s['slices']} slices, ×{factor:g})"
        rows.append([s["device"], f"{s['study_slices']}×{s['size']}²×{s['frames']}{note}", r["model_s_per_study"],
                     r.get("default_path_s_per_study"),
                     r.get("osvd_s_per_study", r.get("osvd_error")), r.get("peak_cuda_mb", r["peak_rss_mb"]),
                     r["flops_per_slice"] / 1e9, r["achieved_gflops"],
                     100.0 * r["achieved_gflops"] / peak if peak else None])
    out += ["### Inference: seconds per study", "",
            "STM-DLP LSTM with the default configuration (arterial context; untrained weights: timing does not "
            "depend on them) through `stm_dlp.predict.predict_study` on the study's own grid, and through "
            "`predict_on_scan_grid` as `stm_dlp.predict` runs a default checkpoint (resampled to its "
            "`target_spacing_mm`, 3 mm at scale=laptop, and the maps brought back to the scan's grid); the "
            "calculation approach (oSVD, automatic AIF, `calculate_maps`) on the same study "
            "(bench_deconv below times oSVD alone on its own study).", "",
            _table(["device", "study", "STM-DLP LSTM s/study, own grid", "s/study at the checkpoint's spacing",
                    "oSVD s/study", "peak MB", "GFLOP/slice", "GFLOP/s", "% of peak"], rows), ""]
    rows = []
    for r in sp["lstm_paths"]:
        s = r["spec"]
        if "error" in r:
            rows.append([s["device"], "error: " + r["error"][:80]] + [None] * 5)
            continue
        rows.append([s["device"], f"{r['n_sequences']} × T={r['t']}", r["packed_s"], r["gather_s"],
                     r["packed_over_gather"], r["packed_max_abs_diff_vs_gather"],
                     "gather" if r.get("module_matches_gather") and s["device"] == "cpu" else
                     ("packed" if r.get("module_matches_packed") else "?")])
    out += ["### LSTM temporal encoder: packed (before) vs causal gather (after)", "",
            "Forward + backward of the LSTM encoder on variable-length sequences (lengths T/2…T). *packed*: "
            "`pack_padded_sequence` + the module's LSTM (the old CPU path, still the CUDA/cuDNN path); *gather*: "
            "the LSTM over the padded sequence read at each sequence's last valid frame (the current CPU path). "
            "Both give the same features (max abs difference shown).", "",
            _table(["device", "sequences", "packed s", "gather s", "packed / gather", "max |Δ|",
                    "module uses"], rows), ""]
    return out


def _data(data: dict[str, Any]) -> list[str]:
    out = ["## Data", ""]
    ld = data.get("loader")
    if ld:
        rows = [[w, r, ld["train_slices_per_s"], ld["loader_over_training"][w]]
                for w, r in ld["loader_slices_per_s"].items()]
        out += ["### Cached loader vs training consumption", "",
                f"`experiments.bench_loader` functions: training DataLoader (random {ld['crop']}² crops, augmentation, "
                f"variable-length collation, batch {ld['batch']}, {ld['frames']} frames) vs one LSTM training step on "
                "the same batches. The loader must never be the bottleneck (ratio ≫ 1).", "",
                _table(["workers", "loader slices/s", "training slices/s", "loader / training"], rows), ""]
    dc = data.get("dicom")
    if dc:
        out += ["### DICOM parse rate on first load", "",
                f"`stm_dlp.synth.synthesize_cohort` writes {dc['patients']} patient(s) of {dc['slices_per_study']} "
                f"slices × {dc['frames']} frames × {dc['size']}²; `read_dicom_study` reads each once (cold cache of "
                "the project; the OS page cache is warm from writing).", "",
                _table(["files", "MB", "read s", "files/s", "MB/s", "slices/s", "s/study"],
                       [[dc["files"], dc["mbytes"], dc["read_s"], dc["files_per_s"], dc["mb_per_s"],
                         dc["slices_per_s"], dc["s_per_study"]]]), ""]
    return out


def _deconv(dv: dict[str, Any] | None) -> list[str]:
    out = ["## Deconvolution: our oSVD vs osipy", ""]
    if not dv:
        return out + ["Not run (section skipped).", ""]
    if not dv.get("available"):
        return out + [f"Not run: {dv.get('note')}.", ""]
    out += [f"`{dv['command']}` (exit {dv['returncode']}, {dv['seconds']} s; its own profile and study size). "
            "Its output as it reports it:", ""]
    tail = (dv.get("stdout_tail") or "").strip()
    if tail:  # bench_deconv prints Markdown: kept verbatim, headings demoted under this section
        out += [("#" + line) if line.startswith("###") else line for line in tail.splitlines()] + [""]
    if dv.get("returncode") not in (0, None) and dv.get("stderr_tail"):
        out += ["stderr tail:", "", "```", dv["stderr_tail"].strip()[-1200:], "```", ""]
    return out


def _profiling(pr: dict[str, Any]) -> list[str]:
    out = ["## Profiling (torch.profiler, STM-DLP LSTM)", ""]
    for dev, r in pr.items():
        if not isinstance(r, dict):
            continue
        if "error" in r:
            out += [f"{dev}: error {r['error']}", ""]
            continue
        for key, title, shape in (("train_step", "one training step", r["train_shape"]),
                                  ("inference", "one inference pass", r["infer_shape"])):
            rows = [[o["op"], o["self_ms"], 100.0 * o["share"], o["calls"]] for o in r[key]]
            out += [f"### {dev}: {title} (B×T×H×W = {shape}), top ops by self time", "",
                    _table(["op", "self ms", "% of total", "calls"], rows), ""]
    return out


def _headline(results: dict[str, Any]) -> list[str]:
    """A few numbers from the sections below, for the reader in a hurry."""
    lines = []
    acc = results.get("accuracy")
    if acc:
        from experiments.bench.accuracy import MAIN, clinical_targets

        targets = list(acc["targets"]) + clinical_targets(results)
        met = [t for t in targets if t["met"]]
        unmeasured = sum(t["met"] is None for t in targets)
        lines.append(f"Targets met: {len(met)} of {len(targets)}"
                     + (f" ({unmeasured} not measured)" if unmeasured else "")
                     + (f": {'; '.join(t['target'] for t in met)}" if met else "") + ".")
        dice = acc["models"].get(MAIN, {}).get("metrics", {}).get("regular")
        if dice and dice.get("readout"):
            lines.append(f"STM-DLP LSTM median Dice(TMAX > 6 s), regular: {_dice(dice, 'dice_tmax_gt_6')}; oSVD "
                         f"{_dice(acc['models']['calc']['metrics']['regular'], 'dice_tmax_gt_6')}.")
        reg = acc["ratios"]["regular"].get("stm_dlp_lstm", {})
        lines.append("STM-DLP LSTM / oSVD MAE, regular: "
                     + ", ".join(f"{p.upper()} {_f(v)}" for p, v in reg.items()) + ".")
    sp = results.get("speed")
    if sp:
        for r in sp.get("infer", []):
            if "error" not in r:
                lines.append(f"Inference ({r['spec']['device']}): STM-DLP LSTM {_f(r['model_s_per_study'])} s per "
                             f"16-slice 256² study, oSVD {_f(r.get('osvd_s_per_study'))} s.")
        for r in sp.get("lstm_paths", []):
            if "error" not in r:
                lines.append(f"LSTM packed / causal-gather time ({r['spec']['device']}, forward + backward): "
                             f"{_f(r['packed_over_gather'])}×.")
    ld = (results.get("data") or {}).get("loader")
    if ld:
        lines.append("Loader / training slices per second: "
                     + ", ".join(f"{_f(v)}× ({w} workers)" for w, v in ld["loader_over_training"].items()) + ".")
    return (["**Headline.** " + " ".join(lines), ""] if lines else [])


def render(results: dict[str, Any], md_path: Path, fig_dir: Path) -> str:
    md_dir = md_path.parent
    meta = results["meta"]
    out = ["# STM-DLP benchmarks", "",
           "Generated by the benchmark from its own output (`results.json`); do not edit by hand.", "",
           f"- Date: {meta['date']}", f"- Machine: {meta['machine']}", f"- Software: {meta['software']}",
           f"- Commit: `{meta.get('commit', '?')}`", f"- Command: `{meta['command']}`",
           f"- Profile: `{meta['profile']}`; total runtime {meta.get('total_seconds', 0) / 60:.1f} min "
           f"({', '.join(f'{k} {v / 60:.1f} min' for k, v in meta.get('section_seconds', {}).items())})", ""]
    for note in meta.get("notes", []):
        out += [f"> {note}", ""]
    out += _headline(results)
    out += ["Contents: accuracy (per condition, clinical readout, voxelwise r, ratios to oSVD, cross-family, "
            "targets, label noise, figures) · speed and memory "
            "(training, inference, LSTM paths, roofline) · data (loader, DICOM) · deconvolution · profiling.", ""]
    if "accuracy" in results:
        out += _accuracy(results["accuracy"], md_dir, fig_dir, meta.get("profile_settings", {}), results)
    if "speed" in results:
        out += _speed(results["speed"])
    if "data" in results:
        out += _data(results["data"])
    out += _deconv(results.get("deconv"))
    if "profile" in results:
        out += _profiling(results["profile"])
    for name, err in (results.get("errors") or {}).items():
        out += [f"## Error in section `{name}`", "", "```", err.strip()[-2500:], "```", ""]
    out += ["## Left out", ""] + [f"- {x}" for x in meta.get("left_out", [])] + [""]
    return "\n".join(out)
