"""mtc: Merge-then-Compress, the rule on the full updates, then the best rank-r approximation."""

from __future__ import annotations

from typing import Any

import torch

from ctm_cli import core_space as cs
from ctm_cli.fixed_order import matmul
from ctm_cli.methods.common import apply_rule, from_core_maps, merge_and_cut, result
from ctm_cli.methods.registry import FactorGroup, MergeResult, MergeSettings, RankLimit, register
from ctm_cli.rules import Rule


def _mtc_rank_limit(total_rank: int, out_features: int, in_features: int, rule: Rule[Any]) -> int:
    """A linear or spectral merge has rank ≤ R; an element-wise one can reach min(out, in)."""
    if rule.linear or rule.spectral:
        return min(total_rank, out_features, in_features)
    return min(out_features, in_features)


def full_updates(b: torch.Tensor, a: torch.Tensor, ranks: list[int]) -> torch.Tensor:
    """Every task's full update B_t A_t of one module, stacked (T, out, in)."""
    return torch.stack([matmul(b[:, cols], a[cols, :]) for cols in cs.column_slices(ranks)])


@register(
    "mtc",
    "Merge-then-Compress: rule on the full updates (exactly in core space when linear/spectral), truncated SVD",
    rank_limit=RankLimit("min(R, out, in) (element-wise rules: 1..min(out, in))", _mtc_rank_limit),
)
def merge_then_compress(group: FactorGroup, settings: MergeSettings) -> MergeResult:
    """Merge the full updates with the rule, then keep the best rank-r approximation.

    Linear and spectral rules commute with the orthonormal core bases, so they run on the R × R
    cores and the SVD of the merged core gives exactly the full-space result. Element-wise rules are
    defined on the full out × in matrices: those are formed one module at a time on the device.
    """
    rule = settings.rule
    if rule.linear or rule.spectral:
        space = cs.core_space(group.b_cat, group.a_cat, group.ranks)
        cut = merge_and_cut(space.cores, settings, space.left, space.right)
        lora_b, lora_a = from_core_maps(group, cut.to_b, cut.to_a)
        loss = cut.lost_energy
    else:
        cuts = [
            cs.truncate(apply_rule(full_updates(b, a, group.ranks), settings), settings.rank)
            for b, a in zip(group.b_cat, group.a_cat, strict=True)
        ]
        lora_b = torch.stack([cut.to_b for cut in cuts])
        lora_a = torch.stack([cut.to_a for cut in cuts])
        loss = torch.stack([cut.lost_energy for cut in cuts]).to(torch.float64)
    error = loss.sqrt()
    if rule.spectral:  # the reference is the full-rank rule, not the weighted sum that was cut
        full = apply_rule(space.cores, settings)
        error = cs.lowrank_relative_error(
            lora_b,
            lora_a,
            matmul(group.b_cat.to(torch.float64), matmul(space.left, full)),
            matmul(space.right.mT, group.a_cat.to(torch.float64)),
        )
    return result(group, settings, lora_b, lora_a, relative_error=error, truncation_loss=loss)
