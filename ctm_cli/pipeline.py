"""One merge from request to written folder: sources → adapters → plan → engine → writer."""

from __future__ import annotations

import json
import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ctm_cli import __version__, progress
from ctm_cli.adapter import Adapter
from ctm_cli.base_model import BaseModel, resolve_base_model
from ctm_cli.devices import check_device
from ctm_cli.errors import UsageError
from ctm_cli.extra_tensors import KeptTensors, keep_extra_tensors
from ctm_cli.formats import adapter_files, align_names, output_style
from ctm_cli.interrupts import output_written
from ctm_cli.methods import METHODS, MergeSettings, Method, get_method, resolve_settings
from ctm_cli.module_spec import ModuleSpec
from ctm_cli.module_weights import apply_module_weights
from ctm_cli.params import Params
from ctm_cli.peft_layout import MODEL_PREFIX
from ctm_cli.plan import (
    CoreNumbers,
    default_max_memory,
    describe_plan,
    method_core_numbers,
    plan_waves,
    stored_itemsize,
)
from ctm_cli.publish import check_push_target, push_folder
from ctm_cli.recipe import DEFAULT_KEEP, DEFAULTS, RANK_AUTO, AdapterEntry, Recipe, dump_recipe, recipe_data
from ctm_cli.report import build_report, describe_input, render_markdown
from ctm_cli.rules import Rule, get_rule
from ctm_cli.safetensors_format import torch_dtype
from ctm_cli.sources import ResolvedSource, locate_source
from ctm_cli.validate import check_compatible, missing_modules, repeated_inputs
from ctm_cli.writer import check_apart, check_output, write_adapter

if TYPE_CHECKING:  # --rank auto and --diagnose import these when they run: the dry run starts faster
    from ctm_cli.auto_rank import RankChoice
    from ctm_cli.diagnosis import GroupDiagnosis

# Threads hashing the inputs for the report while the merge runs.
HASHING_THREADS = 8
# Config fields that describe one adapter's training and no longer hold for the merge.
_RESET_FIELDS = {"use_rslora": False, "inference_mode": True}
# Config fields that narrow down which of the target modules PEFT wraps.
_LAYER_FIELDS = ("layers_to_transform", "layers_pattern", "exclude_modules")
# PEFT task types whose model class adds the task's head to modules_to_save and loads it from the adapter.
_HEAD_TASKS = ("SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS")


@dataclass(frozen=True)
class MergeRequest:
    """A merge as asked: the recipe (what to merge, and how), and how to run it."""

    recipe: Recipe
    max_memory_mib: int | None = None  # working memory per wave; None: plan.default_max_memory(device)
    force: bool = False  # replace an existing output folder
    push_to_hub: str | None = None  # upload the output to this Hub repo
    private: bool = False  # create that repo as private


@dataclass(frozen=True)
class PreparedMerge:
    """A merge after every check that needs no math: settings resolved, sources located, adapters read and checked
    together, modules planned in waves. What `plan_merge` describes and `run_merge` carries out."""

    request: MergeRequest
    output: Path
    method: Method
    rule: Rule[Any]
    method_params: Params
    rule_params: Params
    sources: list[ResolvedSource]
    adapters: list[Adapter]
    specs: list[ModuleSpec]
    kept: KeptTensors
    core_numbers: CoreNumbers  # the method's core-space memory per module, for the plan
    rank_caps: dict[str, int]  # with --allow-missing: modules some inputs lack, written at the rank they can hold
    waves: list[list[list[ModuleSpec]]]
    device: str  # checked by `devices.check_device`: cpu, cuda or cuda:N
    output_dtype: str  # float32, float16, bfloat16, ...
    base_model: BaseModel
    task_type: str | None  # what the output config says: the inputs' task, or None where its head was left out
    warnings: list[str]
    output_style: str  # what --format writes: peft, kohya or diffusers (ctm_cli/formats)
    module_weights: dict[str, Any]  # each module_weights pattern: its weights and how many modules it weighted
    started: float  # time.perf_counter() when preparing began: the report's `seconds` count from there
    diagnosis: list[GroupDiagnosis] | None = None  # the inputs' diagnosis, once made (`diagnose_inputs`)
    rank_choice: RankChoice | None = None  # with --rank auto, once the ranks are chosen (`choose_auto_ranks`)

    @property
    def requested_rank(self) -> int | str:
        """The rank asked for (`--rank`, the recipe's `rank`: a number or `auto`)."""
        return self.request.recipe.rank

    @property
    def weights(self) -> list[float]:
        """Each input's weight."""
        return [entry.weight for entry in self.request.recipe.adapters]

    def written_ranks(self) -> dict[str, int]:
        """The rank each module is written with: the requested one (with --rank auto, the chosen one; with
        --allow-missing, at most what a module that some inputs lack can hold), or the method's own (cat: R, ...)."""
        chosen = self.rank_choice.ranks if self.rank_choice is not None else {}
        return {
            spec.name: self.method.output_rank(
                chosen[spec.name] if chosen else self.rank_caps.get(spec.name, int(self.requested_rank)), spec.ranks
            )
            for spec in self.specs
        }

    def settings(self) -> dict[str, Any]:
        """The resolved settings as the report and the plan show them."""
        recipe = self.request.recipe
        return {
            "method": self.method.name,
            "rule": self.rule.name,
            "method_params": dict(self.method_params),
            "rule_params": dict(self.rule_params),
            "requested_rank": self.requested_rank,
            "written_rank": adapter_rank(self.written_ranks()),
            "beta": recipe.beta,
            "weights": self.weights,
            "seed": recipe.seed,
            "device": self.device,
            "dtype": self.output_dtype,
            "base_model": self.base_model.name,
            "base_model_overridden": self.base_model.overridden,
            "format": self.output_style,
            "module_weights": self.module_weights,
        }

    def recipe(self) -> Recipe:
        """The recipe that repeats this merge exactly: resolved settings, Hub inputs pinned to their commits."""
        recipe = self.request.recipe
        return replace(
            recipe,
            adapters=tuple(
                AdapterEntry(source.name, weight, source.commit)
                for source, weight in zip(self.sources, self.weights, strict=True)
            ),
            rule=self.rule.name,
            params={**self.method_params, **self.rule_params},
            dtype=self.output_dtype,
            output=str(self.output),
        )

    def inputs(self) -> list[dict[str, Any]]:
        """Each input as the report describes it; the files are hashed on several threads (hashlib lets go of
        the GIL), since one thread hashing them in turn can outlast a GPU merge."""
        from concurrent.futures import ThreadPoolExecutor  # imported when the inputs are hashed

        missing = missing_modules(self.adapters, self.specs)
        with ThreadPoolExecutor(max_workers=min(HASHING_THREADS, max(1, len(self.adapters)))) as pool:
            described = pool.map(describe_input, self.adapters, self.weights, [s.commit for s in self.sources])
            return [{**entry, "missing_modules": lacking} for entry, lacking in zip(described, missing, strict=True)]


def adapter_rank(ranks: dict[str, int]) -> int:
    """The `r` of an adapter whose modules have these ranks: the most common one (the others go in rank_pattern)."""
    return Counter(ranks.values()).most_common(1)[0][0]


def _output_path(output: str | None) -> Path:
    if output is None:
        raise UsageError("no output folder: give -o/--output, or `output:` in the recipe")
    if output == "":
        raise UsageError("the output folder is an empty name (-o \"\" or `output: \"\"`: an unset variable?)")
    return Path(output)


def _check_run_options(request: MergeRequest) -> None:
    if request.private and request.push_to_hub is None:
        raise UsageError("--private only applies with --push-to-hub")
    if request.max_memory_mib is not None and request.max_memory_mib <= 0:
        raise UsageError(f"--max-memory must be a positive number of MiB, got {request.max_memory_mib}")


def _output_dtype(adapters: list[Adapter], requested: str | None) -> str:
    if requested is not None:
        return requested
    found = set().union(*(a.dtypes() for a in adapters))
    return found.pop() if len(found) == 1 else "float32"


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
        isinstance(targets, list)
        and all(isinstance(t, list) and sorted(t) == sorted(targets) for t in lists)
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
    rank = adapter_rank(ranks)
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


def _capped(rank_caps: dict[str, int], rank: int | str) -> list[str]:
    """The warning that modules some inputs lack are written below the requested rank, naming the first ones."""
    if not rank_caps:
        return []
    names = sorted(rank_caps)
    shown = ", ".join(f"{name} (rank {rank_caps[name]})" for name in names[:3])
    more = f" and {len(names) - 3} more" if len(names) > 3 else ""
    return [
        f"{len(names)} module(s) that some inputs lack cannot hold rank {rank}: written at the most they hold, "
        f"{shown}{more} (rank_pattern in the config)"
    ]


def prepare(request: MergeRequest) -> PreparedMerge:
    """Check a request and everything it names, without merging: the settings, the sources (resolved, Hub ones
    downloaded), the adapters (read, and checked to fit together), the output; then plan the modules in waves."""
    started = time.perf_counter()
    recipe = request.recipe
    _check_run_options(request)
    output = _output_path(recipe.output)
    recipe.check()
    method = get_method(recipe.method)
    rule = get_rule(recipe.rule or method.default_rule)
    method_params, rule_params = resolve_settings(method, rule, recipe.params)
    if recipe.beta != DEFAULTS.beta and not method.uses_beta:
        users = ", ".join(sorted(name for name, other in METHODS.items() if other.uses_beta))
        raise UsageError(
            f"--beta {recipe.beta} has no effect with method {method.name} (β acts on: {users}); leave it at 1"
        )
    device = check_device(recipe.device)
    check_output(output, request.force)
    if request.push_to_hub is not None:
        check_push_target(request.push_to_hub)
    sources = [locate_source(entry.source, entry.revision) for entry in recipe.adapters]
    check_apart(output, [(source.source, source.folder) for source in sources])
    adapters = [Adapter(source.folder, source.source) for source in sources]
    align_names(adapters)
    style = output_style(recipe.format, adapters)
    module_weights = apply_module_weights(adapters, recipe.module_weights)
    base_model = resolve_base_model(adapters, recipe.base_model)
    specs = check_compatible(adapters, recipe.allow_missing)
    kept = keep_extra_tensors(adapters, recipe.modules_to_save)
    task_type, task_warnings = _task_type(adapters, kept)
    if recipe.rank == RANK_AUTO:
        from ctm_cli.auto_rank import check_auto_rank

        check_auto_rank(method, rule, method_params)
        rank_caps: dict[str, int] = {}
    else:
        rank_caps = method.rank_caps(specs, int(recipe.rank), rule) if recipe.allow_missing else {}
        method.check_rank([spec for spec in specs if spec.name not in rank_caps], int(recipe.rank), rule)
    planned_rank = int(recipe.rank) if recipe.rank != RANK_AUTO else max(spec.total_rank for spec in specs)
    core_numbers = method_core_numbers(method, rule, planned_rank, method_params, stored_itemsize(adapters))
    budget = default_max_memory(device) if request.max_memory_mib is None else request.max_memory_mib * 1024**2
    return PreparedMerge(
        request=request,
        output=output,
        method=method,
        rule=rule,
        method_params=method_params,
        rule_params=rule_params,
        sources=sources,
        adapters=adapters,
        specs=specs,
        kept=kept,
        core_numbers=core_numbers,
        rank_caps=rank_caps,
        waves=plan_waves(specs, budget, core_numbers),
        device=device,
        output_dtype=_output_dtype(adapters, recipe.dtype),
        base_model=base_model,
        task_type=task_type,
        warnings=[
            *repeated_inputs(adapters), *_capped(rank_caps, recipe.rank), *base_model.warnings, *task_warnings
        ],
        output_style=style,
        module_weights=module_weights,
        started=started,
    )


def diagnose_inputs(prepared: PreparedMerge) -> PreparedMerge:
    """The merge with the inputs' diagnosis (its rule, weights, β and frame; seeded by the recipe), read from the
    inputs a group at a time on the merge's device."""
    from ctm_cli.diagnosis import diagnose_groups, merge_curves
    from ctm_cli.engine import read_groups

    if prepared.diagnosis is not None:
        return prepared
    recipe = prepared.request.recipe
    curves = merge_curves(prepared.method, prepared.rule, prepared.rule_params, prepared.method_params)
    frame_rank = int(dict(prepared.method_params).get("frame_rank", 0))
    if frame_rank and recipe.rank != RANK_AUTO:
        frame_rank = max(int(recipe.rank), frame_rank)  # ctm's frame: r' clamped to at least r
    groups = read_groups(prepared.adapters, prepared.waves, torch.device(prepared.device))
    weights = torch.tensor(prepared.weights, dtype=torch.float64)
    diagnosis = diagnose_groups(groups, curves, weights, frame_rank, recipe.beta, recipe.seed)
    return replace(prepared, diagnosis=diagnosis)


def choose_auto_ranks(prepared: PreparedMerge) -> PreparedMerge:
    """With --rank auto: the merge with its ranks chosen from the diagnosis (each no larger than its module
    allows) and its modules planned again, in groups of one rank; otherwise the merge as it is."""
    recipe = prepared.request.recipe
    if recipe.rank != RANK_AUTO or prepared.rank_choice is not None:
        return prepared
    from ctm_cli.auto_rank import choose_ranks

    prepared = diagnose_inputs(prepared)
    assert prepared.diagnosis is not None
    choice = choose_ranks(prepared.diagnosis, recipe.keep or DEFAULT_KEEP, recipe.rank_per_module)
    limit = prepared.method.rank_limit.function
    limits = {s.name: limit(s.total_rank, s.out_features, s.in_features, prepared.rule) for s in prepared.specs}
    choice = replace(choice, ranks={name: min(rank, limits[name]) for name, rank in choice.ranks.items()})
    budget = prepared.request.max_memory_mib
    memory = default_max_memory(prepared.device) if budget is None else budget * 1024**2
    waves = plan_waves(prepared.specs, memory, prepared.core_numbers, choice.ranks)
    return replace(prepared, rank_choice=choice, waves=waves)


def plan_merge(prepared: PreparedMerge) -> dict:
    """What `run_merge` would do, for --dry-run: every check has run, nothing is merged or written (with --rank
    auto, the inputs are read to choose the ranks)."""
    prepared = choose_auto_ranks(prepared)
    plan = describe_plan(
        prepared.adapters,
        prepared.specs,
        prepared.waves,
        prepared.written_ranks(),
        prepared.output_dtype,
        prepared.core_numbers,
    )
    return {
        "dry_run": True,
        "output": str(prepared.output),
        "push_to_hub": prepared.request.push_to_hub,
        "settings": prepared.settings(),
        "inputs": prepared.inputs(),
        "recipe": recipe_data(prepared.recipe()),
        "warnings": prepared.warnings,
        **({"rank_choice": prepared.rank_choice.report()} if prepared.rank_choice is not None else {}),
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


def run_merge(prepared: PreparedMerge) -> dict:
    """Carry out a prepared merge and return its report; nothing is written unless it all succeeds. Its stages
    are told to `progress`'s listeners."""
    from ctm_cli.diagnosis import diagnosis_data, full_rank_energies, merge_curves
    from ctm_cli.engine import merge_modules
    from ctm_cli.model_card import loading_class, render_model_card

    prepared = choose_auto_ranks(prepared)
    if prepared.request.recipe.diagnose:
        prepared = diagnose_inputs(prepared)
    request, recipe = prepared.request, prepared.request.recipe
    choice = prepared.rank_choice
    settings = MergeSettings(
        rank=0 if recipe.rank == RANK_AUTO else int(recipe.rank),
        rule=prepared.rule,
        rule_params=prepared.rule_params,
        method_params=prepared.method_params,
        weights=torch.tensor(prepared.weights, dtype=torch.float64),
        beta=recipe.beta,
        generator=torch.Generator().manual_seed(recipe.seed),
    )
    hashed_inputs = _in_background(prepared.inputs)  # the inputs' sha256 for the report, hashed while the merge runs
    merged = merge_modules(
        prepared.adapters,
        prepared.waves,
        prepared.method,
        settings,
        torch.device(prepared.device),
        torch_dtype(prepared.output_dtype),
        prepared.written_ranks(),
    )
    ranks = {s.name: s.written_rank for s in merged.stats}
    decided = {"base_model_name_or_path": prepared.base_model.name, "task_type": prepared.task_type}
    config = output_config(prepared.adapters, ranks, prepared.kept.modules_to_save, decided)
    report_settings = prepared.settings()
    inputs = hashed_inputs()
    repeat = prepared.recipe()
    energies = full_rank_energies(prepared.diagnosis) if prepared.diagnosis is not None else {}
    report = build_report(inputs, report_settings, merged.stats, time.perf_counter() - prepared.started, energies)
    report["recipe"] = recipe_data(repeat)
    report["extra_tensors"] = prepared.kept.report
    report["warnings"] = prepared.warnings
    if prepared.diagnosis is not None:
        report["diagnosis"] = diagnosis_data(
            prepared.diagnosis,
            merge_curves(prepared.method, prepared.rule, prepared.rule_params, prepared.method_params),
            [source.name for source in prepared.sources],
        )
    if choice is not None:
        report["rank_choice"] = choice.report()
    metadata = {
        "format": "pt",
        "ctm_version": __version__,
        "ctm_settings": json.dumps(report_settings, sort_keys=True),
        "ctm_inputs": json.dumps([{"source": i["source"], "sha256": i["sha256"]} for i in inputs]),
    }
    model_id = request.push_to_hub or prepared.output.absolute().name
    tensors = merged.tensors | prepared.kept.tensors
    stem = prepared.output.absolute().name
    progress.emit("writing", 0, 1, detail=str(prepared.output))
    write_adapter(
        prepared.output,
        adapter_files(prepared.output_style, tensors, config, metadata, prepared.adapters, stem),
        {
            "merge_report.json": json.dumps(report, indent=2) + "\n",
            "merge_report.md": render_markdown(report),
            "recipe.yaml": dump_recipe(repeat),
            "README.md": render_model_card(report, model_id, loading_class(prepared.adapters[0].config)),
        },
        request.force,
    )
    progress.emit("writing", 1, 1, detail=str(prepared.output))
    if request.push_to_hub is not None:
        with output_written(prepared.output):
            report["pushed_to"] = push_folder(prepared.output, request.push_to_hub, request.private)
    return report
