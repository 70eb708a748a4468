"""A self-contained HTML report (tables + figures) of eval/sweep.py results, plus the figures as PNGs.

    python eval/report.py --config configs/eval/report_quickstart.yaml [--key value ...]

Reads every `<sweep_dir>/<eval set>/<simulator>/results.json` and writes `<output_dir>/report.html` (figures
embedded as base64 PNG: one file to share) and `<output_dir>/figures/*.png`. The figures (latentsim.figures)
follow the seed's: recall/precision per simulator with 25-75 % ranges (Fig. 2/6), the threshold sweep with the
expected number of latents flagged over the whole dictionary (Fig. 5), reliability diagrams before/after
temperature scaling, accuracy vs activation strength and vs interpretation score, decoder alignment vs random
baselines (Fig. 2 right), predicted value vs activation bin (Fig. 4), and metrics across checkpoints; with
eval/patch_kl.py and eval/generate.py results in an eval set's folder, their tables, figures and texts too,
and eval/whole_layer.py's tables from `<sweep_dir>/whole_layer*`. `report.md` holds the headline tables in
markdown.
"""

import base64
import html
from pathlib import Path

from latentsim import figures, whole_layer
from latentsim.cli import run
from latentsim.config import ReportArguments
from latentsim.htmlpage import STYLE, generation_fragment, table_html
from latentsim.io import atomic_write_bytes, atomic_write_text, read_results, write_run_config
from latentsim.metrics import summary_row
from latentsim.sweep import markdown_table, read_sweeps
from latentsim.tables import control_gap_rows, headline_rows, patch_rows, whole_layer_rows

DATACLASSES = (ReportArguments,)


def figure_html(fig, key: str, path: Path) -> str:
    """Write `fig` to `path` as PNG and return a <figure> embedding the same bytes, captioned by `key`."""
    data = figures.png_bytes(fig)
    atomic_write_bytes(path, data)
    return (
        f'<figure><img alt="{key}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'
        f"<figcaption>{key.replace('_', ' ')}</figcaption></figure>"
    )


def eval_set_html(eval_name: str, records: list[dict], rows: list[dict], figures_dir: Path) -> str:
    """The eval set's table (`rows`: a summary row per simulator) and figures: binary formats get seven, value
    formats one."""
    results = records[0]["results"]  # what describes the eval set is the same in every record
    binary = "binary" in results
    if binary:
        drawn = {
            "auc_against_references": figures.auc_against_references(records),
            "recall_precision": figures.recall_precision(records),
            "threshold_sweep": figures.threshold_sweep(records),
            "reliability": figures.reliability(records),
            "accuracy_vs_strength": figures.accuracy_vs_strength(records),
            "accuracy_vs_score": figures.accuracy_vs_score(records),
            "decoder_alignment": figures.decoder_alignment(records),
            "checkpoints": figures.checkpoints(records),
        }
    elif "per_latent" in results:  # latent-major: one table of per-latent numbers
        drawn = {}
    else:
        drawn = {"value_vs_activation": figures.value_vs_activation(records)}
    imgs = [
        figure_html(fig, key, figures_dir / f"{eval_name}_{key}.png")
        for key, fig in drawn.items()
        if fig is not None
    ]
    eval_set = records[0]["eval_set"]
    info = (
        f"prompt format <code>{eval_set['prompt_format']}</code>, split <code>{eval_set['split']}</code>, "
        f"{results['n_contexts']} contexts, {results['n_judgments']} judgments per simulator"
    )
    if binary:
        info += (
            f", judged dictionary {results['width']} explained latents, {results['l0']:.1f} of them active "
            f"per token (L0 from the {eval_set.get('l0_source', 'test')} split); (pool): on the eval pool, "
            "(dict): weighted to the dictionary's base rate"
        )
    over = "contexts" if binary or "per_latent" not in results else "latents (latent-major eval set)"
    return (
        f"<h2>{html.escape(eval_name)}</h2><p>{info}. Values are medians over {over} unless marked "
        f"pooled.</p>{table_html(rows)}{''.join(imgs)}"
    )


def patch_html(eval_name: str, patch: dict, figures_dir: Path) -> str:
    imgs = [
        figure_html(fig, key, figures_dir / f"{eval_name}_{key}.png")
        for key, fig in (
            ("patch_sources", figures.patch_sources(patch)),
            ("patch_fractions", figures.patch_fractions(patch)),
        )
    ]
    return (
        f"<h3>{html.escape(eval_name)}: latents patched into the subject model</h3><p>"
        f"{patch['n_contexts']} contexts, hookpoint <code>{patch['hookpoint']}</code>, "
        f"{html.escape(patch['kl_direction'])}; CE of the true next token. Simulators replace the "
        "latents they scored (false positives included); latents they never scored keep their "
        f"SAE values (<code>no_simulator</code>: all scored latents off).</p>"
        f"{table_html(patch_rows(patch))}{''.join(imgs)}"
    )


def page_html(title: str, sweep_dir: Path, provenance: dict, sections: list[str]) -> str:
    """The whole page; on load it counts the images that rendered and the tables (tests read both)."""
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{STYLE}</style></head><body>
<h1>{html.escape(title)}</h1>
<p>From <code>{html.escape(str(sweep_dir))}</code>; git {html.escape(str(provenance.get("git_sha")))}, created
{html.escape(provenance.get("created", ""))}. Expected-flagged counts extrapolate each context's scored \
candidates to the
whole dictionary (see latentsim/metrics.py).</p>
{"".join(sections)}
<script>window.addEventListener("load",()=>{{\
const ok=[...document.images].filter(i=>i.complete&&i.naturalWidth>0);
document.body.dataset.imagesRendered=ok.length;document.body.dataset.tables=document.querySelectorAll("table").length;}});
</script></body></html>"""


def main(args: ReportArguments) -> Path:
    sweep_dir = Path(args.sweep_dir)
    out = Path(args.output_dir or sweep_dir / "report")
    sweeps = read_sweeps(sweep_dir)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    write_run_config(out, "eval_report", {"report": args}, None)
    sections, markdown = [], [f"# {args.title}\n"]
    for eval_name, records in sweeps.items():
        rows = [
            summary_row(r["name"], r["simulator"]["kind"], r["simulator"]["step"], r["results"])
            for r in records
        ]
        sections.append(eval_set_html(eval_name, records, rows, out / "figures"))
        res = records[0]["results"]
        latent_major = "per_latent" in res and "n_latents" in res and "value" not in res
        unit = "latents" if latent_major else "contexts"
        markdown.append(
            f"## {eval_name} ({res[f'n_{unit}']} held-out {unit})\n\n" + markdown_table(headline_rows(rows))
        )
        if gaps := control_gap_rows(records):  # controls shown other latents' texts or none: their gap
            title = f"{eval_name}: how much the simulators read the interpretation (real - control)"
            sections.append(f"<h3>{html.escape(title)}</h3>{table_html(gaps)}")
            markdown.append(f"### {title}\n\n" + markdown_table(gaps))
        if (patch := read_results(sweep_dir / eval_name / "patch_kl")) is not None:
            sections.append(patch_html(eval_name, patch, out / "figures"))
        if (generation := read_results(sweep_dir / eval_name / "generate")) is not None:
            sections.append(
                f"<h3>{html.escape(eval_name)}: generating with the layer rewritten</h3>"
                f"{generation_fragment(generation)}"
            )
    for folder in sorted(sweep_dir.glob("whole_layer*")):  # the end-to-end numbers: every latent judged
        if (whole := read_results(folder)) is None:
            continue
        head, notes = whole_layer.headline(whole), "\n".join(whole_layer.summary_lines(whole))
        name = f"The whole layer, rebuilt from the simulator's verdicts ({folder.name}: {whole['simulator']})"
        rows = whole_layer_rows(whole)
        sections.append(f"<h2>{html.escape(name)}</h2><p>{html.escape(head)}</p>{table_html(rows)}")
        sections.append(f"<pre>{html.escape(notes)}</pre>")
        markdown.append(f"## {name}\n\n{head}\n\n{markdown_table(rows)}\n\n```\n{notes}\n```")
    provenance = list(sweeps.values())[-1][0]["provenance"]  # the last eval set's first simulator's, as ever
    atomic_write_text(out / "report.html", page_html(args.title, sweep_dir, provenance, sections))
    atomic_write_text(out / "report.md", "\n".join(markdown))
    print(f"[report] {out / 'report.html'} ({len(sweeps)} eval sets; figures/ and report.md beside it)")
    return out / "report.html"


if __name__ == "__main__":
    run(main, DATACLASSES)
