"""What leaves a silo (issue 11, item 4): every reply a silo sends during a run, captured
from the real ClientApp handlers, holds no user id, item id or history text."""

from __future__ import annotations

from pathlib import Path

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from fl_client import client_app
from fl_client.task import open_silo
from fl_server.transitions import platform_candidates, query_content
from shared_model.adapters import to_arrays
from shared_model.config import RunConfig
from shared_model.model import build_model


def _strings(reply: Message) -> tuple[list[str], bytes]:
    """Every key and text value of every record in a reply, and the arrays' raw bytes."""
    texts: list[str] = []
    raw = b""
    for name, record in reply.content.items():
        texts.append(name)
        if isinstance(record, ArrayRecord):
            for key in record.keys():
                texts.append(key)
                raw += record[key].data
        elif isinstance(record, (ConfigRecord, MetricRecord)):
            for key, value in record.items():
                texts.append(key)
                values = value if isinstance(value, list) else [value]
                texts += [v.decode("latin-1") if isinstance(v, bytes) else str(v) for v in values]
        else:
            raise AssertionError(f"unexpected record {name}: {type(record).__name__}")
    return texts, raw


@pytest.mark.slow  # trains with Opacus (2 rounds on one silo)
def test_no_reply_of_a_run_holds_user_ids_item_ids_or_history_text(
    small_dataset: Path, tiny_bert: Path, cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("_run_id", 1), ("_node_id", 7), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, value)
    cfg = RunConfig.from_run_config({"dataset": str(small_dataset), "base-model": str(tiny_bert), "local-steps": 2,
                                     "batch-size": 16, "num-server-rounds": 2, "max-eval-users": 0,
                                     "transition-epsilon-share": 0.1})  # round 3 overruns (0.6: it fits the slack)
    node = {"partition-id": 1, "state-dir": str(tmp_path)}
    data = open_silo(cfg, node)
    ctx = Context(run_id=1, node_id=7, node_config=node, state=RecordDict(), run_config=cfg.to_run_config())
    arrays = to_arrays(build_model(cfg, num_categories=len(data.categories)))
    replies: list[Message] = [client_app.popularity(Message(content=RecordDict({"config": ConfigRecord(
        {"server-round": 0})}), dst_node_id=7, message_type="query.popularity"), ctx)]  # noisy item counts
    query = query_content([data.platform], platform_candidates(cfg, data.catalogue, data.items))
    replies.append(client_app.transitions(Message(content=query, dst_node_id=7, message_type="query.transitions"),
                                          ctx))  # noisy transition counts over the public candidate pairs
    for rnd in range(0, 4):  # round 0 evaluation, 2 trained rounds, a 3rd refused by the budget
        if rnd:
            msg = Message(content=RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": rnd})}), dst_node_id=7, message_type="train")
            replies.append(client_app.train(msg, ctx))
            arrays = replies[-1].content["arrays"]
        msg = Message(content=RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": rnd})}), dst_node_id=7, message_type="evaluate")
        replies.append(client_app.evaluate(msg, ctx))
    refused_ctx = Context(run_id=2, node_id=7, node_config=node, state=RecordDict(),
                          run_config=cfg.replace(dp=False).to_run_config())  # a policy refusal too
    msg = Message(content=RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1})}), dst_node_id=7, message_type="train")
    replies.append(client_app.train(msg, refused_ctx))
    statuses = [str(r.content["status"]["status"]) for r in replies]
    assert statuses == ["released", "released", "evaluated", "trained", "evaluated", "trained", "evaluated", "budget-exhausted", "evaluated",
                        "refused"], statuses

    users = set(data.silo.splits) | set(data.silo.histories)
    items = {e.item_id for events in data.silo.histories.values() for e in events}
    titles = {data.catalogue.items[i].title for i in items if data.catalogue.items[i].title}
    assert users and items and titles
    for reply in replies:
        texts, raw = _strings(reply)
        words = {w.strip(",;:()[]{}\"'") for t in texts for w in t.split()}
        joined = "\n".join(texts)
        assert not users & words, f"user id in a reply: {sorted(users & words)[:3]}"
        assert not items & words, f"item id in a reply: {sorted(items & words)[:3]}"
        leaked = [t for t in titles if len(t) >= 8 and t in joined]
        assert not leaked, f"history text in a reply: {leaked[:3]}"
        for needle in sorted(users | items)[:400]:
            if len(needle) >= 4:
                assert needle.encode() not in raw, f"{needle!r} in the arrays' bytes"
