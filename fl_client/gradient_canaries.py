"""White-box gradient-space (Dirac) canaries for the one-run audit.

Steinke, Nasr & Jagielski, "Privacy Auditing with One (1) Training Run", NeurIPS 2023, white-box
setting: canary i is a gradient with one non-zero coordinate, of magnitude the clipping norm C,
on its own coordinate of the trainable parameters; it is included (independently, w.p. ½)
and an included canary is added to the DP-SGD step's sum of clipped per-example gradients,
*before* Opacus adds the noise, in each step independently with the Poisson sampler's rate q,
exactly as a sampled user's clipped gradient would be. The ledger's claim (σ, q, steps, δ)
is a DP guarantee for every record that is Poisson-sampled at rate q and whose clipped
gradient is *any* vector of norm ≤ C; a Dirac canary is such a record, so the claim covers it
and a correct run cannot give a valid lower bound above it. (Inserting a canary in *every*
step would be a different mechanism, the Gaussian mechanism without subsampling, whose ε is far
above the claim; a bound from it would audit nothing the ledger says.)

Insertion goes through the real training path: :func:`inserted` wraps Opacus's
``DPOptimizer.add_noise`` while the silo trains through
:func:`fl_client.silo_round.train_silo`, so the clipping, the noise (or the
``audit-broken-noise`` switch) and the accountant are Opacus's and the silo's own. After
each step it reads the noisy sum at every canary coordinate (white-box: the auditor sees every
iterate). :meth:`DiracCanaries.scores` turns the per-step readings x_t (in units of C) into
the Neyman–Pearson log-likelihood ratio of "sampled w.p. q each step" against "absent",
Σ_t log(1 − q + q·exp((x_t − ½)/σ²)), with the ledger's σ.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from opacus.optimizers import DPOptimizer

from shared_model.privacy.one_run import epsilon_lower_bound


@dataclass
class DiracCanaries:
    """M Dirac canaries: inclusion, per-step sampling, and what the auditor observed."""

    m: int
    included: torch.Tensor  # [m] bool
    sample_rate: float
    seed: int
    coordinates: list[tuple[int, int]] = field(default_factory=list)  # (optimizer param index, flat index)
    shapes: list[tuple[int, ...]] = field(default_factory=list)
    readings: list[torch.Tensor] = field(default_factory=list)  # per step: [m] noisy sum at the coordinate / C
    sampled: torch.Tensor | None = None  # [m] times each canary was added (diagnostic; the scorer never sees it)
    steps: int = 0

    @classmethod
    def draw(cls, m: int, sample_rate: float, seed: int) -> "DiracCanaries":
        gen = torch.Generator().manual_seed(seed)
        return cls(m, torch.rand(m, generator=gen) < 0.5, sample_rate, seed)

    def _place(self, params: list[torch.Tensor]) -> None:
        """Distinct coordinates of the optimizer's trainable parameters, chosen at the first step.

        The quietest ones: the M coordinates with the smallest |sum of clipped real gradients|
        of the first step (ties in random order), so real data disturbs the readings least. The
        choice sees neither the canaries' inclusion nor their sampling, which stay independent
        of everything the auditor's guess rule looks at, as the one-run theorem requires.
        """
        shapes = [tuple(p.shape) for p in params]
        if self.coordinates:
            if shapes != self.shapes:
                raise RuntimeError(f"gradient canaries: trainable parameters changed shape ({self.shapes} → {shapes})")
            return
        sizes = [p.numel() for p in params]
        if sum(sizes) < self.m:
            raise ValueError(f"{self.m} Dirac canaries need {self.m} distinct coordinates; the model has {sum(sizes)}")
        real = torch.cat([p.summed_grad.detach().reshape(-1).abs().float().cpu() for p in params])
        shuffle = torch.randperm(real.numel(), generator=torch.Generator().manual_seed(self.seed + 1))
        flat = shuffle[torch.sort(real[shuffle], stable=True).indices[: self.m]]
        flat = flat[torch.randperm(self.m, generator=torch.Generator().manual_seed(self.seed + 3))]
        starts = np.cumsum([0, *sizes])
        for g in flat.tolist():
            i = int(np.searchsorted(starts, g, side="right") - 1)
            self.coordinates.append((i, g - int(starts[i])))
        self.shapes = shapes
        self.sampled = torch.zeros(self.m, dtype=torch.long)
        self._gen = torch.Generator().manual_seed(self.seed + 2)

    def insert(self, opt: DPOptimizer) -> None:
        """Add C at each included canary's coordinate of ``p.summed_grad`` w.p. q (before noise)."""
        self._place(list(opt.params))
        take = (torch.rand(self.m, generator=self._gen) < self.sample_rate) & self.included
        self.sampled += take.long()
        c = float(opt.max_grad_norm)
        for i in torch.nonzero(take).flatten().tolist():
            p_idx, flat = self.coordinates[i]
            opt.params[p_idx].summed_grad.view(-1)[flat] += c

    def observe(self, opt: DPOptimizer) -> None:
        """Record the noisy sum (``p.grad`` after ``add_noise``, before scaling) at each coordinate, / C."""
        c = float(opt.max_grad_norm)
        params = opt.params
        self.readings.append(torch.tensor(
            [float(params[p_idx].grad.reshape(-1)[flat]) / c for p_idx, flat in self.coordinates]))
        self.steps += 1

    def scores(self, noise_multiplier: float) -> torch.Tensor:
        """Per canary: Σ_t log(1 − q + q·exp((x_t − ½)/σ²)) (log-likelihood ratio, σ from the ledger)."""
        if not self.readings:
            raise RuntimeError("gradient canaries: no DP-SGD step was observed")
        return likelihood_ratio(torch.stack(self.readings, dim=1), self.sample_rate, noise_multiplier)


def likelihood_ratio(x: torch.Tensor, q: float, sigma: float) -> torch.Tensor:
    """Σ over the last axis of log(1 − q + q·exp((x − ½)/σ²)): readings x in units of C."""
    sigma = max(float(sigma), 1e-6)
    a = (x.double() - 0.5) / sigma**2
    return torch.logaddexp(torch.full_like(a, math.log1p(-q)), a + math.log(q)).sum(-1)


@contextlib.contextmanager
def inserted(canaries: DiracCanaries) -> Iterator[DiracCanaries]:
    """While active, every ``DPOptimizer.add_noise`` (flat or group clipping) first adds the sampled
    canaries, then is observed."""
    original = DPOptimizer.add_noise

    def add_noise(self: DPOptimizer) -> None:
        from fl_client.group_clipping import GroupClipDPOptimizer

        # other subclasses keep their own noise or clipping norms; refuse rather than mis-insert (group clipping
        # bounds each example's whole gradient by max_grad_norm and adds DPOptimizer's own noise: a canary of
        # norm C is one example's largest possible contribution there too)
        if type(self) not in (DPOptimizer, GroupClipDPOptimizer):
            raise RuntimeError(f"gradient canaries support Opacus's DPOptimizer (flat clipping) and group clipping, "
                               f"not {type(self).__name__}")
        canaries.insert(self)
        original(self)
        canaries.observe(self)

    DPOptimizer.add_noise = add_noise  # type: ignore[method-assign]
    try:
        yield canaries
    finally:
        DPOptimizer.add_noise = original  # type: ignore[method-assign]


def plan_guesses(m: int, q: float, sigma: float, steps: int, epsilon: float, confidence: float = 0.95,
                 trials: int = 16, seed: int = 12345) -> int:
    """K for "guess in on the K highest scores", fixed before the run from the claim alone.

    Only K whose all-correct guesses could prove more than the claimed ``epsilon`` are
    considered (a smaller K could never expose a leak), when M allows any. Among them, it
    simulates the claimed mechanism for Dirac canaries (per step: C w.p. q if included, plus
    N(0, σ²C²)) with its own randomness and returns the K whose median number of correct
    guesses gives the highest one-run bound. No run data is used, so the guess rule is fixed
    in advance, as the one-run theorem requires.
    """
    rng = np.random.default_rng(seed)
    ks = sorted({k for k in (1, 2, 3, 5, 8, 10, 15, 20, 30, 40, 50, 75, 100, 150, 200, 300, 500, 750) if k <= m // 2}
                | {max(1, m // 2)})
    ks = [k for k in ks if epsilon_lower_bound(k, k, confidence) > epsilon] or ks
    hits = np.zeros((trials, len(ks)))
    for t in range(trials):
        inc = rng.random(m) < 0.5
        x = ((rng.random((m, steps)) < q) & inc[:, None]) + sigma * rng.standard_normal((m, steps))
        s = likelihood_ratio(torch.from_numpy(x), q, sigma).numpy()
        order = np.argsort(-s, kind="stable")
        hits[t] = [inc[order[:k]].sum() for k in ks]
    med = np.median(hits, axis=0)
    bounds = [epsilon_lower_bound(k, int(v), confidence) for k, v in zip(ks, med)]
    return ks[int(np.argmax(bounds))]
