"""robustmerge: RobustMerge (Zeng et al. 2025), per-adapter pruning of A and B with B rescaled, summed."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ctm_cli import core_space as cs
from ctm_cli.methods.common import result
from ctm_cli.methods.registry import LARGEST_INPUT_RANK, FactorGroup, MergeResult, MergeSettings, register
from ctm_cli.params import Params, param
from ctm_cli.rules import linear_coefficients, top_fraction_mask


@dataclass(frozen=True)
class RobustMergeParams(Params):
    """RobustMerge's pruning density."""

    robust_density: float = param(0.2, 0.0, 1.0, "fraction of each A_t and B_t kept by magnitude", open_low=True)


@register(
    "robustmerge",
    "RobustMerge: per-adapter top-k pruning of A and B, B's columns rescaled by A's kept mass, normalised, summed",
    needs_linear_rule=True,
    fixed_rank=LARGEST_INPUT_RANK,
    parameters=RobustMergeParams,
)
def robustmerge(group: FactorGroup, settings: MergeSettings) -> MergeResult:
    """RobustMerge (Zeng et al. 2025) as the CtM paper runs it, factor by factor.

    For task t with rule coefficient c_t, B'_t = c_t s_t B_t and A_t (padded with zeros to r_max =
    max r_t): Â_t, B̂_t keep each matrix's `robust_density` fraction of entries by magnitude.
    γ_{t,i} = ‖A_t[i,:]‖₁ / ‖Â_t[i,:]‖₁ (0 for an empty row) compensates B's column i for what the
    pruning removed from A's row i; γ̄_{t,i} = γ_{t,i} / Σ_s γ_{s,i} normalises across tasks. Output:
    lora_B[:, i] = Σ_t γ̄_{t,i} B̂_t[:, i], lora_A[i, :] = Σ_t Â_t[i, :] (rank r_max).
    """
    density = settings.method_params_as(RobustMergeParams).robust_density
    coefficients = linear_coefficients(settings.rule, settings.weights, settings.rule_params, settings.generator)
    width = max(group.ranks)
    columns, rows, gains = [], [], []
    for task, cols in enumerate(cs.column_slices(group.ranks)):
        b = group.b_cat[..., cols] * coefficients[task].to(group.b_cat)
        a = group.a_cat[..., cols, :]
        pruned_a = a * top_fraction_mask(a, density)
        kept_mass = pruned_a.abs().sum(dim=-1)
        gain = torch.where(kept_mass > 0, a.abs().sum(dim=-1) / kept_mass.clamp_min(1e-30), torch.zeros_like(kept_mass))
        padding = width - b.shape[-1]
        columns.append(torch.nn.functional.pad(b * top_fraction_mask(b, density), (0, padding)))
        rows.append(torch.nn.functional.pad(pruned_a, (0, 0, 0, padding)))
        gains.append(torch.nn.functional.pad(gain, (0, padding)))
    gain = torch.stack(gains)  # (T, G, r_max)
    share = gain.sum(dim=0)
    normalised = torch.where(share > 0, gain / share.clamp_min(1e-30), torch.zeros_like(gain))
    lora_b = sum((n.unsqueeze(-2) * b for n, b in zip(normalised, columns, strict=True)), torch.zeros_like(columns[0]))
    lora_a = sum(rows, torch.zeros_like(rows[0]))
    return result(group, settings, lora_b, lora_a)
