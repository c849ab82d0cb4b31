"""How far apart two merged adapters are: per module, ‖B₁A₁ − B₂A₂‖ / ‖B₂A₂‖ from the factors alone, and
the HOOI figures of their merge reports. `python scripts/compare_merges.py merged-a/ merged-b/ [--json]`."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ctm_cli.adapter import Adapter
from ctm_cli.core_space import lowrank_relative_error


def module_differences(first: Adapter, second: Adapter) -> dict[str, float]:
    """Relative difference of every module's update ΔW = scale·B·A, the second adapter as the reference."""
    differences = {}
    for name in sorted(first.modules):
        (a_1, b_1), (a_2, b_2) = first.factors(name), second.factors(name)
        b_1 = b_1.double() * first.modules[name].scale
        b_2 = b_2.double() * second.modules[name].scale
        differences[name] = float(lowrank_relative_error(b_1, a_1.double(), b_2, a_2.double()))
    return differences


def report_figures(folder: Path) -> dict[str, float]:
    """Median sweeps and mean frame energy of a ctm merge report (empty for other methods)."""
    modules = json.loads((folder / "merge_report.json").read_text())["modules"]
    sweeps = [m["sweeps"] for m in modules if m.get("sweeps") is not None]
    energy = [m["frame_energy"] for m in modules if m.get("frame_energy") is not None]
    if not sweeps:
        return {}
    return {"median_sweeps": statistics.median(sweeps), "mean_frame_energy": statistics.fmean(energy)}


def main() -> None:
    """Compare the two folders and print the summary (or JSON)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("first", type=Path)
    parser.add_argument("second", type=Path, help="the reference")
    parser.add_argument("--json", action="store_true", help="print every figure as JSON")
    args = parser.parse_args()
    first, second = Adapter(args.first), Adapter(args.second)
    if set(first.modules) != set(second.modules):
        sys.exit(f"{args.first} and {args.second} do not hold the same modules")
    differences = module_differences(first, second)
    summary = {
        "modules": len(differences),
        "max_relative_difference": max(differences.values()),
        "median_relative_difference": statistics.median(differences.values()),
        "first": report_figures(args.first),
        "second": report_figures(args.second),
    }
    if args.json:
        print(json.dumps({**summary, "per_module": differences}, indent=1))
        return
    print(
        f"{summary['modules']} modules: relative difference of ΔW max {summary['max_relative_difference']:.3g}, "
        f"median {summary['median_relative_difference']:.3g}; HOOI {summary['first']} vs {summary['second']}"
    )


if __name__ == "__main__":
    main()
