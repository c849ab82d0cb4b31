"""One merge from request to written folder: sources → adapters → plan → engine → writer."""

from __future__ import annotations

import json
import math
import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ctm_cli import __version__
from ctm_cli.adapter import MODEL_PREFIX, Adapter
from ctm_cli.base_model import BaseModel, resolve_base_model
from ctm_cli.engine import default_max_memory, merge_modules, method_core_numbers, plan_waves, resolve_device
from ctm_cli.errors import UsageError
from ctm_cli.extra_tensors import KeptTensors, keep_extra_tensors
from ctm_cli.interrupts import output_written
from ctm_cli.methods import MergeSettings, Method, get_method, resolve_settings
from ctm_cli.model_card import loading_class, render_model_card
from ctm_cli.module_spec import ModuleSpec
from ctm_cli.params import Params
from ctm_cli.plan import describe_plan
from ctm_cli.publish import check_push_target, push_folder
from ctm_cli.recipe import DEFAULTS, SEED_RANGE, AdapterEntry, Recipe, dump_recipe, recipe_data
from ctm_cli.report import build_report, describe_input, render_markdown
from ctm_cli.rules import Rule, get_rule
from ctm_cli.sources import ResolvedSource, locate_source
from ctm_cli.validate import check_compatible, missing_modules
from ctm_cli.writer import check_apart, check_output, write_adapter

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Config fields that describe one adapter's training and no longer hold for the merge.
_RESET_FIELDS = {"use_rslora": False, "inference_mode": True}
# Config fields that narrow down which of the target modules PEFT wraps.
_LAYER_FIELDS = ("layers_to_transform", "layers_pattern", "exclude_modules")
# PEFT task types whose model class adds the task's head to modules_to_save and loads it from the adapter.
_HEAD_TASKS = ("SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS")


@dataclass
class MergeRequest:
    """Everything a merge needs, as given on the command line or in a recipe."""

    sources: list[str]
    output: Path
    rank: int = DEFAULTS.rank
    method: str = DEFAULTS.method
    rule: str | None = DEFAULTS.rule  # None: the method's default rule
    rule_params: dict[str, float] = field(default_factory=dict)
    weights: list[float] | None = None
    beta: float = DEFAULTS.beta
    device: str = DEFAULTS.device
    dtype: str | None = DEFAULTS.dtype
    seed: int = DEFAULTS.seed
    max_memory: int | None = None  # bytes per group; None: engine.default_max_memory(device)
    force: bool = False
    revisions: list[str | None] | None = None
    push_to_hub: str | None = None
    private: bool = False
    modules_to_save: str | None = None
    allow_missing: bool = False
    base_model: str | None = None  # recorded as the base model instead of the inputs' (not compared then)

    @classmethod
    def from_recipe(cls, recipe: Recipe, **options: Any) -> MergeRequest:
        """The request for a recipe; `options` are the run options (force, max_memory, push_to_hub, private)."""
        if recipe.output is None:
            raise UsageError("no output folder: give -o/--output, or `output:` in the recipe")
        if recipe.output == "":
            raise UsageError("the output folder is an empty name (-o \"\" or `output: \"\"`: an unset variable?)")
        return cls(
            sources=[a.source for a in recipe.adapters],
            revisions=[a.revision for a in recipe.adapters],
            weights=[a.weight for a in recipe.adapters],
            output=Path(recipe.output),
            rank=recipe.rank,
            method=recipe.method,
            rule=recipe.rule,
            rule_params=dict(recipe.params),
            beta=recipe.beta,
            device=recipe.device,
            dtype=recipe.dtype,
            seed=recipe.seed,
            modules_to_save=recipe.modules_to_save,
            allow_missing=recipe.allow_missing,
            base_model=recipe.base_model,
            **options,
        )


@dataclass(frozen=True)
class _Prepared:
    """A merge after every check that needs no math: sources resolved, adapters read, settings validated."""

    request: MergeRequest
    method: Method
    rule: Rule
    method_params: Params
    rule_params: Params
    sources: list[ResolvedSource]
    adapters: list[Adapter]
    specs: list[ModuleSpec]
    kept: KeptTensors
    waves: list[list[list[ModuleSpec]]]
    weights: list[float]
    device: torch.device
    output_dtype: torch.dtype
    base_model: BaseModel
    task_type: str | None  # what the output config says: the inputs' task, or None where its head was left out
    warnings: list[str]

    def settings(self) -> dict[str, Any]:
        """The resolved settings as the report and the plan show them."""
        return {
            "method": self.method.name,
            "rule": self.rule.name,
            "method_params": dict(self.method_params),
            "rule_params": dict(self.rule_params),
            "rank": self.request.rank,
            "beta": self.request.beta,
            "weights": self.weights,
            "seed": self.request.seed,
            "device": str(self.device),
            "dtype": str(self.output_dtype).removeprefix("torch."),
            "base_model": self.base_model.name,
            "base_model_overridden": self.base_model.overridden,
        }

    def recipe(self) -> Recipe:
        """The recipe that repeats this merge exactly: resolved settings, Hub inputs pinned to their commits."""
        request = self.request
        return Recipe(
            adapters=tuple(
                AdapterEntry(source.name, weight, source.commit)
                for source, weight in zip(self.sources, self.weights, strict=True)
            ),
            method=self.method.name,
            rule=self.rule.name,
            rank=request.rank,
            params={**self.method_params, **self.rule_params},
            beta=request.beta,
            seed=request.seed,
            dtype=str(self.output_dtype).removeprefix("torch."),
            device=request.device,
            output=str(request.output),
            modules_to_save=request.modules_to_save,
            allow_missing=request.allow_missing,
            base_model=request.base_model,
        )

    def inputs(self) -> list[dict[str, Any]]:
        """Each input as the report describes it."""
        missing = missing_modules(self.adapters, self.specs)
        return [
            {**describe_input(adapter, weight, source.commit), "missing_modules": lacking}
            for adapter, weight, source, lacking in zip(self.adapters, self.weights, self.sources, missing, strict=True)
        ]


def _check_weights(weights: list[float] | None, count: int) -> list[float]:
    if weights is None:
        return [1.0] * count
    if len(weights) != count:
        raise UsageError(f"--weights has {len(weights)} values but there are {count} adapters")
    bad = [w for w in weights if not math.isfinite(w)]
    if bad:
        raise UsageError(f"--weights must be finite numbers, got {bad[0]}")
    return weights


def _check_dtype(requested: str | None) -> None:
    if requested is not None and requested not in DTYPES:
        raise UsageError(f"--dtype {requested!r} is not one of: {', '.join(DTYPES)}")


def _output_dtype(adapters: list[Adapter], requested: str | None) -> torch.dtype:
    if requested is not None:
        return DTYPES[requested]
    found = set().union(*(a.dtypes() for a in adapters))
    return found.pop() if len(found) == 1 else torch.float32


def _listed(path: str, targets: list[str]) -> bool:
    """PEFT's rule for a list of target names: the module path itself or a suffix after a dot."""
    return any(path == target or path.endswith(f".{target}") for target in targets)


def _targeting(adapters: list[Adapter], names: list[str]) -> dict[str, Any]:
    """Config fields that make PEFT wrap exactly the merged modules: the inputs' own list of target names when
    they all share it, have exactly these modules and no layer filters, else the explicit list of module paths
    (as when targets are spelled differently, given as regexes, or filtered by layer)."""
    paths = sorted(name.removeprefix(MODEL_PREFIX) for name in names)
    lists = [a.config.get("target_modules") for a in adapters]
    targets = lists[0]
    compact = (
        all(isinstance(t, list) and sorted(t) == sorted(targets) for t in lists)
        and all(set(a.modules) == set(names) for a in adapters)
        and not any(a.config.get(key) for a in adapters for key in _LAYER_FIELDS)
        and all(_listed(path, targets) for path in paths)
    )
    return {"target_modules": targets if compact else paths, **dict.fromkeys(_LAYER_FIELDS)}


def output_config(
    adapters: list[Adapter], ranks: dict[str, int], modules_to_save: list[str] | None, decided: dict[str, Any]
) -> dict[str, Any]:
    """The merged adapter's config: the first input's fields, with the written ranks, scale 1 everywhere
    (alpha = r, per module through rank/alpha patterns where a module's rank differs), targets that wrap
    exactly the merged modules, the `modules_to_save` of the kept non-LoRA tensors, and the `decided`
    fields (base model, task type)."""
    rank = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {re.escape(n.removeprefix(MODEL_PREFIX)): r for n, r in ranks.items() if r != rank}
    config = dict(adapters[0].config)
    config.update(_RESET_FIELDS)
    config.update(_targeting(adapters, sorted(ranks)))
    config.update(
        r=rank,
        lora_alpha=rank,
        rank_pattern=pattern,
        alpha_pattern=dict(pattern),
        modules_to_save=modules_to_save,
        fan_in_fan_out=any(a.config.get("fan_in_fan_out", False) for a in adapters),
    )
    config.update(decided)
    return config


def _task_type(adapters: list[Adapter], kept: KeptTensors) -> tuple[str | None, list[str]]:
    """The task type the output config can carry, and a warning when it cannot keep the inputs': PEFT's
    classification and question-answering models load their head from the adapter, so an adapter without its
    head is written as a plain (task-less) LoRA that PEFT loads onto any model class."""
    task_type = adapters[0].config.get("task_type")
    if task_type not in _HEAD_TASKS or kept.modules_to_save:
        return task_type, []
    return None, [
        f"task_type {task_type} written as null: PEFT loads a {task_type} adapter only with its head, which is "
        "not in the merged adapter; loaded onto a model of that task, it keeps the model's own head"
    ]


def _prepare(request: MergeRequest) -> _Prepared:
    """Validate the settings, resolve and read the sources, check they fit together, group the modules."""
    method = get_method(request.method)
    rule = get_rule(request.rule or method.default_rule)
    method_params, rule_params = resolve_settings(method, rule, request.rule_params)
    if not 0.0 <= request.beta <= 1.0:
        raise UsageError(f"--beta must be in [0, 1], got {request.beta}")
    if request.base_model is not None and not request.base_model.strip():
        raise UsageError("--base-model needs a model name or path, got ''")
    if not SEED_RANGE[0] <= request.seed <= SEED_RANGE[1]:
        raise UsageError(f"--seed must be from -2**63 to 2**64-1, got {request.seed}")
    _check_dtype(request.dtype)
    device = resolve_device(request.device)
    check_output(request.output, request.force)
    if request.push_to_hub is not None:
        check_push_target(request.push_to_hub)
    revisions = request.revisions or [None] * len(request.sources)
    sources = [locate_source(source, revision) for source, revision in zip(request.sources, revisions, strict=True)]
    check_apart(request.output, [(source.source, source.folder) for source in sources])
    adapters = [Adapter(source.folder, source.source) for source in sources]
    base_model = resolve_base_model(adapters, request.base_model)
    specs = check_compatible(adapters, request.allow_missing)
    kept = keep_extra_tensors(adapters, request.modules_to_save)
    task_type, task_warnings = _task_type(adapters, kept)
    weights = _check_weights(request.weights, len(adapters))
    method.check_rank(specs, request.rank, rule)
    max_memory = request.max_memory if request.max_memory is not None else default_max_memory(device)
    return _Prepared(
        request=request,
        method=method,
        rule=rule,
        method_params=method_params,
        rule_params=rule_params,
        sources=sources,
        adapters=adapters,
        specs=specs,
        kept=kept,
        waves=plan_waves(specs, max_memory, method_core_numbers(method, request.rank, method_params)),
        weights=weights,
        device=device,
        output_dtype=_output_dtype(adapters, request.dtype),
        base_model=base_model,
        task_type=task_type,
        warnings=[*base_model.warnings, *task_warnings],
    )


def plan_merge(request: MergeRequest) -> dict:
    """What `run_merge` would do, for --dry-run: every check runs, nothing is merged or written."""
    prepared = _prepare(request)
    plan = describe_plan(
        prepared.adapters[0],
        prepared.specs,
        prepared.waves,
        prepared.method,
        request.rank,
        prepared.output_dtype,
        method_core_numbers(prepared.method, request.rank, prepared.method_params),
    )
    return {
        "dry_run": True,
        "output": str(request.output),
        "push_to_hub": request.push_to_hub,
        "settings": prepared.settings(),
        "inputs": prepared.inputs(),
        "recipe": recipe_data(prepared.recipe()),
        "warnings": prepared.warnings,
        **plan,
    }


def _in_background(function: Callable[[], Any]) -> Callable[[], Any]:
    """Start `function` in a daemon thread (so it never delays an interrupt or exit); the returned callable
    waits for its result or raises its exception."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = function()
        except BaseException as exc:  # handed to the caller
            outcome["error"] = exc

    thread = threading.Thread(target=target, name="ctm-hash", daemon=True)
    thread.start()

    def result() -> Any:
        thread.join()
        if "error" in outcome:
            raise outcome["error"]
        return outcome["value"]

    return result


def run_merge(request: MergeRequest, on_start: Callable[[int], None], on_progress: Callable[[int], None]) -> dict:
    """Run one merge end to end and return its report; nothing is written unless it all succeeds."""
    started = time.perf_counter()
    prepared = _prepare(request)
    settings = MergeSettings(
        rank=request.rank,
        rule=prepared.rule,
        rule_params=prepared.rule_params,
        method_params=prepared.method_params,
        weights=torch.tensor(prepared.weights, dtype=torch.float64),
        beta=request.beta,
        generator=torch.Generator().manual_seed(request.seed),
    )
    on_start(len(prepared.specs))
    hashed_inputs = _in_background(prepared.inputs)  # the inputs' sha256 for the report, hashed while the merge runs
    merged = merge_modules(
        prepared.adapters,
        prepared.waves,
        prepared.method,
        settings,
        prepared.device,
        prepared.output_dtype,
        on_progress,
    )
    ranks = {s.name: s.output_rank for s in merged.stats}
    decided = {"base_model_name_or_path": prepared.base_model.name, "task_type": prepared.task_type}
    config = output_config(prepared.adapters, ranks, prepared.kept.modules_to_save, decided)
    report_settings = {**prepared.settings(), "rank": config["r"]}
    inputs = hashed_inputs()
    recipe = prepared.recipe()
    report = build_report(inputs, report_settings, merged.stats, time.perf_counter() - started)
    report["recipe"] = recipe_data(recipe)
    report["extra_tensors"] = prepared.kept.report
    report["warnings"] = prepared.warnings
    metadata = {
        "format": "pt",
        "ctm_version": __version__,
        "ctm_settings": json.dumps(report_settings, sort_keys=True),
        "ctm_inputs": json.dumps([{"source": i["source"], "sha256": i["sha256"]} for i in inputs]),
    }
    model_id = request.push_to_hub or request.output.absolute().name
    write_adapter(
        request.output,
        merged.tensors | prepared.kept.tensors,
        config,
        metadata,
        {
            "merge_report.json": json.dumps(report, indent=2) + "\n",
            "merge_report.md": render_markdown(report),
            "recipe.yaml": dump_recipe(recipe),
            "README.md": render_model_card(report, model_id, loading_class(prepared.adapters[0].config)),
        },
        request.force,
    )
    if request.push_to_hub is not None:
        with output_written(request.output):
            report["pushed_to"] = push_folder(request.output, request.push_to_hub, request.private)
    return report
