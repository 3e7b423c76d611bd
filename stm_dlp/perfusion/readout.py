"""The clinical readout of perfusion maps: ischaemic core, hypoperfusion, mismatch, DEFUSE-3 profile.

A stroke team reads volumes, not pixels. From CBF / CBV / TMAX maps, a brain mask and the voxel
volume this module computes what RAPID-style software reports, and how well a method's readout
agrees with a reference (labels, or the phantom's truth). Pure numpy (torch tensors are accepted and
converted); no files, no Lightning, no Hydra.

Definitions (every threshold is a field of :class:`ReadoutThresholds`):

* **tissue** = brain mask and CBF >= ``tissue_min_cbf`` (0.5 ml/100g/min, the level below which
  :func:`~stm_dlp.perfusion.maps.calculate_maps` finds no usable residue and sets TMAX to 0). CSF,
  which the calculation approach, the phantom and clinical packages set to CBF = 0, is therefore
  neither reference tissue nor core: without this a ventricle (rCBF = 0 %) would read as core.
* **core** = tissue with rCBF = CBF / reference < ``core_rcbf`` (0.30; RAPID's CT core, used to
  select patients in DEFUSE 3 — Albers et al., NEJM 2018;378:708; the CT threshold comes from
  Campbell et al., Stroke 2011;42:3435: rCBF < 31 % of the contralateral hemisphere best matches the
  acute DWI lesion).
  The core lies inside the brain mask by construction. It is **not** required to lie inside the
  TMAX > 6 s region (RAPID does not require it either); ``core_within_hypoperfusion=True`` asks for
  it.
* **hypoperfusion** = tissue with TMAX > ``hypoperfusion_tmax_s`` (6 s: Olivot et al., Stroke
  2009;40:469, the Tmax threshold that best predicts the final infarct without reperfusion; DEFUSE
  3's critically hypoperfused tissue, Albers 2018). Also reported: volumes of TMAX > 4 / 6 / 8 /
  10 s.
* **penumbra** (the picture's green) = hypoperfusion minus core, voxelwise.
* **mismatch volume** = hypoperfusion volume − core volume, clipped at 0; **mismatch ratio** =
  hypoperfusion / core volume (DEFUSE 3's definitions). With a core of 0 ml the ratio is infinite;
  JSON has no infinity, so it is reported as ``None`` (null) and the ratio criterion counts as met
  when there is any hypoperfusion.
* **hypoperfusion intensity ratio** (HIR) = volume TMAX > 10 s / volume TMAX > 6 s (Olivot et al.,
  Stroke 2014;45:1018: HIR >= 0.4 marks poor collaterals and infarct growth); ``None`` when there is
  no TMAX > 6 s tissue.
* **DEFUSE-3 target profile** (imaging criteria only, not age / NIHSS / time window / occlusion):
  core < 70 ml, mismatch ratio >= 1.8 and mismatch volume >= 15 ml (Albers et al., NEJM 2018).
* **reference CBF** (``reference="contralateral"``, default) = median CBF of the normal-appearing
  hemisphere. Hemispheres are split at the image midline: the centre column of the bounding box of
  the brain mask over the whole study (columns exactly on it belong to neither side). This assumes
  the head is not strongly rotated in-plane (yaw), as CTP is acquired; a tilted head mixes the
  hemispheres and moves the reference toward the global median. The normal-appearing side is the
  one with the smaller TMAX > 6 s volume (ties and maps without TMAX: the higher median CBF), and
  its median is taken over its tissue with TMAX <= 6 s, so that no hypoperfused tissue on the
  healthy side lowers the reference. ``reference="global"`` = median CBF of all brain tissue (for
  bilateral or midline lesions). RAPID's normal reference is likewise taken from the
  unaffected hemisphere.
* **minimum cluster**: connected components of each thresholded region (core, hypoperfusion, every
  TMAX > k s) smaller than ``min_cluster_ml`` (0.1 ml) are removed. 0.1 ml (e.g. 4.6 × 4.6 × 5 mm)
  is far below any volume a decision uses (15 and 70 ml in DEFUSE 3; clinical displays round to
  1 ml) yet above the few-voxel specks a noisy threshold leaves at clinical resolution (a 0.43 mm ×
  0.43 mm × 5 mm voxel is 0.0009 ml); on a coarse grid whose voxel alone exceeds 0.1 ml nothing is
  removed. Connectivity is 3-D (26 neighbours) by default: a lesion is one 3-D object, and a 2-D
  filter would erase the thin first or last section of a real lesion where it enters a slice,
  while a 3-D component is measured in the same ml as the threshold. ``connectivity="2d"``
  (8 neighbours, per slice) is offered for slabs with gaps between slices.

Agreement (:func:`readout_agreement`): Dice of the thresholded regions, volume error (method −
reference, ml) per patient, and voxelwise Pearson r per parameter inside the mask; across patients
:func:`bland_altman` gives the bias and 95 % limits of agreement — the measures the field publishes
(e.g. OpenPerfusion vs RAPID on ISLES 2018). The reference's regions use the same thresholds and the
same reference method, computed on the reference maps.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from stm_dlp.types import NO_FLOW_CBF, PARAMS, mtt_from_cbv_cbf, voxel_volume_ml  # noqa: F401 - part of this API

REFERENCE_METHODS = ("contralateral", "global")
CONNECTIVITIES = ("3d", "2d")


@dataclass(frozen=True)
class ReadoutThresholds:
    """Every threshold of the readout (defaults and sources in the module docstring).

    Attributes:
        core_rcbf: core where CBF / reference CBF is below this (fraction, RAPID 0.30).
        hypoperfusion_tmax_s: hypoperfused where TMAX is above this (s, Campbell 2011: 6).
        tmax_volumes_s: TMAX thresholds (s) whose volumes are reported (4, 6, 8, 10).
        hir_tmax_s: numerator threshold of the hypoperfusion intensity ratio (s, Olivot 2014: 10).
        defuse3_max_core_ml: DEFUSE-3 core must be below this (ml, 70).
        defuse3_min_ratio: DEFUSE-3 mismatch ratio must be at least this (1.8).
        defuse3_min_mismatch_ml: DEFUSE-3 mismatch volume must be at least this (ml, 15).
        min_cluster_ml: connected components smaller than this are removed (ml; 0 = keep all).
        connectivity: ``"3d"`` (26 neighbours) or ``"2d"`` (8 neighbours within each slice).
        reference: ``"contralateral"`` or ``"global"`` (how the reference CBF is taken).
        tissue_min_cbf: pixels with CBF below this (ml/100g/min) are not tissue (CSF, no flow).
        core_within_hypoperfusion: also require TMAX > ``hypoperfusion_tmax_s`` for the core.
    """

    core_rcbf: float = 0.30
    hypoperfusion_tmax_s: float = 6.0
    tmax_volumes_s: tuple[float, ...] = (4.0, 6.0, 8.0, 10.0)
    hir_tmax_s: float = 10.0
    defuse3_max_core_ml: float = 70.0
    defuse3_min_ratio: float = 1.8
    defuse3_min_mismatch_ml: float = 15.0
    min_cluster_ml: float = 0.1
    connectivity: str = "3d"
    reference: str = "contralateral"
    tissue_min_cbf: float = NO_FLOW_CBF
    core_within_hypoperfusion: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "tmax_volumes_s", tuple(float(t) for t in self.tmax_volumes_s))
        if self.reference not in REFERENCE_METHODS:
            raise ValueError(f"readout reference must be one of {REFERENCE_METHODS}, got {self.reference!r}")
        if self.connectivity not in CONNECTIVITIES:
            raise ValueError(f"readout connectivity must be one of {CONNECTIVITIES}, got {self.connectivity!r}")
        if not 0.0 < self.core_rcbf < 1.0:
            raise ValueError(f"core_rcbf is a fraction of the reference CBF in (0, 1), got {self.core_rcbf}")
        for name in ("min_cluster_ml", "tissue_min_cbf", "hypoperfusion_tmax_s", "hir_tmax_s",
                     "defuse3_max_core_ml", "defuse3_min_ratio", "defuse3_min_mismatch_ml"):
            value = float(getattr(self, name))
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"readout threshold {name} must be a finite number >= 0, got {value}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able copy (tuples as lists)."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


def _tkey(t: float) -> str:
    """``6.0`` → ``"6"``, ``7.5`` → ``"7.5"`` (the threshold as it appears in key names)."""
    return f"{float(t):g}"


def _np(x: Any, dtype: Any = np.float64) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor, any device
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype)


def _as3d(a: np.ndarray, what: str) -> np.ndarray:
    if a.ndim == 2:
        return a[None]
    if a.ndim != 3:
        raise ValueError(f"{what} must be (S, H, W) or (H, W), got shape {a.shape}")
    return a


def split_channels(maps_sphw: Any, params: Sequence[str] = PARAMS) -> dict[str, np.ndarray]:
    """``(S, P, H, W)`` maps in channel order ``params`` (default CBV, CBF, TMAX) → ``{param: (S, H, W)}``."""
    arr = _np(maps_sphw, np.float32)
    if arr.ndim != 4 or arr.shape[1] != len(params):
        raise ValueError(f"maps must be (S, {len(params)}, H, W) in order {tuple(params)}, got shape {arr.shape}")
    return {p: arr[:, i] for i, p in enumerate(params)}


# --------------------------------------------------------------------------------------------------
# connected components (no scipy: vectorised union-find)


def _half_offsets(connectivity: str) -> list[tuple[int, int, int]]:
    """Neighbour offsets ``(ds, dr, dc)`` with each undirected pair listed once."""
    if connectivity == "2d":
        return [(0, 0, 1), (0, 1, -1), (0, 1, 0), (0, 1, 1)]
    offs = [(a, b, c) for a in (-1, 0, 1) for b in (-1, 0, 1) for c in (-1, 0, 1)]
    return [o for o in offs if o > (0, 0, 0)]  # 13 of the 26


def label_components(mask: Any, connectivity: str = "3d") -> tuple[np.ndarray, int]:
    """Connected components of a bool ``(S, H, W)`` (or ``(H, W)``) mask.

    ``connectivity`` ``"3d"``: 26 neighbours; ``"2d"``: 8 neighbours within each slice.
    Returns ``(labels, n)``: int32 labels of ``mask``'s shape, 0 outside, components ``1..n``.

    A vectorised union-find: every foreground voxel starts as its own root; for one neighbour
    direction at a time, each round hooks, over the neighbour pairs still in different components,
    the larger root onto the smaller one, then compresses paths by pointer jumping; pairs already in
    one component are dropped, so the work shrinks (16 × 256², all foreground: 0.4 s 3-D, 0.2 s 2-D
    on one CPU core).
    """
    if connectivity not in CONNECTIVITIES:
        raise ValueError(f"connectivity must be one of {CONNECTIVITIES}, got {connectivity!r}")
    m0 = np.asarray(mask, bool)
    m = _as3d(m0, "mask")
    out = np.zeros(m.shape, np.int32)
    pad = np.pad(m, 1)
    flat = np.flatnonzero(pad)
    n = int(flat.size)
    if n == 0:
        return out.reshape(m0.shape), 0
    ids = np.full(pad.size, -1, np.int64 if n >= 2**31 - 1 else np.int32)
    ids[flat] = np.arange(n, dtype=ids.dtype)
    st = (pad.shape[1] * pad.shape[2], pad.shape[2], 1)
    own = np.arange(n, dtype=ids.dtype)
    parent = own.copy()
    # one neighbour direction at a time: after the first ones most pairs of the next are already in
    # one component and are dropped before the (costly) hooking
    for ds, dr, dc in _half_offsets(connectivity):
        nb = ids[flat + (ds * st[0] + dr * st[1] + dc * st[2])]  # padding keeps every neighbour in range
        ok = nb >= 0
        u, v = own[ok], nb[ok]
        while u.size:
            ru, rv = parent[u], parent[v]
            cross = ru != rv
            if not cross.any():
                break
            u, v, ru, rv = u[cross], v[cross], ru[cross], rv[cross]
            np.minimum.at(parent, np.maximum(ru, rv), np.minimum(ru, rv))  # roots hook onto smaller roots
            while True:  # pointer jumping until every voxel points at its root
                grand = parent[parent]
                if np.array_equal(grand, parent):
                    break
                parent = grand
    roots, comp = np.unique(parent, return_inverse=True)
    out_flat = np.zeros(pad.size, np.int32)
    out_flat[flat] = comp.astype(np.int32) + 1
    out = out_flat.reshape(pad.shape)[1:-1, 1:-1, 1:-1]
    return np.ascontiguousarray(out).reshape(m0.shape), int(roots.size)


def remove_small_clusters(mask: Any, voxel_ml: float, min_cluster_ml: float, connectivity: str = "3d") -> np.ndarray:
    """``mask`` without its connected components smaller than ``min_cluster_ml`` ml (bool, same shape).

    A component of ``k`` voxels has ``k * voxel_ml`` ml and is kept when that is ``>= min_cluster_ml``.
    """
    m = np.asarray(mask, bool)
    if min_cluster_ml <= 0 or not m.any():
        return m.copy()
    labels, n = label_components(m, connectivity)
    sizes = np.bincount(labels.reshape(-1), minlength=n + 1)
    keep = sizes * float(voxel_ml) >= float(min_cluster_ml)
    keep[0] = False
    return keep[labels]


# --------------------------------------------------------------------------------------------------
# reference CBF


def _median(values: np.ndarray) -> float | None:
    return float(np.median(values)) if values.size else None


def cbf_reference(cbf: Any, mask: Any, method: str = "contralateral", tmax: Any | None = None, *,
                  hypoperfusion_tmax_s: float = 6.0, tissue_min_cbf: float = 0.5,
                  affine: Any | None = None) -> dict[str, Any]:
    """Reference CBF (ml/100g/min) that the core's relative CBF is taken against.

    Args:
        cbf: ``(S, H, W)`` (or ``(H, W)``) CBF in ml/100g/min.
        mask: bool brain mask of the same shape.
        method: ``"contralateral"`` (median of the normal-appearing hemisphere; see the module
            docstring for the midline and the choice of side) or ``"global"`` (median of all tissue).
        tmax: TMAX ``(s)`` of the same shape, or ``None`` (then the side with the higher median CBF
            is taken as normal and no TMAX exclusion is made).
        hypoperfusion_tmax_s: TMAX above which tissue counts as hypoperfused (s).
        tissue_min_cbf: pixels with lower CBF are not tissue (CSF, no flow).
        affine: optional ``(4, 4)`` affine, only to name the chosen side anatomically.

    Returns:
        JSON-able dict: ``cbf_ml_100g_min`` (``None`` when there is no tissue at all), ``method``
        (asked), ``method_used`` (``"global"`` when a contralateral reference was impossible: no
        tissue on the normal side), ``side`` (``"low_columns"`` / ``"high_columns"`` / ``None``),
        ``side_anatomical`` (``"right"`` / ``"left"`` when ``affine`` tells, else ``None``),
        ``midline_column`` (``None`` for ``global``), ``n_pixels`` used, and per side the TMAX > 6 s
        pixel count and median CBF (``sides``).
    """
    if method not in REFERENCE_METHODS:
        raise ValueError(f"reference method must be one of {REFERENCE_METHODS}, got {method!r}")
    f = _as3d(_np(cbf), "cbf")
    brain = _as3d(np.asarray(_np(mask, bool)), "mask")
    if brain.shape != f.shape:
        raise ValueError(f"mask shape {brain.shape} does not match the CBF map {f.shape}")
    tissue = brain & np.isfinite(f) & (f >= tissue_min_cbf)
    t = None if tmax is None else _as3d(_np(tmax), "tmax")
    if t is not None and t.shape != f.shape:
        raise ValueError(f"TMAX shape {t.shape} does not match the CBF map {f.shape}")
    hypo = np.zeros_like(tissue) if t is None else (np.nan_to_num(t, nan=0.0) > hypoperfusion_tmax_s)
    out: dict[str, Any] = {"method": method, "method_used": method, "side": None, "side_anatomical": None,
                           "midline_column": None}
    if method == "contralateral" and tissue.any():
        cols = np.nonzero(brain.any(axis=(0, 1)))[0]
        mid = (float(cols[0]) + float(cols[-1])) / 2.0
        c = np.arange(f.shape[2], dtype=np.float64)[None, None, :]
        sides = {"low_columns": tissue & (c < mid), "high_columns": tissue & (c > mid)}
        stats = {name: {"hypoperfused_px": int((s & hypo).sum()), "tissue_px": int(s.sum()),
                        "median_cbf": _median(f[s])} for name, s in sides.items()}
        # fewer hypoperfused pixels first, then the higher median CBF; a side without tissue never wins
        side = min(sides, key=lambda k: (stats[k]["tissue_px"] == 0,
                                         stats[k]["hypoperfused_px"] if t is not None else 0,
                                         -(stats[k]["median_cbf"] or 0.0)))
        normal = sides[side] & ~hypo
        out.update(midline_column=mid, sides=stats)
        if normal.any():
            out.update(side=side, cbf_ml_100g_min=float(np.median(f[normal])), n_pixels=int(normal.sum()))
            if affine is not None:
                col_dir = _np(affine)[:3, 0]
                if abs(col_dir[0]) > 0.5 * np.linalg.norm(col_dir):  # columns run (mostly) left-right
                    out["side_anatomical"] = _side_name(side, float(col_dir[0]))
            return out
        out["method_used"] = "global"
    elif method == "contralateral":
        out["method_used"] = "global"
    out.update(cbf_ml_100g_min=_median(f[tissue]), n_pixels=int(tissue.sum()))
    return out


def _side_name(side: str, col_dir_x: float) -> str:
    """Patient side of ``"low_columns"`` / ``"high_columns"`` given the RAS+ x-component of the column
    direction (``affine[0, 0]``): RAS+ x grows toward the patient's right, so with ``col_dir_x > 0``
    higher columns are further right (standard DICOM axial, ``affine[0, 0] < 0``: higher = left)."""
    high_is_right = col_dir_x > 0
    return ("right" if high_is_right else "left") if side == "high_columns" else ("left" if high_is_right else "right")


# --------------------------------------------------------------------------------------------------
# readout


@dataclass
class Readout:
    """A study's readout: ``summary`` (JSON-able numbers) and ``regions`` (bool ``(S, H, W)`` masks)."""

    summary: dict[str, Any]
    regions: dict[str, np.ndarray] = field(repr=False)


def _maps3d(maps: Mapping[str, Any]) -> dict[str, np.ndarray]:
    missing = [p for p in ("cbf", "tmax") if p not in maps]
    if missing:
        raise ValueError(f"the readout needs maps {missing} (got {sorted(maps)})")
    out = {p: _as3d(_np(m), p) for p, m in maps.items() if p in ("cbv", "cbf", "tmax", "mtt")}
    shapes = {m.shape for m in out.values()}
    if len(shapes) != 1:
        raise ValueError(f"maps must share one (S, H, W) shape, got {sorted(shapes)}")
    return out


def compute_readout(maps: Mapping[str, Any], mask: Any | None, voxel_ml: float,
                    thresholds: ReadoutThresholds | None = None, *, affine: Any | None = None) -> Readout:
    """Readout numbers and regions of one study (see :func:`clinical_readout` and :func:`readout_regions`)."""
    thr = thresholds or ReadoutThresholds()
    m = _maps3d(maps)
    cbf, tmax = m["cbf"], m["tmax"]
    shape = cbf.shape
    brain = np.ones(shape, bool) if mask is None else _as3d(np.asarray(_np(mask, bool)), "mask")
    if brain.shape != shape:
        raise ValueError(f"mask shape {brain.shape} does not match the maps {shape}")
    if not (math.isfinite(voxel_ml) and voxel_ml > 0):
        raise ValueError(f"voxel volume must be a positive number of ml, got {voxel_ml}")
    tmax0 = np.nan_to_num(tmax, nan=0.0, posinf=0.0, neginf=0.0)
    tissue = brain & np.isfinite(cbf) & (cbf >= thr.tissue_min_cbf)
    ref = cbf_reference(cbf, brain, thr.reference, tmax0, hypoperfusion_tmax_s=thr.hypoperfusion_tmax_s,
                        tissue_min_cbf=thr.tissue_min_cbf, affine=affine)

    def clean(region: np.ndarray) -> np.ndarray:
        return remove_small_clusters(region, voxel_ml, thr.min_cluster_ml, thr.connectivity)

    hypo = clean(tissue & (tmax0 > thr.hypoperfusion_tmax_s))
    ref_cbf = ref["cbf_ml_100g_min"]
    if ref_cbf is None or ref_cbf <= 0:
        core = np.zeros(shape, bool)
    else:
        core = tissue & (cbf < thr.core_rcbf * ref_cbf)
        if thr.core_within_hypoperfusion:
            core &= tissue & (tmax0 > thr.hypoperfusion_tmax_s)
        core = clean(core)
    penumbra = hypo & ~core
    tmax_regions = {_tkey(k): hypo if k == thr.hypoperfusion_tmax_s else clean(tissue & (tmax0 > k))
                    for k in thr.tmax_volumes_s}
    hir_region = tmax_regions.get(_tkey(thr.hir_tmax_s))
    if hir_region is None:
        hir_region = clean(tissue & (tmax0 > thr.hir_tmax_s))

    def ml(region: np.ndarray) -> float:
        return float(region.sum()) * float(voxel_ml)

    core_ml, hypo_ml = ml(core), ml(hypo)
    mismatch_ml = max(hypo_ml - core_ml, 0.0)
    ratio = hypo_ml / core_ml if core_ml > 0 else None
    hir = ml(hir_region) / hypo_ml if hypo_ml > 0 else None
    crit = {
        "core_lt_max": core_ml < thr.defuse3_max_core_ml,
        "ratio_ge_min": (ratio >= thr.defuse3_min_ratio) if ratio is not None else hypo_ml > 0,
        "mismatch_ge_min": mismatch_ml >= thr.defuse3_min_mismatch_ml,
    }
    ratio_txt = f"{ratio:.2f}" if ratio is not None else ("infinite (no core)" if hypo_ml > 0 else "undefined")
    reasons = [
        f"core {core_ml:.1f} ml {'<' if crit['core_lt_max'] else '>='} {thr.defuse3_max_core_ml:g} ml",
        f"mismatch ratio {ratio_txt} {'>=' if crit['ratio_ge_min'] else '<'} {thr.defuse3_min_ratio:g}",
        f"mismatch {mismatch_ml:.1f} ml {'>=' if crit['mismatch_ge_min'] else '<'} "
        f"{thr.defuse3_min_mismatch_ml:g} ml",
    ]
    summary: dict[str, Any] = {
        "reference": ref,
        "core_ml": core_ml,
        "hypoperfusion_ml": hypo_ml,
        "penumbra_ml": ml(penumbra),
        **{f"tmax_gt_{k}_ml": ml(r) for k, r in tmax_regions.items()},
        "mismatch_ml": mismatch_ml,
        "mismatch_ratio": ratio,
        "hypoperfusion_intensity_ratio": hir,
        "defuse3_target": bool(all(crit.values())),
        "defuse3_criteria": crit,
        "defuse3_reasons": reasons,
        "voxel_ml": float(voxel_ml),
        "brain_ml": ml(brain),
        "tissue_ml": ml(tissue),
        "thresholds": thr.to_dict(),
        "notes": ("mismatch_ratio is null when the core is 0 ml (infinite ratio); "
                  "hypoperfusion_intensity_ratio is null without TMAX > "
                  f"{thr.hypoperfusion_tmax_s:g} s tissue; DEFUSE-3 = imaging criteria only"),
    }
    regions = {"core": core, "hypoperfusion": hypo, "penumbra": penumbra, "tissue": tissue,
               **{f"tmax_gt_{k}": r for k, r in tmax_regions.items()}}
    return Readout(summary=summary, regions=regions)


def clinical_readout(maps: Mapping[str, Any], mask: Any | None, voxel_ml: float,
                     thresholds: ReadoutThresholds | None = None, *, affine: Any | None = None) -> dict[str, Any]:
    """What a stroke team reads from one study's maps, as a JSON-able dict.

    Args:
        maps: ``cbf`` (ml/100g/min) and ``tmax`` (s) required, ``cbv`` / ``mtt`` optional; each
            ``(S, H, W)`` (or ``(H, W)``), numpy or torch.
        mask: bool brain mask ``(S, H, W)``, or ``None`` (every pixel is brain).
        voxel_ml: volume of one voxel in ml (:func:`voxel_volume_ml`).
        thresholds: :class:`ReadoutThresholds` (defaults when ``None``).
        affine: optional ``(4, 4)`` affine, only to name the reference hemisphere (right / left).

    Returns:
        ``reference`` (see :func:`cbf_reference`), ``core_ml``, ``hypoperfusion_ml``, ``penumbra_ml``,
        ``tmax_gt_{k}_ml`` for every ``k`` of ``thresholds.tmax_volumes_s`` (``tmax_gt_4_ml`` ...),
        ``mismatch_ml`` (hypoperfusion − core, >= 0), ``mismatch_ratio`` (hypoperfusion / core;
        ``None`` when the core is 0 ml), ``hypoperfusion_intensity_ratio`` (``None`` without
        hypoperfusion), ``defuse3_target`` (bool), ``defuse3_criteria`` (each criterion, bool),
        ``defuse3_reasons`` (readable lines), ``voxel_ml``, ``brain_ml``, ``tissue_ml``,
        ``thresholds`` (all used), ``notes``. Volumes in ml.
    """
    return compute_readout(maps, mask, voxel_ml, thresholds, affine=affine).summary


def readout_regions(maps: Mapping[str, Any], mask: Any | None, voxel_ml: float,
                    thresholds: ReadoutThresholds | None = None) -> dict[str, np.ndarray]:
    """Bool ``(S, H, W)`` regions of the readout, after the minimum-cluster filter.

    Keys: ``core``, ``hypoperfusion`` (TMAX > ``hypoperfusion_tmax_s``), ``penumbra``
    (hypoperfusion and not core), ``tissue`` (mask and CBF >= ``tissue_min_cbf``) and
    ``tmax_gt_{k}`` for every volume threshold. Arguments as :func:`clinical_readout`.
    """
    return compute_readout(maps, mask, voxel_ml, thresholds).regions


def readout_line(summary: Mapping[str, Any]) -> str:
    """One line of a readout dict, e.g. ``core 12.3 ml · TMAX>6 s 45.6 ml · mismatch 33.3 ml (ratio 3.7) ·
    DEFUSE-3 target: yes``."""
    thr = summary.get("thresholds", {})
    ratio = summary.get("mismatch_ratio")
    ratio_txt = f"{ratio:.1f}" if ratio is not None else ("inf, no core" if summary["hypoperfusion_ml"] > 0
                                                          else "n/a")
    return (f"core {summary['core_ml']:.1f} ml · TMAX>{thr.get('hypoperfusion_tmax_s', 6.0):g} s "
            f"{summary['hypoperfusion_ml']:.1f} ml · mismatch {summary['mismatch_ml']:.1f} ml (ratio {ratio_txt}) · "
            f"DEFUSE-3 target: {'yes' if summary['defuse3_target'] else 'no'}")


# --------------------------------------------------------------------------------------------------
# agreement


def dice(a: Any, b: Any) -> float:
    """Dice = 2 |A ∩ B| / (|A| + |B|) of two bool masks of one shape; 1.0 when both are empty.

    Both empty means both methods agree there is no lesion, a perfect agreement (the convention of
    lesion-segmentation challenges for lesion-free cases); a lesion found where none is, or missed,
    gives 0.
    """
    x, y = np.asarray(_np(a, bool)), np.asarray(_np(b, bool))
    if x.shape != y.shape:
        raise ValueError(f"dice needs masks of one shape, got {x.shape} and {y.shape}")
    total = int(x.sum()) + int(y.sum())
    return 1.0 if total == 0 else 2.0 * float((x & y).sum()) / total


def bland_altman(pred_ml: Sequence[float] | np.ndarray, true_ml: Sequence[float] | np.ndarray) -> dict[str, Any]:
    """Bland-Altman agreement of paired volumes (ml), one pair per patient.

    Returns ``bias`` = mean(pred − true), ``sd`` = sample standard deviation of the differences
    (n − 1), ``loa_low`` / ``loa_high`` = bias ∓ 1.96 sd (95 % limits of agreement) and ``n``; with
    fewer than 2 pairs ``sd`` and the limits are ``None`` (and everything is ``None`` for 0 pairs).
    Non-finite pairs are dropped.
    """
    p, t = _np(pred_ml).reshape(-1), _np(true_ml).reshape(-1)
    if p.shape != t.shape:
        raise ValueError(f"bland_altman needs paired volumes, got {p.size} and {t.size}")
    ok = np.isfinite(p) & np.isfinite(t)
    d = p[ok] - t[ok]
    n = int(d.size)
    if n == 0:
        return {"bias": None, "sd": None, "loa_low": None, "loa_high": None, "n": 0}
    bias = float(d.mean())
    if n < 2:
        return {"bias": bias, "sd": None, "loa_low": None, "loa_high": None, "n": n}
    sd = float(d.std(ddof=1))
    return {"bias": bias, "sd": sd, "loa_low": bias - 1.96 * sd, "loa_high": bias + 1.96 * sd, "n": n}


def pearson_r(x: Any, y: Any, mask: Any | None = None) -> float | None:
    """Pearson correlation of two arrays of one shape (voxelwise), over ``mask`` and finite pairs.

    ``None`` when fewer than 2 pairs or either variance is 0 (r is undefined).
    """
    a, b = _np(x), _np(y)
    if a.shape != b.shape:
        raise ValueError(f"pearson_r needs arrays of one shape, got {a.shape} and {b.shape}")
    sel = np.isfinite(a) & np.isfinite(b)
    if mask is not None:
        sel &= np.asarray(_np(mask, bool)).reshape(a.shape)
    a, b = a[sel], b[sel]
    if a.size < 2:
        return None
    da, db = a - a.mean(), b - b.mean()
    va, vb = float((da * da).sum()), float((db * db).sum())
    if va <= 0 or vb <= 0:
        return None
    return float(np.clip((da * db).sum() / math.sqrt(va * vb), -1.0, 1.0))


def readout_agreement(pred_maps: Mapping[str, Any], true_maps: Mapping[str, Any], mask: Any | None,
                      voxel_ml: float, thresholds: ReadoutThresholds | None = None) -> dict[str, Any]:
    """How a method's readout agrees with a reference's (labels / phantom truth) on one study.

    Both readouts use the same thresholds and the same reference method, each computed on its own
    maps. ``pred_maps`` / ``true_maps``: ``cbf``, ``tmax`` (+ ``cbv``, ``mtt``) ``(S, H, W)``;
    ``mask``: bool brain mask (``None`` = all pixels); ``voxel_ml``: ml per voxel.

    Returns (JSON-able): ``dice_core``, ``dice_hypoperfusion`` (TMAX > ``hypoperfusion_tmax_s``),
    ``dice_penumbra``, ``dice_tmax_gt_{k}`` per volume threshold (``dice_tmax_gt_6`` is Dice of
    TMAX > 6 s), ``{core,hypoperfusion,mismatch,penumbra}_ml_{pred,true,error}`` (error = pred −
    true, ml), ``reference_cbf_{pred,true}``, ``defuse3_{pred,true}``, ``defuse3_agree`` and
    ``pearson_r_{cbv,cbf,tmax,mtt}`` inside the mask (``None`` where a map is missing or constant;
    MTT is derived from CBV and CBF when not given).
    """
    thr = thresholds or ReadoutThresholds()
    pm, tm = _maps3d(pred_maps), _maps3d(true_maps)
    if pm["cbf"].shape != tm["cbf"].shape:
        raise ValueError(f"predicted maps {pm['cbf'].shape} and reference maps {tm['cbf'].shape} differ in shape")
    pr = compute_readout(pm, mask, voxel_ml, thr)
    tr = compute_readout(tm, mask, voxel_ml, thr)
    out: dict[str, Any] = {
        "dice_core": dice(pr.regions["core"], tr.regions["core"]),
        "dice_hypoperfusion": dice(pr.regions["hypoperfusion"], tr.regions["hypoperfusion"]),
        "dice_penumbra": dice(pr.regions["penumbra"], tr.regions["penumbra"]),
    }
    for k in thr.tmax_volumes_s:
        key = f"tmax_gt_{_tkey(k)}"
        out[f"dice_{key}"] = dice(pr.regions[key], tr.regions[key])
    for name in ("core", "hypoperfusion", "mismatch", "penumbra"):
        p, t = pr.summary[f"{name}_ml"], tr.summary[f"{name}_ml"]
        out.update({f"{name}_ml_pred": p, f"{name}_ml_true": t, f"{name}_ml_error": p - t})
    out["reference_cbf_pred"] = pr.summary["reference"]["cbf_ml_100g_min"]
    out["reference_cbf_true"] = tr.summary["reference"]["cbf_ml_100g_min"]
    out["defuse3_pred"] = pr.summary["defuse3_target"]
    out["defuse3_true"] = tr.summary["defuse3_target"]
    out["defuse3_agree"] = out["defuse3_pred"] == out["defuse3_true"]
    sel = None if mask is None else _as3d(np.asarray(_np(mask, bool)), "mask")
    for p in ("cbv", "cbf", "tmax", "mtt"):
        a, b = pm.get(p), tm.get(p)
        if p == "mtt":
            if a is None and "cbv" in pm:
                a = mtt_from_cbv_cbf(pm["cbv"], pm["cbf"])
            if b is None and "cbv" in tm:
                b = mtt_from_cbv_cbf(tm["cbv"], tm["cbf"])
        out[f"pearson_r_{p}"] = None if a is None or b is None else pearson_r(a, b, sel)
    out["thresholds"] = thr.to_dict()
    return out


def precontrast_image(frames: Any, n_frames: int | Sequence[int] | None = None) -> np.ndarray:
    """Pre-contrast image ``(S, H, W)`` HU: per slice, the mean of its first frames.

    Args:
        frames: ``(S, T, H, W)`` HU.
        n_frames: frames averaged — one number, one per slice (e.g. ``calculate_maps``' reported
            ``baseline_frames``), or ``None`` to detect the bolus arrival per slice as
            :func:`~stm_dlp.perfusion.maps.calculate_maps` does and average the frames before it.
            Non-finite pixels of a frame are left out of the mean (0 where none is finite).
    """
    fr = _np(frames, np.float32)
    if fr.ndim != 4:
        raise ValueError(f"frames must be (S, T, H, W), got shape {fr.shape}")
    s_count, n_t = fr.shape[:2]
    if n_frames is None:
        import torch

        from stm_dlp.perfusion.concentration import detect_arrival, reference_curve

        counts = []
        for s in range(s_count):
            flat = torch.from_numpy(np.nan_to_num(fr[s].reshape(n_t, -1).T, nan=0.0, posinf=0.0, neginf=0.0))
            a = detect_arrival(reference_curve(flat))
            counts.append(max(1, min(a - 1, n_t - 1)))
    elif isinstance(n_frames, (int, np.integer)):
        counts = [int(n_frames)] * s_count
    else:
        counts = [int(c) for c in n_frames]
        if len(counts) != s_count:
            raise ValueError(f"n_frames has {len(counts)} entries for {s_count} slices")
    out = np.zeros((s_count, *fr.shape[2:]), np.float32)
    for s, c in enumerate(counts):
        part = fr[s, : max(1, min(c, n_t))]
        finite = np.isfinite(part)
        n = finite.sum(0)
        out[s] = np.where(n > 0, np.where(finite, part, 0.0).sum(0) / np.maximum(n, 1), 0.0)
    return out


def _reference_method(text: str) -> str:
    value = text.strip().lower()
    if value not in REFERENCE_METHODS:
        raise ValueError(f"must be one of {', '.join(REFERENCE_METHODS)}")
    return value


#: ``key=value`` options of the ``predict`` / ``calc`` command lines that set the readout thresholds
#: (``name -> (type, default, help)``, the :func:`stm_dlp.cli.parse_kv` spec format).
CLI_OPTIONS: dict[str, tuple[Any, Any, str]] = {
    "readout_core_rcbf": (float, ReadoutThresholds.core_rcbf, "readout: core where CBF < this x reference CBF"),
    "readout_tmax_s": (float, ReadoutThresholds.hypoperfusion_tmax_s, "readout: hypoperfusion where TMAX > this (s)"),
    "readout_min_cluster_ml": (float, ReadoutThresholds.min_cluster_ml,
                               "readout: drop connected regions smaller than this (ml; 0 = keep all)"),
    "readout_reference": (_reference_method, ReadoutThresholds.reference,
                          "readout: reference CBF from the contralateral hemisphere or the global median"),
}


def thresholds_from_options(options: dict[str, Any]) -> ReadoutThresholds:
    """Remove the :data:`CLI_OPTIONS` keys from a parsed ``key=value`` dict; their thresholds."""
    values = {k: options.pop(k) for k in list(CLI_OPTIONS) if k in options}
    return ReadoutThresholds(
        core_rcbf=values.get("readout_core_rcbf", ReadoutThresholds.core_rcbf),
        hypoperfusion_tmax_s=values.get("readout_tmax_s", ReadoutThresholds.hypoperfusion_tmax_s),
        min_cluster_ml=values.get("readout_min_cluster_ml", ReadoutThresholds.min_cluster_ml),
        reference=values.get("readout_reference", ReadoutThresholds.reference),
    )
