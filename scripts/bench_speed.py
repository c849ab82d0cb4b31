"""Speed and memory benchmark of `ctm merge` against the I/O floor and PEFT's `add_weighted_adapter`.

Makes T random LoRA adapters with real model shapes (default Llama-3-8B: hidden 4096, MLP 14336,
kv 1024, 32 layers, all 7 projections, r=16, bf16) as PEFT folders, then measures in one run:
  (a) the I/O floor: read every input file to the device and write one file of the output's size;
  (b) `ctm merge` end to end as a subprocess (process start included; its peak RSS from wait4),
      and the merge alone in this (warmed-up) process, with the device's peak memory;
  (c) PEFT `add_weighted_adapter(combination_type="svd", svd_rank=r)` on a base model of the same
      shapes on the same device, allocated empty (meta → to_empty, no weights), limited to
      --peft-layers layers; its per-module time is extrapolated to all modules.
`--sweep 2,8,32,100` repeats (a) and (b) for each T (time vs T, peak RSS vs T); add --peft-layers
to also time PEFT at the largest T.

    python scripts/bench_speed.py --adapters 8 --peft-layers 1
    python scripts/bench_speed.py --sweep 2,8,32,100 --sweep-layers 4

Adapters go to --workdir (default: a folder under the system temp dir) and are reused when the
shapes match. Files are read from a warm page cache unless --cold drops them first
(posix_fadvise DONTNEED on each input file: no root needed, no other file touched).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import math
import os
import pstats
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ctm_cli.recipe import parse_params  # noqa: E402 (after the path to this checkout)

PROJECTIONS = {  # name: (out, in) as functions of (hidden, intermediate, kv)
    "q_proj": ("self_attn", lambda h, i, k: (h, h)),
    "k_proj": ("self_attn", lambda h, i, k: (k, h)),
    "v_proj": ("self_attn", lambda h, i, k: (k, h)),
    "o_proj": ("self_attn", lambda h, i, k: (h, h)),
    "gate_proj": ("mlp", lambda h, i, k: (i, h)),
    "up_proj": ("mlp", lambda h, i, k: (i, h)),
    "down_proj": ("mlp", lambda h, i, k: (h, i)),
}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
BASE_NAME = "bench/llama-shaped"


@dataclass(frozen=True)
class Shapes:
    """The model and adapter shapes every generated adapter has."""

    hidden: int
    intermediate: int
    kv: int
    layers: int
    rank: int
    dtype: str
    targets: tuple[str, ...]
    input_ranks: tuple[int, ...] = ()  # adapter i's rank is input_ranks[i % len]; empty: every adapter has `rank`

    def rank_of(self, index: int) -> int:
        """The rank of generated adapter `index`."""
        return self.input_ranks[index % len(self.input_ranks)] if self.input_ranks else self.rank

    def modules(self, layers: int | None = None) -> list[tuple[str, int, int]]:
        """(PEFT module name, out, in) of every adapted module in the first `layers` layers."""
        rows = []
        for layer in range(self.layers if layers is None else layers):
            for target in self.targets:
                block, shape = PROJECTIONS[target]
                out_features, in_features = shape(self.hidden, self.intermediate, self.kv)
                rows.append((f"base_model.model.model.layers.{layer}.{block}.{target}", out_features, in_features))
        return rows

    def output_bytes(self) -> int:
        """Bytes of the merged rank-r adapter's tensors."""
        itemsize = torch.empty((), dtype=DTYPES[self.dtype]).element_size()
        return sum((o + i) * self.rank * itemsize for _, o, i in self.modules())


def _mix(independent: torch.Tensor, common: torch.Tensor, shared: float) -> torch.Tensor:
    return (1 - shared) ** 0.5 * independent + shared**0.5 * common


def make_adapters(shapes: Shapes, count: int, shared: float, workdir: Path, device: torch.device) -> list[Path]:
    """`count` random PEFT LoRA folders (seeded per index), reused when a previous run made the same ones.

    B_t = √(1−f)·N + √f·U·G_t and A_t = √(1−f)·N' + √f·H_t·V with U, V common to all adapters and f =
    `shared`: f = 0 gives independent Gaussian adapters (no common structure: HOOI's worst case), f > 0
    adapters that share directions, as fine-tunes of one base do.
    """
    from peft import LoraConfig
    from safetensors.torch import save_file

    folders = []
    stamp = json.dumps({**asdict(shapes), "shared": shared}, sort_keys=True)
    bases: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # the common directions, made on first need
    for index in range(count):
        folder = workdir / f"adapter-{index:03d}"
        folders.append(folder)
        if (folder / "shapes.json").is_file() and (folder / "shapes.json").read_text() == stamp:
            continue
        if not bases:
            common = torch.Generator(device=device).manual_seed(10**6)
            for name, out_features, in_features in shapes.modules():
                u = torch.randn(out_features, shapes.rank, generator=common, device=device)
                bases[name] = (u, torch.randn(shapes.rank, in_features, generator=common, device=device))
        generator = torch.Generator(device=device).manual_seed(index)
        tensors = {}
        rank = shapes.rank_of(index)
        for name, out_features, in_features in shapes.modules():
            u, v = bases[name]
            mixing = torch.randn(2, shapes.rank, rank, generator=generator, device=device) / shapes.rank**0.5
            a = _mix(torch.randn(rank, in_features, generator=generator, device=device), mixing[0].mT @ v, shared)
            b = _mix(torch.randn(out_features, rank, generator=generator, device=device), u @ mixing[1], shared)
            tensors[f"{name}.lora_A.weight"] = (a / in_features**0.5).to(DTYPES[shapes.dtype]).cpu()
            tensors[f"{name}.lora_B.weight"] = (b * 0.01).to(DTYPES[shapes.dtype]).cpu()
        folder.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(folder / "adapter_model.safetensors"))
        config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(shapes.targets), task_type="CAUSAL_LM")
        config.base_model_name_or_path = BASE_NAME
        config.save_pretrained(str(folder))
        (folder / "shapes.json").write_text(stamp)
    return folders


def drop_from_page_cache(paths: list[Path]) -> None:
    """Ask the kernel to forget the cached pages of these files (next reads come from the disk)."""
    for path in paths:
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(descriptor)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def io_floor(files: list[Path], output_bytes: int, device: torch.device, scratch: Path) -> float:
    """Seconds to read every input file once onto the device and write one file of the output's size."""
    largest = max(path.stat().st_size for path in files)
    staging = torch.empty(largest, dtype=torch.uint8, pin_memory=device.type == "cuda")
    started = time.perf_counter()
    for path in files:
        size = path.stat().st_size
        with path.open("rb", buffering=0) as handle:
            handle.readinto(memoryview(staging.numpy())[:size])
        staging[:size].to(device, non_blocking=True)
        synchronize(device)
    with (scratch / "floor-output.bin").open("wb") as handle:
        handle.write(memoryview(torch.zeros(output_bytes, dtype=torch.uint8).numpy()))
    seconds = time.perf_counter() - started
    (scratch / "floor-output.bin").unlink()
    return seconds


def ctm_subprocess(
    folders: list[Path],
    output: Path,
    rank: int,
    device: str,
    max_memory: int | None,
    params: dict[str, float],
    rule: str | None,
) -> dict:
    """`ctm merge` as a user runs it: wall time (process start included) and the child's peak RSS."""
    command = [sys.executable, "-m", "ctm_cli", "merge", *map(str, folders), "-o", str(output)]
    command += ["--rank", str(rank), "--device", device, "--force", "--quiet"]
    if rule is not None:
        command += ["--rule", rule]
    for name, value in params.items():
        command += ["--param", f"{name}={value:g}"]
    if max_memory is not None:
        command += ["--max-memory", str(max_memory)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    started = time.perf_counter()
    child = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - started
    stdout, stderr = child.stdout.read(), child.stderr.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"ctm merge failed ({status}):\n{stdout.decode()}\n{stderr.decode()}")
    report = json.loads((output / "merge_report.json").read_text())
    sweeps = [m["sweeps"] for m in report["modules"] if m.get("sweeps") is not None]
    return {
        "seconds": seconds,
        "cpu_seconds": usage.ru_utime + usage.ru_stime,  # all its threads: steadier than wall time on a busy host
        "peak_rss_bytes": usage.ru_maxrss * 1024,  # Linux reports KiB
        "report_seconds": report["summary"]["seconds"],
        "hooi_sweeps_median": statistics.median(sweeps) if sweeps else None,
        "hooi_sweeps_max": max(sweeps) if sweeps else None,
    }


def warm_up(device: torch.device) -> None:
    """Create the device context and the linear-algebra handles the merge uses, outside the timings."""
    x = torch.randn(4, 48, 48, dtype=torch.float64, device=device)
    gram = x @ x.mT + torch.eye(48, dtype=torch.float64, device=device)
    torch.linalg.eigh(gram)
    torch.linalg.cholesky_ex(gram)
    torch.linalg.svd(gram)
    synchronize(device)


def ctm_in_process(
    folders: list[Path],
    output: Path,
    rank: int,
    device: torch.device,
    max_memory: int | None,
    params: dict[str, float],
    rule: str | None,
    profile: Path | None,
) -> dict:
    """The merge alone (`prepare` and `run_merge`, as `ctm merge` runs them) in this process, the device's peak
    memory during it and the plan's estimate of that peak (the largest wave's); with `profile`, a cProfile listing."""
    from ctm_cli.pipeline import MergeRequest, prepare, run_merge
    from ctm_cli.plan import wave_bytes
    from ctm_cli.recipe import build_recipe

    given = {"sources": [str(f) for f in folders], "output": str(output), "rank": rank, "device": str(device)}
    if rule is not None:
        given["rule"] = rule
    recipe = build_recipe(None, {**given, "params": params})
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    profiler = cProfile.Profile() if profile else None
    started, cpu_started = time.perf_counter(), time.process_time()
    if profiler:
        profiler.enable()
    prepared = prepare(MergeRequest(recipe, max_memory_mib=max_memory, force=True))
    run_merge(prepared)
    synchronize(device)
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    if profiler:
        profiler.disable()
        listing = io.StringIO()
        pstats.Stats(profiler, stream=listing).sort_stats("cumulative").print_stats(45)
        profile.write_text(listing.getvalue())
    return {
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "groups": sum(len(wave) for wave in prepared.waves),
        "waves": len(prepared.waves),
        "peak_device_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "estimated_device_bytes": max(wave_bytes(wave, prepared.core_numbers) for wave in prepared.waves),
    }


def peft_svd(folders: list[Path], shapes: Shapes, layers: int, device: torch.device) -> dict:
    """PEFT's svd merge of the first `layers` layers of every adapter, on an empty base of the same shapes."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from safetensors import safe_open
    from transformers import LlamaConfig, LlamaForCausalLM

    head_dim = math.gcd(shapes.hidden, shapes.kv, 128)
    config = LlamaConfig(
        hidden_size=shapes.hidden,
        intermediate_size=shapes.intermediate,
        num_hidden_layers=layers,
        num_attention_heads=shapes.hidden // head_dim,
        num_key_value_heads=shapes.kv // head_dim,
        head_dim=head_dim,
        vocab_size=256,
    )
    with torch.device("meta"):
        base = LlamaForCausalLM(config)
    base = base.to_empty(device=device).to(DTYPES[shapes.dtype])
    loras = [
        LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(shapes.targets))
        for rank in map(shapes.rank_of, range(len(folders)))
    ]
    names = [f"adapter{index}" for index in range(len(folders))]
    model = get_peft_model(base, loras[0], adapter_name=names[0])
    wanted = {f"{name}.lora_{side}.weight" for name, _, _ in shapes.modules(layers) for side in "AB"}
    for name, folder, lora in zip(names, folders, loras, strict=True):
        if name != names[0]:
            model.add_adapter(name, lora)
        with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as handle:
            state = {key: handle.get_tensor(key) for key in wanted}
        set_peft_model_state_dict(model, state, adapter_name=name)
    synchronize(device)
    started = time.perf_counter()
    model.add_weighted_adapter(names, [1.0] * len(names), "merged", combination_type="svd", svd_rank=shapes.rank)
    synchronize(device)
    seconds = time.perf_counter() - started
    modules = len(shapes.modules(layers))
    return {"seconds": seconds, "modules": modules, "seconds_per_module": seconds / modules}


def resident_bytes() -> int:
    """This process's resident memory now (Linux /proc), memory-mapped file pages included."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def read_memory(folders: list[Path], rank: int, how: str) -> None:
    """Peak resident memory while reading every module's factors once: through the engine's wave stream (its
    staging buffers), or through the adapters' own safetensors readers (memory maps). The waves are the ones a CPU
    merge of these adapters at `rank` plans (`prepare`)."""
    from ctm_cli.engine import WaveStream
    from ctm_cli.pipeline import MergeRequest, prepare
    from ctm_cli.recipe import build_recipe

    output = Path(tempfile.mkdtemp()) / "never-written"
    given = {"sources": [str(f) for f in folders], "output": str(output), "rank": rank, "device": "cpu"}
    recipe = build_recipe(None, given)
    prepared = prepare(MergeRequest(recipe))
    adapters, waves = prepared.adapters, prepared.waves
    before = peak = resident_bytes()
    if how == "engine":
        with WaveStream(adapters, waves, torch.device("cpu")) as stream:
            for _ in zip(waves, stream, strict=True):
                peak = max(peak, resident_bytes())
    else:
        for wave in waves:
            factors = [adapter.factors(spec.name) for group in wave for spec in group for adapter in adapters]
            peak = max(peak, resident_bytes())
            del factors
    inputs = sum((f / "adapter_model.safetensors").stat().st_size for f in folders)
    print(
        f"read through {how}: {len(folders)} adapters, {gib(inputs)} of inputs, {len(waves)} waves:"
        f" resident {gib(before)} before, {gib(peak - before)} more at the peak"
    )


def gib(value: float | None) -> str:
    """Bytes as GiB text, or '-'."""
    return "-" if value is None else f"{value / 1024**3:.2f} GiB"


def measure(args: argparse.Namespace, shapes: Shapes, folders: list[Path], device: torch.device) -> dict:
    """Floor, ctm end to end and in-process for one set of adapters."""
    scratch = Path(args.workdir)
    files = [folder / "adapter_model.safetensors" for folder in folders]
    output_bytes = shapes.output_bytes()
    rows: dict = {
        "load_average": os.getloadavg()[0],  # other work on the host (the CPU figures move with it)
        "adapters": len(folders),
        "modules": len(shapes.modules()),
        "input_bytes": sum(f.stat().st_size for f in files),
    }
    if args.cold:
        drop_from_page_cache(files)
    rows["floor_seconds"] = io_floor(files, output_bytes, device, scratch)
    if args.cold:
        drop_from_page_cache(files)
    output = scratch / f"merged-{len(folders)}"
    params = parse_params(args.param)  # ctm's own parser: the same checks as `ctm merge --param`
    rows["ctm_end_to_end"] = ctm_subprocess(
        folders, output, shapes.rank, args.device, args.max_memory, params, args.rule
    )
    runs = []
    for repeat in range(args.repeats):
        if args.cold:
            drop_from_page_cache(files)
        profile = Path(f"{args.profile}-T{len(folders)}.txt") if args.profile and repeat == 0 else None
        runs.append(ctm_in_process(folders, output, shapes.rank, device, args.max_memory, params, args.rule, profile))
    rows["ctm_merge_seconds"] = [run["seconds"] for run in runs]
    rows["ctm_merge_cpu_seconds"] = [run["cpu_seconds"] for run in runs]
    rows["groups"], rows["waves"] = runs[0]["groups"], runs[0]["waves"]
    rows["peak_device_bytes"] = max((run["peak_device_bytes"] or 0) for run in runs) or None
    rows["estimated_device_bytes"] = runs[0]["estimated_device_bytes"]
    return rows


def print_summary(rows: dict, peft: dict | None) -> None:
    """One block of figures for one T."""
    floor, merge = rows["floor_seconds"], min(rows["ctm_merge_seconds"])
    e2e = rows["ctm_end_to_end"]
    sweeps = f"HOOI sweeps median {e2e['hooi_sweeps_median']}, max {e2e['hooi_sweeps_max']}"
    print(
        f"T={rows['adapters']}: {rows['modules']} modules, inputs {gib(rows['input_bytes'])};"
        f" host load average {rows['load_average']:.1f} at the start"
    )
    print(f"  I/O floor (read inputs to device + write output): {floor:.3f} s")
    runs, cpu = len(rows["ctm_merge_seconds"]), min(rows["ctm_merge_cpu_seconds"])
    print(
        f"  ctm merge alone (in-process, best of {runs}): {merge:.3f} s = {merge / floor:.1f}× floor;"
        f" CPU time {cpu:.3f} s"
    )
    print(
        f"  ctm merge end to end (subprocess): {e2e['seconds']:.3f} s = {e2e['seconds'] / floor:.1f}× floor;"
        f" CPU time {e2e['cpu_seconds']:.3f} s"
    )
    print(f"  ctm peak RSS (subprocess) {gib(e2e['peak_rss_bytes'])}; {sweeps}")
    print(
        f"  peak device memory (in-process merge): {gib(rows['peak_device_bytes'])};"
        f" engine estimate {gib(rows['estimated_device_bytes'])} ({rows['groups']} groups in {rows['waves']} waves)"
    )
    if peft is not None:
        per_module = peft["seconds_per_module"]
        extrapolated = per_module * rows["modules"]
        print(f"  PEFT svd: {peft['seconds']:.2f} s for {peft['modules']} modules = {per_module:.3f} s/module")
        print(
            f"  PEFT svd extrapolated to {rows['modules']} modules: {extrapolated:.1f} s"
            f" = {extrapolated / merge:.0f}× ctm merge alone, {extrapolated / e2e['seconds']:.0f}× ctm end to end"
        )


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapters", type=int, default=8, help="T, the number of adapters (default 8)")
    parser.add_argument("--sweep", default=None, help="comma-separated T values, e.g. 2,8,32,100")
    parser.add_argument("--sweep-layers", type=int, default=None, help="layers of the adapters in a sweep")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=14336)
    parser.add_argument("--kv", type=int, default=1024, help="k/v projection width")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--rank", type=int, default=16, help="rank of every adapter and of the output")
    parser.add_argument(
        "--input-ranks", default="", help="comma-separated ranks the adapters take in turn, e.g. 16,8 (mixed ranks)"
    )
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument("--targets", default=",".join(PROJECTIONS), help="comma-separated projections")
    parser.add_argument("--shared", type=float, default=0.0, help="share f of common directions (0: independent)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda")
    parser.add_argument("--max-memory", type=int, default=None, help="ctm --max-memory, MiB")
    parser.add_argument("--param", action="append", default=[], help="ctm --param NAME=X (repeatable)")
    parser.add_argument("--rule", default=None, help="ctm --rule (default: the method's default rule)")
    parser.add_argument("--peft-layers", type=int, default=1, help="layers PEFT merges (0: skip PEFT)")
    parser.add_argument("--repeats", type=int, default=2, help="in-process merges to time (best is shown)")
    parser.add_argument("--cold", action="store_true", help="drop the inputs from the page cache before each run")
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "ctm-bench-speed"))
    parser.add_argument("--profile", default=None, help="cProfile the first in-process merge to PREFIX-T<T>.txt")
    parser.add_argument(
        "--read-only", choices=["engine", "mmap"], help="only read every factor once (engine or memory map): peak RSS"
    )
    parser.add_argument("--json", default=None, help="also write every figure to this JSON file")
    return parser.parse_args()


def host_processor() -> dict:
    """The host's CPU model (Linux: /proc/cpuinfo) and the cores this process may use: a GPU merge solves its small
    decompositions there (small_linalg), so its figures depend on them too."""
    from ctm_cli.small_linalg import usable_cores

    model = "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        lines = cpuinfo.read_text().splitlines()
        model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), model)
    return {"model": model, "cores": usable_cores()}


def main() -> None:
    """Generate the adapters, measure, print (and optionally save) the figures."""
    args = parse_args()
    from ctm_cli.devices import resolve_device

    device = resolve_device(args.device)
    counts = [int(x) for x in args.sweep.split(",")] if args.sweep else [args.adapters]
    layers = args.sweep_layers if args.sweep and args.sweep_layers else args.layers
    shapes = Shapes(
        args.hidden,
        args.intermediate,
        args.kv,
        layers,
        args.rank,
        args.dtype,
        tuple(args.targets.split(",")),
        tuple(int(rank) for rank in args.input_ranks.split(",") if rank),
    )
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    host = host_processor()
    print(
        f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else os.cpu_count()} "
        f"{'' if device.type == 'cuda' else 'CPU cores'}), torch {torch.__version__}, shapes {shapes}",
        flush=True,
    )
    print(f"host {host['model']}, {host['cores']} cores for this process", flush=True)
    started = time.perf_counter()
    folders = make_adapters(shapes, max(counts), args.shared, workdir, device)
    print(f"adapters ready in {time.perf_counter() - started:.1f} s under {workdir}", flush=True)
    if args.read_only:
        read_memory(folders[: max(counts)], shapes.rank, args.read_only)
        return
    warm_up(device)
    results = []
    for count in counts:
        rows = measure(args, shapes, folders[:count], device)
        peft = None
        if args.peft_layers > 0 and count == max(counts):
            peft = peft_svd(folders[:count], shapes, args.peft_layers, device)
        rows["peft_svd"] = peft
        results.append(rows)
        print_summary(rows, peft)
        if args.json:  # after every T, so that a run cut short keeps what it measured
            figures = {
                "shapes": asdict(shapes),
                "shared": args.shared,
                "params": parse_params(args.param),
                "rule": args.rule,
                "device": str(device),
                "host": host,
                "results": results,
            }
            Path(args.json).write_text(json.dumps(figures, indent=2))
    if len(counts) > 1:
        print("\n   T  floor s  ctm merge s  ctm e2e s  peak RSS  peak device")
        for rows in results:
            e2e = rows["ctm_end_to_end"]
            print(
                f"{rows['adapters']:4d} {rows['floor_seconds']:8.3f} {min(rows['ctm_merge_seconds']):12.3f}"
                f" {e2e['seconds']:10.3f} {gib(e2e['peak_rss_bytes']):>9} {gib(rows['peak_device_bytes']):>12}"
            )
    print(
        f"bench peak RSS (this process, incl. PEFT): {gib(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)}"
    )


if __name__ == "__main__":
    main()
