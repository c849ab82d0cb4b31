"""Turn each source argument into a local adapter folder: a local path, or a Hugging Face Hub repo."""

from __future__ import annotations

import re
from pathlib import Path

from ctm_cli.errors import InputError

ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"]
_HUB_REPO = re.compile(r"^(?:hf://)?(?P<repo>[\w.-]+/[\w.-]+)(?:@(?P<revision>[^/]+))?(?:/(?P<subfolder>.+))?$")


def resolve_source(source: str) -> Path:
    """A local folder for `source`; an existing local path always wins over a Hub repo id."""
    path = Path(source).expanduser()
    if path.exists() or not (match := _HUB_REPO.match(source)) or source.startswith((".", "/", "~")):
        return path
    return _download(match["repo"], match["revision"], match["subfolder"])


def _download(repo: str, revision: str | None, subfolder: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    prefix = f"{subfolder}/" if subfolder else ""
    name = f"{repo}@{revision}" if revision else repo
    try:
        folder = snapshot_download(
            repo_id=repo,
            revision=revision,
            allow_patterns=[prefix + file for file in ADAPTER_FILES],
        )
    except GatedRepoError as exc:
        raise InputError(f"{name}: Hub repo is gated; accept its terms and set HF_TOKEN") from exc
    except RepositoryNotFoundError as exc:
        raise InputError(f"{name}: no such Hub repo (or no access: set HF_TOKEN)") from exc
    except RevisionNotFoundError as exc:
        raise InputError(f"{name}: revision {revision!r} not found on the Hub") from exc
    except LocalEntryNotFoundError as exc:
        raise InputError(f"{name}: not in the local cache and the Hub cannot be reached (offline?)") from exc
    except OSError as exc:
        raise InputError(f"{name}: download from the Hub failed ({exc})") from exc
    return Path(folder) / subfolder if subfolder else Path(folder)
