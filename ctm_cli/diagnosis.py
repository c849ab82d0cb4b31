"""The diagnosis of a set of adapters as plain data: what `ctm inspect a/ b/ …` shows and the `diagnosis` block
of merge_report.json. The math is diagnostics.py's; this module runs it over module groups and lays out the
figures (total, worst modules, every module). No I/O: the groups come from the caller.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from ctm_cli import core_space as cs
from ctm_cli import diagnostics as dg
from ctm_cli.methods import FactorGroup, Method
from ctm_cli.module_spec import ModuleSpec
from ctm_cli.params import Params
from ctm_cli.rules import Rule, get_rule

# Modules listed under `worst_modules`.
WORST_SHOWN = 5
# The rule of the merge-then-compress curve shown beside the merge's own: task arithmetic, PEFT's `svd` merge.
MTC_RULE = "ta"


@dataclass(frozen=True)
class Curve:
    """Which merge an energy curve belongs to: its label and how its rule is run."""

    label: str
    rule: Rule[Any]
    params: Params


@dataclass(frozen=True)
class GroupDiagnosis:
    """One module group's specs, its diagnosis (with the first curve's energies) and each other curve's
    energies (G, K)."""

    specs: list[ModuleSpec]
    diagnosis: dg.Diagnosis
    other_energies: list[torch.Tensor]


def curve_is_exact(method: Method, rule: Rule[Any], method_params: Params) -> bool:
    """Whether the energy curve of the rule in the whole core space is what this merge keeps at every rank, i.e.
    its rank-r output is the best rank-r part of its full-rank merge F: the rule on the cores cut once (ctm with
    frame_rank 0 and no isotropic cut, core), or merge-then-compress with a linear rule, run in core space. Not
    a spectral rule: its rank-r form remaps the r kept values (iso_c: to their mean), so it is not F cut."""
    params = dict(method_params)
    if rule.spectral:
        return False
    if method.name == "ctm":
        return params.get("frame_rank") == 0 and params.get("isotropic") == 0
    if method.name == "mtc":
        return rule.linear
    return method.name == "core"


def merge_curves(method: Method, rule: Rule[Any], rule_params: Params, method_params: Params) -> list[Curve]:
    """The curves to show for a merge: its rule in the whole core space (labelled with the merge where that is
    exactly what it keeps, else as core space merging), and merge-then-compress with task arithmetic."""
    exact = curve_is_exact(method, rule, method_params)
    curves = [Curve(f"{method.name if exact else 'core'}+{rule.name}", rule, rule_params)]
    mtc = get_rule(MTC_RULE)
    if curves[0].label != f"mtc+{MTC_RULE}":
        curves.append(Curve(f"mtc+{MTC_RULE}", mtc, mtc.resolve({})))
    return curves


def diagnose_groups(
    groups: Iterable[tuple[list[ModuleSpec], FactorGroup]],
    curves: list[Curve],
    weights: torch.Tensor,
    frame_rank: int = 0,
    beta: float = 1.0,
    seed: int = 0,
) -> list[GroupDiagnosis]:
    """Diagnose every group (in float64, on the groups' device, results on the CPU): all figures with the first
    curve's rule, and the full-rank merge's energies for the others. `frame_rank` is the frame conflict is read in
    (0: the whole core space); random rules draw from a generator of their own seeded with `seed`."""
    generator = torch.Generator().manual_seed(seed)
    results = []
    for specs, group in groups:
        b_cat, a_cat = group.b_cat.to(torch.float64), group.a_cat.to(torch.float64)
        weights = weights.to(b_cat)
        first = curves[0]
        cores = cs.factored_core_space(b_cat, a_cat, group.ranks).cores
        diagnosis = dg.diagnose_cores(cores, first.rule, weights, first.params, frame_rank, beta, generator)
        others = [
            dg.merge_spectrum(cores.dense(), curve.rule, weights, curve.params, generator).energies.cpu()
            for curve in curves[1:]
        ]
        cpu = dg.Diagnosis(
            column_overlap=diagnosis.column_overlap.cpu(),
            row_overlap=diagnosis.row_overlap.cpu(),
            inner_products=diagnosis.inner_products.cpu(),
            conflict=dg.Conflict(diagnosis.conflict.against.cpu(), diagnosis.conflict.energy.cpu()),
            merge_energies=diagnosis.merge_energies.cpu(),
            task_kept=diagnosis.task_kept.cpu(),
        )
        results.append(GroupDiagnosis(specs, cpu, others))
    return results


def full_rank_energies(groups: list[GroupDiagnosis]) -> dict[str, float]:
    """‖F‖² of each module's full-rank merge (the first curve's rule in the whole core space), by name."""
    energies: dict[str, float] = {}
    for part in groups:
        totals = part.diagnosis.merge_energies.sum(dim=-1).tolist()
        energies.update((spec.name, total) for spec, total in zip(part.specs, totals, strict=True))
    return energies


def _rounded(tensor: torch.Tensor) -> Any:
    """A tensor as nested lists of floats rounded to 6 significant digits (JSON that people can read)."""

    def rounded(value: Any) -> Any:
        return float(f"{value:.6g}") if isinstance(value, float) else [rounded(item) for item in value]

    return rounded(tensor.tolist())


def _keep_ranks(curve: torch.Tensor) -> dict[str, int]:
    """The ranks keeping 90 / 95 / 99% on one curve (K,), keyed by the share as text."""
    return {f"{keep:g}": int(dg.rank_for_keep(curve, keep)) for keep in dg.REPORTED_KEEPS}


def _mean_off_diagonal(matrix: torch.Tensor) -> float:
    """Mean of a T × T matrix's entries off its diagonal (the pairs of adapters)."""
    tasks = matrix.shape[-1]
    return float((matrix.sum() - matrix.diagonal().sum()) / max(tasks * (tasks - 1), 1))


def _module_rows(groups: list[GroupDiagnosis], curves: list[Curve]) -> list[dict[str, Any]]:
    """Every module's figures, in name order."""
    rows = []
    for part in groups:
        d = part.diagnosis
        shares = [dg.energy_curve(d.merge_energies), *(dg.energy_curve(e) for e in part.other_energies)]
        dominance = dg.relative_norms(d.norms)
        cosines = dg.update_cosines(d.inner_products)
        conflict = d.conflict.against.sum(dim=-1) / d.conflict.energy.sum(dim=-1).clamp_min(1e-300)
        for index, spec in enumerate(part.specs):
            rows.append(
                {
                    "name": spec.name,
                    "shape": [spec.out_features, spec.in_features],
                    "ranks": list(spec.ranks),
                    "column_overlap": _rounded(d.column_overlap[index]),
                    "row_overlap": _rounded(d.row_overlap[index]),
                    "mean_column_overlap": round(_mean_off_diagonal(d.column_overlap[index]), 6),
                    "mean_row_overlap": round(_mean_off_diagonal(d.row_overlap[index]), 6),
                    "cosine": _rounded(cosines[index]),
                    "dominance": _rounded(dominance[index]),
                    "conflict": round(float(conflict[index]), 6),
                    "curves": {c.label: _rounded(s[index]) for c, s in zip(curves, shares, strict=True)},
                    "ranks_for_keep": {
                        c.label: _keep_ranks(s[index]) for c, s in zip(curves, shares, strict=True)
                    },
                }
            )
    rows.sort(key=lambda row: row["name"])
    return rows


def _worst(rows: list[dict[str, Any]], label: str) -> list[dict[str, Any]]:
    """The modules that need the largest rank to keep 95% (ties: the higher conflict first), in short form."""
    key = f"{dg.REPORTED_KEEPS[1]:g}"
    ranked = sorted(rows, key=lambda row: (-row["ranks_for_keep"][label][key], -row["conflict"], row["name"]))
    return [
        {
            "name": row["name"],
            "rank_for_95": row["ranks_for_keep"][label][key],
            "mean_column_overlap": row["mean_column_overlap"],
            "mean_row_overlap": row["mean_row_overlap"],
            "conflict": row["conflict"],
        }
        for row in ranked[:WORST_SHOWN]
    ]


def diagnosis_data(groups: list[GroupDiagnosis], curves: list[Curve], labels: list[str]) -> dict[str, Any]:
    """The diagnosis as JSON-able data: `total` (the whole adapters), `worst_modules` and `modules`.

    Overlaps are means over modules; cosine and dominance of the whole updates; conflict the share of all energy
    against the elected signs (whole core space, or the frame diagnosed in); each curve the share of the
    full-rank merge's energy kept with one rank for every module, r = 1 … max R."""
    summary = dg.summarize([part.diagnosis for part in groups])
    pooled = [summary.curve]
    for index in range(len(curves) - 1):
        pooled.append(dg.pooled_curve([part.other_energies[index] for part in groups]))
    rows = _module_rows(groups, curves)
    return {
        "adapters": labels,
        "curves": [{"label": c.label, "rule": c.rule.name, "rule_params": dict(c.params)} for c in curves],
        "total": {
            "modules": len(rows),
            "column_overlap": _rounded(summary.column_overlap),
            "row_overlap": _rounded(summary.row_overlap),
            "cosine": _rounded(summary.cosine),
            "dominance": _rounded(summary.dominance),
            "conflict": _rounded(summary.conflict),
            "task_conflict": _rounded(summary.task_conflict),
            "curves": {c.label: _rounded(curve) for c, curve in zip(curves, pooled, strict=True)},
            "task_curves": _rounded(summary.task_curve),
            "ranks_for_keep": {c.label: _keep_ranks(curve) for c, curve in zip(curves, pooled, strict=True)},
        },
        "worst_modules": _worst(rows, curves[0].label),
        "modules": rows,
    }
