"""Error types of ctm and the stable process exit codes they map to (a public interface: never renumber)."""

from __future__ import annotations

from pathlib import Path

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_BAD_INPUT = 3
EXIT_INCOMPATIBLE = 4
EXIT_OUTPUT = 5
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143  # 128 + SIGTERM's 15, as shells report a process that SIGTERM ended

EXIT_CODES = {
    EXIT_OK: "success",
    EXIT_INTERNAL: "internal error (set CTM_DEBUG=1 for a traceback)",
    EXIT_USAGE: "usage error: bad option, recipe or setting",
    EXIT_BAD_INPUT: "bad input: adapter missing or malformed, Hub repo not found or unreachable",
    EXIT_INCOMPATIBLE: "adapters that cannot be merged together",
    EXIT_OUTPUT: "output: exists (use --force), is or holds an input, not writable, or the Hub push failed",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C); the message says whether the output was written",
    EXIT_TERMINATED: "interrupted by SIGTERM (timeout, docker stop, a scheduler); likewise",
}


class CtmError(Exception):
    """An expected failure with a one-line message for the user and an exit code."""

    exit_code = EXIT_INTERNAL


class UsageError(CtmError):
    """Arguments or settings that make no sense (rank out of range, bad weights...)."""

    exit_code = EXIT_USAGE


class InputError(CtmError):
    """An input adapter that is missing, unreadable or malformed."""

    exit_code = EXIT_BAD_INPUT


class IncompatibleError(CtmError):
    """Adapters that are individually fine but cannot be merged together."""

    exit_code = EXIT_INCOMPATIBLE


class OutputError(CtmError):
    """The output location exists, is a file or cannot be written."""

    exit_code = EXIT_OUTPUT


def unreadable(path: Path, error: OSError) -> InputError:
    """The error for a file or folder the operating system will not let ctm read (permissions, I/O)."""
    return InputError(f"{path}: cannot be read ({error.strerror or error})")


def first_line(text: str) -> str:
    """The first non-blank line of a library's (possibly multi-line) error text, for ctm's one-line messages."""
    return next((line.strip() for line in text.splitlines() if line.strip()), text)
