"""What a simulator is, and where simulators are found: run folders, their checkpoints, Hub branches,
baselines.

A `Simulator` is a spec, not a loaded model: a base model plus (finetuned) a LoRA adapter and what training
recorded about it, a prompted baseline (`shots`, `score`, another interpretation set), or a reference that
reads no text with a language model; any of them under a control (`control`: shown other latents'
interpretations or none, latentsim.simulators.controls), named `<its name>__<control>`.
latentsim.simulators.factory turns any of them into a scorer.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from latentsim.errors import MissingInputError
from latentsim.simulators.base import Simulator

logger = logging.getLogger(__name__)
CHECKPOINT_COMPLETE = "trainer_state.json"  # the Trainer writes it last in a checkpoint folder


def run_simulators(run_dir: str | Path, include_checkpoints: bool = True) -> list[Simulator]:
    """The complete checkpoint-N folders (by step) and the final adapter of a train/sft.py run (or of a Hub
    adapter snapshot, which carries the same run_config.json); a train/first_stage.py output's head."""
    run = Path(run_dir)
    if (run / "first_stage.json").is_file():
        return [first_stage_simulator(run)]
    config_path = run / "run_config.json"
    if not config_path.is_file():
        raise MissingInputError(
            f"config key `run_dirs`: {run} has no run_config.json; is it a train/sft.py output_dir?"
        )
    config = json.loads(config_path.read_text())["config"]
    script, model = config["script"], config["model"]
    common = dict(
        kind="finetuned",
        base_model=model["model_name_or_path"],
        prompt_format=script["prompt_format"],
        chat_template_sha256=config.get("chat_template_sha256"),
        train_datasets=[script["dataset_name"], *script.get("extra_datasets", [])],
        score=False,
    )
    out = []
    if include_checkpoints:
        for ckpt in sorted(run.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1])):
            if (ckpt / CHECKPOINT_COMPLETE).is_file() and (ckpt / "adapter_model.safetensors").is_file():
                step = int(ckpt.name.split("-")[-1])
                out.append(Simulator(name=f"{run.name}__{ckpt.name}", adapter=str(ckpt), step=step, **common))
            else:
                logger.warning("skipping incomplete checkpoint %s", ckpt)
    if (run / "adapter_model.safetensors").is_file():
        step = None
        for record in (run / "eval_results.json", run / "trainer_state.json"):  # sft.py writes the first
            if step is None and record.is_file():
                step = json.loads(record.read_text()).get("global_step")
        # The final adapter is the last checkpoint's weights when training ended on a save step: score it
        # once.
        out = [s for s in out if step is None or s.step != step]
        out.append(Simulator(name=f"{run.name}__final", adapter=str(run), step=step, **common))
    if not out:
        raise MissingInputError(
            f"config key `run_dirs`: {run} holds no adapter (no adapter_model.safetensors)."
        )
    return out


def final_simulator(run_dir: str | Path) -> Simulator:
    """The final adapter of a train/sft.py run."""
    return run_simulators(run_dir, include_checkpoints=False)[-1]


def first_stage_simulator(folder: str | Path) -> Simulator:
    """A train/first_stage.py output as a simulator of kind `first_stage` (latentsim.simulators.first_stage):
    its dense simulator's spec (model, adapter, format, training data) with the head's folder."""
    folder = Path(folder)
    record = json.loads((folder / "first_stage.json").read_text())
    sim = final_simulator(record["simulator"])
    return dataclasses.replace(sim, name=folder.name, kind="first_stage", first_stage=str(folder), step=None)


def under_control(sim: Simulator, control: str | None) -> Simulator:
    """`sim` under a control (`shuffled`, `empty`): its own results folder `<name>__<control>`; `sim` itself
    when `control` is None."""
    if control is None:
        return sim
    return dataclasses.replace(sim, name=f"{sim.name}__{control}", control=control)


def real_simulator_name(sim: Simulator) -> str | None:
    """The name of the simulator a control is the control of (None for a simulator under no control)."""
    return sim.name.removesuffix(f"__{sim.control}") if sim.control else None


def baseline_simulator(spec: dict) -> Simulator:
    """A baseline from its parsed spec (latentsim.config.eval.parse_baseline): a prompted model, or a
    registered reference when `model` names one."""
    from latentsim.simulators.base import REFERENCES

    sim = Simulator(
        name=f"baseline__{spec['name']}",
        kind="reference" if spec["model"] in REFERENCES else "baseline",
        base_model=spec["model"],
        shots=spec["shots"],
        score=spec["score"],
        interpretations=spec["interpretations"],
        tensor_parallel_size=spec.get("tensor_parallel_size"),
    )
    return under_control(sim, spec.get("control"))


def model_simulator(ref: str) -> Simulator:
    """A train/sft.py run folder's final adapter, or an untuned model reference read as a zero-shot
    baseline."""
    if (Path(ref) / "run_config.json").is_file():
        return final_simulator(ref)
    return Simulator(name=ref, kind="baseline", base_model=ref)


def simulators_to_score(args, api=None) -> list[Simulator]:
    """Every simulator an EvalArguments names: checkpoints and final adapters of `run_dirs`, each branch of
    the `hub_runs` repos (downloaded), then the `baselines`. An entry under a control yields only the final
    adapter (`main`), under that control. Resolved before any model loads."""
    from latentsim.hub import download_adapter_branches

    sims = []
    for run, control in args.parsed_runs:
        found = [final_simulator(run)] if control else run_simulators(run, args.include_checkpoints)
        sims += [under_control(s, control) for s in found]
    for repo, control in args.parsed_hub_runs:
        for branch, folder in download_adapter_branches(repo, Path(args.output_dir) / "hub", api=api):
            if control is None or branch == "main":
                sim = final_simulator(folder)
                sim.name = f"{repo.replace('/', '--')}@{branch}"
                sims.append(under_control(sim, control))
    return sims + [baseline_simulator(b) for b in args.parsed_baselines]


def simulator_tokenizer(sim: Simulator):
    """A simulator's tokenizer: its adapter's own (saved by train/sft.py with its chat template), else the
    base model's (a prompted baseline)."""
    from latentsim.models import load_tokenizer

    own = sim.adapter and (Path(sim.adapter) / "tokenizer_config.json").is_file()
    return load_tokenizer(sim.adapter if own else sim.base_model)
