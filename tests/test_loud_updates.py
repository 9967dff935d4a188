"""The server's refusals, driven with real Flower Messages through
:class:`fl_server.strategy.RecordingFedAvg`: non-finite, absurdly large, wrong-shape,
wrong-dtype, missing/extra-key updates and implausible ``num-examples`` are left out of the
average, named and recorded in metrics.json; a round with no accepted update makes
:func:`shared_model.run_health.run_problems` report it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fl_server.records import RunRecords
from fl_server.strategy import RecordingFedAvg
from fl_server.update_checks import cap_weights, num_examples_problem, update_problem
from shared_model.run_health import run_problems

GLOBAL = {"lora_A": np.full((8, 4), 0.5, np.float32), "head": np.ones(3, np.float32)}


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    # Outside a Flower process a Message needs the task identity Flower would set.
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("_run_id", 1), ("_node_id", 1), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, value)


def _record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(v) for k, v in arrays.items()})


def _reply(node: int, silo: str, arrays: dict[str, np.ndarray], num_examples: object = 10) -> Message:
    ins = Message(content=RecordDict({"arrays": _record(GLOBAL)}), dst_node_id=node, message_type="train")
    metrics = MetricRecord({"num-examples": num_examples, "train-loss": 1.0}) if num_examples is not None else MetricRecord({})
    return Message(content=RecordDict({"arrays": _record(arrays), "metrics": metrics,
                                       "info": ConfigRecord({"silo": silo, "platform": "p", "device": "cpu"}),
                                       "status": ConfigRecord({"status": "trained"})}), reply_to=ins)


def _strategy(tmp_path: Path) -> RecordingFedAvg:
    s = RecordingFedAvg(RunRecords(tmp_path, {}))
    s.sent = _record(GLOBAL)
    return s


BAD = {
    "nan": ({"lora_A": np.full((8, 4), np.nan, np.float32), "head": GLOBAL["head"]}, 10, "not finite"),
    "inf": ({"lora_A": GLOBAL["lora_A"], "head": np.array([1, np.inf, 1], np.float32)}, 10, "not finite"),
    "broadcast": ({"lora_A": np.ones(1, np.float32), "head": GLOBAL["head"]}, 10, "float32[1], the global model's is float32[8, 4]"),
    "dtype": ({"lora_A": GLOBAL["lora_A"].astype(np.float64), "head": GLOBAL["head"]}, 10, "float64[8, 4]"),
    "missing": ({"lora_A": GLOBAL["lora_A"]}, 10, "missing ['head']"),
    "extra": ({**GLOBAL, "x": np.zeros(2, np.float32)}, 10, "extra ['x']"),
    "huge": ({"lora_A": np.full((8, 4), 1e6, np.float32), "head": GLOBAL["head"]}, 10, "absurdly large"),
    "zero-users": (GLOBAL, 0, "not a positive integer"),
    "negative-users": (GLOBAL, -5, "not a positive integer"),
    "fractional-users": (GLOBAL, 2.5, "not a positive integer"),
    "implausible-users": (GLOBAL, 1e12, "implausible"),
    "no-weight": (GLOBAL, None, "not a number"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_update_is_refused_named_and_left_out(case: str, tmp_path: Path) -> None:
    arrays, n, why = BAD[case]
    s = _strategy(tmp_path)
    good = {"lora_A": np.full((8, 4), 0.6, np.float32), "head": np.full(3, 2.0, np.float32)}
    new, _ = s.aggregate_train(1, [_reply(11, "good-silo", good), _reply(12, "bad-silo", arrays, n)])
    assert new is not None
    np.testing.assert_allclose(new["lora_A"].numpy(), good["lora_A"])  # only the good silo was averaged
    doc = json.loads((tmp_path / "metrics.json").read_text())
    assert [(p["silo"], p["kind"]) for p in doc["problems"]] == [("bad-silo", "refused")]
    assert why in doc["problems"][0]["reason"]
    assert doc["outcomes"] == [{"round": 1, "phase": "train", "ok": 1, "failed": 1, "declined": 0}]
    assert any("silo bad-silo: refused" in line for line in run_problems(tmp_path / "metrics.json"))


def test_a_round_with_no_accepted_update_is_a_failed_round(tmp_path: Path) -> None:
    s = _strategy(tmp_path)
    nan = {"lora_A": np.full((8, 4), np.nan, np.float32), "head": GLOBAL["head"]}
    new, _ = s.aggregate_train(1, [_reply(11, "a", nan), _reply(12, "b", nan)])
    assert new is None
    problems = run_problems(tmp_path / "metrics.json")
    assert problems[0] == "round 1: no successful train reply (2 failed, 0 declined)"
    assert {p.split(":")[2].strip() for p in problems[1:]} == {"silo a", "silo b"}


def test_a_failed_silo_sends_no_arrays_and_is_named(tmp_path: Path) -> None:
    s = _strategy(tmp_path)
    ins = Message(content=RecordDict({"arrays": _record(GLOBAL)}), dst_node_id=12, message_type="train")
    failed = Message(content=RecordDict({
        "metrics": MetricRecord({"num-examples": 0, "train-loss": float("nan")}),
        "info": ConfigRecord({"silo": "sick", "platform": "p", "device": "cpu"}),
        "status": ConfigRecord({"status": "failed", "reason": "training loss is nan (not finite)"})}), reply_to=ins)
    new, _ = s.aggregate_train(1, [_reply(11, "well", GLOBAL), failed])
    assert new is not None
    doc = json.loads((tmp_path / "metrics.json").read_text())
    assert doc["problems"] == [{"round": 1, "phase": "train", "silo": "sick", "node-id": 12, "kind": "failed",
                                "reason": "training loss is nan (not finite)"}]


def test_outsized_weights_are_capped_not_trusted(tmp_path: Path) -> None:
    assert cap_weights({"a": 100, "b": 10**8, "c": 120}) == {"a": 100, "b": 1100, "c": 120}
    assert cap_weights({"alone": 10**6}) == {"alone": 10**6}
    s = _strategy(tmp_path)
    lo = {"lora_A": np.zeros((8, 4), np.float32), "head": GLOBAL["head"]}
    hi = {"lora_A": np.ones((8, 4), np.float32), "head": GLOBAL["head"]}
    new, _ = s.aggregate_train(1, [_reply(11, "a", lo, 100), _reply(12, "b", hi, 10**8), _reply(13, "c", lo, 100)])
    # b weighs 10 × median(100, 100) = 1000, not 10⁸: its share is 1000/1200
    np.testing.assert_allclose(new["lora_A"].numpy(), np.full((8, 4), 1000 / 1200), rtol=1e-6)
    doc = json.loads((tmp_path / "metrics.json").read_text())
    assert [(p["silo"], p["kind"]) for p in doc["problems"]] == [("b", "capped")]
    assert run_problems(tmp_path / "metrics.json") == []  # capped, still used: not a failure


def test_update_checks_accept_an_honest_update() -> None:
    step = {"lora_A": GLOBAL["lora_A"] + 0.01, "head": GLOBAL["head"] - 0.01}
    assert update_problem(_record(step), _record(GLOBAL), 250) is None
    assert num_examples_problem(True) is not None and num_examples_problem(float("nan")) is not None


def test_an_error_reply_is_recorded_with_the_silos_own_message(tmp_path: Path) -> None:
    from flwr.app import Error

    s = _strategy(tmp_path)
    s.aggregate_train(1, [_reply(11, "known", GLOBAL)])  # the server learns node 11's silo name
    ins = Message(content=RecordDict({"arrays": _record(GLOBAL)}), dst_node_id=11, message_type="evaluate")
    wrapped = ("<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'ray::ClientAppActor.run()\nTraceback ...\n"
               "Exception ClientAppException occurred. Message: silo known: model scores: 6 of 6 row(s) have "
               "non-finite scores'>")
    s.aggregate_evaluate(1, [Message(Error(code=0, reason=wrapped), reply_to=ins)])
    doc = json.loads((tmp_path / "metrics.json").read_text())
    assert doc["problems"][-1] == {"round": 1, "phase": "evaluate", "silo": "known", "node-id": 11, "kind": "error",
                                   "reason": "silo known: model scores: 6 of 6 row(s) have non-finite scores"}
    assert "round 1: no successful evaluate reply (1 failed, 0 declined)" in run_problems(tmp_path / "metrics.json")
