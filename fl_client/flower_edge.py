"""The Flower edge of a silo: Message / ConfigRecord <-> the silo round's plain types.

* the accountant state kept on the node between rounds (``Context.state[STATE_KEY]``,
  a ConfigRecord) <-> :class:`~shared_model.privacy.state.PrivacyState`;
* a :class:`~fl_client.silo_round.TrainReply` / ``EvaluateReply`` -> the reply Message
  (the written ledger line travels as ConfigRecord ``ledger``).
"""

from __future__ import annotations

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from fl_client.silo_round import EvaluateReply, Loader, TrainReply
from shared_model.adapters import from_arrays, to_arrays
from shared_model.privacy.state import PrivacyState

STATE_KEY = "fedshift-privacy"


def loader(msg: Message) -> Loader:
    """Loads the global arrays the server sent into a model."""
    return lambda model: from_arrays(model, msg.content["arrays"])


def state_to_record(state: PrivacyState) -> ConfigRecord:
    return ConfigRecord(
        {
            "silo": state.silo,
            "accountant": state.accountant,
            "epsilon-budget": state.epsilon_budget,
            "delta": state.delta,
            "noise-multiplier": state.noise_multiplier,
            "sample-rate": state.sample_rate,
            "planned-steps": state.planned_steps,
            "history-sigma": [float(h[0]) for h in state.history],
            "history-q": [float(h[1]) for h in state.history],
            "history-steps": [int(h[2]) for h in state.history],
            "rounds": [int(r) for r in state.rounds],
        }
    )


def state_from_record(rec: ConfigRecord) -> PrivacyState:
    history = list(
        zip(
            [float(x) for x in rec.get("history-sigma", [])],
            [float(x) for x in rec.get("history-q", [])],
            [int(x) for x in rec.get("history-steps", [])],
        )
    )
    return PrivacyState(
        silo=str(rec["silo"]),
        accountant=str(rec["accountant"]),
        epsilon_budget=float(rec["epsilon-budget"]),
        delta=float(rec["delta"]),
        noise_multiplier=float(rec["noise-multiplier"]),
        sample_rate=float(rec["sample-rate"]),
        planned_steps=int(rec["planned-steps"]),
        history=history,
        rounds=[int(r) for r in rec.get("rounds", [])],
    )


def kept_state(context: Context) -> PrivacyState | None:
    """The accountant state this node kept for the run, if any."""
    return state_from_record(context.state[STATE_KEY]) if STATE_KEY in context.state else None


def train_message(msg: Message, context: Context, reply: TrainReply, dp: bool) -> Message:
    """Keep the state on the node (DP rounds that trained) and pack the reply."""
    if dp and reply.model is not None and reply.privacy is not None:
        context.state[STATE_KEY] = state_to_record(reply.privacy)
    arrays = to_arrays(reply.model) if reply.model is not None else msg.content["arrays"]
    status = {"status": reply.status, **({"rule": reply.rule, "reason": reply.reason} if reply.rule else {})}
    content = RecordDict({"arrays": arrays, "metrics": MetricRecord(reply.metrics),
                          "info": ConfigRecord(reply.info), "status": ConfigRecord(status)})
    if reply.record is not None:
        content["ledger"] = ConfigRecord({k: v for k, v in reply.record.items() if isinstance(v, (str, int, float))})
    return Message(content=content, reply_to=msg)


def evaluate_message(msg: Message, reply: EvaluateReply) -> Message:
    status = {"status": reply.status, **({"rule": reply.rule, "reason": reply.reason} if reply.rule else {})}
    content = RecordDict({"metrics": MetricRecord(reply.metrics), "info": ConfigRecord(reply.info),
                          "status": ConfigRecord(status)})
    return Message(content=content, reply_to=msg)
