"""The silo-owned privacy policy (issue 11, item 1): the file, the admission rules, the gate
in the real ClientApp handlers, refusal records, and the silo's own secret."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fl_client import client_app
from shared_model.adapters import to_arrays
from shared_model.config import RunConfig
from shared_model.dataset import list_silos, load_catalogue, load_silo
from shared_model.examples import train_user_ids
from shared_model.model import build_model
from shared_model.privacy.admission import Admission, PolicyRefusal, admit, parse_request
from shared_model.privacy.ledger import Ledger, state_root
from shared_model.privacy.policy import (PolicyError, SiloPolicy, load_policy, policy_path, silo_policy,
                                         write_default_policy)
from shared_model.privacy.records import Refusal, read_records
from shared_model.privacy.silo_secret import derive_seed, load_secret, secret_from_seed


# ------------------------------------------------------------------ the file
def test_default_policy_round_trips_and_is_never_overwritten(tmp_path: Path) -> None:
    path = write_default_policy(tmp_path / "s" / "policy.toml")
    policy = load_policy(path)
    assert policy.to_dict() == {"max-epsilon-per-run": 10.0, "max-lifetime-epsilon": 0.0, "max-delta": 1e-5,
                                "allow-non-private": False, "allow-broken-noise-audit": False, "accountant": "rdp",
                                "release-metrics": "dp", "metric-epsilon-share": 0.3}
    path.write_text("max-epsilon-per-run = 3\n")
    assert write_default_policy(path, allow_non_private=True) == path
    assert load_policy(path).max_epsilon_per_run == 3.0 and not load_policy(path).allow_non_private
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    permissive = load_policy(write_default_policy(tmp_path / "t" / "policy.toml", allow_non_private=True))
    assert permissive.allow_non_private and permissive.max_epsilon_per_run == 10.0


@pytest.mark.parametrize("text, message", [
    ("max-delta = 2\n", r"policy.toml: max-delta: must be in \(0, 1\)"),
    ("max-epsilon-per-run = 0\n", r"policy.toml: max-epsilon-per-run: must be > 0"),
    ("max-lifetime-epsilon = -1\n", r"policy.toml: max-lifetime-epsilon: must be ≥ 0"),
    ('accountant = "gdp"\n', r"policy.toml: accountant: gdp is refused: it is an approximation"),
    ('accountant = "xyz"\n', r"policy.toml: accountant: must be one of rdp, prv"),
    ('allow-non-private = "yes"\n', r"policy.toml: allow-non-private: expected true or false"),
    ("max-epsilon = 3\n", r"policy.toml: max-epsilon: unknown key"),
    ('release-metrics = "noisy"\n', r"policy.toml: release-metrics: must be one of none, dp, plain"),
    ("metric-epsilon-share = 1.0\n", r"policy.toml: metric-epsilon-share: must be in \(0, 1\)"),
    ("max-delta = \n", r"policy.toml: not valid TOML: .*line 1"),
])
def test_bad_policy_is_one_line_naming_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "policy.toml").write_text(text)
    with pytest.raises(PolicyError, match=message) as err:
        load_policy(tmp_path / "policy.toml")
    assert "\n" not in str(err.value) and str(tmp_path / "policy.toml") in str(err.value)


def test_missing_policy_is_an_error_and_paths_come_from_the_node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(PolicyError, match="cannot read the policy"):
        load_policy(tmp_path / "nope.toml")
    assert policy_path(tmp_path, "s1", {}) == tmp_path.resolve() / "s1" / "policy.toml"
    assert policy_path(tmp_path, "s1", {"policy": str(tmp_path / "x.toml")}) == (tmp_path / "x.toml").resolve()
    # an explicit policy must exist; the default one is written on first use
    with pytest.raises(PolicyError):
        silo_policy(tmp_path, "s1", {"policy": str(tmp_path / "x.toml")})
    assert silo_policy(tmp_path, "s1", {}) == load_policy(tmp_path / "s1" / "policy.toml")
    monkeypatch.setenv("FEDSHIFT_STATE", str(tmp_path / "env"))
    assert state_root({}) == (tmp_path / "env").resolve()
    assert state_root({"state-dir": str(tmp_path / "node")}) == (tmp_path / "node").resolve()
    assert "state-dir" not in RunConfig.keys()


# ------------------------------------------------------------------ the rules
@pytest.mark.parametrize("request_, rule", [
    ({"dp": False}, "non-private"),
    ({"epsilon": 10.5}, "max-epsilon-per-run"),
    ({"epsilon": 1000.0}, "max-epsilon-per-run"),
    ({"delta": 1e-4}, "max-delta"),
    ({"accountant": "gdp"}, "accountant"),
    ({"accountant": "prv"}, "accountant"),
    ({"audit-broken-noise": True}, "broken-noise-audit"),
])
def test_default_policy_refuses(request_: dict, rule: str) -> None:
    cfg = RunConfig().replace(**request_)
    decision = admit(SiloPolicy(), cfg, num_users=1000)
    assert isinstance(decision, PolicyRefusal) and decision.rule == rule, decision


def test_requests_that_do_not_parse_are_refusals_not_crashes() -> None:
    for bad in ({"delta": 2}, {"state-dir": "/tmp/empty"}, {"epsilon": "abc"}):
        decision = parse_request(bad)
        assert isinstance(decision, PolicyRefusal) and decision.rule == "run-config", decision


def test_delta_below_one_over_n_and_lifetime_caps() -> None:
    cfg = RunConfig()
    assert isinstance(admit(SiloPolicy(), cfg, num_users=99_999), Admission)
    refused = admit(SiloPolicy(), cfg, num_users=100_000)
    assert isinstance(refused, PolicyRefusal) and refused.rule == "delta-below-1/n"
    capped = SiloPolicy(max_lifetime_epsilon=20.0)
    for asked in (0.0, 25.0):  # no cap, or a cap above the policy's
        d = admit(capped, cfg.replace(**{"silo-lifetime-epsilon": asked}), 10)
        assert isinstance(d, PolicyRefusal) and d.rule == "max-lifetime-epsilon"
    ok = admit(capped, cfg.replace(**{"silo-lifetime-epsilon": 15.0}), 10)
    assert isinstance(ok, Admission) and ok.lifetime_cap == 15.0
    assert admit(SiloPolicy(), cfg.replace(**{"silo-lifetime-epsilon": 5.0}), 10).lifetime_cap == 5.0  # type: ignore[union-attr]
    assert admit(SiloPolicy(), cfg, 10).lifetime_cap == 0.0  # type: ignore[union-attr]
    permissive = SiloPolicy(allow_non_private=True, allow_broken_noise_audit=True, accountant="prv")
    assert isinstance(admit(permissive, cfg.replace(dp=False)), Admission)
    assert isinstance(admit(permissive, cfg.replace(**{"audit-broken-noise": True, "accountant": "prv"}), 10), Admission)


# ------------------------------------------------------------------ the gate in the real handlers
def _message(cfg: RunConfig, rnd: int, kind: str = "train") -> Message:
    model = build_model(cfg, num_categories=4)
    return Message(content=RecordDict({"arrays": to_arrays(model), "config": ConfigRecord({"server-round": rnd})}),
                   dst_node_id=7, message_type=kind)


@pytest.fixture()
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("_run_id", 1), ("_node_id", 7), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, value)


REFUSED = [
    ({"delta": 2}, "run-config"),
    ({"accountant": "gdp"}, "accountant"),
    ({"audit-broken-noise": True}, "broken-noise-audit"),
    ({"dp": False}, "non-private"),
    ({"epsilon": 50.0}, "max-epsilon-per-run"),
    ({"silo-lifetime-epsilon": 0.0}, "max-lifetime-epsilon"),  # with a policy that caps lifetime ε
    ({"state-dir": "/tmp/elsewhere"}, "run-config"),
]


@pytest.mark.parametrize("asked, rule", REFUSED)
def test_every_silo_refuses_with_a_record_before_touching_data(
    small_dataset: Path, tiny_bert: Path, cache_dir: Path, tmp_path: Path, task_identity: None,
    monkeypatch: pytest.MonkeyPatch, asked: dict, rule: str,
) -> None:
    import fl_client.silo_round as silo_round

    def no_data(*_a: object, **_k: object) -> None:
        raise AssertionError("a refused request opened the silo's data")

    monkeypatch.setattr(silo_round, "open_silo", no_data)
    base = {"dataset": str(small_dataset), "base-model": str(tiny_bert)}
    request = {**RunConfig.from_run_config(base).to_run_config(), **asked}
    silos = list_silos(small_dataset)
    for pid, silo in enumerate(silos):
        root = tmp_path / "state"
        if rule == "max-lifetime-epsilon":
            (root / silo).mkdir(parents=True, exist_ok=True)
            (root / silo / "policy.toml").write_text("max-lifetime-epsilon = 30.0\n")
        node = {"partition-id": pid, "state-dir": str(root)}
        ctx = Context(run_id=5, node_id=7, node_config=node, state=RecordDict(), run_config=request)
        reply = client_app.train(_message(RunConfig.from_run_config(base), 1), ctx)
        assert reply.content["status"]["status"] == "refused"
        assert reply.content["status"]["rule"] == rule
        assert reply.content["status"]["reason"] == reply.content["ledger"]["reason"]
        assert reply.content["metrics"]["num-examples"] == 0
        sent = dict(reply.content["ledger"])
        assert sent["kind"] == "refusal" and sent["rule"] == rule and sent["silo"] == silo
        on_ledger = read_records(Ledger(root / silo / "ledger.jsonl"))
        assert len(on_ledger) == 1 and isinstance(on_ledger[0], Refusal)
        refusal = on_ledger[0]
        assert refusal.rule == rule and refusal.run_id == "5" and refusal.round == 1
        assert refusal.policy == str((root / silo / "policy.toml").resolve())
        assert refusal.policy_sha256 == load_policy(root / silo / "policy.toml").sha256
        shown = json.loads(refusal.request or "{}")
        for key, value in asked.items():
            assert (key in shown.get("unknown-keys", [])) if key == "state-dir" else shown[key] == value
        ev = client_app.evaluate(_message(RunConfig.from_run_config(base), 1, "evaluate"), ctx)
        assert ev.content["status"]["status"] == "refused" and ev.content["metrics"]["num-examples"] == 0
        assert len(read_records(Ledger(root / silo / "ledger.jsonl"))) == 1  # evaluation adds no record


def test_unreadable_policy_refuses_and_never_widens(small_dataset: Path, tiny_bert: Path, cache_dir: Path,
                                                    tmp_path: Path, task_identity: None) -> None:
    base = RunConfig.from_run_config({"dataset": str(small_dataset), "base-model": str(tiny_bert)})
    silo = list_silos(small_dataset)[0]
    (tmp_path / silo).mkdir()
    (tmp_path / silo / "policy.toml").write_text("allow-non-private = yes please\n")
    ctx = Context(run_id=5, node_id=7, node_config={"partition-id": 0, "state-dir": str(tmp_path)},
                  state=RecordDict(), run_config=base.replace(dp=False).to_run_config())
    reply = client_app.train(_message(base, 1), ctx)
    assert reply.content["status"]["status"] == "refused"
    assert reply.content["ledger"]["rule"] == "policy"
    assert "policy.toml: not valid TOML" in str(reply.content["ledger"]["reason"])


def test_delta_rule_counts_the_silos_training_users(small_dataset: Path, tiny_bert: Path, cache_dir: Path,
                                                    tmp_path: Path, task_identity: None) -> None:
    """δ must be below 1/n: a policy allowing δ up to 0.5 still refuses δ ≥ 1/n of the silo's users."""
    silo = list_silos(small_dataset)[0]
    n = len(train_user_ids(load_silo(small_dataset / "silos" / silo, load_catalogue(small_dataset))))
    (tmp_path / silo).mkdir()
    (tmp_path / silo / "policy.toml").write_text("max-delta = 0.5\n")
    base = RunConfig.from_run_config({"dataset": str(small_dataset), "base-model": str(tiny_bert),
                                      "delta": min(0.45, 1.5 / n)})
    ctx = Context(run_id=5, node_id=7, node_config={"partition-id": 0, "state-dir": str(tmp_path)},
                  state=RecordDict(), run_config=base.to_run_config())
    reply = client_app.train(_message(base, 1), ctx)
    assert reply.content["ledger"]["rule"] == "delta-below-1/n", dict(reply.content["status"])
    assert f"n = {n} training users" in str(reply.content["ledger"]["reason"])


# ------------------------------------------------------------------ the silo's own randomness
def test_secret_file_is_private_stable_and_seeds_ignore_the_run_seed(tmp_path: Path) -> None:
    secret = load_secret(tmp_path, "s1", {})
    path = tmp_path / "s1" / "secret"
    assert len(secret) == 32 and stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert load_secret(tmp_path, "s1", {}) == secret  # created once, then read
    assert load_secret(tmp_path, "s2", {}) != secret
    assert load_secret(tmp_path, "s1", {"silo-secret": "ab" * 16}) == bytes.fromhex("ab" * 16)
    a, b = secret_from_seed(1, "s1"), secret_from_seed(2, "s1")
    assert a == secret_from_seed(1, "s1") and a != b and a != secret_from_seed(1, "s2")
    assert derive_seed(a, 7, "s1", 1, "train") == derive_seed(a, 7, "s1", 1, "train")
    seeds = {derive_seed(k, 7, "s1", r, "train") for k in (a, b) for r in (1, 2)}
    assert len(seeds) == 4


def test_simulate_prepares_each_silos_policy_and_secret(tmp_path: Path) -> None:
    from fedshift.simulation import prepare_silo_state

    prepare_silo_state(tmp_path, ["a", "b"], silo_seed=3)
    assert load_policy(tmp_path / "a" / "policy.toml") == SiloPolicy(source=str(tmp_path / "a" / "policy.toml"))
    assert (tmp_path / "a" / "secret").read_bytes() == secret_from_seed(3, "a")
    prepare_silo_state(tmp_path, ["a", "c"], allow_non_private=True, silo_seed=4)  # existing ones are kept
    assert not load_policy(tmp_path / "a" / "policy.toml").allow_non_private
    assert (tmp_path / "a" / "secret").read_bytes() == secret_from_seed(3, "a")
    assert load_policy(tmp_path / "c" / "policy.toml").allow_non_private
    (tmp_path / "a" / "policy.toml").write_text("max-delta = 2\n")
    with pytest.raises(PolicyError, match="policy.toml: max-delta: must be in"):
        prepare_silo_state(tmp_path, ["a"])


# ------------------------------------------------------------------ bad input at the CLI
def _cli(*args: str) -> "subprocess.CompletedProcess[str]":
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "fedshift.cli", *args], capture_output=True, text=True,
                          timeout=300, check=False)


def test_unreadable_policy_is_one_line_exit_2_at_the_cli(small_dataset: Path, tmp_path: Path) -> None:
    silo = list_silos(small_dataset)[0]
    state = tmp_path / "state"
    (state / silo).mkdir(parents=True)
    (state / silo / "policy.toml").write_text("max-delta = 2\n")
    proc = _cli("simulate", "--dataset", str(small_dataset), "--out", str(tmp_path / "out"), "--state-dir", str(state))
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stderr.strip() == f"fedshift simulate: {state / silo / 'policy.toml'}: max-delta: must be in (0, 1), got 2"
    assert not (state / silo / "ledger.jsonl").exists()
    # the audit reads every silo's policy too
    run = tmp_path / "run"
    (run / "silo-state" / silo).mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps({"run": {"run-id": 1}}))
    (run / "silo-state" / silo / "policy.toml").write_text("accountant = 'gdp'\n")
    proc = _cli("audit", str(run))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith(f"fedshift audit: {run / 'silo-state' / silo / 'policy.toml'}: accountant: gdp")
    assert len(proc.stderr.strip().splitlines()) == 1
