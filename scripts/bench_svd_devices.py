#!/usr/bin/env python3
"""Dense SVDs of one model's LoRA module shapes on the CPU and on the GPU: where should a merge that takes them run?

`mtc` with a non-linear rule (tsv, ties, ...) and PEFT's `svd` / `ties_svd` take SVDs of every module's full
out × in update: mtc+tsv one per task (a batch of T) plus three more (two polar factors, the final cut), PEFT one.
On a GPU cuSOLVER's SVD of mid-size matrices can be slower than the CPU's, so this times both, per module shape,
and prints what one merge of `--layers` such layers would spend in SVDs on each device.

    python scripts/bench_svd_devices.py                        # SmolLM2-135M's 7 modules per layer, 30 layers
    python scripts/bench_svd_devices.py --threads 4 --devices cpu
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

SMOLLM2_LAYER = "576x576,192x576,192x576,576x576,1536x576,1536x576,576x1536"  # q k v o gate up down (out x in)


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """`OUTxIN,OUTxIN,...` as (out, in) pairs, repeats kept (a layer's modules)."""
    shapes = []
    for item in text.split(","):
        out_features, _, in_features = item.partition("x")
        shapes.append((int(out_features), int(in_features)))
    return shapes


def seconds_per_svd(shape: tuple[int, ...], device: torch.device, repeats: int, rank: int) -> float:
    """Median wall seconds of torch.linalg.svd (reduced) of a random rank-`rank` matrix (or batch) of `shape`."""
    generator = torch.Generator().manual_seed(0)
    *batch, m, n = shape
    left = torch.randn(*batch, m, rank, generator=generator)
    right = torch.randn(*batch, rank, n, generator=generator)
    matrix = (left @ right).to(device)  # a LoRA update: low rank, as the merges see it
    times = []
    for _ in range(repeats + 1):  # the first call pays the library's start
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        torch.linalg.svd(matrix, full_matrices=False)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times[1:])


def main(argv: list[str] | None = None) -> None:
    """Time every distinct shape alone and as a batch of --tasks on each device; print per-merge estimates."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=SMOLLM2_LAYER, help="one layer's modules, OUTxIN,... (default SmolLM2)")
    parser.add_argument("--layers", type=int, default=30, help="layers per model (default 30, SmolLM2-135M)")
    parser.add_argument("--tasks", type=int, default=8, help="T, the batch of mtc's per-task SVDs (default 8)")
    parser.add_argument("--rank", type=int, default=8, help="rank of each task update (default 8)")
    parser.add_argument("--devices", nargs="+", default=["cpu", "cuda"], help="devices to time (cuda if present)")
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per shape (median)")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = parse_shapes(args.shapes)
    figures = {"threads": torch.get_num_threads(), "layers": args.layers, "tasks": args.tasks, "devices": {}}
    for name in args.devices:
        if name.startswith("cuda") and not torch.cuda.is_available():
            print(f"{name}: no GPU here, skipped")
            continue
        device = torch.device(name)
        single = {shape: seconds_per_svd(shape, device, args.repeats, args.rank) for shape in dict.fromkeys(shapes)}
        batch = {
            shape: seconds_per_svd((args.tasks, *shape), device, args.repeats, args.rank)
            for shape in dict.fromkeys(shapes)
        }
        peft = args.layers * sum(single[shape] for shape in shapes)
        mtc = args.layers * sum(batch[shape] + 3 * single[shape] for shape in shapes)
        figures["devices"][name] = {
            "single": {f"{m}x{n}": s for (m, n), s in single.items()},
            f"batch_of_{args.tasks}": {f"{m}x{n}": s for (m, n), s in batch.items()},
            "peft_svd_merge_s": peft,
            "mtc_nonlinear_merge_s": mtc,
        }
        label = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
        print(f"{name} ({label}):")
        for (m, n), seconds in single.items():
            print(
                f"  {m}x{n}: {seconds * 1e3:8.1f} ms alone, {batch[(m, n)] * 1e3:8.1f} ms for a batch of {args.tasks}"
            )
        print(
            f"  SVDs of one merge of {args.layers} layers: PEFT svd {peft:.1f} s, mtc + a non-linear rule {mtc:.1f} s"
        )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(figures, handle, indent=1)


if __name__ == "__main__":
    main()
