"""The DP item-transition release (McSherry & Mironov, KDD 2009): each user's pairs, the public
candidate set, the Gaussian release and its accounting, the silo's refusals, the server's sum
and threshold, the table's validation and the audit of a ledger that holds such a release."""

from __future__ import annotations

import json
import re
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Context, Message, RecordDict

from shared_model.config import ConfigError, RunConfig
from shared_model.privacy.audit_report import by_kind
from shared_model.privacy.recompute import opacus_rdp
from shared_model.privacy.records import (DpSgdRound, PopularityRelease, TransitionRelease, parse_record,
                                          read_records, spending)
from shared_model.privacy.state import PrivacyState, RestoreMismatch
from shared_model.schema import Event, Silo
from shared_model.transitions import (TRANSITIONS_RECORD, TransitionTable, candidate_pairs, counts_over, noisy_counts,
                                      pair_counts, popular_rows, query_problem, sum_releases, user_pairs)


# ------------------------------------------------------------------------ a user's pairs
def test_each_user_counts_at_most_m_distinct_unordered_recent_pairs_once() -> None:
    history = [3, 1, 1, 3, 5, 2, 5, 4]  # oldest first; 1→1 is no transition, 1→3 and 3→1 are one pair
    assert user_pairs(history, 10) == [(4, 5), (2, 5), (3, 5), (1, 3)]  # newest first, unordered, once each
    assert user_pairs(history, 2) == [(4, 5), (2, 5)]  # the most recent m
    assert all(a < b for a, b in user_pairs(history, 10))
    assert user_pairs([7], 8) == [] and user_pairs([], 8) == []
    assert user_pairs([2, -1, 4, 6], 8) == [(4, 6)]  # an item outside the index (-1) makes no pair
    # so one user changes at most m coordinates by at most 1: L2 sensitivity √m
    silo = Silo("s", "p", {"u": "train", "v": "train"},
                {"u": [Event("u", i, n) for n, i in enumerate(["a", "b", "a", "c"])],
                 "v": [Event("v", i, n) for n, i in enumerate(["b", "a", "x"])]})  # x: not in the index
    a, b, counts = pair_counts(silo, ["u", "v"], {"a": 0, "b": 1, "c": 2}, max_pairs=8)
    assert list(zip(a.tolist(), b.tolist(), counts.tolist())) == [(0, 1, 2.0), (0, 2, 1.0)]


def test_pairs_within_a_window_and_the_table_swap_s_variants() -> None:
    from simulations.experiment.table_swap import parse_variant

    history = [3, 1, 1, 3, 5, 2, 5, 4]
    assert user_pairs(history, 10, window=1) == user_pairs(history, 10)  # the release's pairs: consecutive
    assert user_pairs([1, 2, 3], 10, window=2) == [(2, 3), (1, 3), (1, 2)]  # 1→3 is two events apart
    assert user_pairs([1, 2, 3], 2, window=2) == [(2, 3), (1, 3)]  # still the m newest
    assert user_pairs([1, 1, 2], 10, window=3) == [(1, 2)]  # (1, 2) once
    assert parse_variant("dp-w3-m16-t4") == {"m": 16, "window": 3, "threshold": 4.0, "dp": True, "above": 0.0}
    assert parse_variant("oracle>9")["above"] == 9.0
    for bad in ("exactly", "oracle>x", "dp-m8", "dp-w-m8-t4", "dp-mx-t4"):
        with pytest.raises(ValueError, match="variant"):
            parse_variant(bad)


# ------------------------------------------------------------------------ candidate pairs
def _embedding() -> torch.Tensor:
    """6 items at known angles on the unit circle (rows 0–5); rows 1, 3, 5 are platform A's."""
    angles = torch.tensor([0.0, 0.0, 3.0, 0.3, 3.1, 0.5])
    return torch.stack([angles.cos(), angles.sin()], dim=1)


def test_candidates_are_text_neighbours_and_popular_pairs_of_one_platform_sorted_unique() -> None:
    emb, rows = _embedding(), np.array([1, 3, 5])
    # nearest by cosine among A's items: 1 ↔ 3 (0.3 apart), 3 ↔ 5 (0.2), 5 → 3
    a, b = candidate_pairs(emb, rows, neighbours=1)
    assert list(zip(a.tolist(), b.tolist())) == [(1, 3), (3, 5)]
    a2, b2 = candidate_pairs(emb, rows, neighbours=1, chunk=1)  # top-k a chunk at a time: the same set
    assert np.array_equal(a, a2) and np.array_equal(b, b2)
    a, b = candidate_pairs(emb, rows, neighbours=0, popular=[5])  # every item with each popular item
    assert list(zip(a.tolist(), b.tolist())) == [(1, 5), (3, 5)]
    a, b = candidate_pairs(emb, rows, neighbours=5, popular=[1])  # k capped at n − 1: all pairs
    assert list(zip(a.tolist(), b.tolist())) == [(1, 3), (1, 5), (3, 5)]
    assert set(a.tolist()) | set(b.tolist()) <= set(rows.tolist()) and np.all(a < b)
    assert popular_rows(np.array([2.0, 9.0, 5.0]), rows, 2).tolist() == [3, 5]  # by summed counts


def test_counts_are_taken_over_the_candidates_only() -> None:
    cand = (np.array([0, 0, 2]), np.array([1, 3, 3]))
    pairs = (np.array([0, 1, 2]), np.array([1, 2, 3]), np.array([4.0, 7.0, 1.0]))  # (1, 2) is not a candidate
    assert counts_over(pairs, cand, num_items=4).tolist() == [4.0, 0.0, 1.0]


def test_noise_has_the_stated_standard_deviation_and_comes_from_the_seed() -> None:
    zeros = np.zeros(40_000)
    noisy = noisy_counts(zeros, noise_multiplier=1.5, max_items=4, seed=11)  # every coordinate, zero or not
    assert abs(noisy.std() - 1.5 * 2.0) < 0.05 and abs(noisy.mean()) < 0.05  # z·√m = 3
    assert np.array_equal(noisy, noisy_counts(zeros, 1.5, 4, seed=11))
    assert not np.array_equal(noisy, noisy_counts(zeros, 1.5, 4, seed=12))


@pytest.mark.parametrize("a,b,reason", [
    (None, [1], "lacks its candidate pairs"),
    ([1, 3], [3], "one length"),
    ([1.0], [3.0], "integer item rows"),
    ([3], [1], "a ≥ b"),
    ([1], [9], "outside [0, 6)"),
    ([0], [1], "another platform"),
    ([3, 1], [5, 3], "not sorted"),
    ([1, 1], [3, 3], "not unique"),
    ([1, 1, 3, 1], [3, 5, 5, 3], "4 candidate pairs > 3"),
])
def test_a_malformed_query_is_named(a: list | None, b: list, reason: str) -> None:
    got = query_problem(None if a is None else np.array(a), np.array(b), np.array([1, 3, 5]), 6, max_len=3)
    assert got is not None and reason in got, got
    assert query_problem(np.array([1, 3]), np.array([3, 5]), np.array([1, 3, 5]), 6, max_len=3) is None


# ------------------------------------------------------------------------ the table
def test_table_round_trips_and_rejects_bad_arrays() -> None:
    table = TransitionTable.from_arrays({"a": np.array([0, 0, 2]), "b": np.array([1, 3, 3]),
                                         "counts": np.array([1.5, 2.0, 7.0])})
    assert table.a.dtype == np.int64 and table.counts.dtype == np.float32 and len(table) == 3
    again = TransitionTable.from_arrays(table.arrays())
    assert all(np.array_equal(x, y) for x, y in zip(again.arrays().values(), table.arrays().values()))
    assert len(TransitionTable.from_arrays(TransitionTable.empty().arrays())) == 0
    bad = [({"a": [0], "b": [1]}, "missing array(s) counts"),
           ({"a": [0, 1], "b": [1], "counts": [1.0]}, "one length"),
           ({"a": [[0]], "b": [[1]], "counts": [[1.0]]}, "1-D"),
           ({"a": [0], "b": [1], "counts": [np.nan]}, "not finite"),
           ({"a": [0], "b": [1], "counts": [0.0]}, "≤ 0"),
           ({"a": [2], "b": [1], "counts": [1.0]}, "a ≥ b"),
           ({"a": [0.5], "b": [1.0], "counts": [1.0]}, "integer item rows"),
           ({"a": [1, 0], "b": [2, 1], "counts": [1.0, 1.0]}, "not sorted")]
    for arrays, message in bad:
        with pytest.raises(ValueError, match=f"transition table: .*{re.escape(message)}"):
            TransitionTable.from_arrays({k: np.array(v) for k, v in arrays.items()})


def test_summed_releases_are_thresholded_at_the_summed_noise() -> None:
    cand_a, cand_b = np.array([0, 0, 1, 2]), np.array([1, 2, 2, 3])
    one = (cand_a, cand_b, np.array([10.0, 3.0, -2.0, 4.0]), 3.0)
    two = (cand_a, cand_b, np.array([8.0, 5.0, 1.0, 2.0]), 4.0)
    table, std, summed = sum_releases([one, two], threshold=3.0, num_items=4)
    assert std == pytest.approx(5.0) and summed == 4  # √(3² + 4²)
    assert list(zip(table.a, table.b, table.counts)) == [(0, 1, 18.0)]  # 8, −1, 6 ≤ 3·5: dropped
    # exact counts (dp = false): sparse, different pairs per silo, kept when > 0
    exact, std, _ = sum_releases([(np.array([0]), np.array([1]), np.array([2.0]), 0.0),
                                  (np.array([0, 1]), np.array([1, 3]), np.array([1.0, 4.0]), 0.0)], 3.0, 4)
    assert std == 0 and list(zip(exact.a, exact.b, exact.counts)) == [(0, 1, 3.0), (1, 3, 4.0)]


# ------------------------------------------------------------------------ accounting
def test_calibration_gives_each_release_its_marginal_share_within_the_budget() -> None:
    cfg = RunConfig(num_server_rounds=3, local_steps=8, batch_size=32, epsilon=8.0, delta=1e-5,
                    popularity_epsilon_share=0.1, transition_epsilon_share=0.6)
    state = PrivacyState.calibrate("s", cfg, num_users=400)
    sgd = [(state.noise_multiplier, state.sample_rate, 24)]
    zt, zp = state.transition_noise_multiplier, state.popularity_noise_multiplier
    assert zt > 0 and zp > 0
    assert 2.4 - 0.02 <= state.epsilon_of(sgd) <= 2.4  # DP-SGD alone: (1 − 0.1 − 0.6)·ε
    with_transitions = state.epsilon_of(sgd + [(zt, 1.0, 1)])
    assert 7.2 - 0.011 <= with_transitions <= 7.2  # the transition release takes up to (1 − 0.1)·ε
    total = state.epsilon_of(sgd + [(zt, 1.0, 1), (zp, 1.0, 1)])
    assert 8.0 - 0.011 <= total <= 8.0  # the whole plan fits ε
    marginal = (with_transitions - state.epsilon_of(sgd)) / 8.0
    assert 0.6 - 0.005 <= marginal <= 0.6 + 0.005  # its marginal cost on top of DP-SGD: its share of ε
    # the audit's share (ε(all) − ε(all but it)) / ε(all) is lower: ε composes sub-additively
    audit_share = (total - state.epsilon_of(sgd + [(zp, 1.0, 1)])) / total
    assert 0.5 < audit_share < 0.6
    assert state.epsilon_of([(zt, 1.0, 1)]) > marginal * 8.0  # alone it would spend more than its share
    off = PrivacyState.calibrate("s", cfg.replace(transitions=False), num_users=400)
    assert off.transition_noise_multiplier == 0.0 and off.noise_multiplier < state.noise_multiplier
    only = PrivacyState.calibrate("s", cfg.replace(**{"popularity-prior": False}), num_users=400)
    plan = [(only.noise_multiplier, only.sample_rate, 24), (only.transition_noise_multiplier, 1.0, 1)]
    assert only.popularity_noise_multiplier == 0.0 and 8.0 - 0.011 <= only.epsilon_of(plan) <= 8.0
    with pytest.raises(ConfigError, match="popularity-epsilon-share = 0.4 \\+ transition-epsilon-share = 0.6"):
        cfg.replace(**{"popularity-epsilon-share": 0.4})
    assert cfg.replace(**{"popularity-epsilon-share": 0.4, "popularity-prior": False}).transitions


def _release(**kw: object) -> TransitionRelease:
    fields = dict(run_id="1", silo="s", round=0, platform="p", pairs=1000, max_pairs=8, noise_multiplier=2.0,
                  sensitivity=math.sqrt(8), delta=1e-5, accountant="rdp", epsilon_release=4.0,
                  epsilon_cumulative=4.0, epsilon_budget=8.0, users=400)
    fields.update(kw)
    return TransitionRelease(**fields)  # type: ignore[arg-type]


def test_restore_refuses_a_transition_release_made_with_other_noise() -> None:
    cfg = RunConfig(num_server_rounds=3, local_steps=8, batch_size=32, epsilon=8.0, delta=1e-5)
    state = PrivacyState.calibrate("s", cfg, num_users=400)
    rec = parse_record(_release(noise_multiplier=state.transition_noise_multiplier).to_dict())
    assert isinstance(rec, TransitionRelease) and spending([rec]) == [rec] and rec.phase == "transitions"
    assert state.restore([rec]).history == [(state.transition_noise_multiplier, 1.0, 1)]
    with pytest.raises(RestoreMismatch, match="transition release of round 0 used σ=2.5"):
        PrivacyState.calibrate("s", cfg, num_users=400).restore([_release(noise_multiplier=2.5)])


def test_the_audit_reports_the_transition_release_s_share() -> None:
    sgd = DpSgdRound(run_id="1", silo="s", round=1, steps=48, sample_rate=0.01, noise_multiplier=1.1,
                     max_grad_norm=1.0, delta=1e-5, accountant="rdp", epsilon_round=1.0, epsilon_cumulative=1.0,
                     epsilon_budget=8.0)
    pop = PopularityRelease(run_id="1", silo="s", round=0, platform="p", items=100, max_items=8, noise_multiplier=5.0,
                            sensitivity=math.sqrt(8), delta=1e-5, accountant="rdp", epsilon_release=0.8,
                            epsilon_cumulative=0.8, epsilon_budget=8.0)
    kinds = by_kind([pop, _release(), sgd], 1e-5, "rdp")
    joint = opacus_rdp([pop.mechanism, _release().mechanism, sgd.mechanism], 1e-5)
    without = opacus_rdp([pop.mechanism, sgd.mechanism], 1e-5)
    assert kinds["transition-releases"] == 1 and kinds["popularity-releases"] == 1
    assert math.isclose(kinds["transition-share-of-epsilon"], (joint - without) / joint, rel_tol=1e-9)
    assert kinds["epsilon-transition-release-alone"] == pytest.approx(opacus_rdp([(2.0, 1.0, 1)], 1e-5))
    assert math.isclose(kinds["popularity-share-of-epsilon"],
                        (joint - opacus_rdp([_release().mechanism, sgd.mechanism], 1e-5)) / joint, rel_tol=1e-9)


# ------------------------------------------------------------------------ silos and server, in this process
@pytest.fixture(scope="module")
def two_regions(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 platforms × 2 regions, 400 users: two silos per platform."""
    from simulations.datasets.generator import generate

    out = tmp_path_factory.mktemp("transitions") / "ds"
    generate(out, users=400, platforms=2, regions=2, seed=5)
    return out


@pytest.fixture()
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("_run_id", 21), ("_node_id", 1), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, value)


class LocalGrid:
    """A Grid that hands every message to the real ClientApp handler of its node, in this process."""

    def __init__(self, contexts: dict[int, Context]):
        self.contexts = contexts
        self.replies: list[Message] = []
        self.sent: list[Message] = []

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content=content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id)

    def send_and_receive(self, messages: list[Message], timeout: float | None = None) -> list[Message]:
        from fl_client import client_app

        handler = {"query.popularity": client_app.popularity, "query.transitions": client_app.transitions}
        self.sent = list(messages)
        self.replies = [handler[m.metadata.message_type](m, self.contexts[m.metadata.dst_node_id]) for m in messages]
        return self.replies


def _contexts(cfg: RunConfig, state: Path) -> dict[int, Context]:
    return {10 + i: Context(run_id=21, node_id=10 + i, node_config={"partition-id": i, "state-dir": str(state)},
                            state=RecordDict(), run_config=cfg.to_run_config()) for i in range(4)}


def _cfg(dataset: Path, tiny_bert: Path, **kw: object) -> RunConfig:
    return RunConfig.from_run_config({"dataset": str(dataset), "base-model": str(tiny_bert), "transition-neighbours": 5,
                                      "transition-popular": 10, "transition-threshold": 3.0, **kw})


def test_silos_release_once_the_server_sums_and_the_audit_recomputes(
    two_regions: Path, tiny_bert: Path, cache_dir: Path, tmp_path: Path, task_identity: None
) -> None:
    from fl_server.popularity import collect_prior
    from fl_server.records import RunRecords
    from fl_server.strategy import RecordingFedAvg
    from fl_server.transitions import collect_transitions, platform_candidates, query_content, table_record
    from fl_client import client_app
    from fl_client.flower_edge import loader
    from shared_model.dataset import load_catalogue
    from shared_model.item_index import build_item_index
    from shared_model.privacy.audit_report import audit_run
    from shared_model.privacy.ledger import Ledger

    cfg = _cfg(two_regions, tiny_bert)
    out = tmp_path / "run"
    out.mkdir()
    grid = LocalGrid(_contexts(cfg, out / "silo-state"))
    catalogue = load_catalogue(two_regions, str(tiny_bert), cfg.max_item_tokens)
    records = RunRecords(out, {"run-id": 21, "dp": True, "config": cfg.to_run_config()})
    strategy = RecordingFedAvg(records, ledger=Ledger(out / "ledger.jsonl"))
    collected = collect_prior(grid, cfg, catalogue, records, strategy.append_ledger, 4)  # type: ignore[arg-type]
    table, summary = collect_transitions(grid, cfg, catalogue, records,  # type: ignore[arg-type]
                                         strategy.append_ledger, 4, collected)
    replies = grid.replies
    assert [str(r.content["status"]["status"]) for r in replies] == ["released"] * 4
    assert [list(m.content["config"]["spaces"]) for m in grid.sent] == [["p0"], ["p0"], ["p1"], ["p1"]]
    # the server's sum: each platform's two releases over one candidate set, thresholded at threshold·√2·z·√m
    candidates = platform_candidates(cfg, catalogue, build_item_index(catalogue, str(tiny_bert), cfg.max_item_tokens),
                                     collected.sums)
    expected = []
    for platform, (a, b) in sorted(candidates.items()):
        mine = [r for r in replies if r.content["info"]["platform"] == platform]
        z = float(mine[0].content["ledger"]["noise-multiplier"])
        std = math.sqrt(2) * z * math.sqrt(cfg.transition_max_pairs)
        total = sum(r.content["counts"]["counts"].numpy().astype(np.float64) for r in mine)
        assert len(total) == len(a) == summary["platforms"][platform]["candidate-pairs"]
        assert summary["platforms"][platform]["noise-std"] == pytest.approx(std, rel=1e-6)
        keep = total > cfg.transition_threshold * std
        expected += list(zip(a[keep].tolist(), b[keep].tolist()))
        assert summary["platforms"][platform]["pairs-kept"] == int(keep.sum())
    assert list(zip(table.a.tolist(), table.b.tolist())) == sorted(expected) and len(table) > 0
    # a second request in the same run is refused, spends nothing, releases nothing
    node, ctx = next(iter(grid.contexts.items()))
    platforms = collected.platform_of[node]
    again = client_app.transitions(Message(content=query_content(list(platforms), candidates), dst_node_id=node,
                                           message_type="query.transitions"), ctx)
    assert again.content["status"]["status"] == "refused" and "already released" in again.content["status"]["reason"]
    assert "counts" not in again.content and "ledger" not in again.content
    # the federation ledger holds each silo's two releases; the audit recomputes ε with them and passes
    kinds = [r.KIND for r in read_records(Ledger(out / "ledger.jsonl"))]
    assert kinds.count("popularity-release") == 4 and kinds.count("transition-release") == 4
    records.write()
    result = audit_run(out)
    assert result["passed"], [c for c in result["checks"] if not c["passed"]]
    for s in result["silos"].values():
        assert s["kinds"] == ["popularity-release", "transition-release"] and s["transition-releases"] == 1
        assert 0 < s["transition-share-of-epsilon"] < 1 and s["epsilon-transition-release-alone"] > 0
    # the table travels in a message and a loader puts it into a model that has a place for it
    record = table_record(table)
    back = TransitionTable.from_arrays({k: record[k].numpy() for k in record.keys()})
    assert np.array_equal(back.a, table.a) and np.array_equal(back.counts, table.counts)

    class Holder:  # the model's transition_table (the model side's own module is tested with the model)
        got: TransitionTable | None = None

        def set_table(self, t: TransitionTable) -> None:
            self.got = t

    model = torch.nn.Module()
    model.transition_table = Holder()
    loader(Message(content=RecordDict({"arrays": ArrayRecord(), TRANSITIONS_RECORD: record}), dst_node_id=1,
                   message_type="train"))(model)
    assert model.transition_table.got is not None and np.array_equal(model.transition_table.got.b, table.b)


def test_a_malformed_query_is_refused_before_anything_is_spent(
    two_regions: Path, tiny_bert: Path, cache_dir: Path, tmp_path: Path, task_identity: None
) -> None:
    from fl_client import client_app
    from fl_server.transitions import query_content
    from shared_model.privacy.ledger import Ledger

    cfg = _cfg(two_regions, tiny_bert)
    ctx = _contexts(cfg, tmp_path)[10]
    cases = [({"p0": (np.array([3, 1]), np.array([5, 2]))}, "not sorted"),
             ({"p0": (np.array([0]), np.array([500]))}, "outside [0, 320)"),
             ({"p0": (np.array([0]), np.array([200]))}, "another platform"),
             ({}, "lacks its candidate pairs")]
    for candidates, reason in cases:
        reply = client_app.transitions(Message(content=query_content(["p0"], candidates), dst_node_id=10,
                                               message_type="query.transitions"), ctx)
        assert reply.content["status"]["status"] == "refused"
        assert reply.content["status"]["reason"].startswith("malformed transition query: ")
        assert reason in reply.content["status"]["reason"], reply.content["status"]["reason"]
        assert "counts" not in reply.content and "ledger" not in reply.content
    ledger = tmp_path / "p0-r0" / "ledger.jsonl"
    assert not ledger.exists() or not read_records(Ledger(ledger))  # nothing spent, nothing recorded


def test_a_non_private_run_sends_exact_sparse_counts_declared_outside_epsilon(
    two_regions: Path, tiny_bert: Path, cache_dir: Path, tmp_path: Path, task_identity: None
) -> None:
    from fl_server.records import RunRecords
    from fl_server.strategy import RecordingFedAvg
    from fl_server.transitions import collect_transitions
    from shared_model.dataset import load_catalogue
    from shared_model.examples import train_user_ids
    from shared_model.privacy.ledger import Ledger
    from shared_model.privacy.policy import POLICY_NAME, write_default_policy

    cfg = _cfg(two_regions, tiny_bert, dp=False)
    for i in range(4):  # each silo's policy allows a non-private run
        write_default_policy(tmp_path / "state" / f"p{i // 2}-r{i % 2}" / POLICY_NAME, allow_non_private=True)
    grid = LocalGrid(_contexts(cfg, tmp_path / "state"))
    catalogue = load_catalogue(two_regions, str(tiny_bert), cfg.max_item_tokens)
    records = RunRecords(tmp_path, {"run-id": 21, "dp": False})
    strategy = RecordingFedAvg(records, ledger=Ledger(tmp_path / "ledger.jsonl"))
    table, summary = collect_transitions(grid, cfg, catalogue, records,  # type: ignore[arg-type]
                                         strategy.append_ledger, 4)
    assert [str(r.content["status"]["status"]) for r in grid.replies] == ["exact"] * 4
    assert all(p["noise-std"] == 0 and p["candidate-pairs"] is None for p in summary["platforms"].values())
    # the table is every observed pair's exact total over the four silos
    from fl_client.task import cached_silo

    row = {item: i for i, item in enumerate(catalogue.items)}
    releases = []
    for i in range(4):
        silo = cached_silo(two_regions / "silos" / f"p{i // 2}-r{i % 2}", two_regions)
        releases.append((*pair_counts(silo, train_user_ids(silo), row, cfg.transition_max_pairs), 0.0))
    exact, _, _ = sum_releases(releases, 0.0, len(catalogue.items))
    assert np.array_equal(table.a, exact.a) and np.array_equal(table.counts, exact.counts)
    declared = [r for r in read_records(Ledger(tmp_path / "ledger.jsonl"))]
    assert [(r.KIND, getattr(r, "phase", "")) for r in declared] == [("plain-release", "transitions")] * 4
    assert json.dumps(summary)  # the summary goes to metrics.json


def test_without_a_popularity_release_every_silo_gets_every_platform_s_neighbour_pairs(
    two_regions: Path, tiny_bert: Path, cache_dir: Path, tmp_path: Path, task_identity: None
) -> None:
    from fl_server.records import RunRecords
    from fl_server.strategy import RecordingFedAvg
    from fl_server.transitions import collect_transitions, platform_candidates, release_problem
    from shared_model.dataset import load_catalogue
    from shared_model.item_index import build_item_index
    from shared_model.privacy.ledger import Ledger

    cfg = _cfg(two_regions, tiny_bert, **{"popularity-prior": False})
    grid = LocalGrid(_contexts(cfg, tmp_path / "state"))
    catalogue = load_catalogue(two_regions, str(tiny_bert), cfg.max_item_tokens)
    records = RunRecords(tmp_path, {"run-id": 21, "dp": True})
    strategy = RecordingFedAvg(records, ledger=Ledger(tmp_path / "ledger.jsonl"))
    _, summary = collect_transitions(grid, cfg, catalogue, records, strategy.append_ledger, 4)  # type: ignore[arg-type]
    assert [str(r.content["status"]["status"]) for r in grid.replies] == ["released"] * 4
    # the server knew no node's platform: each query carried every pair space (a node could be a region
    # silo), each silo answered for its own platform's
    assert [list(m.content["config"]["spaces"]) for m in grid.sent] == [["p0", "p1", "p0|p1"]] * 4
    neighbours = platform_candidates(cfg, catalogue, build_item_index(catalogue, str(tiny_bert), cfg.max_item_tokens))
    assert {p: s["candidate-pairs"] for p, s in summary["platforms"].items()} == {
        p: len(a) for p, (a, _) in neighbours.items()}
    # the server refuses a release of the wrong length or with non-finite counts, naming why
    reply = grid.replies[0]
    platform = str(reply.content["info"]["platform"])
    rows = np.flatnonzero(np.array([i.platform for i in catalogue.items.values()]) == platform)
    short = (neighbours[platform][0][:-1], neighbours[platform][1][:-1])
    assert release_problem(cfg, reply.content, short, rows, len(catalogue.items))[0] == \
        f"sent {len(neighbours[platform][0])} counts for {len(short[0])} candidate pairs"
    reply.content["metrics"]["noise-std"] = 0.5  # a silo understating its noise (to pass the threshold)
    assert release_problem(cfg, reply.content, neighbours[platform], rows, len(catalogue.items))[0].startswith(
        "noise std 0.5, but its ledger record declares z·√m = ")
    reply.content["counts"]["counts"] = Array(np.full(len(neighbours[platform][0]), np.nan, dtype=np.float32))
    assert release_problem(cfg, reply.content, neighbours[platform], rows, len(catalogue.items))[0] == \
        "non-finite counts or noise std"
