"""One round of secure aggregation with double masking (Bonawitz et al., CCS 2017, §4).

Stages (the server relays every message; it never holds a silo's secret or a clear update):

1. **advertise keys** — each silo draws two X25519 key pairs for this round, ``c`` (to
   encrypt shares) and ``s`` (to agree pairwise masks), and sends the public halves;
2. **share keys** — given every participant's public keys, each silo draws a self-mask seed
   ``b`` and splits ``b`` and its ``s`` private key into t-of-n Shamir shares, one per
   participant, each encrypted for its holder (ChaCha20-Poly1305 under the ``c`` agreement);
3. **masked input** — each silo sends ``y = x + PRG(b) + Σ_{v>u} PRG(s_uv) − Σ_{v<u} PRG(s_uv)``
   (mod 2^32) over the silos ``v`` that completed stage 2; the pairwise masks cancel in the sum;
4. **unmask** — told who sent an input (survivors) and who did not (dropped), each survivor
   reveals its share of ``b`` of every survivor and of ``s`` of every dropped silo, once.
   The server rebuilds the seeds, removes the self masks of the survivors and the
   unmatched pairwise masks of the dropped, and is left with the sum of the survivors' ``x``.

A silo answers stage 4 only once per round and never reveals both kinds of share of one
silo, so with a threshold above half the participants (:func:`threshold`) a server that lies
about who dropped cannot gather ``t`` shares of both ``b_u`` and ``s_u``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from shared_model.secure_aggregation import fixed_point, shamir
from shared_model.secure_aggregation.crypto import (agreed_key, decrypt, encrypt, mask_stream, new_private_key,
                                                    public_key)


class ProtocolError(ValueError):
    """A stage that cannot go on (too few silos, an inconsistent request), in one line."""


def threshold(setting: float, participants: int) -> int:
    """The number of shares that rebuild a secret when ``participants`` silos share keys:
    ``max(2, ⌊m/2⌋ + 1, requested)``, where ``requested`` is ``⌈setting · m⌉`` for a fraction
    ``0 < setting ≤ 1`` and ``setting`` itself for a count ``> 1``. Never below a strict
    majority (see the module docstring) nor below 2 (one share would be the secret)."""
    m = int(participants)
    requested = math.ceil(setting * m - 1e-9) if setting <= 1 else int(setting)
    return max(2, m // 2 + 1, requested)


def _ad(server_round: int, sender: int, receiver: int) -> bytes:
    return f"round {server_round}: shares of {sender} for {receiver}".encode()


def _x_bytes(x: int) -> bytes:
    return x.to_bytes(4, "big")


@dataclass
class SiloRound:
    """One silo's secrets and view of one round (kept by the silo between the stages)."""

    node: int
    server_round: int
    c_sk: bytes
    s_sk: bytes
    self_seed: bytes = b""
    threshold: int = 0
    c_pks: dict[int, bytes] = field(default_factory=dict)
    s_pks: dict[int, bytes] = field(default_factory=dict)
    holders: list[int] = field(default_factory=list)  # the silos it masked with (stage 3)
    answered: bool = False  # stage 4 answered: never again this round

    @classmethod
    def start(cls, node: int, server_round: int) -> "SiloRound":
        """Stage 1: fresh key pairs for this round."""
        return cls(int(node), int(server_round), new_private_key(), new_private_key())

    def advertise(self) -> tuple[bytes, bytes]:
        """The public keys to advertise: (c, s)."""
        return public_key(self.c_sk), public_key(self.s_sk)

    def share_keys(self, keys: dict[int, tuple[bytes, bytes]], t: int) -> dict[int, bytes]:
        """Stage 2: the encrypted shares for each participant (itself included), given every
        participant's (c, s) public keys and the threshold ``t`` the silo itself computed."""
        if keys.get(self.node) != self.advertise():
            raise ProtocolError(f"node {self.node}: the key list does not hold this silo's own keys")
        if len(keys) < t:
            raise ProtocolError(f"only {len(keys)} silos shared keys, fewer than the threshold {t}")
        self.threshold = t
        self.c_pks = {v: k[0] for v, k in keys.items()}
        self.s_pks = {v: k[1] for v, k in keys.items()}
        self.self_seed = os.urandom(32)
        order = sorted(keys)
        b_shares = shamir.split(int.from_bytes(self.self_seed, "big"), len(order), t)
        s_shares = shamir.split(int.from_bytes(self.s_sk, "big"), len(order), t)
        out = {}
        for v, (x, yb), (_, ys) in zip(order, b_shares, s_shares):
            key = agreed_key(self.c_sk, self.c_pks[v], "share", self.server_round)
            out[v] = encrypt(key, _x_bytes(x) + shamir.to_bytes(yb) + shamir.to_bytes(ys),
                             _ad(self.server_round, self.node, v))
        return out

    def mask(self, encoded: np.ndarray, holders: list[int]) -> np.ndarray:
        """Stage 3: ``encoded`` (uint32) plus its self mask and pairwise masks with ``holders``
        (the silos that completed stage 2, itself included)."""
        holders = sorted(int(v) for v in holders)
        unknown = [v for v in holders if v not in self.s_pks]
        if unknown or self.node not in holders:
            raise ProtocolError(f"node {self.node}: the share holders {holders} are not the silos it shared keys with")
        if len(holders) < self.threshold:
            raise ProtocolError(f"only {len(holders)} silos hold shares, fewer than the threshold {self.threshold}")
        self.holders = holders
        y = fixed_point.add(encoded, mask_stream(self.self_seed, encoded.size))
        for v in holders:
            if v == self.node:
                continue
            stream = mask_stream(agreed_key(self.s_sk, self.s_pks[v], "mask", self.server_round), encoded.size)
            y = fixed_point.add(y, stream) if self.node < v else fixed_point.sub(y, stream)
        return y

    def unmask_shares(self, survivors: list[int], dropped: list[int], ciphertexts: dict[int, bytes]) -> dict[int, bytes]:
        """Stage 4, once: for each survivor its share of ``b``, for each dropped silo its share
        of ``s`` (4-byte x then the 66-byte y), decrypted from the ciphertexts addressed to it."""
        if self.answered:
            raise ProtocolError(f"node {self.node}: round {self.server_round} was already unmasked once")
        surv, drop = set(map(int, survivors)), set(map(int, dropped))
        if surv & drop:
            raise ProtocolError(f"silos {sorted(surv & drop)} are named both survivor and dropped")
        if not surv | drop <= set(self.holders) or self.node not in surv:
            raise ProtocolError(f"node {self.node}: survivors and dropped are not the silos it masked with")
        if len(surv) < self.threshold:
            raise ProtocolError(f"only {len(surv)} silos sent a masked input, fewer than the threshold {self.threshold}")
        self.answered = True
        out = {}
        for v in sorted(surv | drop):
            key = agreed_key(self.c_sk, self.c_pks[v], "share", self.server_round)
            plain = decrypt(key, ciphertexts[v], _ad(self.server_round, v, self.node))
            x, yb, ys = plain[:4], plain[4:4 + shamir.SHARE_BYTES], plain[4 + shamir.SHARE_BYTES:]
            out[v] = x + (yb if v in surv else ys)
        return out

    def to_dict(self) -> dict[str, Any]:
        """ConfigRecord-ready values (ints, bytes, lists, bools)."""
        ids = sorted(self.c_pks)
        return {"node": self.node, "round": self.server_round, "c-sk": self.c_sk, "s-sk": self.s_sk,
                "self-seed": self.self_seed, "threshold": self.threshold, "ids": ids,
                "c-pks": [self.c_pks[v] for v in ids], "s-pks": [self.s_pks[v] for v in ids],
                "holders": list(self.holders), "answered": self.answered}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SiloRound":
        ids = [int(v) for v in d.get("ids", [])]
        return cls(int(d["node"]), int(d["round"]), bytes(d["c-sk"]), bytes(d["s-sk"]), bytes(d.get("self-seed", b"")),
                   int(d.get("threshold", 0)), dict(zip(ids, map(bytes, d.get("c-pks", [])))),
                   dict(zip(ids, map(bytes, d.get("s-pks", [])))), [int(v) for v in d.get("holders", [])],
                   bool(d.get("answered", False)))


def _secret(v: int, shares: dict[int, dict[int, bytes]], t: int) -> bytes:
    """Silo ``v``'s secret (32 bytes) from the shares the responders revealed of it."""
    points = [(int.from_bytes(s[v][:4], "big"), shamir.from_bytes(s[v][4:])) for s in shares.values() if v in s]
    if len(points) < t:
        raise ProtocolError(f"only {len(points)} shares of silo {v}'s secret arrived, fewer than the threshold {t}")
    value = shamir.combine(points[:t])
    if value >= 1 << 256:
        raise ProtocolError(f"the shares of silo {v}'s secret are inconsistent")
    return value.to_bytes(32, "big")


def unmask_sum(masked_sum: np.ndarray, survivors: list[int], dropped: list[int], shares: dict[int, dict[int, bytes]],
               s_pks: dict[int, bytes], t: int, server_round: int) -> np.ndarray:
    """The server's stage 4: the sum (uint32) of the survivors' encoded inputs, from the sum
    of their masked inputs and the revealed shares (``shares[responder][silo]``)."""
    if len(shares) < t:
        raise ProtocolError(f"only {len(shares)} silos answered the unmask request, fewer than the threshold {t}")
    total = np.asarray(masked_sum, dtype=np.uint32)
    for v in survivors:
        total = fixed_point.sub(total, mask_stream(_secret(v, shares, t), total.size))
    for v in dropped:
        s_sk = _secret(v, shares, t)
        if public_key(s_sk) != s_pks[v]:
            raise ProtocolError(f"the rebuilt key of dropped silo {v} does not match the key it advertised")
        for u in survivors:
            stream = mask_stream(agreed_key(s_sk, s_pks[u], "mask", server_round), total.size)
            total = fixed_point.sub(total, stream) if u < v else fixed_point.add(total, stream)
    return total
