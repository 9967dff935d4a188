"""Randomness the server cannot know (issue 11, item 1): a silo's Poisson samples and DP
noise come from its own secret, not from the run's ``seed``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import fl_client.dp_train as dp_train
import fl_client.sequence_train as sequence_train
from fl_client.silo_round import SiloSetup, TrainRequest, train_silo
from fl_client.task import TrainUsers, open_silo
from shared_model.sequences import TrainSequences
from fl_client.dp_train import pick_device
from shared_model.adapters import get_trainable_state, set_trainable_state
from shared_model.config import RunConfig
from shared_model.model import build_model
from shared_model.privacy.ledger import Ledger
from shared_model.privacy.silo_secret import secret_from_seed

import opacus.optimizers.optimizer as _opacus_optimizer

REAL_NOISE = _opacus_optimizer._generate_noise  # before any test wraps it


def _draws(cfg: RunConfig, secret: bytes, state: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[list[int], list[float], dict]:
    """One real DP round on silo 0: the users it sampled (in order) and the noise it drew."""
    import opacus.optimizers.optimizer as opt

    sampled: list[int] = []
    noise: list[float] = []

    sequence = cfg.user_tower == "sequence"

    class Recording(TrainSequences if sequence else TrainUsers):  # type: ignore[misc]
        def __getitem__(self, i: int):  # type: ignore[no-untyped-def]
            sampled.append(int(i))
            return super().__getitem__(i)

    def recording_noise(*args, **kwargs):  # type: ignore[no-untyped-def]
        out = REAL_NOISE(*args, **kwargs)
        noise.append(float(out.double().sum()))
        return out

    monkeypatch.setattr(sequence_train if sequence else dp_train, "TrainSequences" if sequence else "TrainUsers",
                        Recording)
    monkeypatch.setattr(opt, "_generate_noise", recording_noise)
    data = open_silo(cfg, {"partition-id": 0})
    silo = SiloSetup(cfg, data, pick_device(cfg), Ledger(state / data.name / "ledger.jsonl"), secret)
    initial = get_trainable_state(build_model(cfg, num_categories=len(data.categories)))
    reply = train_silo(TrainRequest(silo, run_id=3, server_round=1, load=lambda m: set_trainable_state(m, initial)))
    assert reply.status == "trained" and reply.model is not None
    return sampled, noise, get_trainable_state(reply.model)


@pytest.mark.slow  # trains with Opacus (3 short rounds)
@pytest.mark.parametrize("tower", ["sequence", "text"])
def test_same_run_seed_different_silo_secrets_draw_different_samples_and_noise(
    small_dataset: Path, tiny_bert: Path, cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tower: str
) -> None:
    cfg = RunConfig.from_run_config({"dataset": str(small_dataset), "base-model": str(tiny_bert), "local-steps": 2,
                                     "batch-size": 16, "num-server-rounds": 2, "seed": 42, "user-tower": tower,
                                     "num-negatives": 64})
    a = _draws(cfg, secret_from_seed(1, "s"), tmp_path / "a", monkeypatch)
    b = _draws(cfg, secret_from_seed(2, "s"), tmp_path / "b", monkeypatch)
    # another run seed (another initial model), the same silo secret
    a2 = _draws(cfg.replace(seed=7), secret_from_seed(1, "s"), tmp_path / "a2", monkeypatch)
    a3 = _draws(cfg, secret_from_seed(1, "s"), tmp_path / "a3", monkeypatch)
    print(f"sampled users: secret 1 {a[0][:8]}…, secret 2 {b[0][:8]}…; noise sums {a[1][:2]} vs {b[1][:2]}")
    assert len(a[1]) == len(b[1]) == cfg.local_steps * len(a[2])  # one draw per trainable tensor per step
    assert a[0] != b[0], "different silo secrets drew the same Poisson samples"
    assert all(x != y for x, y in zip(a[1], b[1])), "different silo secrets drew the same noise"
    assert a[0] == a2[0] and a[1] == a2[1], "the server's run seed changed the silo's samples or noise"
    assert a[0] == a3[0] and a[1] == a3[1]
    assert all(torch.equal(a[2][k], a3[2][k]) for k in a[2]), "same secret, same seed: not reproducible"
