"""Start-up benchmark of the commands that only describe: `ctm --help`, `ctm methods` (and `--json`), `ctm inspect`
and `ctm merge --dry-run`, each the median wall and CPU time of several runs as a subprocess, beside two baselines
measured in the same run: the bare interpreter (`python -c pass`) and `python -c "import torch"`. `inspect
--spectra 8` and a real merge (which load torch) are measured too, for comparison.

    python scripts/bench_startup.py                   # the minilm-8 adapters of ../shared/real-adapters
    python scripts/bench_startup.py --runs 11 --adapters A B --json
    python scripts/bench_startup.py --bytecode inherited   # ctm's modules compiled at every run (see below)

The machine's load average is printed with the figures: on a busy host every row is slower, the baselines too.

Python's bytecode: by default the commands run with the bytecode cache in a scratch folder (PYTHONPYCACHEPREFIX), which
the unmeasured first run fills, as an installed ctm runs (pip compiles a package when it installs it). With
`--bytecode inherited` they run in this environment as it is: where PYTHONDONTWRITEBYTECODE is set and the checkout
has no __pycache__, every run compiles ctm's own modules again (the installed libraries' bytecode is still read).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "real-adapters" / "minilm-8"


def commands(adapters: list[str], scratch: Path) -> dict[str, list[str]]:
    """Each measured command line, by name (the baselines first)."""
    ctm = [sys.executable, "-m", "ctm_cli"]
    first, output = adapters[0], str(scratch / "merged")
    return {
        "python -c pass (baseline)": [sys.executable, "-c", "pass"],
        "python -c 'import torch' (baseline)": [sys.executable, "-c", "import torch"],
        "ctm --help": [*ctm, "--help"],
        "ctm methods": [*ctm, "methods"],
        "ctm methods --json": [*ctm, "methods", "--json"],
        "ctm inspect A": [*ctm, "inspect", first],
        "ctm inspect A --json": [*ctm, "inspect", first, "--json"],
        "ctm merge A B --dry-run": [*ctm, "merge", *adapters, "-o", output, "--dry-run"],
        "ctm inspect A --spectra 8 (loads torch)": [*ctm, "inspect", first, "--spectra", "8"],
        "ctm merge A B (loads torch, merges)": [*ctm, "merge", *adapters, "-o", output, "--force", "-q"],
    }


def bytecode_environment(mode: str, scratch: Path) -> tuple[dict[str, str], str]:
    """The commands' environment for a --bytecode mode, and the mode in words."""
    if mode == "inherited":
        skipped = os.environ.get("PYTHONDONTWRITEBYTECODE")
        return dict(os.environ), "as in this environment" + (" (PYTHONDONTWRITEBYTECODE set)" if skipped else "")
    environment = {key: value for key, value in os.environ.items() if key != "PYTHONDONTWRITEBYTECODE"}
    environment["PYTHONPYCACHEPREFIX"] = str(scratch / "pycache")
    return environment, "cached in a scratch folder, as installed"


def median_seconds(command: list[str], runs: int, environment: dict[str, str]) -> tuple[float, float]:
    """Median wall time and median CPU time (user + system, steadier on a busy host) of `command` over `runs` runs,
    after one unmeasured run that warms the page cache (and fills the bytecode cache, where there is one)."""
    walls, cpus = [], []
    for attempt in range(runs + 1):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=environment)
        wall = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if attempt:
            walls.append(wall)
            cpus.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
    return statistics.median(walls), statistics.median(cpus)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapters", nargs="+", help="adapter folders (default: two minilm-8 adapters)")
    parser.add_argument("--runs", type=int, default=7, help="measured runs per command (the median is shown)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument(
        "--bytecode",
        choices=("cached", "inherited"),
        default="cached",
        help="cached: Python's bytecode cached in a scratch folder, as an installed ctm runs; inherited: this "
        "environment as it is (with PYTHONDONTWRITEBYTECODE, ctm's modules are compiled at every run)",
    )
    args = parser.parse_args()
    adapters = args.adapters or [str(SHARED / "sst2"), str(SHARED / "trec")]
    if not all(Path(adapter).is_dir() for adapter in adapters):
        parser.error(f"adapter folders not found: {adapters} (give --adapters A B)")
    with tempfile.TemporaryDirectory(prefix="ctm-startup-") as scratch:
        lines = commands(adapters, Path(scratch))
        environment, bytecode = bytecode_environment(args.bytecode, Path(scratch))
        figures = {name: median_seconds(command, args.runs, environment) for name, command in lines.items()}
    load = os.getloadavg()[0]
    if args.json:
        seconds = {name: {"wall": wall, "cpu": cpu} for name, (wall, cpu) in figures.items()}
        machine = {"load_average_1min": load, "cpus": os.cpu_count()}
        print(json.dumps({"seconds": seconds, "runs": args.runs, **machine, "bytecode": args.bytecode}))
        return
    print(f"median of {args.runs} runs; {os.cpu_count()} CPUs, load average {load:.2f}; A, B = {', '.join(adapters)}")
    print(f"bytecode: {bytecode}")
    width = max(map(len, figures))
    print(f"{'command':<{width}}  {'wall':>7}  {'CPU':>7}")
    for name, (wall, cpu) in figures.items():
        print(f"{name:<{width}}  {wall:6.3f}s  {cpu:6.3f}s")


if __name__ == "__main__":
    main()
