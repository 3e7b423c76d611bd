"""Shared fixtures: tiny phantoms so the suite stays fast on a 2-core CPU."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

import stm_dlp.launch  # noqa: F401 - registers the config resolvers and structured configs compose() needs

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

#: The repository root (subprocesses run there).
REPO = Path(__file__).resolve().parent.parent


def tiny_phantom(**overrides: Any):
    """A :class:`~stm_dlp.data.phantom.PhantomConfig` small enough for a fast test (16², 2 slices,
    6 frames, 1 HU), with ``overrides`` on top."""
    from stm_dlp.data.phantom import PhantomConfig

    fields = dict(height=16, width=16, n_slices=2, frames_min=6, frames_max=6, noise_hu=1.0)
    return PhantomConfig(**{**fields, **overrides})


def subprocess_env(cache: str | Path | None = None, **extra: str) -> dict[str, str]:
    """The environment of a test's ``python -m …`` subprocess: W&B disabled, warnings quiet, and its own
    preprocessing cache when ``cache`` is given."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "WANDB_MODE": "disabled", **extra}
    if cache is not None:
        env["STM_DLP_CACHE"] = str(cache)
    return env


@pytest.fixture(scope="session")
def tiny_cfg():
    return tiny_phantom(height=24, width=24, frames_min=12, frames_max=16)


@pytest.fixture(scope="session")
def tiny_study(tiny_cfg):
    from stm_dlp.data.phantom import simulate_patient

    return simulate_patient(tiny_cfg, seed=3)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Every test gets its own preprocessing cache."""
    monkeypatch.setenv("STM_DLP_CACHE", str(tmp_path / "cache"))
