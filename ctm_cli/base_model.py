"""Which base model a set of adapters was trained on: names compared by identity (the Hub's renames of its
canonical models, the folder name of a local path, any case), an explicit override, and warnings when an
adapter names none."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from itertools import combinations

from ctm_cli.adapter import Adapter
from ctm_cli.errors import IncompatibleError

# The canonical models the Hub moved into organisations in 2024; their old ids still redirect to the new ones.
_MOVED = {
    "openai-community": ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "openai-gpt"),
    "google-bert": (
        "bert-base-uncased", "bert-base-cased", "bert-large-uncased", "bert-large-cased", "bert-base-chinese",
        "bert-base-multilingual-uncased", "bert-base-multilingual-cased", "bert-base-german-cased",
        "bert-large-uncased-whole-word-masking", "bert-large-cased-whole-word-masking",
        "bert-large-uncased-whole-word-masking-finetuned-squad", "bert-large-cased-whole-word-masking-finetuned-squad",
    ),
    "distilbert": (
        "distilgpt2", "distilroberta-base", "distilbert-base-uncased", "distilbert-base-cased",
        "distilbert-base-multilingual-cased", "distilbert-base-uncased-finetuned-sst-2-english",
        "distilbert-base-uncased-distilled-squad", "distilbert-base-cased-distilled-squad",
    ),
    "FacebookAI": ("roberta-base", "roberta-large", "roberta-large-mnli", "xlm-roberta-base", "xlm-roberta-large"),
    "google-t5": ("t5-small", "t5-base", "t5-large", "t5-3b", "t5-11b"),
    "albert": ("albert-base-v1", "albert-base-v2", "albert-large-v2", "albert-xlarge-v2", "albert-xxlarge-v2"),
    "xlnet": ("xlnet-base-cased", "xlnet-large-cased"),
}  # fmt: skip
HUB_RENAMES = {old: f"{org}/{old}" for org, names in _MOVED.items() for old in names}
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
_CACHE_FOLDER = re.compile(r"^models--(?P<org>[\w.-]+)--(?P<name>[\w.-]+)$")  # a Hugging Face cache entry


@dataclass(frozen=True)
class Identity:
    """A base model reference reduced to what identifies it: the organisation when known, and the name."""

    org: str | None
    name: str

    def same_as(self, other: Identity) -> bool:
        """Equal names, and equal organisations where both are known (a local folder has none)."""
        return self.name == other.name and (self.org is None or other.org is None or self.org == other.org)

    def __str__(self) -> str:
        return f"{self.org}/{self.name}" if self.org else self.name


def identity(reference: str) -> Identity:
    """The identity of a `base_model_name_or_path`: a Hub id after the Hub's renames, a local path by its folder
    name (or the repo of a Hugging Face cache folder), all compared without case as the Hub does."""
    text = reference.strip().replace("\\", "/").rstrip("/")
    parts = text.split("/")
    cached = [found for part in parts if (found := _CACHE_FOLDER.match(part))]
    if cached:
        return Identity(cached[-1]["org"].lower(), cached[-1]["name"].lower())
    if _HUB_ID.match(text) and not text.startswith("."):
        return Identity(parts[0].lower(), parts[1].lower())
    renamed = HUB_RENAMES.get(text)
    if renamed:
        org, name = renamed.split("/")
        return Identity(org.lower(), name.lower())
    return Identity(None, parts[-1].lower())


@dataclass(frozen=True)
class BaseModel:
    """The base model to write into the merged adapter, and what the user should be told about it."""

    name: str | None
    overridden: bool = False
    warnings: list[str] = field(default_factory=list)


def _shapes_agree(first: Adapter, other: Adapter) -> bool:
    shared = set(first.modules) & set(other.modules)
    return bool(shared) and all(
        (first.modules[n].out_features, first.modules[n].in_features)
        == (other.modules[n].out_features, other.modules[n].in_features)
        for n in shared
    )


def _difference(first: Adapter, other: Adapter) -> str:
    """Why two named base models differ, and what the user can do about it."""
    one, two = identity(first.base_model or ""), identity(other.base_model or "")
    why = "the same name in different organisations" if one.name == two.name else "different model names"
    shown = [
        f"{adapter.source}: {adapter.base_model}" + (f" (= {ident})" if str(ident) != adapter.base_model else "")
        for adapter, ident in ((first, one), (other, two))
    ]
    listing = f"adapters were trained on different base models ({'; '.join(shown)}: {why}"
    if not _shapes_agree(first, other):
        return listing + "; their module shapes differ too)"
    return (
        listing + "); their shared modules have equal shapes: if they are one model, pass --base-model NAME "
        "(recipe key base_model) to merge them"
    )


def resolve_base_model(adapters: list[Adapter], override: str | None = None) -> BaseModel:
    """The base model of the merge: `override` when given (then the inputs' names are not compared); otherwise
    the one every input names (by identity), refusing inputs that name different ones; inputs that name
    none are accepted with a warning, as their module shapes are still checked."""
    if override is not None:
        return BaseModel(override, overridden=True)
    named = [adapter for adapter in adapters if adapter.base_model]
    for first, other in combinations(named, 2):  # every pair: a bare name matches any organisation's
        if not identity(first.base_model or "").same_as(identity(other.base_model or "")):
            raise IncompatibleError(_difference(first, other))
    if not named:
        warning = "no input names its base model; the merged adapter names none (record one with --base-model NAME)"
        return BaseModel(None, warnings=[warning])
    unnamed = [adapter.source for adapter in adapters if not adapter.base_model]
    warnings = [
        f"{source} names no base model; assuming it is {named[0].base_model}, like {named[0].source}"
        for source in unnamed
    ]
    return BaseModel(named[0].base_model, warnings=warnings)
