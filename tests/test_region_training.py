"""Region silos in training and in the releases: a position is scored only against its target
platform's items and classes, the candidates of a region silo's query are its pair spaces one
after another (checked disjoint, counted in the query's order), and the server splits a region
silo's releases by platform and pair space."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shared_model.sequence_loss import ItemSpace, sequence_loss
from shared_model.sequence_model import SequenceInput
from shared_model.transitions import (counts_over, cross_candidate_pairs, pair_counts, pair_spaces, query_problem,
                                      space_of)
from tests.test_sequence_model import C, N, _toy

HALF = N // 2  # rows [0, HALF) are on platform 0 (classes 0, 1), the rest on platform 1 (class 2)


def _two_platforms(top_k: int, other_lags: int = 0) -> tuple:
    model, inp, own, items, shared = _toy(seed=3, other_lags=other_lags)
    cat = torch.where(torch.arange(N) < HALF, torch.arange(N) % 2, torch.full((N,), 2))
    cat[::7] = C  # some unlabelled items
    rows = inp.rows.clone()
    g = torch.Generator().manual_seed(5)
    real = rows >= 0
    rows[real] = torch.randint(0, HALF, (int(real.sum()),), generator=g)  # every target on platform 0 …
    first = real.float().argmax(1)
    rows[torch.arange(len(rows)), first] = HALF + torch.randint(0, HALF, (len(rows),), generator=g)  # … after one of platform 1
    cats = torch.where(rows >= 0, cat[rows.clamp_min(0)], torch.full_like(rows, -1))
    from shared_model.interest_features import sequence_features

    vec = items.vectors
    inp = SequenceInput(rows, vec[rows.clamp_min(0)] * (rows >= 0).unsqueeze(-1), cats, sequence_features(cats, C, 3))
    masks = torch.tensor([[True, True, False], [False, False, True]])
    region = ItemSpace(vec, cat, torch.arange(N), masks.any(0), item_platform=(torch.arange(N) >= HALF).long(),
                       platform_masks=masks)
    platform0 = ItemSpace(vec, cat, torch.arange(HALF), masks[0])
    pool = torch.randperm(N, generator=g)[:24]
    return model, inp, own, region, platform0, pool


@pytest.mark.parametrize("top_k", [0, 4])
def test_a_region_silo_scores_each_position_against_its_target_platform_only(top_k: int) -> None:
    """Windows whose targets are all on platform 0 (the oldest event on platform 1): the region
    silo's loss over a pool of both platforms equals the one-platform loss over the pool's
    platform-0 items with platform 0's classes; platform-1 candidates change nothing."""
    model, inp, own, region, platform0, pool = _two_platforms(top_k)
    mixed, stats = sequence_loss(model, inp, own, region, pool, category_prior_weight=0.5, top_k=top_k)
    alone, alone_stats = sequence_loss(model, inp, own, platform0, pool[pool < HALF], category_prior_weight=0.5,
                                       top_k=top_k)
    assert torch.isfinite(mixed) and float(mixed) > 0
    assert float(mixed) == pytest.approx(float(alone), rel=1e-5)
    assert stats["category"] == pytest.approx(alone_stats["category"], rel=1e-5)
    # without the platform mask the platform-1 candidates would count: the loss differs
    loose = ItemSpace(region.vectors, region.category, region.platform_rows, region.category_mask)
    other, _ = sequence_loss(model, inp, own, loose, pool, category_prior_weight=0.5, top_k=top_k)
    assert float(other) != pytest.approx(float(mixed), rel=1e-4)


def test_a_region_silo_s_hardest_items_come_from_each_position_s_target_platform() -> None:
    """Targets on both platforms: each position's k hardest items and its near flag are those of
    scoring the whole pool and masking the other platform's items (the per-platform product only
    skips work)."""
    from shared_model.sequence_loss import _excluded, hardest

    model, inp, own, region, _, pool = _two_platforms(4)
    g = torch.Generator().manual_seed(11)
    rows = torch.where(inp.rows >= 0, torch.randint(0, N, inp.rows.shape, generator=g), inp.rows)
    inp = SequenceInput(rows, region.vectors[rows.clamp_min(0)] * (rows >= 0).unsqueeze(-1),
                        torch.where(rows >= 0, region.category[rows.clamp_min(0)], -1), inp.features)
    targets = rows[:, 1:]
    inp, target_platform = region.with_platforms(inp)
    assert len(torch.unique(target_platform[:, :-1][targets >= 0])) == 2
    positions = torch.arange(rows.shape[1] - 1)
    q = model.queries(inp, target_platform)[:, :-1].detach()
    cands, near = hardest(model, q, inp, region, targets, positions, 4, None, 0.0, own, pool)
    with torch.no_grad():
        ref = model.item_scores(q, inp, region.candidates(model, pool, targets=targets), positions, None, 0.0, own,
                                target_vectors=inp.vectors[:, 1:])
    drop = _excluded(inp, region.candidates(model, pool), targets, positions) | region.other_platform(pool, targets)
    others = ref[..., 1:].masked_fill(drop, float("-inf"))
    assert torch.equal(near, (others > ref[..., :1]).sum(-1) < 4)
    top = others.topk(4, dim=-1)
    assert torch.equal(cands.rows, torch.where(torch.isfinite(top.values), pool[top.indices], -1))


@pytest.mark.parametrize("top_k", [0, 4])
def test_the_other_platform_pool_s_per_example_gradients_are_each_example_s_own(top_k: int) -> None:
    """With an other-platform pool, on a region silo's windows: Opacus' per-sample gradients
    (the pools' samplers over gathered streams) equal each example's own autograd gradient."""
    from opacus import GradSampleModule

    from tests.test_sequence_model import _one

    model, inp, own, region, _, pool = _two_platforms(top_k, other_lags=3)
    assert model.other_pool is not None and float(model.other_pool.weight.abs().sum()) > 0
    wrapped = GradSampleModule(model)
    loss, _ = sequence_loss(wrapped, inp, own, region, pool, category_prior_weight=0.5, top_k=top_k)
    loss.backward()
    assert float(model.other_pool.weight.grad_sample.abs().sum()) > 0  # the platform-1 events reach the query
    assert float(model.cold_scale.log_scale.grad_sample.abs().sum()) > 0  # position 0 is a cold start on platform 0
    for i in range(len(inp.rows)):
        alone = _two_platforms(top_k, other_lags=3)[0]
        alone.load_state_dict(model.state_dict())
        l_i, _ = sequence_loss(alone, _one(inp, i), own[i : i + 1], region, pool, category_prior_weight=0.5, top_k=top_k)
        l_i.backward()
        for (name, p), (_, q) in zip(model.named_parameters(), alone.named_parameters()):
            ref = q.grad if q.grad is not None else torch.zeros_like(q)
            assert torch.allclose(p.grad_sample[i], ref, atol=1e-5), (i, name)


def test_platform_streams_of_a_one_platform_window_are_the_shifted_window() -> None:
    """Every event on the target's platform: the same-platform stack is the window shifted by
    each lag (what RecencyPool reads), the other stack is empty, and the query is unchanged."""
    from shared_model.sequence_layers import lag_positions, platform_streams, shifted

    model, inp, _, _, _ = _toy(seed=1, other_lags=2)
    zeros = torch.zeros_like(inp.rows)
    same, other, cold = platform_streams(inp.vectors, zeros, inp.valid, zeros, 4, 2)
    assert not bool(cold.any())
    for lag in range(4):
        assert torch.equal(same[:, :, lag], shifted(inp.vectors, lag) * inp.valid.unsqueeze(-1))
    assert float(other.abs().sum()) == 0
    with_platforms = SequenceInput(inp.rows, inp.vectors, inp.cats, inp.features, zeros)
    assert torch.allclose(model.queries(with_platforms, zeros), model.queries(inp), atol=1e-6)
    # the l-th newest masked position at or before each position, by hand
    mask = torch.tensor([[True, False, True, True, False]])
    assert lag_positions(mask, 2).tolist() == [[[0, -1], [0, -1], [2, 0], [3, 2], [3, 2]]]


def test_the_query_for_a_platform_reads_that_platform_s_newest_items() -> None:
    """An untrained model (other weights 0, same weights (1, 0, …)): the query for platform k is
    the newest event on k, wherever the newest event of the history is."""
    model, inp, _, _, _ = _toy(seed=2, other_lags=2)
    torch.nn.init.zeros_(model.pool.weight)
    torch.nn.init.zeros_(model.other_pool.weight)
    torch.nn.init.zeros_(model.cold_scale.log_scale)
    model.adaptor_down = model.adaptor_up = None
    with torch.no_grad():
        model.pool.weight[0] = 1.0
    plats = torch.where(inp.valid, torch.arange(inp.rows.shape[1]).expand_as(inp.rows) % 2, torch.full_like(inp.rows, -1))
    mixed = SequenceInput(inp.rows, inp.vectors, inp.cats, inp.features, plats)
    last = inp.rows.shape[1] - 1
    for k in (0, 1):
        q = model.queries(mixed, torch.full_like(inp.rows, k))[:, -1]
        newest = last if last % 2 == k else last - 1
        want = torch.nn.functional.normalize(inp.vectors[:, newest], dim=-1)
        shown = inp.valid[:, newest]
        assert torch.allclose(q[shown], want[shown], atol=1e-6)
    # cold start on a platform (no event on it yet): the newest event of any platform, scaled by exp(c)
    only0 = SequenceInput(inp.rows, inp.vectors, inp.cats, inp.features, torch.where(inp.valid, 0, -1))
    q = model.queries(only0, torch.ones_like(inp.rows))[:, -1]
    assert torch.allclose(q, torch.nn.functional.normalize(inp.vectors[:, last], dim=-1), atol=1e-6)
    with torch.no_grad():
        model.cold_scale.log_scale.fill_(-1.0)
    q = model.queries(only0, torch.ones_like(inp.rows))[:, -1]
    assert torch.allclose(q, torch.nn.functional.normalize(inp.vectors[:, last], dim=-1) * torch.exp(torch.tensor(-1.0)),
                          atol=1e-6)
    assert torch.allclose(model.queries(mixed, torch.full_like(inp.rows, 0))[:, -1].norm(dim=-1)[inp.valid[:, -1]],
                          torch.ones(int(inp.valid[:, -1].sum())), atol=1e-6)  # not cold: unscaled


def test_class_masks_follow_each_position_s_target_platform() -> None:
    _, inp, _, region, _, _ = _two_platforms(0)
    targets = torch.tensor([[0, HALF, -1]])
    masks = region.class_masks(targets)
    assert masks.shape == (1, 3, C)
    assert masks[0, 0].tolist() == [True, True, False] and masks[0, 1].tolist() == [False, False, True]
    other = region.other_platform(torch.tensor([1, HALF + 1]), targets[:, :2])
    assert other.tolist() == [[[False, True], [True, False]]]


def test_pair_spaces_and_cross_candidates_hold_one_item_of_each_platform() -> None:
    assert pair_spaces(["arts"]) == ["arts"]
    assert pair_spaces(["arts", "office", "toys"]) == ["arts", "office", "toys", "arts|office", "arts|toys",
                                                      "office|toys"]
    assert space_of("office", "arts", ["arts", "office"]) == "arts|office" == space_of("arts", "office", ["arts", "office"])
    g = torch.Generator().manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(12, 4, generator=g), dim=-1)
    ra, rb = np.arange(0, 5), np.arange(5, 12)
    a, b = cross_candidate_pairs(emb, ra, rb, neighbours=2, popular_a=[1], popular_b=[9])
    assert np.all(a < b) and np.all(np.diff(a * 12 + b) > 0)  # sorted, unique
    assert np.all(np.isin(a, ra) & np.isin(b, rb))  # every pair crosses the platforms
    pairs = set(zip(a.tolist(), b.tolist()))
    sims = emb @ emb.T
    for i in ra:  # each A item has its 2 nearest B items …
        for j in rb[np.argsort(-sims[i, rb].numpy())[:2]]:
            assert (int(i), int(j)) in pairs
        assert (int(i), 9) in pairs  # … and B's popular item
    for j in rb:
        assert (1, int(j)) in pairs


def test_a_region_silo_s_release_is_counted_in_the_query_s_order_and_overlapping_spaces_are_refused() -> None:
    from shared_model.schema import Event, Silo

    # items 0-2 on platform p, 3-5 on q; user u: 0 → 3 → 1 → 4 (three cross pairs), v: 0 → 1 (a p pair)
    def ev(u: str, items: list[int]) -> list[Event]:
        return [Event(u, str(i), n) for n, i in enumerate(items)]

    silo = Silo("r0", ("p", "q"), {"u": "train", "v": "train"}, {"u": ev("u", [0, 3, 1, 4]), "v": ev("v", [0, 1])})
    row = {str(i): i for i in range(6)}
    exact = pair_counts(silo, ["u", "v"], row, max_pairs=8)
    assert list(zip(*[x.tolist() for x in exact])) == [(0, 1, 1.0), (0, 3, 1.0), (1, 3, 1.0), (1, 4, 1.0)]
    # the query: space p, then space q, then p|q — not sorted as a whole, as the silo receives it
    spaces = {"p": (np.array([0, 1]), np.array([1, 2])), "q": (np.array([3]), np.array([4])),
              "p|q": (np.array([0, 1, 1]), np.array([3, 3, 4]))}
    a = np.concatenate([spaces[s][0] for s in pair_spaces(["p", "q"])])
    b = np.concatenate([spaces[s][1] for s in pair_spaces(["p", "q"])])
    order = np.argsort(a * 6 + b, kind="stable")
    assert query_problem(a[order], b[order], np.arange(6), 6, 100) is None
    counts = counts_over(exact, (a[order], b[order]), 6)
    back = np.empty_like(counts)
    back[order] = counts
    assert back.tolist() == [1.0, 0.0, 0.0, 1.0, 1.0, 1.0]  # (0,1) (1,2) | (3,4) | (0,3) (1,3) (1,4)
    # a server that puts one pair in two spaces would count a user twice: the sorted check refuses it
    dup_a, dup_b = np.append(a, 0), np.append(b, 3)
    order = np.argsort(dup_a * 6 + dup_b, kind="stable")
    assert "not unique" in query_problem(dup_a[order], dup_b[order], np.arange(6), 6, 100)


def test_the_server_splits_a_region_silo_s_releases_by_platform_and_space() -> None:
    from fl_server.popularity import reply_platforms
    from fl_server.transitions import by_space, catalogue_platforms, concatenated
    from shared_model.schema import Catalogue, Item

    assert reply_platforms({"platform": "p,q"}) == ("p", "q") and reply_platforms({"platform": "p"}) == ("p",)
    catalogue = Catalogue({str(i): Item(str(i), "p" if i < 3 else "q", f"t{i}") for i in range(6)})
    cands = {"p": (np.array([0]), np.array([1])), "q": (np.array([3, 4]), np.array([4, 5])),
             "p|q": (np.array([2]), np.array([3]))}
    pairs = concatenated(["p", "q", "p|q"], cands)
    assert pairs is not None and pairs[0].tolist() == [0, 3, 4, 2]
    plat = catalogue_platforms(catalogue)
    assert plat.tolist() == [0, 0, 0, 1, 1, 1]
    split = by_space(pairs, np.array([1.0, 2.0, 3.0, 4.0]), ["p", "q", "p|q"], cands, plat, catalogue.platforms)
    assert {s: c.tolist() for s, (_, _, c) in split.items()} == {"p": [1.0], "q": [2.0, 3.0], "p|q": [4.0]}
    # exact (non-private) counts come as sparse pairs: split by their items' platforms
    exact = by_space((np.array([0, 2, 3]), np.array([1, 3, 5])), np.array([5.0, 6.0, 7.0]), ["p", "q", "p|q"], None,
                     plat, catalogue.platforms)
    assert {s: (a.tolist(), c.tolist()) for s, (a, _, c) in exact.items()} == {
        "p": ([0], [5.0]), "q": ([3], [7.0]), "p|q": ([2], [6.0])}
    assert concatenated(["p", "r"], cands) is None


@pytest.mark.parametrize("command", [["simulate", "--out", "OUT"], ["evaluate"], ["deploy", "local", "--silos", "2",
                                                                                 "--out", "OUT"]])
def test_an_unknown_layout_is_one_line_and_exit_2_with_nothing_created(command: list[str], tmp_path) -> None:  # type: ignore[no-untyped-def]
    import subprocess
    import sys

    out = tmp_path / "out"
    args = [str(out) if a == "OUT" else a for a in command]
    proc = subprocess.run([sys.executable, "-m", "fedshift.cli", *args, "--layout", "nope"], capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "has no layout 'nope' (it has: platforms, regions;" in lines[0]
    assert not out.exists()
