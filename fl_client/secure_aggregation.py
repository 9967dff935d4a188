"""A silo's side of secure aggregation (docs/secure-aggregation.md): thin Flower glue over
:mod:`shared_model.secure_aggregation`.

The silo's secrets for the round (:class:`~shared_model.secure_aggregation.protocol.SiloRound`)
stay on the node in ``Context.state[STATE_KEY]`` between the stages:

* ``query.secagg_keys`` → :func:`advertise_keys`: two fresh X25519 public keys;
* ``query.secagg_share`` → :func:`share_keys`: the threshold is the silo's own (its run
  config's ``secagg-threshold`` over the silos listed), and its Shamir shares go out
  encrypted for each holder;
* the ``train`` message with a ``secagg`` record → :func:`masked_reply`: the silo sends
  ``num-examples · (trained − global)`` as masked uint32 arrays, never its clear update; it
  refuses (status ``failed``, the reason, no arrays) an update outside the fixed-point range;
* ``query.secagg_unmask`` → :func:`unmask`: its shares for the server's survivor and
  dropped lists, answered once per round.

Test hooks, from the silo process's environment (never the run config):
``FEDSHIFT_TEST_SECAGG_DROP=<silo>[@<round>],...`` makes each silo named train and then drop
out (no masked input; every round, or only the round given), as a silo that crashed after key
sharing; ``FEDSHIFT_TEST_SECAGG_RECORD=<dir>``
writes each silo's clear update and weight to ``<dir>/silo-<silo>-round-<r>.npz``, for the
test that compares them with what the server received.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from shared_model.config import RunConfig
from shared_model.io_utils import write_bytes_atomic
from shared_model.secure_aggregation import fixed_point, vectors
from shared_model.secure_aggregation.protocol import SiloRound, threshold

STATE_KEY = "fedshift-secagg"
DROP_ENV = "FEDSHIFT_TEST_SECAGG_DROP"
RECORD_ENV = "FEDSHIFT_TEST_SECAGG_RECORD"
log = logging.getLogger("fedshift.client")


def _load(msg: Message, context: Context) -> SiloRound:
    state = SiloRound.from_dict(dict(context.state[STATE_KEY])) if STATE_KEY in context.state else None
    server_round = int(msg.content["secagg"]["round"])
    if state is None or state.server_round != server_round or state.node != msg.metadata.dst_node_id:
        raise RuntimeError(f"secure aggregation: node {msg.metadata.dst_node_id} holds no keys of round {server_round}")
    return state


def _keep(context: Context, state: SiloRound) -> None:
    context.state[STATE_KEY] = ConfigRecord(state.to_dict())


def _reply(msg: Message, record: dict) -> Message:
    return Message(content=RecordDict({"secagg": ConfigRecord(record)}), reply_to=msg)


def advertise_keys(msg: Message, context: Context) -> Message:
    """Stage 1: fresh key pairs for the round; the public halves go back."""
    state = SiloRound.start(msg.metadata.dst_node_id, int(msg.content["secagg"]["round"]))
    _keep(context, state)
    c_pk, s_pk = state.advertise()
    return _reply(msg, {"c-pk": c_pk, "s-pk": s_pk})


def share_keys(msg: Message, context: Context) -> Message:
    """Stage 2: encrypted Shamir shares of the self-mask seed and the mask key, one per silo listed."""
    state = _load(msg, context)
    rec = msg.content["secagg"]
    ids = [int(v) for v in rec["nodes"]]
    keys = dict(zip(ids, zip(map(bytes, rec["c-pks"]), map(bytes, rec["s-pks"]))))
    t = threshold(RunConfig.from_run_config(dict(context.run_config)).secagg_threshold, len(ids))
    ciphertexts = state.share_keys(keys, t)
    _keep(context, state)
    return _reply(msg, {"to": list(ciphertexts), "ciphertexts": list(ciphertexts.values())})


def masked_reply(msg: Message, context: Context, trained: ArrayRecord | None, weight: int,
                 silo: str) -> tuple[ArrayRecord | None, str]:
    """Stage 3: the masked arrays of ``weight · (trained − global)``, or (None, why not): a
    silo that did not train, is told to drop (test hook) or whose update does not fit the
    fixed-point range sends nothing."""
    if trained is None:
        return None, ""
    server_round = int(msg.content["secagg"]["round"])
    if {silo, f"{silo}@{server_round}"} & set(os.environ.get(DROP_ENV, "").split(",")):
        log.error("%s: silo %s drops out after key sharing in round %d (test hook)", DROP_ENV, silo, server_round)
        return None, f"dropped out after key sharing ({DROP_ENV}, test hook)"
    state = _load(msg, context)
    holders = [int(v) for v in msg.content["secagg"]["holders"]]
    sent = {k: msg.content["arrays"][k].numpy() for k in msg.content["arrays"].keys()}
    mine = {k: trained[k].numpy() for k in trained.keys()}
    try:
        encoded = fixed_point.encode(vectors.weighted_delta(mine, sent, weight), len(holders))
    except fixed_point.RangeError as exc:
        reason = f"secure aggregation: num-examples × update does not fit: {exc}"
        log.error("silo %s: %s; sending nothing", silo, reason)
        return None, reason
    masked = state.mask(encoded, holders)
    _keep(context, state)
    if os.environ.get(RECORD_ENV):
        _record_clear(Path(os.environ[RECORD_ENV]), silo, state.server_round, mine, sent, weight, state.node)
    parts = vectors.split(masked, sent)
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in parts.items()}), ""


def _record_clear(folder: Path, silo: str, server_round: int, arrays: dict, sent: dict, weight: int, node: int) -> None:
    import io

    buf = io.BytesIO()
    np.savez(buf, __weight__=np.array(weight), __node__=np.array(node), **{f"a:{k}": v for k, v in arrays.items()},
             **{f"g:{k}": v for k, v in sent.items()})
    write_bytes_atomic(folder / f"silo-{silo}-round-{server_round}.npz", buf.getvalue())


def unmask(msg: Message, context: Context) -> Message:
    """Stage 4, once per round: its shares of the survivors' seeds and the dropped silos' keys."""
    state = _load(msg, context)
    rec = msg.content["secagg"]
    ciphertexts = dict(zip((int(v) for v in rec["senders"]), map(bytes, rec["ciphertexts"])))
    try:
        shares = state.unmask_shares([int(v) for v in rec["survivors"]], [int(v) for v in rec["dropped"]], ciphertexts)
    finally:
        _keep(context, dataclasses.replace(state, answered=True))  # asked once: never answer this round again
    return _reply(msg, {"silos": list(shares), "shares": list(shares.values())})
