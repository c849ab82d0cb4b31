"""`--rank auto --keep S`: the smallest rank (one for all modules, or one per module) whose merge keeps the share S
of the energy of the same rule's full-rank merge, read off the energy curves of the diagnosis (no I/O).

The curves are exact for the output only where the merge is the rule in the whole core space cut once to rank r
(ctm with frame_rank 0 and no isotropic cut, core) or merge-then-compress in core space (mtc with a linear rule),
and the rule is not spectral (iso_c's rank-r form remaps its kept values); `check_auto_rank` refuses the others.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ctm_cli import diagnostics as dg
from ctm_cli.diagnosis import GroupDiagnosis, curve_is_exact
from ctm_cli.errors import UsageError
from ctm_cli.methods import Method
from ctm_cli.params import Params
from ctm_cli.rules import Rule


def check_auto_rank(method: Method, rule: Rule[Any], method_params: Params) -> None:
    """Refuse --rank auto where the energy curve is not exact for the merge's output."""
    if not curve_is_exact(method, rule, method_params):
        params = dict(method_params)
        ctm = method.name == "ctm"
        frame = f" (frame_rank {params['frame_rank']:g}, isotropic {params['isotropic']:g})" if ctm else ""
        raise UsageError(
            f"--rank auto needs ctm with frame_rank 0 and isotropic 0 or core, with a rule that is not spectral, or "
            f"mtc with a linear rule (merges whose kept energy is known at every rank), not {method.name}{frame} "
            f"with rule {rule.name}; give --rank N"
        )


@dataclass(frozen=True)
class RankChoice:
    """The ranks `--rank auto` chose, and why: per module, its rank and the share it keeps there and one rank
    below (below the asked share, unless the rank is 1)."""

    keep: float
    per_module: bool
    ranks: dict[str, int]
    global_rank: int | None  # the one rank of all modules (None with --rank-per-module)
    kept: dict[str, float]  # name -> share kept at its rank
    kept_below: dict[str, float | None]  # name -> share kept one rank lower (None at rank 1)
    total_kept: float  # share of all modules' full-rank energy kept
    total_kept_below: float | None  # the same with every module one rank lower (global rank only)

    def report(self) -> dict[str, Any]:
        """The choice as the report shows it."""
        modules = [
            {"name": name, "rank": rank, "kept": self.kept[name], "kept_one_rank_lower": self.kept_below[name]}
            for name, rank in sorted(self.ranks.items())
        ]
        return {
            "keep": self.keep,
            "per_module": self.per_module,
            "global_rank": self.global_rank,
            "total_kept": self.total_kept,
            "total_kept_one_rank_lower": self.total_kept_below,
            "modules": modules,
        }


def _at(curve: list[float], rank: int) -> float:
    """The share a curve keeps at a rank (1-based; past its end, all of it)."""
    return curve[min(rank, len(curve)) - 1]


def choose_ranks(groups: list[GroupDiagnosis], keep: float, per_module: bool) -> RankChoice:
    """The smallest global rank whose pooled curve reaches `keep`, or with `per_module` each module's smallest
    rank whose own curve reaches it (every module then keeps at least `keep`, so all of them together do)."""
    curves: dict[str, list[float]] = {}
    energies: dict[str, float] = {}
    ranks: dict[str, int] = {}
    for part in groups:
        shares = dg.energy_curve(part.diagnosis.merge_energies)
        own = dg.rank_for_keep(shares, keep).tolist()
        totals = part.diagnosis.merge_energies.sum(dim=-1).tolist()
        for index, spec in enumerate(part.specs):
            curves[spec.name], energies[spec.name], ranks[spec.name] = shares[index].tolist(), totals[index], own[index]
    pooled = dg.pooled_curve([part.diagnosis.merge_energies for part in groups])
    global_rank = None if per_module else int(dg.rank_for_keep(pooled, keep))
    if global_rank is not None:
        ranks = dict.fromkeys(ranks, global_rank)
    kept = {name: _at(curves[name], rank) for name, rank in ranks.items()}
    below = {name: _at(curves[name], rank - 1) if rank > 1 else None for name, rank in ranks.items()}
    everything = sum(energies.values())
    total = sum(kept[name] * energies[name] for name in ranks) / everything if everything > 0 else 1.0
    total_below = _at(pooled.tolist(), global_rank - 1) if global_rank is not None and global_rank > 1 else None
    return RankChoice(keep, per_module, ranks, global_rank, kept, below, total, total_below)
