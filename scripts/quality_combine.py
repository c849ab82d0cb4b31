"""Combine runs of scripts/bench_quality.py made with different seeds (e.g. in separate GPU calls) into one
result: `python scripts/quality_combine.py seed0.json seeds12.json --out all.json` writes all.json and all.md."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality_report import combine_runs, render_markdown


def main(argv: list[str] | None = None) -> None:
    """Read the runs, combine them, write the JSON and the Markdown report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", type=Path, nargs="+", help="JSON results of bench_quality.py")
    parser.add_argument("--out", type=Path, required=True, help="combined JSON (the Markdown goes beside it, .md)")
    args = parser.parse_args(argv)
    combined = combine_runs([json.loads(path.read_text()) for path in args.runs])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(combined, indent=1, default=str) + "\n")
    args.out.with_suffix(".md").write_text(render_markdown(combined))
    print(f"seeds {combined['settings']['seeds']}: wrote {args.out} and {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
