"""The commands that only describe (help, the catalog, inspect without spectra, the dry run) never load torch, nor the
other libraries and modules that only a merge (or a Hub input, or a recipe) needs, so they start at once; how fast
they start is measured by scripts/bench_startup.py, not here."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from ctm_cli.errors import EXIT_BAD_INPUT

# Runs ctm's entry point in a fresh interpreter, then prints whether torch's code ran, the torch modules imported and
# which of the modules named in its first argument were imported.
PROBE = """
import json, os, sys
from ctm_cli.cli import run
from ctm_cli.deferred_import import is_loaded
watched, sys.argv = sys.argv[1].split(","), ["ctm", *sys.argv[2:]]
def report(code):
    print(json.dumps({"code": code, "torch": is_loaded("torch"),
                      "modules": sorted(name for name in sys.modules if name.startswith("torch.")),
                      "loaded": sorted(name for name in watched if name in sys.modules)}), file=sys.stderr, flush=True)
leave = os._exit  # a command that loaded torch ends the process there (cli._leave)
os._exit = lambda code: (report(code), leave(code))
try:
    run()
except SystemExit as exit:
    report(exit.code)
"""
# What none of these commands imports besides torch: what only a merge needs (numpy comes with torch; the stages'
# progress display, the streaming loop), a Hub input (huggingface_hub) or a recipe (yaml), and pydantic (which typer
# imports unless plain_options converts the option values).
NOT_IMPORTED = ["numpy", "huggingface_hub", "pydantic", "yaml", "rich.progress", "ctm_cli.engine"]

COMMANDS = {
    "no-arguments": [],
    "help": ["--help"],
    "merge-help": ["merge", "--help"],
    "methods": ["methods"],
    "methods-json": ["methods", "--json"],
    "inspect": ["inspect", "{a}"],
    "inspect-json": ["inspect", "{a}", "--json"],
    # --device cpu: with the default `auto`, a machine with a GPU driver loads torch to ask it about CUDA
    "dry-run": ["merge", "{a}", "{b}", "-o", "{out}", "--dry-run", "--rank", "8", "--device", "cpu"],
    "dry-run-json": [
        *("merge", "{a}", "{b}", "-o", "{out}", "--dry-run", "--json"),
        *("--rule", "ties", "--rank", "4", "--device", "cpu"),
    ],
}


def probe(args: list[str]) -> dict:
    """Run ctm with `args` in a subprocess; what the probe saw (torch, and which of NOT_IMPORTED were imported), and
    the exit code."""
    command = [sys.executable, "-c", PROBE, ",".join(NOT_IMPORTED), *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    return json.loads(done.stderr.strip().splitlines()[-1])


@pytest.mark.parametrize("name", list(COMMANDS))
def test_describing_commands_never_load_torch(name, make_adapter, tmp_path):
    a, b = make_adapter(r=4, alpha=8, seed=1), make_adapter(r=4, alpha=8, seed=2)
    args = [arg.format(a=a, b=b, out=tmp_path / "out") for arg in COMMANDS[name]]
    seen = probe(args)
    assert seen["code"] in ((2,) if name == "no-arguments" else (0, None)), seen  # `ctm` alone: help, exit 2
    assert seen == {"code": seen["code"], "torch": False, "modules": [], "loaded": []}
    assert not (tmp_path / "out").exists()


def test_the_probe_sees_torch_when_a_command_computes(make_adapter, tmp_path: Path):
    """The same probe on `inspect --spectra`, which reads the factors: torch is loaded (the probe can fail)."""
    seen = probe(["inspect", str(make_adapter(r=4, alpha=8, seed=1)), "--spectra", "2"])
    assert seen["code"] in (0, None) and seen["torch"] and "torch._C" in seen["modules"] and "numpy" in seen["loaded"]


def test_the_probe_sees_the_merge_modules_when_a_merge_runs(make_adapter, tmp_path: Path):
    """A real merge imports what the dry run leaves out: the engine, and yaml for the recipe it writes."""
    a, b = make_adapter(r=4, alpha=8, seed=1), make_adapter(r=4, alpha=8, seed=2)
    seen = probe(["merge", str(a), str(b), "-o", str(tmp_path / "out"), "--rank", "4", "--device", "cpu", "-q"])
    assert seen["code"] in (0, None) and {"ctm_cli.engine", "yaml"} <= set(seen["loaded"])


def test_a_merge_process_ends_with_its_exit_code_and_whole_output(make_adapter, tmp_path: Path):
    """A command that loaded torch leaves without tearing the interpreter down (cli._leave): its JSON on stdout is
    whole, its output written, and a failure after torch loaded keeps its exit code and one-line message."""
    a, b = make_adapter(r=4, alpha=8, seed=1), make_adapter(r=4, alpha=8, seed=2)
    command = [sys.executable, "-m", "ctm_cli", "merge", str(a), str(b), "--rank", "4", "--device", "cpu", "--json"]
    done = subprocess.run([*command, "-o", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["summary"]["modules"] > 0 and (tmp_path / "out" / "merge_report.json").exists()
    bad = tmp_path / "bad"
    shutil.copytree(b, bad)
    tensors = load_file(bad / "adapter_model.safetensors")
    tensors[next(key for key in tensors if "lora_B" in key)][0, 0] = float("nan")
    save_file(tensors, bad / "adapter_model.safetensors")
    with_bad = [*command[:5], str(bad), *command[6:], "-o", str(tmp_path / "out2")]  # b replaced by bad
    failed = subprocess.run(with_bad, capture_output=True, text=True, timeout=300)
    assert failed.returncode == EXIT_BAD_INPUT, failed.stderr
    assert failed.stderr.count("\n") == 1 and "NaN or infinite" in failed.stderr and str(bad) in failed.stderr
    assert not (tmp_path / "out2").exists()


def test_main_runs_again_in_the_same_process(make_adapter, tmp_path: Path):
    """`cli.main` (unlike the console script's `run`) never ends the process: a caller runs two merges in a row."""
    a, b = make_adapter(r=4, alpha=8, seed=1), make_adapter(r=4, alpha=8, seed=2)
    script = (
        "import sys\nfrom ctm_cli.cli import main\ncodes = []\n"
        "for out in sys.argv[1:]:\n"
        f"    sys.argv = ['ctm', 'merge', {str(a)!r}, {str(b)!r}, '--rank', '4', '--device', 'cpu', '-q', '-o', out]\n"
        "    try:\n        main()\n    except SystemExit as done:\n        codes.append(done.code)\n"
        "print('codes', codes)\n"
    )
    outs = [str(tmp_path / "one"), str(tmp_path / "two")]
    done = subprocess.run([sys.executable, "-c", script, *outs], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "codes [0, 0]" in done.stdout, (done.stdout, done.stderr)
    assert all((Path(out) / "adapter_model.safetensors").exists() for out in outs)
