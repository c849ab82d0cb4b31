"""The commands that only describe (help, the catalog, inspect without spectra, the dry run) never load torch, nor the
other libraries and modules that only a merge (or a Hub input, or a recipe) needs, so they start at once; how fast
they start is measured by scripts/bench_startup.py, not here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

# Runs ctm's entry point in a fresh interpreter, then prints whether torch's code ran, the torch modules imported and
# which of the modules named in its first argument were imported.
PROBE = """
import json, sys
from ctm_cli.cli import main
from ctm_cli.deferred_import import is_loaded
watched, sys.argv = sys.argv[1].split(","), ["ctm", *sys.argv[2:]]
try:
    main()
except SystemExit as exit:
    code = exit.code
print(json.dumps({"code": code, "torch": is_loaded("torch"),
                  "modules": sorted(name for name in sys.modules if name.startswith("torch.")),
                  "loaded": sorted(name for name in watched if name in sys.modules)}), file=sys.stderr)
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
