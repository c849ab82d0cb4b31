"""`ctm inspect a/ b/ …`: how two or more adapters of one base model would merge, before merging (the figures of
diagnosis.py for ctm's default merge, and merge-then-compress with task arithmetic), as plain data."""

from __future__ import annotations

from typing import Any

import torch

from ctm_cli.adapter import Adapter
from ctm_cli.base_model import resolve_base_model
from ctm_cli.diagnosis import diagnose_groups, diagnosis_data, merge_curves
from ctm_cli.engine import read_groups
from ctm_cli.methods import get_method, resolve_settings
from ctm_cli.plan import CPU_MAX_MEMORY, plan_waves
from ctm_cli.rules import get_rule
from ctm_cli.sources import locate_source
from ctm_cli.validate import check_compatible


def inspect_adapters(sources: list[str]) -> dict[str, Any]:
    """The diagnosis of the adapters at `sources` (folders or Hub repos), read a group of modules at a time on the
    CPU: they must be LoRA adapters of one base model with the same modules and shapes, as for a merge."""
    adapters = [Adapter(locate_source(source).folder, source) for source in sources]
    base_model = resolve_base_model(adapters, None)
    specs = check_compatible(adapters)
    method = get_method("ctm")
    rule = get_rule(method.default_rule)
    method_params, rule_params = resolve_settings(method, rule, {})
    curves = merge_curves(method, rule, rule_params, method_params)
    groups = read_groups(adapters, plan_waves(specs, CPU_MAX_MEMORY), torch.device("cpu"))
    diagnosis = diagnose_groups(groups, curves, torch.ones(len(adapters), dtype=torch.float64))
    data = diagnosis_data(diagnosis, curves, sources)
    return {"base_model": base_model.name, "warnings": base_model.warnings, **data}
