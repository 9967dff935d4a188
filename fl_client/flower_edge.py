"""The Flower edge of a silo: Message / ConfigRecord <-> the silo round's plain types.

* the accountant state kept on the node between rounds (``Context.state[STATE_KEY]``,
  a ConfigRecord) <-> :class:`~shared_model.privacy.state.PrivacyState`;
* a :class:`~fl_client.silo_round.TrainReply` / ``EvaluateReply`` -> the reply Message
  (the written ledger lines travel as ConfigRecords ``ledger``, ``ledger-1``, … in the order
  written; the server reads them with ``fl_server.strategy.ledger_records``); a ``failed`` reply carries no arrays.

Test hook: ``FEDSHIFT_TEST_CORRUPT_UPDATE=<silo>`` in a silo process's *environment* (never
the run config, which the server chooses) makes that silo's outgoing arrays NaN after its
own checks, as a faulty or hostile silo would, so that the server's refusal can be tested
in a real simulation (``tests/test_loud_simulation.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

import logging
import os

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from fl_client.silo_popularity import PopularityReply
from fl_client.silo_round import EvaluateReply, Loader, TrainReply
from fl_client.silo_transitions import TransitionReply
from shared_model.adapters import from_arrays, to_arrays
from shared_model.popularity import PRIOR_RECORD
from shared_model.privacy.state import PrivacyState
from shared_model.transitions import TRANSITIONS_RECORD, TransitionTable

STATE_KEY = "fedshift-privacy"
CORRUPT_ENV = "FEDSHIFT_TEST_CORRUPT_UPDATE"


def _test_corruption(arrays: ArrayRecord, silo: str) -> ArrayRecord:
    """The test hook above: every array NaN when this process's environment names ``silo``."""
    if os.environ.get(CORRUPT_ENV) != silo:
        return arrays
    logging.getLogger("fedshift.client").error("%s=%s: sending NaN arrays (test hook)", CORRUPT_ENV, silo)
    return ArrayRecord({k: Array(np.full_like(arrays[k].numpy(), np.nan)) for k in arrays.keys()})


def loader(msg: Message) -> Loader:
    """Loads the global arrays the server sent into a model, the popularity prior when the
    message carries one (``popularity``: ``log-prior`` over the catalogue's items), and the
    transition table when it carries one and the model has a place for it (``transitions``:
    ``a``, ``b``, ``counts``, :class:`~shared_model.transitions.TransitionTable`)."""
    def load(model) -> None:  # type: ignore[no-untyped-def]
        from_arrays(model, msg.content["arrays"])
        if PRIOR_RECORD in msg.content and model.popularity_prior is not None:
            model.popularity_prior.set_prior(msg.content[PRIOR_RECORD]["log-prior"].numpy())
        if TRANSITIONS_RECORD in msg.content and getattr(model, "transition_table", None) is not None:
            record = msg.content[TRANSITIONS_RECORD]
            model.transition_table.set_table(TransitionTable.from_arrays({k: record[k].numpy() for k in record.keys()}))
    return load


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
            "release-metrics": state.release_metrics,
            "metric-noise-multiplier": float(state.metric_noise_multiplier),
            "planned-releases": int(state.planned_releases),
            "popularity-noise-multiplier": float(state.popularity_noise_multiplier),
            "transition-noise-multiplier": float(state.transition_noise_multiplier),
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
        release_metrics=str(rec.get("release-metrics", "none")),
        metric_noise_multiplier=float(rec.get("metric-noise-multiplier", 0.0)),
        planned_releases=int(rec.get("planned-releases", 0)),
        popularity_noise_multiplier=float(rec.get("popularity-noise-multiplier", 0.0)),
        transition_noise_multiplier=float(rec.get("transition-noise-multiplier", 0.0)),
    )


def kept_state(context: Context) -> PrivacyState | None:
    """The accountant state this node kept for the run, if any."""
    return state_from_record(context.state[STATE_KEY]) if STATE_KEY in context.state else None


def trained_arrays(reply: TrainReply) -> ArrayRecord | None:
    """The arrays a trained reply would send in the clear (the test hook applied), else None."""
    if reply.status != "trained" or reply.model is None:
        return None
    return _test_corruption(to_arrays(reply.model), reply.info.get("silo", ""))


def train_message(msg: Message, context: Context, reply: TrainReply, dp: bool,
                  masked: ArrayRecord | None = None) -> Message:
    """Keep the state on the node (DP rounds that trained) and pack the reply; under secure
    aggregation (a ``secagg`` record in ``msg``) the arrays are ``masked`` or absent."""
    if dp and reply.model is not None and reply.privacy is not None:
        context.state[STATE_KEY] = state_to_record(reply.privacy)
    status = {"status": reply.status, **({"rule": reply.rule} if reply.rule else {}),
              **({"reason": reply.reason} if reply.reason else {})}
    content = RecordDict({"metrics": MetricRecord(reply.metrics), "info": ConfigRecord(reply.info),
                          "status": ConfigRecord(status)})
    if "secagg" in msg.content:
        if masked is not None:
            content["arrays"] = masked
    elif reply.status != "failed":  # a failed silo sends no arrays
        arrays = to_arrays(reply.model) if reply.model is not None else msg.content["arrays"]
        content["arrays"] = _test_corruption(arrays, reply.info.get("silo", "")) if reply.model is not None else arrays
    _pack_ledger(content, ([reply.record] if reply.record is not None else []) + list(reply.released))
    return Message(content=content, reply_to=msg)


def _pack_ledger(content: RecordDict, lines: list[dict]) -> None:
    """Ledger lines as ConfigRecords ``ledger``, ``ledger-1``, … (the order they were written)."""
    for i, line in enumerate(lines):
        content["ledger" if i == 0 else f"ledger-{i}"] = ConfigRecord(
            {k: v for k, v in line.items() if isinstance(v, (str, int, float))})


def evaluate_message(msg: Message, reply: EvaluateReply, context: Context | None = None) -> Message:
    """Pack the reply; a dp metric release's accountant state is kept on the node."""
    if context is not None and reply.privacy is not None:
        context.state[STATE_KEY] = state_to_record(reply.privacy)
    status = {"status": reply.status, **({"rule": reply.rule, "reason": reply.reason} if reply.rule else {})}
    content = RecordDict({"metrics": MetricRecord(reply.metrics), "info": ConfigRecord(reply.info),
                          "status": ConfigRecord(status)})
    _pack_ledger(content, list(reply.records))
    return Message(content=content, reply_to=msg)


def popularity_message(msg: Message, reply: PopularityReply, context: Context) -> Message:
    """Pack a popularity reply: ``counts`` (the noisy or, with dp = false, exact histogram),
    ``metrics`` (public: items, noise-std), the ledger lines; the accountant state is kept."""
    if reply.privacy is not None:
        context.state[STATE_KEY] = state_to_record(reply.privacy)
    status = {"status": reply.status, **({"reason": reply.reason} if reply.reason else {})}
    content = RecordDict({"info": ConfigRecord(reply.info), "status": ConfigRecord(status),
                          "metrics": MetricRecord({"noise-std": float(reply.noise_std),
                                                   "items": int(len(reply.counts) if reply.counts is not None else 0)})})
    if reply.counts is not None:
        content["counts"] = ArrayRecord({"counts": Array(np.asarray(reply.counts, dtype=np.float64))})
    _pack_ledger(content, list(reply.records))
    return Message(content=content, reply_to=msg)


def query_candidates(msg: Message, platforms: Sequence[str]) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The candidate pairs a ``query.transitions`` message holds for a silo of ``platforms``:
    its config's ``spaces`` lists the pair spaces it carries, in the order of the
    ``candidates`` arrays ``a-I``, ``b-I``; the silo's spaces
    (:func:`shared_model.transitions.pair_spaces`) concatenated in their order;
    ``(None, None)`` (or None for an absent array) when one is missing."""
    from shared_model.transitions import pair_spaces

    spaces = list(msg.content["config"].get("spaces", [])) if "config" in msg.content else []
    mine = pair_spaces(platforms)
    if any(s not in spaces for s in mine) or "candidates" not in msg.content:
        return None, None
    rec = msg.content["candidates"]
    out: list[np.ndarray | None] = []
    for end in ("a", "b"):
        keys = [f"{end}-{spaces.index(s)}" for s in mine]
        out.append(np.concatenate([rec[k].numpy() for k in keys]) if all(k in rec for k in keys) else None)
    return out[0], out[1]


def transitions_message(msg: Message, reply: TransitionReply, context: Context) -> Message:
    """Pack a transition reply: ``counts`` (``counts``, float32: one per candidate pair when
    noisy; with dp = false the exact counts and their pairs' rows ``a``, ``b``), ``metrics``
    (public: pairs, noise-std), the ledger lines; the accountant state is kept."""
    if reply.privacy is not None:
        context.state[STATE_KEY] = state_to_record(reply.privacy)
    status = {"status": reply.status, **({"reason": reply.reason} if reply.reason else {})}
    pairs = int(len(reply.counts) if reply.counts is not None else 0)
    content = RecordDict({"info": ConfigRecord(reply.info), "status": ConfigRecord(status),
                          "metrics": MetricRecord({"noise-std": float(reply.noise_std), "pairs": pairs})})
    if reply.counts is not None:
        arrays = {"counts": Array(np.asarray(reply.counts, dtype=np.float32))}
        if reply.a is not None and reply.b is not None:
            arrays.update(a=Array(np.asarray(reply.a, dtype=np.int64)), b=Array(np.asarray(reply.b, dtype=np.int64)))
        content["counts"] = ArrayRecord(arrays)
    _pack_ledger(content, list(reply.records))
    return Message(content=content, reply_to=msg)
