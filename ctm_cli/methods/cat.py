"""cat: the weighted factors side by side, the exact result of a linear rule at rank R (the lossless reference)."""

from __future__ import annotations

from ctm_cli.methods.common import column_coefficients, result
from ctm_cli.methods.registry import TOTAL_RANK, FactorGroup, MergeResult, MergeSettings, register


@register(
    "cat",
    "concatenate the weighted factors: the exact result of a linear rule, rank R",
    needs_linear_rule=True,
    fixed_rank=TOTAL_RANK,
)
def concatenate(group: FactorGroup, settings: MergeSettings) -> MergeResult:
    """Exact merge of a linear rule by stacking each adapter's factors with its rule coefficient."""
    coefficients = column_coefficients(group, settings)
    return result(group, settings, group.b_cat * coefficients.to(group.b_cat), group.a_cat.clone())
