"""A whole cohort through ``stm_dlp.predict`` or ``stm_dlp.calc``: ``input=ROOT`` in any layout.

:func:`cohort_jobs` turns ``input`` into ``(study, output folder)`` jobs — one per patient of a
dataset root (:func:`stm_dlp.data.studies.list_patients`: ``ctp/`` or ``ctp.nii.gz`` patients,
ISLES 2018 cases, ISLES'24 subjects, UniToBrain cases), each into ``OUT/<patient folder>`` — or the
single study itself. :func:`run_jobs` runs them under one progress bar; a patient whose study cannot
be used (a :class:`~stm_dlp.types.StudyError`, ``ValueError`` or ``OSError``, the errors a user can
act on) is reported on stderr at once, marked ``failed`` and the cohort goes on. :func:`summary_table`
is the one table printed at the end: per patient status, frames and the readout's core and
TMAX > 6 s volumes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stm_dlp.cli import error_line


@dataclass
class PatientResult:
    """One patient of a cohort: its folder name, ``ok`` or ``failed``, the summary or the error."""

    name: str
    status: str
    summary: dict[str, Any] | None = None
    error: str | None = None


def cohort_jobs(input: str | Path, output: str | Path) -> tuple[list[tuple[Path, Path]], bool]:
    """``([(study path, output folder), ...], is_cohort)`` for ``input`` (a study, or a root of patients)."""
    from stm_dlp.data.studies import list_patients

    src = Path(input)
    if not src.exists():
        raise FileNotFoundError(f"input {src} does not exist")
    patients = list_patients(src) if src.is_dir() else []
    multi = len(patients) > 1 or (len(patients) == 1 and patients[0] != src)
    if multi:
        return [(p, Path(output) / p.name) for p in patients], True
    return [(src, Path(output))], False


def run_jobs(jobs: list[tuple[Path, Path]], fn: Callable[[Path, Path, Any], dict[str, Any]], *, progress: bool = True,
             description: str = "studies", keep_going: bool = True) -> list[PatientResult]:
    """Run ``fn(path, out, bar)`` for every job under one progress bar (``bar`` is the rich Progress, for a
    second task such as the deconvolution's pixels). With ``keep_going`` a user error of one patient is
    printed to stderr and recorded; otherwise it propagates."""
    import sys

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from stm_dlp.types import StudyError

    results: list[PatientResult] = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), disable=not progress, transient=False) as bar:
        task = bar.add_task(description, total=len(jobs), visible=len(jobs) > 1)
        for path, out in jobs:
            try:
                results.append(PatientResult(path.name, "ok", summary=fn(path, out, bar)))
            except (StudyError, ValueError, OSError) as exc:
                if not keep_going:
                    raise
                line = error_line(exc)
                print(f"{path.name}: {line}", file=sys.stderr)
                # the table names files relative to the root, so the file stays in view
                short = line.removeprefix("error: ").replace(f"{path.parent}/", "")
                results.append(PatientResult(path.name, "failed", error=short))
            bar.advance(task)
    return results


def _volume(summary: dict[str, Any] | None, key: str) -> str:
    ro = (summary or {}).get("readout") or {}
    value = ro.get(key)
    return "—" if value is None else f"{float(value):.1f}"


def summary_table(results: list[PatientResult], note_width: int = 90) -> str:
    """The cohort table: patient, status, frames, core (ml), TMAX > threshold (ml), and the error of a
    failed patient (shortened to ``note_width`` characters)."""
    thr = next((r.summary["readout"]["thresholds"].get("hypoperfusion_tmax_s", 6.0) for r in results
                if r.summary and r.summary.get("readout") and r.summary["readout"].get("thresholds")), 6.0)
    head = ["patient", "status", "frames", "core_ml", f"tmax>{thr:g}s_ml", "note"]
    rows = []
    for r in results:
        s = r.summary or {}
        note = r.error or ""
        if len(note) > note_width:
            note = note[: note_width - 1] + "…"
        rows.append([r.name, r.status, str(s.get("n_frames", "—")), _volume(s, "core_ml"),
                     _volume(s, "hypoperfusion_ml"), note])
    widths = [max(len(head[i]), *(len(row[i]) for row in rows)) for i in range(len(head) - 1)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head[:-1], widths)) + "  " + head[-1]]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row[:-1], widths)) + ("  " + row[-1] if row[-1] else "")
              for row in rows]
    n_ok = sum(r.status == "ok" for r in results)
    lines.append(f"{n_ok} of {len(results)} studies ok")
    return "\n".join(line.rstrip() for line in lines)
