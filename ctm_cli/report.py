"""The merge report: a JSON document for machines and a 30-second Markdown summary for people."""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ctm_cli import __version__, human
from ctm_cli.adapter import Adapter
from ctm_cli.methods import METHODS
from ctm_cli.untrusted import printable

if TYPE_CHECKING:  # the dry run describes its inputs with this module, without the engine
    from ctm_cli.engine import ModuleStats

WORST_SHOWN = 5
# Bytes read at a time when an input is hashed.
HASH_CHUNK = 8 * 1024**2


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, read in large chunks into one buffer: the GIL is released while each is read and
    hashed and taken back once a chunk, so a hash running beside a merge seldom takes it from the merge's thread."""
    digest = hashlib.sha256()
    buffer = memoryview(bytearray(HASH_CHUNK))
    with path.open("rb", buffering=0) as handle:
        while count := handle.readinto(buffer):
            digest.update(buffer[:count])
    return digest.hexdigest()


def describe_input(adapter: Adapter, weight: float, revision: str | None = None) -> dict[str, Any]:
    """Where an input came from (with the Hub commit it was read at) and what it is, for the report."""
    return {
        "source": adapter.source,
        "revision": revision,
        "path": str(adapter.folder),
        "base_model": adapter.base_model,
        "r": adapter.config["r"],
        "lora_alpha": adapter.config["lora_alpha"],
        "use_rslora": adapter.use_rslora,
        "weight": weight,
        "weights_file": adapter.weights_path.name,
        "sha256": sha256_of(adapter.weights_path),
    }


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def total_loss(stats: list[ModuleStats], energies: dict[str, float]) -> float | None:
    """The modules' full_rank_loss pooled: weighted by `energies` (each module's full-rank merge energy), or the
    plain mean where they are all zero or missing; None if a module has no loss."""
    losses = [s.full_rank_loss for s in stats]
    if not stats or any(loss is None for loss in losses):
        return None
    weights = [energies.get(s.name, 0.0) for s in stats]
    if sum(weights) <= 0:
        weights = [1.0] * len(stats)
    return sum(w * loss for w, loss in zip(weights, losses, strict=True) if loss is not None) / sum(weights)


def build_report(
    inputs: list[dict[str, Any]],
    settings: dict[str, Any],
    stats: list[ModuleStats],
    seconds: float,
    full_rank_energies: dict[str, float] | None = None,
) -> dict[str, Any]:
    """The JSON report: inputs, settings, per-module statistics and their totals (the loss against the full-rank
    merge pooled over modules by `full_rank_energies`, each module's ‖F‖², where given)."""
    errors = [s.relative_error for s in stats if s.relative_error is not None]
    losses = [s.truncation_loss for s in stats if s.truncation_loss is not None]
    full_rank_losses = [s.full_rank_loss for s in stats if s.full_rank_loss is not None]
    per_adapter = [_mean([s.kept_energy[t] for s in stats]) for t in range(len(inputs))]
    return {
        "ctm_version": __version__,
        "settings": settings,
        "inputs": inputs,
        "summary": {
            "modules": len(stats),
            "written_rank": settings["written_rank"],
            "mean_kept_energy_per_input": per_adapter,
            "mean_relative_error": _mean(errors),
            "max_relative_error": max(errors) if errors else None,
            "mean_truncation_loss": _mean(losses),
            "max_truncation_loss": max(losses) if losses else None,
            "total_full_rank_loss": total_loss(stats, full_rank_energies or {}),
            "total_full_rank_loss_pooling": "energy" if full_rank_energies else "mean",
            "max_full_rank_loss": max(full_rank_losses) if full_rank_losses else None,
            "seconds": seconds,
        },
        "modules": [asdict(s) for s in stats],
    }


def _percent(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{100 * value:.2f}%"


def _requested(settings: dict[str, Any]) -> str:
    """The requested rank, where the written one differs (methods that set their own rank)."""
    requested = settings["requested_rank"]
    return f" (requested {requested})" if requested != settings["written_rank"] else ""


def _error_lines(settings: dict[str, Any], summary: dict[str, Any]) -> list[str]:
    """What the output loses against the same rule at full rank, and its relative error where known."""
    lines = []
    if summary.get("total_full_rank_loss") is not None:
        lines.append(
            f"- energy lost against the full-rank {settings['rule']} merge ({settings['method']} without the cut to "
            f"rank r): {_percent(summary['total_full_rank_loss'])} in total"
            f"{'' if summary.get('total_full_rank_loss_pooling') == 'energy' else ' (mean over modules)'}, "
            "worst module "
            f"{_percent(summary['max_full_rank_loss'])}"
        )
    if summary["mean_relative_error"] is not None:
        lines.append(
            f"- relative error against the full-rank {settings['rule']} merge: mean "
            f"{_percent(summary['mean_relative_error'])}, worst {_percent(summary['max_relative_error'])}"
        )
    return lines


def _truncation_lines(summary: dict[str, Any]) -> list[str]:
    if summary["mean_truncation_loss"] is None:
        return []
    return [
        f"- energy lost by the final truncation: mean {_percent(summary['mean_truncation_loss'])}, "
        f"worst {_percent(summary['max_truncation_loss'])}"
    ]


def _rank_choice_lines(choice: dict[str, Any] | None) -> list[str]:
    """With --rank auto: which rank the modules got, and why."""
    if choice is None:
        return []
    keep = _percent(choice["keep"])
    if choice["global_rank"] is not None:
        below = choice["total_kept_one_rank_lower"]
        lower = f"; rank {choice['global_rank'] - 1} keeps {_percent(below)}" if below is not None else ""
        return [
            f"- --rank auto: rank {choice['global_rank']} for every module, the smallest keeping {keep} of the "
            f"full-rank merge's energy (it keeps {_percent(choice['total_kept'])}{lower})"
        ]
    ranks = sorted({m["rank"] for m in choice["modules"]})
    return [
        f"- --rank auto --rank-per-module: each module the smallest rank keeping {keep} of its full-rank merge's "
        f"energy: ranks {ranks[0]}–{ranks[-1]} (rank_pattern), {_percent(choice['total_kept'])} kept in total; "
        "per module in merge_report.json's rank_choice"
    ]


def _diagnosis_lines(diagnosis: dict[str, Any] | None, sources: list[str]) -> list[str]:
    """The inputs' diagnosis in a few lines: overlap, dominance, conflict, ranks for 90 / 95 / 99%."""
    if diagnosis is None:
        return []
    total = diagnosis["total"]
    tasks = len(sources)

    def pairs_mean(matrix: list[list[float]]) -> float:
        return (sum(map(sum, matrix)) - sum(matrix[t][t] for t in range(tasks))) / max(tasks * (tasks - 1), 1)

    ranks = "; ".join(
        f"{label} {' / '.join(str(r) for r in keeps.values())}" for label, keeps in total["ranks_for_keep"].items()
    )
    dominance = ", ".join(f"{source} {value:.2f}" for source, value in zip(sources, total["dominance"], strict=True))
    return [
        "",
        "Diagnosis of the inputs (all figures: merge_report.json's `diagnosis`):",
        "",
        f"- overlap (mean cos² of principal angles, pairs of adapters, mean over modules): column spaces "
        f"{pairs_mean(total['column_overlap']):.3f}, row spaces {pairs_mean(total['row_overlap']):.3f}",
        f"- dominance (‖ΔW_t‖ / mean): {dominance}",
        f"- sign conflict: {_percent(total['conflict'])} of the energy",
        f"- one rank for every module keeping 90 / 95 / 99% of the full-rank merge: {ranks}",
    ]


def _quirk_lines(report: dict[str, Any]) -> list[str]:
    """What was done about inputs that lack modules and about non-LoRA tensors, if anything."""
    lines = [
        f"- {item['source']} lacks {len(item['missing_modules'])} modules (merged as zero updates): "
        + ", ".join(item["missing_modules"][:WORST_SHOWN])
        + (" ..." if len(item["missing_modules"]) > WORST_SHOWN else "")
        for item in report["inputs"]
        if item.get("missing_modules")
    ]
    lines += [
        f"- non-LoRA tensor {entry['key']}: {entry['action']} ({', '.join(entry['from'])})"
        for entry in report.get("extra_tensors", [])
    ]
    lines += [f"- warning: {warning}" for warning in report.get("warnings", [])]
    return ["", "Quirks handled:", "", *lines] if lines else []


def _rule_params(settings: dict[str, Any]) -> str:
    """The rule's parameters as typed on a command line: ` (density=0.2, lambda=1)`."""
    return f" ({human.value(settings['rule_params'])})" if settings["rule_params"] else ""


def _beta(settings: dict[str, Any]) -> str:
    """CtM's β, for the methods it acts on only."""
    return f", β = {human.number(settings['beta'])}" if METHODS[settings["method"]].uses_beta else ""


def render_markdown(report: dict[str, Any]) -> str:
    """A short human summary: settings, inputs, totals and the worst modules first (text from the inputs
    escaped: no control characters)."""
    settings, summary = report["settings"], report["summary"]
    lines = [
        "# ctm merge report",
        "",
        f"- method **{settings['method']}**, rule **{settings['rule']}**{_rule_params(settings)}, "
        f"rank **{summary['written_rank']}**{_requested(settings)}{_beta(settings)}",
        f"- {summary['modules']} modules merged in {summary['seconds']:.2f} s on {settings['device']} "
        f"(ctm {report['ctm_version']})",
        *_error_lines(settings, summary),
        *_rank_choice_lines(report.get("rank_choice")),
        *_truncation_lines(summary),
        "",
        "| input | r | alpha | weight | energy kept (mean over modules) |",
        "|---|---|---|---|---|",
    ]
    for item, kept in zip(report["inputs"], summary["mean_kept_energy_per_input"], strict=True):
        weight = human.number(item["weight"])
        lines.append(f"| {item['source']} | {item['r']} | {item['lora_alpha']} | {weight} | {_percent(kept)} |")
    modules = report["modules"]
    worst = sorted(modules, key=lambda m: -(m.get("full_rank_loss") or 0.0))[:WORST_SHOWN]
    if worst and worst[0].get("full_rank_loss") is not None:
        lines += [
            "",
            f"Worst {len(worst)} modules by energy lost against the full-rank merge:",
            "",
            "| module | shape | rank | lost | relative error | least energy kept |",
            "|---|---|---|---|---|---|",
        ]
        for m in worst:
            lines.append(
                f"| {m['name']} | {m['out_features']}×{m['in_features']} | {m['written_rank']} "
                f"| {_percent(m['full_rank_loss'])} | {_percent(m['relative_error'])} "
                f"| {_percent(min(m['kept_energy']))} |"
            )
    lines += _diagnosis_lines(report.get("diagnosis"), [item["source"] for item in report["inputs"]])
    lines += _quirk_lines(report)
    lines += ["", "Per-module figures are in merge_report.json.", ""]
    return "\n".join(printable(line) for line in lines)
