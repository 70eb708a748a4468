"""Publishing to the Hugging Face Hub, behind one thin function.

The token comes from the environment (`HF_TOKEN`) or `huggingface-cli login`, never from a config or a log.
Tests inject a fake API object; nothing else here touches the network.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path

from latentsim.errors import MissingInputError, UnavailableError


@contextmanager
def _hub_errors(repo_id: str):
    """The Hub problems that are the user's to fix (offline, not logged in, no access, no such repo) as InputErrors."""
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
        raise UnavailableError(f"Hub repo {repo_id}: {err}; log in with `huggingface-cli login` or set HF_TOKEN, "
                               "and unset HF_HUB_OFFLINE.") from None
    except HfHubHTTPError as err:
        if err.response is None or err.response.status_code not in (401, 403):
            raise
        raise UnavailableError(f"Hub repo {repo_id}: access denied ({err.response.status_code}); log in with "
                               "`huggingface-cli login` or set HF_TOKEN to a token that may write there.") from None


def upload_folder(folder: str | Path, repo_id: str, repo_type: str, *, private: bool = True,
                  commit_message: str = "Upload with latentsim", revision: str | None = None,
                  ignore_patterns: list[str] | None = None, api=None) -> str:
    """create_repo(exist_ok) + upload_folder; returns the commit URL. `api`: an HfApi (injected in tests)."""
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    with _hub_errors(repo_id):
        api.create_repo(repo_id=repo_id, repo_type=repo_type, private=private, exist_ok=True)
        if revision is not None:
            api.create_branch(repo_id=repo_id, repo_type=repo_type, branch=revision, exist_ok=True)
        info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type=repo_type, revision=revision,
                                 commit_message=commit_message, ignore_patterns=ignore_patterns)
    return str(getattr(info, "commit_url", info))


CARD_METRICS = ("recall", "precision", "f1", "auc", "ece", "mean_p_yes", "accuracy", "loss")


def adapter_card(base_model: str, prompt_format: str, dataset: str, metrics: dict | None = None,
                 model_name: str = "simulator") -> str:
    """A PEFT adapter model card: YAML metadata (base_model, library_name: peft, tags, datasets, prompt format,
    model-index from the validation metrics when present) and a short description."""
    shown = {k.removeprefix("eval_"): v for k, v in (metrics or {}).items()  # undefined (NaN) metrics: left out
             if isinstance(v, float) and math.isfinite(v) and k.removeprefix("eval_") in CARD_METRICS}
    index = ""
    if shown:
        entries = "\n".join(f"      - type: {k}\n        value: {v:.4f}" for k, v in sorted(shown.items()))
        index = f"""model-index:
- name: {model_name}
  results:
  - task:
      type: text-classification
      name: SAE latent activation simulation
    dataset:
      type: {dataset}
      name: {dataset}
      split: validation
    metrics:
{entries}
"""
    table = "\n".join(f"| {k} | {v:.4f} |" for k, v in sorted(shown.items()))
    return f"""---
base_model: {base_model}
base_model_relation: adapter
library_name: peft
pipeline_tag: text-generation
tags: [latentsim, simulator, sae, interpretability, lora, trl, sft]
datasets: [{dataset}]
prompt_format: {prompt_format}
{index}---
# {model_name}: an SAE-latent simulator (LoRA)

Given the interpretation of a sparse-autoencoder latent and a text whose last token is marked `<<like this>>`,
this adapter makes `{base_model}` answer whether the latent is active there. Prompt format `{prompt_format}`
(`latentsim.prompts`; render prompts with it and the saved chat template). Trained with latentsim's
`train/sft.py` on `{dataset}`.

| validation metric | value |
|---|---|
{table}
"""


def download_adapter_branches(repo_id: str, local_root: str | Path, api=None) -> list[tuple[str, Path]]:
    """Every published revision of an adapter repo (`main` and the `step-N` checkpoint branches, by step), each
    downloaded to `<local_root>/<repo>/<branch>`: [(branch, folder)]. `api`: an HfApi (injected in tests)."""
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    out = []
    with _hub_errors(repo_id):
        branches = [b.name for b in api.list_repo_refs(repo_id).branches]
        steps = sorted((b for b in branches if b.startswith("step-") and b[5:].isdigit()), key=lambda b: int(b[5:]))
        for branch in steps + (["main"] if "main" in branches else []):
            folder = Path(local_root) / repo_id.replace("/", "--") / branch
            api.snapshot_download(repo_id=repo_id, revision=branch, local_dir=str(folder))
            out.append((branch, folder))
    return out
