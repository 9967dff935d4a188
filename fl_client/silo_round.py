"""One silo round, without Flower: what the ClientApp's handlers and the canary audit call.

The ClientApp first passes the run config through the silo's gate
(:mod:`fl_client.silo_gate`: the silo's own policy admits or refuses the request; a refusal
is answered by :func:`refused_reply` without touching data). An admitted request opens the
silo (:meth:`SiloSetup.admitted`). :func:`train_silo` takes a :class:`TrainRequest` (the
opened silo, the run and round, how to load the global model) and returns a
:class:`TrainReply`. It:

1. takes the silo's accountant state for the run: the node's in-memory state if it has
   one, else calibrated from the run config and restored from this run's DP-SGD round
   records on the silo's ledger (a restarted silo continues its ε). A resumed run
   (run config ``resume-run-id``, :func:`budget_run_id`) is charged to the ORIGINAL run:
   its rounds are restored from the silo's own ledger (never from a figure the server
   sends) and recorded under that run id, so the run budget covers both; ledger rounds
   whose mechanism differs from this config's calibration refuse the round (rule
   ``resume-mismatch``);
2. applies the budget rules (:mod:`shared_model.privacy.budget`); a refusal is written to
   the ledger as a ``refusal`` record and the silo does not touch its data;
3. otherwise trains ``local-steps`` DP-SGD steps and writes the round's ``dp-sgd-round``
   record (mechanism parameters and ε only, no user data).

Randomness: the round's training seed (Poisson sampling, noise, history cuts) is
``HMAC-SHA256(silo secret, run-id/silo/round/train)``
(:func:`shared_model.privacy.silo_secret.derive_seed`); the run's ``seed`` never enters it.

The written ledger line travels back in the reply, for the server's federation ledger.

4. checks what it would send (:func:`update_failure`): a non-finite loss or array stops
   the silo with status ``failed`` and the reason; it sends no arrays and no weight (the
   ε the round spent stays on the ledger: the data was touched).

5. lets out only the numbers the silo's ``release-metrics`` allows
   (:mod:`fl_client.silo_release`): training by-products (loss, timing) leave only under
   ``plain``, declared by a ``plain-release`` record; an evaluation's metrics leave as a
   Gaussian ``metric-release`` composed in the same accountant (``dp``), unnoised and declared
   (``plain``), or not at all (``none``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np
import torch

from fl_client.dp_train import RoundResult, pick_device, train_round
from fl_client.evaluate import evaluate_silo
from fl_client.silo_gate import Gate, refuse_round
from fl_client.silo_release import release_evaluation, release_training
from fl_client.task import SiloData, cached_silo, catalogue_dir_for, open_silo, resolve_silo_dir
from shared_model.adapters import arrays_sha256 as array_record_sha256
from shared_model.adapters import to_arrays
from shared_model.config import RunConfig
from shared_model.examples import train_user_ids
from shared_model.model import InterestModel, build_model
from shared_model.privacy import budget
from shared_model.privacy.ledger import Ledger
from shared_model.privacy.records import DpSgdRound, Refusal, dp_rounds, of_run, read_records, spending, write_record
from shared_model.privacy.silo_secret import derive_seed
from shared_model.privacy.state import PrivacyState, RestoreMismatch, merged_history

log = logging.getLogger("fedshift.client")

#: Puts the global model's trainable arrays into a freshly built model.
Loader = Callable[[InterestModel], None]


def seed_for(base: int, silo: str, server_round: int, purpose: str = "train") -> int:
    """A reproducible per-(seed, silo, round) seed, for silo-local tools (the canary audit)
    that choose their own seed; federated rounds use the silo secret instead."""
    digest = hashlib.sha256(f"{base}/{silo}/{server_round}/{purpose}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def budget_run_id(cfg: RunConfig, flower_run_id: int | str) -> int | str:
    """The run whose budget a round is charged to: ``resume-run-id`` when the run resumes one, else this run."""
    return cfg.resume_run_id or flower_run_id


def arrays_sha256(model: InterestModel) -> str:
    """SHA-256 of the trainable arrays a silo sends (names and bytes, in order)."""
    return array_record_sha256(to_arrays(model))


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class SiloSetup:
    """A silo opened for a round: its data, device and ledger."""

    cfg: RunConfig
    data: SiloData
    device: torch.device
    ledger: Ledger
    secret: bytes  # the silo's own randomness (shared_model.privacy.silo_secret)
    lifetime_cap: float = 0.0  # ε over every run on the ledger; 0 = none (policy ∧ request)
    release_metrics: str = "none"  # what metrics may leave (policy ∧ request): none | dp | plain
    metric_epsilon_share: float = 0.0  # dp: share of the run's ε planned for metric releases

    @classmethod
    def admitted(cls, gate: Gate, node_config: dict[str, Any]) -> "SiloSetup":
        """Open the silo for a request its policy admitted."""
        assert gate.cfg is not None and gate.secret is not None, "the gate refused this request"
        data = open_silo(gate.cfg, node_config)
        return cls(gate.cfg, data, pick_device(gate.cfg), gate.ledger, gate.secret, gate.lifetime_cap,
                   gate.release_metrics, gate.metric_epsilon_share)

    @property
    def num_users(self) -> int:
        return len(train_user_ids(self.data.silo))

    @property
    def info(self) -> dict[str, str]:
        """What the reply may say about the silo (no user data)."""
        return {"silo": self.data.name, "platform": ",".join(self.data.platforms), "device": str(self.device),
                "release-metrics": self.release_metrics}

    def model(self, load: Loader) -> InterestModel:
        """A fresh model (so Opacus hooks never stack) holding the loaded arrays."""
        model = build_model(self.cfg, num_categories=len(self.data.categories))
        load(model)
        return model


@dataclass
class TrainRequest:
    silo: SiloSetup
    run_id: int | str
    server_round: int
    load: Loader
    privacy: PrivacyState | None = None  # the node's in-memory state for this run, if any
    seed: int | None = None  # default: derive_seed(silo secret, run id, silo, round, "train")
    resumed_in: str | None = None  # the Flower run id, when ``run_id`` is the original run it resumes


@dataclass
class TrainReply:
    status: str  # "trained" | "budget-exhausted" | "refused" (the silo's policy) | "failed" (non-finite)
    metrics: dict[str, float | int]
    info: dict[str, str]
    privacy: PrivacyState | None
    model: InterestModel | None = None  # None when refused
    result: RoundResult | None = None
    record: dict[str, Any] | None = None  # the ledger line written (round or refusal)
    refusal: budget.BudgetRefusal | None = None
    rule: str = ""  # the rule that refused (budget or policy), when not trained
    reason: str = ""  # why the silo did not train, or failed
    released: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # plain-release records written


@dataclass
class EvaluateReply:
    metrics: dict[str, float | int]
    info: dict[str, str]
    status: str = "evaluated"  # | "refused"
    rule: str = ""
    reason: str = ""
    privacy: PrivacyState | None = None  # the accountant state after a dp metric release
    records: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # metric/plain-release lines written


def count_train_users(cfg: RunConfig, node_config: dict[str, Any]) -> int:
    """The silo's number of training users (for the policy's δ < 1/n rule)."""
    silo_dir = resolve_silo_dir(cfg, node_config)
    return len(train_user_ids(cached_silo(silo_dir, catalogue_dir_for(silo_dir, node_config))))


def refused_reply(gate: Gate, run_id: int | str, server_round: int) -> TrainReply:
    """The policy refused the request: write the refusal record, train nothing."""
    assert gate.refusal is not None
    record = refuse_round(gate, run_id, server_round)
    metrics: dict[str, float | int] = {"num-examples": 0, "steps": 0, "refused": 1, "budget-exhausted": 0}
    return TrainReply("refused", metrics, {"silo": gate.silo}, None, record=record, rule=gate.refusal.rule,
                      reason=gate.refusal.reason)


def refused_evaluation(gate: Gate) -> EvaluateReply:
    """The policy refused the request: evaluate nothing (no record; the train round records it)."""
    assert gate.refusal is not None
    return EvaluateReply({"num-examples": 0, "refused": 1}, {"silo": gate.silo}, "refused", gate.refusal.rule,
                         gate.refusal.reason)


def privacy_for(silo: SiloSetup, run_id: int | str, cached: PrivacyState | None = None) -> PrivacyState:
    """The silo's accountant state for ``run_id``: ``cached``, or calibrated and restored from the ledger."""
    data, cfg = silo.data, silo.cfg
    if cached is not None:
        if cached.silo != data.name:
            raise RuntimeError(f"node state belongs to silo {cached.silo}, not {data.name}")
        return cached
    state = PrivacyState.calibrate(data.name, cfg, num_users=silo.num_users, release_metrics=silo.release_metrics,
                                   metric_share=silo.metric_epsilon_share)
    if cfg.dp:
        mine = of_run(spending(read_records(silo.ledger)), run_id, data.name)
        if mine:
            state.restore(mine)
            log.warning("silo %s: restored run %s from %s: rounds %s, ε=%.4g so far",
                        data.name, run_id, silo.ledger.path, state.rounds, state.epsilon_spent)
    return state


def train_silo(req: TrainRequest) -> TrainReply:
    """One training round on a silo (see the module docstring); the reply's metrics are what
    the silo's ``release-metrics`` lets leave (:func:`fl_client.silo_release.release_training`)."""
    reply = _train_silo(req)
    reply.metrics, reply.released = release_training(req.silo, reply.metrics, req.run_id, req.server_round,
                                                      trained=reply.status in ("trained", "failed"))
    return reply


def _train_silo(req: TrainRequest) -> TrainReply:
    silo, cfg, data = req.silo, req.silo.cfg, req.silo.data
    num_users = silo.num_users
    try:
        privacy = privacy_for(silo, req.run_id, req.privacy)
    except RestoreMismatch as exc:
        log.warning("silo %s: %s", data.name, exc)
        record = write_record(silo.ledger, Refusal(
            run_id=str(req.run_id), silo=data.name, round=int(req.server_round), rule="resume-mismatch",
            reason=str(exc), time=_now(), resumed_in=req.resumed_in))
        metrics = {"num-examples": 0, "steps": 0, "refused": 1, "budget-exhausted": 0}
        return TrainReply("refused", metrics, silo.info, None, record=record, rule="resume-mismatch", reason=str(exc))
    refusal = (budget.check(privacy, cfg.local_steps, silo.lifetime_cap, read_records(silo.ledger),
                            silo.ledger.path) if cfg.dp else None)
    if refusal is not None:
        log.warning("silo %s: %s; refusing to train", data.name, refusal.reason)
        record = write_record(silo.ledger, Refusal(
            run_id=str(req.run_id), silo=data.name, round=int(req.server_round), rule=refusal.rule,
            reason=refusal.reason, steps=int(cfg.local_steps), sample_rate=float(privacy.sample_rate),
            noise_multiplier=float(privacy.noise_multiplier), delta=float(privacy.delta),
            accountant=privacy.accountant, epsilon_cumulative=float(privacy.epsilon_spent),
            epsilon_requested=float(refusal.epsilon_requested), epsilon_limit=float(refusal.epsilon_limit),
            epsilon_budget=float(privacy.epsilon_budget), time=_now(), resumed_in=req.resumed_in))
        metrics = _train_metrics(cfg, privacy, num_users=0, loss=0.0, steps=0, empty=0, seconds=0.0,
                                 eps_round=0.0, exhausted=True)
        return TrainReply("budget-exhausted", metrics, silo.info, privacy, record=record, refusal=refusal,
                          rule=refusal.rule, reason=refusal.reason)

    model = silo.model(req.load)
    seed = derive_seed(silo.secret, req.run_id, data.name, req.server_round, "train") if req.seed is None else req.seed
    result, record = _dp_round(model, silo, privacy, seed=seed, run_id=req.run_id, server_round=req.server_round,
                               resumed_in=req.resumed_in)
    failure = update_failure(model, result.loss)
    metrics = _train_metrics(cfg, privacy, num_users=0 if failure else num_users, loss=result.loss,
                             steps=result.steps, empty=result.empty_steps, seconds=result.seconds,
                             eps_round=result.epsilon_round, exhausted=False)
    for group, report in result.clipping.items():  # training by-products: they leave only under plain
        metrics[f"clipped-{group}"] = float(report["clipped"])
        metrics[f"grad-norm-{group}"] = float(report["mean-norm"])
    if failure is not None:
        log.error("silo %s: round %s: %s; sending no update", data.name, req.server_round, failure)
        return TrainReply("failed", metrics, silo.info, privacy, result=result, record=record, reason=failure)
    return TrainReply("trained", metrics, silo.info, privacy, model=model, result=result, record=record)


def update_failure(model: InterestModel, loss: float) -> str | None:
    """Why a trained model must not be sent (a non-finite loss or trainable array), or ``None``."""
    if not math.isfinite(loss):
        return f"training loss is {loss} (not finite)"
    arrays = to_arrays(model)
    bad = [k for k in arrays.keys() if not np.isfinite(arrays[k].numpy()).all()]
    if bad:
        return f"{len(bad)} trainable array(s) are not finite after training (first: {bad[0]})"
    return None


def _dp_round(model: InterestModel, silo: SiloSetup, privacy: PrivacyState, *, seed: int, run_id: int | str,
              server_round: int, resumed_in: str | None = None) -> tuple[RoundResult, dict[str, Any] | None]:
    """Train one round, then (DP only) update ``privacy`` and append the round's ledger record."""
    cfg, data, ledger = silo.cfg, silo.data, silo.ledger
    used = privacy
    if cfg.dp and cfg.audit_broken_noise:
        log.error("AUDIT-BROKEN-NOISE: silo %s trains WITHOUT NOISE (σ=0) while its ledger records σ=%.4g. "
                  "This deliberately breaks differential privacy; only the audit's own tests may set it.",
                  data.name, privacy.noise_multiplier)
        used = dataclasses.replace(privacy, noise_multiplier=0.0)
    result = train_round(model, data, cfg, used, seed=seed, device=silo.device)
    if not cfg.dp:
        return result, None
    step = (privacy.noise_multiplier, privacy.sample_rate, int(result.steps))
    eps_round = privacy.epsilon_of([step])
    privacy.record_round(server_round, int(result.steps))
    if used is privacy and merged_history(result.history) != merged_history(privacy.history):
        # The ledger must describe exactly what Opacus's accountant saw during training.
        raise RuntimeError(f"silo {data.name}: accountant history {result.history} != ledger view {privacy.history}")
    on_ledger = read_records(ledger)
    written = write_record(ledger, DpSgdRound(
        run_id=str(run_id), silo=data.name, round=int(server_round), steps=int(result.steps),
        sample_rate=float(privacy.sample_rate), noise_multiplier=float(privacy.noise_multiplier),
        max_grad_norm=float(cfg.max_grad_norm), delta=float(privacy.delta), accountant=privacy.accountant,
        epsilon_round=float(eps_round), epsilon_cumulative=float(privacy.epsilon_spent),
        epsilon_budget=float(privacy.epsilon_budget),
        epsilon_lifetime=float(budget.lifetime_epsilon(privacy, on_ledger, [step])),
        runs_on_ledger=len({r.run_id for r in dp_rounds(on_ledger)} | {str(run_id)}),
        num_users=silo.num_users, model_sha256=arrays_sha256(model), time=_now(), resumed_in=resumed_in))
    result.epsilon_round = eps_round
    return result, written


def _train_metrics(
    cfg: RunConfig, privacy: PrivacyState, *, num_users: int, loss: float, steps: int, empty: int,
    seconds: float, eps_round: float, exhausted: bool,
) -> dict[str, float | int]:
    return {
        "num-examples": num_users,
        "train-loss": float(loss),
        "steps": steps,
        "empty-steps": empty,
        "train-seconds": float(seconds),
        "epsilon": privacy.epsilon_spent if cfg.dp else float("inf"),
        "epsilon-round": float(eps_round),
        "epsilon-budget": privacy.epsilon_budget if cfg.dp else float("inf"),
        "delta": privacy.delta,
        "noise-multiplier": privacy.noise_multiplier if cfg.dp else 0.0,
        "sample-rate": privacy.sample_rate,
        "max-grad-norm": cfg.max_grad_norm,
        "budget-exhausted": int(exhausted),
    }


def evaluate_silo_round(silo: SiloSetup, load: Loader, run_id: int | str = 0, server_round: int = 0,
                        privacy: PrivacyState | None = None) -> EvaluateReply:
    """Evaluate the loaded global model on the silo's validation users; the metrics leave as
    the silo's ``release-metrics`` says (:func:`fl_client.silo_release.release_evaluation`)."""
    result = evaluate_silo(silo.model(load), silo.data, silo.cfg, silo.device, split="valid")
    state = privacy_for(silo, run_id, privacy) if silo.release_metrics == "dp" and silo.cfg.dp else None
    metrics, records = release_evaluation(silo, state, result, run_id, server_round)
    return EvaluateReply(metrics, silo.info, privacy=state, records=records)
