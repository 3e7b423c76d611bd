"""Start-up validation of a composed configuration: fail in milliseconds, before any data is read.

:func:`validate_config` checks the values a user is most likely to mistype — the encoder, the IRFE
order, the MPP exchange depth, frame fractions, the robustness corruption, the loss, paths — and
raises one :class:`ConfigError` (a ``ValueError``) whose one-line message names every bad key, the
value given and the valid values. ``stm_dlp.run.train`` calls it right after ``check_launch``, so
``python -m stm_dlp.run model.exchange_layers=7`` prints one ``error: ...`` line and exits with
status 2 without creating a cache, reading a study or building a model.

:func:`check_overrides` does the same for config-*group* choices on the command line
(``encoder=foo``): Hydra itself refuses those before ``main`` runs, with a multi-line message and
exit status 1; calling ``check_overrides(sys.argv[1:])`` ahead of the Hydra main turns them into the
project's one line and status 2.

Only plain values are inspected (no model is built, no file is opened except ``stat`` of
``data.root`` and ``ckpt_path``). Keys a config does not have are skipped, so custom configs that
drop a key still validate.
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

#: The project's config folder (``conf/`` at the repository root).
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
#: Special values of ``ckpt_path`` that Lightning resolves itself.
CKPT_KEYWORDS = ("last", "best", "hpc", "registry")


def _defaults(fn: Any) -> dict[str, Any]:
    """The keyword defaults of a constructor: a key the config omits is checked at the code's own default
    (never a default restated here)."""
    return {k: v.default for k, v in inspect.signature(fn).parameters.items()
            if v.default is not inspect.Parameter.empty}


class ConfigError(ValueError):
    """A configuration value is invalid; the message lists every problem and the valid values."""


def _fmt(values: Iterable[Any]) -> str:
    return ", ".join(str(v) for v in values)


def _get(node: Any, key: str, default: Any = None) -> Any:
    """``node[key]`` for DictConfig / dict nodes, resolving interpolations; ``default`` if absent."""
    if node is None:
        return default
    try:
        return node.get(key, default)
    except Exception as exc:  # noqa: BLE001 - a broken interpolation is itself a config error
        raise ConfigError(f"{key}: cannot be resolved ({type(exc).__name__}: {' '.join(str(exc).split())})") \
            from None


class _Problems:
    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, text: str) -> None:
        self.items.append(text)

    def one_of(self, key: str, value: Any, valid: Sequence[Any]) -> None:
        if value not in valid or isinstance(value, bool) != any(isinstance(v, bool) for v in valid):
            self.add(f"{key}={value!r} is not valid; valid values: {_fmt(valid)}")

    def integer(self, key: str, value: Any, lo: int | None = None, allow_none: bool = False) -> None:
        if value is None and allow_none:
            return
        if isinstance(value, bool) or not isinstance(value, int) or (lo is not None and value < lo):
            what = f"an integer >= {lo}" if lo is not None else "an integer"
            self.add(f"{key}={value!r} is not valid; expected {what}" + (" or null" if allow_none else ""))

    def number(self, key: str, value: Any, lo: float, hi: float, lo_open: bool, hi_open: bool,
               allow_none: bool = False) -> None:
        if value is None and allow_none:
            return
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if ok:
            ok = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
        if not ok:
            interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
            self.add(f"{key}={value!r} is not valid; expected a number in {interval}"
                     + (" or null" if allow_none else ""))


def _check_model(model: Any, p: _Problems) -> None:
    target = str(_get(model, "_target_", "") or "")
    if not target:
        p.add("model._target_ is missing; choose model=stm_dlp, model=unitobrain or model=calc")
        return
    module, _, name = target.rpartition(".")
    try:
        found = hasattr(importlib.import_module(module), name) if module else False
    except ImportError:
        found = False
    if not found:
        p.add(f"model._target_={target!r} cannot be imported; valid models: stm_dlp.models.STMDLP, "
              "stm_dlp.models.UniToBrain, stm_dlp.calc_eval.CalcBaseline")
        return
    if name == "STMDLP":
        from stm_dlp.models import ENCODERS, EXCHANGE_LAYERS, ORDERS, STMDLP, TIME_INPUTS

        d = _defaults(STMDLP)
        encoder, order = _get(model, "encoder", d["encoder"]), _get(model, "order", d["order"])
        time_input = _get(model, "time_input", d["time_input"])
        p.one_of("model.encoder", encoder, ENCODERS)
        p.one_of("model.order", order, ORDERS)
        p.one_of("model.time_input", time_input, TIME_INPUTS)
        if order in ORDERS and time_input in TIME_INPUTS and order != "spatial_first" and time_input != "temporal":
            p.add(f"model.time_input={time_input!r} needs model.order=spatial_first (got {order!r}); "
                  "valid time_input for temporal_first and joint: temporal")
        p.one_of("model.exchange_layers", _get(model, "exchange_layers", d["exchange_layers"]), EXCHANGE_LAYERS)
        for key in ("spatial_channels", "temporal_hidden", "mpp_hidden", "unet_depth", "baseline_frames"):
            if _get(model, key) is not None:
                p.integer(f"model.{key}", _get(model, key), lo=1)
        if _get(model, "mpp_kernel_size") is not None:
            p.one_of("model.mpp_kernel_size", _get(model, "mpp_kernel_size"), (1, 3))
    elif name == "UniToBrain":
        from stm_dlp.models import UniToBrain

        p.integer("model.n_frames", _get(model, "n_frames", _defaults(UniToBrain)["n_frames"]), lo=2)
        for key in ("base", "depth"):
            if _get(model, key) is not None:
                p.integer(f"model.{key}", _get(model, key), lo=1)


def _check_data(data: Any, p: _Problems) -> None:
    from stm_dlp.data.corrupt import NAMED_CORRUPTIONS
    from stm_dlp.data.datamodule import FRAME_FRACTION_RANGE, LABEL_SOURCES, SOURCES, CTPDataModule
    from stm_dlp.data.splits import NEW_PATIENT_POLICIES

    d = _defaults(CTPDataModule)
    lo_ff, hi_ff = FRAME_FRACTION_RANGE
    source = _get(data, "source", d["source"])
    p.one_of("data.source", source, SOURCES)
    p.one_of("data.label_source", _get(data, "label_source", d["label_source"]), LABEL_SOURCES)
    p.one_of("data.eval_corruption", _get(data, "eval_corruption", d["eval_corruption"]), tuple(NAMED_CORRUPTIONS))
    p.number("data.frame_fraction", _get(data, "frame_fraction", d["frame_fraction"]), lo_ff, hi_ff, True, False)
    p.number("data.train_frame_fraction", _get(data, "train_frame_fraction"), lo_ff, hi_ff, True, False,
             allow_none=True)
    val, test = _get(data, "val_fraction", d["val_fraction"]), _get(data, "test_fraction", d["test_fraction"])
    p.number("data.val_fraction", val, 0.0, 1.0, False, True)
    p.number("data.test_fraction", test, 0.0, 1.0, False, True)
    if isinstance(val, (int, float)) and isinstance(test, (int, float)) and val + test >= 1.0:
        p.add(f"data.val_fraction + data.test_fraction = {val + test:g} leaves no training patients; "
              "expected a sum < 1")
    p.integer("data.batch_size", _get(data, "batch_size", d["batch_size"]), lo=1)
    p.integer("data.eval_batch_size", _get(data, "eval_batch_size", d["eval_batch_size"]), lo=1)
    p.integer("data.num_workers", _get(data, "num_workers", d["num_workers"]), lo=0)
    p.integer("data.crop_size", _get(data, "crop_size"), lo=1, allow_none=True)
    p.one_of("data.new_patients", _get(data, "new_patients", d["new_patients"]), NEW_PATIENT_POLICIES)
    if source == "phantom":
        p.integer("data.n_patients", _get(data, "n_patients", d["n_patients"]), lo=3)
        phantom = _get(data, "phantom")
        if phantom is not None:
            from stm_dlp.data.phantom import PhantomConfig

            try:
                PhantomConfig(**{str(k): phantom[k] for k in phantom})
            except (TypeError, ValueError) as exc:
                p.add(f"data.phantom: {' '.join(str(exc).split())}")
    elif source in SOURCES:
        root = _get(data, "root")
        if root in (None, "", "???"):
            p.add(f"data.root is required for data.source={source} (the folder holding ROOT/<patient>/...)")
        elif not Path(str(root)).is_dir():
            p.add(f"data.root={str(root)!r} does not exist or is not a folder")
    interval = _get(data, "frame_interval_s")
    if interval is not None:
        p.number("data.frame_interval_s", interval, 0.0, math.inf, True, True)


def _check_lit(lit: Any, p: _Problems) -> None:
    from stm_dlp.lit import LOSSES, PerfusionLitModule

    d = _defaults(PerfusionLitModule)
    loss = _get(lit, "loss", d["loss"])
    if isinstance(loss, str) or loss is None:
        p.one_of("lit.loss", loss, LOSSES)
    else:
        kinds = list(loss)
        if len(kinds) != 3 or any(k not in LOSSES for k in kinds):
            p.add(f"lit.loss={kinds!r} is not valid; expected one of {_fmt(LOSSES)} or 3 of them (CBV, CBF, TMAX)")
    p.number("lit.lr", _get(lit, "lr", d["lr"]), 0.0, math.inf, True, True)
    weights = _get(lit, "task_weights")
    if weights is not None:
        vals = list(weights)
        if len(vals) != 3 or not all(isinstance(w, (int, float)) and w >= 0 for w in vals):
            p.add(f"lit.task_weights={vals!r} is not valid; expected 3 numbers >= 0 (CBV, CBF, TMAX)")
    if _get(lit, "step_size") is not None:
        p.integer("lit.step_size", _get(lit, "step_size"), lo=1)
    if _get(lit, "gamma") is not None:
        p.number("lit.gamma", _get(lit, "gamma"), 0.0, 1.0, True, False)


def _check_trainer(trainer: Any, p: _Problems) -> None:
    epochs = _get(trainer, "max_epochs")
    if epochs is not None and epochs != -1:
        p.integer("trainer.max_epochs", epochs, lo=1)


def validate_config(cfg: Any) -> None:
    """Check a composed ``python -m stm_dlp.run`` config; raise :class:`ConfigError` if anything is off.

    Args:
        cfg: the composed ``DictConfig`` (or a plain nested dict) with ``model``, ``data``, ``lit``,
            ``trainer``, ``seed`` and ``ckpt_path``.

    Raises:
        ConfigError: one line naming every invalid key, the value given and the valid values, e.g.
            ``model.exchange_layers=7 is not valid; valid values: 0, 1, 2, 3``.
    """
    p = _Problems()
    encoder_group = _get(cfg, "encoder")
    model_has_encoder = _get(cfg, "model") is not None and _get(_get(cfg, "model"), "encoder") is not None
    if encoder_group is not None and _get(encoder_group, "name") is not None and not model_has_encoder:
        from stm_dlp.models import ENCODERS

        p.one_of("encoder.name", _get(encoder_group, "name"), ENCODERS)
    if _get(cfg, "model") is not None:
        _check_model(_get(cfg, "model"), p)
    if _get(cfg, "data") is not None:
        _check_data(_get(cfg, "data"), p)
    if _get(cfg, "lit") is not None:
        _check_lit(_get(cfg, "lit"), p)
    if _get(cfg, "trainer") is not None:
        _check_trainer(_get(cfg, "trainer"), p)
    if _get(cfg, "seed") is not None:
        p.integer("seed", _get(cfg, "seed"), lo=0)
    ckpt = _get(cfg, "ckpt_path")
    if ckpt is not None and str(ckpt) not in CKPT_KEYWORDS and not Path(str(ckpt)).is_file():
        p.add(f"ckpt_path={str(ckpt)!r} is not a file; give a checkpoint path or one of {_fmt(CKPT_KEYWORDS[:2])}")
    if p.items:
        raise ConfigError("invalid configuration: " + "; ".join(p.items))


# ------------------------------------------------------------------------------ group overrides
def config_groups(conf_dir: str | Path = CONF_DIR) -> dict[str, list[str]]:
    """``{group: [options]}`` of the config groups under ``conf_dir`` (``hydra/...`` excluded)."""
    root = Path(conf_dir)
    out: dict[str, list[str]] = {}
    for folder in sorted(p for p in root.rglob("*") if p.is_dir()):
        group = folder.relative_to(root).as_posix()
        if group == "hydra" or group.startswith("hydra/"):
            continue
        # ``_common.yaml``-style files are bases other options start from, not choices
        options = sorted(f.relative_to(folder).with_suffix("").as_posix()
                         for f in folder.rglob("*.yaml") if not f.name.startswith("_"))
        out[group] = options
    return out


def check_overrides(argv: Sequence[str], conf_dir: str | Path = CONF_DIR) -> None:
    """Refuse a command-line group choice that does not exist (``encoder=foo``), listing the options.

    Only plain ``group=option`` (and ``group=a,b`` sweep lists) of the project's own groups are checked;
    dotted keys (``model.encoder=...``), ``hydra/...`` groups, ``key@package`` forms, deletions and
    sweep functions (``choice(...)``, ``glob(...)``) are left to Hydra.

    Raises:
        ConfigError: ``encoder=foo: unknown option; valid values: cnn, lstm, mlp_mixer``.
    """
    groups = config_groups(conf_dir)
    problems = []
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, _, value = arg.partition("=")
        key = key.lstrip("+")
        if "." in key or "@" in key or key.startswith("~") or key not in groups:
            continue
        if "(" in value or value in ("null", "") or value.startswith(("'", '"')):
            continue
        for option in (v.strip() for v in value.split(",")):
            if option and option not in groups[key]:
                problems.append(f"{key}={option}: unknown option; valid values: {_fmt(groups[key])}")
    if problems:
        raise ConfigError("; ".join(problems))

