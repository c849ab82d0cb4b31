"""The recipe of a merge: one schema for every setting (`Recipe`, whose fields say how each is given on the
command line and which values it takes), read from YAML with errors that name the file, line and key, with
the flags a user typed on top, checked, and dumped back.

The command line's options (`ctm merge --rank ...`) are built from the same fields (cli.py), so a setting is
declared once, here.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from ctm_cli import __version__
from ctm_cli.deferred_import import deferred_module
from ctm_cli.errors import UsageError
from ctm_cli.patterns import pattern_problem
from ctm_cli.untrusted import TooLargeError, read_limited

if TYPE_CHECKING:
    import yaml
    from yaml.nodes import Node
else:
    yaml = deferred_module("yaml")  # imported when a recipe is read or written, not by `ctm merge` without --config

ADAPTER_KEYS = ("source", "weight", "revision")
_YAML_TAG = "tag:yaml.org,2002:"
_STRING_TAG = _YAML_TAG + "str"
_NULL_TAG = _YAML_TAG + "null"
# The YAML tags a recipe may hold (what plain YAML resolves to); any other (`!!python/name:...`, `!!binary`, a
# local `!tag`) is refused by name.
_ALLOWED_TAGS = {
    _YAML_TAG + name for name in ("str", "int", "float", "bool", "null", "map", "seq", "timestamp", "merge")
}
RECIPE_LIMIT = 16 * 1024**2  # bytes read of a recipe at most: a recipe is small; /dev/zero is not a recipe
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch's generator takes
DTYPE_NAMES = ("float32", "float16", "bfloat16")  # what --dtype writes
EXTRA_TENSOR_POLICIES = ("drop", "first", "mean")  # what --modules-to-save does with non-LoRA tensors
OUTPUT_FORMATS = ("auto", "peft", "kohya", "diffusers")  # what --format writes (ctm_cli/formats)
RANK_AUTO = "auto"  # --rank auto: the smallest rank keeping --keep of the full-rank merge
DEFAULT_KEEP = 0.95  # what --rank auto keeps unless --keep says


@dataclass(frozen=True)
class Setting:
    """How a recipe field is given on the command line (`flags`, none for the fields with a form of their own:
    adapters, params), what it means, and which values it takes (`choices`, or `check` giving the problem with a
    value). A value of None (the YAML `null`) always stands for the default behaviour."""

    help: str
    flags: tuple[str, ...] = ()
    metavar: str | None = None
    choices: tuple[str, ...] = ()
    check: Callable[[Any], str | None] | None = None
    parser: Callable[[str], Any] | None = None  # the option's value from its text, for a type typer cannot read

    def problem(self, value: Any) -> str | None:
        """What is wrong with `value`, or None."""
        if value is None:
            return None
        if self.choices and value not in self.choices:
            return f"{value!r} is not one of: {', '.join(self.choices)}"
        return self.check(value) if self.check is not None else None


def setting(default: Any, help: str, *flags: str, **options: Any) -> Any:
    """A field of `Recipe`: its default and its `Setting` (help, flags, and metavar, choices or check)."""
    return dataclasses.field(default=default, metadata={"setting": Setting(help, flags, **options)})


def _rank_problem(rank: int | str) -> str | None:
    if rank == RANK_AUTO or (isinstance(rank, int) and rank >= 0):
        return None
    return f"must be 0 (full rank: core, knots) or positive (or {RANK_AUTO}), got {rank}"


def parse_rank(text: str | int) -> int | str:
    """`--rank` as typed: an integer, or `auto` (anything else raises ValueError, which the parser reports; the
    default arrives as a number)."""
    if isinstance(text, int):
        return text
    if text.strip() == RANK_AUTO:
        return RANK_AUTO
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"expected an integer or {RANK_AUTO}, got {text!r}") from None


def _keep_problem(keep: float) -> str | None:
    return None if 0.0 < keep <= 1.0 else f"must be a share in (0, 1], got {keep}"


def _beta_problem(beta: float) -> str | None:
    return None if 0.0 <= beta <= 1.0 else f"must be in [0, 1], got {beta}"


def _seed_problem(seed: int) -> str | None:
    return None if SEED_RANGE[0] <= seed <= SEED_RANGE[1] else f"must be from -2**63 to 2**64-1, got {seed}"


def _name_problem(name: str) -> str | None:
    return None if name.strip() else f"needs a model name or path, got {name!r}"


@dataclass(frozen=True)
class AdapterEntry:
    """One input of a recipe: where it comes from and its weight."""

    source: str
    weight: float = 1.0
    revision: str | None = None


@dataclass(frozen=True)
class Recipe:
    """Everything that determines a merge's result; the defaults are `ctm merge`'s defaults."""

    adapters: tuple[AdapterEntry, ...] = setting((), "the inputs: SOURCE arguments, their weights --weights")
    method: str = setting("ctm", "Merge method (see `ctm methods`).", "--method", "-m", metavar="NAME")
    rule: str | None = setting(
        None, "Merging rule (see `ctm methods`; default: the method's own, tsv for ctm).", "--rule", metavar="NAME"
    )
    rank: int | str = setting(
        16,
        "Requested rank of the merged adapter (0 = full rank R: core, knots; cat and robustmerge set their own; "
        "auto: the smallest keeping --keep of the full-rank merge).",
        "--rank",
        "-r",
        metavar="N|auto",
        check=_rank_problem,
        parser=parse_rank,
    )
    keep: float | None = setting(
        None,
        f"With --rank auto: the share of the full-rank merge's energy to keep (default {DEFAULT_KEEP}).",
        "--keep",
        metavar="SHARE",
        check=_keep_problem,
    )
    rank_per_module: bool = setting(
        False, "With --rank auto: choose the rank of each module (written as PEFT's rank_pattern).", "--rank-per-module"
    )
    diagnose: bool = setting(
        False,
        "Also diagnose the inputs in the report (overlap, dominance, conflict, energy kept by rank: as `ctm inspect "
        "A B ...`); reads them a second time. Always on with --rank auto.",
        "--diagnose",
    )
    params: dict[str, float] = dataclasses.field(
        default_factory=dict, metadata={"setting": Setting("rule and method parameters: --param NAME=X, --lambda X")}
    )
    beta: float = setting(1.0, "CtM balancing β in [0, 1] (1 = off, 0 = equal tasks).", "--beta", check=_beta_problem)
    seed: int = setting(0, "Seed for rules that use randomness.", "--seed", check=_seed_problem)
    dtype: str | None = setting(
        None, "Output dtype (float32, float16, bfloat16; default: the inputs').", "--dtype", choices=DTYPE_NAMES
    )
    device: str = setting("auto", "auto, cpu, cuda or cuda:N.", "--device")
    output: str | None = setting(None, "Output folder (or `output:` in the recipe).", "--output", "-o")
    modules_to_save: str | None = setting(
        None,
        "Non-LoRA tensors (heads): drop, first or mean (default: refuse).",
        "--modules-to-save",
        choices=EXTRA_TENSOR_POLICIES,
    )
    allow_missing: bool = setting(
        False,
        "Merge a module some adapters lack as a zero update for them (at a lower rank where it cannot hold --rank).",
        "--allow-missing",
    )
    base_model: str | None = setting(
        None,
        "Base model to record in the output when the inputs name it differently or not at all (then their names "
        "are not compared; module shapes still are).",
        "--base-model",
        metavar="NAME",
        check=_name_problem,
    )
    format: str = setting(
        "auto",
        "Output style: auto (the inputs'), peft, kohya or diffusers (kohya and diffusers: one .safetensors file).",
        "--format",
        choices=OUTPUT_FORMATS,
    )
    module_weights: dict[str, list[float]] = dataclasses.field(
        default_factory=dict,
        metadata={"setting": Setting("per-module weights: a regex of module names -> one weight per adapter")},
    )

    def check(self) -> None:
        """Refuse a value no merge can use, naming its flag (the YAML reader names file, line and key instead)."""
        for name, (_, spec) in SCHEMA.items():
            problem = spec.problem(getattr(self, name)) if spec.flags else None
            if problem:
                raise UsageError(f"{spec.flags[0]} {problem}")
        bad = [entry.weight for entry in self.adapters if not math.isfinite(entry.weight)]
        if bad:
            raise UsageError(f"--weights must be finite numbers, got {bad[0]}")
        if self.rank != RANK_AUTO and (self.keep is not None or self.rank_per_module):
            given = "--keep" if self.keep is not None else "--rank-per-module"
            raise UsageError(f"{given} applies only with --rank auto (got --rank {self.rank})")
        if self.adapters and not any(entry.weight for entry in self.adapters):
            raise UsageError("--weights are all zero: the merged adapter would change nothing; give some a weight")


# Every field: (its type, its Setting), in the schema's order.
_HINTS = typing.get_type_hints(Recipe)
SCHEMA: dict[str, tuple[Any, Setting]] = {
    field.name: (_HINTS[field.name], field.metadata["setting"]) for field in dataclasses.fields(Recipe)
}
RECIPE_KEYS = tuple(SCHEMA)
DEFAULTS = Recipe()


class _Reader:
    """Reads values out of a composed YAML document; every error names the file, the line and the key."""

    def __init__(self, name: str):
        self.name = name
        self._constructor = yaml.constructor.SafeConstructor()

    def fail(self, node: Node, key: str, problem: str) -> NoReturn:
        raise UsageError(f"{self.name}:{node.start_mark.line + 1}: {key}: {problem}")

    def mapping(self, node: Node, key: str, allowed: tuple[str, ...] | None) -> dict[str, Node]:
        """The entries of a mapping node by key, refusing unknown and repeated keys."""
        if not isinstance(node, yaml.MappingNode):
            self.fail(node, key, f"expected a mapping, got {_describe(node)}")
        entries: dict[str, Node] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag != _STRING_TAG:
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
        if not isinstance(node, yaml.ScalarNode) or node.tag == _NULL_TAG or node.value == "":
            self.fail(node, key, f"expected text, got {_describe(node)}")
        if "\x00" in node.value:  # no path or name holds one; the OS would refuse it later
            self.fail(node, key, "contains a NUL character")
        return node.value

    def optional_text(self, node: Node, key: str) -> str | None:
        """Text, or None for `null`."""
        return None if isinstance(node, yaml.ScalarNode) and node.tag == _NULL_TAG else self.text(node, key)

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

    def optional_number(self, node: Node, key: str) -> float | None:
        """A finite number, or None for `null`."""
        return None if isinstance(node, yaml.ScalarNode) and node.tag == _NULL_TAG else self.number(node, key)

    def rank(self, node: Node, key: str) -> int | str:
        """An integer, or the word `auto`."""
        if isinstance(node, yaml.ScalarNode) and node.tag == _STRING_TAG and node.value == RANK_AUTO:
            return RANK_AUTO
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

    def weight_map(self, node: Node, key: str) -> dict[str, list[float]]:
        """A mapping of regular expressions (checked by `patterns.pattern_problem`) to lists of finite numbers."""
        weights = {}
        for pattern, value in self.mapping(node, key, None).items():
            problem = pattern_problem(pattern)
            if problem:
                self.fail(value, f"{key}.{pattern}", f"pattern refused: {problem}")
            if not isinstance(value, yaml.SequenceNode):
                self.fail(value, f"{key}.{pattern}", f"expected one weight per adapter, got {_describe(value)}")
            weights[pattern] = [self.number(item, f"{key}.{pattern}") for item in value.value]
        return weights

    def _scalar(self, node: Node) -> Any:
        """The scalar's value, or None for anything that is not a well-formed scalar (`!!int abc`)."""
        if not isinstance(node, yaml.ScalarNode):
            return None
        try:
            return self._constructor.construct_object(node, deep=True)
        except (yaml.YAMLError, ValueError, TypeError, OverflowError):
            return None

    def refuse_odd_tags(self, document: Node) -> None:
        """Refuse, by line and name, any YAML tag beyond plain YAML's (every node visited once, aliases too)."""
        pending, seen = [document], set()
        while pending:
            node = pending.pop()
            if id(node) in seen:
                continue
            seen.add(id(node))
            if node.tag not in _ALLOWED_TAGS:
                tag = "!!" + node.tag.removeprefix(_YAML_TAG) if node.tag.startswith(_YAML_TAG) else node.tag
                raise UsageError(f"{self.name}:{node.start_mark.line + 1}: YAML tag {tag} is not allowed in a recipe")
            if isinstance(node, yaml.MappingNode):
                pending.extend(item for pair in node.value for item in pair)
            elif isinstance(node, yaml.SequenceNode):
                pending.extend(node.value)


def _describe(node: Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    return "null" if node.tag == _NULL_TAG else repr(node.value)


def _adapters(reader: _Reader, node: Node) -> tuple[AdapterEntry, ...]:
    if not isinstance(node, yaml.SequenceNode):
        reader.fail(node, "adapters", f"expected a list of adapters, got {_describe(node)}")
    if len(node.value) < 2:
        reader.fail(node, "adapters", f"a merge needs at least two adapters, got {len(node.value)}")
    entries = []
    for index, item in enumerate(node.value):
        key = f"adapters[{index}]"
        if isinstance(item, yaml.ScalarNode) and item.tag == _STRING_TAG:  # `- path`: shorthand for `- source: path`
            entries.append(AdapterEntry(source=reader.text(item, f"{key}.source")))
            continue
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


# The reader of each setting's type.
_READERS: dict[Any, Callable[[_Reader, Node, str], Any]] = {
    str: _Reader.text,
    str | None: _Reader.optional_text,
    float | None: _Reader.optional_number,
    int | str: _Reader.rank,
    int: _Reader.integer,
    float: _Reader.number,
    bool: _Reader.boolean,
    dict[str, list[float]]: _Reader.weight_map,
}


def _settings(reader: _Reader, values: dict[str, Node]) -> dict[str, Any]:
    """The recipe's settings (all keys but `adapters`), each read by its type and checked by its Setting."""
    settings: dict[str, Any] = {}
    for name, node in values.items():
        kind, spec = SCHEMA[name]
        if name == "adapters":
            continue
        if name == "params":
            params = reader.mapping(node, "params", None)
            settings["params"] = {key: reader.number(value, f"params.{key}") for key, value in params.items()}
            continue
        value = _READERS[kind](reader, node, name)
        problem = spec.problem(value)
        if problem:
            reader.fail(node, name, problem)
        settings[name] = value
    return settings


def parse_recipe(text: str, name: str) -> Recipe:
    """A recipe from YAML text; `name` (the file) prefixes every error, with the line and the key."""
    try:
        document = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{name}:{mark.line + 1}" if mark is not None else name
        raise UsageError(f"{where}: not valid YAML ({getattr(exc, 'problem', None) or exc})") from exc
    except RecursionError as exc:
        raise UsageError(f"{name}: not a recipe (lists or mappings nested too deeply)") from exc
    if document is None:
        raise UsageError(f"{name}: empty recipe (it needs at least `adapters:`)")
    reader = _Reader(name)
    reader.refuse_odd_tags(document)
    values = reader.mapping(document, "", RECIPE_KEYS)
    if "adapters" not in values:
        reader.fail(document, "adapters", "missing (list two or more adapters, each with a `source:`)")
    return Recipe(adapters=_adapters(reader, values["adapters"]), **_settings(reader, values))


def load_recipe(path: Path) -> Recipe:
    """A recipe from a YAML file."""
    try:
        text = read_limited(path, RECIPE_LIMIT).decode("utf-8")
    except (OSError, UnicodeDecodeError, TooLargeError) as exc:
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


def parse_weights(text: str) -> list[float]:
    """`--weights` as typed: comma-separated numbers, one per adapter."""
    try:
        return [float(part) for part in text.split(",")]
    except ValueError as exc:
        raise UsageError(f"--weights expects comma-separated numbers, got {text!r}") from exc


def parse_params(items: list[str]) -> dict[str, float]:
    """`--param NAME=NUMBER` values as typed (repeatable), by name."""
    params = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            params[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise UsageError(f"--param expects NAME=NUMBER, got {item!r}")
    return params


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
