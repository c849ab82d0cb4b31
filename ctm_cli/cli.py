"""The `ctm` command line: parses, calls the pipeline, prints. No math here."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ctm_cli import __version__
from ctm_cli.errors import EXIT_INTERNAL, EXIT_INTERRUPTED, CtmError, UsageError

app = typer.Typer(
    name="ctm",
    help="Merge several LoRA adapters into one low-rank adapter with Compress-then-Merge.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
)
stderr = Console(stderr=True)


def _version(value: bool) -> None:
    if value:
        print(f"ctm {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """Merge several LoRA adapters into one low-rank adapter with Compress-then-Merge."""


def _parse_floats(text: str | None, option: str) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(part) for part in text.split(",")]
    except ValueError as exc:
        raise UsageError(f"{option} expects comma-separated numbers, got {text!r}") from exc


def _parse_params(items: list[str]) -> dict[str, float]:
    params = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            params[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise UsageError(f"--param expects NAME=NUMBER, got {item!r}")
    return params


def _run(action: Callable[[], Any]) -> Any:
    """Run an action, turning expected failures into one line on stderr and a stable exit code."""
    try:
        return action()
    except CtmError as exc:
        message = " ".join(str(exc).splitlines())  # always one line
        stderr.print(f"[red]ctm: error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        stderr.print("ctm: interrupted; nothing was written")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except Exception as exc:
        if os.environ.get("CTM_DEBUG"):
            raise
        message = f"ctm: internal error: {type(exc).__name__}: {exc} (set CTM_DEBUG=1 for a traceback)"
        stderr.print(message, markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_INTERNAL) from None


class _ProgressBar:
    """A rich progress bar over modules on stderr, or nothing when quiet."""

    def __init__(self, quiet: bool):
        self._progress = (
            None
            if quiet
            else Progress(
                TextColumn("merging"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=stderr,
                transient=True,
            )
        )
        self._task = None

    def start(self, total: int) -> None:
        if self._progress is not None:
            self._progress.start()
            self._task = self._progress.add_task("merge", total=total)

    def advance(self, done: int) -> None:
        if self._progress is not None:
            self._progress.advance(self._task, done)

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()


@app.command()
def merge(
    sources: list[str] = typer.Argument(..., help="Adapter folders or Hub repos (org/name[@revision])."),
    output: Path = typer.Option(..., "--output", "-o", help="Output folder for the merged adapter."),
    rank: int = typer.Option(16, "--rank", "-r", help="Rank of the merged adapter."),
    method: str = typer.Option("ctm", "--method", "-m", help="Merge method (ctm, cat)."),
    rule: str = typer.Option("ta", "--rule", help="Merging rule (ta, mean)."),
    weights: str | None = typer.Option(None, "--weights", "-w", help="Per-adapter weights, e.g. 1,0.5."),
    lambda_: float | None = typer.Option(None, "--lambda", help="Scaling λ of the ta rule."),
    param: list[str] = typer.Option([], "--param", "-p", help="Rule parameter NAME=VALUE (repeatable)."),
    beta: float = typer.Option(1.0, "--beta", help="CtM balancing β in [0, 1] (1 = off, 0 = equal tasks)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    dtype: str | None = typer.Option(None, "--dtype", help="Output dtype (float32, float16, bfloat16)."),
    seed: int = typer.Option(0, "--seed", help="Seed for rules that use randomness."),
    max_memory_mb: int = typer.Option(2048, "--max-memory", help="Working-memory budget per group, MiB."),
    force: bool = typer.Option(False, "--force", "-f", help="Replace an existing output folder."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress or summary output."),
    modules_to_save: str | None = typer.Option(
        None, "--modules-to-save", help="Non-LoRA tensors (heads): drop, first or mean (default: refuse)."
    ),
    allow_missing: bool = typer.Option(
        False, "--allow-missing", help="Merge a module some adapters lack as a zero update for them."
    ),
) -> None:
    """Merge adapters into one rank-r PEFT adapter.

    Example: ctm merge math/ code/ org/chat-lora@main --rank 16 --rule ta -o merged/
    """
    from ctm_cli.pipeline import MergeRequest, run_merge

    def action() -> dict:
        params = _parse_params(param)
        if lambda_ is not None:
            params["lambda"] = lambda_
        request = MergeRequest(
            sources=sources,
            output=output,
            rank=rank,
            method=method,
            rule=rule,
            rule_params=params,
            weights=_parse_floats(weights, "--weights"),
            beta=beta,
            device=device,
            dtype=dtype,
            seed=seed,
            max_memory=max_memory_mb * 1024**2,
            force=force,
            modules_to_save=modules_to_save,
            allow_missing=allow_missing,
        )
        bar = _ProgressBar(quiet or as_json)
        try:
            return run_merge(request, bar.start, bar.advance)
        finally:
            bar.stop()

    report = _run(action)
    if as_json:
        print(json.dumps(report, indent=2))
    elif not quiet:
        summary = report["summary"]
        worst = summary["max_relative_error"]
        stderr.print(
            f"merged {len(sources)} adapters → {escape(str(output))} (rank {summary['output_rank']}, "
            f"{summary['modules']} modules, {summary['seconds']:.2f} s"
            + (f", worst relative error {worst:.3%})" if worst is not None else ")"),
            highlight=False,
            soft_wrap=True,
        )


@app.command()
def inspect(
    path: str = typer.Argument(..., help="Adapter folder or Hub repo."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON on stdout."),
    spectra: int = typer.Option(8, "--spectra", help="Singular values shown per module in the table."),
) -> None:
    """Show what an adapter is: base model, ranks, scale, modules, sizes and per-module spectra."""
    from ctm_cli.adapter import Adapter
    from ctm_cli.sources import resolve_source
    from ctm_cli.summary import summarize

    info = _run(lambda: summarize(Adapter(resolve_source(path), path)))
    if as_json:
        print(json.dumps(info, indent=2))
        return
    _print_summary(info, spectra)


def _print_summary(info: dict, spectra: int) -> None:
    console = Console()
    facts = Table(show_header=False, box=None)
    for key in (
        "path", "base_model", "peft_type", "r", "rank_pattern", "lora_alpha", "alpha_pattern",
        "use_rslora", "scale", "fan_in_fan_out", "target_modules", "lora_modules", "lora_parameters",
        "modules_to_save", "other_parameters", "weights_file", "file_size", "dtype",
    ):  # fmt: skip
        facts.add_row(key, str(info[key]))
    console.print(facts)
    table = Table(title="per-module spectra of s·B·A")
    for column in ("module", "shape", "r", "scale", "‖ΔW‖", "eff. rank", "singular values"):
        table.add_column(column)
    for m in info["modules"]:
        values = ", ".join(f"{x:.3g}" for x in m["singular_values"][:spectra])
        table.add_row(
            m["name"].removeprefix("base_model.model."),
            "×".join(map(str, m["shape"])),
            str(m["rank"]),
            f"{m['scale']:.4g}",
            f"{m['norm']:.4g}",
            f"{m['effective_rank']:.2f}",
            values,
        )
    console.print(table)


def main() -> None:
    """Console-script entry point."""
    app(prog_name="ctm")
