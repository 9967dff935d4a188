"""A mixed federation in a real Flower simulation: one region silo (one region's users on both
platforms, ``silo.json``) beside two platform silos of the other region. It trains, releases
popularity per platform and transition counts per pair space (the region silo's cross pairs
too), evaluates on each target's platform, and passes the audit, whose worst-case user is
the one present on every silo."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from shared_model.dataset import load_silo, read_catalogue
from shared_model.io_utils import write_bytes_atomic, write_csv

pytestmark = pytest.mark.slow


def region_dataset(src: Path, out: Path, region: str = "r0") -> Path:
    """``src`` (generated, silos ``p0-rR``/``p1-rR``) with region ``region``'s two platform silos
    joined into one region silo: each user's events interleaved (p0 at even orders, p1 at odd),
    both last events moved to one order after the rest, so both are held out."""
    catalogue = read_catalogue(src)
    out.mkdir(parents=True)
    for name in ("items.csv.gz", "items.csv", "dataset.json"):
        if (src / name).exists():
            (out / name).write_bytes((src / name).read_bytes())
    silos = sorted(p.name for p in (src / "silos").iterdir())
    joined = [s for s in silos if s.endswith(f"-{region}")]
    users: dict[str, str] = {}
    events: list[tuple[str, str, int]] = []
    for i, name in enumerate(joined):
        silo = load_silo(src / "silos" / name, catalogue)
        users |= silo.splits
        for u, h in silo.histories.items():
            last = 10**6  # one order for both platforms' last events
            events += [(u, e.item_id, last if n == len(h) - 1 else 2 * e.order + i) for n, e in enumerate(h)]
    write_csv(out / "silos" / region / "users.csv", ("user_id", "split"), sorted(users.items()))
    write_csv(out / "silos" / region / "events.csv", ("user_id", "item_id", "order"), sorted(events))
    write_bytes_atomic(out / "silos" / region / "silo.json", json.dumps({"platforms": ["p0", "p1"]}).encode())
    for name in silos:
        if name not in joined:
            for f in (src / "silos" / name).iterdir():
                (out / "silos" / name).mkdir(parents=True, exist_ok=True)
                (out / "silos" / name / f.name).write_bytes(f.read_bytes())
    return out


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory: pytest.TempPathFactory, tiny_bert: Path, cache_dir: Path) -> Path:
    from simulations.datasets.generator import generate

    src = tmp_path_factory.mktemp("gen") / "ds"
    generate(src, users=160, platforms=2, regions=2, seed=4)
    data = region_dataset(src, tmp_path_factory.mktemp("mixed") / "ds")
    out = tmp_path_factory.mktemp("run-mixed")
    cmd = [sys.executable, "-m", "fedshift.cli", "simulate", "--out", str(out), "--dataset", str(data),
           "--base-model", str(tiny_bert), "--rounds", "2", "--set", "local-steps=3", "--set", "batch-size=16",
           "--set", "max-eval-users=0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    (out / "dataset-path").write_text(str(data))
    return out


def test_a_region_silo_beside_platform_silos_trains_and_releases_per_platform_and_space(mixed_run: Path) -> None:
    doc = json.loads((mixed_run / "metrics.json").read_text())
    silos = {"r0", "p0-r1", "p1-r1"}
    for r in (1, 2):
        round_ = next(x for x in doc["rounds"] if x["round"] == r)
        assert silos <= set(round_["silos"]), round_["silos"].keys()
    # one popularity release per silo; the region silo's is split and summed into both platforms
    popularity = doc["run"]["popularity"]["platforms"]
    assert popularity["p0"]["silos"] == ["p0-r1", "r0"] and popularity["p1"]["silos"] == ["p1-r1", "r0"]
    # the transition release: each platform's pairs from both its silos, the cross pairs from the region silo only
    spaces = doc["run"]["transitions"]["platforms"]
    assert set(spaces) == {"p0", "p1", "p0|p1"}
    assert spaces["p0"]["silos"] == ["p0-r1", "r0"] and spaces["p0|p1"]["silos"] == ["r0"]
    assert spaces["p0|p1"]["candidate-pairs"] > 0
    # the region silo's evaluation ranks each valid user's two targets, each on its own platform
    data = Path((mixed_run / "dataset-path").read_text())
    region = load_silo(data / "silos" / "r0", read_catalogue(data))
    assert region.mixed and region.platforms == ("p0", "p1")
    evaluate = next(x for x in doc["rounds"] if x["round"] == 2)["silos"]
    assert evaluate["r0"]["evaluate"]["eval-users"] == 2 * len(region.users("valid")) > 0


def test_the_mixed_federation_passes_the_audit_with_the_user_on_every_silo_as_worst_case(mixed_run: Path) -> None:
    from shared_model.privacy.audit_report import audit_run

    result = audit_run(mixed_run)
    assert result["passed"], [c for c in result["checks"] if not c["passed"]]
    assert set(result["silos"]) == {"r0", "p0-r1", "p1-r1"}
    region = result["silos"]["r0"]
    assert region["popularity-releases"] == 1 and region["transition-releases"] == 1  # one of each, both platforms
    cross = result["cross-silo"]
    worst = max(s["epsilon-reported"] for s in result["silos"].values())
    assert cross["silos"] == 3 and cross["epsilon-user-on-every-silo-opacus-rdp"] > worst
