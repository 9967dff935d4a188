"""DP-SGD mechanics on one silo, without Flower: adapters change, the accountant counts
every step (empty Poisson batches too), state crosses the boundary only as trainable
tensors, and a reply message carries no user ids or texts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from opacus.accountants import RDPAccountant
from peft import get_peft_model_state_dict

from fl_client import client_app
from fl_client.dp_train import pick_device, train_round
from fl_client.flower_edge import STATE_KEY, state_from_record, state_to_record
from fl_client.task import open_silo
from shared_model.adapters import get_trainable_state, to_arrays
from shared_model.config import RunConfig
from shared_model.examples import train_user_ids
from shared_model.model import build_model
from shared_model.privacy.budget import can_train
from shared_model.privacy.state import PrivacyState, sample_rate_for


def _cfg(dataset: Path, bert: Path, **kw: object) -> RunConfig:
    base = {"user-tower": "text", "dataset": str(dataset), "base-model": str(bert), "local-steps": 4, "batch-size": 16,
            "num-server-rounds": 3, "max-eval-users": 0}
    return RunConfig.from_run_config({**base, **kw})


def test_trainable_state_is_exactly_lora_and_heads(small_dataset: Path, tiny_bert: Path, cache_dir: Path) -> None:
    cfg = _cfg(small_dataset, tiny_bert, **{"lora-mode": "fedavg"})  # A and B trained (ffa: below)
    model = build_model(cfg, num_categories=7)
    state = get_trainable_state(model)
    peft_state = get_peft_model_state_dict(model.encoder)
    lora = {k for k in state if ".lora_" in k}
    heads = {k for k in state if k.startswith(("category_head.", "history_head.", "popularity_head."))}
    assert lora | heads == set(state)
    assert state["popularity_head.weight"].shape == (1,)  # the prior's weight (the newest-item weight is fixed: not state)
    assert "last_item_head.weight" not in state
    assert state["history_head.shared"].shape == (4,)  # θ of the 4 history features
    assert state["history_head.per_category"].shape == (7, 4)  # δ per category
    # the same tensors peft would save, by count and size
    assert len(lora) == len(peft_state) == 2 * 2 * len(cfg.target_modules)  # 2 layers × A,B × modules
    assert sum(state[k].numel() for k in lora) == sum(v.numel() for v in peft_state.values())
    # frozen base weights are not in it
    assert not any("word_embeddings" in k or k.endswith("query.base_layer.weight") for k in state)
    # the same seed gives the same initial global model
    again = get_trainable_state(build_model(cfg, num_categories=7))
    assert all(torch.equal(state[k], again[k]) for k in state)
    # FFA-LoRA (the default): the same model, with A frozen, so only B and the heads are state
    ffa = get_trainable_state(build_model(_cfg(small_dataset, tiny_bert, **{"lora-mode": "ffa"}), num_categories=7))
    assert {k for k in ffa if ".lora_" in k} == {k for k in lora if ".lora_B." in k} and len(lora) == 2 * len(
        [k for k in ffa if ".lora_" in k])
    assert {k for k in ffa if ".lora_" not in k} == heads


@pytest.mark.slow  # trains with Opacus
def test_dp_round_updates_lora_b_and_accounts_every_step(small_dataset: Path, tiny_bert: Path, cache_dir: Path) -> None:
    cfg = _cfg(small_dataset, tiny_bert)
    data = open_silo(cfg, {"partition-id": 0})
    model = build_model(cfg, num_categories=len(data.categories))
    before = get_trainable_state(model)
    privacy = PrivacyState.calibrate(data.name, cfg, len(train_user_ids(data.silo)))
    result = train_round(model, data, cfg, privacy, seed=3, device=pick_device(cfg))
    after = get_trainable_state(model)
    lora_b = [k for k in after if "lora_B" in k]
    assert lora_b and all(not torch.equal(before[k], after[k]) for k in lora_b), "lora_B did not change (opacus#820)"
    assert result.steps == cfg.local_steps
    assert result.history == [(privacy.noise_multiplier, privacy.sample_rate, cfg.local_steps)]
    acc = RDPAccountant()
    acc.history = [(privacy.noise_multiplier, privacy.sample_rate, cfg.local_steps)]
    assert result.epsilon_total == pytest.approx(acc.get_epsilon(cfg.delta), rel=1e-9)
    # noise calibrated for the whole run: after all planned steps and the popularity and transition
    # releases (popularity-prior, transitions: the defaults) ε ≤ budget, and close to it
    releases = [(privacy.popularity_noise_multiplier, 1.0, 1), (privacy.transition_noise_multiplier, 1.0, 1)]
    full = privacy.epsilon_of([(privacy.noise_multiplier, privacy.sample_rate, privacy.planned_steps)] + releases)
    assert cfg.epsilon * 0.97 <= full <= cfg.epsilon
    # once the planned steps are spent, one more round would exceed the budget
    privacy.history = [(privacy.noise_multiplier, privacy.sample_rate, privacy.planned_steps)] + releases
    assert not can_train(privacy, cfg.local_steps)


@pytest.mark.slow  # trains with Opacus
def test_empty_poisson_batch_is_a_noise_only_step(small_dataset: Path, tiny_bert: Path, cache_dir: Path) -> None:
    # batch-size 1 over ~190 users: sample rate ≈ 0.005, so most steps draw nobody
    cfg = _cfg(small_dataset, tiny_bert, **{"batch-size": 1, "local-steps": 6})
    data = open_silo(cfg, {"partition-id": 1})
    n = len(train_user_ids(data.silo))
    privacy = PrivacyState.calibrate(data.name, cfg, n)
    assert privacy.sample_rate == pytest.approx(sample_rate_for(n, 1)) == pytest.approx(1 / n)
    model = build_model(cfg, num_categories=len(data.categories))
    before = get_trainable_state(model)
    result = train_round(model, data, cfg, privacy, seed=11, device=pick_device(cfg))
    assert result.empty_steps >= 1
    assert result.steps == 6
    assert result.history == [(privacy.noise_multiplier, privacy.sample_rate, 6)]
    # noise still moved the adapters
    after = get_trainable_state(model)
    assert any(not torch.equal(before[k], after[k]) for k in after if "lora_B" in k)


def test_privacy_state_round_trips_through_context_state() -> None:
    state = PrivacyState("s", "rdp", 8.0, 1e-5, 1.1, 0.01, 30, history=[(1.1, 0.01, 10), (1.1, 0.01, 10)], rounds=[1, 2])
    back = state_from_record(ConfigRecord(dict(state_to_record(state))))
    assert back == state
    assert back.epsilon_spent == pytest.approx(state.epsilon_of([(1.1, 0.01, 20)]))


@pytest.mark.slow  # trains with Opacus
def test_train_reply_carries_only_trainable_tensors_and_no_user_data(
    small_dataset: Path, tiny_bert: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Outside a Flower process a Message needs the task identity Flower would set.
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("_run_id", 1), ("_node_id", 7), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, value)
    cfg = _cfg(small_dataset, tiny_bert, **{"local-steps": 2})
    data = open_silo(cfg, {"partition-id": 2})
    model = build_model(cfg, num_categories=len(data.categories))
    msg = Message(
        content=RecordDict({"arrays": to_arrays(model), "config": ConfigRecord({"server-round": 1})}),
        dst_node_id=7,
        message_type="train",
    )
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 2}, state=RecordDict(),
                      run_config=cfg.to_run_config())
    reply = client_app.train(msg, context)
    content = reply.content
    assert set(content.array_records) == {"arrays"}
    arrays = content["arrays"]
    expected = get_trainable_state(model)
    assert list(arrays.keys()) == list(expected.keys())
    assert all(tuple(arrays[k].shape) == tuple(expected[k].shape) for k in expected)
    # nothing else: metrics are numbers, the only strings are silo/platform/device/release mode
    assert all(isinstance(v, (int, float)) for v in content["metrics"].values())
    assert set(content["info"].keys()) == {"silo", "platform", "device", "release-metrics"}
    strings = " ".join(str(v) for v in content["info"].values())
    users = set(data.silo.splits)
    titles = {it.title for it in data.catalogue.items.values()}
    assert not any(u in strings.split() for u in users)
    assert not any(t in strings for t in titles)
    # the privacy state was kept on the node, ε composes from it next round
    state = state_from_record(context.state[STATE_KEY])
    assert state.history[0][2] == 2 and state.rounds == [1]
    assert content["metrics"]["epsilon"] == pytest.approx(state.epsilon_spent)
