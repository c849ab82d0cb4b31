"""The output folder's replacement: written in a marked temporary folder beside it, then swapped into place.

Every temporary folder is named `.NAME.ctm-tmp-XXXXXXXX` and holds a marker file, `.ctm-partial`, with the
writing process's id, host and start time. An existing output is swapped with the finished folder in one
atomic step (Linux `renameat2(RENAME_EXCHANGE)`) or, where the system has no exchange, by two renames that a
later run can undo: the old output first goes aside to `.NAME.ctm-old-XXXXXXXX`. The marker then moves into
the old output, which is removed. A run that was killed leaves marked folders; the next run writing into the
same parent folder removes those whose process is gone (putting back an output that a kill left aside), and
never touches anything without the marker.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import re
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

from ctm_cli.interrupts import output_written

MARKER = ".ctm-partial"
TEMPORARY_TAG = ".ctm-tmp-"
ASIDE_TAG = ".ctm-old-"
# Longest file name, in bytes, of the usual file systems (NAME_MAX of ext4, xfs, btrfs, APFS, NTFS).
NAME_MAX = 255
# Length of the random part tempfile.mkdtemp adds to a name, and the characters it draws from.
_RANDOM_LENGTH = 8
_LEFTOVER = re.compile(r"^\..*(\.ctm-tmp-|\.ctm-old-)[a-z0-9_]{8}$", re.DOTALL)
# A marked folder this old is removed even if a process with its id still runs (the id may have been reused):
# a run keeps a temporary folder only while it writes its output, seconds to minutes.
STALE_SECONDS = 6 * 3600
# Linux renameat2(2): the directory-relative "current directory" and the flag that swaps two paths.
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
# Errors of renameat2 that mean "no exchange here" (old kernel, file system without it), not a failure.
_NO_EXCHANGE = (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP)


@dataclass(frozen=True)
class Staging:
    """A temporary folder being filled for `target`, and the marker text that proves it is this run's."""

    folder: Path
    target: Path
    token: str

    @property
    def aside(self) -> Path:
        """Where an existing output goes while the two-rename swap runs: `.NAME.ctm-old-` and the same suffix."""
        return _aside_of(self.folder)

    def holds_marker(self, folder: Path) -> bool:
        """Whether `folder` holds this run's marker (the swap has put the new output there)."""
        marker = _read_marker(folder)
        return marker is not None and marker.get("token") == self.token


def output_location(path: Path) -> Path:
    """The output as an absolute path: `.`, `..` and trailing slashes resolved, its parent's symlinks followed
    (not the output's own: a symlink given as the output is replaced, not what it points to)."""
    absolute = Path(os.path.abspath(path))
    return absolute if absolute == absolute.parent else absolute.parent.resolve() / absolute.name


def temporary_prefix(target: Path, tag: str) -> str:
    """`.NAME<tag>`, NAME cut so that the whole name with mkdtemp's random part fits in NAME_MAX bytes."""
    room = NAME_MAX - len(".") - len(tag) - _RANDOM_LENGTH
    return "." + os.fsdecode(os.fsencode(target.name)[:room]) + tag


def create(target: Path) -> Staging:
    """A new marked temporary folder beside `target`, with the mode the umask gives new folders (mkdtemp's
    is 0700). Raises OSError if it cannot be made."""
    folder = Path(tempfile.mkdtemp(prefix=temporary_prefix(target, TEMPORARY_TAG), dir=target.parent))
    staging = Staging(folder, target, uuid.uuid4().hex)
    try:
        folder.chmod(folder.stat().st_mode & 0o7000 | 0o777 & ~current_umask())  # keeps a setgid bit inherited
        record = {"pid": os.getpid(), "host": _host(), "started": time.time(), "output": target.name}
        (folder / MARKER).write_text(json.dumps({**record, "token": staging.token}), encoding="utf-8")
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return staging


def current_umask() -> int:
    """The process's umask, read from /proc where it can be (thread-safe), else set and restored once."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def discard(staging: Staging) -> None:
    """Remove a temporary folder that did not become the output."""
    shutil.rmtree(staging.folder, ignore_errors=True)


def install(staging: Staging) -> None:
    """Make the finished temporary folder the output, then remove the old output. Raises, with the output as it
    was, if the swap did not happen; an interrupt that comes once it has is re-raised marked as such
    (`interrupts.output_written`) after the old output is dealt with; later errors only leave marked leftovers."""
    _sync(staging.folder)
    interrupt: BaseException | None = None
    try:
        _swap(staging)
    except BaseException as error:
        if not staging.holds_marker(staging.target):  # not swapped: an old output that went aside comes back
            if os.path.lexists(staging.aside) and not os.path.lexists(staging.target):
                _put_back(staging.aside, staging.target)
            raise
        interrupt = error  # the swap was done just before the interrupt
    with output_written(staging.target):
        with suppress(OSError):
            _sync(staging.target.parent, files=False)
        retire(staging)
        if interrupt is not None:
            raise interrupt


def _sync(folder: Path, files: bool = True) -> None:
    """Flush the folder's files and the folder itself to the disk, so that a crash after the swap cannot leave
    an output of empty files in place of the old one."""
    for entry in os.scandir(folder) if files else ():
        if entry.is_file(follow_symlinks=False):
            _fsync(entry.path, os.O_RDONLY)
    _fsync(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))


def _fsync(path: str | Path, flags: int) -> None:
    descriptor = os.open(path, flags)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _swap(staging: Staging) -> None:
    """Put the temporary folder at the output: a rename where there is none, else one atomic exchange, else
    two renames (the old output aside first)."""
    if not os.path.lexists(staging.target):
        os.rename(staging.folder, staging.target)
    elif not exchange(staging.folder, staging.target):
        os.rename(staging.target, staging.aside)
        os.rename(staging.folder, staging.target)


def _put_back(aside: Path, target: Path) -> None:
    try:
        os.rename(aside, target)
    except OSError as exc:
        raise OSError(exc.errno, f"{exc.strerror}; the previous output is in {aside}") from exc


def retire(staging: Staging) -> None:
    """After the swap: move the marker from the new output into the old one, then remove the old one (its marker
    last, so that a kill in between leaves a folder the next run removes). Errors leave marked leftovers."""
    marker = staging.target / MARKER
    old = next((place for place in (staging.folder, staging.aside) if os.path.lexists(place)), None)
    try:
        if old is None or old.is_symlink():
            marker.unlink()
            if old is not None:
                old.unlink()
            return
        os.rename(marker, old / MARKER)
    except OSError:
        marker.unlink(missing_ok=True)
        return
    remove_marked(old)


def remove_marked(folder: Path) -> None:
    """Delete a folder that carries ctm's marker, the marker last; what cannot be deleted stays, still marked."""
    try:
        entries = [entry for entry in os.scandir(folder) if entry.name != MARKER]
    except OSError:
        return
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            with suppress(OSError):
                os.unlink(entry.path)
    with suppress(OSError):
        os.unlink(folder / MARKER)
        folder.rmdir()


def exchange(first: Path, second: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux renameat2 with RENAME_EXCHANGE). False, with nothing
    changed, where the system or the file system has no such call; other failures raise OSError."""
    function = _renameat2()
    if function is None:
        return False
    if function(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE) == 0:
        return True
    import ctypes  # loaded by _renameat2 already

    code = ctypes.get_errno()
    if code in _NO_EXCHANGE:
        return False
    raise OSError(code, os.strerror(code), str(second))


@functools.cache
def _renameat2() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    import ctypes  # here, not at the top: the output checks that a dry run makes import this module

    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a C library older than glibc 2.28, or none to load
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


def remove_stale(parent: Path) -> None:
    """Clean up after killed runs in `parent`: each marked temporary folder whose process is gone (or that is
    older than STALE_SECONDS) is removed; if the kill came between the two renames of a swap, the old output
    is first put back. Folders without ctm's marker are never touched; failures are ignored."""
    try:
        entries = [entry for entry in os.scandir(parent) if _LEFTOVER.match(entry.name)]
    except OSError:
        return
    for entry in entries:
        folder = Path(entry.path)
        marker = _read_marker(folder) if entry.is_dir(follow_symlinks=False) else None
        if marker is None or not _stale(marker):
            continue
        output = _output_of(folder, marker)
        if output is not None and not os.path.lexists(output) and os.path.lexists(_aside_of(folder)):
            with suppress(OSError):
                os.rename(_aside_of(folder), output)
        remove_marked(folder)


def _output_of(folder: Path, marker: dict) -> Path | None:
    """The output a temporary folder was made for, if its marker names one that the folder's name matches (a
    plain name beside it: a planted marker cannot send a folder elsewhere)."""
    name = marker.get("output")
    if not isinstance(name, str) or "/" in name or name in ("", ".", "..") or TEMPORARY_TAG not in folder.name:
        return None
    output = folder.parent / name
    return output if folder.name[:-_RANDOM_LENGTH] == temporary_prefix(output, TEMPORARY_TAG) else None


def _aside_of(folder: Path) -> Path:
    head, _, suffix = folder.name.rpartition(TEMPORARY_TAG)
    return folder.with_name(head + ASIDE_TAG + suffix)


def _read_marker(folder: Path) -> dict | None:
    try:
        marker = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def _host() -> str:
    """This machine's name, as the marker records it (socket is imported here: the dry run's checks never write)."""
    import socket

    return socket.gethostname()


def _stale(marker: dict) -> bool:
    """Whether the run that wrote `marker` is over: its process is gone from this host, or it is too old."""
    started, pid = marker.get("started"), marker.get("pid")
    if not isinstance(started, (int, float)) or time.time() - started > STALE_SECONDS:
        return True
    if marker.get("host") != _host() or not isinstance(pid, int):
        return False
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError, ValueError):
        return False
    return False
