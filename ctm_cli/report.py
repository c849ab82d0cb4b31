"""The merge report: a JSON document for machines and a 30-second Markdown summary for people."""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ctm_cli import __version__
from ctm_cli.adapter import Adapter
from ctm_cli.engine import ModuleStats
from ctm_cli.untrusted import printable

WORST_SHOWN = 5


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
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


def build_report(
    inputs: list[dict[str, Any]],
    settings: dict[str, Any],
    stats: list[ModuleStats],
    seconds: float,
) -> dict[str, Any]:
    """The JSON report: inputs, settings, per-module statistics and their totals."""
    errors = [s.relative_error for s in stats if s.relative_error is not None]
    losses = [s.truncation_loss for s in stats if s.truncation_loss is not None]
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


def _error_line(settings: dict[str, Any], summary: dict[str, Any]) -> str:
    if summary["mean_relative_error"] is None:
        return (
            f"- relative error: not computed ({settings['rule']} is nonlinear and {settings['method']} "
            "never forms its full-space result)"
        )
    return (
        f"- relative error against the full-rank {settings['rule']} merge: mean "
        f"{_percent(summary['mean_relative_error'])}, worst {_percent(summary['max_relative_error'])}"
    )


def _truncation_lines(summary: dict[str, Any]) -> list[str]:
    if summary["mean_truncation_loss"] is None:
        return []
    return [
        f"- energy lost by the final truncation: mean {_percent(summary['mean_truncation_loss'])}, "
        f"worst {_percent(summary['max_truncation_loss'])}"
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


def render_markdown(report: dict[str, Any]) -> str:
    """A short human summary: settings, inputs, totals and the worst modules first (text from the inputs
    escaped: no control characters)."""
    settings, summary = report["settings"], report["summary"]
    lines = [
        "# ctm merge report",
        "",
        f"- method **{settings['method']}**, rule **{settings['rule']}** {settings['rule_params']}, "
        f"rank **{summary['written_rank']}**{_requested(settings)}, β = {settings['beta']}",
        f"- {summary['modules']} modules merged in {summary['seconds']:.2f} s on {settings['device']} "
        f"(ctm {report['ctm_version']})",
        _error_line(settings, summary),
        *_truncation_lines(summary),
        "",
        "| input | r | alpha | weight | energy kept (mean over modules) |",
        "|---|---|---|---|---|",
    ]
    for item, kept in zip(report["inputs"], summary["mean_kept_energy_per_input"], strict=True):
        lines.append(f"| {item['source']} | {item['r']} | {item['lora_alpha']} | {item['weight']} | {_percent(kept)} |")
    modules = report["modules"]
    worst = sorted(modules, key=lambda m: -(m["relative_error"] or 0.0))[:WORST_SHOWN]
    if worst and worst[0]["relative_error"] is not None:
        lines += [
            "",
            f"Worst {len(worst)} modules by relative error:",
            "",
            "| module | shape | error | least energy kept |",
            "|---|---|---|---|",
        ]
        for m in worst:
            lines.append(
                f"| {m['name']} | {m['out_features']}×{m['in_features']} | {_percent(m['relative_error'])} "
                f"| {_percent(min(m['kept_energy']))} |"
            )
    lines += _quirk_lines(report)
    lines += ["", "Per-module figures are in merge_report.json.", ""]
    return "\n".join(printable(line) for line in lines)
