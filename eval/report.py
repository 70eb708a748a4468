"""A self-contained HTML report (tables + figures) of eval/sweep.py results, plus the figures as PNGs.

    python eval/report.py --config configs/eval/report_quickstart.yaml [--key value ...]

Reads every `<sweep_dir>/<eval set>/<simulator>/results.json` and writes `<output_dir>/report.html` (figures
embedded as base64 PNG: one file to share) and `<output_dir>/figures/*.png`. The figures follow the seed's:
recall/precision per simulator with 25-75 % ranges (Fig. 2/6), the threshold sweep with the expected number of
latents flagged over the whole dictionary (Fig. 5), reliability diagrams before/after temperature scaling,
accuracy vs activation strength and vs interpretation score, decoder alignment vs random baselines (Fig. 2
right), predicted value vs activation bin (Fig. 4), and metrics across checkpoints.
"""

import base64
import html
import io
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from latentsim.cli import run  # noqa: E402
from latentsim.config import ReportArguments  # noqa: E402
from latentsim.htmlpage import STYLE, generation_fragment, table_html  # noqa: E402
from latentsim.io import atomic_write_bytes, atomic_write_text, write_run_config  # noqa: E402

DATACLASSES = (ReportArguments,)
BINARY_COLUMNS = ("recall", "precision", "f1", "balanced_accuracy", "auc", "precision_top_active", "precision_at_l0")


def load_sweeps(sweep_dir: Path) -> dict[str, list[dict]]:
    """{eval set: [results.json records, in summary order]}."""
    out = {}
    for summary in sorted(sweep_dir.glob("*/summary.json")):
        order = [r["simulator"] for r in json.loads(summary.read_text())["rows"]]
        records = []
        for name in order:
            path = summary.parent / name / "results.json"
            if path.is_file():
                records.append({"name": name, **json.loads(path.read_text())})
        if records:
            out[summary.parent.name] = records
    if not out:
        raise FileNotFoundError(f"config key `sweep_dir`: no */summary.json under {sweep_dir}; run eval/sweep.py first.")
    return out


def png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def short(name: str) -> str:
    return name.replace("baseline__", "").replace("__", " ")


def fig_recall_precision(records):
    metrics = ("recall", "precision_top_active", "precision", "f1", "auc")
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(records), 3.4))
    width = 0.8 / len(metrics)
    for j, m in enumerate(metrics):
        for i, r in enumerate(records):
            s = r["results"]["binary"]["per_context"][m]
            ax.bar(i + j * width, s["median"], width, color=f"C{j}", label=m if i == 0 else None,
                   yerr=[[max(0.0, s["median"] - s["q25"])], [max(0.0, s["q75"] - s["median"])]], capsize=2)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(records))], [short(r["name"]) for r in records],
                  rotation=20, ha="right", fontsize=7)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("median over contexts (25-75 %)")
    ax.legend(fontsize=7, ncol=3)
    ax.set_title("Active-latent recall and precision per simulator")
    return fig


def fig_threshold_sweep(records, l0):
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for i, r in enumerate(records):
        sweep = r["results"]["threshold_sweep"]
        x = [1 - s["threshold"] for s in sweep]
        a1.plot(x, [s["active_accuracy"]["median"] for s in sweep], "-o", color=f"C{i}", ms=3, label=short(r["name"]))
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


def fig_reliability(records):
    fig, axes = plt.subplots(1, len(records), figsize=(3 * len(records), 3), squeeze=False)
    for ax, r in zip(axes[0], records, strict=True):
        cal = r["results"]["calibration"]
        for key, style in (("raw", "-o"), ("temperature_scaled", "-s")):
            if key in cal:
                b = cal[key]["bins"]
                ax.plot([x["mean_p"] for x in b], [x["positive_rate"] for x in b], style, ms=3,
                        label=f"{key} (ECE {cal[key]['ece']:.3f})")
        ax.plot([0, 1], [0, 1], "k:", lw=0.8)
        ax.set_title(short(r["name"]), fontsize=8)
        ax.set_xlabel("mean P(yes)")
        ax.legend(fontsize=6)
    axes[0][0].set_ylabel("fraction active")
    fig.suptitle("Reliability diagrams (test split; temperature fitted on validation)")
    return fig


def line_figure(series: list[tuple[str, list, list]], xlabel: str, ylabel: str, title: str, ylim=None, diagonal=False):
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


def fig_strength(records):
    series = [(short(r["name"]), [x["quantile_bin"] for x in b], [x["active_accuracy"] for x in b])
              for r in records for b in [r["results"]["accuracy_vs_strength"]["by_quantile_bin"]]]
    return line_figure(series, "activation decile of the latent (0 weakest, 9 strongest)",
                       "active accuracy (P(yes) >= 0.5)", "Accuracy vs activation strength (seed Fig. 6)", (-0.02, 1.02))


def fig_score(records):
    series = [(f"{short(r['name'])} vs {s['score']} ({s['n_latents']} latents)", [b["score"] for b in s["bins"]],
               [b["active_accuracy"] for b in s["bins"]])
              for r in records for s in r["results"]["accuracy_vs_score"] if s["bins"]]
    if not series:
        return None
    return line_figure(series, "interpretation score", "per-latent active accuracy",
                       "Accuracy vs interpretation score (seed Fig. 2)")


def fig_alignment(records):
    records = [r for r in records if "decoder_alignment" in r["results"]]
    if not records:
        return None
    fig, ax = plt.subplots(figsize=(1.6 + 1.2 * len(records), 3.2))
    for j, key in enumerate(("simulator", "random_pool", "random_dictionary")):
        for i, r in enumerate(records):
            s = r["results"]["decoder_alignment"][key]
            ax.bar(i + j * 0.27, s["median"], 0.27, color=f"C{j}", label=key if i == 0 else None,
                   yerr=[[max(0.0, s["median"] - s["q25"])], [max(0.0, s["q75"] - s["median"])]], capsize=2)
    ax.set_xticks([i + 0.27 for i in range(len(records))], [short(r["name"]) for r in records], rotation=20,
                  ha="right", fontsize=7)
    ax.set_ylabel("mean matched decoder cosine")
    ax.legend(fontsize=7)
    ax.set_title("Hungarian decoder alignment (seed Fig. 2 right)")
    return fig


def fig_value(records):
    series = [(f"{short(r['name'])} (r={v['mean_vs_quantile_bin']['pearson']:.2f})",
               [x["predicted"] for x in v["mean_quantile_bin_by_predicted"]],
               [x["mean_label"] for x in v["mean_quantile_bin_by_predicted"]])
              for r in records for v in [r["results"]["value"]]]
    return line_figure(series, "predicted mean digit (rounded)", "mean true quantile bin",
                       "Predicted value vs activation (seed Fig. 4)", diagonal=True)


def fig_checkpoints(records):
    steps = [r for r in records if r["simulator"]["kind"] == "finetuned" and r["simulator"]["step"] is not None]
    if len(steps) < 2:
        return None
    steps.sort(key=lambda r: r["simulator"]["step"])
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for m in ("auc", "f1", "recall", "precision"):
        ax.plot([r["simulator"]["step"] for r in steps], [r["results"]["binary"]["per_context"][m]["median"] for r in steps],
                "-o", ms=3, label=m)
    ax.set_xlabel("training step")
    ax.set_ylabel("median over contexts")
    ax.legend(fontsize=7)
    ax.set_title("Metrics across checkpoints")
    return fig


def fig_patch_sources(patch):
    sources = {k: v for k, v in patch["sources"].items() if not k.startswith("fraction:") and k != "clean"}
    fig, ax = plt.subplots(figsize=(7, 0.3 * len(sources) + 1.5))
    names = list(sources)
    med = [sources[n]["kl_judged"]["median"] for n in names]
    lo = [max(0.0, m - sources[n]["kl_judged"]["q25"]) for m, n in zip(med, names, strict=True)]
    hi = [max(0.0, sources[n]["kl_judged"]["q75"] - m) for m, n in zip(med, names, strict=True)]
    colors = ["C3" if n.startswith("sim:") else "C7" if n == "no_simulator" else "C0" for n in names]
    ax.barh(range(len(names)), med, xerr=[lo, hi], color=colors, capsize=2)
    ax.set_yticks(range(len(names)), [n.replace("sim:", "").replace("baseline__", "") for n in names], fontsize=6)
    ax.invert_yaxis()
    ax.set_xlabel("KL(p_clean || p_patched) at the judged position, nats (median, 25-75 %)")
    ax.set_title("Patched latents: SAE, ablations and simulators (seed Fig. 3)")
    return fig


def fig_patch_fractions(patch):
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
            ax.axhline(patch["sources"]["clean"][key]["median"], color="g", ls="--", lw=0.8, label="clean model")
        ax.set_xlabel("fraction of active latents kept")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=6)
    fig.suptitle("Keeping a fraction of the true latents (seed Fig. 1)")
    return fig


def patch_rows(patch) -> list[dict]:
    rows = []
    for name, s in patch["sources"].items():
        row = {"source": name}
        for key in ("kl_judged", "ce_judged", "kl_all", "ce_all"):
            if key in s and s[key]["n"]:
                row[f"{key} median"], row[f"{key} q25-q75"] = s[key]["median"], f"{s[key]['q25']:.3f}-{s[key]['q75']:.3f}"
        row.update({f"inserted {k}": v for k, v in s.get("inserted", {}).items()})
        rows.append(row)
    return rows


def main(args: ReportArguments) -> Path:
    from latentsim.metrics import summary_row

    sweep_dir = Path(args.sweep_dir)
    out = Path(args.output_dir or sweep_dir / "report")
    sweeps = load_sweeps(sweep_dir)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    write_run_config(out, "eval_report", {"report": args}, None)
    sections = []
    for eval_name, records in sweeps.items():
        binary = "binary" in records[0]["results"]
        rows = [summary_row(r["name"], r["simulator"]["kind"], r["simulator"]["step"], r["results"]) for r in records]
        if binary:
            l0 = records[0]["results"]["l0"]
            figures = {"recall_precision": fig_recall_precision(records), "threshold_sweep": fig_threshold_sweep(records, l0),
                       "reliability": fig_reliability(records), "accuracy_vs_strength": fig_strength(records),
                       "accuracy_vs_score": fig_score(records), "decoder_alignment": fig_alignment(records),
                       "checkpoints": fig_checkpoints(records)}
        else:
            figures = {"value_vs_activation": fig_value(records)}
        imgs = []
        for key, fig in figures.items():
            if fig is None:
                continue
            data = png(fig)
            atomic_write_bytes(out / "figures" / f"{eval_name}_{key}.png", data)
            imgs.append(f'<figure><img alt="{key}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'
                        f"<figcaption>{key.replace('_', ' ')}</figcaption></figure>")
        first = records[0]
        info = (f"prompt format <code>{first['eval_set']['prompt_format']}</code>, split "
                f"<code>{first['eval_set']['split']}</code>, {first['results']['n_contexts']} contexts, "
                f"{first['results']['n_judgments']} judgments per simulator")
        if binary:
            info += f", dictionary width {first['results']['width']}, SAE L0 {first['results']['l0']:.1f}"
        sections.append(f"<h2>{html.escape(eval_name)}</h2><p>{info}. Values are medians over contexts unless "
                        f"marked pooled.</p>{table_html(rows)}{''.join(imgs)}")
        patch_path = sweep_dir / eval_name / "patch_kl" / "results.json"
        if patch_path.is_file():
            patch = json.loads(patch_path.read_text())
            imgs = []
            for key, fig in (("patch_sources", fig_patch_sources(patch)), ("patch_fractions", fig_patch_fractions(patch))):
                data = png(fig)
                atomic_write_bytes(out / "figures" / f"{eval_name}_{key}.png", data)
                imgs.append(f'<figure><img alt="{key}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'
                            f"<figcaption>{key.replace('_', ' ')}</figcaption></figure>")
            sections.append(f"<h3>{html.escape(eval_name)}: latents patched into the subject model</h3><p>"
                            f"{patch['n_contexts']} contexts, hookpoint <code>{patch['hookpoint']}</code>, "
                            f"{html.escape(patch['kl_direction'])}; CE of the true next token. Simulators replace the "
                            "latents they scored (false positives included); latents they never scored keep their "
                            f"SAE values (<code>no_simulator</code>: all scored latents off).</p>"
                            f"{table_html(patch_rows(patch))}{''.join(imgs)}")
        generation_path = sweep_dir / eval_name / "generate" / "results.json"
        if generation_path.is_file():
            sections.append(f"<h3>{html.escape(eval_name)}: generating with the layer rewritten</h3>"
                            f"{generation_fragment(json.loads(generation_path.read_text()))}")
    prov = records[0]["provenance"]
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(args.title)}</title>
<style>{STYLE}</style></head><body>
<h1>{html.escape(args.title)}</h1>
<p>From <code>{html.escape(str(sweep_dir))}</code>; git {html.escape(str(prov.get('git_sha')))}, created
{html.escape(prov.get('created', ''))}. Expected-flagged counts extrapolate each context's scored candidates to the
whole dictionary (see latentsim/metrics.py).</p>
{''.join(sections)}
<script>window.addEventListener("load",()=>{{const ok=[...document.images].filter(i=>i.complete&&i.naturalWidth>0);
document.body.dataset.imagesRendered=ok.length;document.body.dataset.tables=document.querySelectorAll("table").length;}});
</script></body></html>"""
    atomic_write_text(out / "report.html", page)
    print(f"[report] {out / 'report.html'} ({len(sweeps)} eval sets, figures in {out / 'figures'})")
    return out / "report.html"


if __name__ == "__main__":
    run(main, DATACLASSES)
