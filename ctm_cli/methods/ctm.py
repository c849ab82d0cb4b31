"""ctm: Compress-then-Merge (DESIGN §1), the product's method."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ctm_cli import core_space as cs
from ctm_cli.fixed_order import matmul
from ctm_cli.methods.common import (
    from_core_maps,
    loss_against_full_rank,
    merge_and_cut,
    merge_and_cut_factored,
    result,
    rule_at_full_rank,
)
from ctm_cli.methods.registry import CoreMemory, FactorGroup, MergeResult, MergeSettings, register
from ctm_cli.params import Params, param
from ctm_cli.rules import Rule

# CtM's default frame rank: the whole core space (0). The quality benchmark (docs/benchmarks.md, issue 11) chose it:
# with TSV, the rule sees every task's directions and one cut to r keeps the strongest of all of them.
DEFAULT_FRAME_RANK = 0
# Float64 copies of a group's factors ctm holds at once: the core space's Gram step (on CUDA; on the CPU a module at
# a time). The report's figures come from the core space (kept energy, a linear rule's error), not the factors.
CTM_FACTOR_COPIES = 1
# Arrays of the stack's size a rule that acts entry by entry holds at once on a dense stack, at most (memory plan).
DENSE_RULE_COPIES = 8


@dataclass(frozen=True)
class CtmParams(Params):
    """CtM's frame (its rank, HOOI's stopping rule) and the spectrum of its final cut."""

    hooi_tolerance: float = param(
        cs.HOOI_TOLERANCE,
        0.0,
        1.0,
        "HOOI stops once a sweep raises the captured energy and moves the subspaces by less than this",
        open_low=True,
    )
    max_sweeps: int = param(cs.HOOI_MAX_SWEEPS, 1, 100_000, "most HOOI sweeps per module")
    frame_rank: int = param(
        DEFAULT_FRAME_RANK,
        0,
        1_000_000,
        "rank r' of the shared frame the rule works in, then cut to --rank; values ≤ --rank: r' = r (the "
        "paper's CtM); 0: the whole core space R",
    )
    isotropic: int = param(
        0, 0, 1, "1: the r singular values kept by the final cut set to their mean (Iso-C's spectrum)"
    )


def frame_rank(rank: int, total_rank: int, params: CtmParams) -> int:
    """Rank r' of CtM's shared frame: `frame_rank` clamped to [r, R], 0 meaning R (the whole core space).

    r' = r is the paper's CtM; a larger r' lets the rule see more of every task before the one cut to r, and
    r' = R makes the frame the whole core space (no HOOI), where CtM is merge-then-compress run in core space."""
    wanted = params.frame_rank
    return total_rank if wanted == 0 else min(total_rank, max(rank, wanted))


def compress_then_merge_groups(groups: list[FactorGroup], settings: list[MergeSettings]) -> list[MergeResult]:
    """CtM (DESIGN §1) of several groups: core space, balanced HOOI frame, rule on r × r coordinates, rank-r
    output. The frames of all groups come from one batched HOOI (`cs.shared_frames_factored`), so groups of
    other shapes cost no extra sweeps. The T cores stay factored (two R × R factors instead of T·R² numbers),
    so memory does not grow with T²."""
    spaces = [
        cs.factored_core_space(group.b_cat, group.a_cat, group.ranks, any_basis=each.rule.basis_free)
        for group, each in zip(groups, settings, strict=True)
    ]
    params = [each.method_params_as(CtmParams) for each in settings]
    stopping = params[0]  # one merge's groups share everything but the rank
    frame_ranks = [frame_rank(s.rank, sum(g.ranks), p) for g, s, p in zip(groups, settings, params, strict=True)]
    searched = [i for i, (g, wide) in enumerate(zip(groups, frame_ranks, strict=True)) if wide < sum(g.ranks)]
    frames = {i: cs.whole_frame(space.cores) for i, space in enumerate(spaces) if i not in searched}
    found = cs.shared_frames_factored(
        [cs.balance_factored(spaces[i].cores, settings[i].beta) for i in searched],
        [frame_ranks[i] for i in searched],
        tolerance=stopping.hooi_tolerance,
        max_sweeps=stopping.max_sweeps,
    )
    frames.update(zip(searched, found, strict=True))
    return [
        _ctm_output(groups[i], settings[i], spaces[i], frames[i], params[i].isotropic == 1) for i in range(len(groups))
    ]


def _ctm_output(
    group: FactorGroup, settings: MergeSettings, space: cs.FactoredCoreSpace, frame: cs.SharedFrame, isotropic: bool
) -> MergeResult:
    """CtM's output for one group once its frame is known: the rule on the r' × r' coordinates, cut to rank r. In
    the whole core space (r' = R) the coordinates are the cores themselves, which the rule takes from their factors
    where it can (`merge_and_cut_factored`)."""
    whole_frame = frame.u.shape[-1] == space.cores.b.shape[-1]
    if whole_frame:  # the whole core space: u = v = I, the coordinates are the cores
        cut = merge_and_cut_factored(space.cores, settings, space.left, space.right, isotropic)
        inside = space.cores.project(cut.left_basis, cut.right_basis)
    else:
        coordinates = space.cores.project(frame.u, frame.v)
        left_map, right_map = matmul(space.left, frame.u), matmul(space.right, frame.v)
        cut = merge_and_cut(coordinates, settings, left_map, right_map, isotropic)
        inside = matmul(matmul(cut.left_basis.mT.unsqueeze(-3), coordinates), cut.right_basis.unsqueeze(-3))
    lora_b, lora_a = from_core_maps(group, cut.to_b, cut.to_a)
    # inside: each task's core in the output's column and row spaces, in the frame's orthonormal coordinates.
    whole = space.cores.norms()
    kept = torch.linalg.matrix_norm(inside).square() / whole.square().clamp_min(1e-300)
    full_rank_loss = cut.lost_energy  # the output is the cut of the rule's full-rank merge, F
    if not whole_frame or isotropic or settings.rule.spectral:
        full = rule_at_full_rank(space.cores.dense(), settings)
        full_rank_loss = loss_against_full_rank(cut, full, *((None, None) if whole_frame else (frame.u, frame.v)))
    return result(
        group,
        settings,
        lora_b,
        lora_a,
        # a linear rule's F is the exact merge Σ c_t ΔW_t, and the core space's maps are orthonormal: the error
        # against it is ‖X − F‖ / ‖F‖ in core space, with no product of the out × R or R × in factors
        relative_error=full_rank_loss.sqrt() if settings.rule.linear else None,
        full_rank_loss=full_rank_loss,
        kept_energy=torch.where(whole > 0, kept, torch.ones_like(kept)),
        sweeps=frame.sweeps,
        frame_energy=frame.energy / frame.total_energy.clamp_min(1e-300),
        truncation_loss=cut.lost_energy,
    )


def _core_numbers(ranks: tuple[int, ...], rank: int, rule: Rule[Any], params: CtmParams) -> CoreMemory:
    """Float64 core-space numbers of one module, by the route its merge takes (R = Σ r_t, ρ = max r_t).

    Kept while its wave merges: the factored core space (two R × R frames, the cores' two R × R factors); with HOOI
    (r' < R), which sweeps the whole wave at once, its copies of the factors and Gram matrices, its products with
    the T tasks and its extrapolation history, and the frames. Working while the module's group takes its output:
    in the whole core space, TSV from the tasks' thin SVDs (T·R·ρ per basis) and its two polar factors, a linear or
    spectral rule one R × R merge and its SVD, a rule that acts entry by entry the T dense cores and its copies of
    them, and the rule on the T dense cores for the report's full-rank reference of a spectral rule or an isotropic
    cut; in a HOOI frame the rule on the T r' × r' coordinates and the full-rank reference on the T dense cores."""
    total, tasks, widest = sum(ranks), len(ranks), max(ranks)
    wide = frame_rank(rank, total, params)
    dense_rule = (1 + _dense_rule_copies(rule)) * tasks * total**2  # the T cores and the rule's copies
    if wide == total:
        if rule.factored is not None:
            route = 6 * tasks * total * widest + 2 * tasks * widest**2 + 8 * total**2
        elif rule.linear or rule.spectral:
            route = 12 * total**2
        else:
            route = dense_rule + 12 * total**2
        reference = dense_rule if rule.spectral or params.isotropic else 0  # the report's full-rank merge
        working = route + reference + 4 * total**2 + 2 * tasks * rank**2
        return CoreMemory(kept=4 * total**2, working=working, factor_copies=CTM_FACTOR_COPIES)
    block = 2 * wide  # HOOI's blocks: up to 2r' columns
    hooi = 6 * total**2 + 4 * tasks * total * wide + (4 * cs.ANDERSON_WINDOW + 32) * total * block
    coordinates = (1 + _dense_rule_copies(rule)) * tasks * wide**2
    working = coordinates + dense_rule + 8 * total**2
    return CoreMemory(kept=4 * total**2 + hooi, working=working, factor_copies=CTM_FACTOR_COPIES)


def _dense_rule_copies(rule: Rule[Any]) -> int:
    """Arrays of a stack's size the rule holds at once on a dense T × m × n stack: the weighted stack (a linear or
    spectral rule), and for TSV also its SVD's input copy and two singular bases; a rule that acts entry by entry
    up to DENSE_RULE_COPIES (TIES: the weighted stack, its magnitudes, the trimmed stack, its signs, the agreeing
    entries...)."""
    if rule.linear or rule.spectral:
        return 1
    return 4 if rule.factored is not None else DENSE_RULE_COPIES


@register(
    "ctm",
    "Compress-then-Merge: core space, a shared frame of rank r' (HOOI; default: the whole core space), the rule on "
    "the r'×r' coordinates, one cut to rank r (default rule: tsv)",
    # TSV in the whole core space, at λ 1 with no tuning, kept the most of each task's gain on the quality
    # benchmark (docs/benchmarks.md, issue 11: 8 tasks, 3 seeds, ranks 8/16/32, chosen on val by a rule written
    # before the runs). The paper's CtM is frame_rank = r (configs/ctm-paper.yaml).
    default_rule="tsv",
    uses_beta=True,
    parameters=CtmParams,
    merge_groups=compress_then_merge_groups,
    core_numbers=_core_numbers,
)
def compress_then_merge(group: FactorGroup, settings: MergeSettings) -> MergeResult:
    """CtM of one group (see compress_then_merge_groups)."""
    return compress_then_merge_groups([group], [settings])[0]
