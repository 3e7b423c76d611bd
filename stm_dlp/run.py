"""``python -m stm_dlp.run`` — train, then test, one configuration (Hydra main).

Examples::

    python -m stm_dlp.run                           # STM-DLP-LSTM on the embedded phantom, CPU
    python -m stm_dlp.run encoder=mlp_mixer
    python -m stm_dlp.run model=unitobrain
    python -m stm_dlp.run trainer=smoke             # seconds; any configuration
    python -m stm_dlp.run -m experiment=table2      # a whole ablation sweep
    python -m stm_dlp.run ckpt_path=outputs/…/checkpoints/last.ckpt   # resume

Each run writes into its Hydra run dir: ``config.yaml`` (resolved), ``split.json``,
``checkpoints/{best-*,last}.ckpt``, ``metrics.json`` (test metrics in physical units) and CSV logs.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, RichProgressBar
from omegaconf import DictConfig, OmegaConf

from stm_dlp.lit import PerfusionLitModule
from stm_dlp.types import ALL_PARAMS, UNITS, StudyError

log = logging.getLogger("stm_dlp.run")


def _wandb_offline() -> bool:
    """W&B runs offline unless the user is logged in (API key in env or ~/.netrc) and not forced."""
    mode = os.environ.get("WANDB_MODE", "")
    if mode in ("offline", "disabled", "dryrun"):
        return True
    if os.environ.get("WANDB_API_KEY"):
        return False
    netrc = Path.home() / ".netrc"
    return not (netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore"))


if not OmegaConf.has_resolver("wandb_offline"):
    OmegaConf.register_new_resolver("wandb_offline", _wandb_offline)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def check_launch(cfg: DictConfig) -> None:
    """Refuse combinations that cannot work, before any data is read."""
    strategy = str(cfg.trainer.get("strategy", "") or "")
    try:
        multirun = HydraConfig.get().mode.name == "MULTIRUN"
    except ValueError:
        multirun = False
    if multirun and strategy.startswith("ddp") and "SLURM_JOB_ID" not in os.environ:
        raise ValueError(
            "trainer=ddp inside a multirun is refused: Lightning's DDP launcher re-runs the command in "
            "each child and would replay the whole sweep. Run sweeps one job per GPU "
            "(hydra/launcher=joblib_gpu or hydra/launcher=slurm), or run single DDP jobs without -m."
        )


def metrics_table(results: dict[str, Any]) -> str:
    """A printable table of MAE / RMSE / R² per parameter in physical units."""
    lines = [f"{'parameter':<10}{'unit':<14}{'MAE':>10}{'RMSE':>10}{'R2':>9}"]
    for p in ALL_PARAMS:
        r = results[p]
        lines.append(f"{p.upper():<10}{UNITS[p]:<14}{r['mae']:>10.3f}{r['rmse']:>10.3f}{r['r2']:>9.3f}")
    return "\n".join(lines)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Build everything from ``cfg``, fit, test; returns the test results (physical units)."""
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    check_launch(cfg)
    L.seed_everything(int(cfg.seed), workers=True)
    model = instantiate(cfg.model)  # validates model arguments before any data is read
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    trainer_is_zero = int(os.environ.get("LOCAL_RANK", "0")) == 0 and int(os.environ.get("NODE_RANK", "0")) == 0
    if trainer_is_zero:
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
    loggers = [instantiate(lg) for lg in (cfg.get("logger") or {}).values()]
    for lg in loggers:
        if hasattr(lg, "log_hyperparams"):
            lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False,
                          default_root_dir=str(out_dir))
    t0 = time.perf_counter()
    trainer.fit(lit, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"), weights_only=True)
    fit_s = time.perf_counter() - t0
    results: dict[str, Any] = {}
    if cfg.get("run_test", True):
        best = checkpoint.best_model_path or None
        trainer.test(lit, datamodule=datamodule, ckpt_path=best, weights_only=True)
        results = dict(lit.test_results)
        if trainer.is_global_zero:
            summary = {
                "test": {p: results[p] for p in ALL_PARAMS},
                "per_patient_mae": results.get("per_patient_mae", {}),
                "units": UNITS,
                "best_checkpoint": str(best) if best else None,
                "epochs": trainer.current_epoch,
                "fit_seconds": round(fit_s, 2),
                "model": cfg.model.get("_target_"),
                "encoder": cfg.model.get("encoder"),
                "experiment": cfg.get("experiment_name"),
                "eval_corruption": cfg.data.get("eval_corruption"),
                "frame_fraction": cfg.data.get("frame_fraction"),
                "seed": int(cfg.seed),
            }
            _atomic_write_text(out_dir / "metrics.json", json.dumps(summary, indent=2))
            print(f"\nTest metrics ({len(datamodule.splits['test'])} held-out patients, inside the brain mask, "
                  f"physical units) — {out_dir}\n" + metrics_table(results), flush=True)
            for lg in loggers:
                if type(lg).__name__ == "WandbLogger":
                    lg.log_table(key="test/metrics", columns=["parameter", "unit", "mae", "rmse", "r2"],
                                 data=[[p, UNITS[p], *(results[p][k] for k in ("mae", "rmse", "r2"))]
                                       for p in ALL_PARAMS])
    for lg in loggers:
        if type(lg).__name__ == "WandbLogger":
            import wandb

            wandb.finish()  # one W&B run per multirun job
    return results


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    try:
        results = train(cfg)
    except (StudyError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    return float(results["cbf"]["mae"]) if results else None


if __name__ == "__main__":
    main()
