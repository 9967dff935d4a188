"""FFA-LoRA (Sun et al., ICLR 2024): with A frozen and shared, the server's FedAvg of the
silos' B gives exactly the weighted mean of their ΔW = s·B·A; plain FedAvg of A and B does not.

Real peft model (tiny BERT), real :class:`fl_server.strategy.RecordingFedAvg.aggregate_train`.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fl_server.records import RunRecords
from fl_server.strategy import RecordingFedAvg
from shared_model.adapters import get_trainable_state
from shared_model.config import RunConfig
from shared_model.model import build_model

WEIGHTS = (10, 30, 60)  # num-examples of the three silos


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("_run_id", 1), ("_node_id", 1), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, value)


def _reply(node: int, state: dict[str, torch.Tensor], sent: ArrayRecord, weight: int) -> Message:
    ins = Message(content=RecordDict({"arrays": sent}), dst_node_id=node, message_type="train")
    return Message(content=RecordDict({
        "arrays": ArrayRecord(OrderedDict(state)),
        "metrics": MetricRecord({"num-examples": weight, "train-loss": 1.0}),
        "info": ConfigRecord({"silo": f"s{node}", "platform": "p", "device": "cpu"}),
        "status": ConfigRecord({"status": "trained"})}), reply_to=ins)


def _delta_w(state: dict[str, torch.Tensor], frozen: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """ΔW = s·B·A of every LoRA module, A from ``state`` or (FFA) from the frozen model."""
    both = {**frozen, **state}
    return {name.replace(".lora_B.", "."): scaling * both[name].double() @ both[name.replace(".lora_B.", ".lora_A.")].double()
            for name in both if ".lora_B." in name}


def _aggregate(tmp_path: Path, mode: str, tiny_bert: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(server's ΔW after aggregating three perturbed silo states, weighted mean of the silos' ΔW)."""
    cfg = RunConfig(user_tower="text", base_model=str(tiny_bert), lora_mode=mode, history_features=False)
    model = build_model(cfg, num_categories=3)
    scaling = cfg.lora_alpha / cfg.lora_rank
    initial = get_trainable_state(model)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_A." in n}
    gen = torch.Generator().manual_seed(0)
    silos = [{k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in initial.items()} for _ in WEIGHTS]
    sent = ArrayRecord(initial)
    strategy = RecordingFedAvg(RunRecords(tmp_path, {}))
    strategy.sent = sent
    arrays, _ = strategy.aggregate_train(1, [_reply(i + 1, s, sent, w) for i, (s, w) in enumerate(zip(silos, WEIGHTS))])
    assert arrays is not None
    server = _delta_w({k: torch.as_tensor(v) for k, v in arrays.to_torch_state_dict().items()}, frozen, scaling)
    per_silo = [_delta_w(s, frozen, scaling) for s in silos]
    mean = {k: sum(w * d[k] for w, d in zip(WEIGHTS, per_silo)) / sum(WEIGHTS) for k in server}
    return server, mean


def test_ffa_freezes_a_and_sends_only_b_and_heads(tiny_bert: Path) -> None:
    ffa = get_trainable_state(build_model(RunConfig(user_tower="text", base_model=str(tiny_bert), lora_mode="ffa"), num_categories=3))
    fedavg = get_trainable_state(build_model(RunConfig(user_tower="text", base_model=str(tiny_bert)), num_categories=3))
    assert not any(".lora_A." in k for k in ffa) and any(".lora_B." in k for k in ffa)
    assert set(ffa) == {k for k in fedavg if ".lora_A." not in k}
    # A is the seeded initialisation: the same on every silo that builds the model from the run seed
    a1 = build_model(RunConfig(user_tower="text", base_model=str(tiny_bert), lora_mode="ffa"), 3).state_dict()
    a2 = build_model(RunConfig(user_tower="text", base_model=str(tiny_bert), lora_mode="ffa"), 3).state_dict()
    assert all(torch.equal(a1[k], a2[k]) for k in a1 if ".lora_A." in k)
    sent = sum(v.numel() for v in ffa.values()) / sum(v.numel() for v in fedavg.values())
    print(f"FFA sends {sent:.2%} of plain LoRA's trainable parameters")


def test_ffa_aggregation_is_the_exact_weighted_mean_of_delta_w(tmp_path: Path, tiny_bert: Path) -> None:
    server, mean = _aggregate(tmp_path, "ffa", tiny_bert)
    assert server
    worst = max(float((server[k] - mean[k]).abs().max()) for k in server)
    print(f"ffa: max |ΔW_server − mean ΔW| = {worst:.2e}")
    assert worst < 1e-6


def test_plain_fedavg_of_a_and_b_is_not_the_mean_of_delta_w(tmp_path: Path, tiny_bert: Path) -> None:
    server, mean = _aggregate(tmp_path / "fedavg", "fedavg", tiny_bert)
    worst = max(float((server[k] - mean[k]).abs().max()) for k in server)
    scale = max(float(mean[k].abs().max()) for k in mean)
    print(f"fedavg: max |ΔW_server − mean ΔW| = {worst:.2e} (max |mean ΔW| {scale:.2e})")
    assert worst > 1e-2 * scale
    assert np.isfinite(worst)
