"""The run configuration: one set of defaults, strict keys, types and ranges."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from shared_model.config import PRESETS, ConfigError, RunConfig

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_defaults_equal_runconfig_defaults() -> None:
    app = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert app == RunConfig().to_run_config()
    assert RunConfig.from_run_config(app) == RunConfig()


def test_presets_name_only_known_keys_and_validate() -> None:
    for name, overrides in PRESETS.items():
        assert RunConfig().replace(**overrides).to_run_config().items() >= overrides.items(), name


@pytest.mark.parametrize("key,value,message", [
    ("epsilon", 0, "epsilon = 0.0: must be > 0"),
    ("epsilon", -1, "epsilon = -1.0: must be > 0"),
    ("epsilon", "abc", "epsilon = 'abc': expected a number"),
    ("epsilon", float("inf"), "expected a finite number"),
    ("delta", 2, "delta = 2.0: must be in (0, 1)"),
    ("batch-size", 0, "batch-size = 0: must be ≥ 1"),
    ("num-server-rounds", 0, "num-server-rounds = 0"),
    ("local-steps", 0, "local-steps = 0"),
    ("max-grad-norm", -1, "max-grad-norm = -1.0"),
    ("accountant", "bogus", "must be one of rdp, prv, gdp"),
    ("dp", "ture", "dp = 'ture': expected true or false"),
    ("dp", 1, "expected true or false"),
    ("seed", 1.5, "expected an integer"),
    ("grad-sample-mode", "magic", "grad-sample-mode"),
    ("no-such-knob", 1, "no-such-knob: unknown key"),
])
def test_bad_values_are_refused_naming_the_key(key: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        RunConfig.from_run_config({key: value})
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_strings_from_the_command_line_are_typed() -> None:
    cfg = RunConfig.from_run_config({"dp": "False", "epsilon": "4", "local-steps": "16", "seed": 7.0})
    assert (cfg.dp, cfg.epsilon, cfg.local_steps, cfg.seed) == (False, 4.0, 16, 7)
    assert isinstance(cfg.epsilon, float) and isinstance(cfg.local_steps, int)


def test_replace_takes_dashed_keys_and_validates() -> None:
    cfg = RunConfig()
    new = cfg.replace(**{"num-server-rounds": 5, "dp": False})
    assert (new.num_server_rounds, new.dp) == (5, False)
    assert cfg.num_server_rounds == 3  # frozen: the original is unchanged
    with pytest.raises(ConfigError, match="delta"):
        cfg.replace(delta=0)
    with pytest.raises(ConfigError, match="unknown key"):
        cfg.replace(num_server_rounds=5)  # underscores are not run-config keys
