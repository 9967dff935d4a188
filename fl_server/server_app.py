"""The fedshift ServerApp: FedAvg over LoRA adapters + heads from a seeded initial model.

The server reads only public data (the item catalogue, for the category vocabulary).
Every round it records each silo's metrics, checkpoints the global model as a
peft-loadable folder signed with the run's Ed25519 key (public half:
``RUN/server-signing.pub``), and rewrites ``metrics.json`` / ``metrics.csv`` in ``out-dir``.

A run config with ``resume-run-id`` resumes the run in ``out-dir``
(:func:`shared_model.run_folder.resume_plan`): the last checkpoint is the initial model,
rounds are numbered after it up to ``num-server-rounds``, and ``metrics.json`` keeps the
interrupted run's records (``run.resumed`` names each resuming Flower run).

Run config ``popularity-prior = true``: before round 1 every silo releases a DP histogram of
its training users' items (:mod:`fl_server.popularity`); the per-platform prior built from
them travels with every later message and every checkpoint. Run config ``transitions = true``:
then every silo releases DP counts of its training users' item transitions over public
candidate pairs (:mod:`fl_server.transitions`); the summed table travels with every later
message and, in a model that holds one (``transition_table``), with every checkpoint. A
resumed run keeps the prior and the table of the checkpoint it resumes from.

Run config ``secure-aggregation = true`` hands the strategy a
:class:`~fl_server.secure_aggregation.SecureAggregation`: the server never holds a silo's
clear update, only the weighted sum (docs/secure-aggregation.md).
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from logging import INFO
from pathlib import Path

from flwr.app import ArrayRecord, Context
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from fl_server.popularity import CollectedPrior, collect_prior, prior_record
from fl_server.transitions import collect_transitions, model_table, set_model_table, table_record
from fl_server.records import RunRecords
from fl_server.secure_aggregation import SecureAggregation
from fl_server.strategy import RecordingFedAvg
from shared_model.adapters import from_arrays, load_checkpoint, save_checkpoint, to_arrays
from shared_model.checkpoint_signature import SERVER_PUB, run_signing_key, verify_checkpoint
from shared_model.config import RunConfig
from shared_model.dataset import load_catalogue
from shared_model.encoder import model_hash, resolve_base_model
from shared_model.item_index import catalogue_hash
from shared_model.model import build_model
from shared_model.privacy import accountants
from shared_model.privacy.ledger import LEDGER_NAME, Ledger
from shared_model.transitions import TransitionTable
from shared_model.run_folder import read_metrics, resume_plan

app = ServerApp()


def default_out_dir() -> Path:
    return Path.cwd() / "runs" / datetime.now().strftime("%Y%m%d-%H%M%S")


@app.main()
def main(grid: Grid, context: Context) -> None:
    started = time.time()
    cfg = RunConfig.from_run_config(dict(context.run_config))
    out = Path(cfg.out_dir).expanduser().resolve() if cfg.out_dir else default_out_dir()
    out.mkdir(parents=True, exist_ok=True)
    dataset = cfg.dataset_dir()
    catalogue = load_catalogue(dataset, cfg.base_model or None, cfg.max_item_tokens)
    categories = catalogue.interest_vocab()
    model = build_model(cfg, num_categories=len(categories))
    initial = to_arrays(model)
    base = resolve_base_model(cfg.base_model)
    run_info = {
        "run-id": context.run_id,
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "dataset": str(dataset),
        "base-model": str(base),
        "base-model-sha256": model_hash(cfg.base_model),
        "catalogue-sha256": catalogue_hash(catalogue),
        "num-categories": len(categories),
        "interests": catalogue.interest_choice,
        "trainable-parameters": sum(a.numpy().size for a in initial.values()),
        "dp": cfg.dp,
        "delta": cfg.delta,
        "accountant": cfg.accountant,
        "accountant-label": accountants.label(cfg.accountant),
        "ledger": LEDGER_NAME,
        "config": cfg.to_run_config(),
    }
    signing_key = run_signing_key(out)  # each round's checkpoint is signed; `fedshift verify` checks it
    run_info["checkpoint-public-key"] = SERVER_PUB
    first_round = 1
    if cfg.resume_run_id:
        plan = resume_plan(out)
        if plan.run_id != cfg.resume_run_id:
            raise ValueError(f"{out}: holds run {plan.run_id}, not run {cfg.resume_run_id} (resume-run-id)")
        first_round = plan.last_round + 1
        problems = verify_checkpoint(plan.checkpoint, signing_key.public_key())
        if problems:  # resume only from the checkpoint this run signed
            raise ValueError(f"{plan.checkpoint}: does not verify against {out / SERVER_PUB}: {problems[0]}")
        resumed_model = load_checkpoint(plan.checkpoint)[0]
        initial = to_arrays(resumed_model)
        records = RunRecords.resumed(out, read_metrics(out), {
            "run-id": context.run_id, "from-round": plan.last_round, "started": run_info["started"]})
        log(INFO, "fedshift: resuming run %s from %s: rounds %d-%d", plan.run_id, plan.checkpoint, first_round,
            cfg.num_server_rounds)
    else:
        records = RunRecords(out, run_info)
    log(INFO, "fedshift: %d trainable tensors (%d parameters); results in %s",
        len(initial), run_info["trainable-parameters"], out)

    def checkpoint(server_round: int, arrays: ArrayRecord) -> None:
        from_arrays(model, arrays)
        meta = {
            "round": server_round,
            "base-model": str(base),
            "base-model-sha256": run_info["base-model-sha256"],
            "catalogue-sha256": run_info["catalogue-sha256"],
            "categories": categories,
            "interests": catalogue.interest_choice,
            "config": cfg.to_run_config(),
            "run-id": context.run_id,
            **({"popularity": records.run_info["popularity"]} if "popularity" in records.run_info else {}),
            **({"transitions": records.run_info["transitions"]} if "transitions" in records.run_info else {}),
        }
        save_checkpoint(model, out / "checkpoints" / f"round-{server_round:03d}", meta, signing_key)

    num_nodes = max(1, cfg.min_nodes)
    strategy = RecordingFedAvg(
        records,
        on_round_end=checkpoint,
        ledger=Ledger(out / LEDGER_NAME),
        fraction_train=cfg.fraction_train,
        fraction_evaluate=1.0,
        min_train_nodes=num_nodes if cfg.fraction_train >= 1.0 else 1,
        min_evaluate_nodes=num_nodes,
        min_available_nodes=num_nodes,
        first_round=first_round,
        secure=SecureAggregation(cfg.secagg_threshold) if cfg.secure_aggregation else None,
    )
    collected: CollectedPrior | None = None
    if cfg.popularity_prior and model.popularity_prior is not None:
        if first_round == 1:  # every silo releases its DP item counts once, before round 1
            collected = collect_prior(grid, cfg, catalogue, records, strategy.append_ledger, num_nodes)
            records.run_info["popularity"] = collected.summary
            model.popularity_prior.set_prior(collected.prior)
        else:  # a resumed run keeps the prior of the checkpoint it resumes from
            model.popularity_prior.set_prior(resumed_model.popularity_prior.log_prior)
        strategy.popularity = prior_record(model.popularity_prior.log_prior.numpy())
    if cfg.transitions:
        # every silo releases its DP transition counts once, after the popularity release (whose
        # popular items and node platforms shape the candidate pairs); a resumed run keeps the checkpoint's
        table: TransitionTable | None
        if first_round == 1:
            table, records.run_info["transitions"] = collect_transitions(grid, cfg, catalogue, records,
                                                                         strategy.append_ledger, num_nodes, collected)
        else:
            table = model_table(resumed_model)
        if table is not None:
            set_model_table(model, table)
            strategy.transitions = table_record(table)
    if first_round == 1:
        checkpoint(0, initial)
    if cfg.secure_aggregation:
        log(INFO, "fedshift: secure aggregation on: the server receives masked updates and learns only their "
            "weighted sum (threshold setting %g)", cfg.secagg_threshold)
    if first_round == 1:
        strategy.evaluate_initial(grid, initial, timeout=3600)
    if first_round <= cfg.num_server_rounds:
        strategy.start(grid=grid, initial_arrays=initial, num_rounds=cfg.num_server_rounds - first_round + 1)
    records.run_info["refusals"] = strategy.refusals
    if strategy.ended_early is not None:
        refused = any(r["status"] == "refused" for r in strategy.refusals)
        records.run_info["ended-early"] = {"before-round": strategy.ended_early,
                                           "reason": "silos-refused" if refused else "all-budgets-exhausted"}
        log(INFO, "fedshift: no silo may train (budgets exhausted or refused by their policies); run ended before "
            "round %d", strategy.ended_early)
    records.run_info["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    records.run_info["wall-seconds"] = round(time.time() - started, 1)
    records.write()
    log(INFO, "fedshift: run finished in %.0f s; metrics in %s", time.time() - started, out / "metrics.json")

