"""A silo's own privacy policy: the file that decides what the silo will train, whatever
the server asks.

The run config (``context.run_config``) is set by whoever submits ``flwr run``; to a silo
it is a *request*. Before touching data the silo checks the request against its policy
(:func:`check_request`, in :mod:`shared_model.privacy.admission`) and trains only when every
rule allows it; otherwise it refuses and writes a refusal record to its ledger.

Where the policy lives: node config ``policy=PATH``, else ``<state-root>/<silo>/policy.toml``
(:func:`policy_path`). The state root is node config ``state-dir``, else ``$FEDSHIFT_STATE``,
else ``~/.local/share/fedshift`` (:func:`shared_model.privacy.ledger.state_root`); never the
run config. A silo with no policy at the default path writes the default one there on
first use (safe: DP required, ε ≤ 10 per run); a policy named by node config must exist.

The file is TOML with dashed keys; every key is optional and an unknown key is an error::

    max-epsilon-per-run = 10.0       # largest ε (at the run's δ) one run may spend; > 0
    max-lifetime-epsilon = 0.0       # cap on ε over every run on the silo's ledger; 0 = none
    max-delta = 1e-5                 # largest δ a run may ask for; in (0, 1); δ < 1/n also holds
    allow-non-private = false        # may a run train without DP (dp=false)?
    allow-broken-noise-audit = false # may the audit-only σ=0 switch (audit-broken-noise) run?
    accountant = "rdp"               # "rdp" or "prv": the accountant that enforces the budget
    release-metrics = "dp"           # what evaluation/training metrics may leave: none | dp | plain
    metric-epsilon-share = 0.3       # dp: share of the run's ε planned for the metric releases; (0, 1)

GDP is not accepted as ``accountant``: it is an approximation (CLT), not an upper bound on
ε. ``release-metrics`` (:mod:`shared_model.privacy.metric_release`): ``dp`` releases each
metric as a Gaussian-mechanism sum over users, composed in the silo's accountant;
``plain`` sends them unnoised, declared outside ε on the ledger; ``none`` sends only what
training needs. A run config may ask for a more private mode (``release-metrics`` there),
never a less private one.

A malformed policy is a :class:`PolicyError` whose message is one line naming the file
and key: ``policy.toml: max-delta: must be in (0, 1)``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared_model.io_utils import toml_value, write_bytes_atomic

POLICY_NAME = "policy.toml"
#: Accountants a policy may name (upper bounds on ε); gdp is an approximation.
POLICY_ACCOUNTANTS = ("rdp", "prv")
#: Keys a later version will add; rejected with a clear message until then.
RESERVED_KEYS: dict[str, str] = {}
#: ``release-metrics`` modes, most private first (a request may only move left).
RELEASE_MODES = ("none", "dp", "plain")


class PolicyError(ValueError):
    """A policy file that cannot be read or holds a bad value: one line, ``FILE: KEY: reason``."""


@dataclass(frozen=True)
class SiloPolicy:
    """What a silo allows a run to do (see the module docstring for each key)."""

    max_epsilon_per_run: float = 10.0
    max_lifetime_epsilon: float = 0.0
    max_delta: float = 1e-5
    allow_non_private: bool = False
    allow_broken_noise_audit: bool = False
    accountant: str = "rdp"
    release_metrics: str = "dp"
    metric_epsilon_share: float = 0.3
    source: str = ""  # the file it was read from ("" when built in code)

    def __post_init__(self) -> None:
        name = Path(self.source).name if self.source else POLICY_NAME
        for f in dataclasses.fields(self):
            if f.name == "source":
                continue
            key = f.name.replace("_", "-")
            value = getattr(self, f.name)
            why = _invalid(key, f.default, value)
            if why:
                raise PolicyError(f"{name}: {key}: {why}")
            if isinstance(f.default, float) and not isinstance(value, float):
                object.__setattr__(self, f.name, float(value))

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name.replace("_", "-") for f in dataclasses.fields(cls) if f.name != "source"]

    def to_dict(self) -> dict[str, Any]:
        """The policy's keys (dashed) and values, as in the file."""
        return {k: getattr(self, k.replace("-", "_")) for k in self.keys()}

    def to_toml(self) -> str:
        return "".join(f"{k} = {toml_value(v)}\n" for k, v in self.to_dict().items())

    @property
    def sha256(self) -> str:
        """SHA-256 of the policy's canonical TOML (names the policy in refusal records)."""
        return hashlib.sha256(self.to_toml().encode()).hexdigest()

    def describe(self) -> str:
        """One line: the policy's values."""
        life = f"{self.max_lifetime_epsilon:g}" if self.max_lifetime_epsilon > 0 else "no cap"
        return (f"ε ≤ {self.max_epsilon_per_run:g} per run, lifetime ε {life}, δ ≤ {self.max_delta:g} "
                f"(and < 1/n), accountant {self.accountant}, non-private "
                f"{'allowed' if self.allow_non_private else 'refused'}, broken-noise audit "
                f"{'allowed' if self.allow_broken_noise_audit else 'never'}, metrics "
                + (f"dp ({self.metric_epsilon_share:.0%} of ε planned)" if self.release_metrics == "dp" else
                   "PLAIN (outside ε)" if self.release_metrics == "plain" else "none"))


def _invalid(key: str, default: Any, value: Any) -> str | None:
    """Why ``value`` is not a valid ``key``, or None."""
    if isinstance(default, bool):
        return None if isinstance(value, bool) else f"expected true or false, got {value!r}"
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return f"expected a finite number, got {value!r}"
        if key == "max-epsilon-per-run" and not value > 0:
            return f"must be > 0, got {value!r}"
        if key == "max-lifetime-epsilon" and not value >= 0:
            return f"must be ≥ 0 (0 = no cap), got {value!r}"
        if key in ("max-delta", "metric-epsilon-share") and not 0 < value < 1:
            return f"must be in (0, 1), got {value!r}"
        return None
    if key == "release-metrics" and value not in RELEASE_MODES:
        return f"must be one of {', '.join(RELEASE_MODES)}, got {value!r}"
    if key == "accountant":
        if value == "gdp":
            return "gdp is refused: it is an approximation, not an upper bound on ε (use rdp or prv)"
        if value not in POLICY_ACCOUNTANTS:
            return f"must be one of {', '.join(POLICY_ACCOUNTANTS)}, got {value!r}"
    return None


def parse_policy(values: Mapping[str, Any], source: str | Path = POLICY_NAME) -> SiloPolicy:
    """A policy from parsed TOML ``values``; :class:`PolicyError` on an unknown key or bad value."""
    name = Path(source).name
    known = set(SiloPolicy.keys())
    for key in values:
        if key in RESERVED_KEYS:
            raise PolicyError(f"{name}: {key}: {RESERVED_KEYS[key]}")
        if key not in known:
            raise PolicyError(f"{name}: {key}: unknown key (known: {', '.join(SiloPolicy.keys())})")
    return SiloPolicy(**{k.replace("-", "_"): v for k, v in values.items()}, source=str(source))


def load_policy(path: str | os.PathLike[str]) -> SiloPolicy:
    """Read and validate the policy at ``path``; :class:`PolicyError` (one line naming the
    file and key or line) when it is missing, unreadable, not TOML or holds a bad value."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc.__class__.__name__
        raise PolicyError(f"{path}: cannot read the policy: {why}") from None
    try:
        values = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"{path}: not valid TOML: {exc}") from None
    try:
        return parse_policy(values, path)
    except PolicyError as exc:  # name the full path, not only the file name
        raise PolicyError(f"{path}{str(exc)[len(path.name):]}") from None


def write_default_policy(path: str | os.PathLike[str], *, allow_non_private: bool = False) -> Path:
    """Write the default policy (``allow-non-private`` as given) to ``path`` atomically and
    return ``path``; an existing policy is never overwritten (it is returned as is)."""
    path = Path(path)
    if path.exists():
        return path
    policy = SiloPolicy(allow_non_private=allow_non_private)
    text = ("# fedshift silo privacy policy: what this silo lets a run do (docs/privacy-policy.md).\n"
            "# The server's run config is only a request; the silo trains only within these limits.\n"
            + policy.to_toml())
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, text.encode("utf-8"))
    return path


def policy_path(state_root: str | os.PathLike[str], silo: str, node_config: Mapping[str, Any]) -> Path:
    """Node config ``policy=PATH``, else ``<state_root>/<silo>/policy.toml``."""
    explicit = str(node_config.get("policy") or "")
    if explicit:
        return Path(explicit).expanduser().resolve()
    return Path(state_root).expanduser().resolve() / silo / POLICY_NAME


def silo_policy(state_root: str | os.PathLike[str], silo: str, node_config: Mapping[str, Any]) -> SiloPolicy:
    """The silo's policy: the file node config ``policy`` names (it must exist), else the
    default path, where the default policy is written on first use."""
    path = policy_path(state_root, silo, node_config)
    if not node_config.get("policy"):
        write_default_policy(path)
    return load_policy(path)
