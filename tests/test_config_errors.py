"""Config errors fail at start-up: one line on stderr naming the key and the valid values, exit 2,
before any data is read (no cache folder, no config dump, no split, no checkpoint)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, subprocess_env
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from stm_dlp.config_check import CONF_DIR, ConfigError, check_overrides, config_groups, validate_config

#: override -> substrings the one-line message must contain (the key and every valid value)
CLI_CASES: dict[str, tuple[str, ...]] = {
    "model.encoder=foo": ("model.encoder", "foo", "cnn", "mlp_mixer", "lstm"),
    "model.exchange_layers=7": ("model.exchange_layers", "7", "0, 1, 2, 3"),
    "data.frame_fraction=0": ("data.frame_fraction", "(0, 1]"),
    "data.eval_corruption=bogus": ("data.eval_corruption", "bogus", "none", "noise", "motion", "dropped_frames",
                                   "jittered_framing"),
    "model.order=bogus": ("model.order", "bogus", "spatial_first", "temporal_first", "joint"),
}


def _run(tmp: Path, *overrides: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "stm_dlp.run", "trainer=smoke", f"hydra.run.dir={tmp / 'run'}",
                             *overrides], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=subprocess_env(tmp / "cache"), cwd=REPO)


#: The two ways a command line is refused: a bad value (checked after Hydra composes, in ``train``) and
#: an unknown group option (checked before Hydra runs); one real subprocess each proves the exit status,
#: the single stderr line and that nothing was read or written. The messages themselves are checked
#: in-process below for every case.
CLI_PROBES = ("model.exchange_layers=7", "encoder=foo")


@pytest.fixture(scope="module")
def cli_results(tmp_path_factory):
    """Run both refused command lines (at once) and collect ``(returncode, stderr, tmp)``."""
    procs = {}
    for override in CLI_PROBES:
        tmp = tmp_path_factory.mktemp("cfg")
        procs[override] = (_run(tmp, override), tmp)
    out: dict[str, tuple[int, str, Path]] = {}
    for override, (proc, tmp) in procs.items():
        _stdout, stderr = proc.communicate(timeout=240)
        out[override] = (proc.returncode, stderr, tmp)
    return out


def _assert_nothing_read_or_written(tmp: Path) -> None:
    assert not (tmp / "cache").exists(), "the cache folder was created: data was read before the check"
    run = tmp / "run"
    written = sorted(p.name for p in run.iterdir()) if run.exists() else []
    for name in ("config.yaml", "split.json", "checkpoints", "metrics.json"):
        assert name not in written, f"{name} written before the config was validated"


def test_bad_value_is_one_line_exit_2_before_any_data(cli_results):
    code, stderr, tmp = cli_results["model.exchange_layers=7"]
    lines = stderr.strip().splitlines()
    assert code == 2, stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert "Traceback" not in stderr
    for needle in CLI_CASES["model.exchange_layers=7"]:
        assert needle in lines[0], f"{needle!r} missing from {lines[0]!r}"
    _assert_nothing_read_or_written(tmp)


@pytest.mark.parametrize("override", sorted(CLI_CASES))
def test_bad_value_message_names_the_key_and_the_valid_values(override):
    with pytest.raises(ConfigError) as info:
        validate_config(_compose("trainer=smoke", override))
    msg = str(info.value)
    assert "\n" not in msg
    for needle in CLI_CASES[override]:
        assert needle in msg, f"{needle!r} missing from {msg!r}"


def test_unknown_group_option_is_refused_before_any_data(cli_results):
    """``encoder=foo`` is a config-group choice: ``stm_dlp.run`` checks it with :func:`check_overrides`
    before Hydra composes anything — one line, exit 2, the valid options listed."""
    code, stderr, tmp = cli_results["encoder=foo"]
    assert code == 2 and "Traceback" not in stderr
    assert stderr.strip() == "error: encoder=foo: unknown option; valid values: cnn, lstm, mlp_mixer"
    assert all(o in stderr for o in ("cnn", "lstm", "mlp_mixer")), stderr
    _assert_nothing_read_or_written(tmp)
    with pytest.raises(ConfigError) as info:
        check_overrides(["trainer=smoke", "encoder=foo", "model.encoder=lstm", "hydra.run.dir=x"])
    assert str(info.value) == "encoder=foo: unknown option; valid values: cnn, lstm, mlp_mixer"


def test_check_overrides_accepts_valid_choices_and_sweeps():
    check_overrides(["-m", "encoder=cnn,lstm", "model=unitobrain", "trainer=smoke", "+foo.bar=1",
                     "data.root=/x", "hydra/launcher=slurm", "encoder=choice(cnn,lstm)", "~logger"])
    with pytest.raises(ConfigError, match=r"trainer=tpu: unknown option; valid values: cpu, ddp, gpu, smoke"):
        check_overrides(["-m", "trainer=cpu,tpu"])
    groups = config_groups()
    assert {"data", "model", "encoder", "trainer", "logger"} <= set(groups)
    assert groups["encoder"] == ["cnn", "lstm", "mlp_mixer"]


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


@pytest.mark.parametrize("overrides", [
    (), ("trainer=smoke",), ("model=unitobrain",), ("encoder=cnn",), ("encoder=mlp_mixer", "model.order=joint"),
    ("model.order=temporal_first",), ("model.exchange_layers=0",), ("data.frame_fraction=0.5",),
    ("data.eval_corruption=motion",), ("ckpt_path=last",),
])
def test_valid_configs_pass(overrides):
    validate_config(_compose(*overrides))


def test_every_problem_is_listed_on_one_line(tmp_path):
    cfg = _compose("model.exchange_layers=7", "model.encoder=gru", "data.val_fraction=0.6",
                   "data.test_fraction=0.5", "lit.loss=huber", "data.batch_size=0",
                   f"ckpt_path={tmp_path / 'missing.ckpt'}", "model.time_input=both", "model.order=joint")
    with pytest.raises(ConfigError) as info:
        validate_config(cfg)
    msg = str(info.value)
    assert "\n" not in msg
    for needle in ("model.exchange_layers=7", "model.encoder='gru'", "leaves no training patients",
                   "lit.loss='huber'", "charbonnier", "data.batch_size=0", "missing.ckpt",
                   "model.time_input='both' needs model.order=spatial_first"):
        assert needle in msg, f"{needle!r} not in {msg!r}"


def test_disk_data_needs_an_existing_root(tmp_path):
    with pytest.raises(ConfigError, match="data.root is required"):
        validate_config(_compose("data=dicom"))
    with pytest.raises(ConfigError, match="does not exist or is not a folder"):
        validate_config(_compose("data=dicom", f"data.root={tmp_path / 'nowhere'}"))
    validate_config(_compose("data=dicom", f"data.root={tmp_path}"))


def test_phantom_settings_and_types_are_checked():
    cfg = _compose("data.phantom.frames_min=0", "model.exchange_layers=two", "data.n_patients=2")
    with pytest.raises(ConfigError) as info:
        validate_config(cfg)
    msg = str(info.value)
    assert "frames_min" in msg and "model.exchange_layers='two'" in msg and "data.n_patients=2" in msg
    cfg = _compose()
    with open_dict(cfg):
        cfg.model._target_ = "stm_dlp.models.NoSuchModel"
    with pytest.raises(ConfigError, match="cannot be imported; valid models"):
        validate_config(cfg)
