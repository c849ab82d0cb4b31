"""core: Core Space merging (Panariello et al. 2025), the rule on the R × R cores."""

from __future__ import annotations

from ctm_cli import core_space as cs
from ctm_cli.methods.common import from_core_maps, loss_against_full_rank, merge_and_cut, result, rule_at_full_rank
from ctm_cli.methods.registry import FactorGroup, MergeResult, MergeSettings, register


@register(
    "core",
    "Core Space merging: rule on the R×R cores, output Q_B·rule(C)·Q_Aᵀ",
    zero_is_full=True,
)
def core_space_merge(group: FactorGroup, settings: MergeSettings) -> MergeResult:
    """Core Space merging (Panariello et al. 2025): the rule on the cores, optionally cut to rank r."""
    space = cs.core_space(group.b_cat, group.a_cat, group.ranks)
    cut = merge_and_cut(space.cores, settings, space.left, space.right)
    lora_b, lora_a = from_core_maps(group, cut.to_b, cut.to_a)
    spectral = settings.rule.spectral  # else the output is the cut of the full-rank merge: its truncation loss
    full_rank_loss = loss_against_full_rank(cut, rule_at_full_rank(space.cores, settings)) if spectral else None
    return result(group, settings, lora_b, lora_a, truncation_loss=cut.lost_energy, full_rank_loss=full_rank_loss)
