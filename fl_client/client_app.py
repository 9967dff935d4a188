"""The fedshift ClientApp: one per data silo, the same code in simulation and deployment.

Each round it builds a fresh model (so Opacus hooks never stack), loads the global
adapter+head arrays, trains with DP-SGD on its own silo, and replies with the trainable
arrays, the number of training users, and privacy/training metrics.

Privacy state: the silo's append-only ledger (``fl_client/ledger.py``, at node config
``state-dir`` / run config ``state-dir`` / ``$FEDSHIFT_STATE``) is the durable state, one
record per DP round; ``context.state`` holds its in-memory view (calibrated noise,
accountant history). A restarted silo process rebuilds that view from the ledger records
of the current run, so cumulative ε continues. The round's ledger record (mechanism
parameters and ε only, no user data) travels in the reply as ConfigRecord ``ledger``.
A silo refuses to train when the next round would exceed its run budget (or its lifetime
budget ``silo-lifetime-epsilon`` over every run on its ledger) and replies with
``budget-exhausted``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from datetime import datetime, timezone

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fl_client.dp_train import RoundResult, pick_device, train_round
from fl_client.evaluate import evaluate_silo
from fl_client.ledger import Ledger, silo_ledger_path
from fl_client.privacy import STATE_KEY, PrivacyState, epsilon_of_history, ledger_history
from fl_client.task import SiloData, open_silo
from shared_model.adapters import from_arrays, to_arrays
from shared_model.config import RunConfig
from shared_model.examples import train_user_ids
from shared_model.model import InterestModel, build_model

log = logging.getLogger("fedshift.client")
app = ClientApp()


def seed_for(base: int, silo: str, server_round: int, purpose: str = "train") -> int:
    """A reproducible per-(run seed, silo, round) seed."""
    digest = hashlib.sha256(f"{base}/{silo}/{server_round}/{purpose}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def _model_for(msg: Message, cfg: RunConfig, data: SiloData) -> InterestModel:
    model = build_model(cfg, num_categories=len(data.categories))
    from_arrays(model, msg.content["arrays"])
    return model


def _privacy_state(context: Context, cfg: RunConfig, data: SiloData, ledger: Ledger) -> PrivacyState:
    if STATE_KEY in context.state:
        state = PrivacyState.from_record(context.state[STATE_KEY])
        if state.silo != data.name:
            raise RuntimeError(f"node state belongs to silo {state.silo}, not {data.name}")
        return state
    state = PrivacyState.calibrate(data.name, cfg, num_users=len(train_user_ids(data.silo)))
    if cfg.dp:
        mine = run_records(ledger.read(), context.run_id, data.name)
        if mine:
            state.restore(mine)
            log.warning("silo %s: restored run %s from %s: rounds %s, ε=%.4g so far",
                        data.name, context.run_id, ledger.path, state.rounds, state.epsilon_spent)
    return state


def run_records(records: list[dict], run_id: int | str, silo: str) -> list[dict]:
    """This run's records of one silo, in ledger order."""
    return [r for r in records if str(r.get("run-id")) == str(run_id) and r.get("silo") == silo]


def lifetime_epsilon(privacy: PrivacyState, records: list[dict], extra: list[tuple[float, float, int]] = ()) -> float:
    """ε(δ) over every run on the silo's ledger (plus ``extra`` steps), one accountant."""
    return epsilon_of_history(privacy.accountant, ledger_history(records) + list(extra), privacy.delta)


def arrays_sha256(model: InterestModel) -> str:
    """SHA-256 of the trainable arrays a silo sends (names and bytes, in order)."""
    h = hashlib.sha256()
    arrays = to_arrays(model)
    for key in arrays.keys():
        h.update(key.encode())
        h.update(arrays[key].data)
    return h.hexdigest()


def dp_round(
    model: InterestModel, data: SiloData, cfg: RunConfig, privacy: PrivacyState, *, seed: int,
    device: object, run_id: int | str, server_round: int, ledger: Ledger,
) -> tuple[RoundResult, dict | None]:
    """Train one round, then append its ledger record (DP only) and update ``privacy``.

    The single code path for a silo round: the ClientApp and the canary audit both use it.
    """
    used = privacy
    if cfg.dp and cfg.audit_broken_noise:
        log.error("AUDIT-BROKEN-NOISE: silo %s trains WITHOUT NOISE (σ=0) while its ledger records σ=%.4g. "
                  "This deliberately breaks differential privacy; only the audit's own tests may set it.",
                  data.name, privacy.noise_multiplier)
        used = dataclasses.replace(privacy, noise_multiplier=0.0)
    result = train_round(model, data, cfg, used, seed=seed, device=device)  # type: ignore[arg-type]
    if not cfg.dp:
        return result, None
    step = (privacy.noise_multiplier, privacy.sample_rate, int(result.steps))
    eps_round = privacy.epsilon_of([step])
    privacy.history = list(privacy.history) + [step]
    if used is privacy and _merged(result.history) != _merged(privacy.history):
        # The ledger must describe exactly what Opacus's accountant saw during training.
        raise RuntimeError(f"silo {data.name}: accountant history {result.history} != ledger view {privacy.history}")
    privacy.rounds.append(server_round)
    all_records = ledger.read()
    record = {
        "kind": "dp-sgd-round",
        "run-id": str(run_id),
        "silo": data.name,
        "round": int(server_round),
        "steps": int(result.steps),
        "sample-rate": float(privacy.sample_rate),
        "noise-multiplier": float(privacy.noise_multiplier),
        "max-grad-norm": float(cfg.max_grad_norm),
        "delta": float(privacy.delta),
        "accountant": privacy.accountant,
        "epsilon-round": float(eps_round),
        "epsilon-cumulative": float(privacy.epsilon_spent),
        "epsilon-budget": float(privacy.epsilon_budget),
        "epsilon-lifetime": float(lifetime_epsilon(privacy, all_records, [step])),
        "runs-on-ledger": len({str(r.get("run-id")) for r in all_records} | {str(run_id)}),
        "num-users": len(train_user_ids(data.silo)),
        "model-sha256": arrays_sha256(model),
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    written = ledger.append(record)
    result.epsilon_round = eps_round
    return result, written


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg = RunConfig.from_run_config(dict(context.run_config))
    node_config = dict(context.node_config)
    data = open_silo(cfg, node_config)
    server_round = int(msg.content["config"]["server-round"])
    device = pick_device(cfg)
    num_users = len(train_user_ids(data.silo))
    ledger = Ledger(silo_ledger_path(data.name, node_config, cfg.state_dir))
    privacy = _privacy_state(context, cfg, data, ledger)
    info = ConfigRecord({"silo": data.name, "platform": data.platform, "device": str(device)})

    refusal = _refusal(cfg, privacy, ledger) if cfg.dp else None
    if refusal:
        # Budget exhausted: send the global arrays back untouched with weight 0.
        log.warning("silo %s: %s; refusing to train", data.name, refusal)
        metrics = _train_metrics(cfg, privacy, num_users=0, loss=0.0, steps=0, empty=0, seconds=0.0, eps_round=0.0, exhausted=True)
        status = ConfigRecord({"status": "budget-exhausted", "reason": refusal})
        content = RecordDict({"arrays": msg.content["arrays"], "metrics": MetricRecord(metrics), "info": info, "status": status})
        return Message(content=content, reply_to=msg)

    model = _model_for(msg, cfg, data)
    result, record = dp_round(
        model, data, cfg, privacy, seed=seed_for(cfg.seed, data.name, server_round), device=device,
        run_id=context.run_id, server_round=server_round, ledger=ledger,
    )
    if cfg.dp:
        context.state[STATE_KEY] = privacy.to_record()
    metrics = _train_metrics(
        cfg, privacy, num_users=num_users, loss=result.loss, steps=result.steps,
        empty=result.empty_steps, seconds=result.seconds, eps_round=result.epsilon_round, exhausted=False,
    )
    content = RecordDict({"arrays": to_arrays(model), "metrics": MetricRecord(metrics), "info": info,
                          "status": ConfigRecord({"status": "trained"})})
    if record is not None:
        content["ledger"] = ConfigRecord({k: v for k, v in record.items() if isinstance(v, (str, int, float))})
    return Message(content=content, reply_to=msg)


def _merged(history: list) -> list[tuple[float, float, int]]:
    """History with consecutive equal mechanisms merged (as Opacus's accountant stores it)."""
    out: list[tuple[float, float, int]] = []
    for sigma, q, steps in history:
        if out and out[-1][:2] == (sigma, q):
            out[-1] = (sigma, q, out[-1][2] + int(steps))
        else:
            out.append((float(sigma), float(q), int(steps)))
    return out


def _refusal(cfg: RunConfig, privacy: PrivacyState, ledger: Ledger) -> str:
    """Why this silo must not train another round ('' when it may)."""
    if not privacy.can_train(cfg.local_steps):
        return (f"{cfg.local_steps} more steps would take ε from {privacy.epsilon_spent:.4g} to "
                f"{privacy.epsilon_after(cfg.local_steps):.4g} > budget {privacy.epsilon_budget:g} "
                f"(δ={privacy.delta:g}, {privacy.accountant_label})")
    if cfg.silo_lifetime_epsilon > 0:
        step = (privacy.noise_multiplier, privacy.sample_rate, cfg.local_steps)
        after = lifetime_epsilon(privacy, ledger.read(), [step])
        if after > cfg.silo_lifetime_epsilon + 1e-6:
            return (f"{cfg.local_steps} more steps would take the silo's lifetime ε over all runs on "
                    f"{ledger.path} to {after:.4g} > silo-lifetime-epsilon {cfg.silo_lifetime_epsilon:g} "
                    f"(δ={privacy.delta:g}, {privacy.accountant_label})")
    return ""


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


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    cfg = RunConfig.from_run_config(dict(context.run_config))
    data = open_silo(cfg, dict(context.node_config))
    device = pick_device(cfg)
    model = _model_for(msg, cfg, data)
    result = evaluate_silo(model, data, cfg, device, split="valid")
    metrics = {"num-examples": result.users, **result.as_metrics()}
    info = ConfigRecord({"silo": data.name, "platform": data.platform, "device": str(device)})
    return Message(content=RecordDict({"metrics": MetricRecord(metrics), "info": info}), reply_to=msg)
