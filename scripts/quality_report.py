"""The merge-quality benchmark's summary over seeds and its Markdown report; no model, no merging here."""

from __future__ import annotations

import math
from collections import defaultdict

from quality_metrics import mean_and_spread, nan_mean, rank_by_gr

KIND_ORDER = ("tuned", "default", "beta-study")


def _group_key(row: dict) -> tuple:
    beta = row["beta"] if row["kind"] == "beta-study" else None
    return (row["kind"], row["combo"], row["rank"], beta)


def aggregate(seeds: list[dict]) -> dict:
    """Test scores averaged over seeds: references per task, and one row per kind × method+rule × rank (× β)."""
    tasks = list(seeds[0]["floor"]["test"])
    floor = {t: nan_mean(s["floor"]["test"][t] for s in seeds) for t in tasks}
    individual = {t: nan_mean(s["individual"]["test"][t] for s in seeds) for t in tasks}
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for seed in seeds:
        for row in seed["final"]:
            groups[_group_key(row)].append(row)
    rows = []
    for (kind, combo, rank, beta), members in groups.items():
        gr, spread = mean_and_spread([m["test"]["mean"]["gr"] for m in members])
        per_task = {
            t: {key: nan_mean(m["test"]["tasks"][t][key] for m in members) for key in ("accuracy", "na", "gr")}
            for t in tasks
        }
        rows.append(
            {
                "kind": kind,
                "combo": combo,
                "rank": rank,
                "beta": beta,
                "label": f"{combo} r={rank}" + ("" if beta is None else f" β={beta:g}"),
                "settings": [m["label"] for m in members],
                "output_rank": members[0]["output_rank"],
                "relative_size": members[0]["relative_size"],
                "tasks": per_task,
                "mean": {
                    "accuracy": nan_mean(m["test"]["mean"]["accuracy"] for m in members),
                    "na": nan_mean(m["test"]["mean"]["na"] for m in members),
                    "gr": gr,
                },
                "gr_spread": spread,
                "val_gr": nan_mean(m["val"]["mean"]["gr"] for m in members),
            }
        )
    ordered = {kind: rank_by_gr(r for r in rows if r["kind"] == kind) for kind in KIND_ORDER}
    floor_na = nan_mean(floor[t] / individual[t] for t in tasks)
    return {
        "tasks": tasks,
        "floor": floor,
        "individual": individual,
        "floor_na": floor_na,
        "rows": ordered,
        "defaults_over_ranks": defaults_over_ranks(seeds),
    }


def defaults_over_ranks(seeds: list[dict]) -> list[dict]:
    """Each method+rule at its defaults, GR averaged over the ranks of every seed, then over seeds: the figure
    the default is chosen by (on val; test shown beside it), with the sd over seeds and the mean per rank.
    Pairs missing at some rank of some seed (a fixed-rank method, a failed merge) are left out."""
    cells: dict[str, dict[int, dict[int, dict]]] = defaultdict(lambda: defaultdict(dict))
    for seed in seeds:
        for row in seed["final"]:
            if row["kind"] == "default":
                cells[row["combo"]][seed["seed"]][row["rank"]] = row
    ranks = sorted({row["rank"] for seed in seeds for row in seed["final"] if row["kind"] == "default"})
    table = []
    for combo, by_seed in cells.items():
        if len(by_seed) != len(seeds) or any(sorted(found) != ranks for found in by_seed.values()):
            continue
        entry: dict = {"combo": combo}
        for split in ("val", "test"):
            per_seed = [nan_mean(rows[r][split]["mean"]["gr"] for r in ranks) for rows in by_seed.values()]
            entry[split], entry[f"{split}_spread"] = mean_and_spread(per_seed)
            entry[f"{split}_by_rank"] = {
                r: nan_mean(rows[r][split]["mean"]["gr"] for rows in by_seed.values()) for r in ranks
            }
        table.append(entry)
    return sorted(table, key=lambda e: (-e["val"] if math.isfinite(e["val"]) else math.inf, e["combo"]))


# Settings that must agree for runs to be combined into one table (everything but seeds, paths and timings).
SAME_IN_COMBINED_RUNS = (
    "tasks",
    "split_sizes",
    "ranks",
    "study_rank",
    "quick",
    "epochs",
    "temperature",
    "max_length",
    "grid",
    "catalog",
)


def combine_runs(runs: list[dict]) -> dict:
    """Several runs of the same benchmark with different seeds (separate GPU calls, say) as one result: their
    seeds side by side and the summary over all of them. Refuses runs whose settings differ or seeds repeat."""
    first = runs[0]["settings"]
    for run in runs[1:]:
        differing = [key for key in SAME_IN_COMBINED_RUNS if run["settings"].get(key) != first.get(key)]
        if differing:
            raise ValueError(
                f"runs differ in {', '.join(differing)}: {first['command']!r} vs {run['settings']['command']!r}"
            )
    seeds = [seed for run in runs for seed in run["seeds"]]
    numbers = [seed["seed"] for seed in seeds]
    if len(set(numbers)) != len(numbers):
        raise ValueError(f"a seed appears in more than one run: {sorted(numbers)}")
    settings = {
        **first,
        "command": " + ".join(run["settings"]["command"] for run in runs),
        "seeds": numbers,
        "seeds_done": numbers,
        "seconds": {
            f"run {i + 1} {key}": value
            for i, run in enumerate(runs)
            for key, value in run["settings"]["seconds"].items()
        },
    }
    return {"settings": settings, "seeds": seeds, "summary": aggregate(seeds)}


def _f(value: float | None, digits: int = 3) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _table(header: list[str], body: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(cells) + " |" for cells in body]


def _settings(row: dict) -> str:
    """The val-chosen settings of each seed, with the method+rule and rank left out."""
    prefix = f"{row['combo']} r={row['rank']}"
    return "; ".join(s.removeprefix(prefix).strip() or "defaults" for s in row["settings"])


def _score_table(rows: list[dict], tasks: list[str], with_settings: bool) -> list[str]:
    header = ["#", "method+rule", "rank", "out rank", "size vs T adapters"]
    header += ["settings (val-chosen)"] if with_settings else []
    header += ["NA", "GR", "± sd", "val GR"] + [f"GR {t}" for t in tasks]
    body = []
    for place, row in enumerate(rows, 1):
        cells = [str(place), row["combo"], str(row["rank"]), str(row["output_rank"]), f"{row['relative_size']:.3f}"]
        cells += [_settings(row)] if with_settings else []
        cells += [_f(row["mean"]["na"]), _f(row["mean"]["gr"]), _f(row["gr_spread"]), _f(row["val_gr"])]
        cells += [_f(row["tasks"][t]["gr"], 2) for t in tasks]
        body.append(cells)
    return _table(header, body)


def _defaults_over_ranks(entries: list[dict]) -> list[str]:
    if not entries:
        return ["No pair was run at its defaults at every rank of every seed."]
    ranks = list(entries[0]["test_by_rank"])
    header = ["#", "method+rule", "val GR", "± sd", "test GR", "± sd"] + [f"test GR r={r}" for r in ranks]
    body = [
        [str(place), e["combo"], _f(e["val"]), _f(e["val_spread"]), _f(e["test"]), _f(e["test_spread"])]
        + [_f(e["test_by_rank"][r]) for r in ranks]
        for place, e in enumerate(entries, 1)
    ]
    return _table(header, body)


def _lambda_sweep(seed: dict, rank: int) -> list[str]:
    """Validation mean GR of every ta / svd configuration at `rank` for each λ of the grid (first seed)."""
    sweep: dict[str, dict[float, float]] = defaultdict(dict)
    for row in seed["tuning"]:
        if row["rank"] != rank or not any(part.startswith("λ=") for part in row["label"].split()):
            continue
        if not row["combo"].endswith(("+ta", "+svd")):
            continue
        parts = row["label"].split()
        lam = next(float(p[2:]) for p in parts if p.startswith("λ="))
        sweep[" ".join(p for p in parts if not p.startswith("λ="))][lam] = row["val"]["mean"]["gr"]
    lambdas = sorted({lam for values in sweep.values() for lam in values})
    body = [[label] + [_f(values.get(lam)) for lam in lambdas] for label, values in sorted(sweep.items())]
    return _table(["configuration"] + [f"λ={lam:g}" for lam in lambdas], body)


def _loo(seed: dict) -> list[str]:
    loo = seed["leave_one_task_out"]
    lines = [
        f"Best configuration on all tasks (val mean GR): **{loo['overall_best']}**. "
        f"Folds choosing the same: {loo['agreement']:.0%}; mean held-out GR of the fold choices: "
        f"{_f(loo['held_out_mean_gr'])}.",
        "",
    ]
    body = [[f["held_out"], f["chosen"], _f(f["held_out_gr"]), _f(f["overall_best_held_out_gr"])] for f in loo["folds"]]
    return lines + _table(["held-out task", "chosen on the other tasks", "its GR there", "overall best's GR"], body)


def _estimate_check(seeds: list[dict]) -> str:
    """How far λ-by-scaling on val was from the CLI merge made at that λ (should be ~0)."""
    gaps = [
        abs(r["val_gr_estimate"] - r["val"]["mean"]["gr"])
        for s in seeds
        for r in s["final"]
        if r["val_gr_estimate"] is not None and math.isfinite(r["val_gr_estimate"])
    ]
    if not gaps:
        return "No tuned row to check."
    return (
        f"λ was swept on val by scaling one merge; each chosen setting was then merged again by the CLI at that λ. "
        f"Largest |val GR (scaled) − val GR (CLI at λ)| over {len(gaps)} rows: {max(gaps):.2e}."
    )


def render_markdown(results: dict) -> str:
    """The report: setup, references, ranking of tuned merges by GR, defaults, β study, λ sweep, leave-one-out."""
    settings, summary, seeds = results["settings"], results["summary"], results["seeds"]
    tasks = summary["tasks"]
    lines = [
        "# Merge quality on real tasks (scripts/bench_quality.py)",
        "",
        f"Command: `{settings['command']}`  ",
        f"Device: {settings['device_name']}; seeds {[s['seed'] for s in seeds]} (of {settings['seeds']} asked); "
        f"ranks {settings['ranks']}; "
        f"{'quick mode; ' if settings['quick'] else ''}adapters {seeds[0]['adapter_source']}.  ",
        f"Catalog: {settings['catalog']['source']}: methods "
        f"{', '.join(m['name'] for m in settings['catalog']['methods'])}; rules "
        f"{', '.join(r['name'] for r in settings['catalog']['rules'])}; "
        "plus PEFT add_weighted_adapter svd, ties_svd"
        + (f"; run on the pairs {', '.join(settings['catalog']['pairs'])}" if settings["catalog"].get("pairs") else "")
        + ".  ",
        f"Tuning grid (val split carved from train, never test): {settings['grid']}.  ",
        "Splits per task: " + "; ".join(f"{t} {sizes}" for t, sizes in settings["split_sizes"].items()) + ".  ",
        "Time: " + ", ".join(f"{k} {v:.0f} s" for k, v in settings["seconds"].items()) + ".",
        "",
        "NA = merged / individual accuracy; GR = (merged − floor) / (individual − floor); both on test, "
        "per task then averaged over tasks (and seeds). Size = LoRA parameters / those of all T inputs.",
        "",
        "## References (test accuracy)",
        "",
    ]
    body = [
        [t, _f(summary["floor"][t]), _f(summary["individual"][t]), _f(summary["floor"][t] / summary["individual"][t])]
        for t in tasks
    ]
    body.append(
        ["mean", _f(nan_mean(summary["floor"].values())), _f(nan_mean(summary["individual"].values())),
         _f(summary["floor_na"])]
    )  # fmt: skip
    lines += _table(["task", "floor (base)", "individual", "floor NA"], body)
    lines += ["", "## Ranking by gain retention (settings tuned on val)", ""]
    lines += _score_table(summary["rows"]["tuned"], tasks, with_settings=True)
    lines += ["", "## Defaults averaged over ranks (the default is chosen by val GR; test beside it)", ""]
    lines += _defaults_over_ranks(summary.get("defaults_over_ranks", []))
    lines += ["", "## Defaults (no tuning: λ = 1, β = 1, rule defaults)", ""]
    lines += _score_table(summary["rows"]["default"], tasks, with_settings=False)
    if summary["rows"]["beta-study"]:
        lines += ["", f"## β study at r = {settings['study_rank']} (λ tuned on val for each β)", ""]
        body = [
            [r["combo"], _f(r["beta"], 2), _settings(r), _f(r["val_gr"]), _f(r["mean"]["na"]), _f(r["mean"]["gr"])]
            for r in sorted(summary["rows"]["beta-study"], key=lambda r: (r["combo"], r["beta"]))
        ]
        lines += _table(["method+rule", "β", "settings", "val GR", "test NA", "test GR"], body)
    if seeds[0]["leave_one_task_out"] is not None:  # absent without tuning
        lines += ["", f"## λ sweep at r = {settings['study_rank']}: val mean GR (seed {seeds[0]['seed']})", ""]
        lines += _lambda_sweep(seeds[0], settings["study_rank"])
        lines += ["", f"## Leave one task out at r = {settings['study_rank']} (val GR, seed {seeds[0]['seed']})", ""]
        lines += _loo(seeds[0])
    lines += ["", "## Checks and skipped merges", "", _estimate_check(seeds), ""]
    skipped = {item["label"]: item["error"] for s in seeds for item in s["skipped"]}
    lines += [f"- skipped `{label}`: {error}" for label, error in sorted(skipped.items())] or ["No merge failed."]
    return "\n".join(lines) + "\n"
