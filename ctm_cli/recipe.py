"""The YAML recipe of a merge: schema, validation with errors that name the key and line, flags on top, dump.

Schema (every key but `adapters` is optional; defaults as for `ctm merge`):

    adapters:                     # two or more
      - source: org/name          # local folder or Hub repo (`org/name@rev`, `hf://org/name[@rev][/sub]`)
        weight: 1.0               # default 1.0
        revision: main            # Hub branch, tag or commit
    method: ctm
    rule: ta
    rank: 16
    params: {lambda: 1.0}         # rule parameters
    beta: 1.0
    seed: 0
    dtype: null                   # float32 | float16 | bfloat16 | null (the inputs' dtype)
    device: auto
    output: merged/
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, NoReturn

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from ctm_cli import __version__
from ctm_cli.errors import UsageError

ADAPTER_KEYS = ("source", "weight", "revision")
_STRING_TAG = "tag:yaml.org,2002:str"
_NULL_TAG = "tag:yaml.org,2002:null"


@dataclass(frozen=True)
class AdapterEntry:
    """One input of a recipe: where it comes from and its weight."""

    source: str
    weight: float = 1.0
    revision: str | None = None


@dataclass(frozen=True)
class Recipe:
    """Everything that determines a merge's result; the defaults are `ctm merge`'s defaults."""

    adapters: tuple[AdapterEntry, ...] = ()
    method: str = "ctm"
    rule: str | None = None  # None: the method's default rule (iso_c for ctm, ta for the others)
    rank: int = 16
    params: dict[str, float] = field(default_factory=dict)
    beta: float = 1.0
    seed: int = 0
    dtype: str | None = None
    device: str = "auto"
    output: str | None = None
    modules_to_save: str | None = None
    allow_missing: bool = False


RECIPE_KEYS = tuple(f.name for f in fields(Recipe))
DEFAULTS = Recipe()


class _Reader:
    """Reads values out of a composed YAML document; every error names the file, the line and the key."""

    def __init__(self, name: str):
        self.name = name
        self._constructor = SafeConstructor()

    def fail(self, node: Node, key: str, problem: str) -> NoReturn:
        raise UsageError(f"{self.name}:{node.start_mark.line + 1}: {key}: {problem}")

    def mapping(self, node: Node, key: str, allowed: tuple[str, ...] | None) -> dict[str, Node]:
        """The entries of a mapping node by key, refusing unknown and repeated keys."""
        if not isinstance(node, MappingNode):
            self.fail(node, key, f"expected a mapping, got {_describe(node)}")
        entries: dict[str, Node] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, ScalarNode) or key_node.tag != _STRING_TAG:
                self.fail(key_node, key, f"keys must be names, got {_describe(key_node)}")
            name = key_node.value
            where = f"{key}.{name}" if key else name
            if allowed is not None and name not in allowed:
                close = difflib.get_close_matches(name, allowed, n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                self.fail(key_node, where, f"unknown key ({hint}allowed: {', '.join(allowed)})")
            if name in entries:
                self.fail(key_node, where, "given twice")
            entries[name] = value_node
        return entries

    def text(self, node: Node, key: str) -> str:
        """A scalar as written (so `revision: 2024` is the tag "2024", not a number)."""
        if not isinstance(node, ScalarNode) or node.tag == _NULL_TAG or node.value == "":
            self.fail(node, key, f"expected text, got {_describe(node)}")
        return node.value

    def optional_text(self, node: Node, key: str) -> str | None:
        """Text, or None for `null`."""
        return None if isinstance(node, ScalarNode) and node.tag == _NULL_TAG else self.text(node, key)

    def number(self, node: Node, key: str) -> float:
        """A finite int or float."""
        value = self._scalar(node)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            self.fail(node, key, f"expected a finite number, got {_describe(node)}")
        return float(value)

    def integer(self, node: Node, key: str) -> int:
        """An int (not a bool, not a float)."""
        value = self._scalar(node)
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(node, key, f"expected an integer, got {_describe(node)}")
        return value

    def boolean(self, node: Node, key: str) -> bool:
        """A YAML boolean (true/false)."""
        value = self._scalar(node)
        if not isinstance(value, bool):
            self.fail(node, key, f"expected true or false, got {_describe(node)}")
        return value

    def _scalar(self, node: Node) -> Any:
        return self._constructor.construct_object(node, deep=True) if isinstance(node, ScalarNode) else None


def _describe(node: Node) -> str:
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    return "null" if node.tag == _NULL_TAG else repr(node.value)


def _adapters(reader: _Reader, node: Node) -> tuple[AdapterEntry, ...]:
    if not isinstance(node, SequenceNode):
        reader.fail(node, "adapters", f"expected a list of adapters, got {_describe(node)}")
    if len(node.value) < 2:
        reader.fail(node, "adapters", f"a merge needs at least two adapters, got {len(node.value)}")
    entries = []
    for index, item in enumerate(node.value):
        key = f"adapters[{index}]"
        values = reader.mapping(item, key, ADAPTER_KEYS)
        if "source" not in values:
            reader.fail(item, key, "missing key 'source' (a local folder or Hub repo)")
        entries.append(
            AdapterEntry(
                source=reader.text(values["source"], f"{key}.source"),
                weight=reader.number(values["weight"], f"{key}.weight") if "weight" in values else 1.0,
                revision=reader.optional_text(values["revision"], f"{key}.revision") if "revision" in values else None,
            )
        )
    return tuple(entries)


def _settings(reader: _Reader, values: dict[str, Node]) -> dict[str, Any]:
    readers = {
        "method": reader.text,
        "rule": reader.optional_text,
        "rank": reader.integer,
        "beta": reader.number,
        "seed": reader.integer,
        "dtype": reader.optional_text,
        "device": reader.text,
        "output": reader.optional_text,
        "modules_to_save": reader.optional_text,
        "allow_missing": reader.boolean,
    }
    settings = {key: read(values[key], key) for key, read in readers.items() if key in values}
    if "params" in values:
        params = reader.mapping(values["params"], "params", None)
        settings["params"] = {name: reader.number(node, f"params.{name}") for name, node in params.items()}
    if settings.get("rank", 1) < 0:
        reader.fail(values["rank"], "rank", f"must be 0 (full rank: core, knots) or positive, got {settings['rank']}")
    if not 0.0 <= settings.get("beta", 1.0) <= 1.0:
        reader.fail(values["beta"], "beta", f"must be in [0, 1], got {settings['beta']}")
    return settings


def parse_recipe(text: str, name: str) -> Recipe:
    """A recipe from YAML text; `name` (the file) prefixes every error, with the line and the key."""
    try:
        document = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{name}:{mark.line + 1}" if mark is not None else name
        raise UsageError(f"{where}: not valid YAML ({getattr(exc, 'problem', None) or exc})") from exc
    if document is None:
        raise UsageError(f"{name}: empty recipe (it needs at least `adapters:`)")
    reader = _Reader(name)
    values = reader.mapping(document, "", RECIPE_KEYS)
    if "adapters" not in values:
        reader.fail(document, "adapters", "missing (list two or more adapters, each with a `source:`)")
    return Recipe(adapters=_adapters(reader, values["adapters"]), **_settings(reader, values))


def load_recipe(path: Path) -> Recipe:
    """A recipe from a YAML file."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise UsageError(f"{path}: cannot read the recipe ({reason})") from exc
    return parse_recipe(text, str(path))


def build_recipe(config: Path | None, given: dict[str, Any]) -> Recipe:
    """The recipe of a merge: the file's (or the defaults), overridden by the flags the user gave.

    `given` holds recipe fields plus `sources` (replace the adapters) and `weights` (one per adapter);
    `params` are merged key by key."""
    recipe = load_recipe(config) if config is not None else DEFAULTS
    settings = dict(given)
    adapters = recipe.adapters
    if "sources" in settings:
        adapters = tuple(AdapterEntry(source) for source in settings.pop("sources"))
    if "weights" in settings:
        weights = settings.pop("weights")
        if len(weights) != len(adapters):
            raise UsageError(f"--weights has {len(weights)} values but there are {len(adapters)} adapters")
        adapters = tuple(replace(entry, weight=w) for entry, w in zip(adapters, weights, strict=True))
    settings["params"] = {**recipe.params, **settings.get("params", {})}
    recipe = replace(recipe, adapters=adapters, **settings)
    if not recipe.adapters:
        raise UsageError("no adapters: give two or more adapter folders or Hub repos, or --config RECIPE")
    return recipe


def recipe_data(recipe: Recipe) -> dict[str, Any]:
    """The recipe as plain data in schema order (revision only where there is one)."""
    data = {key: getattr(recipe, key) for key in RECIPE_KEYS}
    data["adapters"] = [
        {"source": a.source, **({"revision": a.revision} if a.revision else {}), "weight": a.weight}
        for a in recipe.adapters
    ]
    data["params"] = dict(recipe.params)
    return data


def dump_recipe(recipe: Recipe) -> str:
    """The recipe as YAML that `ctm merge --config` reads back to the same recipe."""
    header = (
        f"# Written by ctm {__version__}. `ctm merge --config recipe.yaml -o OUTPUT` repeats this merge:\n"
        "# Hub inputs are pinned to the commit they were read at; local paths are relative to where ctm ran.\n"
    )
    return header + yaml.safe_dump(recipe_data(recipe), sort_keys=False, allow_unicode=True)
