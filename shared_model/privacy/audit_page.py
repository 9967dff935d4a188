"""The audit page for a person: the parts of ``audit.md`` and its plot ``audit-epsilon.png``
that a privacy officer reads without opening the JSON.

:func:`sections` renders, from :func:`shared_model.privacy.audit_report.audit_run`'s result:

* where each silo's ε went, per release kind (DP-SGD rounds, Gaussian metric, popularity and
  transition releases) and each release kind's share of it;
* every number that left a silo outside ε (``plain-release`` records, declared by the silo);
* the worst-case user, on one silo and on several.

:func:`plot` draws two panels: the cumulative ε of each silo over rounds, marked by release
kind; and per silo the ε of DP-SGD and the Gaussian releases' added cost stacked against the
budget, with the canary audit's empirical lower bounds next to the claim when one was run.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from shared_model.io_utils import write_bytes_atomic

KIND_LABELS = {"dp-sgd-round": "DP-SGD round", "metric-release": "metric release (Gaussian)",
               "popularity-release": "popularity release (Gaussian histogram)",
               "transition-release": "transition release (Gaussian pair counts)"}
KIND_MARKERS = {"dp-sgd-round": "o", "metric-release": "x", "popularity-release": "s", "transition-release": "D"}


def sections(result: dict[str, Any]) -> list[str]:
    """Markdown lines of the person-facing sections."""
    lines: list[str] = []
    silos = result.get("silos", {})
    if silos:
        lines += ["", "## Where each silo's ε went, by release kind", "",
                  "| silo | ε spent (δ, accountant) | budget | DP-SGD alone | metric releases alone | "
                  "metric coordinates | metrics' share of ε | popularity release alone | popularity's share of ε | "
                  "transition release alone | transitions' share of ε |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for silo, s in silos.items():
            lines.append(f"| {silo} | {s['epsilon-reported']:.4f} (δ={s['delta']:g}, {s['accountant']}) | "
                         f"{s['epsilon-budget']:g} | {s.get('epsilon-dp-sgd-alone', float('nan')):.4f} | "
                         f"{s.get('epsilon-metric-releases-alone', 0.0):.4f} | {s.get('metric-releases', 0)} | "
                         f"{s.get('metric-share-of-epsilon', 0.0):.1%} | "
                         f"{s.get('epsilon-popularity-release-alone', 0.0):.4f} | "
                         f"{s.get('popularity-share-of-epsilon', 0.0):.1%} | "
                         f"{s.get('epsilon-transition-release-alone', 0.0):.4f} | "
                         f"{s.get('transition-share-of-epsilon', 0.0):.1%} |")
        lines += ["", "ε composes sub-additively, so the kinds' ε do not add up to the total. A kind's share "
                  "is its marginal cost: (ε spent − ε of everything else alone) / ε spent. A metric release "
                  "is one Gaussian mechanism per released sum or count (each user's contribution clipped to [0, 1], "
                  "no sampling); the popularity release is one Gaussian mechanism on the silo's item histogram "
                  "(each user's ≤ c most recent distinct items, L2 sensitivity √c, no sampling); the transition "
                  "release is one Gaussian mechanism on the silo's counts of item-to-item transitions over public "
                  "candidate pairs (each user's ≤ m most recent distinct pairs, L2 sensitivity √m, no sampling). All "
                  "are composed with the DP-SGD rounds in the silo's own accountant and recomputed above by "
                  "dp-accounting (RDP and PLD) as one heterogeneous composition."]
    lines += ["", "## Numbers that left a silo outside ε", ""]
    plain = result.get("outside-epsilon", [])
    if plain:
        lines += ["**These numbers left the silo UNNOISED (release-metrics = plain): no ε covers them.**", "",
                  "| silo | round | phase | numbers sent without noise |", "|---|---|---|---|"]
        lines += [f"| {r['silo']} | {r['round']} | {r['phase']} | {r['names'].replace(',', ', ')} |" for r in plain]
    else:
        lines.append("None recorded: every silo's ledger declares no unnoised release. Besides the model update "
                     "(DP-SGD) and Gaussian metric releases, a silo sends only public numbers: mechanism "
                     "parameters (ε, δ, σ, q, C, steps) and its user counts (the FedAvg weight; the sample rate "
                     "on the ledger reveals it anyway).")
    modes = {silo: p["policy"].get("release-metrics", "?") for silo, p in result.get("policies", {}).items()}
    if modes:
        lines += ["", "Each silo's policy, `release-metrics`: " + ", ".join(f"{k} = **{v}**" for k, v in modes.items())]
    lines += _worst_case(result)
    return lines


def _worst_case(result: dict[str, Any]) -> list[str]:
    silos = result.get("silos", {})
    if not silos:
        return []
    worst = max(silos.items(), key=lambda kv: kv[1]["epsilon-reported"])
    lines = ["", "## The worst-case user", "",
             "Every user of a silo has the same guarantee: DP-SGD samples users by Poisson sampling with one rate q "
             "and clips every user's gradient to the same C, and each metric release bounds every user's "
             "contribution by the same sensitivity, so the silo's ε is each of its users' worst case (no per-user "
             "accounting is kept; it could only be lower for users never sampled).",
             "", f"- Worst silo: **{worst[0]}**, ε = {worst[1]['epsilon-reported']:.4f} "
             f"(δ={worst[1]['delta']:g}, {worst[1]['accountant']})."]
    cross = result.get("cross-silo")
    if cross and not result.get("several-runs"):
        lines.append(f"- A user present on all {cross['silos']} silos (the same person in every silo's data): "
                     f"ε = {cross['epsilon-user-on-every-silo-opacus-rdp']:.4f} (Opacus RDP, every silo's mechanisms "
                     f"composed, δ={cross['delta']:g}).")
    return lines


def plot(run_dir: Path, result: dict[str, Any], out: Path | None = None) -> Path:
    """Write ``audit-epsilon.png`` (into ``out`` or ``run_dir``) and return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    silos = result.get("silos", {})
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5))
    delta, label = None, ""
    for i, (silo, s) in enumerate(silos.items()):
        color = f"C{i % 10}"
        ax.plot(s["rounds"], s["epsilon-by-round"], color=color, label=silo, alpha=0.8)
        for kind, marker in KIND_MARKERS.items():
            pts = [(r, e) for r, e, k in zip(s["rounds"], s["epsilon-by-round"], s.get("kinds", [])) if k == kind]
            if pts:
                ax.scatter(*zip(*pts), marker=marker, color=color, s=40)
        delta, label = s["delta"], s["accountant"]
    for kind, marker in KIND_MARKERS.items():
        ax.scatter([], [], marker=marker, color="gray", label=KIND_LABELS[kind])
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(f"cumulative ε (δ={delta:g}, {label})" if delta else "cumulative ε")
    ax.set_title("ε spent per silo over rounds, by release kind")
    if silos:
        ax.legend(fontsize=8)
    names = list(silos)
    sgd = [silos[n].get("epsilon-dp-sgd-alone", silos[n]["epsilon-reported"]) for n in names]
    extra = [silos[n]["epsilon-reported"] - a for n, a in zip(names, sgd)]
    bx.bar(names, sgd, label="DP-SGD rounds alone", color="C0")
    bx.bar(names, extra, bottom=sgd, label="+ Gaussian releases (metrics, popularity, transitions)", color="C1")
    for j, n in enumerate(names):
        bx.hlines(silos[n]["epsilon-budget"], j - 0.4, j + 0.4, colors="k", linestyles="dashed",
                  label="budget" if j == 0 else None)
    for c in result.get("canaries", []):
        if c.get("silo") in names:
            j = names.index(c["silo"])
            bx.scatter([j + (0.15 if c.get("kind") == "gradient" else -0.15)], [c["epsilon_lower_bound"]],
                       marker="v" if c.get("kind") == "gradient" else "^", color="C3", s=60, zorder=3,
                       label=f"canary lower bound ({c.get('kind', 'input')})")
    bx.set_ylabel("ε")
    bx.set_title("claimed ε per silo (stacked by kind), budget, canary bounds")
    if names:
        handles, labels_ = bx.get_legend_handles_labels()
        uniq = dict(zip(labels_, handles))
        bx.legend(uniq.values(), uniq.keys(), fontsize=8)
        bx.tick_params(axis="x", labelrotation=20)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    path = Path(out or run_dir) / "audit-epsilon.png"
    write_bytes_atomic(path, buf.getvalue())
    return path
