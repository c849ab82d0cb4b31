"""Which `rank_pattern` / `alpha_pattern` keys ctm agrees to match. PEFT matches each key as a regular
expression, `(.*\\.)?(KEY)$`, against module names; a key taken from a file could make that backtracking
match run for hours (`(a+)+b`), so a key is refused unless matching it provably takes bounded time: at most
MAX_PATTERN_LENGTH characters, no repetition inside a repetition, no repeated alternation, no back-references,
and at most MAX_UNBOUNDED repetitions without an upper bound; and the names matched are at most MAX_NAME_LENGTH
characters (the adapter refuses longer tensor keys)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

try:  # the parser of Python's own regular expressions
    from re import _parser as _regex_parser  # type: ignore[attr-defined]  # Python >= 3.11, not in typeshed
except ImportError:  # pragma: no cover - Python 3.10
    import sre_parse as _regex_parser  # type: ignore[no-redef]

MAX_NAME_LENGTH = 300  # characters of a tensor key: far more than any model's
MAX_PATTERN_LENGTH = 2 * MAX_NAME_LENGTH  # room for any module name written with re.escape (as ctm's output is)
MAX_UNBOUNDED = 2
_REPEATS = {"MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"}
_BACK_REFERENCES = {"GROUPREF", "GROUPREF_EXISTS"}
_UNBOUNDED = 16  # a repetition allowing more than this many counts as unbounded


def _subpatterns(value: Any) -> Iterator[Any]:
    """The parsed sub-expressions inside an opcode's argument (a group, the branches of an alternation...)."""
    if isinstance(value, _regex_parser.SubPattern):
        yield value
    elif isinstance(value, tuple | list):
        for item in value:
            yield from _subpatterns(item)


def _walk(pattern: Any, inside_repeat: bool, unbounded: list[int]) -> str | None:
    """The first construct of a parsed expression that can make backtracking explode, or None."""
    for op, value in pattern.data:
        name = str(op)
        if name in _BACK_REFERENCES:
            return "it uses a back-reference"
        if name == "BRANCH" and inside_repeat:
            return "it repeats an alternation (like (a|ab)*)"
        repeats = name in _REPEATS and value[1] > 1
        if repeats and inside_repeat:
            return "it nests a repetition inside a repetition (like (a+)+)"
        if repeats and value[1] > _UNBOUNDED:
            unbounded[0] += 1
        for sub in _subpatterns(value):
            problem = _walk(sub, inside_repeat or repeats, unbounded)
            if problem:
                return problem
    return None


def pattern_problem(key: str) -> str | None:
    """Why a rank/alpha pattern key is refused, or None if PEFT's match of it runs in bounded time."""
    if len(key) > MAX_PATTERN_LENGTH:
        return f"longer than {MAX_PATTERN_LENGTH} characters"
    try:
        parsed = _regex_parser.parse(key)
        re.compile(rf"(.*\.)?({key})$")  # as PEFT matches it (a global flag inside fails here)
    except (re.error, RecursionError, OverflowError) as error:
        return f"not a valid regular expression ({error})"
    unbounded = [0]
    problem = _walk(parsed, False, unbounded)
    if problem is None and unbounded[0] > MAX_UNBOUNDED:
        problem = f"it has {unbounded[0]} unbounded repetitions (*, +, {{n,}}), more than {MAX_UNBOUNDED}"
    return problem and f"{problem}, which can make matching module names take hours"
