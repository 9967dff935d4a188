"""The canary experiment behind ``fedshift audit --canaries M``.

Two kinds of canary, each M strong, each canary included independently with probability ½
(seeded), in ONE training of ONE silo:

- ``input`` (black-box, on the final model): M canary users, each with a two-event history (one
  catalogue item of the silo's platform, then a unique target item), both items distinct from
  other canaries' and the least used by real users; included ones join the training users.
- ``gradient`` (white-box): M Dirac canaries added to the clipped per-example gradient sum
  before Opacus's noise (:mod:`fl_client.gradient_canaries`).

The silo trains ``num-server-rounds × local-steps`` DP-SGD steps through the ClientApp's own
round function (:func:`fl_client.silo_round.train_silo`: same calibration, same budget rules,
same ``audit-broken-noise`` handling, same ledger records), carrying its model from round to
round. This bypasses Flower's transport and FedAvg: with one silo FedAvg is the identity, and
other silos could only dilute the canaries' signal, so the bound measured here is for the silo's
own mechanism, the strongest case.

Input-canary score (:func:`canary_scores`): how strongly the final model ties each canary's
target to that canary's own history (log-probability under the full catalogue softmax,
contrasted with the other canaries' histories), minus the same under the initial model; the
auditor guesses "in" for the K highest scores, "out" for the K lowest (default K = M/4).
Gradient-canary score: the per-step likelihood ratio of the noisy sum at the canary's
coordinate; the auditor guesses "in" for the K highest only, K fixed before the run from the
claim (:func:`fl_client.gradient_canaries.plan_guesses`). It abstains on the rest, and
:func:`shared_model.privacy.one_run.epsilon_lower_bound` (Steinke, Nasr & Jagielski, NeurIPS
2023) turns (guesses, correct) into an ε lower bound at 95 % confidence. The audit passes when
each bound ≤ the ledger's ε.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fl_client.dp_train import pick_device
from fl_client.gradient_canaries import DiracCanaries, inserted, plan_guesses
from fl_client.silo_round import SiloSetup, TrainRequest, seed_for, train_silo
from shared_model.privacy.silo_secret import secret_from_seed
from fl_client.evaluate import item_tower
from fl_client.task import SiloData, open_silo
from shared_model.adapters import get_trainable_state, set_trainable_state
from shared_model.config import RunConfig
from shared_model.examples import training_example
from shared_model.batches import collate
from shared_model.model import InterestModel, build_model
from shared_model.privacy.ledger import Ledger, silo_ledger_path
from shared_model.privacy.one_run import epsilon_lower_bound
from shared_model.privacy.records import dp_rounds, of_run, read_records
from shared_model.privacy.state import PrivacyState
from shared_model.schema import Event, Silo
from shared_model.scoring import candidates, score_candidates, user_vectors


#: The canary kinds: ``input`` (fake users, black-box on the final model) and ``gradient``
#: (white-box Dirac canaries, :mod:`fl_client.gradient_canaries`).
KINDS = ("input", "gradient")


@dataclass
class CanaryResult:
    kind: str
    silo: str
    m: int
    included: int
    guesses: int
    correct: int
    k_in: int
    k_out: int
    epsilon_lower_bound: float
    confidence: float
    ledger_epsilon: float
    delta: float
    accountant: str
    noise_multiplier_recorded: float
    broken_noise: bool
    seconds: float
    ledger: str
    scores: list[dict[str, Any]] = field(default_factory=list)
    steps: int = 0  # gradient canaries: DP-SGD steps observed
    sample_rate: float = 0.0  # gradient canaries: per-step inclusion rate (the sampler's q)
    participated: int = 0  # gradient canaries: included ones sampled in ≥ 1 step (diagnostic)
    reading_std_out: float = 0.0  # gradient canaries: std of excluded ones' readings / C (≈ σ if real data is quiet)

    @property
    def passed(self) -> bool:
        return self.epsilon_lower_bound <= self.ledger_epsilon + 1e-9

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["passed"] = self.passed
        return d


def make_canaries(data: SiloData, m: int, seed: int) -> tuple[SiloData, list[tuple[str, bool]]]:
    """A copy of ``data`` with the included canaries added; [(canary id, included)]."""
    silo, catalogue = data.silo, data.catalogue
    used: dict[str, int] = {}
    for events in silo.histories.values():
        for e in events:
            used[e.item_id] = used.get(e.item_id, 0) + 1
    rng = random.Random(seed)
    # a region silo's canaries live on its first platform, where they are also scored
    free = [i for i in catalogue.platform_item_ids(silo.platforms[0]) if catalogue.items[i].interest]
    if len(free) < 2 * m:
        raise ValueError(f"silo {silo.name}: only {len(free)} catalogue items for {m} canaries (need {2 * m})")
    rng.shuffle(free)
    free.sort(key=lambda i: used.get(i, 0))  # least-used items first (stable: random among ties)
    free = free[: 2 * m]
    rng.shuffle(free)
    splits, histories = dict(silo.splits), {u: list(ev) for u, ev in silo.histories.items()}
    canaries: list[tuple[str, bool]] = []
    for i in range(m):
        uid = f"canary-{i:04d}"
        inside = rng.random() < 0.5
        canaries.append((uid, inside))
        events = [Event(uid, free[2 * i], 1, "purchase"), Event(uid, free[2 * i + 1], 2, "purchase")]
        if inside:
            splits[uid] = "train"
            histories[uid] = events
        else:
            splits[uid] = "canary-out"  # never a train user
            histories[uid] = events
    new_silo = Silo(silo.name, silo.platforms, splits, histories)
    return dataclasses.replace(data, silo=new_silo), canaries


@torch.no_grad()
def canary_scores(model: InterestModel, data: SiloData, cfg: RunConfig, users: list[str]) -> torch.Tensor:
    """Per canary i: log p(tᵢ | hᵢ) − mean over other canaries j of log p(tᵢ | hⱼ).

    log p is the full softmax over the platform catalogue. The contrast removes what the
    model learnt about the target item in general (popularity, category prior), leaving
    how much it ties the target to this canary's own history.
    """
    model.eval()
    if cfg.user_tower == "sequence":
        return _contrast(_sequence_logp(model, data, cfg, users))
    batcher = data.batcher(cfg)
    input_ids, mask, rows, _, feats, last = collate(
        [batcher(training_example(data.silo, data.catalogue, u)) for u in users], batcher.pad_id)
    user, cat_logits = user_vectors(model, input_ids, mask, feats, None, input_ids.device)  # unmasked
    cands = candidates(item_tower(model, data, cfg), data.items.platform_rows(data.platforms[0]), input_ids.device)
    logp = torch.log_softmax(score_candidates(user, cat_logits, cands, cfg, model=model, last_rows=last).float(), dim=1)
    return _contrast(logp[:, cands.target_columns(rows)])


def _sequence_logp(model: torch.nn.Module, data: SiloData, cfg: RunConfig, users: list[str]) -> torch.Tensor:
    """The sequence model's ``[history a, target b]`` log p(t_b | h_a) over the platform catalogue."""
    from shared_model.sequence_model import last_position_scores
    from shared_model.sequence_scoring import platform_candidates

    batcher = data.sequence_batcher(cfg)
    examples = [training_example(data.silo, data.catalogue, u) for u in users]
    inp = batcher.batch([batcher.window(ex.history) for ex in examples])
    rows = data.items.platform_rows(data.platforms[0])  # the canaries' platform
    cands = platform_candidates(model, data.items.embeddings, data.item_prior_index, rows, torch.device("cpu"))  # type: ignore[arg-type]
    scores, _ = last_position_scores(model, inp, cands, None, cfg.category_prior_weight)  # type: ignore[arg-type]
    column = {int(r): c for c, r in enumerate(rows.tolist())}
    targets = torch.tensor([column[data.items.row[ex.target.item_id]] for ex in examples])
    return torch.log_softmax(scores.float(), dim=1)[:, targets]


def _contrast(matrix: torch.Tensor) -> torch.Tensor:
    """Per canary i (``matrix[a, b]`` = log p(t_b | h_a)): own minus the mean over the others' histories."""
    n = matrix.shape[0]
    own = matrix.diagonal()
    others = (matrix.sum(0) - own) / max(1, n - 1)
    return own - others


def run_canary_audit(
    cfg: RunConfig, m: int, out_dir: Path, *, kind: str = "input", silo_index: int = 0, seed: int = 0,
    k: int | None = None, confidence: float = 0.95,
) -> CanaryResult:
    """One kind of canary (``input`` or ``gradient``): :func:`run_canary_audits` with that kind alone."""
    return run_canary_audits(cfg, m, out_dir, kinds=(kind,), silo_index=silo_index, seed=seed, k=k,
                             confidence=confidence)[0]


def run_canary_audits(
    cfg: RunConfig, m: int, out_dir: Path, *, kinds: tuple[str, ...] = KINDS, silo_index: int = 0, seed: int = 0,
    k: int | None = None, confidence: float = 0.95,
) -> list[CanaryResult]:
    """Train one silo once with ``m`` canaries of each kind in ``kinds`` (each in w.p. ½, independently)
    and bound ε from each kind's membership guesses. Both kinds in one training are valid: for
    either kind the other kind's canaries are just more data, included independently."""
    if not cfg.dp:
        raise ValueError("the canary audit needs dp = true (there is no privacy claim to audit)")
    if not kinds or set(kinds) - set(KINDS):
        raise ValueError(f"canary kinds must be among {KINDS}, got {kinds}")
    if "gradient" in kinds and cfg.grad_sample_mode == "ghost":
        raise ValueError("gradient canaries need grad-sample-mode hooks, functorch or ew (ghost clipping has no summed_grad)")
    if "input" in kinds and cfg.user_tower == "sequence" and cfg.loss_top_k:
        # The top-k loss counts a position only when its target already ranks among the k
        # hardest items, which a canary's unique, unrelated target never does: it could not be
        # learned, and the audit would see nothing. Every DP-SGD guarantee holds for any loss, so
        # the audit trains the same mechanism (q, σ, C, steps) under the full sampled softmax.
        cfg = cfg.replace(**{"loss-top-k": 0})
    t0 = time.time()
    base = open_silo(cfg, {"partition-id": silo_index})
    data, canaries = make_canaries(base, m, seed) if "input" in kinds else (base, [])
    device = pick_device(cfg)
    if device.type != "cpu":
        device = torch.device("cpu")  # small and deterministic; scoring runs on CPU too
    run_id = f"canary-audit-{seed}-{int(t0)}"
    # A fresh one-run experiment: the real silo's lifetime cap (over its runs) does not apply.
    # The audit runs on the silo itself, with its own seed: no server request, no policy gate.
    ledger = Ledger(silo_ledger_path(data.name, {"state-dir": str(out_dir / "silo-state")}))
    silo = SiloSetup(cfg, data, device, ledger, secret=secret_from_seed(seed, data.name), lifetime_cap=0.0)
    claim = PrivacyState.calibrate(data.name, cfg, num_users=silo.num_users)  # the same calibration train_silo uses
    dirac = DiracCanaries.draw(m, claim.sample_rate, seed) if "gradient" in kinds else None
    ncat = len(data.categories)
    initial = get_trainable_state(build_model(cfg, num_categories=ncat))
    state, privacy = initial, None
    with inserted(dirac) if dirac is not None else contextlib.nullcontext():
        for rnd in range(1, cfg.num_server_rounds + 1):
            reply = train_silo(TrainRequest(silo, run_id=run_id, server_round=rnd, privacy=privacy,
                                            load=lambda model, s=state: set_trainable_state(model, s),
                                            seed=seed_for(cfg.seed + seed, data.name, rnd)))
            privacy = reply.privacy
            if reply.model is None:  # refused by a budget rule (recorded on the ledger)
                break
            state = {k2: v.detach().cpu().clone() for k2, v in get_trainable_state(reply.model).items()}
    assert privacy is not None, "num-server-rounds must be ≥ 1"
    records = of_run(dp_rounds(read_records(silo.ledger)), run_id, data.name)
    common = dict(silo=data.name, m=m, confidence=confidence,
                  ledger_epsilon=records[-1].epsilon_cumulative if records else 0.0, delta=privacy.delta,
                  accountant=privacy.accountant_label, noise_multiplier_recorded=privacy.noise_multiplier,
                  broken_noise=cfg.audit_broken_noise, ledger=str(silo.ledger.path))
    results = []
    if "input" in kinds:
        users = [u for u, _ in canaries]
        before = build_model(cfg, num_categories=ncat)
        set_trainable_state(before, initial)
        after = build_model(cfg, num_categories=ncat)
        set_trainable_state(after, state)
        gain = canary_scores(after, data, cfg, users) - canary_scores(before, data, cfg, users)
        k_in = min(max(1, m // 4) if k is None else k, m // 2)
        results.append(_guess("input", gain, [inside for _, inside in canaries], k_in, k_in, users, common))
    if dirac is not None:
        steps = sum(r.steps for r in records)
        if dirac.steps != steps:
            raise RuntimeError(f"gradient canaries observed {dirac.steps} DP-SGD steps, the ledger records {steps}")
        k_in = min(plan_guesses(m, claim.sample_rate, claim.noise_multiplier, steps, claim.epsilon_budget,
                                          confidence) if k is None else k, m)
        res = _guess("gradient", dirac.scores(privacy.noise_multiplier), dirac.included.tolist(), k_in, 0,
                     [f"dirac-{i:04d}" for i in range(m)], common)
        res.steps = dirac.steps
        res.sample_rate = dirac.sample_rate
        res.participated = int(((dirac.sampled > 0) & dirac.included).sum())
        res.reading_std_out = float(torch.stack(dirac.readings, 1)[~dirac.included].std())
        results.append(res)
    for r in results:
        r.seconds = round(time.time() - t0, 1)
    return results


def _guess(kind: str, score: torch.Tensor, included: list[bool], k_in: int, k_out: int, names: list[str],
           common: dict[str, Any]) -> CanaryResult:
    """Guess "in" on the ``k_in`` highest scores and "out" on the ``k_out`` lowest; bound ε."""
    m = len(included)
    order = sorted(range(m), key=lambda i: float(score[i]), reverse=True)
    guess: dict[int, bool] = {i: False for i in order[m - k_out:]} if k_out else {}
    guess.update({i: True for i in order[:k_in]})
    correct = sum(1 for i, g in guess.items() if included[i] == g)
    return CanaryResult(
        kind=kind, included=sum(included), guesses=len(guess), correct=correct, k_in=k_in, k_out=k_out,
        epsilon_lower_bound=epsilon_lower_bound(len(guess), correct, common["confidence"]), seconds=0.0,
        scores=[{"canary": u, "included": inside, "score": float(score[i]), "guess": guess.get(i)}
                for i, (u, inside) in enumerate(zip(names, included))], **common)
