"""Every bad input: one `ctm: error:` line naming the file and the cause, a documented exit code, and nothing
created or changed (each refusal runs in a sandbox, tests/sandbox.py); interrupts and write failures leave
nothing behind. More bad inputs: test_bad_inputs_catalog.py."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers import (
    A_KEY,
    B_KEY,
    CONFIG,
    SIGINT_SCRIPT,
    TARGETS,
    WEIGHTS,
    edit_config,
    edit_tensors,
    fails,
    listing,
    run_ctm,
    single_error_line,
    write,
)
from safetensors.torch import load_file
from sandbox import run_as_user

import ctm_cli.engine
import ctm_cli.staging
import ctm_cli.writer

ROOT = Path(__file__).parents[1]


@pytest.fixture
def good(make_adapter) -> Path:
    """A valid adapter (r=4) on the tiny Llama."""
    return make_adapter(r=4, alpha=8, seed=31, targets=TARGETS)


@pytest.fixture
def other(make_adapter, tmp_path) -> Path:
    """A private, writable copy of a second valid adapter (r=4), for the tests to break."""
    return Path(shutil.copytree(make_adapter(r=4, alpha=8, seed=32, targets=TARGETS), tmp_path / "other"))


@pytest.fixture
def pair_in(sandbox, good, make_adapter) -> tuple[Path, Path]:
    """A valid adapter and a writable copy of a second one (for the test to break), both in the sandbox."""
    return sandbox.copy(good, "good"), sandbox.copy(make_adapter(r=4, alpha=8, seed=32, targets=TARGETS), "other")


def set_entry(key: str, value: float) -> Callable[[dict[str, torch.Tensor]], None]:
    def change(tensors: dict[str, torch.Tensor]) -> None:
        tensors[key][0, 0] = value

    return change


def corrupt_header(folder: Path) -> Path:
    """Keep the header length, replace the JSON header by garbage of the same size."""
    path = folder / WEIGHTS
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    path.write_bytes(data[:8] + b"{" + b"\xff" * (length - 1) + data[8 + length :])
    return path


def remove(path: Path, named: Path) -> Path:
    """Delete a file; returns `named`, the path the error should name."""
    path.unlink()
    return named


def to_legacy_bin(folder: Path, content) -> Path:
    """Replace the safetensors file by a legacy adapter_model.bin holding `content`."""
    (folder / WEIGHTS).unlink()
    torch.save(content, folder / "adapter_model.bin")
    return folder / "adapter_model.bin"


# Each case breaks the copy `other` and returns (the file the error must name, exit code, words in the message).
CASES: dict[str, Callable[[Path], tuple[Path, int, list[str]]]] = {
    "no-config": lambda f: (remove(f / CONFIG, f / CONFIG), 3, ["missing", "not a PEFT adapter folder"]),
    "config-not-json": lambda f: (write(f / CONFIG, "{'r': 8,"), 3, ["not valid JSON"]),
    "config-not-object": lambda f: (write(f / CONFIG, "[1, 2]"), 3, ["JSON object"]),
    "config-no-peft-type": lambda f: (edit_config(f, peft_type=None), 3, ["peft_type"]),
    "config-not-lora": lambda f: (edit_config(f, peft_type="IA3"), 4, ["'IA3'", "LoRA adapters only"]),
    "config-missing-r": lambda f: (edit_config(f, r=None), 3, ["'r'", "missing"]),
    "config-r-not-number": lambda f: (edit_config(f, r="4"), 3, ["'r'"]),
    "config-r-zero": lambda f: (edit_config(f, r=0), 3, ["r must be positive"]),
    "weights-missing": lambda f: (remove(f / WEIGHTS, f), 3, ["no adapter_model.safetensors"]),
    "weights-empty": lambda f: (write(f / WEIGHTS, b""), 3, ["empty file"]),
    "weights-truncated": lambda f: (
        write(f / WEIGHTS, (f / WEIGHTS).read_bytes()[:-100]),
        3,
        ["not a readable safetensors file"],
    ),
    "weights-not-safetensors": lambda f: (
        write(f / WEIGHTS, b"PK\x03\x04 this is a zip file, not safetensors"),
        3,
        ["not a readable safetensors file"],
    ),
    "weights-corrupt-header": lambda f: (corrupt_header(f), 3, ["not a readable safetensors file", "header"]),
    "lora-a-without-b": lambda f: (edit_tensors(f, lambda t: t.pop(B_KEY)), 3, ["down_proj", "no lora_B factor"]),
    "rank-not-config-r": lambda f: (edit_config(f, r=6).parent / WEIGHTS, 3, ["down_proj", "rank 4", "r=6"]),
    "a-b-ranks-differ": lambda f: (
        edit_tensors(f, lambda t: t.update({B_KEY: t[B_KEY][:, :3]})),
        3,
        ["down_proj", "rank 4", "has 3"],
    ),
    "nan-in-factor": lambda f: (edit_tensors(f, set_entry(A_KEY, float("nan"))), 3, ["down_proj", "NaN or infinite"]),
    "inf-in-factor": lambda f: (edit_tensors(f, set_entry(B_KEY, float("-inf"))), 3, ["down_proj", "NaN or infinite"]),
    "integer-factor": lambda f: (
        edit_tensors(f, lambda t: t.update({A_KEY: t[A_KEY].to(torch.int32)})),
        3,
        [A_KEY, "not a float16/bfloat16/float32/float64 tensor"],
    ),
    "bin-not-a-dict": lambda f: (to_legacy_bin(f, [torch.zeros(2)]), 3, ["dict of named tensors"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_adapter(case, sandbox, pair_in):
    good, other = pair_in
    named, code, words = CASES[case](other)
    sandbox.refuses(["merge", good, other, "-o", sandbox.out, "--rank", "4"], code, str(named), *words)


def test_legacy_pickle_with_code_never_runs(sandbox, pair_in, tmp_path):
    good, other = pair_in
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    to_legacy_bin(other, {A_KEY: Payload()})
    args = ["merge", good, other, "-o", sandbox.out, "--rank", "4"]
    line = sandbox.refuses(args, 3, str(other / "adapter_model.bin"))
    assert "weights-only" in line and "safetensors" in line and "it calls " in line
    assert "weights_only" not in line and "allowlist" not in line  # torch's advice to load unsafely is not passed on
    assert not marker.exists()
    torch.load(other / "adapter_model.bin", weights_only=False)  # the payload is live: unsafe loading runs it
    assert marker.exists()


def test_legacy_bin_of_plain_tensors_merges(good, other, out_parent):
    to_legacy_bin(other, load_file(str(other / WEIGHTS)))
    result = run_ctm("merge", good, other, "-o", out_parent / "out", "--rank", "4")
    assert result.exit_code == 0, result.stderr


def test_single_adapter(sandbox, pair_in):
    sandbox.refuses(["merge", pair_in[0], "-o", sandbox.out, "--rank", "4"], 2, "at least two adapters")


@pytest.mark.parametrize("rank", ["0", "-3"])
def test_rank_not_positive(sandbox, pair_in, rank):
    sandbox.refuses(["merge", *pair_in, "-o", sandbox.out, "--rank", rank], 2, "--rank", f"got {rank}")


@pytest.mark.parametrize("weights", ["1,nan", "inf,1", "1,-inf"])
def test_weights_not_finite(sandbox, pair_in, weights):
    args = ["merge", *pair_in, "-o", sandbox.out, "--rank", "4", "--weights", weights]
    sandbox.refuses(args, 2, "--weights must be finite")


@pytest.mark.parametrize(
    ("options", "code", "words"),
    [
        (["--weights", "1e300,1"], 3, "overflow float32"),
        (["--weights", "1e12,1", "--dtype", "float16"], 2, "overflow float16"),
    ],
    ids=["float32", "float16-output"],
)
def test_merged_factors_overflow(sandbox, pair_in, options, code, words):
    sandbox.refuses(["merge", *pair_in, "-o", sandbox.out, "--rank", "4", *options], code, words, "model.layers.")


def test_negative_weights_are_task_negation(good, other, out_parent):
    result = run_ctm("merge", good, other, "-o", out_parent / "out", "--rank", "4", "--weights", "1,-1")
    assert result.exit_code == 0, result.stderr


def test_unknown_modules_to_save_policy(sandbox, pair_in):
    sandbox.refuses(
        ["merge", *pair_in, "-o", sandbox.out, "--modules-to-save", "keep"], 2, "--modules-to-save", "drop, first, mean"
    )


# ---------------------------------------------------------------- output location


def test_output_folder_not_writable(good, other, tmp_path):
    """A read-only parent folder. Root bypasses permission bits (CAP_DAC_OVERRIDE), so as root the CLI runs
    under `setpriv` without that capability: the kernel then really refuses, as for any other user."""
    parent = tmp_path / "locked"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        result = run_as_user(["merge", good, other, "-o", parent / "out", "--rank", "4"])
        assert result.returncode == 5, result.stderr
        line = single_error_line(result.stderr)
        assert line == f"ctm: error: {parent}: not writable"
        assert listing(parent) == []
    finally:
        parent.chmod(0o700)


def test_temporary_folder_cannot_be_created(good, other, out_parent, monkeypatch):
    """The parent looked writable but the temporary folder still cannot be made (e.g. it changed meanwhile)."""

    def refuse(**kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(ctm_cli.staging.tempfile, "mkdtemp", refuse)
    line = fails(["merge", good, other, "-o", out_parent / "out", "--rank", "4"], 5, out_parent)
    assert "cannot create a temporary folder" in line and "Permission denied" in line


# ---------------------------------------------------------------- failures while merging or writing


@pytest.fixture
def existing_output(out_parent) -> Path:
    """An earlier output that a failed `--force` run must leave exactly as it was."""
    out = out_parent / "out"
    out.mkdir()
    (out / "adapter_model.safetensors").write_bytes(b"earlier result")
    (out / "notes.txt").write_text("precious")
    return out


def snapshot(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def disk_full(path, tensors, metadata):
    """Writing the weights on a full disk: part of the file is written, then ENOSPC."""
    with path.open("wb") as handle:
        handle.write(b"\0" * 4096)
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def interrupted(*args, **kwargs):
    raise KeyboardInterrupt


def fail_on_second_call(function: Callable, error: BaseException) -> Callable:
    calls = []

    def wrapped(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise error
        return function(*args, **kwargs)

    return wrapped


def swap_failing(error: BaseException) -> Callable:
    """The exchange of the finished temporary folder with the existing output, failing before it swaps."""

    def exchange(first, second):
        assert ".ctm-tmp-" in first.name
        raise error

    return exchange


def text_write_failing(self, *args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))


# name: (object, attribute, replacement factory, exit code, words in the message)
INJECTED = {
    "disk-full-weights": (ctm_cli.writer, "write_file", lambda: disk_full, 5, ["No space left on device"]),
    "disk-full-config": (Path, "write_text", lambda: text_write_failing, 5, ["No space left on device"]),
    "interrupt-writing": (ctm_cli.writer, "write_file", lambda: interrupted, 130, ["interrupted"]),
    "interrupt-mid-merge": (
        ctm_cli.engine,
        "_load_group",
        lambda: fail_on_second_call(ctm_cli.engine._load_group, KeyboardInterrupt()),
        130,
        ["interrupted"],
    ),
    "rename-fails": (ctm_cli.staging, "exchange", lambda: swap_failing(OSError(errno.EBUSY, "busy")), 5, ["busy"]),
    "interrupt-in-swap": (ctm_cli.staging, "exchange", lambda: swap_failing(KeyboardInterrupt()), 130, ["interrupted"]),
}


@pytest.mark.parametrize("name", list(INJECTED))
def test_failure_leaves_existing_output_untouched(name, good, other, out_parent, existing_output, monkeypatch):
    target, attribute, replacement, code, words = INJECTED[name]
    before = snapshot(existing_output)
    monkeypatch.setattr(target, attribute, replacement())
    result = run_ctm("merge", good, other, "-o", existing_output, "--rank", "4", "--force")
    monkeypatch.undo()
    assert result.exit_code == code, result.stderr
    line = single_error_line(result.stderr)
    assert line.startswith("ctm: error:" if code != 130 else "ctm: interrupted")
    for word in words:
        assert word in line
    assert listing(out_parent) == ["out"]
    assert snapshot(existing_output) == before


def test_nan_in_a_later_group_leaves_existing_output_untouched(good, other, out_parent, existing_output):
    before = snapshot(existing_output)
    edit_tensors(other, set_entry(B_KEY.replace("layers.1", "layers.0"), float("nan")))
    line = fails(["merge", good, other, "-o", existing_output, "--rank", "4", "--force"], 3, out_parent)
    assert "model.layers.0.mlp.down_proj" in line
    assert snapshot(existing_output) == before


def test_sigint_during_merge(good, other, out_parent, existing_output):
    """A real SIGINT in a CLI subprocess, in the middle of the merge: exit 130, nothing written, no temp folder."""
    before = snapshot(existing_output)
    args = ["merge", str(good), str(other), "-o", str(existing_output), "--force", "--rank", "4"]
    result = subprocess.run(
        [sys.executable, "-c", SIGINT_SCRIPT, *args],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=120,
    )
    assert result.returncode == 130, result.stderr
    assert "ctm: interrupted; nothing was written" in result.stderr
    assert "Traceback" not in result.stderr
    assert listing(out_parent) == ["out"]
    assert snapshot(existing_output) == before


# ---------------------------------------------------------------- reproducibility


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def without_timings(value):
    """A report without the fields that vary between these runs: timings (`seconds`) and the output path."""
    if isinstance(value, dict):
        return {key: without_timings(item) for key, item in value.items() if key not in ("seconds", "output")}
    if isinstance(value, list):
        return [without_timings(item) for item in value]
    return value


def test_same_inputs_give_byte_identical_output(good, other, tmp_path):
    outputs = [tmp_path / "first", tmp_path / "second"]
    for out in outputs:
        result = run_ctm("merge", good, other, "-o", out, "--rank", "5", "--weights", "1,-0.5", "--seed", "3")
        assert result.exit_code == 0, result.stderr
    for name in (WEIGHTS, CONFIG):
        assert sha256(outputs[0] / name) == sha256(outputs[1] / name), name
    reports = [json.loads((out / "merge_report.json").read_text()) for out in outputs]
    assert without_timings(reports[0]) == without_timings(reports[1])
    assert reports[0]["summary"]["seconds"] > 0
