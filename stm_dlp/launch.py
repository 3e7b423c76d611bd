"""How a run is launched: one job per GPU on one machine, SLURM task counts, DDP checks, ranks,
resuming, and the W&B names of a run (resolvers of ``conf/logger/wandb.yaml``).

* ``hydra/launcher=joblib_gpu`` runs ``n_jobs = number of visible GPUs`` jobs at once in reused
  joblib (loky) worker processes. A reused worker keeps the CUDA context of its first job, so setting
  ``CUDA_VISIBLE_DEVICES`` per job would only work for the first job of each worker. Instead every job
  takes a free GPU *index* (an exclusive ``flock`` on ``<sweep dir>/.gpu_locks/gpu<i>.lock``, preferring
  ``hydra.job.num % n_gpus``, waiting while all are busy) and runs with ``trainer.devices=[i]`` and
  ``torch.cuda.set_device(i)``. The lock is held until the job ends (a crashed job's lock is released
  by the kernel), so at most one job uses a GPU at any time, whatever order jobs finish in.
* ``hydra/launcher=slurm`` (hydra-submitit-launcher) asks for ``tasks_per_node = trainer.devices``
  (one task per GPU; Lightning's ``SLURMEnvironment`` reads the ranks from SLURM) via the resolvers
  registered here.

Everything that decides is a pure function, tested on a CPU machine.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger("stm_dlp.launch")

GPU_ACCELERATORS = ("gpu", "cuda", "auto")


# --------------------------------------------------------------------------- counting devices
def visible_gpu_count(env: Mapping[str, str] | None = None, probe: bool = True) -> int:
    """GPUs this process may use: ``CUDA_VISIBLE_DEVICES`` when set, else torch's count (0 without CUDA).

    Counting does not initialise CUDA (torch uses NVML), so it is safe in a launcher's parent process.
    """
    env = os.environ if env is None else env
    cvd = env.get("CUDA_VISIBLE_DEVICES")
    if cvd is not None:
        ids = [d.strip() for d in cvd.split(",") if d.strip()]
        # CUDA stops at the first invalid entry (e.g. "-1" hides every GPU)
        n = 0
        for d in ids:
            if d.startswith("-"):
                break
            n += 1
        return n
    if not probe:
        return 0
    try:
        import torch

        return int(torch.cuda.device_count())
    except Exception:  # noqa: BLE001 - no CUDA build, no driver: no GPU
        return 0


def device_count(devices: Any) -> int | None:
    """Processes/devices a Lightning ``devices`` value asks for; ``None`` when it depends on the machine
    (``"auto"``, ``-1``)."""
    if isinstance(devices, (list, tuple)) or OmegaConf.is_list(devices):
        return len(devices)
    if devices is None:
        return None
    text = str(devices).strip()
    if text in ("auto", "-1"):
        return None
    if "," in text:
        return len([d for d in text.split(",") if d.strip()])
    try:
        n = int(text)
    except ValueError:
        return None
    return None if n < 0 else n


def world_size(trainer_cfg: Mapping[str, Any]) -> int | None:
    """Total processes a trainer config starts (devices × nodes); ``None`` when unknown until run time."""
    accelerator = str(trainer_cfg.get("accelerator", "auto"))
    devices = trainer_cfg.get("devices", "auto")
    n = device_count(devices)
    if n is None and accelerator == "cpu" and str(devices) == "auto":
        n = 1  # Lightning: accelerator=cpu, devices=auto → one process
    nodes = int(trainer_cfg.get("num_nodes", 1) or 1)
    return None if n is None else n * nodes


def slurm_tasks_per_node(devices: Any) -> int:
    """``tasks_per_node`` for submitit: one SLURM task per device (Lightning's SLURM DDP contract)."""
    n = device_count(devices)
    if n is None:
        raise ValueError(f"hydra/launcher=slurm needs an explicit trainer.devices (a number), got {devices!r}")
    return max(1, n)


def slurm_gpus_per_node(accelerator: Any, devices: Any) -> int | None:
    """``gpus_per_node`` for submitit: the device count on GPU runs, none for ``accelerator=cpu``."""
    if str(accelerator) == "cpu":
        return None
    return slurm_tasks_per_node(devices)


def register_resolvers() -> None:
    """OmegaConf resolvers used by ``conf/hydra/launcher/*.yaml`` and ``conf/logger/wandb.yaml``, and the
    structured config ``phantom_config`` of ``conf/data/phantom.yaml`` (idempotent)."""
    resolvers = {
        "stm_dlp_n_gpus": lambda: max(1, visible_gpu_count()),
        "stm_dlp_tasks_per_node": slurm_tasks_per_node,
        "stm_dlp_gpus_per_node": slurm_gpus_per_node,
        "wandb_offline": _wandb_offline,
        "stm_dlp_wandb_group": _wandb_group,
        "stm_dlp_wandb_name": _wandb_name,
    }
    for name, fn in resolvers.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)
    # ``conf/data/phantom.yaml`` takes its ``phantom:`` block (fields, types, defaults) from the dataclass
    # itself, so the YAML never restates a default and ``data.phantom.<field>=…`` is type-checked.
    from hydra.core.config_store import ConfigStore

    from stm_dlp.data.phantom import PhantomConfig

    ConfigStore.instance().store(name="phantom_config", node=PhantomConfig)


# --------------------------------------------------------------------------- Hydra run, W&B names
def _wandb_offline() -> bool:
    """W&B runs offline unless the user is logged in (API key in env or ~/.netrc) and not forced."""
    mode = os.environ.get("WANDB_MODE", "")
    if mode in ("offline", "disabled", "dryrun"):
        return True
    if os.environ.get("WANDB_API_KEY"):
        return False
    netrc = Path.home() / ".netrc"
    return not (netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore"))


def current_hydra() -> Any | None:
    """The running Hydra job's config (``HydraConfig``), or ``None`` outside a Hydra main."""
    from hydra.core.hydra_config import HydraConfig

    try:
        return HydraConfig.get()
    except ValueError:
        return None


def is_multirun(hc: Any | None) -> bool:
    """Whether ``hc`` (a Hydra config, or ``None``) belongs to a ``-m`` sweep job."""
    return hc is not None and getattr(hc.mode, "name", str(hc.mode)) == "MULTIRUN"


def sweep_id(hc: Any | None = None) -> str | None:
    """The sweep's identity (its directory name, the launch time by default); ``None`` outside a sweep.

    Taken from the job's resolved output dir minus ``hydra.sweep.subdir``, so every job of a sweep
    agrees even when jobs run in other processes or on other machines.
    """
    hc = current_hydra() if hc is None else hc
    if not is_multirun(hc):
        return None
    out = Path(str(hc.runtime.output_dir))
    depth = len(Path(str(hc.sweep.subdir)).parts)
    return out.parents[depth - 1].name if depth >= 1 else out.name


def _wandb_group(experiment: str) -> str:
    """W&B group: ``<experiment>-<sweep id>`` for a sweep job, ``<experiment>-<run dir>`` for a single run."""
    hc = current_hydra()
    if hc is None:
        return str(experiment)
    sid = sweep_id(hc) or Path(str(hc.runtime.output_dir)).name
    return f"{experiment}-{sid}"


def _wandb_name(label: str, seed: Any) -> str:
    """W&B run name: the variant, the seed and (in a sweep) the job number — never a patient identifier."""
    hc = current_hydra()
    name = f"{label}-seed{seed}"
    if is_multirun(hc):
        name += f"-job{hc.job.num}"
    return name


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
    """
    hc = current_hydra() if hc is None else hc
    env = os.environ if env is None else env
    trainer_cfg = cfg.trainer
    if is_multirun(hc) and _multi_process(trainer_cfg):
        launcher = str(OmegaConf.select(hc, "launcher._target_", default="") or "")
        if "submitit" not in launcher.lower() or "slurm" not in launcher.lower():
            raise ValueError(
                f"a multi-process trainer ({describe_devices(trainer_cfg)}) inside a multirun (-m) is refused: "
                "Lightning's DDP launcher re-runs the command in each child and would replay the whole sweep. "
                "Run sweeps one job per device (trainer=gpu hydra/launcher=joblib_gpu, or trainer.devices=1), "
                "run a single DDP job without -m, or submit DDP sweeps with hydra/launcher=slurm "
                "(one SLURM task per device)."
            )
    if not is_multirun(hc) and hc is not None:
        ranks = int(env.get("WORLD_SIZE", "0") or 0) or int(env.get("SLURM_NTASKS", "0") or 0)
        external = "TORCHELASTIC_RUN_ID" in env or ("SLURM_NTASKS" in env and "SLURM_PROCID" in env)
        hydra_overrides = [str(o) for o in OmegaConf.select(hc, "overrides.hydra", default=[]) or []]
        fixed_dir = any(o.startswith("hydra.run.dir=") for o in hydra_overrides)
        if external and ranks > 1 and not fixed_dir:
            raise ValueError(
                f"{ranks} processes (torchrun / srun) each start this run: pass hydra.run.dir=<one directory> "
                "so every rank writes into the same run dir (e.g. hydra.run.dir=outputs/ddp/$SLURM_JOB_ID)."
            )




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


# --------------------------------------------------------------------------- one job per GPU
def gpu_preference(job_num: int, n_gpus: int) -> list[int]:
    """GPU indices in the order a job tries them: ``job_num % n_gpus`` first, then the next ones."""
    if n_gpus <= 0:
        raise ValueError("gpu_preference needs at least one GPU")
    first = job_num % n_gpus
    return [(first + k) % n_gpus for k in range(n_gpus)]


@contextlib.contextmanager
def gpu_slot(lock_dir: str | Path, n_gpus: int, job_num: int, poll_s: float = 2.0,
             timeout_s: float | None = None) -> Iterator[int]:
    """Hold one GPU index exclusively for the duration of the ``with`` block.

    Tries the indices of :func:`gpu_preference` with a non-blocking ``flock``; when all are busy
    (more concurrent jobs than GPUs) waits ``poll_s`` and tries again (``TimeoutError`` after
    ``timeout_s``). Locks are per open file, so this works between processes and threads alike.
    """
    lock_dir = Path(lock_dir)
    lock_dir.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    waited = False
    while True:
        for i in gpu_preference(job_num, n_gpus):
            fh = open(lock_dir / f"gpu{i}.lock", "a+")  # noqa: SIM115 - closed in finally below
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                fh.close()
                continue
            try:
                fh.seek(0)
                fh.truncate()
                fh.write(f"pid {os.getpid()} job {job_num}\n")
                fh.flush()
                yield i
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
                fh.close()
            return
        if timeout_s is not None and time.monotonic() - start > timeout_s:
            raise TimeoutError(f"no free GPU among {n_gpus} after {timeout_s} s (locks in {lock_dir})")
        if not waited:
            log.info("job %d: all %d GPUs busy, waiting for one", job_num, n_gpus)
            waited = True
        time.sleep(poll_s)


def wants_gpu_pinning(launcher_target: str, multirun: bool, accelerator: Any, n_gpus: int) -> bool:
    """Pin a job to one GPU when a joblib launcher runs a sweep on a machine with GPUs."""
    return (multirun and "joblib" in launcher_target.lower() and n_gpus > 0
            and str(accelerator) in GPU_ACCELERATORS)


def apply_gpu(cfg: DictConfig, index: int) -> None:
    """Point a job's config at GPU ``index`` of the visible ones (trainer and calculation approach)."""
    with open_dict(cfg):
        if str(cfg.trainer.get("accelerator", "auto")) == "auto":
            cfg.trainer.accelerator = "gpu"
        cfg.trainer.devices = [index]
        model = cfg.get("model")
        if model is not None and str(model.get("device", "")) in ("cuda", "auto", "gpu"):
            model.device = f"cuda:{index}"


@contextlib.contextmanager
def pinned_gpu(cfg: DictConfig, hydra_cfg: Any | None = None, n_gpus: int | None = None,
               poll_s: float = 2.0) -> Iterator[int | None]:
    """In a ``joblib`` sweep on a GPU machine: take a free GPU for this job (see module docstring),
    rewrite ``cfg`` to use it, and yield its index; otherwise yield ``None`` and change nothing."""
    hydra_cfg = current_hydra() if hydra_cfg is None else hydra_cfg
    if hydra_cfg is None:
        yield None
        return
    multirun = is_multirun(hydra_cfg)
    target = str(OmegaConf.select(hydra_cfg, "launcher._target_", default="") or "")
    n = visible_gpu_count() if n_gpus is None else n_gpus
    if not wants_gpu_pinning(target, multirun, cfg.trainer.get("accelerator", "auto"), n):
        yield None
        return
    requested = world_size(cfg.trainer)
    if requested not in (None, 1) and device_count(cfg.trainer.get("devices")) != 1:
        # a multi-device job in a joblib sweep is refused by check_launch
        yield None
        return
    job_num = int(hydra_cfg.job.num)
    lock_dir = Path(str(hydra_cfg.sweep.dir)) / ".gpu_locks"
    with gpu_slot(lock_dir, n, job_num, poll_s=poll_s) as index:
        apply_gpu(cfg, index)
        if n_gpus is None:  # a real machine: make "cuda" mean this GPU for non-Lightning code too
            import torch

            if torch.cuda.is_available():
                torch.cuda.set_device(index)
        log.info("job %d runs on GPU %d of %d", job_num, index, n)
        yield index


def describe_devices(trainer_cfg: Mapping[str, Any]) -> str:
    """Human-readable device request, for error messages."""
    return (f"accelerator={trainer_cfg.get('accelerator', 'auto')}, devices={trainer_cfg.get('devices', 'auto')}, "
            f"num_nodes={trainer_cfg.get('num_nodes', 1)}, strategy={trainer_cfg.get('strategy', 'auto')}")


register_resolvers()  # importing this module is enough for configs that use them

__all__: Sequence[str] = (
    "apply_gpu", "check_launch", "device_count", "current_hydra", "is_global_zero_env", "is_multirun",
    "resume_checkpoint", "sweep_id", "gpu_preference", "gpu_slot", "pinned_gpu", "register_resolvers",
    "slurm_gpus_per_node", "slurm_tasks_per_node", "visible_gpu_count", "wants_gpu_pinning", "world_size",
)
