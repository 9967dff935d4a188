"""What the server accepts as a silo's training update, before it is averaged.

A reply is refused (left out of the average, named in the log and in ``metrics.json``'s
``problems``) when, compared with the global arrays the server sent that round:

* its keys differ (a missing or an extra array), or an array's dtype or shape differs
  (FedAvg would otherwise broadcast a ``(1,)`` array into ``(8, 4)``);
* an array holds a NaN or ±inf, or its bytes do not decode;
* the update is absurdly large: ``‖w_silo − w_global‖₂ > MAX_UPDATE_RATIO · max(‖w_global‖₂, 1)``
  over all arrays together. DP-SGD clips and the learning rate is small, so an honest
  round moves the adapters by a fraction of their norm; 100× is a sanity bound against
  broken or hostile arrays, not a robust-aggregation defence;
* ``num-examples`` (the FedAvg weight: the silo's training users) is missing, not a
  positive integer, or above ``MAX_NUM_EXAMPLES`` (10⁹ users: implausible for any silo).

Under secure aggregation (:func:`masked_problem`) a reply holds masked uint32 arrays that
look uniformly random: only the keys, shapes, dtype and ``num-examples`` can be checked per
silo; finiteness and size are checked on the decoded weighted mean instead, and weights
cannot be capped (each silo applies its own inside the mask).

A plausible but outsized ``num-examples`` is *capped*, not refused
(:func:`cap_weights`): no silo weighs more than ``WEIGHT_CAP_FACTOR`` × the median of the
other accepted silos' claims, so one silo claiming 10¹² users cannot set the average alone.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from statistics import median

import numpy as np
from flwr.app import ArrayRecord

MAX_UPDATE_RATIO = 100.0
MAX_NUM_EXAMPLES = 10**9
WEIGHT_CAP_FACTOR = 10.0


def _arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: record[k].numpy() for k in record.keys()}


def update_problem(update: ArrayRecord, sent: ArrayRecord | None, num_examples: object) -> str | None:
    """Why the server refuses this update (one line), or ``None`` when it is acceptable."""
    try:
        got = _arrays(update)
    except Exception as exc:  # bytes that do not decode as the declared dtype/shape
        return f"arrays do not decode ({type(exc).__name__}: {exc})"
    ref = _arrays(sent) if sent is not None else None
    if ref is not None:
        missing, extra = sorted(set(ref) - set(got)), sorted(set(got) - set(ref))
        if missing or extra:
            return f"array keys differ from the global model's (missing {missing[:3]}, extra {extra[:3]})"
        for key, want in ref.items():
            have = got[key]
            if have.dtype != want.dtype or have.shape != want.shape:
                return (f"array {key!r} is {have.dtype}{list(have.shape)}, the global model's is "
                        f"{want.dtype}{list(want.shape)}")
    for key, a in got.items():
        if np.issubdtype(a.dtype, np.number) and not np.isfinite(a).all():
            return f"array {key!r} is not finite ({int(np.isnan(a).sum())} NaN, {int(np.isinf(a).sum())} inf)"
    if ref is not None:
        step = math.sqrt(sum(float(np.sum((got[k].astype(np.float64) - ref[k]) ** 2)) for k in ref))
        size = math.sqrt(sum(float(np.sum(ref[k].astype(np.float64) ** 2)) for k in ref))
        if step > MAX_UPDATE_RATIO * max(size, 1.0):
            return (f"update norm {step:.3g} exceeds {MAX_UPDATE_RATIO:g} × max(global norm {size:.3g}, 1) "
                    f"(absurdly large)")
    return num_examples_problem(num_examples)


def masked_problem(update: ArrayRecord, sent: ArrayRecord, num_examples: object) -> str | None:
    """Why the server refuses a masked update (one line), or ``None``: what can still be
    checked per silo under secure aggregation (keys, shapes, uint32, ``num-examples``)."""
    try:
        got = _arrays(update)
    except Exception as exc:
        return f"arrays do not decode ({type(exc).__name__}: {exc})"
    ref = _arrays(sent)
    if list(got) != list(ref):
        return f"masked array keys differ from the global model's ({len(got)} arrays, expected {len(ref)})"
    for key, want in ref.items():
        if got[key].dtype != np.uint32 or got[key].shape != want.shape:
            return f"masked array {key!r} is {got[key].dtype}{list(got[key].shape)}, expected uint32{list(want.shape)}"
    return num_examples_problem(num_examples)


def num_examples_problem(value: object) -> str | None:
    """Why ``num-examples`` is unacceptable as a FedAvg weight, or ``None``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"num-examples is {value!r}, not a number"
    if not math.isfinite(value) or value != int(value) or value <= 0:
        return f"num-examples is {value!r}, not a positive integer"
    if value > MAX_NUM_EXAMPLES:
        return f"num-examples {value:g} is implausible (more than {MAX_NUM_EXAMPLES:.0e} users)"
    return None


def cap_weights(claims: Mapping[str, int]) -> dict[str, int]:
    """Each silo's FedAvg weight: its claim, at most ``WEIGHT_CAP_FACTOR`` × the median of
    the other silos' claims (a lone silo keeps its claim)."""
    out = {}
    for silo, n in claims.items():
        others = [v for s, v in claims.items() if s != silo]
        cap = int(WEIGHT_CAP_FACTOR * median(others)) if others else n
        out[silo] = min(int(n), max(cap, 1))
    return out
