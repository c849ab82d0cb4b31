"""The `ctm` command line: parses, calls the pipeline, prints. No math here."""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable, Sequence
from inspect import Parameter, signature
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text
from typer.core import TyperGroup

from ctm_cli import __version__
from ctm_cli.errors import EXIT_CODES, EXIT_INTERNAL, EXIT_INTERRUPTED, CtmError
from ctm_cli.interrupts import interruption, sigterm_as_interrupt
from ctm_cli.recipe import DEFAULTS, SCHEMA, parse_params, parse_weights
from ctm_cli.untrusted import printable

# The command-line library's own error classes (typer >= 0.2x ships its own copy of click, so they are taken
# from typer's exported BadParameter rather than imported from click).
_CLICK_ERROR: Any = next(base for base in typer.BadParameter.__mro__ if base.__name__ == "ClickException")
stderr = Console(stderr=True)


def _print_line(prefix: str, message: str, style: str = "red") -> None:
    """One line on stderr: `prefix`, then `message` with its lines joined and control characters escaped
    (never read as rich markup or emoji codes: file names are shown as they are)."""
    line = printable(" ".join(part.strip() for part in message.splitlines() if part.strip()))
    stderr.print(Text.assemble((prefix, style), " ", line), highlight=False, soft_wrap=True, emoji=False)


def _print_parse_error(error: Exception, command_path: str) -> None:
    """A parse error of the command-line library as ctm's one line, with where to look for help."""
    ctx = getattr(error, "ctx", None)
    message = error.format_message()  # type: ignore[attr-defined]
    hint = f" (see {ctx.command_path if ctx is not None else command_path} --help)"
    _print_line("ctm: error:", message[:1].lower() + message[1:].rstrip(".") + hint)


class _Commands(TyperGroup):
    """ctm's command group: the parser's errors (unknown option or command, bad or missing value) become one
    `ctm: error:` line with a hint, exit code 2, instead of the library's multi-line box."""

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        windows_expand_args: bool = True,
        **extra: Any,
    ) -> Any:
        run = functools.partial(super().main, args, prog_name, complete_var, False, windows_expand_args, **extra)
        if not standalone_mode:
            return run()
        try:
            code = run()
        except _CLICK_ERROR as error:
            if type(error).__name__ != "NoArgsIsHelpError":  # `ctm` alone: the help is already printed
                given = sys.argv[1:] if args is None else list(args)
                command = next((word for word in given if word in self.commands), None)
                _print_parse_error(error, f"ctm {command}" if command else "ctm")
            sys.exit(error.exit_code)
        except typer.Abort:
            stderr.print("ctm: interrupted; nothing was written", highlight=False)
            sys.exit(EXIT_INTERRUPTED)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    cls=_Commands,
    name="ctm",
    help="Merge several LoRA adapters into one low-rank adapter with Compress-then-Merge.",
    epilog="Exit codes:\n" + "\n".join(f"{code:>4}  {meaning}" for code, meaning in EXIT_CODES.items()),
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        print(f"ctm {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """Merge several LoRA adapters into one low-rank adapter with Compress-then-Merge."""


def _run(action: Callable[[], Any]) -> Any:
    """Run an action, turning expected failures into one line on stderr and a stable exit code."""
    try:
        return action()
    except CtmError as exc:
        _print_line("ctm: error:", str(exc))
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt as interrupt:  # Ctrl-C, or SIGTERM within `sigterm_as_interrupt`
        message, code = interruption(interrupt)
        _print_line("ctm:", message, "")
        raise typer.Exit(code) from None
    except Exception as exc:
        if os.environ.get("CTM_DEBUG"):
            raise
        _print_line("ctm: internal error:", f"{type(exc).__name__}: {exc} (set CTM_DEBUG=1 for a traceback)")
        raise typer.Exit(EXIT_INTERNAL) from None


class _ProgressBar:
    """A rich progress bar over modules on stderr, or nothing when quiet or when stderr is not a terminal (where
    rich would only print an empty line when the bar stops)."""

    def __init__(self, quiet: bool):
        self._progress = (
            None
            if quiet or not stderr.is_interactive
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
        self._task: TaskID | None = None

    def start(self, total: int) -> None:
        if self._progress is not None:
            self._progress.start()
            self._task = self._progress.add_task("merge", total=total, rate="")

    def advance(self, done: int) -> None:
        if self._progress is not None and self._task is not None:
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


# The recipe settings that are options of `ctm merge`: (type, Setting) by name, from the recipe's schema.
_RECIPE_OPTIONS = {name: (kind, spec) for name, (kind, spec) in SCHEMA.items() if spec.flags}


def _bad_parameter_on_value_error(parser: Callable[[str], Any]) -> Callable[[str], Any]:
    """A setting's parser whose ValueError the command-line library reports as a bad value, in the setting's words."""

    def parse(text: str) -> Any:
        try:
            return parser(text)
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from None

    return parse


def _with_recipe_options(command: Callable[..., None]) -> Callable[..., None]:
    """Give `command` an option for every recipe setting that has flags, made from the recipe's schema (flags, help,
    default, metavar) and placed after its `config` parameter, so that a setting is declared once, in recipe.py.
    The command receives the settings typed on the command line (only those override a recipe) as `settings`."""
    own = signature(command, eval_str=True)
    options = [
        Parameter(
            name,
            Parameter.POSITIONAL_OR_KEYWORD,
            annotation=kind if spec.parser is None else str,
            default=typer.Option(
                getattr(DEFAULTS, name),
                *spec.flags,
                help=escape(spec.help),
                metavar=spec.metavar,
                parser=None if spec.parser is None else _bad_parameter_on_value_error(spec.parser),
            ),
        )
        for name, (kind, spec) in _RECIPE_OPTIONS.items()
    ]
    parameters = []
    for parameter in own.parameters.values():
        if parameter.name != "settings":
            parameters.append(parameter)
        if parameter.name == "config":
            parameters += options

    @functools.wraps(command)
    def with_options(ctx: typer.Context, **values: Any) -> None:
        typed = _given(ctx)
        settings = {name: values.pop(name) for name in _RECIPE_OPTIONS}
        command(ctx, **values, settings={name: value for name, value in settings.items() if name in typed})

    with_options.__signature__ = own.replace(parameters=parameters)  # type: ignore[attr-defined]
    with_options.__annotations__ = {parameter.name: parameter.annotation for parameter in parameters}
    return with_options


def _overrides(ctx: typer.Context, settings: dict[str, Any], param: list[str]) -> dict[str, Any]:
    """The recipe fields the user gave as flags or arguments, parsed: the settings, and the inputs, their weights
    and the parameters, which have command-line forms of their own."""
    given = _given(ctx)
    overrides = dict(settings)
    if "sources" in given:
        overrides["sources"] = ctx.params["sources"]
    if "weights" in given:
        overrides["weights"] = parse_weights(ctx.params["weights"])
    params = parse_params(param)
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
@_with_recipe_options
def merge(
    ctx: typer.Context,
    sources: list[str] | None = typer.Argument(
        None, help="Adapter folders or Hub repos: org/name, org/name@rev, hf://org/name\\[@rev]\\[/subfolder]."
    ),
    config: Path | None = typer.Option(
        None, "--config", "-c", help="YAML recipe (see configs/); flags given here override its values."
    ),
    weights: str | None = typer.Option(None, "--weights", "-w", help="Per-adapter weights, e.g. 1,0.5."),
    lambda_: float | None = typer.Option(None, "--lambda", help="Scaling λ of the rule (same as -p lambda=X)."),
    param: list[str] = typer.Option([], "--param", "-p", help="Rule or method parameter NAME=VALUE (repeatable)."),
    max_memory_mib: int | None = typer.Option(
        None, "--max-memory", help="Working-memory budget per wave, MiB (default: 2048 on CPU, 1/4 of a GPU)."
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
    settings: dict[str, Any] | None = None,
) -> None:
    """Merge adapters into one rank-r PEFT adapter.

    The output folder gets the adapter, merge_report.json/.md, recipe.yaml (repeats the merge) and a model card.
    """
    from ctm_cli.pipeline import MergeRequest, plan_merge, prepare, run_merge
    from ctm_cli.recipe import build_recipe

    def action() -> dict:
        recipe = build_recipe(config, _overrides(ctx, settings or {}, param))
        request = MergeRequest(recipe, max_memory_mib, force, push_to_hub, private)
        if quiet:
            _quiet_hub_downloads()
        prepared = prepare(request)
        if dry_run:
            return plan_merge(prepared)
        bar = _ProgressBar(quiet or as_json)
        try:
            return run_merge(prepared, bar.start, bar.advance)
        finally:
            bar.stop()

    with sigterm_as_interrupt():
        result = _run(action)
    if not quiet:
        for warning in result["warnings"]:
            _print_line("ctm: warning:", warning, "yellow")
    if as_json:
        print(json.dumps(result, indent=2))
    elif dry_run:
        _print_plan(result)
    elif not quiet:
        _print_merged(result)


def _cell(value: Any) -> Text:
    """A value shown in a table or a line: plain text (never rich markup), control characters escaped."""
    return Text(printable(str(value)))


def _say(console: Console, *parts: Any) -> None:
    """Print one line of plain text (never markup or emoji codes), control characters escaped."""
    console.print(_cell("".join(map(str, parts))), highlight=False, soft_wrap=True, emoji=False)


def _print_merged(report: dict) -> None:
    summary = report["summary"]
    worst = summary["max_relative_error"]
    _say(
        stderr,
        f"merged {len(report['inputs'])} adapters → {report['recipe']['output']} ",
        f"(rank {summary['written_rank']}, {summary['modules']} modules, {summary['seconds']:.2f} s",
        f", worst relative error {worst:.3%})" if worst is not None else ")",
    )
    if "pushed_to" in report:
        _say(stderr, f"pushed to {report['pushed_to']}")


def _print_plan(plan: dict) -> None:
    console = Console()
    settings = plan["settings"]
    _say(
        console,
        f"dry run: {len(plan['inputs'])} adapters → {plan['output']}, method {settings['method']}, ",
        f"rule {settings['rule']} {settings['rule_params']}, {len(plan['modules'])} modules, ",
        f"dtype {settings['dtype']} on {settings['device']}; nothing written",
    )
    for item in plan["inputs"]:
        revision = f" @ {item['revision']}" if item["revision"] else ""
        _say(console, f"  {item['source']}{revision}: r={item['r']}, weight {item['weight']}")
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


@app.command(
    epilog="Examples:\nctm inspect merged/\nctm inspect org/name@v1.0 --json | jq .lora_modules\n"
    "ctm inspect math/ code/ chat/ --plot adapters.png"
)
def inspect(
    path: list[str] = typer.Argument(
        ..., help="Adapter folder or Hub repo (org/name, org/name@rev, hf://...); two or more: how they would merge."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON on stdout, only."),
    spectra: int = typer.Option(8, "--spectra", help="Singular values shown per module in the table."),
    plot: Path | None = typer.Option(
        None, "--plot", metavar="FILE.png", help="With two or more adapters: energy-kept curves and overlaps as a PNG."
    ),
) -> None:
    """Show what an adapter is: base model, ranks, scale, modules, sizes and per-module spectra. Given two or more
    adapters: how they would merge (overlap, dominance, conflict, energy kept by a rank-r merge)."""
    if len(path) > 1 or plot is not None:
        _inspect_many(path, as_json, plot)
        return
    from ctm_cli.adapter import Adapter
    from ctm_cli.sources import locate_source
    from ctm_cli.summary import summarize

    info = _run(lambda: summarize(Adapter(locate_source(path[0]).folder, path[0])))
    if as_json:
        print(json.dumps(info, indent=2))
        return
    _print_summary(info, spectra)


def _inspect_many(paths: list[str], as_json: bool, plot: Path | None) -> None:
    """`ctm inspect a/ b/ …`: the diagnosis of two or more adapters (multi_inspect.py), shown or saved."""
    from ctm_cli.errors import UsageError
    from ctm_cli.multi_inspect import inspect_adapters
    from ctm_cli.multi_inspect_view import check_plot_target, print_diagnosis, save_plot

    def action() -> dict:
        if len(paths) < 2:
            raise UsageError("--plot needs two or more adapters (one adapter: ctm inspect ADAPTER)")
        if plot is not None:
            check_plot_target(plot)
        data = inspect_adapters(paths)
        if plot is not None:
            save_plot(data, plot)
        return data

    data = _run(action)
    for warning in data["warnings"]:
        _print_line("ctm: warning:", warning, "yellow")
    if as_json:
        print(json.dumps(data, indent=2))
    else:
        print_diagnosis(data)


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
        "path", "style", "kinds", "blocks", "base_model", "peft_type", "r", "rank_pattern", "lora_alpha",
        "alpha_pattern",
        "use_rslora", "scale", "fan_in_fan_out", "target_modules", "lora_modules", "lora_parameters",
        "modules_to_save", "other_parameters", "weights_file", "file_size", "dtype",
    ):  # fmt: skip
        facts.add_row(key, _cell(info[key]))
    console.print(facts)
    table = Table(title="per-module spectra of s·B·A")
    for column in ("module", "shape", "r", "scale", "‖ΔW‖", "eff. rank", "singular values"):
        table.add_column(column)
    for m in info["modules"]:
        values = ", ".join(f"{x:.3g}" for x in m["singular_values"][:spectra])
        table.add_row(
            _cell(m["name"].removeprefix("base_model.model.")),
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
