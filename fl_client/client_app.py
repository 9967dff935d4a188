"""The fedshift ClientApp: one per data silo, the same code in simulation and deployment.

Each handler first passes the run config (a request from whoever submitted the run)
through the silo's gate (:mod:`fl_client.silo_gate`): the silo's own policy file admits it
or refuses it before any data is touched. Then it calls one silo-round function
(:mod:`fl_client.silo_round`) and packs the reply (:mod:`fl_client.flower_edge`).

A train reply carries the trainable arrays, the number of training users, privacy and
training metrics, and the round's ledger record (ConfigRecord ``ledger``: mechanism
parameters and ε, or the refusal, no user data). Which metrics leave, and how, is the
silo's ``release-metrics`` (:mod:`fl_client.silo_release`): an evaluate reply carries noisy
metrics and its ``metric-release`` record (``dp``), or the exact ones and a ``plain-release``
declaration (``plain``), or counts only (``none``). A silo that may not train sends the
global arrays back untouched with weight 0 and status ``budget-exhausted`` (budget rules)
or ``refused`` (its policy), with the reason. The silo's durable privacy state (ledger,
policy, secret) lives under ``<state-root>/<silo>/`` (node config ``state-dir``, else
``$FEDSHIFT_STATE``, else ``~/.local/share/fedshift``); ``Context.state`` holds the
in-memory view between rounds.

Before the first round the server asks every silo for its popularity release
(``query.popularity``, :mod:`fl_client.silo_popularity`): a Gaussian histogram of its training
users' items and its ``popularity-release`` record; later messages carry the summed prior.
Then (``query.transitions``, :mod:`fl_client.silo_transitions`) for its Gaussian counts of its
training users' item transitions over the public candidate pairs the query carries, and its
``transition-release`` record; later messages carry the summed transition table.

With run config ``secure-aggregation = true`` the train reply carries masked arrays instead
(:mod:`fl_client.secure_aggregation`; the ``query.secagg_*`` handlers are its other stages).
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fl_client import flower_edge as edge
from fl_client import secure_aggregation as secagg
from fl_client.silo_gate import open_gate
from fl_client.silo_popularity import refused_popularity, release_popularity
from fl_client.silo_round import (SiloSetup, TrainRequest, budget_run_id, count_train_users, evaluate_silo_round,
                                  refused_evaluation, refused_reply, train_silo)
from fl_client.silo_transitions import refused_transitions, release_transitions

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    node_config = dict(context.node_config)
    server_round = int(msg.content["config"]["server-round"])
    gate = open_gate(dict(context.run_config), node_config, lambda cfg: count_train_users(cfg, node_config))
    if not gate.admitted:
        return edge.train_message(msg, context, refused_reply(gate, context.run_id, server_round), dp=False)
    assert gate.cfg is not None
    silo = SiloSetup.admitted(gate, node_config)
    run_id = budget_run_id(gate.cfg, context.run_id)  # a resumed run spends the original run's budget
    reply = train_silo(TrainRequest(silo, run_id=run_id, server_round=server_round, load=edge.loader(msg),
                                    privacy=edge.kept_state(context),
                                    resumed_in=str(context.run_id) if run_id != context.run_id else None))
    if "secagg" not in msg.content:
        return edge.train_message(msg, context, reply, dp=gate.cfg.dp)
    masked, why_not = secagg.masked_reply(msg, context, edge.trained_arrays(reply), int(reply.metrics["num-examples"]),
                                          silo.data.name)
    if why_not:  # the silo sends nothing (its own range check, or the drop test hook)
        reply.status, reply.reason = "failed", why_not
        reply.metrics["num-examples"] = 0
    return edge.train_message(msg, context, reply, dp=gate.cfg.dp, masked=masked)


@app.query("secagg_keys")
def secagg_keys(msg: Message, context: Context) -> Message:
    return secagg.advertise_keys(msg, context)


@app.query("secagg_share")
def secagg_share(msg: Message, context: Context) -> Message:
    return secagg.share_keys(msg, context)


@app.query("secagg_unmask")
def secagg_unmask(msg: Message, context: Context) -> Message:
    return secagg.unmask(msg, context)


@app.query("popularity")
def popularity(msg: Message, context: Context) -> Message:
    node_config = dict(context.node_config)
    gate = open_gate(dict(context.run_config), node_config, lambda cfg: count_train_users(cfg, node_config))
    if not gate.admitted:
        return edge.popularity_message(msg, refused_popularity(gate), context)
    assert gate.cfg is not None
    silo = SiloSetup.admitted(gate, node_config)
    reply = release_popularity(silo, budget_run_id(gate.cfg, context.run_id), edge.kept_state(context))
    return edge.popularity_message(msg, reply, context)


@app.query("transitions")
def transitions(msg: Message, context: Context) -> Message:
    node_config = dict(context.node_config)
    gate = open_gate(dict(context.run_config), node_config, lambda cfg: count_train_users(cfg, node_config))
    if not gate.admitted:
        return edge.transitions_message(msg, refused_transitions(gate), context)
    assert gate.cfg is not None
    silo = SiloSetup.admitted(gate, node_config)
    reply = release_transitions(silo, budget_run_id(gate.cfg, context.run_id),
                                edge.query_candidates(msg, silo.data.platforms), edge.kept_state(context))
    return edge.transitions_message(msg, reply, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    node_config = dict(context.node_config)
    gate = open_gate(dict(context.run_config), node_config, lambda cfg: count_train_users(cfg, node_config))
    if not gate.admitted:
        return edge.evaluate_message(msg, refused_evaluation(gate))
    server_round = int(msg.content["config"]["server-round"]) if "config" in msg.content else 0
    reply = evaluate_silo_round(SiloSetup.admitted(gate, node_config), edge.loader(msg), run_id=context.run_id,
                                server_round=server_round, privacy=edge.kept_state(context))
    return edge.evaluate_message(msg, reply, context)
