"""Turn each source argument into a local adapter folder: a local path, or a Hugging Face Hub repo."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ctm_cli.errors import InputError, UsageError
from ctm_cli.peft_layout import ADAPTER_FILES, CONFIG_NAME

HUB_PREFIX = "hf://"
REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
_HUB_SOURCE = re.compile(r"^(?:hf://)?(?P<repo>[\w.-]+/[\w.-]+)(?:@(?P<revision>[^/]+))?(?:/(?P<subfolder>.+))?$")


@dataclass(frozen=True)
class HubRef:
    """A Hub adapter: repo id, optional revision (branch, tag or commit) and optional subfolder."""

    repo: str
    revision: str | None = None
    subfolder: str | None = None

    @property
    def name(self) -> str:
        """The reference without its revision: `org/name`, or `hf://org/name/subfolder`."""
        return f"{HUB_PREFIX}{self.repo}/{self.subfolder}" if self.subfolder else self.repo


@dataclass(frozen=True)
class ResolvedSource:
    """Where one source lives on disk; for a Hub repo also the reference and the commit it was read at."""

    source: str
    folder: Path
    hub: HubRef | None = None
    commit: str | None = None

    @property
    def name(self) -> str:
        """The source without a revision, as a recipe writes it (the commit goes in `revision:`)."""
        return self.hub.name if self.hub else self.source


def parse_hub_ref(source: str, revision: str | None = None) -> HubRef | None:
    """The Hub reference a source names (`org/name[@rev][/sub]`, `hf://...`), or None if it names none.

    `revision` (from a recipe) may be given besides an `@rev` in the source only if both agree."""
    match = _HUB_SOURCE.match(source)
    if match is None:
        return None
    named = match["revision"]
    if named and revision and named != revision:
        raise UsageError(f"{source}: names revision {named!r} but revision {revision!r} is also given")
    for what, value in (("subfolder", match["subfolder"]), ("revision", named or revision)):
        if value is not None and _escapes(value):
            raise InputError(f"{source}: {what} {value!r} would lead outside the Hub repository; refused")
    return HubRef(match["repo"], named or revision, match["subfolder"])


def _escapes(relative: str) -> bool:
    """Whether a subfolder or revision could name a path outside its repository in the Hub cache: absolute,
    with `..`, `.` or empty parts, backslashes or control characters."""
    parts = relative.split("/")
    return (
        relative.startswith("/")
        or "\\" in relative
        or any(part in ("", ".", "..") for part in parts)
        or any(ord(char) < 32 or ord(char) == 127 for char in relative)
    )


def locate_source(source: str, revision: str | None = None) -> ResolvedSource:
    """A local folder for `source`; an existing local path always wins over a Hub repo id."""
    path = Path(source).expanduser()
    try:
        looks_local = path.exists() or source.startswith((".", "/", "~"))
    except OSError as exc:  # a name the file system refuses to look up (too long, ...)
        raise InputError(f"{source}: not a usable path ({exc.strerror})") from exc
    hub = parse_hub_ref(source, revision) if source.startswith(HUB_PREFIX) or not looks_local else None
    if hub is None:
        if source.startswith(HUB_PREFIX):
            raise InputError(f"{source}: not a Hub reference (expected hf://org/name[@revision][/subfolder])")
        if revision:
            raise UsageError(f"{source}: a revision ({revision!r}) was given for a local folder")
        return ResolvedSource(source, path)
    snapshot = _download(source, hub)
    folder = snapshot / hub.subfolder if hub.subfolder else snapshot
    if not (folder / CONFIG_NAME).is_file():
        raise InputError(f"{source}: no {CONFIG_NAME} in {hub.name} at commit {snapshot.name}; not a PEFT adapter")
    return ResolvedSource(source, folder, hub, commit=snapshot.name)


def _download(source: str, hub: HubRef) -> Path:
    """The snapshot folder of the adapter files of `hub` in the Hugging Face cache (downloading what is missing).

    The cache, HF_TOKEN and HF_HUB_OFFLINE are huggingface_hub's own settings; offline, only the cache is read."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.utils import (  # where every huggingface_hub >= 0.23 exports them
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    prefix = f"{hub.subfolder}/" if hub.subfolder else ""
    try:
        return Path(
            snapshot_download(
                repo_id=hub.repo, revision=hub.revision, allow_patterns=[prefix + file for file in ADAPTER_FILES]
            )
        )
    except GatedRepoError as exc:
        raise InputError(f"{source}: gated Hub repo; accept its terms on the Hub and set HF_TOKEN") from exc
    except RepositoryNotFoundError as exc:
        raise InputError(
            f"{source}: not a local folder, and no such Hub repo or no access to it (private: set HF_TOKEN)"
        ) from exc
    except RevisionNotFoundError as exc:
        raise InputError(f"{source}: revision {hub.revision!r} not found in Hub repo {hub.repo}") from exc
    except LocalEntryNotFoundError as exc:
        if getattr(exc, "snapshot_path", None):  # IncompleteSnapshotError of newer huggingface_hub
            raise InputError(f"{source}: the cached snapshot is incomplete and the Hub cannot be reached") from exc
        where = f"not a local folder, and not in the Hugging Face cache ({constants.HF_HUB_CACHE})"
        if constants.HF_HUB_OFFLINE:
            raise InputError(f"{source}: {where}, and HF_HUB_OFFLINE=1 forbids downloading") from exc
        raise InputError(f"{source}: {where}, and the Hub cannot be reached") from exc
    except HFValidationError as exc:
        raise InputError(f"{source}: not a local folder, and not a valid Hub repo id or revision") from exc
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "?"
        hint = "; check HF_TOKEN" if status in (401, 403) else ""
        raise InputError(f"{source}: the Hub refused the request (HTTP {status}){hint}") from exc
    except OSError as exc:
        raise InputError(f"{source}: download from the Hub failed ({exc})") from exc
