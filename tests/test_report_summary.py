"""eval/summary.py on a synthetic run folder (exact printed lines) and latentsim.figures on synthetic
records."""

import json

from helpers import load_script
from matplotlib.figure import Figure

from latentsim import figures
from latentsim.config import SummaryArguments

KL = "KL(p_clean || p_patched), nats"


def stat(median: float, n: int = 5) -> dict:
    return {"median": median, "q25": median / 2, "q75": median * 2, "n": n}


def patch_results() -> dict:
    """An eval/patch_kl.py results.json: the clean model, two checks, a fraction curve, a simulator's two
    variants."""
    return {
        "n_contexts": 5,
        "hookpoint": "layers.1",
        "kl_direction": KL,
        "fractions": {"modes": ["top"], "values": [0.5, 1.0]},
        "sources": {
            "clean": {"kl_judged": stat(0.0), "ce_judged": stat(2.5), "ce_all": stat(3.25)},
            "sae": {"kl_judged": stat(0.125), "ce_judged": stat(2.75), "kl_all": stat(0.2)},
            "skip_layer_update": {"kl_judged": stat(1.5), "ce_judged": stat(9.0, n=0)},
            "fraction:top:0.5": {"kl_judged": stat(0.8)},
            "fraction:top:1": {"kl_judged": stat(0.1)},
            "sim:run__final@oracle": {"kl_judged": stat(0.4), "inserted": {"false_positives": 1.5}},
            "sim:run__final@median": {"kl_judged": stat(0.6)},
        },
    }


def write_json(path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def test_summary_prints_sweep_patch_and_generation_tables(tmp_path, capsys):
    eval_dir = tmp_path / "eval" / "eval_set"
    write_json(
        eval_dir / "summary.json",
        {
            "prompt_format": "binary",
            "width": 64,
            "l0": 3.25,
            "rows": [
                {
                    "simulator": "run__final",
                    "contexts": 7,
                    "auc": 0.75,
                    "auc_ci_low": 0.5,
                    "auc_ci_high": 0.875,
                    "lift_auc": 0.25,
                    "lift_auc_ci_low": -0.125,
                    "lift_auc_ci_high": 0.5,
                    "recall": 0.5,
                    "precision": float("nan"),
                    "f1": 0.0,
                },  # nan: flags nothing; F1 is not a terminal column
                {"simulator": "baseline__zero", "contexts": 7, "auc": 0.5, "recall": 1},
            ],
        },
    )  # an int is no metric: blank
    write_json(eval_dir / "patch_kl" / "results.json", patch_results())
    write_json(
        eval_dir / "generate" / "results.json",
        {
            "hookpoint": "layers.1",
            "sampling": "greedy",
            "kl_direction": KL,
            "generations": [
                {"source": "sae", "kl": [0.1, 0.3], "recovered": 0.5, "prompt": "the cat", "text": " sat"}
            ],
        },
    )
    load_script("eval/summary.py").main(SummaryArguments(run_dir=str(tmp_path)))
    lines = capsys.readouterr().out.splitlines()
    pad = " " * 6
    assert lines[1:5] == [
        f"EVAL {eval_dir}  (binary, 7 held-out contexts, judged dictionary 64 explained latents, L0 3.2 of "
        "them; per-context medians)",
        pad
        + "simulator".ljust(44)
        + "AUC [95% CI]".rjust(20)
        + "AUC - prior [95% CI]".rjust(22)
        + "recall".rjust(8)
        + "precision (pool)".rjust(18),
        pad
        + "run__final".ljust(44)
        + "0.750 [0.50, 0.88]".rjust(20)
        + "0.250 [-0.12, 0.50]".rjust(22)
        + "0.500".rjust(8)
        + "-".rjust(18),
        pad + "baseline__zero".ljust(44) + "0.500".rjust(20) + " " * 22 + " " * 8 + " " * 18,
    ]  # no CI, no lift
    assert lines[6:13] == [
        f"PATCH {eval_dir / 'patch_kl'}  (5 contexts, layers.1; {KL}, median; CE of the next token; the "
        "clean model's CE: 2.500 judged, 3.250 all)",
        pad
        + "source".ljust(44)
        + "KL judged".rjust(12)
        + "CE judged".rjust(12)
        + "KL all pos".rjust(12)
        + "CE all pos".rjust(12),
        pad + "sae".ljust(44) + "0.125".rjust(12) + "2.750".rjust(12) + "0.200".rjust(12) + "-".rjust(12),
        pad + "skip_layer_update".ljust(44) + "1.500".rjust(12) + "-".rjust(12) * 3,  # n=0: no value
        pad + "fraction (top) KL judged   f=0.5: 0.800  f=1: 0.100",
        pad + "simulator (KL judged)".ljust(44) + "median".rjust(24) + "oracle".rjust(24),
        pad + "run__final".ljust(44) + "0.600".rjust(24) + "0.400".rjust(24),
    ]
    assert lines[14:16] == [
        f"GENERATE {eval_dir / 'generate'}  (layer layers.1 rewritten, greedy; mean {KL} per token; share of "
        "active latents recovered)",
        pad + "sae".ljust(60) + " KL 0.200  rec 0.50  'the cat' -> ' sat'",
    ]
    assert len(lines) == 17 and lines[-1] == ""  # no REPORT line: there is no report.html


def binary_record(name: str, kind: str = "baseline", step=None) -> dict:
    per_context = {m: stat(0.5) for m in ("recall", "precision_top_active", "precision", "f1", "auc")}
    sweep = [
        {
            "threshold": t,
            "active_accuracy": stat(0.9),
            "inactive_accuracy": stat(0.8),
            "expected_flagged": stat(12.0),
        }
        for t in (0.5, 0.9, 0.99)
    ]
    return {
        "name": name,
        "simulator": {"kind": kind, "step": step},
        "results": {"l0": 8.0, "binary": {"per_context": per_context}, "threshold_sweep": sweep},
    }


def test_figures_draw_a_bar_or_line_per_simulator_and_metric():
    records = [binary_record("baseline__zero"), binary_record("run__checkpoint-6", "finetuned", 6)]
    bars = figures.recall_precision(records)
    assert isinstance(bars, Figure) and len(bars.axes[0].patches) == 5 * 2  # five metrics per simulator
    accuracy, flagged = figures.threshold_sweep(records).axes
    assert len(accuracy.lines) == 2 * 2 and len(flagged.lines) == 2 + 1  # + the SAE's L0
    assert [t.get_text() for t in accuracy.get_legend().get_texts()] == ["zero", "run checkpoint-6"]
    assert figures.checkpoints(records) is None  # one checkpoint is no curve
    assert (
        len(figures.checkpoints(records + [binary_record("run__final", "finetuned", 12)]).axes[0].lines) == 4
    )
    assert figures.decoder_alignment(records) is None
    sources = figures.patch_sources(patch_results()).axes[0]
    assert [t.get_text() for t in sources.get_yticklabels()] == [
        "sae",
        "skip_layer_update",
        "run__final@oracle",
        "run__final@median",
    ]
    assert [round(p.get_width(), 3) for p in sources.patches] == [0.125, 1.5, 0.4, 0.6]
    assert len(figures.png_bytes(sources.figure)) > 1000


def test_auc_figure_sets_simulators_against_the_references():
    records = [
        binary_record("run__final", "finetuned", 12),
        binary_record("baseline__prior", "reference"),
        binary_record("baseline__string_match", "reference"),
    ]
    assert figures.auc_against_references(records) is None  # no CI recorded: nothing to draw
    for r, (median, ci) in zip(
        records, ((0.4, [0.25, 0.5]), (0.8, [0.7, 0.9]), (0.6, [0.5, 0.75])), strict=True
    ):
        r["simulator"]["base_model"] = r["name"].removeprefix("baseline__")
        r["results"]["binary"]["per_context"]["auc"] = {**stat(median), "ci95": ci}
    ax = figures.auc_against_references(records).axes[0]
    assert [round(p.get_height(), 3) for p in ax.patches] == [0.4, 0.8, 0.6]
    assert [p.get_facecolor()[:3] == ax.patches[1].get_facecolor()[:3] for p in ax.patches] == [
        False,
        True,
        True,
    ]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["firing-rate prior 0.80", "chance"]
