"""eval/ arguments: sweeps over simulators, patching, generation, the report; prompting-baseline specs."""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path

from latentsim.config.common import (
    EMBEDDED_PREFIX,
    RunArguments,
    VLLMEngineArguments,
    _fail,
    _require_positive,
    check_dtype_device,
    device_field,
    dtype_field,
)
from latentsim.confirmation import CONFIRMATION_SPLIT, require_confirm

BASELINE_KEYS = ("name", "model", "shots", "score", "interpretations", "tensor_parallel_size", "control")


def reference_names() -> list[str]:
    """The registered reference simulators (read no text with a language model): `model=prior` etc."""
    from latentsim.simulators import REFERENCES

    return sorted(REFERENCES)


def control_names() -> tuple[str, ...]:
    """The controls that read the wrong thing (latentsim.simulators.controls): `control=shuffled`, `empty`."""
    from latentsim.simulators.controls import CONTROLS

    return CONTROLS


def check_control(key: str, spec: str, value: str) -> str:
    if value not in control_names():
        _fail(key, f"{spec!r}: control must be one of {', '.join(control_names())}, not {value!r}.")
    return value


def parse_run_entry(entry: str, key: str) -> tuple[str, str | None]:
    """A `run_dirs` / `hub_runs` entry `<run folder or Hub repo>[,control=shuffled|empty]` -> (the run, its
    control or None). A control scores the run's final adapter only (a Hub repo's `main`)."""
    run, _, options = entry.partition(",")
    control = None
    for part in filter(None, (p.strip() for p in options.split(","))):
        name, sep, value = part.partition("=")
        if not sep or name != "control":
            _fail(key, f"{entry!r}: `{part}` is not `control=<{'|'.join(control_names())}>`.")
        control = check_control(key, entry, value)
    return run.strip(), control


def parse_baseline(spec: str) -> dict:
    """`key=value,key=value` (lm-eval `--model_args` style) -> a prompting-baseline spec with defaults:
    model (default embedded:smollm2-135m; or a registered reference that reads nothing, e.g. prior,
    string_match, prior+string_match), shots (few-shot examples, 0), score (show the eval set's interpretation
    score, false), interpretations (another interpretation set; default the eval set's), tensor_parallel_size
    (vLLM: GPUs for this model's engine, default the sweep's), control (`shuffled` or `empty`: the texts of
    latentsim.simulators.controls instead of the real ones; default none), name."""
    out = {
        "model": "embedded:smollm2-135m",
        "shots": 0,
        "score": False,
        "interpretations": None,
        "tensor_parallel_size": None,
        "control": None,
    }
    for part in filter(None, (p.strip() for p in spec.split(","))):
        key, sep, value = part.partition("=")
        if not sep or key not in BASELINE_KEYS:
            close = difflib.get_close_matches(key, BASELINE_KEYS, n=1)
            _fail(
                "baselines",
                f"{spec!r}: `{part}` is not key=value with a key in {', '.join(BASELINE_KEYS)}"
                + (f" (did you mean `{close[0]}`?)" if close else "")
                + ".",
            )
        if key in ("shots", "tensor_parallel_size"):
            if not value.isdigit() or (key == "tensor_parallel_size" and int(value) < 1):
                _fail(
                    "baselines",
                    f"{spec!r}: {key} must be a {'positive' if key != 'shots' else 'non-negative'} integer.",
                )
            out[key] = int(value)
        elif key == "score":
            if value not in ("true", "false"):
                _fail("baselines", f"{spec!r}: score must be true or false.")
            out[key] = value == "true"
        elif key == "control":
            out[key] = check_control("baselines", spec, value)
        else:
            out[key] = value
    if out["model"] in reference_names() and (out["shots"] or out["score"]):
        _fail(
            "baselines",
            f"{spec!r}: the reference baseline {out['model']} reads no prompt; shots and score do "
            "not apply to it.",
        )
    if not out.get("name") and out["model"] in reference_names():
        out["name"] = out["model"].replace("+", "_") + (
            f"_{Path(out['interpretations']).name}" if out["interpretations"] else ""
        )
    if not out.get("name"):
        model = out["model"].rsplit("/", 1)[-1].removeprefix(EMBEDDED_PREFIX)
        out["name"] = (
            f"{model}_{out['shots']}shot"
            + ("_score" if out["score"] else "")
            + (f"_{Path(out['interpretations']).name}" if out["interpretations"] else "")
        )
    if not re.fullmatch(r"[A-Za-z0-9._-]+", out["name"]):
        _fail("baselines", f"{spec!r}: name {out['name']!r} may only hold letters, digits, `.`, `_`, `-`.")
    return out


@dataclass
class EvalArguments(RunArguments, VLLMEngineArguments):
    """eval/sweep.py: simulators (checkpoints of finetuning runs, Hub branches, prompting baselines) x one
    eval set."""

    eval_set: str = field(
        default="",
        metadata={"help": "A build_dataset folder (test + validation splits) of held-out latents."},
    )
    eval_split: str = field(default="test", metadata={"help": "The split the metrics are reported on."})
    confirm: bool = field(
        default=False,
        metadata={
            "help": "Read the locked `confirmation` split (eval_split: confirmation): once, for the final "
            "recipe; every read is recorded (latentsim.confirmation)."
        },
    )
    calibration_split: str | None = field(
        default="validation",
        metadata={"help": "Split for temperature scaling and the L0-matched threshold (null: none)."},
    )
    max_contexts: int = field(
        default=0, metadata={"help": "Score a seeded sample of this many contexts per split (0: all)."}
    )
    calibration_contexts: int = field(
        default=0,
        metadata={
            "help": "Contexts sampled from calibration_split (0: as "
            "max_contexts): one temperature and one threshold "
            "need fewer than the metrics."
        },
    )
    run_dirs: list[str] = field(
        default_factory=list,
        metadata={
            "help": "train/sft.py output dirs: every complete checkpoint-N and the final adapter are "
            "evaluated; `<dir>,control=shuffled` (or `empty`): its final adapter shown other latents' "
            "interpretations (or none)."
        },
    )
    hub_runs: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Hub adapter repos: `main` and every `step-N` branch (`<repo>,control=...`: main)."
        },
    )
    include_checkpoints: bool = field(
        default=True, metadata={"help": "Evaluate checkpoint-N folders, not only the final adapter."}
    )
    baselines: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Prompting baselines, each `key=value,...` with "
            "keys model, shots, score, interpretations, control, name."
        },
    )
    score_files: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Interpretation scores ({latent: score} JSON, "
            "data_gen/score.py) to plot accuracy against."
        },
    )
    allow_seen_latents: bool = field(
        default=False, metadata={"help": "Score a finetuned simulator on latents it was trained on."}
    )
    backend: str = field(
        default="hf",
        metadata={"help": "`hf` (CPU or GPU), `vllm` (GPU; .venv-vllm, docs/gpu.md) or `fake` (tests)."},
    )
    batch_size: int = field(default=32, metadata={"help": "Suffixes per forward pass (hf)."})
    dtype: str = dtype_field()
    device: str = device_field()
    max_lora_rank: int = field(default=64, metadata={"help": "vLLM: the largest adapter rank allowed."})
    output_dir: str = field(
        default="outputs/eval", metadata={"help": "Writes <output_dir>/<eval set>/<simulator>/."}
    )

    def __post_init__(self):
        check_dtype_device(self)
        if not self.eval_set:
            _fail(
                "eval_set",
                "give a build_dataset output folder (data_gen/build_dataset.py, see "
                "configs/data/eval_*.yaml).",
            )
        if self.backend not in ("hf", "vllm", "fake"):
            _fail("backend", f"{self.backend!r} is not `hf`, `vllm` or `fake`.")
        if not (self.run_dirs or self.hub_runs or self.baselines):
            _fail("run_dirs", "nothing to evaluate: give run_dirs, hub_runs or baselines.")
        self.parsed_runs = [parse_run_entry(r, "run_dirs") for r in self.run_dirs]
        self.parsed_hub_runs = [parse_run_entry(r, "hub_runs") for r in self.hub_runs]
        self.parsed_baselines = [parse_baseline(b) for b in self.baselines]
        names = [(b["name"], b["control"]) for b in self.parsed_baselines]
        if len(set(names)) != len(names):
            _fail("baselines", f"two baselines share a name ({names}); give them distinct `name=`.")
        _require_positive(self, "batch_size", "max_lora_rank")
        self.check_vllm_engine()
        if self.max_contexts < 0 or self.calibration_contexts < 0:
            _fail("max_contexts" if self.max_contexts < 0 else "calibration_contexts", "must be >= 0.")
        if self.calibration_split in ("", "null", "none", "None"):  # YAML null, or the same on a command line
            self.calibration_split = None
        if self.eval_split == self.calibration_split:
            _fail(
                "calibration_split",
                "must differ from eval_split (a temperature fitted on the test split is not a result).",
            )
        require_confirm(self.eval_split, self.confirm, "eval_split")
        if self.calibration_split == CONFIRMATION_SPLIT:
            _fail("calibration_split", "the confirmation split is never a calibration split.")


def check_thresholds(thresholds: list[str]) -> None:
    """P(yes) thresholds of patching configs: numbers in (0, 1) or `l0_matched`."""
    for t in thresholds:
        if t != "l0_matched":
            try:
                ok = 0 < float(t) < 1
            except ValueError:
                ok = False
            if not ok:
                _fail("thresholds", f"{t!r} is neither a number in (0, 1) nor `l0_matched`.")


@dataclass
class PatchArguments(RunArguments):
    """eval/patch_kl.py: patch decoded latents (SAE, fractions, simulators) into the subject model; KL and
    CE."""

    eval_set: str = field(
        default="", metadata={"help": "The binary eval set eval/sweep.py scored (build_dataset folder)."}
    )
    split: str = field(default="test", metadata={"help": "Its split."})
    confirm: bool = field(
        default=False,
        metadata={"help": "Patch on the locked `confirmation` split (split: confirmation; recorded)."},
    )
    sweep_dir: str | None = field(
        default=None,
        metadata={
            "help": "eval/sweep.py's output_dir: simulators are read from "
            "<sweep_dir>/<eval set>/*/predictions_<split>.parquet."
        },
    )
    simulators: list[str] = field(
        default_factory=list, metadata={"help": "Simulator folder names (default: all in the sweep)."}
    )
    thresholds: list[str] = field(
        default_factory=lambda: ["0.5", "l0_matched"],
        metadata={"help": "P(yes) thresholds: numbers, or `l0_matched` (fitted by the sweep on validation)."},
    )
    values: list[str] = field(
        default_factory=lambda: ["oracle", "median"],
        metadata={
            "help": "Values of predicted latents: `oracle` (true value where truly active, "
            "median otherwise), `median` (the latent's median non-zero activation) "
            "and/or `predicted` (value_simulator's 0-9 answer mapped through the "
            "latent's deciles)."
        },
    )
    value_simulator: str | None = field(
        default=None,
        metadata={
            "help": "For `predicted` values: a train/sft.py run "
            "trained on sim_value_v1 or a dense value format (sim_dense_value_v1, ...), or a model reference."
        },
    )
    fractions: list[float] = field(
        default_factory=lambda: [0.0, 0.1, 0.25, 0.5, 0.75, 1.0],
        metadata={"help": "Figure 1: fractions of the truly active latents kept."},
    )
    fraction_modes: list[str] = field(
        default_factory=lambda: ["top", "random"], metadata={"help": "`top` and/or `random`."}
    )
    all_positions: bool = field(
        default=True, metadata={"help": "Also patch every position (SAE, ablations, fractions)."}
    )
    max_contexts: int = field(
        default=0, metadata={"help": "Contexts (0: those the sweep scored, else all of the split)."}
    )
    mean_contexts: int = field(
        default=32, metadata={"help": "Cache rows averaged for the mean-ablation vector."}
    )
    device: str = device_field()
    dtype: str = dtype_field()
    output_dir: str = field(default="", metadata={"help": "Default <sweep_dir>/<eval set>/patch_kl."})

    def __post_init__(self):
        check_dtype_device(self)
        if not self.eval_set:
            _fail(
                "eval_set",
                "give the binary eval set (data_gen/build_dataset.py, configs/data/eval_quantiles.yaml).",
            )
        check_thresholds(self.thresholds)
        require_confirm(self.split, self.confirm, "split")
        if bad := set(self.values) - {"oracle", "median", "predicted"}:
            _fail("values", f"{sorted(bad)}: choose from oracle, median, predicted.")
        if "predicted" in self.values and not self.value_simulator:
            _fail(
                "value_simulator",
                "`predicted` values need a value simulator (a sim_value_v1 run or a model).",
            )
        if bad := set(self.fraction_modes) - {"top", "random"}:
            _fail("fraction_modes", f"{sorted(bad)}: choose from top, random.")
        if any(not 0 <= f <= 1 for f in self.fractions):
            _fail("fractions", "every fraction must be in [0, 1].")
        if self.max_contexts < 0 or self.mean_contexts < 1:
            _fail(
                "max_contexts" if self.max_contexts < 0 else "mean_contexts",
                "must be >= 0 (mean_contexts >= 1).",
            )


@dataclass
class WholeLayerArguments(RunArguments):
    """eval/whole_layer.py: a simulator judges every explained latent at the judged positions of held-out
    texts; the layer is rebuilt from its verdicts alone and patched in there; KL and CE per position."""

    eval_set: str = field(
        default="",
        metadata={
            "help": "A binary eval set: its cache (tokens, SAE, statistics), its "
            "interpretations and its row splits."
        },
    )
    simulator: str = field(
        default="",
        metadata={"help": "A train/sft.py run folder (its final adapter): a dense format or sim_v1."},
    )
    baseline: str = field(
        default="",
        metadata={
            "help": "Instead of `simulator`: a prompted sim_v1 baseline, as in "
            "eval/sweep.py (`name=...,model=...,shots=N`)."
        },
    )
    references: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Reference simulators judged beside the simulator, by name (prior, string_match, "
            "prior+string_match, lexical, lexical_gbm): each decides every explained latent from its own "
            "P(yes) at its own thresholds, its whole layer and judgment metrics in the same results."
        },
    )
    positions: str = field(
        default="all",
        metadata={
            "help": "`all`: every position judged and patched at once; `last`: "
            "only each text's last one (the seed's setting; a sim_v1 "
            "simulator costs one prompt per latent and position)."
        },
    )
    context_tokens: int = field(
        default=32,
        metadata={
            "help": "sim_v1: tokens of context up to the judged one (the eval sets' 32-token windows)."
        },
    )
    split: str = field(
        default="test",
        metadata={"help": "The rows the texts come from (never the simulator's training rows)."},
    )
    confirm: bool = field(
        default=False,
        metadata={"help": "Texts from the locked `confirmation` split (split: confirmation; recorded)."},
    )
    texts: int = field(default=2, metadata={"help": "Held-out texts (cache rows) judged and patched."})
    tokens: int = field(
        default=64, metadata={"help": "Positions per text (1..tokens of its row; BOS is never encoded)."}
    )
    calibration_texts: int = field(
        default=1,
        metadata={
            "help": "Validation rows: judged to fit the `l0_matched` thresholds, and the SAE's mean output "
            "over them is the `mean_update` reference (0: neither)."
        },
    )
    chance_draws: int = field(
        default=20,
        metadata={
            "help": "Independent draws of `firing_rate_random` (each latent flagged at random with its "
            "firing rate): its KL is their mean; the spread of their recoveries is reported."
        },
    )
    thresholds: list[str] = field(
        default_factory=lambda: ["0.5", "l0_matched"],
        metadata={
            "help": "P(yes) thresholds: numbers in (0, 1) and/or `l0_matched` (as many "
            "latents flagged per position as the SAE has explained active ones, "
            "on the calibration texts)."
        },
    )
    values: list[str] = field(
        default_factory=lambda: ["oracle", "median"],
        metadata={
            "help": "Values of flagged latents: `oracle` (true value where truly active, "
            "median otherwise), `median` (the latent's median activation) and/or `predicted` (a value "
            "simulator's expected activation given active: sim_dense_value_v1 or sim_dense_value_k{K}_v1)."
        },
    )
    batch_size: int = field(
        default=64, metadata={"help": "Latents per forward pass (each over one whole text)."}
    )
    first_stage: str = field(
        default="",
        metadata={
            "help": "A train/first_stage.py output of the same dense simulator: also rewrite the layer in "
            "two stages (the simulator judges only the pairs the first stage proposes: `two_stage@...` "
            "rows) and with the first stage alone (`first_stage@...`)."
        },
    )
    first_stage_k: int = field(
        default=0, metadata={"help": "Latents proposed per token (0: the k the first stage chose)."}
    )
    first_stage_per_text: bool = field(
        default=False,
        metadata={
            "help": "Propose by text, not by token: the `first_stage_k` latents of highest first-stage P "
            "anywhere in a text, each judged at every token (`first_stage_k` passes per text)."
        },
    )
    first_stage_ks: list[int] = field(
        default_factory=list,
        metadata={
            "help": "More k to report (`two_stage_k<k>@...` rows): the full judge's verdicts on the pairs "
            "the first stage's top-k proposes, 0 elsewhere; no judging beyond the full judge's (a proposed "
            "pair's verdict is the same judged alone: checked against `two_stage` at first_stage_k)."
        },
    )
    first_stage_latents_per_text: list[int] = field(
        default_factory=list,
        metadata={
            "help": "Two-stage rows by passes (`two_stage_per_text<m>@...`): the m latents of highest "
            "first-stage P anywhere in a text, each judged at every token (m passes of the judge per text), "
            "from the full judge's verdicts like `first_stage_ks`."
        },
    )
    merge_adapter: bool = field(
        default=True,
        metadata={
            "help": "Merge the LoRA into the simulator's weights for scoring "
            "(~15% faster here; the adapter files are untouched)."
        },
    )
    device: str = device_field()
    dtype: str = dtype_field()

    def __post_init__(self):
        check_dtype_device(self)
        if self.first_stage and not self.simulator:
            _fail("first_stage", "a first stage serves a dense `simulator` (a train/sft.py run folder).")
        if self.first_stage_k < 0:
            _fail("first_stage_k", "must be >= 0 (0: the k the first stage chose on validation texts).")
        if self.first_stage_per_text and not (self.first_stage and self.first_stage_k):
            _fail("first_stage_per_text", "give a `first_stage` and `first_stage_k` (latents per text) >= 1.")
        for key in ("first_stage_ks", "first_stage_latents_per_text"):
            if (ks := getattr(self, key)) and (not self.first_stage or min(ks) < 1):
                _fail(key, f"{ks}: give values >= 1, with a `first_stage`.")
        for key, fix in (
            ("eval_set", "give the binary eval set (configs/data/eval_quantiles.yaml)"),
            ("output_dir", "give the folder the results go to"),
        ):
            if not getattr(self, key):
                _fail(key, f"{fix}.")
        require_confirm(self.split, self.confirm, "split")
        if bool(self.simulator) == bool(self.baseline):
            _fail(
                "simulator",
                "give either a train/sft.py run folder (`simulator`) or a prompted baseline "
                "(`baseline: name=...`), not both or neither.",
            )
        if self.baseline:
            spec = parse_baseline(self.baseline)
            if spec["model"] in reference_names():
                _fail(
                    "baseline",
                    f"{self.baseline!r} is a reference simulator: list it under `references` "
                    f"(`references: [{spec['model']}]`), judged beside the simulator.",
                )
            if spec["score"] or spec["interpretations"] or spec["control"]:
                _fail(
                    "baseline",
                    f"{self.baseline!r}: `score`, `interpretations` and `control` are eval/sweep.py "
                    "options; the whole layer reads the eval set's interpretations, without scores.",
                )
        if self.positions not in ("all", "last"):
            _fail("positions", f"{self.positions!r} is not `all` or `last`.")
        _require_positive(self, "texts", "tokens", "batch_size", "context_tokens", "chance_draws")
        if unknown := [r for r in self.references if r not in reference_names()]:
            _fail("references", f"{unknown}: not reference simulators; known: {reference_names()}.")
        if len(set(self.references)) != len(self.references):
            _fail("references", f"{self.references} names a reference twice.")
        if self.calibration_texts < 0:
            _fail("calibration_texts", "must be >= 0.")
        check_thresholds(self.thresholds)
        if "l0_matched" in self.thresholds and not self.calibration_texts:
            _fail("thresholds", "`l0_matched` needs calibration_texts >= 1.")
        if not self.thresholds:
            _fail("thresholds", "give at least one.")
        if not self.values or set(self.values) - {"oracle", "median", "predicted"}:
            _fail("values", f"{self.values}: choose from oracle, median, predicted.")
        if self.split not in ("validation", "test", CONFIRMATION_SPLIT):
            _fail(
                "split",
                f"{self.split!r}: texts come from held-out rows, `validation`, `test` or `confirmation`.",
            )


@dataclass
class GenerateArguments:
    """eval/generate.py: closed-loop generation with the hook layer rewritten from SAE latents or a
    simulator."""

    eval_set: str = field(
        default="",
        metadata={
            "help": "A binary eval set: its cache names the subject model, SAE and "
            "hookpoint; its test latents are the ones a simulator rewrites."
        },
    )
    prompts: list[str] = field(
        default_factory=lambda: ["The sun was", "A fool and his money"],
        metadata={"help": "Prompts the subject model continues."},
    )
    max_new_tokens: int = field(default=10, metadata={"help": "Tokens generated per prompt and source."})
    sources: list[str] = field(
        default_factory=lambda: ["clean", "sae", "fraction:top:0.5", "simulator"],
        metadata={"help": "`clean`, `sae`, `fraction:<top|random>:<f>`, `simulator`."},
    )
    simulator_run: str | None = field(
        default=None,
        metadata={
            "help": "A train/sft.py output_dir (its final adapter); default: the untuned simulator_model."
        },
    )
    simulator_model: str = field(
        default="embedded:smollm2-135m", metadata={"help": "Base simulator model without a run."}
    )
    threshold: float = field(
        default=0.5, metadata={"help": "P(yes) at which the simulator calls a latent active."}
    )
    values: str = field(
        default="oracle",
        metadata={
            "help": "`oracle` (true value where truly active, median otherwise) or `median` (no oracle)."
        },
    )
    n_inactive: int = field(
        default=16, metadata={"help": "Inactive latents of the pool scored per step beside the active ones."}
    )
    allow_seen_latents: bool = field(
        default=False,
        metadata={
            "help": "Let a finetuned simulator judge latents it trained "
            "on (by default those keep their SAE values)."
        },
    )
    window: int = field(
        default=32, metadata={"help": "Tokens of context the simulator sees (the eval set's window)."}
    )
    do_sample: bool = field(
        default=False, metadata={"help": "Sample (seeded, temperature 1) instead of greedy decoding."}
    )
    device: str = device_field()
    dtype: str = dtype_field()
    batch_size: int = field(default=32, metadata={"help": "Simulator suffixes per forward pass."})
    output_dir: str = field(
        default="outputs/generate", metadata={"help": "results.json and generation.html go here."}
    )
    seed: int = field(
        default=22, metadata={"help": "Seed for inactive latents, random fractions and sampling."}
    )

    def __post_init__(self):
        check_dtype_device(self)
        if not self.eval_set:
            _fail("eval_set", "give the binary eval set (configs/data/eval_quantiles.yaml).")
        for source in self.sources:
            parts = source.split(":")
            ok = source in ("clean", "sae", "simulator") or (
                len(parts) == 3
                and parts[0] == "fraction"
                and parts[1] in ("top", "random")
                and parts[2].replace(".", "", 1).isdigit()
                and 0 <= float(parts[2]) <= 1
            )
            if not ok:
                _fail(
                    "sources",
                    f"{source!r}: use clean, sae, simulator or fraction:<top|random>:<f in [0, 1]>.",
                )
        if self.values not in ("oracle", "median"):
            _fail("values", f"{self.values!r} is not oracle or median.")
        if not self.prompts:
            _fail("prompts", "give at least one prompt.")
        _require_positive(self, "max_new_tokens", "window", "batch_size")


@dataclass
class ReportArguments:
    """eval/report.py: the HTML report of a sweep folder."""

    sweep_dir: str = field(default="outputs/eval", metadata={"help": "eval/sweep.py's output_dir."})
    output_dir: str = field(
        default="", metadata={"help": "Where report.html and figures/ go (default <sweep_dir>/report)."}
    )
    title: str = field(default="latentsim simulator evaluation", metadata={"help": "The report's title."})


@dataclass
class SummaryArguments:
    """eval/summary.py: what a quickstart-style run folder holds, printed."""

    run_dir: str = field(
        default="outputs/quickstart", metadata={"help": "The run folder (launch.sh quickstart's)."}
    )


# What eval/score_external.py scores (latentsim.external_eval reads them from here).
EXTERNAL_KINDS = ("detection", "fuzz", "per_token")
EXTERNAL_REFERENCES = ("string_match", "lexical", "recorded", "oracle")


@dataclass
class ExternalEvalArguments(RunArguments):
    """eval/score_external.py: simulators x an imported set (data_gen/import_records.py) of held-out latents
    whose interpretations were written elsewhere."""

    eval_set: str = field(default="", metadata={"help": "An import_records.py output folder."})
    run_dirs: list[str] = field(
        default_factory=list,
        metadata={"help": "train/sft.py output dirs of dense simulators (final adapters)."},
    )
    prompted: list[str] = field(
        default_factory=list,
        metadata={"help": "Untuned models asked the detection / fuzzing question (model references)."},
    )
    shots: list[int] = field(
        default_factory=lambda: [0],
        metadata={
            "help": "Each prompted model once per entry: that many solved examples of training latents."
        },
    )
    references: list[str] = field(
        default_factory=lambda: ["string_match", "recorded"],
        metadata={
            "help": "`string_match`, `lexical` (latentsim.external_lexical), `recorded` (the explainer's own "
            "answers), `oracle` (the labels)."
        },
    )
    kinds: list[str] = field(
        default_factory=lambda: ["detection", "fuzz", "per_token"],
        metadata={"help": "Which of the imported tables to score (those the folder holds)."},
    )
    max_latents: int = field(default=40, metadata={"help": "Held-out latents scored (seeded; 0: all)."})
    max_texts: int = field(
        default=20, metadata={"help": "Texts per latent and kind, half true and half false (0: all)."}
    )
    batch_size: int = field(default=16, metadata={"help": "Prompts per forward pass (prompted models)."})
    dtype: str = dtype_field()
    device: str = device_field()
    output_dir: str = field(default="outputs/eval_external", metadata={"help": "Results under <dir>/<set>/."})

    def __post_init__(self):
        if not self.eval_set:
            _fail("eval_set", "give an imported folder (data_gen/import_records.py --output_dir).")
        if unknown := [r for r in self.references if r not in EXTERNAL_REFERENCES]:
            _fail("references", f"{unknown} not among {list(EXTERNAL_REFERENCES)}.")
        if unknown := [k for k in self.kinds if k not in EXTERNAL_KINDS]:
            _fail("kinds", f"{unknown} not among {list(EXTERNAL_KINDS)}.")
        if any(s < 0 for s in self.shots) or not self.shots:
            _fail("shots", f"give shot counts >= 0, got {self.shots}.")
        if self.max_latents < 0 or self.max_texts < 0:
            _fail("max_latents" if self.max_latents < 0 else "max_texts", "must be >= 0.")
        _require_positive(self, "batch_size")
        check_dtype_device(self)


VALUE_REFERENCES = ("prior", "lexical", "lexical_gbm", "string_match", "prior+string_match")


@dataclass
class ValueEvalArguments(RunArguments):
    """eval/score_values.py: dense simulators' predicted activation at every token of held-out texts against
    the true one, per held-out latent (Pearson r, r over active tokens, AUC of P(active), bin calibration)."""

    eval_set: str = field(
        default="",
        metadata={"help": "A binary eval set: its cache, statistics, interpretations and held-out latents."},
    )
    run_dirs: list[str] = field(
        default_factory=list,
        metadata={"help": "train/sft.py output dirs of dense simulators (Yes/No or value formats)."},
    )
    references: list[str] = field(
        default_factory=lambda: ["prior", "lexical"],
        metadata={
            "help": "References valued as P(active) x the latent's median activation (the prior: its "
            f"firing rate, a constant): {list(VALUE_REFERENCES)}."
        },
    )
    prompted: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Untuned models (model references) as the prompted all-at-once simulator: the digit 0-9 "
            "after each token's line (latentsim.all_at_once)."
        },
    )
    split: str = field(default="test", metadata={"help": "The eval set's split: its rows and latents."})
    max_latents: int = field(default=64, metadata={"help": "Held-out latents scored (seeded; 0: all)."})
    random_texts: int = field(
        default=8, metadata={"help": "Held-out texts every latent is scored on (the all-at-once setting)."}
    )
    top_texts: int = field(
        default=4, metadata={"help": "Each latent's own strongest held-out texts added (top-and-random)."}
    )
    tokens: int = field(default=64, metadata={"help": "Positions 1..tokens of each text."})
    batch_size: int = field(default=16, metadata={"help": "Latents per forward pass."})
    dtype: str = dtype_field()
    device: str = device_field()
    output_dir: str = field(default="outputs/eval_values", metadata={"help": "results.json and tables here."})

    def __post_init__(self):
        if not self.eval_set:
            _fail("eval_set", "give a build_dataset eval set (configs/data/eval_quantiles.yaml).")
        if not self.run_dirs:
            _fail("run_dirs", "give at least one train/sft.py run folder of a dense simulator.")
        if unknown := [r for r in self.references if r not in VALUE_REFERENCES]:
            _fail("references", f"{unknown} not among {list(VALUE_REFERENCES)}.")
        if self.split not in ("train", "validation", "test", "confirmation"):
            _fail("split", f"{self.split!r} is not train, validation, test or confirmation.")
        if self.max_latents < 0:
            _fail("max_latents", "must be >= 0.")
        if self.top_texts < 0:
            _fail("top_texts", "must be >= 0.")
        for key in ("random_texts", "tokens", "batch_size"):
            _require_positive(self, key)
        check_dtype_device(self)
