"""Speed of `ctm merge` on kohya single-file LoRAs shaped like SDXL's, beside kohya's dense-SVD merge, in one run.

Writes T random kohya-style LoRA files with SDXL's module shapes (UNet attention and feed-forward layers with their
proj_in/proj_out, both CLIP text encoders; `--conv` adds the UNet's 3×3 resnet convolutions as LoCon modules), rank r,
float16, then times on the same device:
  (a) `ctm merge` end to end in this process (read, merge, write the kohya file): the default method (ctm + tsv);
  (b) the same with `--method mtc --rule ta`, which computes kohya's result (the rank-r SVD of the weighted sum)
      in core space;
  (c) kohya's method as sd-scripts' svd_merge_lora.py does it: per module, the dense
      ΔW = Σ w_t·(alpha_t/r_t)·up_t·down_t in float32, a full SVD, U·S and Vᴴ cut to rank r, written as one file.
and checks that (b) and (c) agree (relative difference of their ΔW on every module). `--every K` keeps every K-th
module only (the same modules for all three), so that a slow CPU finishes; the figures then cover that subset.

    python scripts/bench_formats.py --adapters 4 --rank 32 --device cpu --every 8 --json cpu.json
    python scripts/bench_formats.py --adapters 4 --rank 32 --device cuda --json gpu.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ctm_cli.pipeline import MergeRequest, prepare, run_merge  # noqa: E402 (after the path to this checkout)
from ctm_cli.recipe import AdapterEntry, Recipe  # noqa: E402

CONTEXT = 2048  # SDXL's cross-attention context width
# SDXL's UNet transformer stacks: (kohya name prefix, width, transformer blocks).
TRANSFORMERS = [
    *((f"input_blocks_{i}_1", 640, 2) for i in (4, 5)),
    *((f"input_blocks_{i}_1", 1280, 10) for i in (7, 8)),
    ("middle_block_1", 1280, 10),
    *((f"output_blocks_{i}_1", 1280, 10) for i in (0, 1, 2)),
    *((f"output_blocks_{i}_1", 640, 2) for i in (3, 4, 5)),
]
# SDXL's resnet 3×3 convolutions: (kohya name prefix, out channels, in channels).
RESNETS = [
    *((f"input_blocks_{i}_0", 320, 320) for i in (1, 2)),
    ("input_blocks_4_0", 640, 320), ("input_blocks_5_0", 640, 640),
    ("input_blocks_7_0", 1280, 640), ("input_blocks_8_0", 1280, 1280),
    *((f"output_blocks_{i}_0", 1280, 2560) for i in (0, 1)), ("output_blocks_2_0", 1280, 1920),
]  # fmt: skip
TEXT_ENCODERS = [("lora_te1", 768, 3072, 12), ("lora_te2", 1280, 5120, 32)]


def sdxl_modules(conv: bool) -> dict[str, tuple[int, ...]]:
    """kohya module name -> weight shape, for an SDXL LoRA of the attention, feed-forward and text-encoder layers."""
    modules: dict[str, tuple[int, ...]] = {}
    for prefix, width, blocks in TRANSFORMERS:
        modules[f"lora_unet_{prefix}_proj_in"] = (width, width)
        modules[f"lora_unet_{prefix}_proj_out"] = (width, width)
        for block in range(blocks):
            name = f"lora_unet_{prefix}_transformer_blocks_{block}"
            for attention in ("attn1", "attn2"):
                context = CONTEXT if attention == "attn2" else width
                modules[f"{name}_{attention}_to_q"] = (width, width)
                modules[f"{name}_{attention}_to_k"] = (width, context)
                modules[f"{name}_{attention}_to_v"] = (width, context)
                modules[f"{name}_{attention}_to_out_0"] = (width, width)
            modules[f"{name}_ff_net_0_proj"] = (8 * width, width)
            modules[f"{name}_ff_net_2"] = (width, 4 * width)
    for prefix, width, inner, layers in TEXT_ENCODERS:
        for layer in range(layers):
            name = f"{prefix}_text_model_encoder_layers_{layer}"
            for projection in ("q_proj", "k_proj", "v_proj", "out_proj"):
                modules[f"{name}_self_attn_{projection}"] = (width, width)
            modules[f"{name}_mlp_fc1"] = (inner, width)
            modules[f"{name}_mlp_fc2"] = (width, inner)
    if conv:
        for prefix, out, inputs in RESNETS:
            modules[f"lora_unet_{prefix}_in_layers_2"] = (out, inputs, 3, 3)
            modules[f"lora_unet_{prefix}_out_layers_3"] = (out, out, 3, 3)
    return modules


def write_files(modules: dict[str, tuple[int, ...]], count: int, rank: int, workdir: Path) -> list[Path]:
    """T kohya files of random factors (float16, alpha = r/2), reused when the same shapes exist already."""
    workdir.mkdir(parents=True, exist_ok=True)
    tag = f"{len(modules)}m-r{rank}"
    paths = []
    for index in range(count):
        path = workdir / f"sdxl-{tag}-{index}.safetensors"
        paths.append(path)
        if path.exists():
            continue
        generator = torch.Generator().manual_seed(index)
        tensors = {}
        for name, (out, inputs, *kernel) in modules.items():
            ones = [1] * len(kernel)
            tensors[f"{name}.lora_down.weight"] = (torch.randn(rank, inputs, *kernel, generator=generator) / 50).half()
            tensors[f"{name}.lora_up.weight"] = (torch.randn(out, rank, *ones, generator=generator) / 50).half()
            tensors[f"{name}.alpha"] = torch.tensor(rank / 2, dtype=torch.float16)
        save_file(tensors, str(path), metadata={"ss_network_module": "networks.lora", "ss_network_dim": str(rank),
                                                "ss_base_model_version": "sdxl_base_v1-0"})
    return paths


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (timings include it)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def ctm_merge(paths: list[Path], output: Path, rank: int, device: str, method: str, rule: str | None) -> float:
    """Seconds of one `ctm merge` in this process, read to written file."""
    recipe = Recipe(
        adapters=tuple(AdapterEntry(str(path)) for path in paths),
        method=method,
        rule=rule,
        rank=rank,
        device=device,
        output=str(output),
    )
    started = time.perf_counter()
    run_merge(prepare(MergeRequest(recipe, force=True)))
    return time.perf_counter() - started


def dense_svd_merge(paths: list[Path], modules: list[str], output: Path, rank: int, device: torch.device) -> float:
    """Seconds of kohya's svd_merge_lora method: per module the dense weighted sum of the updates (float32, on
    `device`), its full SVD, U·S and Vᴴ cut to rank r; written as one kohya file of float16."""
    started = time.perf_counter()
    handles = [safe_open(str(path), "pt") for path in paths]
    merged = {}
    for name in modules:
        total = None
        for handle in handles:
            down = handle.get_tensor(f"{name}.lora_down.weight").to(device, torch.float32)
            up = handle.get_tensor(f"{name}.lora_up.weight").to(device, torch.float32)
            alpha = float(handle.get_tensor(f"{name}.alpha"))
            update = (up.flatten(1) @ down.flatten(1)) * (alpha / down.shape[0])
            total = update if total is None else total + update
        assert total is not None
        u, s, vh = torch.linalg.svd(total, full_matrices=False)
        down_shape = handles[0].get_slice(f"{name}.lora_down.weight").get_shape()
        up_shape = handles[0].get_slice(f"{name}.lora_up.weight").get_shape()
        up_merged = (u[:, :rank] * s[:rank]).reshape(up_shape[0], rank, *up_shape[2:])
        merged[f"{name}.lora_up.weight"] = up_merged.half().cpu().contiguous()
        merged[f"{name}.lora_down.weight"] = vh[:rank].reshape(rank, *down_shape[1:]).half().cpu().contiguous()
        merged[f"{name}.alpha"] = torch.tensor(float(rank), dtype=torch.float16)
    synchronize(device)
    save_file(merged, str(output))
    return time.perf_counter() - started


def largest_difference(first: Path, second: Path, modules: list[str]) -> float:
    """The largest relative difference ‖ΔW₁ − ΔW₂‖ / ‖ΔW₂‖ over the modules of two kohya files (float64)."""
    worst = 0.0
    with safe_open(str(first), "pt") as one, safe_open(str(second), "pt") as two:
        for name in modules:
            deltas = []
            for handle in (one, two):
                down = handle.get_tensor(f"{name}.lora_down.weight").double().flatten(1)
                up = handle.get_tensor(f"{name}.lora_up.weight").double().flatten(1)
                deltas.append(up @ down * (float(handle.get_tensor(f"{name}.alpha")) / down.shape[0]))
            worst = max(worst, float((deltas[0] - deltas[1]).norm() / deltas[1].norm()))
    return worst


def parse_args() -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapters", type=int, default=4, help="T, the number of LoRA files (default 4)")
    parser.add_argument("--rank", type=int, default=32, help="rank of every input and of the output (default 32)")
    parser.add_argument("--conv", action="store_true", help="add the UNet's 3×3 resnet convolutions (LoCon)")
    parser.add_argument("--every", type=int, default=1, help="keep every K-th module only (default 1: all)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (all three merges run there)")
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "ctm-bench-formats"))
    parser.add_argument("--json", default=None, help="also write every figure to this JSON file")
    return parser.parse_args()


def main() -> None:
    """Write the files, time the three merges, check (b) against (c), print and save the figures."""
    args = parse_args()
    device = torch.device(args.device)
    every = sdxl_modules(args.conv)
    modules = {name: shape for index, (name, shape) in enumerate(every.items()) if index % args.every == 0}
    workdir = Path(args.workdir)
    paths = write_files(modules, args.adapters, args.rank, workdir / "inputs")
    outputs = workdir / "outputs"
    outputs.mkdir(exist_ok=True)
    ctm_merge(paths, outputs / "warm-up", args.rank, args.device, "mtc", "ta")  # imports, allocator, page cache
    figures = {
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "adapters": args.adapters,
        "rank": args.rank,
        "modules": len(modules),
        "modules_of_sdxl": len(every),
        "input_bytes_each": paths[0].stat().st_size,
        "ctm_default_seconds": ctm_merge(paths, outputs / "ctm", args.rank, args.device, "ctm", None),
        "ctm_mtc_ta_seconds": ctm_merge(paths, outputs / "mtc", args.rank, args.device, "mtc", "ta"),
        "dense_svd_seconds": dense_svd_merge(paths, list(modules), outputs / "dense.safetensors", args.rank, device),
    }
    figures["mtc_vs_dense_svd_max_relative_difference"] = largest_difference(
        outputs / "mtc" / "mtc.safetensors", outputs / "dense.safetensors", list(modules)
    )
    figures["speedup_mtc_over_dense_svd"] = figures["dense_svd_seconds"] / figures["ctm_mtc_ta_seconds"]
    figures["speedup_default_over_dense_svd"] = figures["dense_svd_seconds"] / figures["ctm_default_seconds"]
    print(json.dumps(figures, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
