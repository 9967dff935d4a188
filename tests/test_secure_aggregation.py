"""The secure-aggregation protocol without Flower: Shamir on a known value, fixed-point
wraparound and range, the masked sum = plain weighted FedAvg within the stated bound, a
silo that drops after key sharing, too few silos, and a server that asks twice."""

from __future__ import annotations

import numpy as np
import pytest

from shared_model.secure_aggregation import fixed_point, shamir
from shared_model.secure_aggregation.crypto import DecryptionError, mask_stream
from shared_model.secure_aggregation.protocol import ProtocolError, SiloRound, threshold, unmask_sum


def test_shamir_recovers_the_textbook_example() -> None:
    # Wikipedia "Shamir's secret sharing": secret 1234, f(x) = 1234 + 166x + 94x², shares over GF(1613)
    shares = [(1, 1494), (2, 329), (3, 965), (4, 176), (5, 1188), (6, 775)]
    assert shamir.evaluate([1234, 166, 94], 2, prime=1613) == 329
    assert shamir.combine([shares[1], shares[3], shares[4]], prime=1613) == 1234
    assert shamir.combine([shares[0], shares[2], shares[5]], prime=1613) == 1234
    assert shamir.combine(shares[:2], prime=1613) != 1234  # t−1 shares: a different polynomial


def test_shamir_splits_a_256_bit_secret_t_of_n() -> None:
    secret = int.from_bytes(bytes(range(32)), "big")
    shares = shamir.split(secret, n=5, t=3)
    assert shamir.combine([shares[4], shares[0], shares[2]]) == secret
    assert shamir.combine(shares[:2]) != secret
    assert shamir.from_bytes(shamir.to_bytes(shares[1][1])) == shares[1][1]


def test_fixed_point_wraps_modulo_2_32_and_decodes_signed() -> None:
    a = fixed_point.encode(np.array([-1.5, 2.25]), participants=2)
    assert a.dtype == np.uint32 and int(a[0]) == 2**32 - int(1.5 * fixed_point.SCALE)  # −1.5 wraps to the top
    b = fixed_point.encode(np.array([1.0, -3.0]), participants=2)
    assert fixed_point.decode(fixed_point.add(a, b)).tolist() == [-0.5, -0.75]
    big = np.full(1, np.uint32(2**32 - 1))
    assert int(fixed_point.add(big, np.full(1, np.uint32(2)))[0]) == 1  # wraps, no overflow error


def test_fixed_point_refuses_what_would_wrap_the_sum() -> None:
    top = fixed_point.max_value(4)
    fixed_point.encode(np.array([top, -top]), participants=4)
    with pytest.raises(fixed_point.RangeError, match="exceeds the fixed-point range"):
        fixed_point.encode(np.array([top + 1.0]), participants=4)
    with pytest.raises(fixed_point.RangeError, match="not finite"):
        fixed_point.encode(np.array([np.nan]), participants=4)
    four = fixed_point.encode(np.full(4, top), participants=4)  # 4 silos at the limit still fit
    total = four[:1]
    for v in four[1:]:
        total = fixed_point.add(total, np.array([v]))
    assert fixed_point.decode(total)[0] == pytest.approx(4 * top)


def test_threshold_rule() -> None:
    assert [threshold(0.5, m) for m in (1, 2, 3, 4, 5, 10)] == [2, 2, 2, 3, 3, 6]  # majority, at least 2
    assert threshold(0.9, 4) == 4 and threshold(3, 4) == 3 and threshold(5, 4) == 5  # a count may exceed m


def run_round(xs: dict[int, np.ndarray], t_setting: float = 0.5, drop_after_sharing: tuple[int, ...] = (),
              server_round: int = 3) -> np.ndarray:
    """Every stage of one round for the silos in ``xs`` (node id -> encoded input); the silos
    in ``drop_after_sharing`` share keys and then send nothing. Returns the server's sum."""
    silos = {v: SiloRound.start(v, server_round) for v in xs}
    keys = {v: s.advertise() for v, s in silos.items()}
    t = threshold(t_setting, len(keys))
    cts = {v: s.share_keys(keys, t) for v, s in silos.items()}  # sender -> receiver -> ciphertext
    holders = sorted(cts)
    masked = {v: silos[v].mask(xs[v], holders) for v in holders if v not in drop_after_sharing}
    survivors, dropped = sorted(masked), sorted(drop_after_sharing)
    shares = {u: silos[u].unmask_shares(survivors, dropped, {v: cts[v][u] for v in holders}) for u in survivors}
    total = np.zeros_like(next(iter(xs.values())))
    for y in masked.values():
        total = fixed_point.add(total, y)
    return unmask_sum(total, survivors, dropped, shares, {v: k[1] for v, k in keys.items()}, t, server_round)


def _silos(rng: np.random.Generator, m: int, size: int = 1000) -> tuple[dict[int, np.ndarray], dict[int, int]]:
    updates = {1000 + 7 * i: rng.normal(0, 0.05, size) for i in range(m)}
    weights = {v: int(rng.integers(5, 4000)) for v in updates}
    return updates, weights


def test_masked_sum_is_weighted_fedavg_within_the_quantisation_bound() -> None:
    rng = np.random.default_rng(0)
    updates, weights = _silos(rng, 4)
    encoded = {v: fixed_point.encode(weights[v] * updates[v], 4) for v in updates}
    total_w = sum(weights.values())
    mean = fixed_point.decode(run_round(encoded)) / total_w
    plain = sum(weights[v] * updates[v] for v in updates) / total_w
    bound = fixed_point.mean_error_bound(4, total_w)
    assert np.abs(mean - plain).max() <= bound
    assert np.abs(mean - plain).max() > 0  # quantised, not bit-exact: the bound is what is claimed


def test_a_silo_that_drops_after_key_sharing_is_recovered() -> None:
    rng = np.random.default_rng(1)
    updates, weights = _silos(rng, 4)
    encoded = {v: fixed_point.encode(weights[v] * updates[v], 4) for v in updates}
    gone = sorted(updates)[1]
    total = fixed_point.decode(run_round(encoded, drop_after_sharing=(gone,)))
    rest = [v for v in updates if v != gone]
    plain = sum(weights[v] * updates[v] for v in rest)
    assert np.abs(total - plain).max() <= fixed_point.sum_error_bound(3)


def test_too_few_silos_for_the_threshold_refuse_with_the_reason() -> None:
    rng = np.random.default_rng(2)
    updates, weights = _silos(rng, 4, size=10)
    encoded = {v: fixed_point.encode(weights[v] * updates[v], 4) for v in updates}
    gone = tuple(sorted(updates)[:2])  # 2 of 4 left, threshold 3
    with pytest.raises(ProtocolError, match="only 2 silos sent a masked input, fewer than the threshold 3"):
        run_round(encoded, drop_after_sharing=gone)
    with pytest.raises(ProtocolError, match="only 3 silos shared keys, fewer than the threshold 4"):
        run_round({v: encoded[v] for v in sorted(encoded)[:3]}, t_setting=4)


def test_a_masked_input_hides_the_input_and_a_second_unmask_is_refused() -> None:
    x = fixed_point.encode(np.linspace(-1, 1, 4096), 3)
    silos = {v: SiloRound.start(v, 1) for v in (5, 6, 7)}
    keys = {v: s.advertise() for v, s in silos.items()}
    cts = {v: s.share_keys(keys, 2) for v, s in silos.items()}
    y = silos[5].mask(x, [5, 6, 7])
    # an independent mask leaves r ≈ N(0, 1/n); 5/√n fails an honest mask once in ~2 million runs
    assert np.mean(y == x) < 0.01 and abs(np.corrcoef(y.astype(float), x.astype(float))[0, 1]) < 5 / np.sqrt(x.size)
    silos[6].mask(x, [5, 6, 7])
    mine = {v: cts[v][6] for v in cts}
    silos[6].unmask_shares([5, 6], [7], mine)
    with pytest.raises(ProtocolError, match="already unmasked once"):  # a lying server asking again
        silos[6].unmask_shares([5, 6, 7], [], mine)
    with pytest.raises(ProtocolError, match="both survivor and dropped"):
        silos[5].mask(x, [5, 6, 7]) is not None and silos[5].unmask_shares([5, 7], [7], {v: cts[v][5] for v in cts})
    with pytest.raises(DecryptionError):  # a ciphertext relayed to the wrong silo
        silos[7].mask(x, [5, 6, 7]) is not None and silos[7].unmask_shares([5, 7], [], {5: cts[5][6], 7: cts[7][7]})


def test_round_state_survives_a_record_round_trip() -> None:
    s = SiloRound.start(9, 2)
    keys = {9: s.advertise(), 10: SiloRound.start(10, 2).advertise()}
    s.share_keys(keys, 2)
    back = SiloRound.from_dict(s.to_dict())
    assert back == s and mask_stream(back.self_seed, 8).tolist() == mask_stream(s.self_seed, 8).tolist()
