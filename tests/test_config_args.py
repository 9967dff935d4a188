"""The one ``--set KEY=VALUE`` parser: values typed by the RunConfig field, unknown keys and bad
values refused with one line and exit 2 before anything is created (simulate, experiment,
audit); and the experiment's help and notes generated from its presets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedshift.cli import main
from fedshift.config_args import SetError, parse_set
from shared_model.config import RunConfig


def test_values_are_typed_by_the_field() -> None:
    got = parse_set(["epsilon=4", "local-steps=16", "dp=false", "accountant='prv'", "lora-dropout=0.1",
                     "history-features=TRUE", "epsilon=2"])
    assert got == {"epsilon": 2.0, "local-steps": 16, "dp": False, "accountant": "prv", "lora-dropout": 0.1,
                   "history-features": True}
    assert type(got["epsilon"]) is float and type(got["local-steps"]) is int
    assert parse_set(None) == {}


@pytest.mark.parametrize("item, message", [
    ("bogus=1", "--set bogus: unknown key"),
    ("extra=1", "--set extra: unknown key"),
    ("dp=ture", "--set dp=ture: expected true or false"),
    ("epsilon=abc", "--set epsilon=abc: expected a number"),
    ("local-steps=2.5", "--set local-steps=2.5: expected an integer"),
    ("epsilon", "--set expects KEY=VALUE"),
])
def test_bad_items_raise_one_line(item: str, message: str) -> None:
    with pytest.raises(SetError) as e:
        parse_set([item])
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


@pytest.mark.parametrize("item", ["epsilon=abc", "dp=ture", "bogus=1"])
def test_simulate_refuses_before_creating_the_run_folder(item: str, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert main(["simulate", "--out", str(out), "--set", item]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fedshift simulate: --set ") and len(err.splitlines()) == 1
    assert not out.exists()


def test_experiment_refuses_unknown_and_per_run_keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "exp"
    assert main(["experiment", "--out", str(out), "--set", "lr=1"]) == 2
    assert main(["experiment", "--out", str(out), "--set", "epsilon=1"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == ["fedshift experiment: --set lr: unknown key (known: the keys of pyproject.toml "
                   "[tool.flwr.app.config])", "fedshift experiment: --set epsilon: set by the experiment for each run"]
    assert not out.exists()


def test_experiment_set_reaches_the_plan(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["experiment", "--preset", "paper", "--dry-run", "--out", str(tmp_path),
                 "--set", "local-steps=4"]) == 0
    assert "5 rounds × 4 local steps × batch 512" in capsys.readouterr().out


def test_audit_refuses_an_unknown_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "metrics.json").write_text(json.dumps({"run": {"config": RunConfig().to_run_config()}}))
    assert main(["audit", str(tmp_path), "--canaries", "4", "--set", "bogus=1"]) == 2
    assert capsys.readouterr().err.startswith("fedshift audit: --set bogus: unknown key")
    assert not (tmp_path / "audit-canaries").exists()


def test_experiment_help_quotes_the_presets(capsys: pytest.CaptureFixture[str]) -> None:
    from simulations.experiment.plan import EXPERIMENT_PRESETS

    with pytest.raises(SystemExit):
        main(["experiment", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for preset in EXPERIMENT_PRESETS.values():
        cfg = preset.config()
        assert (f"× {cfg.local_steps} local steps × batch {cfg.batch_size} per silo" in text
                and f"{preset.bootstrap} bootstrap resamples" in text), preset.name
    assert "5 rounds × 20 local steps" in text  # the paper preset today


def test_report_methods_follow_the_document() -> None:
    from simulations.experiment.report import method_lines

    doc = {"training": {"num-server-rounds": 2, "local-steps": 5, "batch-size": 8, "max-seq-len": 32},
           "methods": {"most-popular": {"family": "baseline", "epsilon": None},
                       "federated-dp-eps1": {"family": "federated-dp", "epsilon": 1.0},
                       "federated-dp-eps4": {"family": "federated-dp", "epsilon": 4.0}}}
    lines = method_lines(doc)
    assert len(lines) == 2 and "`most-popular`" in lines[0]
    assert "ε ∈ {1, 4}" in lines[1] and "2 rounds × 5 local steps × batch 8" in lines[1]
    assert not any("nonprivate" in line or "lopo" in line for line in lines)


def test_the_cli_parser_imports_no_ml_library() -> None:
    """``fedshift COMMAND --help`` and every refusal of a bad flag answer before torch,
    transformers, flwr, opacus or peft load (seconds on a small machine); each command
    imports what it needs when it runs. Checked in a fresh interpreter."""
    import subprocess
    import sys

    code = ("import sys; from fedshift.cli import build_parser; build_parser(); "
            "print(','.join(m for m in ('torch', 'transformers', 'flwr', 'opacus', 'peft') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert proc.stdout.strip() == "", proc.stdout


def test_run_config_files_are_toml_for_any_path(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A dataset path with a non-BMP character, a quote, a backslash, a newline or U+007F still
    writes a run-config file that TOML reads back unchanged (json.dumps wrote surrogate pairs)."""
    import tomllib

    from fedshift.flower_processes import write_run_config

    config = {"dataset": "/data/🛒 shop \"eu\"\\x\nend\x7f\t", "epsilon": 8.0, "delta": 1e-05, "local-steps": 20,
              "dp": True, "inf": float("inf")}
    path = write_run_config(config, tmp_path / "run.toml")
    assert tomllib.loads(path.read_text()) == config
    assert "\\ud83d" not in path.read_text()
