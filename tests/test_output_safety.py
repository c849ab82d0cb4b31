"""The user's files are never lost: an output that is or holds an input is refused before any work, an existing
output is replaced in one atomic step (or by two renames a later run can undo), every interruption says what
state the output is in, killed runs leave only marked folders that the next run removes, and the output
follows the umask. And the merge is bit-identical whatever the --max-memory grouping and the thread count."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import SIGINT_SCRIPT, adapter_files, cache_repo, fails, listing, run_ctm, single_error_line

import ctm_cli.pipeline
import ctm_cli.staging
from ctm_cli.errors import EXIT_CODES, EXIT_INTERRUPTED, EXIT_OUTPUT, EXIT_TERMINATED, EXIT_USAGE
from ctm_cli.interrupts import Terminated, interruption, output_written
from ctm_cli.staging import MARKER

ROOT = Path(__file__).parents[1]
WEIGHTS = "adapter_model.safetensors"
TARGETS = ("q_proj", "v_proj", "down_proj")
FAST = ("--rank", "4", "--quiet")
REAL_EXCHANGE = ctm_cli.staging.exchange


@pytest.fixture
def inputs(make_adapter, tmp_path) -> list[Path]:
    """Two adapters copied into one folder of their own, `sources/` (so a test may point -o at it)."""
    folder = tmp_path / "sources"
    folder.mkdir()
    return [
        Path(shutil.copytree(make_adapter(r=4, alpha=8, seed=seed, targets=TARGETS), folder / name))
        for seed, name in ((71, "in-a"), (72, "in-b"))
    ]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under a folder (symlinks followed), by relative path."""
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.fixture
def existing_output(out_parent) -> Path:
    """An earlier output (mode 0755) that --force replaces."""
    out = out_parent / "out"
    out.mkdir()
    out.chmod(0o755)
    (out / WEIGHTS).write_bytes(b"earlier result")
    (out / "notes.txt").write_text("precious")
    return out


def is_merge(out: Path) -> bool:
    """Whether `out` holds a complete merged adapter (and nothing of an earlier output, nor ctm's marker)."""
    names = listing(out)
    expected = {WEIGHTS, "adapter_config.json", "merge_report.json", "merge_report.md", "recipe.yaml", "README.md"}
    return set(names) == expected and len((out / WEIGHTS).read_bytes()) > 1000


def merged_ok(result, out: Path) -> None:
    assert result.exit_code == 0, result.stderr
    assert is_merge(out)


# ------------------------------------------------------------------------------------ outputs that hold an input


def refused_overlap(args: list, watched: Path, words: list[str]) -> str:
    """Run `ctm merge ARGS`; expect exit 5, one line with `words`, and nothing under `watched` changed."""
    before = snapshot(watched)
    line = fails(["merge", *args, *FAST], EXIT_OUTPUT, watched)
    assert snapshot(watched) == before
    for word in words:
        assert word in line, line
    return line


def test_output_is_an_input(inputs):
    line = refused_overlap([*inputs, "-o", inputs[0], "--force"], inputs[0].parent, ["is the input folder"])
    assert line == f"ctm: error: {inputs[0]}: is the input folder {inputs[0]}; choose another output folder"


def test_output_contains_the_inputs(inputs):
    parent = inputs[0].parent
    refused_overlap([*inputs, "-o", parent, "--force"], parent.parent, [str(parent), "contains the input", "in-a"])


def test_output_inside_an_input(inputs):
    refused_overlap([*inputs, "-o", inputs[1] / "merged"], inputs[0].parent, ["lies inside the input folder", "in-b"])


@pytest.mark.parametrize("spelling", ["symlink", "dotdot", "trailing-slash", "dot"])
def test_output_is_an_input_however_spelled(spelling, inputs, tmp_path, monkeypatch):
    a = inputs[0]
    if spelling == "symlink":
        (tmp_path / "link").symlink_to(a, target_is_directory=True)
        output = str(tmp_path / "link")
    elif spelling == "dotdot":
        output = str(inputs[1] / ".." / "in-a")
    elif spelling == "trailing-slash":
        output = f"{a}/"
    else:
        monkeypatch.chdir(a)
        output = "."
    refused_overlap([*inputs, "-o", output, "--force"], a.parent, ["is the input folder"])


def test_overlap_is_refused_before_any_adapter_is_read(inputs, monkeypatch):
    def read(*args, **kwargs):
        raise AssertionError("an adapter was read")

    monkeypatch.setattr(ctm_cli.pipeline, "Adapter", read)
    refused_overlap([*inputs, "-o", inputs[0], "--force"], inputs[0].parent, ["is the input folder"])


@pytest.fixture
def hub_input(hub_cache, inputs) -> Path:
    """org/a in an offline Hugging Face cache (its files links into blobs/); returns the repo's cache folder."""
    cache_repo(hub_cache, "org/a", adapter_files(inputs[0]))
    return hub_cache / "models--org--a"


@pytest.mark.parametrize("where", ["snapshot", "repo", "blobs", "inside-snapshot"])
def test_output_holds_a_hub_input(where, hub_input, inputs):
    snapshot_folder = next((hub_input / "snapshots").iterdir())
    output = {
        "snapshot": snapshot_folder,
        "repo": hub_input,
        "blobs": hub_input / "blobs",
        "inside-snapshot": snapshot_folder / "merged",
    }[where]
    words = {"snapshot": "is the input folder org/a", "inside-snapshot": "lies inside the input folder org/a"}
    refused_overlap(["org/a", inputs[1], "-o", output, "--force"], hub_input, [words.get(where, "contains the input")])


def test_a_sibling_of_the_inputs_is_fine(inputs):
    out = inputs[0].parent / "merged"
    result = run_ctm("merge", *inputs, "-o", out, *FAST)
    assert result.exit_code == 0, result.stderr
    assert listing(inputs[0].parent) == ["in-a", "in-b", "merged"]


# ------------------------------------------------------------------------------------ the output's name


@pytest.mark.parametrize("given", ["", "recipe"])
def test_empty_output_is_refused_before_any_work(given, inputs, tmp_path, monkeypatch):
    def locate(*args, **kwargs):
        raise AssertionError("a source was resolved")

    monkeypatch.setattr(ctm_cli.pipeline, "locate_source", locate)
    monkeypatch.chdir(tmp_path)
    if given == "recipe":
        recipe = tmp_path / "recipe.yaml"
        recipe.write_text(f'adapters: [{inputs[0]}, {inputs[1]}]\noutput: ""\n')
        args = ["merge", "--config", recipe]
    else:
        args = ["merge", *inputs, "-o", ""]
    line = fails([*args, *FAST, "--force"], EXIT_USAGE, tmp_path)
    assert "empty" in line and "output" in line


@pytest.mark.parametrize("spelling", [".", "./", "out/", "out/."])
def test_dot_and_trailing_slash_outputs(spelling, inputs, out_parent, existing_output, monkeypatch):
    monkeypatch.chdir(existing_output if spelling.startswith(".") else out_parent)
    result = run_ctm("merge", *inputs, "-o", spelling, *FAST, "--force")
    merged_ok(result, existing_output)
    assert listing(out_parent) == ["out"]  # no `..ctm-old-*` or `.ctm-tmp-*` beside it


@pytest.mark.parametrize("name", ["x" * 245, "é" * 120, "n" * 255])
def test_long_output_names(name, inputs, out_parent):
    out = out_parent / name
    result = run_ctm("merge", *inputs, "-o", out, *FAST)
    merged_ok(result, out)
    result = run_ctm("merge", *inputs, "-o", out, *FAST, "--force")  # the temporary name, then the exchange
    merged_ok(result, out)
    assert listing(out_parent) == [name]


def test_temporary_names_fit_in_name_max():
    for name in ("x" * 255, "é" * 127 + "x", "a"):
        prefix = ctm_cli.staging.temporary_prefix(Path("/somewhere") / name, ctm_cli.staging.TEMPORARY_TAG)
        assert len(os.fsencode(prefix)) + 8 <= 255
        assert prefix.endswith(".ctm-tmp-") and prefix.startswith(".")


# ------------------------------------------------------------------------------------ replacing an output


def test_replacement_uses_the_atomic_exchange(inputs, out_parent, existing_output, monkeypatch):
    calls = []
    real = ctm_cli.staging.exchange

    def exchange(first, second):
        calls.append((first.name, second))
        return real(first, second)

    monkeypatch.setattr(ctm_cli.staging, "exchange", exchange)
    merged_ok(run_ctm("merge", *inputs, "-o", existing_output, *FAST, "--force"), existing_output)
    assert len(calls) == 1 and calls[0][0].startswith(".out.ctm-tmp-") and calls[0][1] == existing_output
    assert listing(out_parent) == ["out"]


def test_symlink_output_is_replaced_not_followed(inputs, out_parent, existing_output):
    """--force on an output that is a symlink to a folder replaces the link; the folder it named is untouched."""
    before = snapshot(existing_output)
    link = out_parent / "link"
    link.symlink_to(existing_output, target_is_directory=True)
    merged_ok(run_ctm("merge", *inputs, "-o", link, *FAST, "--force"), link)
    assert not link.is_symlink() and snapshot(existing_output) == before
    assert listing(out_parent) == ["link", "out"]


def test_exchange_swaps_two_folders(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    (first / "one").write_text("1")
    (second / "two").write_text("2")
    if not ctm_cli.staging.exchange(first, second):
        pytest.skip("no renameat2(RENAME_EXCHANGE) on this system or file system")
    assert listing(first) == ["two"] and listing(second) == ["one"]


def test_exchange_reports_no_support(tmp_path, monkeypatch):
    """renameat2 failing with EINVAL (a file system without exchange): False, nothing changed, so the caller
    falls back to two renames; another errno is an error."""

    def failing(code):
        def renameat2(*args):
            ctypes.set_errno(code)
            return -1

        return lambda: renameat2

    monkeypatch.setattr(ctm_cli.staging, "_renameat2", failing(errno.EINVAL))
    assert ctm_cli.staging.exchange(tmp_path / "a", tmp_path / "b") is False
    monkeypatch.setattr(ctm_cli.staging, "_renameat2", failing(errno.EBUSY))
    with pytest.raises(OSError, match="busy"):
        ctm_cli.staging.exchange(tmp_path / "a", tmp_path / "b")


@pytest.fixture
def without_exchange(monkeypatch) -> None:
    """A system without renameat2(RENAME_EXCHANGE): the two-rename fallback runs."""
    monkeypatch.setattr(ctm_cli.staging, "exchange", lambda first, second: False)


def test_replacement_by_two_renames(without_exchange, inputs, out_parent, existing_output):
    merged_ok(run_ctm("merge", *inputs, "-o", existing_output, *FAST, "--force"), existing_output)
    assert listing(out_parent) == ["out"]


def rename_failing_from(tag: str, error: BaseException, monkeypatch) -> None:
    """os.rename in staging.py fails (raises `error`) when it moves a folder whose name contains `tag`."""
    real = os.rename

    def rename(source, target):
        if tag in Path(source).name:
            raise error
        real(source, target)

    monkeypatch.setattr(ctm_cli.staging.os, "rename", rename)


def test_interrupt_between_the_two_renames_puts_the_output_back(
    without_exchange, inputs, out_parent, existing_output, monkeypatch
):
    before = snapshot(existing_output)
    rename_failing_from(".ctm-tmp-", KeyboardInterrupt(), monkeypatch)  # the second rename: new → output
    result = run_ctm("merge", *inputs, "-o", existing_output, *FAST, "--force")
    monkeypatch.undo()
    assert result.exit_code == EXIT_INTERRUPTED
    assert single_error_line(result.stderr) == "ctm: interrupted; nothing was written"
    assert listing(out_parent) == ["out"] and snapshot(existing_output) == before


def test_busy_output_leaves_nothing_behind(without_exchange, inputs, out_parent, existing_output, monkeypatch):
    """A rename the system refuses (a mount point or an output in use: EBUSY) leaves no `.ctm-old-*` folder."""
    before = snapshot(existing_output)
    rename_failing_from("out", OSError(errno.EBUSY, os.strerror(errno.EBUSY)), monkeypatch)
    line = fails(["merge", *inputs, "-o", existing_output, *FAST, "--force"], EXIT_OUTPUT, out_parent)
    assert "Device or resource busy" in line and "nothing was changed" in line
    assert snapshot(existing_output) == before


def test_mount_point_output_is_refused_before_any_work(inputs, out_parent, existing_output, monkeypatch):
    real = os.path.ismount
    monkeypatch.setattr(os.path, "ismount", lambda path: Path(path) == existing_output or real(path))
    line = fails(["merge", *inputs, "-o", existing_output, *FAST, "--force"], EXIT_OUTPUT, out_parent)
    assert line == (
        f"ctm: error: {existing_output}: is a mount point, which cannot be replaced; write into a folder inside it"
    )


def exchange_then_interrupt(first: Path, second: Path) -> bool:
    """The real exchange, then an interrupt before the caller learns that it happened."""
    assert REAL_EXCHANGE(first, second)
    raise KeyboardInterrupt


def interrupted(*args):
    raise KeyboardInterrupt


@pytest.mark.parametrize(
    ("step", "replacement"), [("exchange", exchange_then_interrupt), ("remove_marked", interrupted)]
)
def test_interrupt_after_the_swap_says_the_output_was_written(
    step, replacement, inputs, out_parent, existing_output, monkeypatch
):
    """Interrupted just after the swap, or while the old output is removed: the new output is in place and the
    message says so; the old one is still removed on the way out."""
    if step == "exchange" and ctm_cli.staging._renameat2() is None:
        pytest.skip("no renameat2(RENAME_EXCHANGE) on this system")
    monkeypatch.setattr(ctm_cli.staging, step, replacement)
    result = run_ctm("merge", *inputs, "-o", existing_output, *FAST, "--force")
    assert result.exit_code == EXIT_INTERRUPTED
    assert single_error_line(result.stderr) == f"ctm: interrupted after the output was written to {existing_output}"
    assert is_merge(existing_output)
    assert listing(out_parent) == ["out"]


def test_interrupt_during_the_hub_push_says_the_output_was_written(inputs, out_parent, monkeypatch):
    monkeypatch.setattr(ctm_cli.pipeline, "check_push_target", lambda repo: None)

    def push(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(ctm_cli.pipeline, "push_folder", push)
    out = out_parent / "out"
    result = run_ctm("merge", *inputs, "-o", out, *FAST, "--push-to-hub", "me/merged")
    assert result.exit_code == EXIT_INTERRUPTED
    assert single_error_line(result.stderr) == f"ctm: interrupted after the output was written to {out}"
    assert is_merge(out)


def test_read_only_output_is_not_replaced(inputs, out_parent, existing_output, monkeypatch):
    """--force on a read-only output folder is refused before any work. Root bypasses permission bits, so for
    root os.access is made to answer as it does for any other user."""
    before = snapshot(existing_output)
    existing_output.chmod(0o555)
    if os.access(existing_output, os.W_OK):
        real = os.access
        monkeypatch.setattr(os, "access", lambda path, mode: real(path, mode) and Path(path) != existing_output)
    try:
        line = fails(["merge", *inputs, "-o", existing_output, "--force", *FAST], EXIT_OUTPUT, out_parent)
        assert line == f"ctm: error: {existing_output}: not writable, so --force cannot replace it"
        assert snapshot(existing_output) == before
    finally:
        existing_output.chmod(0o755)


# ------------------------------------------------------------------------------------ what killed runs leave


def dead_pid() -> int:
    """The id of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def leftover(parent: Path, name: str, pid: int | None, age: float = 0.0, output: str = "out") -> Path:
    """A folder as a killed run leaves it: `name`, with ctm's marker for `pid` (None: no marker) and a file."""
    folder = parent / name
    folder.mkdir()
    (folder / "adapter_model.safetensors").write_bytes(b"partial")
    if pid is not None:
        marker = {"pid": pid, "host": socket.gethostname(), "started": time.time() - age, "output": output}
        (folder / MARKER).write_text(json.dumps({**marker, "token": "x"}))
    return folder


def test_the_next_run_removes_only_marked_leftovers_of_finished_runs(inputs, out_parent):
    gone = dead_pid()
    leftover(out_parent, ".out.ctm-tmp-aaaaaaaa", gone)  # killed while writing
    leftover(out_parent, ".other.ctm-old-bbbbbbbb", gone, output="other")  # killed while removing an old output
    leftover(out_parent, ".out.ctm-tmp-cccccccc", os.getpid(), age=7 * 3600)  # too old, whatever the process
    kept = [
        leftover(out_parent, ".out.ctm-tmp-dddddddd", None),  # no marker: not ctm's
        leftover(out_parent, ".out.ctm-tmp-eeeeeeee", os.getpid()),  # a run still going on
        leftover(out_parent, "out.ctm-tmp-ffffffff", gone),  # not a name ctm gives
    ]
    (out_parent / ".x.ctm-tmp-gggggggg").write_text("a file, not a folder")
    result = run_ctm("merge", *inputs, "-o", out_parent / "out", *FAST)
    merged_ok(result, out_parent / "out")
    assert listing(out_parent) == sorted(["out", ".x.ctm-tmp-gggggggg", *(folder.name for folder in kept)])
    assert all((folder / "adapter_model.safetensors").read_bytes() == b"partial" for folder in kept)


def test_an_output_a_kill_left_aside_is_put_back(inputs, out_parent):
    """Killed between the two renames of the fallback: the old output is aside, the new one still temporary.
    The next run puts the old output back first, and then does not replace it without --force."""
    gone = dead_pid()
    leftover(out_parent, ".out.ctm-tmp-hhhhhhhh", gone)
    aside = leftover(out_parent, ".out.ctm-old-hhhhhhhh", None)
    (aside / "notes.txt").write_text("precious")
    result = run_ctm("merge", *inputs, "-o", out_parent / "out", *FAST)
    assert result.exit_code == EXIT_OUTPUT, result.stderr
    line = single_error_line(result.stderr)
    assert "exists and is not empty (use --force to replace it)" in line
    assert listing(out_parent) == ["out"]
    assert (out_parent / "out" / "notes.txt").read_text() == "precious"


def test_a_marker_cannot_send_a_folder_elsewhere(inputs, out_parent, tmp_path):
    """A planted marker naming an output outside the folder (or one its name does not match) moves nothing."""
    gone = dead_pid()
    for suffix, output in (("iiiiiiii", "../escaped"), ("jjjjjjjj", "other")):
        leftover(out_parent, f".out.ctm-tmp-{suffix}", gone, output=output)
        leftover(out_parent, f".out.ctm-old-{suffix}", None)
    merged_ok(run_ctm("merge", *inputs, "-o", out_parent / "out", *FAST), out_parent / "out")
    assert not (tmp_path / "escaped").exists() and not (out_parent / "other").exists()
    assert listing(out_parent) == [".out.ctm-old-iiiiiiii", ".out.ctm-old-jjjjjjjj", "out"]


# ------------------------------------------------------------------------------------ umask


@pytest.mark.parametrize(("umask", "folder_mode", "file_mode"), [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600)])
def test_output_follows_the_umask(umask, folder_mode, file_mode, inputs, out_parent, existing_output):
    previous = os.umask(umask)
    try:
        for out in (out_parent / "new", existing_output):
            merged_ok(run_ctm("merge", *inputs, "-o", out, *FAST, "--force"), out)
            assert out.stat().st_mode & 0o777 == folder_mode
            assert {path.stat().st_mode & 0o777 for path in out.iterdir()} == {file_mode}
    finally:
        os.umask(previous)


def test_output_keeps_the_setgid_bit_of_a_shared_folder(inputs, out_parent):
    """In a folder whose new entries take its group (setgid), the output is such an entry too."""
    out_parent.chmod(0o2775)
    if not out_parent.stat().st_mode & 0o2000:
        pytest.skip("this file system keeps no setgid bit on folders")
    out = out_parent / "out"
    merged_ok(run_ctm("merge", *inputs, "-o", out, *FAST), out)
    assert out.stat().st_mode & 0o2000


# ------------------------------------------------------------------------------------ SIGTERM and messages


def test_interruption_messages():
    assert interruption(KeyboardInterrupt()) == ("interrupted; nothing was written", EXIT_INTERRUPTED)
    assert interruption(Terminated()) == ("interrupted (SIGTERM); nothing was written", EXIT_TERMINATED)
    with pytest.raises(Terminated) as caught, output_written(Path("out")):
        raise Terminated
    assert interruption(caught.value) == ("interrupted (SIGTERM) after the output was written to out", 143)
    assert {EXIT_INTERRUPTED, EXIT_TERMINATED} <= set(EXIT_CODES)


SIGTERM_HANDLED = """
import sys
from ctm_cli.interrupts import interruption, sigterm_as_interrupt

try:
    with sigterm_as_interrupt():
        print("ready", flush=True)
        sys.stdin.read()  # blocks until the parent's SIGTERM arrives
except KeyboardInterrupt as interrupt:
    message, code = interruption(interrupt)
    print("ctm:", message, flush=True)
    sys.exit(code)
"""


def python_child(code: str, *args: str, **pipes: int) -> subprocess.Popen:
    """`python -c CODE ARGS` running this checkout's code, with text pipes (`stdin=subprocess.PIPE`...)."""
    return subprocess.Popen(
        [sys.executable, "-c", code, *args], text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, **pipes
    )


def test_sigterm_raises_like_ctrl_c():
    with python_child(SIGTERM_HANDLED, stdin=subprocess.PIPE, stdout=subprocess.PIPE) as child:
        assert child.stdout.readline() == "ready\n"  # the handler is installed from here on
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=60) == EXIT_TERMINATED
        assert child.stdout.read() == "ctm: interrupted (SIGTERM); nothing was written\n"


# test_bad_inputs' real SIGINT in the middle of a merge, sent as SIGTERM
SIGTERM_MID_MERGE = SIGINT_SCRIPT.replace("signal.SIGINT", "signal.SIGTERM")


def test_sigterm_during_merge(inputs, out_parent, existing_output):
    before = snapshot(existing_output)
    args = ["merge", *map(str, inputs), "-o", str(existing_output), "--force", "--rank", "4"]
    with python_child(SIGTERM_MID_MERGE, *args, stderr=subprocess.PIPE) as child:
        _, errors = child.communicate(timeout=120)
    assert child.returncode == EXIT_TERMINATED, errors
    assert single_error_line(errors) == "ctm: interrupted (SIGTERM); nothing was written"
    assert listing(out_parent) == ["out"] and snapshot(existing_output) == before


def test_sigterm_handler_is_restored(inputs, out_parent):
    before = signal.getsignal(signal.SIGTERM)
    merged_ok(run_ctm("merge", *inputs, "-o", out_parent / "out", *FAST), out_parent / "out")
    assert signal.getsignal(signal.SIGTERM) is before


# ------------------------------------------------------------------------------------ reproducibility


@pytest.fixture
def wide_inputs(make_adapter) -> list[Path]:
    """Three adapters on a tiny Llama with a 2048-wide MLP: long contractions (which a multithreaded BLAS splits
    for a lone matrix) and modules large enough that --max-memory 1 (MiB) puts each in a group of its own."""
    wide = {"intermediate_size": 2048}
    return [make_adapter(r=8, alpha=16, seed=seed, model_overrides=wide) for seed in (81, 82, 83)]


@pytest.fixture
def threads():
    """Set torch's CPU thread count for a test (the suite runs on one thread, where a BLAS never splits)."""
    previous = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(previous)


def merged_bytes(sources: list[Path], out: Path, *options: str) -> bytes:
    result = run_ctm("merge", *sources, "-o", out, "--quiet", "--force", *options)
    assert result.exit_code == 0, result.stderr
    return (out / WEIGHTS).read_bytes()


def group_sizes(sources: list[Path], *options: str) -> list[int]:
    result = run_ctm("merge", *sources, "-o", "unused", "--dry-run", "--json", *options)
    assert result.exit_code == 0, result.stderr
    return [group["modules"] for group in json.loads(result.stdout)["groups"]]


REPRODUCED = {
    "ctm": ["--rank", "4"],
    "ctm-hooi": ["--rank", "4", "--param", "frame_rank=4"],  # the paper's CtM: HOOI, whose batch shrinks
    "ctm-ties": ["--rank", "4", "--rule", "ties", "--param", "frame_rank=4"],
    "ctm-rank-1": ["--rank", "1"],
    "mtc": ["--rank", "4", "--method", "mtc"],
    "core": ["--rank", "4", "--method", "core"],
    "lego": ["--rank", "4", "--method", "lego"],
}


@pytest.mark.parametrize("case", list(REPRODUCED))
def test_bytes_do_not_depend_on_the_memory_budget(case, wide_inputs, out_parent, threads):
    threads(2)
    options = REPRODUCED[case]
    small, default_sizes = group_sizes(wide_inputs, *options, "--max-memory", "1"), group_sizes(wide_inputs, *options)
    assert len(small) > len(default_sizes) and 1 in small  # the wide modules each alone, in their own wave
    default = merged_bytes(wide_inputs, out_parent / "default", *options)
    assert merged_bytes(wide_inputs, out_parent / "small", *options, "--max-memory", "1") == default


@pytest.mark.parametrize("case", ["ctm", "ctm-hooi", "mtc"])
def test_bytes_do_not_depend_on_the_thread_count(case, wide_inputs, out_parent, threads):
    results = set()
    for count in (1, 2, 3):
        threads(count)
        results.add(merged_bytes(wide_inputs, out_parent / f"t{count}", *REPRODUCED[case], "--max-memory", "1"))
    assert len(results) == 1
