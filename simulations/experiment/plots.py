"""The experiment's plots, drawn from the results document: each metric against ε (federated
DP with its intervals, the other methods as reference lines) and each federated run's
validation curves per round."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

#: The plot files, in the order :func:`plots` draws them.
PLOTS = ("ndcg-vs-epsilon.png", "migrating-accuracy-vs-epsilon.png", "new-interest-vs-epsilon.png",
         "metric-vs-round.png", "learning-curve.png")


def plots(doc: Mapping[str, Any]) -> dict[str, bytes]:
    """File name → PNG bytes for each of :data:`PLOTS`."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    def png(fig: Any) -> bytes:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=120, bbox_inches="tight", metadata={"Software": None})
        plt.close(fig)
        return buf.getvalue()

    out: dict[str, bytes] = {}
    methods = doc["methods"]
    for fname, metric, label in (("ndcg-vs-epsilon.png", "ndcg10", "NDCG@10"),
                                 ("migrating-accuracy-vs-epsilon.png", "category-acc1-migrating",
                                  "next-category accuracy@1, migrating users"),
                                 ("new-interest-vs-epsilon.png", "new-interest-acc1-migrating",
                                  "new-interest accuracy@1, migrating users")):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        dp = sorted(((e["epsilon"], e["groups"]["overall"]["metrics"].get(metric)) for e in methods.values()
                     if e["family"] == "federated-dp" and "overall" in e["groups"]), key=lambda t: t[0])
        dp = [(x, m) for x, m in dp if m and m.get("value") is not None]
        if dp:
            xs = [x for x, _ in dp]
            ys = [m["value"] for _, m in dp]
            err = [[max(m["value"] - (m["ci95"][0] if m["ci95"][0] is not None else m["value"]), 0) for _, m in dp],
                   [max((m["ci95"][1] if m["ci95"][1] is not None else m["value"]) - m["value"], 0) for _, m in dp]]
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label="federated DP", color="C0")
        color = 1
        for name, e in methods.items():
            if "overall" not in e["groups"] or e["family"] == "federated-dp":
                continue
            m = e["groups"]["overall"]["metrics"].get(metric)
            if not m or m.get("value") is None:
                continue
            color += 1
            if e["family"] == "local-only":
                lo, hi = m["ci95"]
                ax.errorbar([e["epsilon"] * 1.08], [m["value"]], color=f"C{color % 10}",  # beside the federated point
                            yerr=[[m["value"] - (lo if lo is not None else m["value"])],
                                  [(hi if hi is not None else m["value"]) - m["value"]]],
                            marker="s", capsize=3, linestyle="none", label=name)
            else:
                ax.axhline(m["value"], linestyle="--" if e["family"] != "baseline" else ":", linewidth=1,
                           label=f"{name} (ε=∞)" if e["family"] != "baseline" else name,
                           color=f"C{color % 10}")
        ax.set_xscale("log")
        ax.set_xlabel("ε per silo (δ = %g)" % next((e["delta"] for e in methods.values() if e["delta"]), 1e-5))
        ax.set_ylabel(f"{label} (overall, {doc['split']})")
        ax.set_title(f"{label} vs ε\n(95 % bootstrap intervals)", fontsize=10)
        ax.legend(fontsize=7, loc="best")
        ax.grid(alpha=0.3)
        out[fname] = png(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, (metric, label) in zip(axes, (("ndcg10", "NDCG@10"), ("category-accuracy", "next-category accuracy"))):
        for key, curves in doc["curves"].items():
            pts = curves.get(metric) or []
            if pts:
                ax.plot([r for r, _ in pts], [v for _, v in pts], marker="o", label=key)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("server round (0 = untrained)")
        ax.set_ylabel(f"{label} (validation, all silos of the run)")
        ax.grid(alpha=0.3)
        ax.set_title(f"{label} vs round")
    axes[0].legend(fontsize=7, loc="best")
    out["metric-vs-round.png"] = png(fig)

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    lc = doc.get("learning-curves") or {}
    for n, (name, pts) in enumerate((lc.get("methods") or {}).items()):
        pts = [p for p in pts if (p.get("ndcg10") or {}).get("value") is not None]
        if not pts:
            continue
        xs, ys = [p["dp-steps"] for p in pts], [p["ndcg10"]["value"] for p in pts]
        lo = [p["ndcg10"]["ci95"][0] if p["ndcg10"]["ci95"][0] is not None else y for p, y in zip(pts, ys)]
        hi = [p["ndcg10"]["ci95"][1] if p["ndcg10"]["ci95"][1] is not None else y for p, y in zip(pts, ys)]
        ax.plot(xs, ys, marker="o", label=name, color=f"C{n % 10}")
        ax.fill_between(xs, lo, hi, alpha=0.15, color=f"C{n % 10}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("cumulative DP-SGD steps per silo (round × local steps; 0 = untrained)")
    ax.set_ylabel("NDCG@10 (validation subset)")
    ax.set_title("Learning curves\n(95 % bootstrap intervals over users)", fontsize=10)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    out["learning-curve.png"] = png(fig)
    return out
