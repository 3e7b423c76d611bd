"""Evaluation conditions: test one trained model (or the calculation approach) under other data settings.

``eval_conditions`` in a run config (the ``frames`` and ``robustness`` experiments set it) is a list of
mappings ``{eval_corruption, frame_fraction, eval_corruption_seed, name}``; each is tested once more
after training, on a DataModule built from ``cfg.data`` with those keys overridden (everything else
matches training). Results land in ``metrics_<name>.json`` and ``metrics.json["conditions"][name]``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

#: Data settings an evaluation condition may change (everything else must match training).
CONDITION_KEYS = ("eval_corruption", "frame_fraction", "eval_corruption_seed")
#: Name of the run's own test condition in tables and W&B.
BASE_CONDITION = "test"


def check_conditions(cfg: DictConfig) -> None:
    """Refuse ``eval_conditions`` entries that are not mappings or set keys other than :data:`CONDITION_KEYS`."""
    for cond in cfg.get("eval_conditions") or []:
        if not isinstance(cond, Mapping) and not OmegaConf.is_dict(cond):
            raise ValueError(f"eval_conditions entries must be mappings like {{frame_fraction: 0.6}}, got {cond!r}")
        unknown = sorted(set(cond) - set(CONDITION_KEYS) - {"name"})
        if unknown:
            raise ValueError(f"eval_conditions: unknown key(s) {unknown}; a condition may set "
                             f"{', '.join(CONDITION_KEYS)} and name")


def condition_name(cond: Mapping[str, Any]) -> str:
    """A short file-name-safe name of an evaluation condition (``noise``, ``frames0.6``, ``motion+frames0.5``)."""
    if cond.get("name"):
        name = str(cond["name"])
    else:
        parts = []
        if "eval_corruption" in cond:
            parts.append(str(cond["eval_corruption"]))
        if "frame_fraction" in cond:
            parts.append(f"frames{float(cond['frame_fraction']):g}")
        if "eval_corruption_seed" in cond:
            parts.append(f"seed{cond['eval_corruption_seed']}")
        name = "+".join(parts) or "default"
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", name)


def conditions(cfg: DictConfig) -> list[tuple[str, dict[str, Any]]]:
    """``[(name, data overrides)]`` of ``cfg.eval_conditions``, names unique and never :data:`BASE_CONDITION`."""
    check_conditions(cfg)
    out, seen = [], set()
    for cond in cfg.get("eval_conditions") or []:
        cond = OmegaConf.to_container(cond, resolve=True) if OmegaConf.is_config(cond) else dict(cond)
        name = condition_name(cond)
        if name in seen or name == BASE_CONDITION:
            raise ValueError(f"eval_conditions: two conditions are called {name!r}; give them distinct names")
        seen.add(name)
        out.append((name, {k: v for k, v in cond.items() if k in CONDITION_KEYS}))
    return out


def condition_datamodule(cfg: DictConfig, overrides: Mapping[str, Any]):
    """The run's DataModule with the condition's data overrides, set up for testing."""
    dm = instantiate(cfg.data, **dict(overrides))
    dm.setup("test")
    return dm


def condition_record(cfg: DictConfig, overrides: Mapping[str, Any], results: Mapping[str, Any],
                     params: tuple[str, ...]) -> dict[str, Any]:
    """The condition's settings (overrides, else the run's own) with its test metrics per parameter."""
    data = cfg.data
    record = {key: overrides.get(key, data.get(key)) for key in CONDITION_KEYS}
    record["test"] = {p: results[p] for p in params}
    for key in ("failed_studies", "failures", "readout"):  # calc failures; the clinical readout agreement
        if key in results:
            record[key] = results[key]
    return record
