"""Named arrays <-> the one flat vector that is masked, in the global model's key order.

A silo's input is ``weight · (trained − global)`` over every trainable array, flattened in
the order of the arrays the server sent; the server splits the decoded sum back by the
same names and shapes.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


def weighted_delta(trained: Mapping[str, np.ndarray], sent: Mapping[str, np.ndarray], weight: float) -> np.ndarray:
    """``weight · (trained − sent)``, flattened in ``sent``'s key order (float64)."""
    if list(trained) != list(sent):
        raise ValueError("the trained arrays do not have the global model's names and order")
    parts = [np.asarray(trained[k], dtype=np.float64).ravel() - np.asarray(sent[k], dtype=np.float64).ravel()
             for k in sent]
    return float(weight) * (np.concatenate(parts) if parts else np.zeros(0))


def split(vector: np.ndarray, like: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``vector`` cut into arrays with ``like``'s names and shapes (dtype kept)."""
    out, at = {}, 0
    for key, ref in like.items():
        n = int(np.asarray(ref).size)
        out[key] = vector[at:at + n].reshape(np.asarray(ref).shape)
        at += n
    if at != vector.size:
        raise ValueError(f"a vector of {vector.size} values does not split into arrays of {at}")
    return out


def total_size(like: Mapping[str, np.ndarray]) -> int:
    return sum(int(np.asarray(a).size) for a in like.values())
