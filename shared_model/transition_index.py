"""The run's DP item-transition counts as the sequence model reads them.

:class:`TransitionIndex` holds a :class:`shared_model.transitions.TransitionTable` (the summed,
thresholded releases the server sends) as buffers of the model — saved with every checkpoint,
never trained or averaged — and answers the two questions scoring asks: the count of given
pairs (:meth:`TransitionIndex.lookup`), and every stored pair of given items
(:meth:`TransitionIndex.neighbours`).
"""

from __future__ import annotations

import torch
from torch import nn


class TransitionIndex(nn.Module):
    """The run's DP item-transition counts (:mod:`shared_model.transitions`) as a symmetric
    sparse matrix over item rows. Buffers ``a``, ``b``, ``counts`` (a < b; saved with the
    checkpoint, set by the server, never trained); ``crow``/``col``/``val`` (CSR of both
    directions) and ``keys`` (sorted ``a·N + b`` for pair lookups) are derived on set."""

    def __init__(self) -> None:
        super().__init__()
        for name in ("a", "b", "crow", "col", "keys"):
            self.register_buffer(name, torch.zeros(0, dtype=torch.long), persistent=name in ("a", "b"))
        self.register_buffer("counts", torch.zeros(0))
        self.register_buffer("val", torch.zeros(0), persistent=False)
        self.register_buffer("key_counts", torch.zeros(0), persistent=False)

    def set_table(self, table: object) -> None:
        """Set from a :class:`shared_model.transitions.TransitionTable` (``a``, ``b``, ``counts``)."""
        a = torch.as_tensor(table.a, dtype=torch.long).flatten()  # type: ignore[attr-defined]
        b = torch.as_tensor(table.b, dtype=torch.long).flatten()  # type: ignore[attr-defined]
        counts = torch.as_tensor(table.counts, dtype=torch.float32).flatten()  # type: ignore[attr-defined]
        if not (len(a) == len(b) == len(counts)) or bool((a >= b).any()) or bool((a < 0).any()):
            raise ValueError("transition table: a, b and counts must have one length and 0 ≤ a < b")
        if not torch.isfinite(counts).all():
            raise ValueError("transition table: counts are not finite")
        self.a, self.b, self.counts = a, b, counts
        self._derive()

    def _derive(self) -> None:
        a, b, counts = self.a, self.b, self.counts
        size = int(max(a.max(), b.max())) + 1 if len(a) else 0
        self.size = size
        src = torch.cat([a, b])
        dst = torch.cat([b, a])
        order = torch.argsort(src * max(size, 1) + dst)
        self.col, self.val = dst[order], torch.cat([counts, counts])[order]
        self.crow = torch.zeros(size + 1, dtype=torch.long)
        if size:
            self.crow[1:] = torch.bincount(src, minlength=size).cumsum(0)
        keys = a * max(size, 1) + b
        order = torch.argsort(keys)
        self.keys, self.key_counts = keys[order], counts[order]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        for name in ("a", "b", "counts"):  # variable length: take the saved size first
            if prefix + name in state_dict:
                setattr(self, name, state_dict[prefix + name].detach().clone().to(getattr(self, name).dtype))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._derive()

    @property
    def has_table(self) -> bool:
        return self.counts.numel() > 0

    def lookup(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """Counts of the pairs ``(i, j)`` (any shape, 0 where absent or i == j)."""
        if not self.has_table:
            return torch.zeros(i.shape, device=i.device)
        size = max(self.size, 1)
        lo, hi = torch.minimum(i, j), torch.maximum(i, j)
        ok = (lo >= 0) & (hi < self.size) & (lo != hi)
        key = torch.where(ok, lo * size + hi, torch.zeros_like(lo))
        keys = self.keys.to(i.device)
        pos = torch.searchsorted(keys, key.flatten()).clamp_max(max(len(keys) - 1, 0)).view(key.shape)
        found = ok & (keys[pos] == key)
        return torch.where(found, self.key_counts.to(i.device)[pos], torch.zeros((), device=i.device))

    def neighbours(self, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every stored pair of each row in the 1-D ``src`` (−1: none): ``(owner, j, count)``,
        ``owner`` indexing ``src``."""
        ok = (src >= 0) & (src < self.size)
        s = torch.where(ok, src, torch.zeros_like(src)).cpu()
        deg = torch.where(ok.cpu(), self.crow[s + 1] - self.crow[s], torch.zeros_like(s))
        owner = torch.repeat_interleave(torch.arange(len(src)), deg)
        starts = torch.cumsum(deg, 0) - deg
        offset = torch.arange(int(deg.sum())) - starts[owner]
        at = self.crow[s][owner] + offset
        return owner.to(src.device), self.col[at].to(src.device), self.val[at].to(src.device)
