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
``eval_conditions`` (:mod:`stm_dlp.conditions`) tests the best checkpoint again under other data
settings; the main returns the metric named by ``optimized_metric`` (for sweepers).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ProgressBar
from omegaconf import DictConfig, OmegaConf

from stm_dlp.calc_eval import CalcBaseline, evaluate_calculation
from stm_dlp.cli import run_cli
from stm_dlp.conditions import check_conditions, condition_datamodule, conditions
from stm_dlp.config_check import check_overrides, validate_config
from stm_dlp.launch import check_launch, current_hydra, is_global_zero_env, pinned_gpu, resume_checkpoint
from stm_dlp.lit import PerfusionLitModule
from stm_dlp.reporting import log_final, print_results, run_loggers, write_metrics, write_run_files


def train(cfg: DictConfig) -> dict[str, Any]:
    """Build everything from ``cfg``, fit, test; returns the test results (physical units)."""
    out_dir = Path(current_hydra().runtime.output_dir)
    check_launch(cfg)
    check_conditions(cfg)
    validate_config(cfg)
    L.seed_everything(int(cfg.seed), workers=True)
    model = instantiate(cfg.model)  # validates model arguments before any data is read
    if isinstance(model, CalcBaseline):
        return evaluate_calculation(cfg, model, out_dir)
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    if is_global_zero_env():
        write_run_files(cfg, out_dir, datamodule)
    lit = PerfusionLitModule(model=model, target_scale=datamodule.target_scale(),
                             model_config=OmegaConf.to_container(cfg.model, resolve=True),
                             target_spacing_mm=cfg.data.get("target_spacing_mm"),
                             **OmegaConf.to_container(cfg.lit, resolve=True))
    callbacks = [instantiate(cb) for cb in (cfg.get("callbacks") or {}).values() if cb is not None]
    if not cfg.trainer.get("enable_progress_bar", True):  # Lightning refuses a progress bar it is told not to show
        callbacks = [cb for cb in callbacks if not isinstance(cb, ProgressBar)]
    with run_loggers(cfg) as loggers:
        trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False,
                              default_root_dir=str(out_dir))
        t0 = time.perf_counter()
        trainer.fit(lit, datamodule=datamodule, ckpt_path=resume_checkpoint(cfg, out_dir), weights_only=True)
        fit_s = time.perf_counter() - t0
        if not cfg.get("run_test", True):
            return {}
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else None
        best = best or None
        trainer.test(lit, datamodule=datamodule, ckpt_path=best, weights_only=True)
        results = dict(lit.test_results)
        by_condition: dict[str, tuple[dict, dict]] = {}
        saved, trainer.loggers = trainer.loggers, []  # the loggers keep the run's own test/* metrics
        try:
            for name, overrides in conditions(cfg):
                trainer.test(lit, datamodule=condition_datamodule(cfg, overrides), ckpt_path=best,
                             weights_only=True, verbose=False)
                by_condition[name] = (overrides, dict(lit.test_results))
        finally:
            trainer.loggers = saved
        if trainer.is_global_zero:
            n_test = len(datamodule.splits["test"])
            write_metrics(cfg, out_dir, results, by_condition, n_test,
                          {"best_checkpoint": best, "epochs": trainer.current_epoch, "fit_seconds": round(fit_s, 2)})
            print_results(out_dir, n_test, results, by_condition, "the model")
            log_final(trainer.loggers, results, by_condition, step=trainer.global_step)
    return results


def metric_value(results: dict[str, Any], name: str | None) -> float | None:
    """``optimized_metric`` (``test/<metric>_<param>``, e.g. ``test/mae_cbf``) looked up in the results."""
    if not results or not name:
        return None
    metric, _, param = str(name).removeprefix("test/").partition("_")
    if param not in results or metric not in results[param]:
        raise ValueError(f"optimized_metric={name!r} is not a test metric; use test/<mae|rmse|r2>_<cbv|cbf|tmax|mtt>")
    return float(results[param][metric])


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    def _run() -> float | None:
        with pinned_gpu(cfg):
            return metric_value(train(cfg), cfg.get("optimized_metric"))

    return run_cli(_run)


if __name__ == "__main__":
    # an unknown group option (encoder=foo) gets one line and exit 2 instead of Hydra's traceback
    run_cli(check_overrides, [a for a in sys.argv[1:] if not a.startswith("-")])
    main()
