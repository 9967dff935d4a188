"""The sequence model (``user-tower = sequence``): its per-example gradients are exact, its
per-position history features equal the one-history ones, the transition counts it reads are
the released ones minus the example's own pairs, the loss excludes what evaluation excludes,
group clipping bounds each group, one DP round accounts every step, and a checkpoint scores
the same after a reload."""

from __future__ import annotations

import math
import random
import types
from pathlib import Path

import pytest
import torch
from opacus import GradSampleModule

from fl_client.group_clipping import GroupClipDPOptimizer
from fl_client.sequence_train import clip_groups, train_sequence_round
from fl_client.task import open_silo
from shared_model.adapters import get_trainable_state, load_checkpoint, save_checkpoint
from shared_model.config import RunConfig
from shared_model.examples import train_user_ids
from shared_model.interest_features import history_features, sequence_features
from shared_model.model import build_model
from shared_model.privacy.state import PrivacyState
from shared_model.schema import Catalogue, Event, Item
from shared_model.sequence_loss import ItemSpace, sequence_loss
from shared_model.sequence_model import SequenceInput, SequenceModel
from shared_model.transition_index import TransitionIndex
from shared_model.transitions import TransitionTable

N, H, C = 40, 8, 3


def _table(a: list[int], b: list[int], counts: list[float]) -> TransitionTable:
    return TransitionTable(torch.tensor(a).numpy(), torch.tensor(b).numpy(), torch.tensor(counts).numpy())


def _toy(seed: int = 0, adaptor: int = 4, other_lags: int = 0) -> tuple[SequenceModel, SequenceInput, torch.Tensor, ItemSpace, torch.Tensor]:
    """A model with a prior and a transition table, a batch of 5 windows of different lengths,
    their own pairs, the item space and 15 shared candidates."""
    g = torch.Generator().manual_seed(seed)
    vec = torch.nn.functional.normalize(torch.randn(N, H, generator=g), dim=-1)
    cat = torch.randint(0, C + 1, (N,), generator=g)
    model = SequenceModel(H, C, history_lags=4, logit_scale=10.0, popularity_weight=1.0, transition_weight=0.7,
                          transition_lags=3, adaptor_rank=adaptor, other_platform_lags=other_lags)
    model.popularity_prior.set_prior(torch.randn(N, generator=g))
    keys = torch.unique(torch.randint(0, N * N, (80,), generator=g))
    a, b = keys // N, keys % N
    keep = a < b
    model.transition_table.set_table(_table(a[keep].tolist(), b[keep].tolist(),
                                            torch.randint(1, 6, (int(keep.sum()),), generator=g).float().tolist()))
    rows = torch.randint(0, N, (5, 7), generator=g)
    for i, n in enumerate([7, 3, 5, 2, 6]):
        rows[i, : 7 - n] = -1
    rows[0, -2:] = torch.tensor([int(a[keep][0]), int(b[keep][0])])  # example 0 has a released pair …
    own = torch.full((5, 3, 2), -1)
    own[0, 0] = rows[0, -2:]  # … of its own
    cats = torch.where(rows >= 0, cat[rows.clamp_min(0)], torch.full_like(rows, -1))
    inp = SequenceInput(rows, vec[rows.clamp_min(0)] * (rows >= 0).unsqueeze(-1), cats, sequence_features(cats, C, 3))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    items = ItemSpace(vec, cat, torch.arange(N), torch.ones(C, dtype=torch.bool))
    return model, inp, own, items, torch.randperm(N, generator=g)[:15]


def _one(inp: SequenceInput, i: int) -> SequenceInput:
    return SequenceInput(inp.rows[i : i + 1], inp.vectors[i : i + 1], inp.cats[i : i + 1], inp.features[i : i + 1])


@pytest.mark.parametrize("top_k", [0, 6])  # sampled softmax; the top-k loss over each position's hardest items
def test_per_example_gradients_are_each_examples_own(top_k: int) -> None:
    model, inp, own, items, shared = _toy()
    wrapped = GradSampleModule(model)
    loss, _ = sequence_loss(wrapped, inp, own, items, shared, category_prior_weight=0.5, top_k=top_k)
    loss.backward()
    for i in range(5):
        alone, *_ = _toy()
        alone.load_state_dict(model.state_dict())
        l_i, _ = sequence_loss(alone, _one(inp, i), own[i : i + 1], items, shared, category_prior_weight=0.5,
                               top_k=top_k)
        l_i.backward()
        for (name, p), (_, q) in zip(model.named_parameters(), alone.named_parameters()):
            ref = q.grad if q.grad is not None else torch.zeros_like(q)
            assert torch.allclose(p.grad_sample[i], ref, atol=1e-5), (i, name)


def test_per_position_features_are_those_of_each_prefix() -> None:
    rng = random.Random(0)
    items = {str(i): Item(str(i), "p", f"t{i}", ("root", f"c{i % 4}") if i % 4 != 3 else ("root",)) for i in range(30)}
    catalogue = Catalogue(items)
    vocab = sorted({it.interest for it in items.values() if it.interest})
    index = {c: i for i, c in enumerate(vocab)}
    seqs = [[str(rng.randrange(30)) for _ in range(rng.randint(1, 9))] for _ in range(6)]
    cats = torch.full((6, 9), -1)
    for b, s in enumerate(seqs):
        for j, item in enumerate(s):
            cats[b, 9 - len(s) + j] = index.get(items[item].interest or "", len(vocab))
    feats = sequence_features(cats, len(vocab), 3)
    for b, s in enumerate(seqs):
        for j in range(len(s)):
            ref = history_features([Event("u", x, n) for n, x in enumerate(s[: j + 1])], catalogue, index, 3)
            assert torch.allclose(feats[b, 9 - len(s) + j], ref, atol=1e-6)


def test_transition_index_reads_the_table_and_survives_a_reload() -> None:
    index = TransitionIndex()
    index.set_table(_table([1, 1, 4], [3, 7, 9], [2.0, 5.0, 1.0]))
    assert index.lookup(torch.tensor([3, 7, 1, 9, 3]), torch.tensor([1, 1, 9, 4, 3])).tolist() == [2.0, 5.0, 0.0, 1.0, 0.0]
    owner, j, count = index.neighbours(torch.tensor([1, -1, 9]))
    assert sorted(zip(owner.tolist(), j.tolist(), count.tolist())) == [(0, 3, 2.0), (0, 7, 5.0), (2, 4, 1.0)]
    again = TransitionIndex()
    again.load_state_dict(index.state_dict())
    assert torch.equal(again.lookup(torch.tensor([7]), torch.tensor([1])), torch.tensor([5.0]))
    with pytest.raises(ValueError, match="0 ≤ a < b"):
        index.set_table(types.SimpleNamespace(a=[3], b=[1], counts=[1.0]))


def test_an_example_is_scored_with_the_other_users_counts() -> None:
    model, inp, own, items, shared = _toy()
    cands = items.candidates(model, torch.arange(N), targets=inp.rows[:, 1:])
    positions = torch.arange(inp.rows.shape[1] - 1)
    with_own = model.transition_entries(inp, cands, positions, None)
    without = model.transition_entries(inp, cands, positions, own)
    a, b = int(own[0, 0, 0]), int(own[0, 0, 1])
    released = float(model.transition_table.lookup(torch.tensor([a]), torch.tensor([b])))
    assert released > 0
    # example 0's total transition mass drops by exactly its own pair, once per (position, lag) that reads it
    diff = with_own[2][0].sum() - without[2][0].sum()
    assert diff > 0 and float(diff) == int(diff)
    assert torch.equal(with_own[2][1:].sum(1), without[2][1:].sum(1))  # the other examples are untouched


@pytest.mark.parametrize("masked", [False, True])  # True: a candidate's category has log p = −inf (another platform's)
def test_shared_scores_are_item_scores_in_one_product(masked: bool) -> None:
    model, inp, own, items, shared = _toy()
    positions = torch.arange(inp.rows.shape[1] - 1)
    q = model.queries(inp)[:, :-1].detach()
    logits = model.interest_logits(model.queries(inp), inp.features)[:, :-1]
    if masked:
        logits = logits.masked_fill(torch.arange(C) == int(items.category[shared[0]]) % C, float("-inf"))
    from shared_model.model import category_prior

    logp = category_prior(logits.detach())
    cands = items.candidates(model, shared)
    with torch.no_grad():
        ref = model.item_scores(q, inp, cands, positions, logp, 0.5, own)
        fast = model.shared_scores(q, inp, cands, positions, logp, 0.5, own)
    assert ref.shape == fast.shape == (5, len(positions), len(shared))
    assert torch.equal(torch.isinf(ref), torch.isinf(fast)) and torch.isinf(ref).any() == masked
    finite = torch.isfinite(ref)
    assert torch.allclose(ref[finite], fast[finite], atol=1e-5)
    assert (model.transition_entries(inp, cands, positions, own)[0] >= 0).any()  # the transition term was exercised
    # scoring only some positions (a region silo's, per target platform): those alike, the rest −inf
    only = torch.rand(ref.shape[:2], generator=torch.Generator().manual_seed(2)) < 0.5
    logp_only = logp.masked_fill(~only.unsqueeze(-1) & (torch.arange(C + 1) == 0), float("-inf"))  # −inf off `only`
    with torch.no_grad():
        part = model.shared_scores(q, inp, cands, positions, logp_only, 0.5, own, only=only)
    assert torch.isinf(part[~only]).all() and (part[~only] < 0).all()
    assert torch.equal(torch.isinf(part[only]), torch.isinf(ref[only]))
    finite = torch.isfinite(ref[only])
    assert torch.allclose(part[only][finite], ref[only][finite], atol=1e-5)


def test_the_hardest_items_and_the_near_flag_follow_their_definitions() -> None:
    from shared_model.sequence_loss import _excluded, hardest

    model, inp, own, items, shared = _toy()
    positions = torch.arange(inp.rows.shape[1] - 1)
    targets = inp.rows[:, 1:]
    q = model.queries(inp)[:, :-1].detach()
    cands, near = hardest(model, q, inp, items, targets, positions, 4, None, 0.0, own, shared)
    with torch.no_grad():
        ref = model.item_scores(q, inp, items.candidates(model, shared, targets=targets), positions, None, 0.0, own,
                                target_vectors=inp.vectors[:, 1:])
    others = ref[..., 1:].masked_fill(_excluded(inp, items.candidates(model, shared), targets, positions), float("-inf"))
    assert torch.equal(near, (others > ref[..., :1]).sum(-1) < 4)  # fewer than k items above the target
    assert not near.all() and near.any()
    top = others.topk(4, dim=-1)
    expect = torch.where(torch.isfinite(top.values), shared[top.indices], torch.full_like(top.indices, -1))
    assert torch.equal(cands.rows, expect)


def test_the_loss_never_counts_a_history_item_or_a_second_copy_of_the_target() -> None:
    model, inp, own, items, _ = _toy(adaptor=0)
    pair = _one(inp, 3)  # a window of two events: one position, history = the first, target = the second
    first, target = (int(r) for r in pair.rows[0, -2:])
    base = torch.tensor([r for r in range(N) if r not in (first, target)][:10])
    l1, _ = sequence_loss(model, pair, own[3:4], items, base)
    # the history item and a second copy of the target among the shared candidates change nothing …
    l2, _ = sequence_loss(model, pair, own[3:4], items, torch.cat([base, torch.tensor([first, target])]))
    assert torch.allclose(l1, l2, atol=1e-6)
    # … while any other item is a negative
    other = torch.tensor([r for r in range(N) if r not in (first, target) and r not in base.tolist()][:1])
    l3, _ = sequence_loss(model, pair, own[3:4], items, torch.cat([base, other]))
    assert l3 > l1


def test_group_clipping_bounds_each_group_and_reports_it() -> None:
    a = torch.nn.Parameter(torch.zeros(3))
    b = torch.nn.Parameter(torch.zeros(2))
    opt = GroupClipDPOptimizer(torch.optim.SGD([a, b], lr=1.0), groups=[("ranking", [a], 0.75), ("interest", [b], 0.25)],
                               noise_multiplier=0.0, max_grad_norm=2.0, expected_batch_size=2)
    a.grad_sample = torch.tensor([[3.0, 0.0, 4.0], [0.3, 0.0, 0.4]])  # norms 5 and 0.5
    b.grad_sample = torch.tensor([[0.0, 0.1], [6.0, 8.0]])  # norms 0.1 and 10
    opt.clip_and_accumulate()
    ca, cb = 2.0 * math.sqrt(0.75), 2.0 * math.sqrt(0.25)
    assert torch.allclose(a.summed_grad, torch.tensor([3.0, 0.0, 4.0]) * ca / 5 + torch.tensor([0.3, 0.0, 0.4]), atol=1e-5)
    assert torch.allclose(b.summed_grad, torch.tensor([0.0, 0.1]) + torch.tensor([6.0, 8.0]) * cb / 10, atol=1e-5)
    report = opt.clip_report()
    assert report["ranking"]["clipped"] == 0.5 and report["interest"]["clipped"] == 0.5
    assert report["ranking"]["mean-norm"] == pytest.approx(2.75) and report["interest"]["clip-share"] == pytest.approx(0.25)
    with pytest.raises(ValueError, match="sum to 1"):
        GroupClipDPOptimizer(torch.optim.SGD([a, b], lr=1.0), groups=[("x", [a], 0.5), ("y", [b], 0.1)],
                             noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=2)


def _seq_cfg(dataset: Path, bert: Path, **kw: object) -> RunConfig:
    base = {"dataset": str(dataset), "base-model": str(bert), "local-steps": 6, "batch-size": 16, "num-server-rounds": 2,
            "max-eval-users": 0, "num-negatives": 30, "physical-batch-size": 8, "transitions": False,
            "item-adaptor-rank": 4}
    return RunConfig.from_run_config({**base, **kw})


@pytest.mark.slow  # trains with Opacus
def test_one_dp_round_accounts_every_step(small_dataset: Path, tiny_bert: Path, cache_dir: Path) -> None:
    cfg = _seq_cfg(small_dataset, tiny_bert, **{"batch-size": 1})  # q = 1/users: some Poisson batches are empty
    data = open_silo(cfg, {"partition-id": 0, "num-partitions": 3})
    model = build_model(cfg, num_categories=len(data.categories))
    before = get_trainable_state(model)
    privacy = PrivacyState.calibrate(data.name, cfg, num_users=len(train_user_ids(data.silo)))
    result = train_sequence_round(model, data, cfg, privacy, seed=3, device=torch.device("cpu"))
    assert result.steps == cfg.local_steps
    assert sum(h[2] for h in result.history) == cfg.local_steps  # every logical step, empty ones too
    assert result.history[-1][:2] == (privacy.noise_multiplier, privacy.sample_rate)
    assert result.empty_steps >= 1
    assert set(result.clipping) == {name for name, _, _ in clip_groups(model, cfg)}
    after = get_trainable_state(model)
    assert any(not torch.equal(before[k], after[k]) for k in before)


@pytest.mark.slow  # trains with Opacus and writes a checkpoint
def test_a_sequence_checkpoint_scores_the_same_after_a_reload(small_dataset: Path, tiny_bert: Path, cache_dir: Path,
                                                              tmp_path: Path) -> None:
    from shared_model.scorer import Scorer

    cfg = _seq_cfg(small_dataset, tiny_bert, transitions=True)
    data = open_silo(cfg, {"partition-id": 1, "num-partitions": 3})
    model = build_model(cfg, num_categories=len(data.categories))
    rows = data.items.platform_rows(data.platform)
    model.transition_table.set_table(_table([int(rows[0])], [int(rows[1])], [4.0]))
    model.popularity_prior.set_prior(torch.linspace(-3, 0, len(data.items.item_ids)))
    privacy = PrivacyState.calibrate(data.name, cfg, num_users=len(train_user_ids(data.silo)))
    train_sequence_round(model, data, cfg, privacy, seed=1, device=torch.device("cpu"))
    meta = {"categories": data.categories, "config": cfg.to_run_config()}
    folder = save_checkpoint(model, tmp_path / "round-001", meta)
    loaded, _ = load_checkpoint(folder)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    scorer = Scorer.from_checkpoint(folder)
    history = data.silo.histories[train_user_ids(data.silo)[0]][:3]
    scores, probs = scorer.score([scorer.encode_history(history, data.platform)], data.platform)
    assert scores.shape == (1, len(rows)) and torch.isfinite(scores).all()
    assert probs.sum().item() == pytest.approx(1.0, abs=1e-4)
    # a typed title outside the catalogue goes through the base encoder, like a catalogue item's text
    raw = Catalogue({"\0raw:0": Item("\0raw:0", "", "hand painted ceramic mug", ())}, scorer.catalogue.platforms)
    free, _ = scorer.score([scorer.encode_history([Event("q", "\0raw:0", 0)], data.platform, raw)], data.platform)
    assert torch.isfinite(free).all() and not torch.equal(free, scores)
