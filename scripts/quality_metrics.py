"""Pure arithmetic of the merge-quality benchmark: label words, NA and GR, ranking, leave-one-task-out.

No I/O and no model here, so every number the report prints can be unit-tested on its own.
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Iterable, Mapping

# Codes that some datasets use as class names, expanded to the words a sentence encoder understands.
CODE_WORDS = {
    "abbr": "abbreviation",
    "desc": "description",
    "enty": "entity",
    "hum": "human",
    "loc": "location",
    "num": "number",
    "sci": "science",
    "tech": "technology",
}


def label_words(name: str) -> str:
    """The words a class name stands for: codes expanded (TREC's ABBR → abbreviation), separators as spaces."""
    tokens = re.findall(r"[A-Za-z0-9]+", name)
    return " ".join(CODE_WORDS.get(token.lower(), token.lower()) for token in tokens)


def check_label_words(task: str, class_names: list[str]) -> None:
    """Refuse class names whose label words are empty or repeat within the task: a zero-shot head built from
    them would score that class at chance (or two classes as one), so the task's figures would mean nothing."""
    seen: dict[str, str] = {}
    for name in class_names:
        words = label_words(name)
        if not words:
            raise ValueError(f"task {task!r}: class {name!r} has no label words (letters or digits)")
        if words in seen:
            raise ValueError(f"task {task!r}: classes {seen[words]!r} and {name!r} both read {words!r}")
        seen[words] = name


def normalized_accuracy(merged: float, individual: float) -> float:
    """NA = merged / individual accuracy on one task (1.0 = the task's own adapter)."""
    return merged / individual if individual > 0 else math.nan


def gain_retention(merged: float, individual: float, floor: float) -> float:
    """GR = (merged − floor) / (individual − floor): the share of the adapter's gain over the base that survives.

    NaN where the adapter gained nothing over the base (the ratio would mean nothing).
    """
    gap = individual - floor
    return (merged - floor) / gap if gap > 0 else math.nan


def nan_mean(values: Iterable[float]) -> float:
    """Mean of the finite values (NaN when there are none), so one degenerate task does not blank a row."""
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def score_row(merged: Mapping[str, float], individual: Mapping[str, float], floor: Mapping[str, float]) -> dict:
    """Per-task and mean accuracy, NA, GR and the floor's NA for one merged adapter.

    `merged`, `individual` and `floor` map task names to accuracies on the same split.
    """
    tasks = {}
    for task, accuracy in merged.items():
        tasks[task] = {
            "accuracy": accuracy,
            "na": normalized_accuracy(accuracy, individual[task]),
            "gr": gain_retention(accuracy, individual[task], floor[task]),
            "floor_na": normalized_accuracy(floor[task], individual[task]),
        }
    mean = {key: nan_mean(t[key] for t in tasks.values()) for key in ("accuracy", "na", "gr", "floor_na")}
    return {"tasks": tasks, "mean": mean}


def sort_key_by_gr(row: Mapping) -> tuple:
    """Sort key: highest mean GR first, NaN last, then by label so the order is deterministic."""
    gr = row["mean"]["gr"]
    return (not math.isfinite(gr), -gr if math.isfinite(gr) else 0.0, row["label"])


def rank_by_gr(rows: Iterable[Mapping]) -> list[Mapping]:
    """Rows ordered best first by mean gain retention."""
    return sorted(rows, key=sort_key_by_gr)


def mean_and_spread(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation of per-seed values (spread 0 for one seed)."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return math.nan, math.nan
    return statistics.fmean(finite), statistics.stdev(finite) if len(finite) > 1 else 0.0


def best_config(per_task: Mapping[str, Mapping[str, float]], tasks: Iterable[str]) -> str:
    """The configuration with the highest mean GR over `tasks` (ties broken by name).

    `per_task` maps a configuration label to its GR on each task.
    """
    chosen = list(tasks)

    def score(label: str) -> tuple:
        value = nan_mean(per_task[label][t] for t in chosen)
        return (math.isfinite(value), value if math.isfinite(value) else 0.0, _reverse(label))

    return max(per_task, key=score)


def _reverse(label: str) -> tuple:
    """Key that makes `max` prefer the alphabetically first label on ties."""
    return tuple(-ord(c) for c in label)


def leave_one_task_out(per_task: Mapping[str, Mapping[str, float]]) -> dict:
    """Choose the best configuration on all tasks but one and score it on the one left out, for every task.

    Shows whether a default picked on these tasks carries to a task it was not picked on: the overall best,
    each fold's choice, the held-out GR of that choice and of the overall best, and how often they agree.
    """
    tasks = sorted(next(iter(per_task.values())))
    overall = best_config(per_task, tasks)
    folds = []
    for held_out in tasks:
        chosen = best_config(per_task, [t for t in tasks if t != held_out])
        folds.append(
            {
                "held_out": held_out,
                "chosen": chosen,
                "held_out_gr": per_task[chosen][held_out],
                "overall_best_held_out_gr": per_task[overall][held_out],
            }
        )
    return {
        "overall_best": overall,
        "folds": folds,
        "agreement": sum(f["chosen"] == overall for f in folds) / len(folds),
        "held_out_mean_gr": nan_mean(f["held_out_gr"] for f in folds),
    }
