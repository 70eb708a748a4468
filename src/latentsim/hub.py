"""Publishing to the Hugging Face Hub, behind one thin function.

The token comes from the environment (`HF_TOKEN`) or `huggingface-cli login`, never from a config or a log.
Tests inject a fake API object; nothing else here touches the network.
"""

from __future__ import annotations

import json
import math
import re
from contextlib import contextmanager
from pathlib import Path

from latentsim.errors import MissingInputError, UnavailableError


@contextmanager
def _hub_errors(repo_id: str):
    """The Hub problems that are the user's to fix (offline, not logged in, no access, no such repo) as
    InputErrors."""
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalTokenNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
    )

    try:
        yield
    except RepositoryNotFoundError as err:  # also what the Hub answers for a private repo without access
        raise MissingInputError(f"Hub repo {repo_id}: not found, or private and not yours ({err}).") from None
    except (OfflineModeIsEnabled, LocalTokenNotFoundError) as err:
        raise UnavailableError(
            f"Hub repo {repo_id}: {err}; log in with `huggingface-cli login` or set HF_TOKEN, "
            "and unset HF_HUB_OFFLINE."
        ) from None
    except HfHubHTTPError as err:
        if err.response is None or err.response.status_code not in (401, 403):
            raise
        raise UnavailableError(
            f"Hub repo {repo_id}: access denied ({err.response.status_code}); log in with "
            "`huggingface-cli login` or set HF_TOKEN to a token that may write there."
        ) from None


def upload_folder(
    folder: str | Path,
    repo_id: str,
    repo_type: str,
    *,
    private: bool = True,
    commit_message: str = "Upload with latentsim",
    revision: str | None = None,
    ignore_patterns: list[str] | None = None,
    api=None,
) -> str:
    """create_repo(exist_ok) + upload_folder; returns the commit URL. `api`: an HfApi (injected in tests)."""
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    with _hub_errors(repo_id):
        api.create_repo(repo_id=repo_id, repo_type=repo_type, private=private, exist_ok=True)
        if revision is not None:
            api.create_branch(repo_id=repo_id, repo_type=repo_type, branch=revision, exist_ok=True)
        info = api.upload_folder(
            folder_path=str(folder),
            repo_id=repo_id,
            repo_type=repo_type,
            revision=revision,
            commit_message=commit_message,
            ignore_patterns=ignore_patterns,
        )
    return str(getattr(info, "commit_url", info))


CARD_METRICS = ("recall", "precision", "f1", "auc", "ece", "mean_p_yes", "accuracy", "loss")
# Held-out numbers a card shows when eval/sweep.py scored the adapter (summary-row columns, with their CIs).
HELD_OUT_METRICS = (
    "auc",
    "pooled_auc",
    "lift_auc",
    "lift_psm_auc",
    "per_latent_auc",
    "recall",
    "precision",
    "precision_dictionary",
    "ece",
)


def hub_dataset_id(dataset: str) -> str | None:
    """The Hub id a training set is published under: a build_dataset folder's `push_to_hub`, or `dataset`
    itself when it names a Hub repo rather than a local folder; None for an unpublished local folder (a card's
    `datasets:` takes Hub ids only)."""
    run_config = Path(dataset) / "run_config.json"
    if run_config.is_file():
        pushed = json.loads(run_config.read_text()).get("config", {}).get("dataset", {}).get("push_to_hub")
        return pushed or None
    if Path(dataset).exists() or not re.fullmatch(r"[\w.-]+/[\w.-]+", dataset):
        return None
    return dataset


def index_result(dataset_type: str, dataset_name: str, split: str, metrics: list[tuple[str, float]]) -> str:
    """One `results:` entry of a card's model-index: the simulation task, the data it was measured on, the
    metrics."""
    entries = "\n".join(f"      - type: {k}\n        value: {v:.4f}" for k, v in metrics)
    return f"""  - task:
      type: text-classification
      name: SAE latent activation simulation
    dataset:
      type: {dataset_type}
      name: {dataset_name}
      split: {split}
    metrics:
{entries}"""


def adapter_card(
    base_model: str,
    prompt_format: str,
    dataset: str,
    metrics: dict | None = None,
    model_name: str = "simulator",
    held_out: list[dict] | None = None,
    step: int | None = None,
) -> str:
    """A PEFT adapter model card: YAML metadata (base_model, library_name: peft, tags, the training set's Hub
    id where it has one, prompt format, model-index) and a short description. The model-index and table hold
    this adapter's own numbers: `held_out` (eval/sweep.py results: {eval_set, metric, value, ci95}) when the
    sweep scored it, else its trainer's validation `metrics`; `step`: the checkpoint's training step."""
    shown = {
        k.removeprefix("eval_"): v
        for k, v in (metrics or {}).items()  # undefined (NaN) metrics: left out
        if isinstance(v, float) and math.isfinite(v) and k.removeprefix("eval_") in CARD_METRICS
    }
    hub_id = hub_dataset_id(dataset)
    if held_out:
        results = [
            index_result(
                eval_set,
                f"{eval_set} (held-out latents)",
                "test",
                [(h["metric"], h["value"]) for h in held_out if h["eval_set"] == eval_set],
            )
            for eval_set in dict.fromkeys(h["eval_set"] for h in held_out)
        ]
    else:
        name = hub_id or Path(dataset).name
        results = [index_result(name, name, "validation", sorted(shown.items()))] if shown else []
    index = f"model-index:\n- name: {model_name}\n  results:\n" + "\n".join(results) + "\n" if results else ""
    if held_out:
        table = "| held-out metric (eval set, test split) | value [95% CI] |\n|---|---|\n" + "\n".join(
            f"| {h['metric']} ({h['eval_set']}) | {h['value']:.4f}"
            + (f" [{h['ci95'][0]:.3f}, {h['ci95'][1]:.3f}]" if h.get("ci95") else "")
            + " |"
            for h in held_out
        )
    else:
        table = "| validation metric | value |\n|---|---|\n" + "\n".join(
            f"| {k} | {v:.4f} |" for k, v in sorted(shown.items())
        )
    datasets = f"datasets: [{hub_id}]\n" if hub_id else ""
    at = f" (checkpoint at step {step})" if step is not None else ""
    return f"""---
base_model: {base_model}
base_model_relation: adapter
library_name: peft
pipeline_tag: text-generation
tags: [latentsim, simulator, sae, interpretability, lora, trl, sft]
{datasets}prompt_format: {prompt_format}
{index}---
# {model_name}: an SAE-latent simulator (LoRA){at}

Given the interpretation of a sparse-autoencoder latent and a text whose last token is marked `<<like this>>`,
this adapter makes `{base_model}` answer whether the latent is active there. Prompt format `{prompt_format}`
(`latentsim.prompts`; render prompts with it and the saved chat template). Trained with latentsim's
`train/sft.py` on `{hub_id or Path(dataset).name}`{"" if hub_id else " (a local dataset, not published)"}.

{table}
"""


def checkpoint_results(checkpoint: Path, run_results: dict) -> dict:
    """A checkpoint's own eval_results.json: its step and its last validation metrics from its
    trainer_state.json (never the run's final ones), with the run's format, template and base model."""
    state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
    evals = [e for e in state.get("log_history", []) if any(k.startswith("eval_") for k in e)]
    return {
        "global_step": state["global_step"],
        "metrics": evals[-1] if evals else {},
        "metrics_from": f"{Path(checkpoint).name}/trainer_state.json",
        **{
            k: run_results[k]
            for k in ("prompt_format", "chat_template_sha256", "base_model")
            if k in run_results
        },
    }


def held_out_metrics(sweep_dir: str | Path, simulator: str) -> list[dict]:
    """eval/sweep.py's held-out numbers for one simulator (`<run>__final`, `<run>__checkpoint-N`) in every
    eval set of `sweep_dir`: [{eval_set, metric, value, ci95}] (empty when the sweep never scored it)."""
    from latentsim.metrics import summary_row

    out = []
    for path in sorted(Path(sweep_dir).glob(f"*/{simulator}/results.json")):
        record = json.loads(path.read_text())
        row = summary_row(
            simulator, record["simulator"]["kind"], record["simulator"]["step"], record["results"]
        )
        for metric in HELD_OUT_METRICS:
            if isinstance(row.get(metric), float) and math.isfinite(row[metric]):
                ci = [row.get(f"{metric}_ci_low"), row.get(f"{metric}_ci_high")]
                out.append(
                    {
                        "eval_set": path.parent.parent.name,
                        "metric": metric,
                        "value": row[metric],
                        "ci95": ci if all(isinstance(c, float) for c in ci) else None,
                    }
                )
    return out


def download_adapter_branches(repo_id: str, local_root: str | Path, api=None) -> list[tuple[str, Path]]:
    """Every published revision of an adapter repo (`main` and the `step-N` checkpoint branches, by step),
    each downloaded to `<local_root>/<repo>/<branch>`: [(branch, folder)]. `api`: an HfApi (injected in
    tests)."""
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    out = []
    with _hub_errors(repo_id):
        branches = [b.name for b in api.list_repo_refs(repo_id).branches]
        steps = sorted(
            (b for b in branches if b.startswith("step-") and b[5:].isdigit()), key=lambda b: int(b[5:])
        )
        for branch in steps + (["main"] if "main" in branches else []):
            folder = Path(local_root) / repo_id.replace("/", "--") / branch
            api.snapshot_download(repo_id=repo_id, revision=branch, local_dir=str(folder))
            out.append((branch, folder))
    return out
