"""Fixed-point encoding of real vectors as integers modulo 2^32 (the masking group).

A value ``v`` is encoded as ``round(v · 2^FRACTION_BITS) mod 2^32``; a sum of encodings,
read as a signed 32-bit integer and divided by ``2^FRACTION_BITS``, is the sum of the values
up to rounding. For the sum of ``m`` silos' encodings never to wrap around, each silo's
encoded integers must lie in ``[−L, L]`` with ``L = ⌊(2^31 − 1) / m⌋`` (:func:`limit`); a silo
whose values do not fit refuses to send (:class:`RangeError`) rather than wrap silently.

Quantisation error: each encoding is off by at most ``2^−(FRACTION_BITS+1)`` per
coordinate, so the decoded sum of ``m`` silos is off by at most ``m · 2^−(FRACTION_BITS+1)``
and the weighted mean (the sum divided by the total weight ``W``) by at most
``m · 2^−(FRACTION_BITS+1) / W`` (:func:`mean_error_bound`).
"""

from __future__ import annotations

import numpy as np

FRACTION_BITS = 12
SCALE = float(1 << FRACTION_BITS)
MODULUS = 1 << 32


class RangeError(ValueError):
    """A vector that does not fit the fixed-point range of a secure sum (one line)."""


def limit(participants: int) -> int:
    """The largest encoded magnitude one of ``participants`` silos may send."""
    return (2**31 - 1) // max(1, int(participants))


def max_value(participants: int) -> float:
    """The largest real magnitude one of ``participants`` silos may send."""
    return limit(participants) / SCALE


def encode(values: np.ndarray, participants: int) -> np.ndarray:
    """``values`` (float) as uint32 fixed-point; :class:`RangeError` when a value is not
    finite or its encoding exceeds :func:`limit` (``participants``)."""
    values = np.asarray(values, dtype=np.float64)
    if not np.isfinite(values).all():
        raise RangeError(f"{int((~np.isfinite(values)).sum())} value(s) are not finite")
    ints = np.rint(values * SCALE)
    worst = float(np.abs(ints).max()) if ints.size else 0.0
    if worst > limit(participants):
        raise RangeError(f"a value of magnitude {worst / SCALE:.6g} exceeds the fixed-point range ±"
                         f"{max_value(participants):.6g} of a secure sum over {participants} silos "
                         f"({FRACTION_BITS} fraction bits modulo 2^32)")
    return ints.astype(np.int64).astype(np.uint32)


def decode(encoded: np.ndarray) -> np.ndarray:
    """A (summed) uint32 vector read as signed 32-bit fixed-point, as float64."""
    return np.asarray(encoded, dtype=np.uint32).view(np.int32).astype(np.float64) / SCALE


def add(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a + b`` modulo 2^32 (uint32 arithmetic wraps)."""
    return (np.asarray(a, dtype=np.uint32) + np.asarray(b, dtype=np.uint32)).astype(np.uint32)


def sub(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a − b`` modulo 2^32."""
    return (np.asarray(a, dtype=np.uint32) - np.asarray(b, dtype=np.uint32)).astype(np.uint32)


def sum_error_bound(participants: int) -> float:
    """The largest per-coordinate error of a decoded sum of ``participants`` encodings."""
    return participants / (2.0 * SCALE)


def mean_error_bound(participants: int, total_weight: float) -> float:
    """The largest per-coordinate error of the weighted mean: the sum's bound over ``total_weight``."""
    return sum_error_bound(participants) / float(total_weight)
