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
from ctm_cli.errors import EXIT_CODES, EXIT_INTERNAL, EXIT_INTERRUPTED, CtmError, UsageError
from ctm_cli.recipe import DEFAULTS

app = typer.Typer(
    name="ctm",
    help="Merge several LoRA adapters into one low-rank adapter with Compress-then-Merge.",
    epilog="Exit codes:\n" + "\n".join(f"{code:>4}  {meaning}" for code, meaning in EXIT_CODES.items()),
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
                TextColumn("{task.fields[rate]}"),
                TimeElapsedColumn(),
                console=stderr,
                transient=True,
            )
        )
        self._task = None

    def start(self, total: int) -> None:
        if self._progress is not None:
            self._progress.start()
            self._task = self._progress.add_task("merge", total=total, rate="")

    def advance(self, done: int) -> None:
        if self._progress is not None:
            self._progress.advance(self._task, done)
            task = self._progress.tasks[0]
            if task.elapsed:
                self._progress.update(self._task, rate=f"{task.completed / task.elapsed:.1f} modules/s")

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()


def _given(ctx: typer.Context) -> set[str]:
    """Names of the parameters typed on the command line: only those override a recipe.

    Compared by name: typer >= 0.2x ships its own copy of click, so the enum class depends on the version."""
    return {name for name in ctx.params if getattr(ctx.get_parameter_source(name), "name", None) == "COMMANDLINE"}


def _overrides(ctx: typer.Context, param: list[str]) -> dict[str, Any]:
    """The recipe fields the user gave as flags or arguments, parsed."""
    given = _given(ctx)
    recipe_fields = (
        "sources", "rank", "method", "rule", "beta", "seed", "dtype", "device", "modules_to_save", "allow_missing",
    )  # fmt: skip
    overrides = {name: ctx.params[name] for name in recipe_fields if name in given}
    if "output" in given:
        overrides["output"] = str(ctx.params["output"])
    if "weights" in given:
        overrides["weights"] = _parse_floats(ctx.params["weights"], "--weights")
    params = _parse_params(param)
    if "lambda_" in given:
        params["lambda"] = ctx.params["lambda_"]
    if params:
        overrides["params"] = params
    return overrides


def _quiet_hub_downloads() -> None:
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()


@app.command(
    epilog="Examples:\n"
    "ctm merge math/ code/ org/chat-lora@v1.0 --rank 16 -o merged/\n"
    "ctm merge a/ b/ --rule ta --lambda 0.8 --weights 1,0.5 -o merged/ --force\n"
    "ctm merge --config configs/ties.yaml --rank 8 -o merged/\n"
    "ctm merge a/ b/ -o merged/ --dry-run --json\n"
    "ctm merge a/ b/ -o merged/ --push-to-hub me/merged-lora --private"
)
def merge(
    ctx: typer.Context,
    sources: list[str] | None = typer.Argument(
        None, help="Adapter folders or Hub repos: org/name, org/name@rev, hf://org/name\\[@rev]\\[/subfolder]."
    ),
    config: Path | None = typer.Option(
        None, "--config", "-c", help="YAML recipe (see configs/); flags given here override its values."
    ),
    output: Path | None = typer.Option(None, "--output", "-o", help="Output folder (or `output:` in the recipe)."),
    rank: int = typer.Option(
        DEFAULTS.rank, "--rank", "-r", help="Rank of the merged adapter (0 = full rank R: core, knots)."
    ),
    method: str = typer.Option(DEFAULTS.method, "--method", "-m", help="Merge method (see `ctm methods`)."),
    rule: str | None = typer.Option(
        None, "--rule", help="Merging rule (see `ctm methods`; default: iso_c for ctm, ta for the other methods)."
    ),
    weights: str | None = typer.Option(None, "--weights", "-w", help="Per-adapter weights, e.g. 1,0.5."),
    lambda_: float | None = typer.Option(None, "--lambda", help="Scaling λ of the rule (same as -p lambda=X)."),
    param: list[str] = typer.Option([], "--param", "-p", help="Rule or method parameter NAME=VALUE (repeatable)."),
    beta: float = typer.Option(DEFAULTS.beta, "--beta", help="CtM balancing β in \\[0, 1] (1 = off, 0 = equal tasks)."),
    device: str = typer.Option(DEFAULTS.device, "--device", help="auto, cpu, cuda or cuda:N."),
    dtype: str | None = typer.Option(None, "--dtype", help="Output dtype (float32, float16, bfloat16)."),
    seed: int = typer.Option(DEFAULTS.seed, "--seed", help="Seed for rules that use randomness."),
    max_memory_mb: int | None = typer.Option(
        None, "--max-memory", help="Working-memory budget per group, MiB (default: 2048 on CPU, 1/4 of a GPU)."
    ),
    force: bool = typer.Option(False, "--force", "-f", help="Replace an existing output folder."),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Resolve sources, check everything and print the plan; write nothing."
    ),
    push_to_hub: str | None = typer.Option(
        None, "--push-to-hub", metavar="ORG/NAME", help="Upload the merged folder to this Hub repo (needs HF_TOKEN)."
    ),
    private: bool = typer.Option(False, "--private", help="Create the Hub repo as private (with --push-to-hub)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report (or the plan) as JSON on stdout, only."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress or summary output."),
    modules_to_save: str | None = typer.Option(
        None, "--modules-to-save", help="Non-LoRA tensors (heads): drop, first or mean (default: refuse)."
    ),
    allow_missing: bool = typer.Option(
        False, "--allow-missing", help="Merge a module some adapters lack as a zero update for them."
    ),
) -> None:
    """Merge adapters into one rank-r PEFT adapter.

    The output folder gets the adapter, merge_report.json/.md, recipe.yaml (repeats the merge) and a model card.
    """
    from ctm_cli.pipeline import MergeRequest, plan_merge, run_merge
    from ctm_cli.recipe import build_recipe

    def action() -> dict:
        if private and push_to_hub is None:
            raise UsageError("--private only applies with --push-to-hub")
        recipe = build_recipe(config, _overrides(ctx, param))
        request = MergeRequest.from_recipe(
            recipe,
            max_memory=None if max_memory_mb is None else max_memory_mb * 1024**2,
            force=force,
            push_to_hub=push_to_hub,
            private=private,
        )
        if quiet:
            _quiet_hub_downloads()
        if dry_run:
            return plan_merge(request)
        bar = _ProgressBar(quiet or as_json)
        try:
            return run_merge(request, bar.start, bar.advance)
        finally:
            bar.stop()

    result = _run(action)
    if as_json:
        print(json.dumps(result, indent=2))
    elif dry_run:
        _print_plan(result)
    elif not quiet:
        _print_merged(result)


def _print_merged(report: dict) -> None:
    summary = report["summary"]
    worst = summary["max_relative_error"]
    stderr.print(
        f"merged {len(report['inputs'])} adapters → {escape(report['recipe']['output'])} "
        f"(rank {summary['output_rank']}, {summary['modules']} modules, {summary['seconds']:.2f} s"
        + (f", worst relative error {worst:.3%})" if worst is not None else ")"),
        highlight=False,
        soft_wrap=True,
    )
    if "pushed_to" in report:
        stderr.print(f"pushed to {escape(report['pushed_to'])}", highlight=False, soft_wrap=True)


def _print_plan(plan: dict) -> None:
    console = Console()
    settings = plan["settings"]
    console.print(
        f"dry run: {len(plan['inputs'])} adapters → {escape(plan['output'])}, method {settings['method']}, "
        f"rule {settings['rule']} {settings['rule_params']}, {len(plan['modules'])} modules, "
        f"dtype {settings['dtype']} on {settings['device']}; nothing written",
        highlight=False,
        soft_wrap=True,
    )
    for item in plan["inputs"]:
        revision = f" @ {item['revision']}" if item["revision"] else ""
        console.print(f"  {escape(item['source'])}{revision}: r={item['r']}, weight {item['weight']}", highlight=False)
    table = Table(title="module groups (one device batch each, merged a wave at a time)")
    for column in ("wave", "shape", "input ranks", "modules", "device memory"):
        table.add_column(column)
    for group in plan["groups"]:
        table.add_row(
            str(group["wave"]),
            "×".join(map(str, group["shape"])),
            ",".join(map(str, group["ranks"])),
            str(group["modules"]),
            _bytes(group["device_bytes"]),
        )
    console.print(table)
    console.print(
        f"{plan['waves']} wave(s), estimated device memory {_bytes(plan['estimated_device_bytes'])}, "
        f"output {_bytes(plan['estimated_output_bytes'])} ({plan['estimated_output_bytes']} bytes)",
        highlight=False,
    )


def _bytes(count: int) -> str:
    value, unit = float(count), "B"
    for bigger in ("KiB", "MiB", "GiB"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{value:.1f} {unit}"


@app.command(epilog="Examples:\nctm inspect merged/\nctm inspect org/name@v1.0 --json | jq .lora_modules")
def inspect(
    path: str = typer.Argument(..., help="Adapter folder or Hub repo (org/name, org/name@rev, hf://...)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON on stdout, only."),
    spectra: int = typer.Option(8, "--spectra", help="Singular values shown per module in the table."),
) -> None:
    """Show what an adapter is: base model, ranks, scale, modules, sizes and per-module spectra."""
    from ctm_cli.adapter import Adapter
    from ctm_cli.sources import locate_source
    from ctm_cli.summary import summarize

    info = _run(lambda: summarize(Adapter(locate_source(path).folder, path)))
    if as_json:
        print(json.dumps(info, indent=2))
        return
    _print_summary(info, spectra)


@app.command()
def methods(as_json: bool = typer.Option(False, "--json", help="Print JSON on stdout.")) -> None:
    """List the merge methods and rules with their parameters (default, range)."""
    from ctm_cli.catalog import catalog

    listing = catalog()
    if as_json:
        print(json.dumps(listing, indent=2))
        return
    console = Console()
    for kind, extra in (("methods", "rank"), ("rules", "linear")):
        table = Table(title=kind)
        for column in ("name", "what it does", extra, "parameters (default, range)"):
            table.add_column(column)
        for entry in listing[kind]:
            params = "\n".join(f"{n}={p['default']:g} {p['range']}" for n, p in entry["params"].items())
            value = entry[extra] if isinstance(entry[extra], str) else ("yes" if entry[extra] else "no")
            table.add_row(entry["name"], entry["doc"], value, params or "-")
        console.print(table)


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
