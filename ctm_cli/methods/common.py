"""Steps that several merge methods share: a rule's coefficients per column, the rule's result cut to rank r,
the output factors from core-space maps, and a MergeResult with the report's default figures."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch

from ctm_cli import core_space as cs
from ctm_cli.fixed_order import matmul
from ctm_cli.methods.registry import FactorGroup, MergeResult, MergeSettings
from ctm_cli.rules import isotropic_spectrum, linear_coefficients, weighted_sum


def column_coefficients(group: FactorGroup, settings: MergeSettings) -> torch.Tensor:
    """A linear rule's c_t repeated over each task's columns of the concatenated factors (R,)."""
    coefficients = linear_coefficients(settings.rule, settings.weights, settings.rule_params, settings.generator)
    counts = torch.tensor(group.ranks, device=coefficients.device)
    return torch.repeat_interleave(coefficients, counts)


def result(
    group: FactorGroup,
    settings: MergeSettings,
    lora_b: torch.Tensor,
    lora_a: torch.Tensor,
    *,
    kept_energy: torch.Tensor | None = None,
    relative_error: torch.Tensor | None = None,
    sweeps: torch.Tensor | None = None,
    frame_energy: torch.Tensor | None = None,
    truncation_loss: torch.Tensor | None = None,
    full_rank_loss: torch.Tensor | None = None,
) -> MergeResult:
    """A MergeResult; the figures not given take their defaults (registry module doc): the energy inside the
    output spaces, with a linear rule the error against the exact merge, and the loss against the full-rank merge
    from the relative error, else from the truncation loss (right where the output is a cut of that merge)."""
    linear_error = relative_error is None and settings.rule.linear
    if kept_energy is None or linear_error:  # the factors in float64, converted once for both figures
        b_cat, a_cat = group.b_cat.to(torch.float64, copy=True), group.a_cat.to(torch.float64)
        if kept_energy is None:
            kept_energy = cs.energy_in_output_spaces(lora_b, lora_a, b_cat, a_cat, group.ranks)
        if linear_error:
            scaled = b_cat.mul_(column_coefficients(group, settings).to(b_cat.device))  # b_cat's last use
            relative_error = cs.lowrank_relative_error(lora_b, lora_a, scaled, a_cat)
    if full_rank_loss is None:
        full_rank_loss = relative_error.square() if relative_error is not None else truncation_loss
    return MergeResult(
        lora_b, lora_a, kept_energy, relative_error, sweeps, frame_energy, truncation_loss, full_rank_loss
    )


def rule_at_full_rank(stack: torch.Tensor, settings: MergeSettings) -> torch.Tensor:
    """The rule's full-rank merge of a stack, as a reference: a random rule draws from a copy of the settings'
    generator, so the merge itself sees the same draws with or without the reference."""
    generator = settings.generator
    if generator is not None:
        generator = torch.Generator(generator.device).set_state(generator.get_state())
    return settings.rule.function(stack, settings.weights, settings.rule_params, generator)


def loss_against_full_rank(
    cut: cs.Truncation, full: torch.Tensor, u: torch.Tensor | None = None, v: torch.Tensor | None = None
) -> torch.Tensor:
    """‖X − F‖² / ‖F‖² (...,) for the cut's rank-k matrix X (mapped to F's coordinates by the orthonormal frame
    u, v where given) and a full-rank merge F; 0 where F is zero."""
    written = matmul(cut.left_basis * cut.values.unsqueeze(-2), cut.right_basis.mT)
    if u is not None and v is not None:
        written = matmul(matmul(u, written), v.mT)
    total = full.square().sum(dim=(-2, -1))
    lost = (written - full).square().sum(dim=(-2, -1))
    return torch.where(total > 0, lost / total.clamp_min(torch.finfo(total.dtype).tiny), torch.zeros_like(total))


def from_core_maps(group: FactorGroup, to_b: torch.Tensor, to_a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """lora_B = b_cat @ to_b, lora_A = to_a @ a_cat, in the factors' dtype."""
    dtype = group.b_cat.dtype
    return matmul(group.b_cat, to_b.to(dtype)), matmul(to_a.to(dtype), group.a_cat)


def apply_rule(stack: torch.Tensor, settings: MergeSettings) -> torch.Tensor:
    """The settings' rule applied to a stack of task matrices."""
    return settings.rule.function(stack, settings.weights, settings.rule_params, settings.generator)


def merge_and_cut(
    stack: torch.Tensor,
    settings: MergeSettings,
    left_map: torch.Tensor | None = None,
    right_map: torch.Tensor | None = None,
    isotropic: bool = False,
) -> cs.Truncation:
    """The rule's result cut to settings.rank by SVD; with `isotropic`, the kept singular values are then
    replaced by their mean (Iso-C's spectrum applied after the cut, to any rule).

    A spectral rule (iso_c) flattens the spectrum, and a flat spectrum has no best rank-r part, so
    for it the weighted sum is cut first and its top r singular values are remapped: the rule's
    rank-r form. Its lost_energy is then that of the weighted sum.
    """
    spectrum = _kept_spectrum(settings, max(stack.shape[-2:]), isotropic)
    if settings.rule.spectral:
        return cs.truncate(weighted_sum(stack, settings.weights), settings.rank, left_map, right_map, spectrum)
    return cs.truncate(apply_rule(stack, settings), settings.rank, left_map, right_map, spectrum=spectrum)


def merge_and_cut_factored(
    cores: cs.FactoredCores,
    settings: MergeSettings,
    left_map: torch.Tensor | None = None,
    right_map: torch.Tensor | None = None,
    isotropic: bool = False,
) -> cs.Truncation:
    """`merge_and_cut` of the cores `cores.dense()`, without the T × R × R stack where the rule allows: a rule's
    factored form (tsv: its result already in SVD form, no SVD to cut it), Σ c_t C_t for a linear rule and
    Σ w_t C_t for a spectral one (one R × R product); rules that act entry by entry get the dense stack."""
    rule, rank = settings.rule, settings.rank
    spectrum = _kept_spectrum(settings, cores.b.shape[-1], isotropic)
    if rule.factored is not None:
        form = rule.factored(cores, settings.weights, settings.rule_params)
        if form.s.shape[-1] >= rank:
            return cs.truncate_svd_form(form, rank, left_map, right_map, spectrum)
        return cs.truncate(matmul(form.u * form.s.unsqueeze(-2), form.v.mT), rank, left_map, right_map, spectrum)
    if rule.spectral:
        return cs.truncate(cores.combined(settings.weights), rank, left_map, right_map, spectrum)
    if rule.linear:
        coefficients = linear_coefficients(rule, settings.weights, settings.rule_params, settings.generator)
        return cs.truncate(cores.combined(coefficients), rank, left_map, right_map, spectrum)
    return merge_and_cut(cores.dense(), settings, left_map, right_map, isotropic)


def _kept_spectrum(
    settings: MergeSettings, size: int, isotropic: bool
) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """What the cut does to the kept singular values: a spectral rule's map, Iso-C's flat spectrum with
    `isotropic`, else nothing (`size` = max(m, n) of the merged matrix)."""
    spectrum, rule_params = settings.rule.spectrum, settings.rule_params
    if spectrum is not None:
        return lambda kept: spectrum(kept, rule_params, size)
    return partial(isotropic_spectrum, scale=1.0, size=size) if isotropic else None
