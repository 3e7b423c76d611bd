"""Preprocessing cache: studies are parsed once, stored as ``.npy`` files, memory-mapped afterwards.

An entry lives in ``CACHE/<fingerprint>/``. The fingerprint is a SHA-256 of everything the result
depends on — the source files (relative path, size, mtime), the preprocessing settings and
:data:`CACHE_VERSION` — so a changed source or setting builds a new entry instead of reading a
stale one (nnU-Net's "fingerprint" discipline). An entry is written into a temporary directory and
renamed into place only when complete, so a crash mid-write never leaves a half entry that a later
run would read.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from stm_dlp.types import Study

#: Bump when the on-disk format or the meaning of cached arrays changes.
CACHE_VERSION = 1
_ARRAYS = ("frames", "times_s", "affine", "maps", "mask")


def default_cache_dir() -> Path:
    """``$STM_DLP_CACHE`` or ``~/.cache/stm_dlp``."""
    return Path(os.environ.get("STM_DLP_CACHE", Path.home() / ".cache" / "stm_dlp"))


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, Path):
        return str(value)
    return value


def fingerprint(parts: dict[str, Any]) -> str:
    """Stable 20-hex-digit hash of JSON-able ``parts`` plus the cache version."""
    text = json.dumps({"version": CACHE_VERSION, **_jsonable(parts)}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def source_fingerprint(path: str | Path) -> dict[str, Any]:
    """Identity of the files under ``path``: relative name, size and mtime of each (not contents)."""
    root = Path(path)
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(root) if root.is_dir() else f.name}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return {"path": str(root.resolve()), "n_files": len(files), "files_sha256": h.hexdigest()}


def save_study(study: Study, entry: Path) -> None:
    """Write ``study`` into directory ``entry`` atomically (temp dir + rename)."""
    entry = Path(entry)
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
    try:
        arrays = {k: getattr(study, k) for k in _ARRAYS if getattr(study, k) is not None}
        meta_arrays = {k: v for k, v in study.meta.items() if isinstance(v, np.ndarray)}
        for name, arr in {**arrays, **{f"meta_{k}": v for k, v in meta_arrays.items()}}.items():
            with open(tmp / f"{name}.npy", "wb") as fh:
                np.save(fh, np.ascontiguousarray(arr))
                fh.flush()
                os.fsync(fh.fileno())
        info = {
            "patient_id": study.patient_id,
            "source": study.source,
            "meta": _jsonable({k: v for k, v in study.meta.items() if k not in meta_arrays}),
            "meta_arrays": sorted(meta_arrays),
            "labelled": list(study.labelled),  # which label channels are real (UniToBrain: no TMAX)
        }
        with open(tmp / "study.json", "w") as fh:
            json.dump(info, fh)
            fh.flush()
            os.fsync(fh.fileno())
        if entry.exists():  # another process finished first; its entry is equivalent
            shutil.rmtree(tmp)
            return
        os.replace(tmp, entry)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_study(entry: Path, mmap: bool = True) -> Study:
    """Read a cached study; arrays are memory-mapped read-only when ``mmap``."""
    entry = Path(entry)
    info = json.loads((entry / "study.json").read_text())
    mode = "r" if mmap else None

    def arr(name: str) -> np.ndarray | None:
        p = entry / f"{name}.npy"
        return np.load(p, mmap_mode=mode) if p.exists() else None

    meta = dict(info["meta"])
    for k in info.get("meta_arrays", []):
        meta[k] = arr(f"meta_{k}")
    return Study(frames=arr("frames"), times_s=arr("times_s"), affine=np.asarray(arr("affine")),
                 maps=arr("maps"), mask=arr("mask"), patient_id=info["patient_id"], source=info["source"],
                 meta=meta, **({"labelled": tuple(info["labelled"])} if "labelled" in info else {}))


class StudyCache:
    """Directory of fingerprinted study entries. ``get(parts, build)`` builds on a miss."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else default_cache_dir()

    def entry(self, parts: dict[str, Any]) -> Path:
        return self.root / fingerprint(parts)

    def get(self, parts: dict[str, Any], build: Callable[[], Study]) -> Study:
        entry = self.entry(parts)
        if not (entry / "study.json").exists():
            save_study(build(), entry)
        return load_study(entry)
