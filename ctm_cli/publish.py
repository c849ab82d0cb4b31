"""Upload a merged adapter folder to the Hugging Face Hub (`--push-to-hub`)."""

from __future__ import annotations

from pathlib import Path

from ctm_cli.errors import OutputError, UsageError
from ctm_cli.sources import REPO_ID


def check_push_target(repo_id: str) -> None:
    """Refuse before any work a repo id that is not `org/name`, offline mode, or a missing token."""
    from huggingface_hub import constants, get_token

    if not REPO_ID.match(repo_id):
        raise UsageError(f"--push-to-hub expects a Hub repo id org/name, got {repo_id!r}")
    if constants.HF_HUB_OFFLINE:
        raise UsageError("--push-to-hub needs the network, but HF_HUB_OFFLINE=1")
    if get_token() is None:
        raise UsageError("--push-to-hub needs a Hub token: set HF_TOKEN or run `hf auth login`")


def push_folder(folder: Path, repo_id: str, private: bool) -> str:
    """Create the model repo if needed and upload `folder` to it in one commit; returns the repo URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message="Upload adapter merged with ctm")
    except Exception as exc:  # the Hub client's network errors differ across versions; all mean "not pushed"
        raise OutputError(
            f"{repo_id}: pushing to the Hub failed ({type(exc).__name__}: {exc}); the merged adapter is in {folder}"
        ) from exc
    return str(url)
