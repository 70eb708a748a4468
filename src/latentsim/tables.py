"""Eval results as tables: rows (dicts) for the HTML report (latentsim.htmlpage.table_html) and fixed-width
text lines for the terminal (eval/summary.py)."""

from __future__ import annotations

import functools
from dataclasses import dataclass


@dataclass(frozen=True)
class MetricColumn:
    """One column of the sweep's tables: a summary.json key (latentsim.metrics.summary_row), its header, and
    where it is shown. summary.md and the report's full table show every column that some row has."""

    key: str
    header: str
    terminal: bool = False  # the terminal table (eval/summary.py), report.md and the README's tables
    progress: bool = False  # printed by eval/sweep.py as each simulator finishes


# The one table of sweep metrics, in print order. "(pool)": computed on the eval pool (~25% positive);
# "(dict)": weighted to the judged dictionary's base rate.
METRIC_COLUMNS = (
    MetricColumn("auc", "AUC [95% CI]", terminal=True, progress=True),
    MetricColumn("per_latent_auc", "per-latent AUC [95% CI]", terminal=True, progress=True),
    MetricColumn("lift_auc", "AUC - prior [95% CI]", terminal=True),
    MetricColumn("lift_psm_auc", "AUC - (prior+sm) [95% CI]", terminal=True),
    MetricColumn("lift_lexical_pooled_auc", "pooled AUC - lexical [95% CI]", terminal=True),
    MetricColumn("lift_lexical_auc", "AUC - lexical [95% CI]"),
    MetricColumn("control_gap_auc", "real - control pooled AUC [95% CI]", terminal=True),
    MetricColumn("recall", "recall", terminal=True, progress=True),
    MetricColumn("precision", "precision (pool)", terminal=True, progress=True),
    MetricColumn("f1", "F1 (pool)", progress=True),
    MetricColumn("precision_dictionary", "precision (dict) [95% CI]", terminal=True),
    MetricColumn("precision_at_l0", "prec@L0 (dict)", terminal=True),
    MetricColumn("precision_top_active", "prec@|A| (pool)"),
    MetricColumn("ece", "ECE (pool)", terminal=True, progress=True),
    MetricColumn("ece_dictionary", "ECE (dict)", terminal=True),
    MetricColumn("ece_temperature_scaled", "ECE (pool, T)"),
    MetricColumn("expected_flagged_at_0.5", "E[flagged]@0.5"),
    MetricColumn("l0_matched_active_accuracy", "recall@L0-thr"),
    MetricColumn("alignment", "align"),
    MetricColumn("alignment_random_pool", "align (rand)"),
    MetricColumn("pearson_mean_vs_quantile_bin", "r(mean, decile)", terminal=True, progress=True),
    MetricColumn("spearman_mean_vs_quantile_bin", "rho(mean, decile)", terminal=True),
    MetricColumn("mode_accuracy_quantile_bin", "mode acc", terminal=True),
)
PATCH_CHECKS = (
    "sae",
    "sae_plus_error",
    "no_latents",
    "skip_layer_update",
    "mean_layer_update",
    "no_simulator",
)


def sweep_lines(rows: list[dict]) -> list[str]:
    """An eval sweep's table (summary.json rows) as fixed-width lines: the headline_rows, each column as wide
    as its header or widest cell, plus 2."""
    table = headline_rows(rows)
    headers = [h for h in table[0] if h != "simulator"] if table else []
    width = {h: 2 + max([len(h)] + [len(r[h]) for r in table]) for h in headers}
    name = max([44] + [len(r["simulator"]) + 1 for r in table])
    return [f"{'simulator':<{name}}" + "".join(f"{h:>{width[h]}}" for h in headers)] + [
        f"{r['simulator']:<{name}}" + "".join(f"{r[h]:>{width[h]}}" for h in headers) for r in table
    ]


def sweep_cell(row: dict, column: str) -> str:
    """A number to 3 decimals; with its bootstrap 95% CI where the row has one (`<column>_ci_low/high`)."""
    return value_with_ci(row.get(column), row.get(f"{column}_ci_low"), row.get(f"{column}_ci_high"))


def value_with_ci(value, low=None, high=None) -> str:
    """`value` to 3 decimals with its 95% CI [low, high] to 2 where both are numbers; `-` for nan (undefined,
    e.g. the precision of a simulator that flags nothing), empty when there is no number."""
    if not isinstance(value, float):
        return ""
    if value != value:
        return "-"
    return (
        f"{value:.3f} [{low:.2f}, {high:.2f}]"
        if isinstance(low, float) and isinstance(high, float)
        else f"{value:.3f}"
    )


def control_gap_rows(records: list[dict]) -> list[dict]:
    """How much simulators read their interpretation: per control a sweep scored (its results.json
    `control_gap`, latentsim.sweep.add_lifts), the real simulator's pooled AUC, the control's, and the gap
    real - control with its paired bootstrap 95% CI over contexts (latents, on a latent-major set), the median
    per-context (per-latent) gap beside it."""
    rows = []
    for record in records:
        if (gap := record["results"].get("control_gap")) is None:
            continue
        pooled, per = gap["pooled_auc"], gap["per_context_auc"]
        rows.append(
            {
                "simulator": gap["real"],
                "control": gap["control"],
                "pooled AUC": value_with_ci(pooled["test"]),
                "pooled AUC (control)": value_with_ci(pooled["reference"]),
                "gap (pooled) [95% CI]": value_with_ci(pooled["difference"], *pooled["ci95"]),
                f"median gap per {'latent' if gap['by'] == 'latent' else 'context'} [95% CI]": value_with_ci(
                    per["median"], *per["ci95"]
                ),
            }
        )
    return rows


def patch_cell(patch: dict, source: str, key: str = "kl_judged") -> str:
    """A patched source's median `key` (eval/patch_kl.py results), or `-` where it has none."""
    s = patch["sources"].get(source, {}).get(key)
    return f"{s['median']:.3f}" if s and s["n"] else "-"


def patch_lines(patch: dict) -> list[str]:
    """The patched-KL table: ceiling, checks, ablations, fraction curves, simulators (judged position)."""
    cell = functools.partial(patch_cell, patch)
    lines = [f"{'source':<44}{'KL judged':>12}{'CE judged':>12}{'KL all pos':>12}{'CE all pos':>12}"]
    lines += [
        f"{name:<44}{cell(name):>12}{cell(name, 'ce_judged'):>12}{cell(name, 'kl_all'):>12}"
        f"{cell(name, 'ce_all'):>12}"
        for name in PATCH_CHECKS
        if name in patch["sources"]
    ]
    fractions = patch["fractions"]
    for mode in fractions["modes"]:
        curve = "  ".join(f"f={f:g}: {cell(f'fraction:{mode}:{f:g}')}" for f in fractions["values"])
        lines.append(f"fraction ({mode}) KL judged   {curve}")
    simulated = [k for k in patch["sources"] if k.startswith("sim:")]  # sim:<simulator>@<variant>
    sims = sorted({k.split("@")[0][4:] for k in simulated})
    variants = sorted({k.split("@")[1] for k in simulated})
    if sims:
        lines.append(f"{'simulator (KL judged)':<44}" + "".join(f"{v:>24}" for v in variants))
        lines += [
            f"{sim[:43]:<44}" + "".join(f"{cell(f'sim:{sim}@{v}'):>24}" for v in variants) for sim in sims
        ]
    return lines


def patch_rows(patch: dict) -> list[dict]:
    """The report's patch table: a row per source, median and 25-75 % range per metric, latents inserted."""
    rows = []
    for name, s in patch["sources"].items():
        row = {"source": name}
        for key in ("kl_judged", "ce_judged", "kl_all", "ce_all"):
            if key in s and s[key]["n"]:
                row[f"{key} median"], row[f"{key} q25-q75"] = (
                    s[key]["median"],
                    f"{s[key]['q25']:.3f}-{s[key]['q75']:.3f}",
                )
        row.update({f"inserted {k}": v for k, v in s.get("inserted", {}).items()})
        rows.append(row)
    return rows


def headline_rows(rows: list[dict]) -> list[dict]:
    """An eval sweep's rows reduced to the terminal's columns (those some row has), as strings with their CIs:
    the terminal table, report.md and the README."""
    cols = [c for c in METRIC_COLUMNS if c.terminal and any(c.key in r for r in rows)]
    return [{"simulator": r["simulator"], **{c.header: sweep_cell(r, c.key) for c in cols}} for r in rows]


def progress_line(row: dict) -> str:
    """A simulator's summary row as eval/sweep.py prints it when it finishes: its progress columns,
    3 decimals."""
    progress = {c.key for c in METRIC_COLUMNS if c.progress}
    return ", ".join(f"{k} {v:.3f}" for k, v in row.items() if isinstance(v, float) and k in progress)


def interval_cell(stat: dict, key: str, ci_key: str, digits: int) -> str:
    """`mean [low, high]` of a statistic (`key` its value, `ci_key` its interval); `mean [-]` without an
    interval (one text, or older results); `-` when the statistic is absent."""
    if stat.get(key) is None:
        return "-"
    ci = stat.get(ci_key)
    value = f"{stat[key]:.{digits}f}"
    return f"{value} [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]" if ci else f"{value} [-]"


def whole_layer_rows(result: dict) -> list[dict]:
    """eval/whole_layer.py's sources as table rows (strings): KL with its 95% CIs over texts and over blocks
    of positions, CE, and the recovery from `no_latents` and from `mean_update` with their CIs over texts."""
    rows = []
    for name, s in result["sources"].items():
        clean = name == "clean"
        rows.append(
            {
                "source": name,
                "KL [95% CI texts]": interval_cell(s["kl"], "mean", "ci95_texts", 3),
                "KL [95% CI blocks]": interval_cell(s["kl"], "mean", "ci95", 3),
                "CE": f"{s['ce']['mean']:.3f}",
                "recovery [95% CI texts]": ""
                if clean
                else interval_cell(s, "recovery", "recovery_ci95_texts", 2),
                "from mean_update": ""
                if clean
                else interval_cell(s, "recovery_from_mean_update", "recovery_from_mean_update_ci95_texts", 2),
            }
        )
    return rows
