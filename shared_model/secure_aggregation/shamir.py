"""t-of-n Shamir secret sharing (Shamir, "How to share a secret", CACM 1979) over the prime
field GF(p), p = 2^521 − 1 (a Mersenne prime, larger than the 256-bit secrets shared here).

:func:`split` draws a random polynomial of degree ``t − 1`` whose constant term is the
secret and hands out its values at x = 1..n; :func:`combine` interpolates any ``t`` of them
at x = 0 (Lagrange). Fewer than ``t`` shares say nothing about the secret.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

PRIME = (1 << 521) - 1
SHARE_BYTES = 66  # a field element, big-endian

Share = tuple[int, int]  # (x, y)


def split(secret: int, n: int, t: int, prime: int = PRIME) -> list[Share]:
    """``n`` shares of ``secret`` (0 ≤ secret < prime), any ``t`` of which recover it."""
    if not 0 <= secret < prime:
        raise ValueError("the secret must lie in [0, prime)")
    if not 1 <= t <= n:
        raise ValueError(f"threshold {t} must lie in [1, {n}]")
    coefficients = [secret] + [secrets.randbelow(prime) for _ in range(t - 1)]
    return [(x, evaluate(coefficients, x, prime)) for x in range(1, n + 1)]


def evaluate(coefficients: Sequence[int], x: int, prime: int = PRIME) -> int:
    """The polynomial with these coefficients (constant first) at ``x``, mod ``prime`` (Horner)."""
    y = 0
    for c in reversed(coefficients):
        y = (y * x + c) % prime
    return y


def combine(shares: Sequence[Share], prime: int = PRIME) -> int:
    """The secret (the polynomial at 0) from shares with distinct x (Lagrange interpolation)."""
    xs = [x % prime for x, _ in shares]
    if len(set(xs)) != len(xs) or 0 in xs:
        raise ValueError("shares must have distinct, non-zero x")
    secret = 0
    for i, (xi, yi) in enumerate(shares):
        num = den = 1
        for j, (xj, _) in enumerate(shares):
            if i != j:
                num = num * (-xj) % prime
                den = den * (xi - xj) % prime
        secret = (secret + yi * num * pow(den, -1, prime)) % prime
    return secret


def to_bytes(value: int) -> bytes:
    return value.to_bytes(SHARE_BYTES, "big")


def from_bytes(data: bytes) -> int:
    return int.from_bytes(data, "big")
