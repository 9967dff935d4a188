"""FedAvg over adapter+head arrays that also records every silo's metrics, gathers the
silos' privacy-ledger records (rounds, refusals, metric releases) into the run's federation ledger, skips silos whose privacy
budget is exhausted or whose own policy refused the run (printed with the silo and rule,
kept in ``refusals`` for metrics.json, never aggregated), refuses malformed or non-finite
updates (:mod:`fl_server.update_checks`), records every failed reply in ``metrics.json``,
ends the run when no silo can train, and checkpoints the global model each round.

With ``secure`` (:class:`fl_server.secure_aggregation.SecureAggregation`, run config
``secure-aggregation = true``) the server holds only masked updates: each round it runs the
key stages before training, checks what it can of each masked reply
(:func:`fl_server.update_checks.masked_problem`), unmasks the sum, and checks the decoded
mean (finite, sane size); when fewer silos than the reconstruction threshold are left it
REFUSES the round (logged, in ``problems`` and ``secure-aggregation``), the model unchanged."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from logging import INFO, WARNING
from typing import cast

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result

from fl_server.records import RunRecords
from fl_server.secure_aggregation import SecureAggregation
from fl_server.update_checks import cap_weights, masked_problem, update_problem
from shared_model.adapters import arrays_sha256
from shared_model.dataset import FEDERATION_MISMATCH
from shared_model.popularity import PRIOR_RECORD
from shared_model.privacy.ledger import Ledger, LedgerError
from shared_model.privacy.records import parse_record, write_record
from shared_model.secure_aggregation.protocol import ProtocolError
from shared_model.transitions import TRANSITIONS_RECORD


class AllBudgetsExhausted(Exception):
    """Raised inside the round loop when every connected silo has refused to train."""


def payload_bytes(arrays: ArrayRecord) -> tuple[int, int]:
    """(raw tensor bytes, serialised array bytes incl. per-array headers, before gRPC framing)."""
    return sum(a.numpy().nbytes for a in arrays.values()), sum(len(a.data) for a in arrays.values())


def error_reason(msg: Message) -> str:
    """An error reply's reason in one line: the ClientApp exception's own message when Flower
    wrapped it (``... Message: <text>``), else the reason as given, at most 300 characters."""
    reason = str(msg.error.reason)
    if "Message: " in reason:
        reason = reason.rsplit("Message: ", 1)[1].rstrip("'>\n ")
    return " ".join(reason.split())[:300]


class FederationMismatch(RuntimeError):
    """A silo reported that the federation does not have one SuperNode per silo of the dataset."""


def fail_on_federation_mismatch(msg: Message) -> None:
    """End the run (the ServerApp fails visibly) when a node says the federation is the wrong size."""
    reason = str(msg.error.reason)
    if FEDERATION_MISMATCH in reason:
        start = reason.index(FEDERATION_MISMATCH)
        raise FederationMismatch(reason[start:].rstrip("'>"))


def _device(msg: Message) -> str:
    """The device a silo reported (``cpu``, ``cuda``, ``cuda:0``)."""
    return str(msg.content["info"].get("device", "")) if "info" in msg.content else ""


def ledger_records(msg: Message) -> list[ConfigRecord]:
    """The ledger lines a reply carries (ConfigRecords ``ledger``, ``ledger-1``, …), in the order
    the silo wrote them (a DP-SGD round, then a plain-release declaration, …)."""
    extra = sorted((int(k.split("-", 1)[1]), k) for k in msg.content.keys()
                   if k.startswith("ledger-") and k.split("-", 1)[1].isdigit())
    return ([msg.content["ledger"]] if "ledger" in msg.content else []) + [msg.content[k] for _, k in extra]


def _release(msg: Message) -> dict[str, str]:
    """What the silo said about its metrics: ``release-metrics`` (none | dp | plain), from its info."""
    if "info" not in msg.content or "release-metrics" not in msg.content["info"]:
        return {}
    return {"release-metrics": str(msg.content["info"]["release-metrics"])}


def _status(msg: Message) -> tuple[str, str]:
    """A reply's ``status`` ConfigRecord: (status, "rule: reason"); ("", "") when absent."""
    if "status" not in msg.content:
        return "", ""
    rec = msg.content["status"]
    rule, reason = str(rec.get("rule", "")), str(rec.get("reason", ""))
    return str(rec.get("status", "")), f"{rule}: {reason}" if rule else reason


UNDEFINED = -1.0  # a silo's value of a metric its users leave undefined (fl_client.evaluate._finite)


def mean_of_defined(records: list[RecordDict], weighting_metric_name: str) -> MetricRecord:
    """The ``ALL`` evaluation row: per metric, the ``weighting_metric_name``-weighted mean over
    the silos that define it (a silo's -1 means undefined there and is left out, not averaged);
    -1 when no silo defines it. Flower's own ``aggregate_metricrecords`` would average the -1."""
    out = MetricRecord()
    metrics = [next(iter(r.metric_records.values())) for r in records]
    for key in dict.fromkeys(k for m in metrics for k in m.keys() if k != weighting_metric_name):
        pairs = [(float(cast(float, m[weighting_metric_name])), float(cast(float, m[key]))) for m in metrics
                 if key in m and not isinstance(m[key], list) and float(cast(float, m[key])) != UNDEFINED]
        total = sum(w for w, _ in pairs)
        out[key] = sum(w * v for w, v in pairs) / total if pairs and total > 0 else UNDEFINED
    return out


class RecordingFedAvg(FedAvg):
    """Flower's FedAvg (weighted by ``num-examples``) plus per-silo records.

    ``on_round_end(round, arrays)`` is called with each new global model (checkpointing).
    ``first_round`` > 1 resumes a run: Flower's round loop counts from 1, and every round it
    passes is shifted by ``first_round - 1`` (the silos see, and record, the run's round).
    """

    def __init__(
        self,
        records: RunRecords,
        on_round_end: Callable[[int, ArrayRecord], None] | None = None,
        ledger: Ledger | None = None,
        first_round: int = 1,
        secure: SecureAggregation | None = None,
        **kwargs: object,
    ) -> None:
        kwargs.setdefault("evaluate_metrics_aggr_fn", mean_of_defined)
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.round_offset = first_round - 1
        self.records = records
        self.on_round_end = on_round_end
        self.ledger = ledger
        self.secure = secure
        self.grid: Grid | None = None  # the round's grid (secure aggregation's extra stages)
        self.exhausted: set[int] = set()  # budget exhausted or refused by the silo's policy
        self.refusals: list[dict[str, object]] = []  # {round, phase, silo, node-id, status, reason}
        self.ended_early: int | None = None  # round at which no silo could train
        self.sent: ArrayRecord | None = None  # the global arrays of the current round
        self.popularity: ArrayRecord | None = None  # the popularity prior every message carries (if any)
        self.transitions: ArrayRecord | None = None  # the transition table every message carries (if any)
        self.sampled: dict[int, set[int]] = {}  # round -> node ids asked to train
        self.silo_of: dict[int, str] = {}  # node id -> silo name, from the node's replies
        self.missing: list[dict[str, object]] = []  # {round, node-ids, silos}: asked, no reply
        if first_round > 1:  # a resumed run keeps what the interrupted one recorded
            self.missing = [m for m in records.run_info.get("missing", []) if m["round"] < first_round]
            self.refusals = [r for r in records.run_info.get("refusals", []) if r["round"] < first_round]

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3, **kwargs: object) -> Result:  # type: ignore[override]
        """Flower's round loop, ended cleanly when every silo's budget is exhausted."""
        try:
            return super().start(grid=grid, initial_arrays=initial_arrays, num_rounds=num_rounds, **kwargs)  # type: ignore[arg-type]
        except AllBudgetsExhausted as stop:
            log(WARNING, "%s; ending the run before round %s of %d", stop, self.ended_early, num_rounds)
            return Result()

    # ------------------------------------------------------------------ train
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        server_round += self.round_offset
        nodes = set(grid.get_node_ids())
        if nodes and nodes <= self.exhausted:
            self.ended_early = server_round
            raise AllBudgetsExhausted(f"all {len(nodes)} silo(s) have exhausted their privacy budgets "
                                      "or refused the run under their own privacy policy")
        self.sent = arrays
        messages = self._with_prior(super().configure_train(server_round, arrays, config, grid))
        kept = [m for m in messages if m.metadata.dst_node_id not in self.exhausted]
        if len(kept) < len(messages):
            log(INFO, "round %d: not sampling %d silo(s) with exhausted budgets", server_round, len(messages) - len(kept))
        if self.secure is not None and kept:
            kept = self._secure_setup(server_round, kept, grid)
        self.sampled[server_round] = {m.metadata.dst_node_id for m in kept}
        return kept

    def _secure_setup(self, server_round: int, kept: list[Message], grid: Grid) -> list[Message]:
        """Secure aggregation's key stages; the train messages of the share holders (none when refused)."""
        assert self.secure is not None
        self.grid = grid
        try:
            holders = set(self.secure.setup(grid, sorted(m.metadata.dst_node_id for m in kept), server_round))
        except ProtocolError as exc:
            self._refuse_secure(server_round, str(exc))
            return []
        for m in kept:
            m.content["secagg"] = self.secure.train_record(server_round)
        return [m for m in kept if m.metadata.dst_node_id in holders]

    def _refuse_secure(self, server_round: int, reason: str) -> None:
        """Refuse to aggregate the round: too few silos for secure aggregation's threshold."""
        reason = f"secure aggregation refused to aggregate: {reason}"
        log(WARNING, "round %d: %s; the global model is unchanged", server_round, reason)
        self.records.problem(server_round, "train", "secure-aggregation", 0, "refused", reason)
        if self.secure is not None and self.secure.rounds and self.secure.rounds[-1]["round"] == server_round:
            self.secure.rounds[-1]["refused"] = reason
        self.records.run_info["secure-aggregation"] = self.secure.rounds if self.secure is not None else []

    def note_missing(self, server_round: int, replied: set[int]) -> None:
        """Record (in metrics.json ``missing``) the silos asked to train that sent no reply."""
        gone = sorted(self.sampled.get(server_round, set()) - replied)
        if not gone:
            return
        silos = [self.silo_of.get(n, f"node {n}") for n in gone]
        self.missing.append({"round": server_round, "node-ids": gone, "silos": silos})
        self.records.run_info["missing"] = self.missing
        log(WARNING, "round %d: no reply from %s; the round goes on with the other silos", server_round, ", ".join(silos))

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.round_offset
        replies = list(replies)
        training: list[Message] = []
        failed = declined = 0
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                fail_on_federation_mismatch(msg)
                log(WARNING, "round %d: node %d failed: %s", server_round, node, msg.error.reason)
                self.records.problem(server_round, "train", self._silo(msg), node, "error", error_reason(msg))
                failed += 1
                continue
            metrics = dict(msg.content["metrics"]) if "metrics" in msg.content else {}
            silo = self._silo(msg)
            if "arrays" in msg.content:
                metrics["tensor-bytes"], metrics["payload-bytes"] = payload_bytes(msg.content["arrays"])
                # the audit matches update-sha256 with the ledger's model-sha256; masked arrays match nothing
                metrics["masked-sha256" if self.secure else "update-sha256"] = arrays_sha256(msg.content["arrays"])
            metrics["device"] = _device(msg)
            self.records.add(server_round, "train", silo, node, {**metrics, **_release(msg)})
            if self.ledger is not None:
                for line in ledger_records(msg):
                    self.append_ledger(line, node)
            kind, reason = _status(msg)
            if kind == "refused":
                self.exhausted.add(node)
                self._note_refusal(server_round, "train", silo, node, kind, reason)
                declined += 1
            elif kind == "failed":
                reason = reason or "no reason given"
                log(WARNING, "round %d: silo %s failed and sent no update: %s", server_round, silo, reason)
                self.records.problem(server_round, "train", silo, node, "failed", reason)
                failed += 1
            elif metrics.get("budget-exhausted"):
                self.exhausted.add(node)
                self.refusals.append({"round": server_round, "phase": "train", "silo": silo, "node-id": node,
                                      "status": "budget-exhausted", "reason": reason})
                log(WARNING, "round %d: silo %s has exhausted its privacy budget (%s); it will not be sampled again",
                    server_round, silo, reason or "no reason given")
                declined += 1
            elif (problem := self._update_problem(msg.content["arrays"], metrics.get("num-examples"))
                  if "arrays" in msg.content else "no arrays in the reply"):
                log(WARNING, "round %d: refusing silo %s's update: %s", server_round, silo, problem)
                self.records.problem(server_round, "train", silo, node, "refused", problem)
                failed += 1
            else:
                training.append(msg)
        if self.secure is None:
            self._cap_weights(server_round, training)
        self.note_missing(server_round, {m.metadata.src_node_id for m in replies if not m.has_error()})
        arrays, metrics = (None, None)
        if training and self.secure is not None:
            arrays, metrics = self._secure_aggregate(server_round, training)
            if arrays is None:
                training = []
        elif training:
            arrays, metrics = super().aggregate_train(server_round, training)
        self.records.outcome(server_round, "train", len(training), failed, declined)
        if not training:
            log(WARNING, "round %d: no silo's update was accepted; the global model is unchanged", server_round)
        self.records.write()
        if arrays is not None and self.on_round_end is not None:
            self.on_round_end(server_round, arrays)
        return arrays, metrics

    def _update_problem(self, arrays: ArrayRecord, num_examples: object) -> str | None:
        if self.secure is None:
            return update_problem(arrays, self.sent, num_examples)
        assert self.sent is not None
        return masked_problem(arrays, self.sent, num_examples)

    def _secure_aggregate(self, server_round: int, training: list[Message]) -> tuple[ArrayRecord | None,
                                                                                     MetricRecord | None]:
        """Unmask the sum of the accepted masked replies; None when the round is refused."""
        assert self.secure is not None and self.grid is not None and self.sent is not None
        masked = {m.metadata.src_node_id: m.content["arrays"] for m in training}
        weights = {m.metadata.src_node_id: int(m.content["metrics"]["num-examples"]) for m in training}
        try:
            arrays = self.secure.finish(self.grid, server_round, masked, weights, self.sent)
        except ProtocolError as exc:
            self._refuse_secure(server_round, str(exc))
            return None, None
        problem = update_problem(arrays, self.sent, sum(weights.values()))
        if problem:
            self._refuse_secure(server_round, f"the decoded weighted mean is unacceptable: {problem}")
            return None, None
        self.records.run_info["secure-aggregation"] = self.secure.rounds
        return arrays, self.train_metrics_aggr_fn([m.content for m in training], self.weighted_by_key)

    def _note_refusal(self, server_round: int, phase: str, silo: str, node_id: int, status: str, reason: str) -> None:
        """Print and keep a silo's policy refusal (once per silo and phase)."""
        if any(r["silo"] == silo and r["phase"] == phase and r["status"] == status for r in self.refusals):
            return
        self.refusals.append({"round": server_round, "phase": phase, "silo": silo, "node-id": node_id,
                              "status": status, "reason": reason})
        log(WARNING, "fedshift: round %d: silo %s REFUSED to %s under its own privacy policy: %s; left out",
            server_round, silo, phase, reason or "no reason given")

    def _silo(self, msg: Message) -> str:
        """The silo that sent ``msg`` (an error reply has no content: the name an earlier reply gave)."""
        node = msg.metadata.src_node_id
        if not msg.has_error() and "info" in msg.content:
            self.silo_of[node] = str(msg.content["info"]["silo"])
        return self.silo_of.get(node, f"node-{node}")

    def _cap_weights(self, server_round: int, training: list[Message]) -> None:
        """Cap each accepted reply's ``num-examples`` (:func:`fl_server.update_checks.cap_weights`)."""
        claims = {i: int(m.content["metrics"]["num-examples"]) for i, m in enumerate(training)}
        for i, weight in cap_weights(claims).items():
            if weight < claims[i]:
                msg = training[i]
                silo = str(msg.content["info"]["silo"]) if "info" in msg.content else str(msg.metadata.src_node_id)
                reason = f"num-examples {claims[i]} capped to {weight} (10 × the median of the other silos' claims)"
                log(WARNING, "round %d: silo %s: %s", server_round, silo, reason)
                self.records.problem(server_round, "train", silo, msg.metadata.src_node_id, "capped", reason)
                msg.content["metrics"]["num-examples"] = weight

    def append_ledger(self, record: ConfigRecord, node_id: int) -> None:
        """Append a silo's ledger record (a round or a refusal) to the federation ledger; the
        silo's own chain hash is kept as ``silo-sha256`` (it names the line in the silo's ledger)
        and the silo's ``signature`` as sent (``fedshift audit --silo-keys`` checks it).
        A record that does not parse as a known kind is logged and not appended."""
        assert self.ledger is not None
        raw = {k: v for k, v in dict(record).items() if k not in {"sha256", "prev-sha256"}}
        try:
            typed = parse_record(raw, f"reply-of-node-{node_id}")
        except LedgerError as exc:
            log(WARNING, "node %d sent a ledger record the server cannot read (%s); not recorded", node_id, exc)
            return
        signed = {"signature": str(record["signature"])} if record.get("signature") else {}  # the silo's, kept as sent
        write_record(self.ledger, typed, {"silo-sha256": str(record.get("sha256", "")), "node-id": int(node_id), **signed})

    # --------------------------------------------------------------- evaluate
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self._with_prior(super().configure_evaluate(server_round + self.round_offset, arrays, config, grid))

    def _with_prior(self, messages: Iterable[Message]) -> list[Message]:
        """``messages`` each carrying the popularity prior and the transition table, when there are."""
        out = list(messages)
        for name, record in ((PRIOR_RECORD, self.popularity), (TRANSITIONS_RECORD, self.transitions)):
            for m in out if record is not None else []:
                m.content[name] = record
        return out

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        server_round += self.round_offset
        replies = list(replies)
        answered: list[Message] = []
        for msg in replies:
            if msg.has_error():
                fail_on_federation_mismatch(msg)
                node = msg.metadata.src_node_id
                log(WARNING, "round %d: evaluation on node %d failed: %s", server_round, node, msg.error.reason)
                self.records.problem(server_round, "evaluate", self._silo(msg), node, "error", error_reason(msg))
                continue
            silo = self._silo(msg)
            kind, reason = _status(msg)
            if kind == "refused":
                self._note_refusal(server_round, "evaluate", silo, msg.metadata.src_node_id, kind, reason)
                continue
            self.records.add(server_round, "evaluate", silo, msg.metadata.src_node_id,
                             {**dict(msg.content["metrics"]), "device": _device(msg), **_release(msg)})
            if self.ledger is not None:
                for line in ledger_records(msg):
                    self.append_ledger(line, msg.metadata.src_node_id)
            if float(msg.content["metrics"].get("num-examples", 0)) > 0:
                answered.append(msg)
        failed = sum(1 for m in replies if m.has_error())
        self.records.outcome(server_round, "evaluate", len(answered), failed, len(replies) - failed - len(answered))
        aggregated = super().aggregate_evaluate(server_round, answered) if answered else None
        if aggregated is not None:
            self.records.add(server_round, "evaluate", "ALL", 0, dict(aggregated))
        self.records.write()
        log(INFO, "\n%s", self.records.table(server_round))
        return aggregated

    def evaluate_initial(self, grid: Grid, arrays: ArrayRecord, timeout: float) -> None:
        """Round 0: federated evaluation of the untrained global model."""
        assert self.round_offset == 0, "a resumed run has its round 0 already"
        replies = grid.send_and_receive(
            messages=self.configure_evaluate(0, arrays, ConfigRecord(), grid), timeout=timeout
        )
        self.aggregate_evaluate(0, replies)
