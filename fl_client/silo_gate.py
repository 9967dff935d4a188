"""The silo's gate: the run config is a request, and the silo's own policy decides.

:func:`open_gate` runs before a handler touches data. It finds the silo's state root (node
config ``state-dir``, ``$FEDSHIFT_STATE`` or ``~/.local/share/fedshift``, never the run
config), reads its policy (:mod:`shared_model.privacy.policy`), parses the request and
admits it (:mod:`shared_model.privacy.admission`). The only data it reads is the silo's
number of training users, for the δ < 1/n rule, and only after every other rule passed.

A refused request becomes a :class:`Gate` with a ``refusal``; :func:`refuse_round` writes the
refusal record (what was asked, the rule, the policy) to the silo's ledger. A policy file
that cannot be read refuses too (rule ``policy``), so an operator's typo never widens
what a silo allows.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fl_client.task import resolve_silo_dir
from shared_model.config import ConfigError, RunConfig
from shared_model.privacy.admission import Admission, PolicyRefusal, admit, parse_request, requested
from shared_model.privacy.ledger import LEDGER_NAME, Ledger, state_root
from shared_model.privacy.ledger_signatures import silo_signer
from shared_model.privacy.policy import PolicyError, SiloPolicy, policy_path, silo_policy
from shared_model.privacy.records import Refusal, write_record
from shared_model.privacy.silo_secret import SecretError, load_secret

log = logging.getLogger("fedshift.client")


@dataclass
class Gate:
    """A silo's decision on one request: the config and policy when admitted, else the refusal."""

    silo: str
    root: Path
    ledger: Ledger
    request: str  # requested(run_config)
    policy_file: Path
    policy: SiloPolicy | None = None
    cfg: RunConfig | None = None
    lifetime_cap: float = 0.0
    release_metrics: str = "none"  # what metrics may leave (admission.release_mode)
    metric_epsilon_share: float = 0.0
    secret: bytes | None = None
    refusal: PolicyRefusal | None = None

    @property
    def admitted(self) -> bool:
        return self.refusal is None


def _silo_name(parsed: RunConfig | PolicyRefusal, run_config: Mapping[str, Any], node_config: Mapping[str, Any]) -> str:
    """The silo's name; from node config alone when the request does not parse."""
    if isinstance(parsed, RunConfig):
        return resolve_silo_dir(parsed, dict(node_config)).name
    try:
        dataset = run_config.get("dataset", "")
        return resolve_silo_dir(RunConfig(dataset=dataset if isinstance(dataset, str) else ""), dict(node_config)).name
    except (ConfigError, ValueError, OSError):
        return f"node-partition-{node_config.get('partition-id', 'unknown')}"


def open_gate(run_config: Mapping[str, Any], node_config: Mapping[str, Any], count_users: Any = None) -> Gate:
    """Decide on ``run_config``; ``count_users(cfg) -> int`` counts the silo's training users
    (called only once the other rules passed)."""
    root = state_root(node_config)
    parsed = parse_request(run_config)
    silo = _silo_name(parsed, run_config, node_config)
    gate = Gate(silo, root, Ledger(root / silo / LEDGER_NAME, signer=silo_signer(root, silo)), requested(run_config),
                policy_path(root, silo, node_config))
    try:
        gate.policy = silo_policy(root, silo, node_config)
    except PolicyError as exc:
        gate.refusal = PolicyRefusal("policy", f"the silo's policy cannot be used: {exc}")
        return gate
    if isinstance(parsed, PolicyRefusal):
        gate.refusal = parsed
        return gate
    decision = admit(gate.policy, parsed)
    if isinstance(decision, Admission) and count_users is not None and parsed.dp:
        decision = admit(gate.policy, parsed, num_users=int(count_users(parsed)))
    if isinstance(decision, PolicyRefusal):
        gate.refusal = decision
        return gate
    gate.cfg, gate.lifetime_cap = decision.cfg, decision.lifetime_cap
    gate.release_metrics, gate.metric_epsilon_share = decision.release_metrics, decision.metric_epsilon_share
    try:
        gate.secret = load_secret(root, silo, node_config)
    except (SecretError, OSError) as exc:
        gate.cfg, gate.refusal = None, PolicyRefusal("silo-secret", f"the silo's secret cannot be used: {exc}")
    return gate


def refuse_round(gate: Gate, run_id: int | str, server_round: int) -> dict[str, Any]:
    """Write the gate's refusal to the silo's ledger; returns the line as written."""
    assert gate.refusal is not None
    log.warning("silo %s: refusing run %s round %d: %s (%s)", gate.silo, run_id, server_round,
                gate.refusal.reason, gate.refusal.rule)
    return write_record(gate.ledger, Refusal(
        run_id=str(run_id), silo=gate.silo, round=int(server_round), rule=gate.refusal.rule,
        reason=gate.refusal.reason, request=gate.request, policy=str(gate.policy_file),
        policy_sha256=gate.policy.sha256 if gate.policy else None,
        time=datetime.now(timezone.utc).isoformat(timespec="seconds")))
