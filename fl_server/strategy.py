"""FedAvg over adapter+head arrays that also records every silo's metrics, skips silos
whose privacy budget is exhausted, and checkpoints the global model each round."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from logging import INFO, WARNING

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fl_server.records import RunRecords


def payload_bytes(arrays: ArrayRecord) -> tuple[int, int]:
    """(raw tensor bytes, serialised array bytes incl. per-array headers, before gRPC framing)."""
    return sum(a.numpy().nbytes for a in arrays.values()), sum(len(a.data) for a in arrays.values())


class RecordingFedAvg(FedAvg):
    """Flower's FedAvg (weighted by ``num-examples``) plus per-silo records.

    ``on_round_end(round, arrays)`` is called with each new global model (checkpointing).
    """

    def __init__(
        self,
        records: RunRecords,
        on_round_end: Callable[[int, ArrayRecord], None] | None = None,
        **kwargs: object,
    ) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.records = records
        self.on_round_end = on_round_end
        self.exhausted: set[int] = set()

    # ------------------------------------------------------------------ train
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = list(super().configure_train(server_round, arrays, config, grid))
        kept = [m for m in messages if m.metadata.dst_node_id not in self.exhausted]
        if len(kept) < len(messages):
            log(INFO, "round %d: not sampling %d silo(s) with exhausted budgets", server_round, len(messages) - len(kept))
        return kept

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        training: list[Message] = []
        for msg in replies:
            if msg.has_error():
                log(WARNING, "round %d: node %d failed: %s", server_round, msg.metadata.src_node_id, msg.error.reason)
                continue
            metrics = dict(msg.content["metrics"])
            silo = str(msg.content["info"]["silo"]) if "info" in msg.content else str(msg.metadata.src_node_id)
            metrics["tensor-bytes"], metrics["payload-bytes"] = payload_bytes(msg.content["arrays"])
            self.records.add(server_round, "train", silo, msg.metadata.src_node_id, metrics)
            if metrics.get("budget-exhausted"):
                self.exhausted.add(msg.metadata.src_node_id)
                log(WARNING, "round %d: silo %s has exhausted its privacy budget; it will not be sampled again", server_round, silo)
            else:
                training.append(msg)
        arrays, metrics = (None, None)
        if training:
            arrays, metrics = super().aggregate_train(server_round, training)
        if arrays is not None and self.on_round_end is not None:
            self.on_round_end(server_round, arrays)
        return arrays, metrics

    # --------------------------------------------------------------- evaluate
    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = list(replies)
        for msg in replies:
            if msg.has_error():
                log(WARNING, "round %d: evaluation on node %d failed: %s", server_round, msg.metadata.src_node_id, msg.error.reason)
                continue
            silo = str(msg.content["info"]["silo"]) if "info" in msg.content else str(msg.metadata.src_node_id)
            self.records.add(server_round, "evaluate", silo, msg.metadata.src_node_id, dict(msg.content["metrics"]))
        aggregated = super().aggregate_evaluate(server_round, replies)
        if aggregated is not None:
            self.records.add(server_round, "evaluate", "ALL", 0, dict(aggregated))
        self.records.write()
        log(INFO, "\n%s", self.records.table(server_round))
        return aggregated

    def evaluate_initial(self, grid: Grid, arrays: ArrayRecord, timeout: float) -> None:
        """Round 0: federated evaluation of the untrained global model."""
        replies = grid.send_and_receive(
            messages=self.configure_evaluate(0, arrays, ConfigRecord(), grid), timeout=timeout
        )
        self.aggregate_evaluate(0, replies)
