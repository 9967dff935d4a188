"""Admission: does a silo's policy allow what a run asks? Checked before any data is touched.

The run config is a request from whoever submitted the run. :func:`admit` parses it
(a request that does not parse, e.g. ``delta=2`` or an unknown key, is refused too, never
a crash) and applies the policy's rules in this order; the first that fails refuses, as a
:class:`PolicyRefusal` naming the rule:

=========================  ===============================================================
``run-config``             the request does not parse (unknown key, wrong type or range)
``non-private``            ``dp=false`` and the policy does not set ``allow-non-private``
``broken-noise-audit``     ``audit-broken-noise=true`` and the policy does not allow it
``accountant``             the request's accountant is not the policy's (gdp never is one)
``max-epsilon-per-run``    the run's ε budget is above the policy's
``max-delta``              the run's δ is above the policy's
``delta-below-1/n``        the run's δ is not below 1/n, n = the silo's training users
``max-lifetime-epsilon``   the policy caps lifetime ε and the request asks for no cap (0)
                           or a larger one
=========================  ===============================================================

A different accountant is refused rather than silently replaced by the policy's: the ε
the server asked for, the noise the silo calibrates and the ε on the ledger then always
name one accountant, and a mismatch is visible in the refusal instead of hidden.

A request the policy admits still meets the budget rules of
:mod:`shared_model.privacy.budget` every round, with the lifetime cap of :class:`Admission`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from shared_model.config import ConfigError, RunConfig
from shared_model.privacy.policy import RELEASE_MODES, SiloPolicy

#: Run-config keys a refusal record repeats (what was asked, privacy-wise).
REQUEST_KEYS = ("dp", "epsilon", "delta", "accountant", "silo-lifetime-epsilon", "audit-broken-noise", "release-metrics",
                "num-server-rounds", "local-steps", "batch-size", "max-grad-norm", "resume-run-id", "popularity-prior",
                "popularity-epsilon-share", "popularity-max-items", "transitions", "transition-epsilon-share",
                "transition-max-pairs", "transition-neighbours", "transition-popular")


@dataclass(frozen=True)
class PolicyRefusal:
    rule: str
    reason: str


@dataclass(frozen=True)
class Admission:
    """An admitted request: the parsed config, the lifetime ε cap that applies (0 = none) and
    what metrics may leave (:func:`release_mode`)."""

    cfg: RunConfig
    lifetime_cap: float
    release_metrics: str = "dp"
    metric_epsilon_share: float = 0.3


def release_mode(policy: SiloPolicy, cfg: RunConfig) -> str:
    """The more private of the policy's ``release-metrics`` and the request's (none < dp < plain);
    without DP there is no accountant to compose a ``dp`` release in, so ``dp`` becomes ``none``."""
    mode = min(policy.release_metrics, cfg.release_metrics, key=RELEASE_MODES.index)
    return "none" if mode == "dp" and not cfg.dp else mode


def requested(run_config: Mapping[str, Any]) -> str:
    """The privacy-relevant part of a request as compact JSON (for the refusal record);
    keys the request does not set are left out, unknown keys are listed by name."""
    asked = {k: run_config[k] for k in REQUEST_KEYS if k in run_config}
    unknown = sorted(k for k in run_config if k not in RunConfig.keys())
    if unknown:
        asked["unknown-keys"] = unknown
    return json.dumps({k: v if isinstance(v, (bool, int, float, list)) else str(v) for k, v in asked.items()},
                      sort_keys=True, separators=(",", ":"))


def parse_request(run_config: Mapping[str, Any]) -> RunConfig | PolicyRefusal:
    try:
        return RunConfig.from_run_config(dict(run_config))
    except ConfigError as exc:
        return PolicyRefusal("run-config", f"the run config does not parse: {exc}")


def admit(policy: SiloPolicy, cfg: RunConfig, num_users: int | None = None) -> Admission | PolicyRefusal:
    """Admit ``cfg`` under ``policy`` (``num_users``: the silo's training users, for δ < 1/n;
    None skips that rule, for checks made before the silo is opened)."""
    where = f"policy {policy.source or '(default)'}"
    if not cfg.dp:
        if not policy.allow_non_private:
            return PolicyRefusal("non-private", f"dp=false asks for training without differential privacy; "
                                 f"{where} has allow-non-private = false")
        return Admission(cfg, 0.0, release_mode(policy, cfg), policy.metric_epsilon_share)
    if cfg.audit_broken_noise and not policy.allow_broken_noise_audit:
        return PolicyRefusal("broken-noise-audit", "audit-broken-noise=true asks for training with σ=0; "
                             f"{where} has allow-broken-noise-audit = false")
    if cfg.accountant != policy.accountant:
        extra = " (gdp is an approximation, not an upper bound on ε)" if cfg.accountant == "gdp" else ""
        return PolicyRefusal("accountant", f"accountant={cfg.accountant} asked{extra}; {where} enforces the "
                             f"budget with {policy.accountant}")
    if cfg.epsilon > policy.max_epsilon_per_run:
        return PolicyRefusal("max-epsilon-per-run", f"epsilon={cfg.epsilon:g} asked > max-epsilon-per-run "
                             f"{policy.max_epsilon_per_run:g} of {where}")
    if cfg.delta > policy.max_delta:
        return PolicyRefusal("max-delta", f"delta={cfg.delta:g} asked > max-delta {policy.max_delta:g} of {where}")
    if num_users is not None and cfg.delta * num_users >= 1:
        return PolicyRefusal("delta-below-1/n", f"delta={cfg.delta:g} asked is not below 1/n = {1 / num_users:.3g} "
                             f"(n = {num_users} training users)")
    cap, asked = policy.max_lifetime_epsilon, cfg.silo_lifetime_epsilon
    if cap > 0 and (asked <= 0 or asked > cap):
        what = "no lifetime cap (0)" if asked <= 0 else f"silo-lifetime-epsilon={asked:g}"
        return PolicyRefusal("max-lifetime-epsilon", f"{what} asked; {where} caps lifetime ε at {cap:g}")
    return Admission(cfg, asked if asked > 0 else cap, release_mode(policy, cfg), policy.metric_epsilon_share)
