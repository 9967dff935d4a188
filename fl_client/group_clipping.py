"""Per-example clipping per parameter group, with Opacus.

:class:`GroupClipDPOptimizer` is Opacus' :class:`~opacus.optimizers.DPOptimizer` with one change
to ``clip_and_accumulate``: example b's gradient restricted to group g is scaled to norm at most
``C_g = C·√share_g`` (Σ shares = 1), so its whole gradient has norm at most ``C`` and the
Gaussian noise ``σ·C`` added to the sum is calibrated exactly as for flat clipping (per-layer
clipping, McMahan, Andrew, Erlingsson et al. 2018, "A General Approach to Adding Differential
Privacy to Iterative Training Procedures"). A group whose gradients are much larger than
another's then no longer decides how much of the other's signal survives clipping.

It also counts, per group, the examples seen, their mean gradient norm before clipping and the
share that was clipped (:meth:`clip_report`): training by-products, released only as the
silo's ``release-metrics`` allows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed


class GroupClipDPOptimizer(DPOptimizer):
    """See the module docstring. ``groups``: ``(name, parameters, share of C²)``; every
    trainable parameter of the optimizer must be in exactly one group."""

    def __init__(self, optimizer: torch.optim.Optimizer, *, groups: Sequence[tuple[str, Sequence[torch.nn.Parameter], float]],
                 **kwargs: object):
        super().__init__(optimizer, **kwargs)  # type: ignore[arg-type]
        total = sum(share for _, _, share in groups)
        if not math.isclose(total, 1.0, rel_tol=1e-6) or any(share <= 0 for _, _, share in groups):
            raise ValueError(f"clip shares must be > 0 and sum to 1, got {[s for _, _, s in groups]}")
        self.group_names = [name for name, _, _ in groups]
        self.group_norms = [self.max_grad_norm * math.sqrt(share) for _, _, share in groups]
        where = {id(p): g for g, (_, params, _) in enumerate(groups) for p in params}
        missing = [p for p in self.params if id(p) not in where]
        if missing:
            raise ValueError(f"{len(missing)} trainable parameter(s) are in no clipping group")
        self.param_group_index = [where[id(p)] for p in self.params]
        self._seen = [0] * len(groups)
        self._clipped = [0] * len(groups)
        self._norm_sum = [0.0] * len(groups)

    def clip_and_accumulate(self) -> None:
        samples = self.grad_samples
        n = len(samples[0]) if samples else 0
        factors = []
        for g, limit in enumerate(self.group_norms):
            norms = [s.reshape(n, -1).norm(2, dim=-1) if n else s.new_zeros(0)
                     for s, i in zip(samples, self.param_group_index) if i == g]
            norm = torch.stack(norms, dim=1).norm(2, dim=1) if norms and n else torch.zeros(n, device=self.params[0].device)
            factors.append((limit / (norm + 1e-6)).clamp(max=1.0))
            self._seen[g] += n
            self._clipped[g] += int((norm > limit).sum())
            self._norm_sum[g] += float(norm.sum())
        for p, g in zip(self.params, self.param_group_index):
            _check_processed_flag(p.grad_sample)
            grad_sample = self._get_flat_grad_sample(p).to(p.dtype)
            grad = torch.einsum("i,i...", factors[g].to(grad_sample.device, p.dtype), grad_sample)
            p.summed_grad = grad if p.summed_grad is None else p.summed_grad + grad
            _mark_as_processed(p.grad_sample)

    def clip_report(self) -> dict[str, dict[str, float]]:
        """Per group: its clipping norm ``C_g``, share of ``C²``, examples, mean per-example
        gradient norm before clipping and the fraction of examples clipped."""
        out = {}
        for g, name in enumerate(self.group_names):
            seen = self._seen[g]
            out[name] = {"clip-norm": self.group_norms[g], "clip-share": (self.group_norms[g] / self.max_grad_norm) ** 2,
                         "examples": seen, "mean-norm": self._norm_sum[g] / seen if seen else 0.0,
                         "clipped": self._clipped[g] / seen if seen else 0.0}
        return out
