"""Plain coercion of ctm's option values, for start-up time: typer >= 0.2x turns every value (even an option left at
its default) through a pydantic TypeAdapter, and importing pydantic costs more than all the rest of `ctm --help`.
ctm's options are plain strings, integers, numbers, switches, paths and lists of strings, which are converted here
as typer would, with click's messages for bad values; anything else is left to typer."""

from __future__ import annotations

from pathlib import Path
from typing import Any, get_args, get_origin

_PLAIN = {str: str, int: int, float: float, Path: Path}
_NAMES = {int: "integer", float: "number"}


def install(command: Any) -> None:
    """Give every plain-typed parameter of `command` and of its subcommands (typer's click objects) the plain
    coercion, before they parse anything, and show switches without a value type in the help. An older typer,
    which parses with click's own types (no pydantic, no `<bool>` in the help), is left alone."""
    try:
        from typer._click import Context
        from typer._coercion import RuntimeParam
    except ImportError:  # typer < 0.2x: click's own types, no pydantic
        return

    class PlainRuntimeParam(RuntimeParam):  # type: ignore[misc]
        """A value converted by the Python type itself: `int("8")`, `Path("a/")`, a list item by item."""

        def _coerce_value(self, value: Any, param: Any, ctx: Any) -> Any:
            parser = getattr(self.parameter_info, "parser", None)
            if parser is not None:  # a setting's own parser (`--rank auto`): its BadParameter names the option
                return parser(value)
            if get_origin(self.annotation) is list:
                (item_type,) = get_args(self.annotation)
                return [_convert(item, item_type, param, ctx) for item in value]
            return _convert(value, self.annotation, param, ctx)

    for each in [command, *getattr(command, "commands", {}).values()]:
        help_option = each.get_help_option(Context(each))  # made once per command, and kept
        for param in [*each.params, *([help_option] if help_option is not None else [])]:
            if getattr(param, "is_flag", False) and param.metavar is None:
                param.metavar = ""  # a switch takes no value: `--force`, not `--force <bool>`, in the help
            descriptor = getattr(param, "type_descriptor", None)
            if descriptor is not None and getattr(param, "_runtime_param", False) is None and _is_plain(descriptor):
                param._runtime_param = PlainRuntimeParam(descriptor.parameter_info, descriptor.annotation)


def _is_plain(descriptor: Any) -> bool:
    """Whether typer would only convert this parameter's value to its type (no choices, range, file, date or parser
    of its own)."""
    if descriptor.is_choice or descriptor.is_ranged or descriptor.is_file or descriptor.is_datetime:
        return False
    if getattr(descriptor.parameter_info, "parser", None) is not None:  # a setting's own parser: called as it is
        return descriptor.annotation is str
    annotation = descriptor.annotation
    if get_origin(annotation) is list:
        return get_args(annotation) == (str,)
    return annotation is bool or annotation in _PLAIN


def _convert(value: Any, kind: Any, param: Any, ctx: Any) -> Any:
    """`value` (a string from the command line, or a default) as `kind`, or click's error naming the option."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "t", "yes", "y", "on"):
            return True
        if text in ("0", "false", "f", "no", "n", "off"):
            return False
        kind_name = "boolean"
    else:
        if isinstance(value, kind) and not isinstance(value, bool):
            return value
        try:
            return _PLAIN[kind](value)
        except (TypeError, ValueError):
            kind_name = _NAMES.get(kind, kind.__name__)
    from typer import BadParameter

    raise BadParameter(f"{value!r} is not a valid {kind_name}.", ctx=ctx, param=param)
