"""knots: KnOTS (Stoica et al. 2025), the rule on the task-specific right factors of the updates' joint SVD."""

from __future__ import annotations

import torch

from ctm_cli import core_space as cs
from ctm_cli import small_linalg
from ctm_cli.fixed_order import matmul
from ctm_cli.methods.common import loss_against_full_rank, merge_and_cut, result, rule_at_full_rank
from ctm_cli.methods.registry import FactorGroup, MergeResult, MergeSettings, register


@register(
    "knots",
    "KnOTS: SVD of the concatenated updates [ΔW_1 … ΔW_T] = U S [V_1 … V_T]ᵀ, rule on the S·V_tᵀ, output U·merged",
    zero_is_full=True,
)
def knots(group: FactorGroup, settings: MergeSettings) -> MergeResult:
    """KnOTS (Stoica et al. 2025), with its SVD taken in core space.

    [C_1 … C_T] = U S [V_1 … V_T]ᵀ (R × T·R) gives [ΔW_1 … ΔW_T] = (Q_B U) S [Q_A V_1 … Q_A V_T]ᵀ, so
    the task-specific right factors are X_t = S V_tᵀ Q_Aᵀ (R × in), as in the paper. The rule merges
    them (in float64); the output Q_B U · rule(X) is cut to rank r by the SVD of rule(X) (R × in).
    """
    space = cs.core_space(group.b_cat, group.a_cat, group.ranks)
    modules, tasks, total, _ = space.cores.shape
    concatenated = space.cores.transpose(-3, -2).reshape(modules, total, tasks * total)
    u, s, vh = small_linalg.svd(concatenated)
    blocks = vh.reshape(modules, total, tasks, total).transpose(-3, -2)  # (G, T, R, R): V_tᵀ in core coordinates
    to_inputs = matmul(s[:, None, :, None] * blocks, space.right.mT.unsqueeze(-3))
    right_factors = matmul(to_inputs, group.a_cat.to(torch.float64).unsqueeze(-3))
    cut = merge_and_cut(right_factors, settings, left_map=matmul(space.left, u))
    dtype = group.b_cat.dtype
    lora_b, lora_a = matmul(group.b_cat, cut.to_b.to(dtype)), cut.to_a.to(dtype)
    spectral = settings.rule.spectral  # else the output is the cut of the full-rank merge: its truncation loss
    full_rank_loss = loss_against_full_rank(cut, rule_at_full_rank(right_factors, settings)) if spectral else None
    return result(group, settings, lora_b, lora_a, truncation_loss=cut.lost_energy, full_rank_loss=full_rank_loss)
