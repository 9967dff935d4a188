"""The server's side of secure aggregation (docs/secure-aggregation.md): thin Flower glue
over :mod:`shared_model.secure_aggregation`; the server relays keys and ciphertexts, and
only ever holds masked arrays and, at the end, their sum.

Per round, :meth:`SecureAggregation.setup` asks the sampled silos through the Grid for
their public keys (``query.secagg_keys``) and then for their encrypted shares
(``query.secagg_share``); the train messages then carry the list of share holders
(:meth:`SecureAggregation.train_record`); :meth:`SecureAggregation.finish` sends each
survivor its ciphertexts with the survivor/dropped lists (``query.secagg_unmask``),
rebuilds the seeds, and returns the weighted mean ``global + Σ n_i Δ_i / Σ n_i``.

Whenever fewer silos than the reconstruction threshold are left, a stage raises
:class:`~shared_model.secure_aggregation.protocol.ProtocolError` naming the stage and the
counts; the strategy refuses the round with it. ``rounds`` summarises each round for
metrics.json (participants, threshold, survivors, dropped, refusal).

Test hook: ``FEDSHIFT_TEST_SECAGG_RECORD=<dir>`` in the server's environment writes every
masked array set it received (``server-received-round-<r>-node-<n>.npz``) and the aggregate
(``server-aggregate-round-<r>.npz``), for the test that shows no clear update arrives.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from logging import INFO, WARNING
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.common import log
from flwr.serverapp import Grid

from shared_model.io_utils import write_bytes_atomic
from shared_model.secure_aggregation import fixed_point, vectors
from shared_model.secure_aggregation.protocol import ProtocolError, threshold, unmask_sum

RECORD_ENV = "FEDSHIFT_TEST_SECAGG_RECORD"


@dataclass
class Session:
    """What the server relays for one round (public keys and ciphertexts only)."""

    server_round: int
    threshold: int
    keys: dict[int, tuple[bytes, bytes]]  # node -> (c, s) public keys
    ciphertexts: dict[int, dict[int, bytes]] = field(default_factory=dict)  # sender -> receiver -> ct

    @property
    def holders(self) -> list[int]:
        return sorted(self.ciphertexts)


def _good(replies: Iterable[Message], stage: str, server_round: int) -> list[Message]:
    out = []
    for msg in replies:
        if msg.has_error():
            log(WARNING, "round %d: secure aggregation %s: node %d failed: %s", server_round, stage,
                msg.metadata.src_node_id, msg.error.reason)
        elif "secagg" in msg.content:
            out.append(msg)
    return out


class SecureAggregation:
    """The server's stages; ``setting`` is the run config's ``secagg-threshold``."""

    def __init__(self, setting: float, timeout: float = 3600.0) -> None:
        self.setting = setting
        self.timeout = timeout
        self.sessions: dict[int, Session] = {}
        self.rounds: list[dict[str, object]] = []

    def _ask(self, grid: Grid, action: str, contents: dict[int, dict], server_round: int) -> list[Message]:
        messages = [grid.create_message(RecordDict({"secagg": ConfigRecord({"round": server_round, **c})}),
                                        f"query.{action}", node, str(server_round)) for node, c in contents.items()]
        return _good(grid.send_and_receive(messages, timeout=self.timeout), action, server_round)

    def setup(self, grid: Grid, nodes: list[int], server_round: int) -> list[int]:
        """Stages 1-2 with ``nodes``; the share holders (the silos to ask to train).
        Raises ProtocolError when fewer than the threshold are left."""
        summary: dict[str, object] = {"round": server_round, "asked": len(nodes)}
        self.rounds.append(summary)
        replies = self._ask(grid, "secagg_keys", {n: {} for n in nodes}, server_round)
        keys = {m.metadata.src_node_id: (bytes(m.content["secagg"]["c-pk"]), bytes(m.content["secagg"]["s-pk"]))
                for m in replies}
        t = threshold(self.setting, len(keys))
        summary.update({"advertised": len(keys), "threshold": t})
        if len(keys) < t:
            raise ProtocolError(f"only {len(keys)} of {len(nodes)} silos advertised keys, fewer than the "
                                f"reconstruction threshold {t} (secagg-threshold = {self.setting:g})")
        ids = sorted(keys)
        listing = {"nodes": ids, "c-pks": [keys[v][0] for v in ids], "s-pks": [keys[v][1] for v in ids]}
        session = Session(server_round, t, keys)
        for m in self._ask(grid, "secagg_share", {n: listing for n in ids}, server_round):
            rec = m.content["secagg"]
            to = [int(v) for v in rec["to"]]
            if sorted(to) == ids:
                session.ciphertexts[m.metadata.src_node_id] = dict(zip(to, map(bytes, rec["ciphertexts"])))
        summary["holders"] = len(session.holders)
        if len(session.holders) < t:
            raise ProtocolError(f"only {len(session.holders)} of {len(ids)} silos shared keys, fewer than the "
                                f"reconstruction threshold {t}")
        self.sessions[server_round] = session
        log(INFO, "round %d: secure aggregation: %d silos hold shares (threshold %d)", server_round,
            len(session.holders), t)
        return session.holders

    def train_record(self, server_round: int) -> ConfigRecord:
        """What a train message carries: the round and the share holders to mask with."""
        return ConfigRecord({"round": server_round, "holders": self.sessions[server_round].holders})

    def finish(self, grid: Grid, server_round: int, masked: dict[int, ArrayRecord], weights: dict[int, int],
               sent: ArrayRecord) -> ArrayRecord:
        """Stage 4: the weighted mean of the silos in ``masked`` (their masked arrays, accepted
        by the server's checks) with weights ``weights``, as float32 arrays like ``sent``."""
        session = self.sessions.pop(server_round)
        summary = self.rounds[-1]
        survivors = sorted(masked)
        dropped = [v for v in session.holders if v not in masked]
        summary.update({"survivors": len(survivors), "dropped": len(dropped)})
        if len(survivors) < session.threshold:
            raise ProtocolError(f"only {len(survivors)} of {len(session.holders)} silos sent a masked update, fewer "
                                f"than the reconstruction threshold {session.threshold}")
        ref = {k: sent[k].numpy() for k in sent.keys()}
        total = np.zeros(vectors.total_size(ref), dtype=np.uint32)
        for node, arrays in masked.items():
            total = fixed_point.add(total, np.concatenate([arrays[k].numpy().ravel() for k in ref]))
        lists = {"survivors": survivors, "dropped": dropped, "senders": session.holders}
        replies = self._ask(grid, "secagg_unmask", {u: {**lists, "ciphertexts": [
            session.ciphertexts[v][u] for v in session.holders]} for u in survivors}, server_round)
        shares = {m.metadata.src_node_id: dict(zip((int(v) for v in m.content["secagg"]["silos"]),
                                                   map(bytes, m.content["secagg"]["shares"]))) for m in replies}
        summed = fixed_point.decode(unmask_sum(total, survivors, dropped, shares, {v: k[1] for v, k in
                                                                                 session.keys.items()},
                                               session.threshold, server_round))
        weight = sum(weights[v] for v in survivors)
        mean = {k: (ref[k].astype(np.float64) + d / weight).astype(ref[k].dtype)
                for k, d in vectors.split(summed, ref).items()}
        summary["quantisation-bound"] = fixed_point.mean_error_bound(len(survivors), weight)
        if dropped:
            log(WARNING, "round %d: secure aggregation recovered the sum without %d dropped silo(s)", server_round,
                len(dropped))
        result = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in mean.items()})
        if os.environ.get(RECORD_ENV):
            _record(Path(os.environ[RECORD_ENV]), server_round, masked, result)
        return result


def _npz(path: Path, arrays: ArrayRecord) -> None:
    buf = io.BytesIO()
    np.savez(buf, **{f"a:{k}": arrays[k].numpy() for k in arrays.keys()})
    write_bytes_atomic(path, buf.getvalue())


def _record(folder: Path, server_round: int, masked: dict[int, ArrayRecord], result: ArrayRecord) -> None:
    for node, arrays in masked.items():
        _npz(folder / f"server-received-round-{server_round}-node-{node}.npz", arrays)
    _npz(folder / f"server-aggregate-round-{server_round}.npz", result)
