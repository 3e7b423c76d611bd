"""Shared fixtures: tiny phantoms so the suite stays fast on a 2-core CPU."""

from __future__ import annotations

import os

import pytest

import stm_dlp.launch  # noqa: F401 - registers the config resolvers and structured configs compose() needs

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(scope="session")
def tiny_cfg():
    from stm_dlp.data.phantom import PhantomConfig

    return PhantomConfig(height=24, width=24, n_slices=2, frames_min=12, frames_max=16, noise_hu=1.0)


@pytest.fixture(scope="session")
def tiny_study(tiny_cfg):
    from stm_dlp.data.phantom import simulate_patient

    return simulate_patient(tiny_cfg, seed=3)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Every test gets its own preprocessing cache."""
    monkeypatch.setenv("STM_DLP_CACHE", str(tmp_path / "cache"))
