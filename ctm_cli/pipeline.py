"""One merge from request to written folder: sources → adapters → plan → engine → writer."""

from __future__ import annotations

import json
import math
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ctm_cli import __version__
from ctm_cli.adapter import MODEL_PREFIX, Adapter
from ctm_cli.engine import DEFAULT_MAX_MEMORY, merge_modules, plan_groups, resolve_device
from ctm_cli.errors import UsageError
from ctm_cli.extra_tensors import keep_extra_tensors
from ctm_cli.methods import MergeSettings, get_method
from ctm_cli.report import build_report, describe_input, render_markdown
from ctm_cli.rules import get_rule
from ctm_cli.sources import resolve_source
from ctm_cli.validate import check_compatible, check_rank, missing_modules
from ctm_cli.writer import check_output, write_adapter

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Config fields that describe one adapter's training and no longer hold for the merge.
_RESET_FIELDS = {"use_rslora": False, "inference_mode": True}
# Config fields that narrow down which of the target modules PEFT wraps.
_LAYER_FIELDS = ("layers_to_transform", "layers_pattern", "exclude_modules")


@dataclass
class MergeRequest:
    """Everything a merge needs, as given on the command line or in a recipe."""

    sources: list[str]
    output: Path
    rank: int = 16
    method: str = "ctm"
    rule: str = "ta"
    rule_params: dict[str, float] = field(default_factory=dict)
    weights: list[float] | None = None
    beta: float = 1.0
    device: str = "auto"
    dtype: str | None = None
    seed: int = 0
    max_memory: int = DEFAULT_MAX_MEMORY
    force: bool = False
    modules_to_save: str | None = None
    allow_missing: bool = False


def _check_weights(weights: list[float] | None, count: int) -> list[float]:
    if weights is None:
        return [1.0] * count
    if len(weights) != count:
        raise UsageError(f"--weights has {len(weights)} values but there are {count} adapters")
    bad = [w for w in weights if not math.isfinite(w)]
    if bad:
        raise UsageError(f"--weights must be finite numbers, got {bad[0]}")
    return weights


def _output_dtype(adapters: list[Adapter], requested: str | None) -> torch.dtype:
    if requested is not None:
        if requested not in DTYPES:
            raise UsageError(f"--dtype {requested!r} is not one of: {', '.join(DTYPES)}")
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


def output_config(adapters: list[Adapter], ranks: dict[str, int], modules_to_save: list[str] | None) -> dict[str, Any]:
    """The merged adapter's config: the first input's fields, with the written ranks, scale 1 everywhere
    (alpha = r, per module through rank/alpha patterns where a module's rank differs), targets that wrap
    exactly the merged modules, and the `modules_to_save` of the kept non-LoRA tensors."""
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
    return config


def run_merge(request: MergeRequest, on_start: Callable[[int], None], on_progress: Callable[[int], None]) -> dict:
    """Run one merge end to end and return its report; nothing is written unless it all succeeds."""
    started = time.perf_counter()
    method, rule = get_method(request.method), get_rule(request.rule)
    rule_params = rule.resolve(request.rule_params)
    if method.needs_linear_rule and not rule.linear:
        raise UsageError(f"method {method.name} needs a linear rule (ta, mean); {rule.name} is not")
    if not 0.0 <= request.beta <= 1.0:
        raise UsageError(f"--beta must be in [0, 1], got {request.beta}")
    check_output(request.output, request.force)
    adapters = [Adapter(resolve_source(source), source) for source in request.sources]
    specs = check_compatible(adapters, request.allow_missing)
    kept = keep_extra_tensors(adapters, request.modules_to_save)
    weights = _check_weights(request.weights, len(adapters))
    check_rank(specs, request.rank, method.writes_total_rank)
    device = resolve_device(request.device)
    output_dtype = _output_dtype(adapters, request.dtype)
    settings = MergeSettings(
        rank=request.rank,
        rule=rule,
        rule_params=rule_params,
        weights=torch.tensor(weights, dtype=torch.float64),
        beta=request.beta,
        generator=torch.Generator().manual_seed(request.seed),
    )
    on_start(len(specs))
    merged = merge_modules(
        adapters, plan_groups(specs, request.max_memory), method, settings, device, output_dtype, on_progress
    )
    config = output_config(adapters, {s.name: s.output_rank for s in merged.stats}, kept.modules_to_save)
    report_settings = {
        "method": method.name,
        "rule": rule.name,
        "rule_params": rule_params,
        "rank": config["r"],
        "beta": request.beta,
        "weights": weights,
        "seed": request.seed,
        "device": str(device),
        "dtype": str(output_dtype).removeprefix("torch."),
    }
    inputs = [describe_input(a, w) for a, w in zip(adapters, weights, strict=True)]
    for item, missing in zip(inputs, missing_modules(adapters, specs), strict=True):
        item["missing_modules"] = missing
    report = build_report(inputs, report_settings, merged.stats, time.perf_counter() - started)
    report["extra_tensors"] = kept.report
    metadata = {
        "format": "pt",
        "ctm_version": __version__,
        "ctm_settings": json.dumps(report_settings, sort_keys=True),
        "ctm_inputs": json.dumps([{"source": i["source"], "sha256": i["sha256"]} for i in inputs]),
    }
    write_adapter(
        request.output,
        merged.tensors | kept.tensors,
        config,
        metadata,
        {
            "merge_report.json": json.dumps(report, indent=2) + "\n",
            "merge_report.md": render_markdown(report),
        },
        request.force,
    )
    return report
