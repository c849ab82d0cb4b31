"""The `ctm` command line: parses, calls the pipeline, prints. No math here."""

from __future__ import annotations

import atexit
import functools
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from inspect import Parameter, signature
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import typer
from rich.markup import escape
from typer.core import TyperGroup

from ctm_cli import __version__, human, plain_options, progress
from ctm_cli.deferred_import import defer_import, is_loaded
from ctm_cli.errors import EXIT_CODES, EXIT_INTERNAL, EXIT_INTERRUPTED, CtmError, UsageError
from ctm_cli.interrupts import interruption, sigterm_as_interrupt
from ctm_cli.recipe import DEFAULTS, SCHEMA, parse_params, parse_weights
from ctm_cli.untrusted import printable

if TYPE_CHECKING:  # rich's console, tables and progress display are imported where something is printed
    from rich.console import Console
    from rich.progress import Progress, TaskID
    from rich.text import Text

# The command-line library's own error classes (typer >= 0.2x ships its own copy of click, so they are taken
# from typer's exported BadParameter rather than imported from click).
_CLICK_ERROR: Any = next(base for base in typer.BadParameter.__mro__ if base.__name__ == "ClickException")


@functools.cache
def _stderr() -> Console:
    """The console on stderr (made at its first use: rich's console takes a while to import)."""
    from rich.console import Console

    return Console(stderr=True)


def _print_line(prefix: str, message: str, style: str = "red") -> None:
    """One line on stderr: `prefix`, then `message` with its lines joined and control characters escaped
    (never read as rich markup or emoji codes: file names are shown as they are)."""
    from rich.text import Text

    line = printable(" ".join(part.strip() for part in message.splitlines() if part.strip()))
    _stderr().print(Text.assemble((prefix, style), " ", line), highlight=False, soft_wrap=True, emoji=False)


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
        plain_options.install(self)  # before parsing: keeps pydantic out of the start-up
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
            _stderr().print("ctm: interrupted; nothing was written", highlight=False)
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


class _Stages:
    """The merge's stages on stderr while they run, one line each (how far, elapsed, time left, what it does now),
    cleared at the end; nothing when quiet or when stderr is not a terminal (where rich would only print an empty
    line when the display stops). A `progress` listener, called from the reading threads too (rich locks)."""

    def __init__(self, quiet: bool):
        self._progress = None if quiet or not _stderr().is_interactive else _stage_display()
        self._tasks: dict[str, TaskID] = {}

    def __enter__(self) -> _Stages:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def __call__(self, event: progress.Event) -> None:
        if self._progress is None:
            return
        if event.stage not in self._tasks:
            self._tasks[event.stage] = self._progress.add_task(event.stage, total=None, amount="", detail="")
        task = self._tasks[event.stage]
        if event.added:
            self._progress.advance(task, event.done)
            done = self._progress.tasks[task].completed
            self._progress.update(task, amount=_amount(replace(event, done=done)))
        else:
            self._progress.update(
                task, completed=event.done, total=event.total, amount=_amount(event), detail=printable(event.detail)
            )


def _stage_display() -> Progress:
    """rich's display of the stages: a line each, with a bar, how far, elapsed and time left, and what it does."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(
        TextColumn("{task.description:<8}"),
        BarColumn(bar_width=20),
        TextColumn("{task.fields[amount]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[detail]}"),
        console=_stderr(),
        transient=True,
    )


def _amount(event: progress.Event) -> str:
    """How far a stage is, in its units: `12.0 MiB of 45.0 MiB`, `10/36 modules`, `sweep 7`."""
    if event.unit == "bytes":
        return f"{human.size(int(event.done))} of {human.size(int(event.total or 0))}"
    if event.unit == "sweeps":
        return f"sweep {int(event.done)}"
    if event.unit:
        return f"{int(event.done)}{f'/{int(event.total)}' if event.total is not None else ''} {event.unit}"
    return ""


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
def _metavar(kind: Any, spec: Any) -> str:
    """What `--help` shows after a recipe option: its own metavar, its choices, or its kind in words (nothing for
    a switch)."""
    if spec.metavar:
        return spec.metavar
    if spec.choices:
        return "|".join(spec.choices)
    return {int: "INTEGER", float: "NUMBER", bool: ""}.get(kind, "TEXT")


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
                metavar=_metavar(kind, spec),
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
        None,
        help="Adapter folders or Hub repos: org/name, org/name@rev, hf://org/name\\[@rev]\\[/subfolder].",
    ),
    config: Path | None = typer.Option(
        None,
        "--config",
        "-c",
        metavar="RECIPE",
        help="YAML recipe (see configs/); flags given here override its values.",
    ),
    weights: str | None = typer.Option(
        None, "--weights", "-w", metavar="W1,W2,...", help="Per-adapter weights, e.g. 1,0.5."
    ),
    lambda_: float | None = typer.Option(
        None, "--lambda", metavar="NUMBER", help="Scaling λ of the rule (same as -p lambda=X)."
    ),
    param: list[str] = typer.Option(
        [], "--param", "-p", metavar="NAME=VALUE", help="Rule or method parameter NAME=VALUE (repeatable)."
    ),
    max_memory_mib: int | None = typer.Option(
        None,
        "--max-memory",
        metavar="MIB",
        help="Working-memory budget per wave, MiB (default: 2048 on CPU, 1/4 of a GPU).",
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
    from ctm_cli.devices import open_context_early
    from ctm_cli.pipeline import MergeRequest, plan_merge, prepare, run_merge
    from ctm_cli.recipe import build_recipe

    def action() -> dict:
        recipe = build_recipe(config, _overrides(ctx, settings or {}, param))
        request = MergeRequest(recipe, max_memory_mib, force, push_to_hub, private)
        if quiet:
            _quiet_hub_downloads()
        if not dry_run:
            open_context_early(recipe.device)  # made by the driver while the checks import torch
        prepared = prepare(request)
        if dry_run:
            return plan_merge(prepared)
        with _Stages(quiet or as_json) as stages, progress.listening(stages):
            return run_merge(prepared)

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
    from rich.text import Text

    return Text(printable(str(value)))


def _say(console: Console, *parts: Any) -> None:
    """Print one line of plain text (never markup or emoji codes), control characters escaped."""
    console.print(_cell("".join(map(str, parts))), highlight=False, soft_wrap=True, emoji=False)


def _print_merged(report: dict) -> None:
    summary = report["summary"]
    worst = summary["max_relative_error"]
    _say(
        _stderr(),
        f"merged {len(report['inputs'])} adapters → {report['recipe']['output']} ",
        f"(rank {summary['written_rank']}, {summary['modules']} modules, {summary['seconds']:.2f} s",
        f", worst relative error {worst:.3%})" if worst is not None else ")",
    )
    if "pushed_to" in report:
        _say(_stderr(), f"pushed to {report['pushed_to']}")


def _print_plan(plan: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    settings = plan["settings"]
    inputs, output = len(plan["inputs"]), plan["output"]
    _say(console, f"dry run: {inputs} adapters → {output} at {_rank_words(settings)}; nothing written")
    _say(console, f"  {_method_words(settings)}")
    _say(console, f"  {len(plan['modules'])} modules, written as {settings['dtype']}, merged on {settings['device']}")
    for item in plan["inputs"]:
        revision = f" @ {item['revision']}" if item["revision"] else ""
        _say(console, f"  {item['source']}{revision}: r={item['r']}, weight {human.number(item['weight'])}")
    _say(console, "module groups (one device batch each, merged a wave at a time):")
    table = Table()
    for column in ("wave", "shape", "input ranks", "modules", "device memory"):
        table.add_column(column)
    for group in plan["groups"]:
        table.add_row(
            str(group["wave"]),
            "×".join(map(str, group["shape"])),
            ",".join(map(str, group["ranks"])),
            str(group["modules"]),
            human.size(group["device_bytes"]),
        )
    console.print(table)
    waves, device_bytes = plan["waves"], plan["estimated_device_bytes"]
    _say(
        console,
        f"{waves} wave{'s' if waves != 1 else ''}, estimated device memory {human.size(device_bytes)}, ",
        f"output file {human.size(plan['estimated_output_bytes'])}",
    )


def _rank_words(settings: dict) -> str:
    """The output rank, and the requested one where the method writes another: `rank 16`, `rank 32 (requested 16)`."""
    written, requested = settings["written_rank"], settings["requested_rank"]
    return f"rank {written}" + (f" (requested {requested})" if requested != written else "")


def _method_words(settings: dict) -> str:
    """Method and rule with their parameters as typed on a command line, and β where the method uses it."""
    from ctm_cli.methods import METHODS

    rule_params = f" ({human.value(settings['rule_params'])})" if settings["rule_params"] else ""
    beta = f", β={human.number(settings['beta'])}" if METHODS[settings["method"]].uses_beta else ""
    return f"method {settings['method']}, rule {settings['rule']}{rule_params}{beta}"


@app.command(
    epilog="Examples:\nctm inspect merged/\nctm inspect merged/ --spectra 8\n"
    "ctm inspect org/name@v1.0 --json | jq .lora_modules\nctm inspect math/ code/ chat/ --plot adapters.png"
)
def inspect(
    path: list[str] = typer.Argument(
        ..., help="Adapter folder or Hub repo (org/name, org/name@rev, hf://...); two or more: how they would merge."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON on stdout, only."),
    spectra: int = typer.Option(
        0,
        "--spectra",
        metavar="N",
        help="Also compute each module's spectrum of s·B·A (reads every factor) and show its top N singular values.",
    ),
    plot: Path | None = typer.Option(
        None, "--plot", metavar="FILE.png", help="With two or more adapters: energy-kept curves and overlaps as a PNG."
    ),
) -> None:
    """Show what an adapter is: base model, ranks, scale, modules with shapes, sizes; per-module spectra on request.
    Given two or more adapters: how they would merge (overlap, dominance, conflict, energy kept by a rank-r merge)."""
    if len(path) > 1 or plot is not None:
        _inspect_many(path, as_json, plot)
        return
    from ctm_cli.adapter import Adapter
    from ctm_cli.sources import locate_source
    from ctm_cli.summary import add_spectra, summarize

    def action() -> dict:
        if spectra < 0:
            raise UsageError(f"--spectra must be 0 (no spectra) or a positive number of singular values, got {spectra}")
        adapter = Adapter(locate_source(path[0]).folder, path[0])
        info = summarize(adapter)
        if spectra:
            add_spectra(adapter, info)
        return info

    info = _run(action)
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
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for kind, extra in (("methods", "rank"), ("rules", "linear")):
        table = Table(title=kind)
        for column in ("name", "what it does", extra, "parameters (default, range)"):
            table.add_column(column)
        for entry in listing[kind]:
            params = "\n".join(f"{n}={human.number(p['default'])} {p['range']}" for n, p in entry["params"].items())
            value = entry[extra] if isinstance(entry[extra], str) else ("yes" if entry[extra] else "no")
            table.add_row(entry["name"], entry["doc"], value, params or "-")
        console.print(table)


def _print_summary(info: dict, spectra: int) -> None:
    """inspect's view: the adapter's facts, one per line, then its modules (their shared name prefix said once,
    sorted by layer number), with their spectra when asked."""
    from rich.console import Console
    from rich.table import Table

    from ctm_cli.summary import common_prefix

    console = Console()
    facts = Table(show_header=False, box=None)
    families = info["target_modules"]
    family_prefix = common_prefix(families) if len(families) > 1 else ""
    saved, named = info["saved_modules"], info["modules_to_save"]
    unsaved = [name for name in named if not any(s == name or s.endswith(f".{name}") for s in saved)]
    shown = {
        "path": info["path"],
        "style": info["style"],
        "kinds": human.value(info["kinds"]),
        "blocks": human.value(info["blocks"]),
        "base_model": info["base_model"],
        "peft_type": info["peft_type"],
        "r": human.value(info["r"]) + _pattern_note(info["rank_pattern"]),
        "lora_alpha": human.value(info["lora_alpha"]) + _pattern_note(info["alpha_pattern"]),
        "use_rslora": info["use_rslora"],
        "scale": human.value(info["scale"]),
        "fan_in_fan_out": info["fan_in_fan_out"],
        "target_modules": human.value([family.removeprefix(family_prefix) for family in families])
        + (f" (under {family_prefix.removesuffix('.')})" if family_prefix else ""),
        "lora_modules": info["lora_modules"],
        "lora_parameters": human.count(info["lora_parameters"]),
        "modules_to_save": human.value(saved)
        + (f" ({human.count(info['other_parameters'])} parameters)" if saved else "")
        + (f"; the config also names {human.value(unsaved)}, not in the file" if unsaved else ""),
        "weights_file": f"{info['weights_file']}, {human.size(info['file_size'])}, {human.value(info['dtype'])}",
    }
    for key, shown_value in shown.items():
        facts.add_row(key, _cell(shown_value if isinstance(shown_value, str) else human.value(shown_value)))
    console.print(facts)
    names = [m["name"] for m in info["modules"]]
    prefix = common_prefix(names) if len(names) > 1 else ""
    _say(console, f"{len(names)} modules{f' under {prefix}' if prefix else ''}:")
    table = Table()
    uniform_scale = len(info["scale"]) == 1  # then the facts above give it
    columns = ["module", "out×in", "r", *([] if uniform_scale else ["scale"])]
    if spectra:
        columns += ["‖ΔW‖", "eff. rank", f"top {spectra} singular values"]
    for column in columns:
        table.add_column(column, no_wrap=column != columns[-1], overflow="fold")
    for m in info["modules"]:
        row: list[Text | str] = [_cell(m["name"].removeprefix(prefix)), "×".join(map(str, m["shape"])), str(m["rank"])]
        row += [] if uniform_scale else [human.number(m["scale"])]
        if spectra:
            row += [
                f"{m['norm']:.3g}",
                f"{m['effective_rank']:.2f}",
                ", ".join(f"{x:.3g}" for x in m["singular_values"][:spectra]),
            ]
        table.add_row(*row)
    console.print(table)


def _pattern_note(pattern: dict) -> str:
    """A config's per-module overrides after its default value: ` (rank_pattern: q_proj=16)`."""
    return f" ({human.value(pattern)} by pattern)" if pattern else ""


def main() -> None:
    """The command line of sys.argv, run in this process: it ends by raising SystemExit with the exit code (as typer
    does), so a caller may run it again (scripts/quality_merges.py). torch is imported only by the commands that
    compute (see deferred_import)."""
    defer_import("torch")
    app(prog_name="ctm")


def run() -> None:
    """The `ctm` console script and `python -m ctm_cli`: `main`, then the process ends; one whose command loaded
    torch ends without tearing the interpreter down (`_leave`)."""
    try:
        main()
        code: object = 0
    except SystemExit as done:
        code = done.code
    if not is_loaded("torch"):
        raise SystemExit(code)
    _leave(code)


def _leave(code: object) -> NoReturn:
    """End a process that imported torch without tearing the interpreter down: its exit handlers run and its
    output is flushed, but the half second or more that unloading torch (and a GPU context) takes is skipped.
    Everything ctm writes is closed and in place by then (staging.py)."""
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can be said there
            code = code or 1
    os._exit(code or 0)
