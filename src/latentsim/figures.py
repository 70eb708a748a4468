"""The report's figures (eval/report.py), following the seed paper's: each takes results records in and
returns a matplotlib Figure (None where the records hold nothing to draw); eval/report.py saves and embeds
them.

Records are eval/sweep.py's results.json dicts plus `name` (latentsim.sweep.read_sweeps); the patch figures
take eval/patch_kl.py's results.json.
"""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")  # files only, never a window: before pyplot is imported
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


def png_bytes(fig: Figure) -> bytes:
    """The figure as PNG; closes it (pyplot keeps every open figure alive)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def short(name: str) -> str:
    return name.replace("baseline__", "").replace("__", " ")


def recall_precision(records: list[dict]) -> Figure:
    """Bars of the median per-context recall/precision/F1/AUC per simulator, 25-75 % error bars (Fig. 2/6)."""
    metrics = ("recall", "precision_top_active", "precision", "f1", "auc")
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(records), 3.4))
    width = 0.8 / len(metrics)
    for j, m in enumerate(metrics):
        for i, r in enumerate(records):
            s = r["results"]["binary"]["per_context"][m]
            label = m if m in ("recall", "auc") else f"{m} (pool)"  # pool: ~25% positive, not the dictionary
            ax.bar(
                i + j * width,
                s["median"],
                width,
                color=f"C{j}",
                label=label if i == 0 else None,
                yerr=[[max(0.0, s["median"] - s["q25"])], [max(0.0, s["q75"] - s["median"])]],
                capsize=2,
            )
    ax.set_xticks(
        [i + 0.4 - width / 2 for i in range(len(records))],
        [short(r["name"]) for r in records],
        rotation=20,
        ha="right",
        fontsize=7,
    )
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("median over contexts (25-75 %)")
    ax.legend(fontsize=7, ncol=3)
    ax.set_title("Active-latent recall and precision per simulator")
    return fig


def auc_against_references(records: list[dict]) -> Figure | None:
    """Per-context AUC (median) of every simulator with its 95% bootstrap CI over contexts; the baselines that
    read nothing (kind `reference`) in grey, the firing-rate prior as a line: what a simulator must beat."""
    with_ci = [r for r in records if "ci95" in r["results"]["binary"]["per_context"]["auc"]]
    if not with_ci:
        return None
    fig, ax = plt.subplots(figsize=(1.6 + 0.8 * len(with_ci), 3.4))
    for i, r in enumerate(with_ci):
        s = r["results"]["binary"]["per_context"]["auc"]
        low, high = s["ci95"]
        ax.bar(
            i,
            s["median"],
            0.7,
            color="C7" if r["simulator"]["kind"] == "reference" else "C0",
            yerr=[[max(0.0, s["median"] - low)], [max(0.0, high - s["median"])]],
            capsize=3,
        )
        if r["simulator"]["kind"] == "reference" and r["simulator"]["base_model"] == "prior":
            ax.axhline(s["median"], color="C3", ls="--", lw=0.8, label=f"firing-rate prior {s['median']:.2f}")
    ax.axhline(0.5, color="k", ls=":", lw=0.8, label="chance")
    ax.set_xticks(
        range(len(with_ci)), [short(r["name"]) for r in with_ci], rotation=20, ha="right", fontsize=7
    )
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("per-context AUC (median, 95% CI)")
    ax.legend(fontsize=7)
    ax.set_title("Simulators against baselines that read nothing (grey)")
    return fig


def threshold_sweep(records: list[dict]) -> Figure:
    """Accuracy and expected latents flagged (whole dictionary) against 1 - threshold, with the SAE's L0
    (Fig. 5)."""
    l0 = records[0]["results"]["l0"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for i, r in enumerate(records):
        sweep = r["results"]["threshold_sweep"]
        x = [1 - s["threshold"] for s in sweep]
        a1.plot(
            x,
            [s["active_accuracy"]["median"] for s in sweep],
            "-o",
            color=f"C{i}",
            ms=3,
            label=short(r["name"]),
        )
        a1.plot(x, [s["inactive_accuracy"]["median"] for s in sweep], "--", color=f"C{i}")
        a2.plot(x, [s["expected_flagged"]["median"] for s in sweep], "-o", color=f"C{i}", ms=3)
    a2.axhline(l0, color="k", lw=0.8, ls=":", label=f"SAE L0 = {l0:.1f}")
    for ax in (a1, a2):
        ax.set_xscale("log")
        ax.set_xlabel("1 - threshold")
    a1.set_ylabel("accuracy (solid: active, dashed: inactive)")
    a2.set_ylabel("expected latents flagged (whole dictionary)")
    a2.set_yscale("log")
    a1.legend(fontsize=6)
    a2.legend(fontsize=7)
    fig.suptitle("Threshold sweep (seed Fig. 5, corrected denominators)")
    return fig


def reliability(records: list[dict]) -> Figure:
    """One reliability diagram per simulator: on the pool, after temperature scaling, and weighted to the
    dictionary's base rate."""
    fig, axes = plt.subplots(1, len(records), figsize=(3 * len(records), 3), squeeze=False)
    for ax, r in zip(axes[0], records, strict=True):
        cal = r["results"]["calibration"]
        for key, style, name in (
            ("raw", "-o", "pool"),
            ("temperature_scaled", "-s", "pool, T"),
            ("dictionary", "-^", "dictionary"),
        ):
            if key in cal:
                b = cal[key]["bins"]
                ax.plot(
                    [x["mean_p"] for x in b],
                    [x["positive_rate"] for x in b],
                    style,
                    ms=3,
                    label=f"{name} (ECE {cal[key]['ece']:.3f})",
                )
        ax.plot([0, 1], [0, 1], "k:", lw=0.8)
        ax.set_title(short(r["name"]), fontsize=8)
        ax.set_xlabel("mean P(yes)")
        ax.legend(fontsize=6)
    axes[0][0].set_ylabel("fraction active")
    fig.suptitle("Reliability diagrams (test split; temperature fitted on validation)")
    return fig


def line_figure(
    series: list[tuple[str, list, list]], xlabel: str, ylabel: str, title: str, ylim=None, diagonal=False
) -> Figure:
    """One line per (label, xs, ys)."""
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for i, (label, xs, ys) in enumerate(series):
        ax.plot(xs, ys, "-o", ms=3, color=f"C{i}", label=label)
    if diagonal:
        ax.plot([0, 9], [0, 9], "k:", lw=0.8)
    if ylim:
        ax.set_ylim(*ylim)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=6)
    ax.set_title(title)
    return fig


def accuracy_vs_strength(records: list[dict]) -> Figure:
    series = [
        (short(r["name"]), [x["quantile_bin"] for x in b], [x["active_accuracy"] for x in b])
        for r in records
        for b in [r["results"]["accuracy_vs_strength"]["by_quantile_bin"]]
    ]
    return line_figure(
        series,
        "activation decile of the latent (0 weakest, 9 strongest)",
        "active accuracy (P(yes) >= 0.5)",
        "Accuracy vs activation strength (seed Fig. 6)",
        (-0.02, 1.02),
    )


def accuracy_vs_score(records: list[dict]) -> Figure | None:
    series = [
        (
            f"{short(r['name'])} vs {s['score']} ({s['n_latents']} latents)",
            [b["score"] for b in s["bins"]],
            [b["active_accuracy"] for b in s["bins"]],
        )
        for r in records
        for s in r["results"]["accuracy_vs_score"]
        if s["bins"]
    ]
    if not series:
        return None
    return line_figure(
        series,
        "interpretation score",
        "per-latent active accuracy",
        "Accuracy vs interpretation score (seed Fig. 2)",
    )


def decoder_alignment(records: list[dict]) -> Figure | None:
    """Matched decoder cosine of each simulator against random pools and the random dictionary (Fig. 2
    right)."""
    records = [r for r in records if "decoder_alignment" in r["results"]]
    if not records:
        return None
    fig, ax = plt.subplots(figsize=(1.6 + 1.2 * len(records), 3.2))
    for j, key in enumerate(("simulator", "random_pool", "random_dictionary")):
        for i, r in enumerate(records):
            s = r["results"]["decoder_alignment"][key]
            ax.bar(
                i + j * 0.27,
                s["median"],
                0.27,
                color=f"C{j}",
                label=key if i == 0 else None,
                yerr=[[max(0.0, s["median"] - s["q25"])], [max(0.0, s["q75"] - s["median"])]],
                capsize=2,
            )
    ax.set_xticks(
        [i + 0.27 for i in range(len(records))],
        [short(r["name"]) for r in records],
        rotation=20,
        ha="right",
        fontsize=7,
    )
    ax.set_ylabel("mean matched decoder cosine")
    ax.legend(fontsize=7)
    ax.set_title("Hungarian decoder alignment (seed Fig. 2 right)")
    return fig


def value_vs_activation(records: list[dict]) -> Figure:
    """Value-format eval sets: the mean true quantile bin per predicted digit (Fig. 4)."""
    series = [
        (
            f"{short(r['name'])} (r={v['mean_vs_quantile_bin']['pearson']:.2f})",
            [x["predicted"] for x in v["mean_quantile_bin_by_predicted"]],
            [x["mean_label"] for x in v["mean_quantile_bin_by_predicted"]],
        )
        for r in records
        for v in [r["results"]["value"]]
    ]
    return line_figure(
        series,
        "predicted mean digit (rounded)",
        "mean true quantile bin",
        "Predicted value vs activation (seed Fig. 4)",
        diagonal=True,
    )


def checkpoints(records: list[dict]) -> Figure | None:
    """Median metrics of a finetuned run's checkpoints by training step; None below two checkpoints."""
    steps = [
        r for r in records if r["simulator"]["kind"] == "finetuned" and r["simulator"]["step"] is not None
    ]
    if len(steps) < 2:
        return None
    steps.sort(key=lambda r: r["simulator"]["step"])
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for m in ("auc", "f1", "recall", "precision"):
        ax.plot(
            [r["simulator"]["step"] for r in steps],
            [r["results"]["binary"]["per_context"][m]["median"] for r in steps],
            "-o",
            ms=3,
            label=m,
        )
    ax.set_xlabel("training step")
    ax.set_ylabel("median over contexts")
    ax.legend(fontsize=7)
    ax.set_title("Metrics across checkpoints")
    return fig


def patch_sources(patch: dict) -> Figure:
    """KL at the judged position of every patched source but the fraction curves and the clean model
    (Fig. 3)."""
    sources = {k: v for k, v in patch["sources"].items() if not k.startswith("fraction:") and k != "clean"}
    fig, ax = plt.subplots(figsize=(7, 0.3 * len(sources) + 1.5))
    names = list(sources)
    med = [sources[n]["kl_judged"]["median"] for n in names]
    lo = [max(0.0, m - sources[n]["kl_judged"]["q25"]) for m, n in zip(med, names, strict=True)]
    hi = [max(0.0, sources[n]["kl_judged"]["q75"] - m) for m, n in zip(med, names, strict=True)]
    colors = ["C3" if n.startswith("sim:") else "C7" if n.startswith("no_simulator") else "C0" for n in names]
    ax.barh(range(len(names)), med, xerr=[lo, hi], color=colors, capsize=2)
    ax.set_yticks(
        range(len(names)), [n.replace("sim:", "").replace("baseline__", "") for n in names], fontsize=6
    )
    ax.invert_yaxis()
    ax.set_xlabel("KL(p_clean || p_patched) at the judged position, nats (median, 25-75 %)")
    ax.set_title("Patched latents: SAE, ablations and simulators (seed Fig. 3)")
    return fig


def patch_fractions(patch: dict) -> Figure:
    """KL and CE when keeping a fraction of the true latents, against the full SAE and the clean model
    (Fig. 1)."""
    fr = patch["fractions"]
    scopes = [("kl_judged", "KL, judged position"), ("ce_judged", "CE, judged position")]
    if any("kl_all" in v for v in patch["sources"].values()):
        scopes.append(("kl_all", "KL, all positions"))
    fig, axes = plt.subplots(1, len(scopes), figsize=(4 * len(scopes), 3.2))
    for ax, (key, title) in zip(axes, scopes, strict=True):
        for i, mode in enumerate(fr["modes"]):
            ys = [patch["sources"][f"fraction:{mode}:{f:g}"][key]["median"] for f in fr["values"]]
            ax.plot(fr["values"], ys, "-o", ms=3, color=f"C{i}", label=f"{mode} fraction")
        ax.axhline(patch["sources"]["sae"][key]["median"], color="k", ls=":", lw=0.8, label="full SAE")
        if key.startswith("ce"):
            ax.axhline(
                patch["sources"]["clean"][key]["median"], color="g", ls="--", lw=0.8, label="clean model"
            )
        ax.set_xlabel("fraction of active latents kept")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=6)
    fig.suptitle("Keeping a fraction of the true latents (seed Fig. 1)")
    return fig
