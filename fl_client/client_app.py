"""The fedshift ClientApp: one per data silo, the same code in simulation and deployment.

Each round it builds a fresh model (so Opacus hooks never stack), loads the global
adapter+head arrays, trains with DP-SGD on its own silo, and replies with the trainable
arrays, the number of training users, and privacy/training metrics. Its privacy state
(calibrated noise, accountant history) lives in ``context.state``.
"""

from __future__ import annotations

import hashlib
import logging

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fl_client.dp_train import pick_device, train_round
from fl_client.evaluate import evaluate_silo
from fl_client.privacy import STATE_KEY, PrivacyState
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


def _privacy_state(context: Context, cfg: RunConfig, data: SiloData) -> PrivacyState:
    if STATE_KEY in context.state:
        state = PrivacyState.from_record(context.state[STATE_KEY])
        if state.silo != data.name:
            raise RuntimeError(f"node state belongs to silo {state.silo}, not {data.name}")
        return state
    return PrivacyState.calibrate(data.name, cfg, num_users=len(train_user_ids(data.silo)))


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg = RunConfig.from_run_config(dict(context.run_config))
    data = open_silo(cfg, dict(context.node_config))
    server_round = int(msg.content["config"]["server-round"])
    device = pick_device(cfg)
    num_users = len(train_user_ids(data.silo))
    privacy = _privacy_state(context, cfg, data)
    info = ConfigRecord({"silo": data.name, "platform": data.platform, "device": str(device)})

    if cfg.dp and not privacy.can_train(cfg.local_steps):
        # Budget exhausted: send the global arrays back untouched with weight 0.
        log.warning("silo %s: training %d more steps would exceed ε=%.3g; refusing", data.name, cfg.local_steps, privacy.epsilon_budget)
        metrics = _train_metrics(cfg, privacy, num_users=0, loss=0.0, steps=0, empty=0, seconds=0.0, eps_round=0.0, exhausted=True)
        content = RecordDict({"arrays": msg.content["arrays"], "metrics": MetricRecord(metrics), "info": info})
        return Message(content=content, reply_to=msg)

    model = _model_for(msg, cfg, data)
    result = train_round(model, data, cfg, privacy, seed=seed_for(cfg.seed, data.name, server_round), device=device)
    if cfg.dp:
        privacy.history = result.history
        privacy.rounds.append(server_round)
        context.state[STATE_KEY] = privacy.to_record()
    metrics = _train_metrics(
        cfg, privacy, num_users=num_users, loss=result.loss, steps=result.steps,
        empty=result.empty_steps, seconds=result.seconds, eps_round=result.epsilon_round, exhausted=False,
    )
    content = RecordDict({"arrays": to_arrays(model), "metrics": MetricRecord(metrics), "info": info})
    return Message(content=content, reply_to=msg)


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
