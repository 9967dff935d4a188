"""The fedshift ClientApp: one per data silo, the same code in simulation and deployment.

Each handler unpacks the Message, calls one silo-round function
(:mod:`fl_client.silo_round`) and packs the reply (:mod:`fl_client.flower_edge`).

A train reply carries the trainable arrays, the number of training users, privacy and
training metrics, and the round's ledger record (ConfigRecord ``ledger``: mechanism
parameters and ε, or the refusal, no user data). A silo that may not train (budget
rules) sends the global arrays back untouched with weight 0 and status
``budget-exhausted``. The silo's durable privacy state is its ledger (node config
``state-dir`` / run config ``state-dir`` / ``$FEDSHIFT_STATE``); ``Context.state`` holds
the in-memory view between rounds.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fl_client import flower_edge as edge
from fl_client.silo_round import SiloSetup, TrainRequest, evaluate_silo_round, train_silo
from shared_model.config import RunConfig

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg = RunConfig.from_run_config(dict(context.run_config))
    silo = SiloSetup.open(cfg, dict(context.node_config))
    reply = train_silo(TrainRequest(silo, run_id=context.run_id, server_round=int(msg.content["config"]["server-round"]),
                                    load=edge.loader(msg), privacy=edge.kept_state(context)))
    return edge.train_message(msg, context, reply, dp=cfg.dp)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    cfg = RunConfig.from_run_config(dict(context.run_config))
    reply = evaluate_silo_round(SiloSetup.open(cfg, dict(context.node_config)), edge.loader(msg))
    return edge.evaluate_message(msg, reply)
