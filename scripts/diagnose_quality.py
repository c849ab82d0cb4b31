"""Does the diagnosis predict merge quality? (issue 16, item 3.) Computes ctm_cli.diagnostics' figures on the
quality benchmark's adapters and rank-correlates them with the gain retention (GR) each task kept in the
benchmark's 8-task merges.

    python scripts/diagnose_quality.py --adapters ADAPTERS --results defaults.json [--json out.json] [--markdown out.md]

ADAPTERS holds seed<k>/<task>/ PEFT folders (the benchmark's `--save-adapters`); the results file is the
benchmark's JSON for the same adapters (its "seeds"[i]["final"] rows: combo, rank, test.tasks[task].gr).

The analysis, fixed before it was run:
- Units. GR exists per task only for the merges of all 8 tasks, so every test relates a task's figure to that
  task's test GR in a merge: points are (seed, task) at one rank (24) or (seed, task, rank) over ranks (72).
- Figures of a task t (adapters of one seed; modules pooled as `diagnostics.summarize` pools them):
  overlap_B / overlap_A: mean over the other tasks s of the subspace overlap (mean cos² of principal angles)
  of the column (B) / row (A) spaces, averaged over modules; cosine: mean over s of the cosine of the whole
  updates; dominance: ‖ΔW_t‖ / mean_s ‖ΔW_s‖ of the whole updates; conflict: share of t's energy whose sign
  is against the elected (mass) sign in ctm's default frame (the whole core space). Per merge and rank r:
  kept: share of t's update inside the rank-r merge's column and row spaces (for whole-frame merges, from
  the rule's full-rank merge in core space; for the paper's CtM at frame rank r, t's energy in the HOOI frame
  of rank r, β 1); frame_conflict: conflict in the frame the merge's rule saw (the whole core space, or the
  HOOI frame of rank r).
- Merges (defaults, λ 1): ctm+tsv[frame_rank=0] (ctm's default; the benchmark's mtc+tsv gives the same
  numbers), core+ties (TIES in the whole core space in its singular bases: the frame `conflict` is read in;
  the benchmark's ctm+ties[frame_rank=0] ran in a HOOI basis then, another frame), mtc+ta (the plain sum, cut),
  and the paper's CtM at frame rank r: ctm+tsv, ctm+ties (β 1). Secondary run: the λ-tuned default
  (`--results tuned.json --kind tuned --merges mtc+tsv`; λ chosen on val per seed and rank; λ changes no figure).
- Tests. (A) Spearman ρ over the 24 (seed, task) points, per merge, figure and rank; (B, primary) the same
  over the 72 (seed, task, rank) points; p-values two-sided and exact, by permuting the task labels jointly
  over seeds and ranks (all 8! = 40320 permutations): a task's three seeds are not independent points, so the
  null keeps them together. Benjamini–Hochberg q over the primary family (every merge × figure of B).
  (C) Beyond task identity: ρ of the within-task residuals (figure and GR minus the task's mean over seeds,
  per rank), pooled over ranks; p by 20000 random permutations of seed labels within each task.
  (D) Stability over task subsets: ρ of (B) recomputed with each task left out; the smallest and largest.
  (E) Merge level: the mean GR over tasks against the energy the whole merge keeps at its rank (pooled over
  modules), over the 9 (seed, rank) points, and per rank averaged over seeds.
- Reading. A figure "predicts" if (B) has q < 0.05 with the sign holding in every leave-one-task-out subset
  (D); a significant (C) says it tracks seed-to-seed changes too, not only which task is which.
Descriptive output: per task (mean over seeds) the figures and the default's GR; per module type (mean over
layers and seeds) overlaps, conflict, and the ranks keeping 90/95/99% of the default's full-rank merge.
Runs on the CPU, one thread, in well under a minute for 3 seeds of 8 minilm adapters.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ctm_cli import diagnostics as dg
from ctm_cli.adapter import Adapter
from ctm_cli.core_space import factored_core_space
from ctm_cli.rules import get_rule

TASK_FIGURES = ("overlap_B", "overlap_A", "cosine", "dominance", "conflict")
MERGE_FIGURES = ("kept", "frame_conflict")
WITHIN_TASK_DRAWS = 20000
DRAW_SEED = 0


@dataclass(frozen=True)
class Merge:
    """A benchmark merge and how its figures are read: its rule, and whether its frame is the paper's rank-r one."""

    rule: str
    rank_frame: bool


# The merges whose figures the script knows how to read (β 1; a merge's λ does not change them: every figure is
# a share, and the rules are homogeneous); the first five are analysed unless --merges says otherwise.
MERGES = {
    "ctm+tsv[frame_rank=0]": Merge("tsv", False),
    "core+ties": Merge("ties", False),
    "mtc+ta": Merge("ta", False),
    "ctm+tsv": Merge("tsv", True),
    "ctm+ties": Merge("ties", True),
    "mtc+tsv": Merge("tsv", False),
    "ctm+tsv[frame_rank=0,beta=1]": Merge("tsv", False),
}
DEFAULT_MERGES = tuple(MERGES)[:5]


@dataclass(frozen=True)
class Group:
    """Modules of one shape: their names and concatenated scaled factors (float64)."""

    names: list[str]
    b_cat: torch.Tensor
    a_cat: torch.Tensor
    ranks: list[int]


def load_groups(folders: list[Path]) -> list[Group]:
    """The adapters' modules grouped by shape, as the engine groups them (every adapter must hold every module)."""
    adapters = [Adapter(folder) for folder in folders]
    names = sorted(adapters[0].modules)
    by_shape: dict[tuple[int, int], list[str]] = defaultdict(list)
    for name in names:
        module = adapters[0].modules[name]
        by_shape[(module.out_features, module.in_features)].append(name)
    groups = []
    for members in by_shape.values():
        b_parts, a_parts = [], []
        for adapter in adapters:
            factors = [adapter.factors(name) for name in members]
            scales = torch.tensor([adapter.modules[name].scale for name in members], dtype=torch.float64)
            a_parts.append(torch.stack([a.double() for a, _ in factors]))
            b_parts.append(torch.stack([b.double() for _, b in factors]) * scales.view(-1, 1, 1))
        ranks = [adapter.modules[members[0]].rank for adapter in adapters]
        groups.append(Group(members, torch.cat(b_parts, dim=-1), torch.cat(a_parts, dim=-2), ranks))
    return groups


def _mean_over_others(matrix: np.ndarray) -> np.ndarray:
    """(T,) mean of each row without its diagonal entry."""
    tasks = matrix.shape[-1]
    return (matrix.sum(axis=-1) - np.diagonal(matrix, axis1=-2, axis2=-1)) / (tasks - 1)


def seed_figures(groups: list[Group], ranks: list[int]) -> dict:
    """Every figure of one seed's adapters: per task (rank-free), per merge and rank, per module, per merge level."""
    tasks = len(groups[0].ranks)
    ones = torch.ones(tasks, dtype=torch.float64)
    diagnoses = {
        rule: [dg.diagnose(g.b_cat, g.a_cat, g.ranks, get_rule(rule), ones, get_rule(rule).resolve({})) for g in groups]
        for rule in sorted({merge.rule for merge in MERGES.values()})
    }
    summaries = {rule: dg.summarize(parts) for rule, parts in diagnoses.items()}
    whole = summaries["tsv"]
    per_task = {
        "overlap_B": _mean_over_others(whole.column_overlap.numpy()),
        "overlap_A": _mean_over_others(whole.row_overlap.numpy()),
        "cosine": _mean_over_others(whole.cosine.numpy()),
        "dominance": whole.dominance.numpy(),
        "conflict": whole.task_conflict.numpy(),
    }
    squared_norms = sum(d.norms.square().sum(dim=0) for d in diagnoses["tsv"]).numpy()
    frames = {}
    for rank in ranks:
        against, energy = 0.0, 0.0
        for group in groups:
            cores = factored_core_space(group.b_cat, group.a_cat, group.ranks).cores
            conflict = dg.sign_conflict(dg.frame_coordinates(cores, rank, beta=1.0), ones)
            against, energy = against + conflict.against.sum(dim=0).numpy(), energy + conflict.energy.sum(dim=0).numpy()
        frames[rank] = {"kept": energy / squared_norms, "conflict": against / energy, "total": energy.sum()}
    per_merge = {}
    for combo, merge in MERGES.items():
        summary = summaries[merge.rule]
        per_merge[combo] = {
            rank: {
                "kept": frames[rank]["kept"] if merge.rank_frame else summary.task_curve[:, rank - 1].numpy(),
                "frame_conflict": frames[rank]["conflict"] if merge.rank_frame else summary.task_conflict.numpy(),
                "merge_kept": float(frames[rank]["total"] / squared_norms.sum())
                if merge.rank_frame
                else float(summary.curve[rank - 1]),
            }
            for rank in ranks
        }
    return {
        "per_task": per_task,
        "per_merge": per_merge,
        "per_module": module_rows(groups, diagnoses["tsv"], ranks),
        "ranks_for_keeps": {rule: summary.ranks_for_keeps for rule, summary in summaries.items()},
    }


def module_rows(groups: list[Group], diagnoses: list[dg.Diagnosis], ranks: list[int]) -> list[dict]:
    """Per module: mean overlap of B and A over pairs, conflict share, the share kept at each rank and the ranks
    keeping 90/95/99% (of the merge the diagnoses were made for)."""
    rows = []
    for group, diagnosis in zip(groups, diagnoses, strict=True):
        curves = dg.energy_curve(diagnosis.merge_energies)
        keeps = {keep: dg.rank_for_keep(curves, keep).tolist() for keep in dg.REPORTED_KEEPS}
        for index, name in enumerate(group.names):
            rows.append(
                {
                    "module": name,
                    "overlap_B": float(_mean_over_others(diagnosis.column_overlap[index].numpy()).mean()),
                    "overlap_A": float(_mean_over_others(diagnosis.row_overlap[index].numpy()).mean()),
                    "conflict": float(diagnosis.conflict.against[index].sum() / diagnosis.conflict.energy[index].sum()),
                    **{f"kept_{rank}": float(curves[index, min(rank, curves.shape[-1]) - 1]) for rank in ranks},
                    **{f"rank_{round(keep * 100)}": keeps[keep][index] for keep in dg.REPORTED_KEEPS},
                }
            )
    return rows


# ---------------------------------------------------------------------------------------------- statistics


def rankdata(values: np.ndarray) -> np.ndarray:
    """Ranks 1 … n, ties given their average rank."""
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(1, len(values) + 1)
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    return (np.bincount(inverse, weights=ranks) / counts)[inverse]


def _standardized(values: np.ndarray) -> np.ndarray:
    centered = values - values.mean()
    norm = np.linalg.norm(centered)
    return centered / norm if norm > 0 else centered


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's ρ: the Pearson correlation of the ranks (NaN when either side is constant)."""
    rx, ry = _standardized(rankdata(x)), _standardized(rankdata(y))
    return float(rx @ ry) if rx.any() and ry.any() else math.nan


def permutation_p(x: np.ndarray, y: np.ndarray, permutations: np.ndarray) -> float:
    """Two-sided p of Spearman's ρ against y re-indexed by each row of `permutations` (index arrays of y)."""
    rx, ry = _standardized(rankdata(x)), _standardized(rankdata(y))
    observed = abs(float(rx @ ry))
    null = np.abs(ry[permutations] @ rx)
    return float(np.mean(null >= observed - 1e-12))


def task_permutations(points: list[tuple], tasks: int) -> np.ndarray:
    """(8!, n) indices: for every permutation π of the tasks, the point (…, π(task)) in place of (…, task), the
    other coordinates (seed, rank) kept: a task's points move together."""
    where = {point: i for i, point in enumerate(points)}
    orders = itertools.permutations(range(tasks))
    return np.array([[where[(*point[:-1], order[point[-1]])] for point in points] for order in orders])


def seed_permutations(points: list[tuple], draws: int, seed: int) -> np.ndarray:
    """(draws, n) indices: within every task, the seed labels permuted at random (the same for all its ranks)."""
    rng = np.random.default_rng(seed)
    where = {point: i for i, point in enumerate(points)}
    seeds = sorted({point[0] for point in points})
    tasks = sorted({point[-1] for point in points})
    rows = []
    for _ in range(draws):
        maps = {task: dict(zip(seeds, rng.permutation(seeds), strict=True)) for task in tasks}
        rows.append([where[(maps[point[-1]][point[0]], *point[1:])] for point in points])
    return np.array(rows)


def benjamini_hochberg(p_values: list[float]) -> list[float]:
    """Benjamini–Hochberg q-values, in the given order."""
    count = len(p_values)
    order = np.argsort(p_values)
    q = np.empty(count)
    running = 1.0
    for position in range(count - 1, -1, -1):
        index = order[position]
        running = min(running, p_values[index] * count / (position + 1))
        q[index] = running
    return q.tolist()


# ---------------------------------------------------------------------------------------------- analysis


def result_rows(results: dict, kind: str, merges: list[str]) -> dict[tuple[int, str, int], dict]:
    """The benchmark's test scores (`test`: per task and mean) per (seed, combo, rank), for rows of `kind`."""
    return {
        (seed["seed"], row["combo"], row["rank"]): row["test"]
        for seed in results["seeds"]
        for row in seed["final"]
        if row["kind"] == kind and row["combo"] in merges
    }


def figure_value(figures: dict, seed: int, combo: str, rank: int, task: int, name: str) -> float:
    """One figure of one task for the merge `combo` at rank `rank` of seed `seed`."""
    if name in TASK_FIGURES:
        return float(figures[seed]["per_task"][name][task])
    return float(figures[seed]["per_merge"][combo][rank][name][task])


def task_gains(scores: dict) -> dict[tuple[int, str, int], dict[str, float]]:
    """Test GR per (seed, combo, rank) and task."""
    return {key: {task: values["gr"] for task, values in test["tasks"].items()} for key, test in scores.items()}


def correlations(
    figures: dict, scores: dict, merges: list[str], seeds: list[int], ranks: list[int], tasks: list[str]
) -> dict:
    """Tests A–D of the module doc, for every merge and figure."""
    gr = task_gains(scores)
    names = TASK_FIGURES + MERGE_FIGURES
    pooled_points = [(s, r, t) for s in seeds for r in ranks for t in range(len(tasks))]
    pooled_null = task_permutations(pooled_points, len(tasks))
    within_null = seed_permutations(pooled_points, WITHIN_TASK_DRAWS, DRAW_SEED)
    rank_points = [(s, t) for s in seeds for t in range(len(tasks))]
    rank_null = task_permutations(rank_points, len(tasks))
    results = {}
    for combo in merges:
        for name in names:
            x = np.array([figure_value(figures, s, combo, r, t, name) for s, r, t in pooled_points])
            y = np.array([gr[(s, combo, r)][tasks[t]] for s, r, t in pooled_points])
            per_rank = {}
            for rank in ranks:
                xr = np.array([figure_value(figures, s, combo, rank, t, name) for s, t in rank_points])
                yr = np.array([gr[(s, combo, rank)][tasks[t]] for s, t in rank_points])
                per_rank[rank] = {"rho": spearman(xr, yr), "p": permutation_p(xr, yr, rank_null)}
            residual_x, residual_y = _within_task(x, pooled_points), _within_task(y, pooled_points)
            left_out = [
                spearman(x[[p[-1] != t for p in pooled_points]], y[[p[-1] != t for p in pooled_points]])
                for t in range(len(tasks))
            ]
            results[(combo, name)] = {
                "rho": spearman(x, y),
                "p": permutation_p(x, y, pooled_null),
                "per_rank": per_rank,
                "within_task_rho": spearman(residual_x, residual_y),
                "within_task_p": permutation_p(residual_x, residual_y, within_null),
                "leave_one_out": [min(left_out), max(left_out)],
            }
    for key, q in zip(results, benjamini_hochberg([value["p"] for value in results.values()]), strict=True):
        results[key]["q"] = q
    return results


def _within_task(values: np.ndarray, points: list[tuple]) -> np.ndarray:
    """values minus the mean over seeds of the same (rank, task)."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    for index, point in enumerate(points):
        groups[point[1:]].append(index)
    residual = values.copy()
    for members in groups.values():
        residual[members] -= values[members].mean()
    return residual


def merge_level(figures: dict, scores: dict, merges: list[str], seeds: list[int], ranks: list[int]) -> dict:
    """Test E: mean GR over tasks against the share of energy the whole merge keeps, per (seed, rank)."""
    means = {key: test["mean"]["gr"] for key, test in scores.items()}
    level = {}
    for combo in merges:
        points = [(s, r) for s in seeds for r in ranks]
        kept = np.array([figures[s]["per_merge"][combo][r]["merge_kept"] for s, r in points])
        gr = np.array([means[(s, combo, r)] for s, r in points])
        level[combo] = {
            "rho": spearman(kept, gr),
            "per_rank": {
                r: {
                    "kept": float(np.mean([figures[s]["per_merge"][combo][r]["merge_kept"] for s in seeds])),
                    "gr": float(np.mean([means[(s, combo, r)] for s in seeds])),
                }
                for r in ranks
            },
        }
    return level


# ---------------------------------------------------------------------------------------------- report


def _format(value: float) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def render(analysis: dict, command: str) -> str:
    """The Markdown report of the analysis."""
    ranks = analysis["ranks"]
    lines = [
        "# Does the diagnosis predict merge quality?",
        "",
        f"Command: `{command}`  ",
        f"Seeds {analysis['seeds']}, ranks {ranks}, tasks {', '.join(analysis['tasks'])}; the benchmark's "
        f"{analysis['kind']} rows. The analysis is defined in the docstring of scripts/diagnose_quality.py (written "
        "before the run).",
        "",
        "## Per-task figures against the task's GR (Spearman ρ; p exact over the 8! task permutations)",
        "",
        "| merge | figure | ρ (72 pts) | p | q (BH) | ρ per rank " + " / ".join(map(str, ranks))
        + " | leave-one-task-out ρ | within-task ρ | p |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in analysis["correlations"]:
        per_rank = " / ".join(
            f"{_format(row['per_rank'][str(r)]['rho'])} (p {row['per_rank'][str(r)]['p']:.2f})" for r in ranks
        )
        lines.append(
            f"| {row['merge']} | {row['figure']} | {_format(row['rho'])} | {row['p']:.4f} | {row['q']:.3f} "
            f"| {per_rank} | {_format(row['leave_one_out'][0])} … {_format(row['leave_one_out'][1])} "
            f"| {_format(row['within_task_rho'])} | {row['within_task_p']:.3f} |"
        )
    lines += ["", "## Merge level: mean GR against the share of energy the merge keeps", ""]
    lines += ["| merge | ρ (9 pts) | " + " | ".join(f"r={r}: kept → GR" for r in ranks) + " |"]
    lines += ["|---|---|" + "---|" * len(ranks)]
    for combo, level in analysis["merge_level"].items():
        cells = " | ".join(
            f"{level['per_rank'][str(r)]['kept']:.3f} → {level['per_rank'][str(r)]['gr']:.3f}" for r in ranks
        )
        lines.append(f"| {combo} | {_format(level['rho'])} | {cells} |")
    lines += ["", "## Per task (mean over seeds)", ""]
    default = analysis["merges"][0]
    header = list(TASK_FIGURES) + [f"kept r={r}" for r in ranks] + [f"GR r={r}" for r in ranks]
    lines += [f"| task | {' | '.join(header)} |", "|---|" + "---|" * len(header)]
    for task, row in analysis["per_task"].items():
        values = [row[name] for name in TASK_FIGURES] + [row["kept"][str(r)] for r in ranks]
        values += [row["gr"][str(r)] for r in ranks]
        lines.append(f"| {task} | {' | '.join(_format(v) for v in values)} |")
    lines += ["", f"(kept and GR: {default}.)", "", "## Per module type (mean over layers and seeds)", ""]
    columns = ["overlap_B", "overlap_A", "conflict", *(f"kept_{r}" for r in ranks), "rank_90", "rank_95", "rank_99"]
    lines += [f"| module | {' | '.join(columns)} |", "|---|" + "---|" * len(columns)]
    for kind, row in analysis["per_module_type"].items():
        lines.append(f"| {kind} | {' | '.join(_format(row[c]) for c in columns)} |")
    lines += ["", "## Ranks keeping 90 / 95 / 99% of the full-rank merge (whole adapter, one rank for all modules)", ""]
    for rule, per_seed in analysis["ranks_for_keeps"].items():
        lines.append(f"- {rule}: " + "; ".join(f"seed {s}: {v}" for s, v in per_seed.items()))
    return "\n".join(lines) + "\n"


def _module_type(name: str) -> str:
    """`…layer.3.attention.self.query` → `attention.self.query`: the name after the layer number."""
    parts = name.split(".")
    numbers = [i for i, part in enumerate(parts) if part.isdigit()]
    return ".".join(parts[numbers[-1] + 1 :]) if numbers else name


def analyse(adapters: Path, results: dict, kind: str, merges: list[str]) -> dict:
    """Figures of every seed, the tests and the descriptive tables, as plain data."""
    tasks = results["settings"]["tasks"]
    seeds = [seed["seed"] for seed in results["seeds"]]
    ranks = sorted({row["rank"] for seed in results["seeds"] for row in seed["final"]})
    figures = {
        seed: seed_figures(load_groups([adapters / f"seed{seed}" / task for task in tasks]), ranks) for seed in seeds
    }
    scores = result_rows(results, kind, merges)
    missing = sorted({(combo, rank) for combo in merges for rank in ranks} - {key[1:] for key in scores})
    if missing:
        sys.exit(f"{kind} rows missing from the results: {missing}")
    gr = task_gains(scores)
    tests = correlations(figures, scores, merges, seeds, ranks, tasks)
    default = merges[0]
    per_task = {
        task: {
            **{name: float(np.mean([figures[s]["per_task"][name][t] for s in seeds])) for name in TASK_FIGURES},
            "kept": {
                str(r): float(np.mean([figures[s]["per_merge"][default][r]["kept"][t] for s in seeds])) for r in ranks
            },
            "gr": {str(r): float(np.mean([gr[(s, default, r)][task] for s in seeds])) for r in ranks},
        }
        for t, task in enumerate(tasks)
    }
    by_type: dict[str, list[dict]] = defaultdict(list)
    for seed in seeds:
        for row in figures[seed]["per_module"]:
            by_type[_module_type(row["module"])].append(row)
    per_module_type = {
        kind: {key: float(np.mean([row[key] for row in rows])) for key in rows[0] if key != "module"}
        for kind, rows in sorted(by_type.items())
    }
    return {
        "kind": kind,
        "merges": merges,
        "tasks": tasks,
        "seeds": seeds,
        "ranks": ranks,
        "correlations": [
            {
                "merge": combo,
                "figure": name,
                **{k: v for k, v in value.items() if k != "per_rank"},
                "per_rank": {str(r): v for r, v in value["per_rank"].items()},
            }
            for (combo, name), value in tests.items()
        ],
        "merge_level": {
            combo: {"rho": value["rho"], "per_rank": {str(r): v for r, v in value["per_rank"].items()}}
            for combo, value in merge_level(figures, scores, merges, seeds, ranks).items()
        },
        "per_task": per_task,
        "per_module_type": per_module_type,
        "per_module": {str(seed): figures[seed]["per_module"] for seed in seeds},
        "ranks_for_keeps": {
            rule: {str(seed): list(figures[seed]["ranks_for_keeps"][rule].values()) for seed in seeds}
            for rule in figures[seeds[0]]["ranks_for_keeps"]
        },
    }


def main() -> None:
    """Parse the arguments, run the analysis, print (and write) the report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapters", type=Path, required=True, help="folder of seed<k>/<task>/ PEFT adapters")
    parser.add_argument("--results", type=Path, required=True, help="the quality benchmark's JSON for them")
    parser.add_argument("--kind", default="default", help="which rows of the results: default (λ 1) or tuned")
    parser.add_argument("--merges", nargs="+", choices=sorted(MERGES), default=list(DEFAULT_MERGES))
    parser.add_argument("--json", type=Path, help="write every figure and test here")
    parser.add_argument("--markdown", type=Path, help="write the report here too")
    args = parser.parse_args()
    torch.set_num_threads(1)
    analysis = analyse(args.adapters, json.loads(args.results.read_text()), args.kind, args.merges)
    command = "python scripts/diagnose_quality.py " + " ".join(sys.argv[1:])
    text = render(analysis, command)
    print(text)
    if args.json:
        args.json.write_text(json.dumps(analysis, indent=1))
    if args.markdown:
        args.markdown.write_text(text)


if __name__ == "__main__":
    main()
