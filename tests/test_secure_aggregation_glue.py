"""The Flower glue of secure aggregation without processes: the server's
:class:`fl_server.secure_aggregation.SecureAggregation` drives the silos'
:mod:`fl_client.secure_aggregation` handlers through a Grid that delivers each Message
in-process (the records really are Flower ConfigRecords / ArrayRecords, round-tripped
through Flower's protobuf serialisation), so every stage, a dropped silo and the weighted
mean are checked in well under a second."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.supercore.task_identity import TaskIdentity

from fl_client import secure_aggregation as silo_side
from fl_server.secure_aggregation import SecureAggregation
from shared_model.secure_aggregation import fixed_point
from shared_model.secure_aggregation.protocol import ProtocolError

HANDLERS = {"query.secagg_keys": silo_side.advertise_keys, "query.secagg_share": silo_side.share_keys,
            "query.secagg_unmask": silo_side.unmask}


@pytest.fixture(autouse=True)
def _run_identity():
    """A Message outside a ServerApp needs the run id Flower sets for a running task."""
    before = TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1  # the ServerApp's side
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = before


def _wire(content: RecordDict) -> RecordDict:
    return recorddict_from_proto(recorddict_to_proto(content))


class InProcessGrid:
    """Delivers each message to the silo handler of its type, with the node's own Context."""

    def __init__(self, contexts: dict[int, Context]) -> None:
        self.contexts = contexts
        self.offline: set[int] = set()

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content=_wire(content), dst_node_id=dst_node_id, message_type=message_type, group_id=group_id)

    def send_and_receive(self, messages, timeout=None):
        replies = []
        for m in messages:
            if m.metadata.dst_node_id not in self.offline:
                TaskIdentity.node_id = m.metadata.dst_node_id  # the silo's side, as its ClientApp
                reply = HANDLERS[m.metadata.message_type](m, self.contexts[m.metadata.dst_node_id])
                TaskIdentity.node_id = 0
                replies.append(Message(content=_wire(reply.content), reply_to=m))
        return replies


def _federation(m: int, threshold: float = 0.5):
    contexts = {n: Context(run_id=1, node_id=n, node_config={}, state=RecordDict(),
                           run_config={"secagg-threshold": threshold}) for n in range(11, 11 + m)}
    return InProcessGrid(contexts), SecureAggregation(threshold, timeout=1)


def _arrays(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {"lora_B": rng.normal(0, 0.1, (8, 4)).astype(np.float32), "head": rng.normal(0, 0.1, 5).astype(np.float32)}


def _record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(v) for k, v in arrays.items()})


@pytest.mark.parametrize("drop", [1, 0])
def test_stages_through_flower_records_give_the_weighted_mean_without_a_dropped_silo(drop: int) -> None:
    rng = np.random.default_rng(0)
    grid, server = _federation(4)
    sent = _arrays(rng)
    holders = server.setup(grid, sorted(grid.contexts), server_round=1)
    assert holders == sorted(grid.contexts)
    trained = {n: {k: v + rng.normal(0, 0.01, v.shape).astype(np.float32) for k, v in sent.items()} for n in holders}
    weights = {n: int(rng.integers(10, 500)) for n in holders}
    masked = {}
    alive = holders[:len(holders) - drop]  # the last silo drops after key sharing (drop = 1)
    for n in alive:
        msg = Message(content=_wire(RecordDict({"arrays": _record(sent), "secagg": server.train_record(1)})),
                      dst_node_id=n, message_type="train")
        got, why = silo_side.masked_reply(msg, grid.contexts[n], _record(trained[n]), weights[n], f"silo-{n}")
        assert why == "" and got is not None
        assert all(got[k].numpy().dtype == np.uint32 and got[k].numpy().shape == sent[k].shape for k in sent)
        masked[n] = got
    result = server.finish(grid, 1, masked, weights, _record(sent))
    total = sum(weights[n] for n in alive)
    for key in sent:
        plain = sum(weights[n] * trained[n][key].astype(np.float64) for n in alive) / total
        assert np.abs(result[key].numpy() - plain).max() <= fixed_point.mean_error_bound(len(alive), total) + 1e-6
    assert server.rounds == [{"round": 1, "asked": 4, "advertised": 4, "threshold": 3, "holders": 4,
                              "survivors": 4 - drop, "dropped": drop,
                              "quantisation-bound": fixed_point.mean_error_bound(4 - drop, total)}]
    again = grid.create_message(RecordDict({"secagg": ConfigRecord(
        {"round": 1, "survivors": holders[:2], "dropped": [], "senders": [], "ciphertexts": []})}),
        "query.secagg_unmask", holders[0], "1")
    with pytest.raises(ProtocolError, match="already unmasked once"):  # a server asking twice gets nothing
        silo_side.unmask(again, grid.contexts[holders[0]])


def test_silos_offline_at_the_key_stage_leave_too_few_and_the_server_says_so() -> None:
    grid, server = _federation(3, threshold=3)
    grid.offline = {13}
    with pytest.raises(ProtocolError, match="only 2 of 3 silos advertised keys, fewer than the reconstruction "
                                            "threshold 3"):
        server.setup(grid, sorted(grid.contexts), server_round=2)


def test_a_silo_refuses_an_update_outside_the_fixed_point_range() -> None:
    grid, server = _federation(3)
    sent = {"w": np.zeros(3, dtype=np.float32)}
    server.setup(grid, sorted(grid.contexts), server_round=1)
    msg = Message(content=_wire(RecordDict({"arrays": _record(sent), "secagg": server.train_record(1)})),
                  dst_node_id=11, message_type="train")
    huge = {"w": np.array([0.0, 1e3, 0.0], dtype=np.float32)}
    got, why = silo_side.masked_reply(msg, grid.contexts[11], _record(huge), 1000, "silo-11")
    assert got is None and "does not fit" in why and "exceeds the fixed-point range" in why
