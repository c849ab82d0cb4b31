"""Seconds per module of one ctm merge call on random factors, on one thread (the engine's setting on the CPU):
the merge math alone, without reading or writing files, to compare versions of the math and to see how it
grows with T.

    python scripts/bench_module.py --adapters 8 --modules 2 --out 4096 --in 4096
    python scripts/bench_module.py --adapters 32 --rule ta --param frame_rank=16
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ctm_cli.fixed_order import single_threaded  # after the path to this checkout
from ctm_cli.methods import FactorGroup, MergeSettings, get_method, resolve_settings
from ctm_cli.recipe import parse_params
from ctm_cli.rules import get_rule


def seconds_per_module(args: argparse.Namespace) -> float:
    """Best of `args.repeats` timed calls of the method on `args.modules` modules, divided by the module count."""
    generator = torch.Generator().manual_seed(0)
    total = args.adapters * args.rank
    # bf16-representable values, as adapters stored in bf16 give them
    b = (torch.randn(args.modules, args.out, total, generator=generator) * 0.01).bfloat16().float()
    a = (torch.randn(args.modules, total, args.inp, generator=generator) * 0.01).bfloat16().float()
    group = FactorGroup(b_cat=b, a_cat=a, ranks=[args.rank] * args.adapters)
    method = get_method("ctm")
    rule = get_rule(args.rule or method.default_rule)
    method_params, rule_params = resolve_settings(method, rule, parse_params(args.param))
    settings = MergeSettings(
        rank=args.rank,
        rule=rule,
        rule_params=rule_params,
        weights=torch.ones(args.adapters, dtype=torch.float64),
        method_params=method_params,
    )
    best = float("inf")
    with single_threaded(torch.device("cpu")):
        method.function(group, settings)  # warm-up
        for _ in range(args.repeats):
            started = time.perf_counter()
            method.function(group, settings)
            best = min(best, time.perf_counter() - started)
    return best / args.modules


def main() -> None:
    """Print the seconds per module for the options given."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapters", type=int, default=8, help="T (default 8)")
    parser.add_argument("--modules", type=int, default=2, help="modules merged in one call (default 2)")
    parser.add_argument("--out", type=int, default=4096)
    parser.add_argument("--in", dest="inp", type=int, default=4096)
    parser.add_argument("--rank", type=int, default=16, help="every adapter's rank and the output rank")
    parser.add_argument("--rule", default=None, help="default: ctm's (tsv)")
    parser.add_argument("--param", action="append", default=[], help="ctm --param NAME=X (repeatable)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    per_module = seconds_per_module(args)
    print(
        f"T={args.adapters} R={args.adapters * args.rank} {args.out}x{args.inp} rule={args.rule or 'default'} "
        f"params={args.param}: {per_module * 1e3:.1f} ms per module"
    )


if __name__ == "__main__":
    main()
