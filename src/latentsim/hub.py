"""Publishing to the Hugging Face Hub, behind one thin function.

The token comes from the environment (`HF_TOKEN`) or `huggingface-cli login`, never from a config or a log.
Tests inject a fake API object; nothing else here touches the network.
"""

from __future__ import annotations

from pathlib import Path


def upload_folder(folder: str | Path, repo_id: str, repo_type: str, *, private: bool = True,
                  commit_message: str = "Upload with latentsim", revision: str | None = None,
                  ignore_patterns: list[str] | None = None, api=None) -> str:
    """create_repo(exist_ok) + upload_folder; returns the commit URL. `api`: an HfApi (injected in tests)."""
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    api.create_repo(repo_id=repo_id, repo_type=repo_type, private=private, exist_ok=True)
    if revision is not None:
        api.create_branch(repo_id=repo_id, repo_type=repo_type, branch=revision, exist_ok=True)
    info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type=repo_type, revision=revision,
                             commit_message=commit_message, ignore_patterns=ignore_patterns)
    return str(getattr(info, "commit_url", info))
