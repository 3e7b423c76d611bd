"""``python -m stm_dlp.run`` — train, then test, one configuration (Hydra main).

Examples::

    python -m stm_dlp.run                           # STM-DLP-LSTM on the embedded phantom, CPU
    python -m stm_dlp.run encoder=mlp_mixer
    python -m stm_dlp.run model=unitobrain
    python -m stm_dlp.run model=calc                # the calculation approach (oSVD), no training
    python -m stm_dlp.run trainer=smoke             # seconds; any configuration
    python -m stm_dlp.run -m experiment=table2      # a whole ablation sweep (docs/reproducing.md)
    python -m stm_dlp.run trainer=ddp trainer.devices=4   # one run on 4 GPUs (never inside -m)
    python -m stm_dlp.run ckpt_path=outputs/…/checkpoints/last.ckpt   # resume

Each run writes into its Hydra run dir: ``config.yaml`` (resolved), ``split.json``,
``checkpoints/{best-*,last}.ckpt``, ``metrics.json`` (test metrics in physical units) and CSV logs.

``eval_conditions`` (a list of ``{eval_corruption, frame_fraction, eval_corruption_seed, name}``
mappings; the ``frames`` and ``robustness`` experiments set it) tests the best checkpoint once more
under each condition after training: the model is trained once and evaluated many times. Each
condition writes ``metrics_<name>.json`` and an entry ``metrics.json["conditions"][name]``.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, RichProgressBar
from omegaconf import DictConfig, OmegaConf

from stm_dlp.config_check import validate_config
from stm_dlp.launch import describe_devices, pinned_gpu, register_resolvers, world_size
from stm_dlp.lit import PerfusionLitModule
from stm_dlp.types import ALL_PARAMS, UNITS, StudyError

log = logging.getLogger("stm_dlp.run")

#: Data settings an evaluation condition may change (everything else must match training).
CONDITION_KEYS = ("eval_corruption", "frame_fraction", "eval_corruption_seed")
#: Name of the run's own test condition in tables and W&B.
BASE_CONDITION = "test"


def _wandb_offline() -> bool:
    """W&B runs offline unless the user is logged in (API key in env or ~/.netrc) and not forced."""
    mode = os.environ.get("WANDB_MODE", "")
    if mode in ("offline", "disabled", "dryrun"):
        return True
    if os.environ.get("WANDB_API_KEY"):
        return False
    netrc = Path.home() / ".netrc"
    return not (netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore"))


def _hydra_cfg() -> Any | None:
    try:
        return HydraConfig.get()
    except ValueError:
        return None


def _is_multirun(hc: Any | None) -> bool:
    return hc is not None and getattr(hc.mode, "name", str(hc.mode)) == "MULTIRUN"


def sweep_id(hc: Any | None = None) -> str | None:
    """The sweep's identity (its directory name, the launch time by default); ``None`` outside a sweep.

    Taken from the job's resolved output dir minus ``hydra.sweep.subdir``, so every job of a sweep
    agrees even when jobs run in other processes or on other machines.
    """
    hc = _hydra_cfg() if hc is None else hc
    if not _is_multirun(hc):
        return None
    out = Path(str(hc.runtime.output_dir))
    depth = len(Path(str(hc.sweep.subdir)).parts)
    return out.parents[depth - 1].name if depth >= 1 else out.name


def _wandb_group(experiment: str) -> str:
    """W&B group: ``<experiment>-<sweep id>`` for a sweep job, ``<experiment>-<run dir>`` for a single run."""
    hc = _hydra_cfg()
    if hc is None:
        return str(experiment)
    sid = sweep_id(hc) or Path(str(hc.runtime.output_dir)).name
    return f"{experiment}-{sid}"


def _wandb_name(label: str, seed: Any) -> str:
    """W&B run name: the variant, the seed and (in a sweep) the job number — never a patient identifier."""
    hc = _hydra_cfg()
    name = f"{label}-seed{seed}"
    if _is_multirun(hc):
        name += f"-job{hc.job.num}"
    return name


for _name, _fn in (("wandb_offline", _wandb_offline), ("stm_dlp_wandb_group", _wandb_group),
                   ("stm_dlp_wandb_name", _wandb_name)):
    if not OmegaConf.has_resolver(_name):
        OmegaConf.register_new_resolver(_name, _fn)
register_resolvers()


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def is_global_zero_env(env: Mapping[str, str] | None = None) -> bool:
    """Whether this process is global rank 0, from the environment (usable before the Trainer exists).

    Lightning's DDP children carry ``LOCAL_RANK``/``NODE_RANK``, torchrun sets ``RANK``, SLURM tasks
    ``SLURM_PROCID``; a process with none of them is rank 0.
    """
    env = os.environ if env is None else env
    for key in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK"):
        value = env.get(key)
        if value not in (None, "") and int(value) != 0:
            return False
    return True


# --------------------------------------------------------------------------------- launch checks
def _multi_process(trainer_cfg: Mapping[str, Any]) -> bool:
    n = world_size(trainer_cfg)
    if n is None:  # "auto"/-1 devices on an accelerator: as many processes as devices
        return True
    return n > 1


def check_launch(cfg: DictConfig, hc: Any | None = None, env: Mapping[str, str] | None = None) -> None:
    """Refuse combinations that cannot work, before any data is read.

    * a multi-process trainer (DDP over several devices or nodes) inside a multirun, unless the
      SLURM launcher starts one task per device: Lightning's DDP launcher re-runs the command line
      in each child, which would replay the whole sweep;
    * several ranks of one single run (torchrun, ``srun -n N``) without a fixed ``hydra.run.dir``:
      each rank would resolve its own time-stamped run dir;
    * unknown keys in ``eval_conditions``.
    """
    hc = _hydra_cfg() if hc is None else hc
    env = os.environ if env is None else env
    trainer_cfg = cfg.trainer
    if _is_multirun(hc) and _multi_process(trainer_cfg):
        launcher = str(OmegaConf.select(hc, "launcher._target_", default="") or "")
        if "submitit" not in launcher.lower() or "slurm" not in launcher.lower():
            raise ValueError(
                f"a multi-process trainer ({describe_devices(trainer_cfg)}) inside a multirun (-m) is refused: "
                "Lightning's DDP launcher re-runs the command in each child and would replay the whole sweep. "
                "Run sweeps one job per device (trainer=gpu hydra/launcher=joblib_gpu, or trainer.devices=1), "
                "run a single DDP job without -m, or submit DDP sweeps with hydra/launcher=slurm "
                "(one SLURM task per device)."
            )
    if not _is_multirun(hc) and hc is not None:
        ranks = int(env.get("WORLD_SIZE", "0") or 0) or int(env.get("SLURM_NTASKS", "0") or 0)
        external = "TORCHELASTIC_RUN_ID" in env or ("SLURM_NTASKS" in env and "SLURM_PROCID" in env)
        hydra_overrides = [str(o) for o in OmegaConf.select(hc, "overrides.hydra", default=[]) or []]
        fixed_dir = any(o.startswith("hydra.run.dir=") for o in hydra_overrides)
        if external and ranks > 1 and not fixed_dir:
            raise ValueError(
                f"{ranks} processes (torchrun / srun) each start this run: pass hydra.run.dir=<one directory> "
                "so every rank writes into the same run dir (e.g. hydra.run.dir=outputs/ddp/$SLURM_JOB_ID)."
            )
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


def _conditions(cfg: DictConfig) -> list[tuple[str, dict[str, Any]]]:
    out, seen = [], set()
    for cond in cfg.get("eval_conditions") or []:
        cond = OmegaConf.to_container(cond, resolve=True) if OmegaConf.is_config(cond) else dict(cond)
        name = condition_name(cond)
        if name in seen or name == BASE_CONDITION:
            raise ValueError(f"eval_conditions: two conditions are called {name!r}; give them distinct names")
        seen.add(name)
        out.append((name, {k: v for k, v in cond.items() if k in CONDITION_KEYS}))
    return out


def _condition_datamodule(cfg: DictConfig, overrides: Mapping[str, Any]):
    dm = instantiate(cfg.data, **dict(overrides))
    dm.setup("test")
    return dm


def resume_checkpoint(cfg: DictConfig, out_dir: Path, env: Mapping[str, str] | None = None) -> str | None:
    """The checkpoint ``trainer.fit`` resumes from.

    ``ckpt_path`` when given. A SLURM job requeued after pre-emption (``SLURM_RESTART_COUNT`` > 0)
    resumes from Lightning's own ``hpc_ckpt_*.ckpt`` when the requeue signal left one (Lightning picks
    it up itself, so ``None``), else from ``checkpoints/last.ckpt`` of the same run dir.
    """
    env = os.environ if env is None else env
    if cfg.get("ckpt_path"):
        return str(cfg.ckpt_path)
    if int(env.get("SLURM_RESTART_COUNT", "0") or 0) > 0:
        if any(out_dir.glob("hpc_ckpt_*.ckpt")):
            return None
        last = out_dir / "checkpoints" / "last.ckpt"
        if last.is_file():
            log.info("requeued SLURM job: resuming from %s", last)
            return str(last)
    return None


# --------------------------------------------------------------------------------- reporting
def metrics_table(results: dict[str, Any]) -> str:
    """A printable table of MAE / RMSE / R² per parameter in physical units."""
    lines = [f"{'parameter':<10}{'unit':<14}{'MAE':>10}{'RMSE':>10}{'R2':>9}"]
    for p in ALL_PARAMS:
        r = results[p]
        lines.append(f"{p.upper():<10}{UNITS[p]:<14}{r['mae']:>10.3f}{r['rmse']:>10.3f}{r['r2']:>9.3f}")
    return "\n".join(lines)


def _describe(cfg: DictConfig) -> dict[str, Any]:
    variant = cfg.get("variant") or {}
    return {
        "model": cfg.model.get("_target_"),
        "encoder": cfg.model.get("encoder"),
        "variant": variant.get("name"),
        "label": variant.get("label"),
        "experiment": cfg.get("experiment_name"),
        "seed": int(cfg.seed),
    }


def _condition_record(cfg: DictConfig, overrides: Mapping[str, Any], results: dict[str, Any]) -> dict[str, Any]:
    data = cfg.data
    record = {
        "eval_corruption": overrides.get("eval_corruption", data.get("eval_corruption")),
        "frame_fraction": overrides.get("frame_fraction", data.get("frame_fraction")),
        "eval_corruption_seed": overrides.get("eval_corruption_seed", data.get("eval_corruption_seed")),
        "test": {p: results[p] for p in ALL_PARAMS},
    }
    for key in ("failed_studies", "failures"):  # the calculation approach reports studies it could not do
        if key in results:
            record[key] = results[key]
    return record


def write_metrics(cfg: DictConfig, out_dir: Path, results: dict[str, Any],
                  conditions: dict[str, tuple[dict[str, Any], dict[str, Any]]], n_test: int,
                  extra: dict[str, Any]) -> dict[str, Any]:
    """``metrics.json`` (+ one ``metrics_<condition>.json`` per condition); returns the summary."""
    summary = {
        "test": {p: results[p] for p in ALL_PARAMS},
        "per_patient_mae": results.get("per_patient_mae", {}),
        "units": UNITS,
        **extra,
        **_describe(cfg),
        "eval_corruption": cfg.data.get("eval_corruption"),
        "frame_fraction": cfg.data.get("frame_fraction"),
        "train_frame_fraction": cfg.data.get("train_frame_fraction"),
        "n_test_patients": n_test,
        **{k: results[k] for k in ("failed_studies", "failures") if k in results},
        "conditions": {name: _condition_record(cfg, ov, res) for name, (ov, res) in conditions.items()},
    }
    for name, (ov, res) in conditions.items():
        record = {"condition": name, **_condition_record(cfg, ov, res),
                  "per_patient_mae": res.get("per_patient_mae", {}), "units": UNITS, **_describe(cfg)}
        _atomic_write_text(out_dir / f"metrics_{name}.json", json.dumps(record, indent=2))
    _atomic_write_text(out_dir / "metrics.json", json.dumps(summary, indent=2))
    return summary


def _log_final(loggers: list, results: dict[str, Any], conditions: dict[str, tuple[dict, dict]],
               step: int) -> None:
    """Condition metrics as ``<condition>/<metric>_<param>`` and the final metrics table (W&B)."""
    rows = [(BASE_CONDITION, results)] + [(name, res) for name, (_ov, res) in conditions.items()]
    for lg in loggers:
        if conditions:
            lg.log_metrics({f"{name}/{k}_{p}": float(res[p][k]) for name, res in rows[1:]
                            for p in ALL_PARAMS for k in ("mae", "rmse", "r2")}, step=step)
        if type(lg).__name__ == "WandbLogger":
            lg.log_table(key="test/metrics", columns=["condition", "parameter", "unit", "mae", "rmse", "r2"],
                         data=[[name, p, UNITS[p], *(res[p][k] for k in ("mae", "rmse", "r2"))]
                               for name, res in rows for p in ALL_PARAMS])
        lg.save()


def _finish_wandb(loggers: list) -> None:
    if any(type(lg).__name__ == "WandbLogger" for lg in loggers):
        import wandb

        if wandb.run is not None:
            wandb.finish()  # one W&B run per multirun job


def _make_loggers(cfg: DictConfig) -> list:
    loggers = [instantiate(lg) for lg in (cfg.get("logger") or {}).values()]
    for lg in loggers:
        if hasattr(lg, "log_hyperparams"):
            lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    return loggers


# --------------------------------------------------------------------------------- the calculation approach
def evaluate_calculation(cfg: DictConfig, baseline: Any, out_dir: Path) -> dict[str, Any]:
    """``model=calc``: no training; the calculation approach on the test split (+ each eval condition)."""
    from stm_dlp.calc_eval import evaluate_studies

    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    zero = is_global_zero_env()
    if zero:
        _atomic_write_text(out_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        datamodule.save_split(out_dir / "split.json")
    loggers = _make_loggers(cfg) if zero else []
    try:
        t0 = time.perf_counter()
        results = evaluate_studies(baseline, datamodule.test_set.studies)
        conditions: dict[str, tuple[dict, dict]] = {}
        for name, overrides in _conditions(cfg):
            dm = _condition_datamodule(cfg, overrides)
            conditions[name] = (overrides, evaluate_studies(baseline, dm.test_set.studies))
        seconds = time.perf_counter() - t0
        if zero:
            write_metrics(cfg, out_dir, results, conditions, len(datamodule.splits["test"]),
                          {"best_checkpoint": None, "epochs": 0, "fit_seconds": 0.0,
                           "method": baseline.method, "eval_seconds": round(seconds, 2)})
            for lg in loggers:
                lg.log_metrics({f"test/{k}_{p}": float(results[p][k]) for p in ALL_PARAMS
                                for k in ("mae", "rmse", "r2")}, step=0)
            _log_final(loggers, results, conditions, step=0)
            _print_results(out_dir, len(datamodule.splits["test"]), results, conditions,
                           f"calculation approach ({baseline.label})")
    finally:
        _finish_wandb(loggers)
    return results


def _print_results(out_dir: Path, n_test: int, results: dict, conditions: dict, what: str) -> None:
    print(f"\nTest metrics of {what} ({n_test} held-out patients, inside the brain mask, "
          f"physical units) — {out_dir}\n" + metrics_table(results), flush=True)
    for name, (_ov, res) in conditions.items():
        print(f"\ncondition {name}:\n" + metrics_table(res), flush=True)


# --------------------------------------------------------------------------------- training
def train(cfg: DictConfig) -> dict[str, Any]:
    """Build everything from ``cfg``, fit, test; returns the test results (physical units)."""
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    check_launch(cfg)
    validate_config(cfg)
    L.seed_everything(int(cfg.seed), workers=True)
    model = instantiate(cfg.model)  # validates model arguments before any data is read
    from stm_dlp.calc_eval import CalcBaseline

    if isinstance(model, CalcBaseline):
        return evaluate_calculation(cfg, model, out_dir)
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    if is_global_zero_env():
        _atomic_write_text(out_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        datamodule.save_split(out_dir / "split.json")
    lit = PerfusionLitModule(model=model, target_scale=datamodule.target_scale(),
                             model_config=OmegaConf.to_container(cfg.model, resolve=True),
                             **OmegaConf.to_container(cfg.lit, resolve=True))
    checkpoint = ModelCheckpoint(dirpath=out_dir / "checkpoints", filename="best-{epoch:03d}",
                                 monitor="val/loss", mode="min", save_last=True, save_top_k=1)
    callbacks = [checkpoint, LearningRateMonitor(logging_interval="epoch")]
    if cfg.trainer.get("enable_progress_bar", True):
        callbacks.append(RichProgressBar())
    loggers = _make_loggers(cfg)
    try:
        trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False,
                              default_root_dir=str(out_dir))
        t0 = time.perf_counter()
        trainer.fit(lit, datamodule=datamodule, ckpt_path=resume_checkpoint(cfg, out_dir), weights_only=True)
        fit_s = time.perf_counter() - t0
        results: dict[str, Any] = {}
        if cfg.get("run_test", True):
            best = checkpoint.best_model_path or None
            trainer.test(lit, datamodule=datamodule, ckpt_path=best, weights_only=True)
            results = dict(lit.test_results)
            conditions: dict[str, tuple[dict, dict]] = {}
            if cfg.get("eval_conditions"):
                # the loggers keep the run's own test/* metrics; conditions are logged under their names
                saved, trainer.loggers = trainer.loggers, []
                try:
                    for name, overrides in _conditions(cfg):
                        trainer.test(lit, datamodule=_condition_datamodule(cfg, overrides), ckpt_path=best,
                                     weights_only=True, verbose=False)
                        conditions[name] = (overrides, dict(lit.test_results))
                finally:
                    trainer.loggers = saved
            if trainer.is_global_zero:
                n_test = len(datamodule.splits["test"])
                write_metrics(cfg, out_dir, results, conditions, n_test,
                              {"best_checkpoint": str(best) if best else None, "epochs": trainer.current_epoch,
                               "fit_seconds": round(fit_s, 2)})
                _print_results(out_dir, n_test, results, conditions, "the model")
                _log_final(trainer.loggers, results, conditions, step=trainer.global_step)
    finally:
        _finish_wandb(loggers)
    return results


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    try:
        with pinned_gpu(cfg):
            results = train(cfg)
    except (StudyError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except pickle.UnpicklingError as exc:  # a checkpoint that weights_only=True refuses
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        print(f"error: {cfg.get('ckpt_path')}: refused to load the checkpoint ({first})", file=sys.stderr)
        sys.exit(2)
    return float(results["cbf"]["mae"]) if results else None


if __name__ == "__main__":
    from stm_dlp.config_check import check_overrides

    try:  # an unknown group option (encoder=foo) gets one line and exit 2 instead of Hydra's traceback
        check_overrides([a for a in sys.argv[1:] if not a.startswith("-")])
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    main()
