"""The merges of the merge-quality benchmark: what `ctm` offers, the tuning grid, and running the merges.

Every ctm merge runs the real command line (`python -m ctm_cli merge ...`) in a subprocess; PEFT's
`add_weighted_adapter` (`svd`, `ties_svd`) is the outside baseline and runs in-process.
"""

from __future__ import annotations

import contextlib
import copy
import io
import itertools
import json
import math
import multiprocessing
import os
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors import safe_open

PEFT = "peft"


@dataclass(frozen=True)
class MethodInfo:
    """A merge method as the catalog describes it."""

    name: str
    linear_rules_only: bool = False
    takes_beta: bool = False
    fixed_rank: bool = False  # writes one rank whatever --rank says (cat: R, robustmerge: max r_t)
    params: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class RuleInfo:
    """A merging rule and its parameters' defaults."""

    name: str
    linear: bool = True
    params: dict[str, float] = field(default_factory=dict)


# The outside baseline, as one more method whose rules are PEFT's add_weighted_adapter combination types.
PEFT_METHOD = MethodInfo(PEFT)
PEFT_RULES = (
    RuleInfo("svd", True, {"lambda": 1.0}),
    RuleInfo("ties_svd", False, {"lambda": 1.0, "density": 0.2}),
)


@dataclass(frozen=True)
class Catalog:
    """Methods and rules the installed `ctm` offers, and where that list came from."""

    methods: list[MethodInfo]
    rules: list[RuleInfo]
    source: str
    pairs: frozenset[tuple[str, ...]] | None = None  # only these method+rule pairs, when set


@dataclass(frozen=True)
class Grid:
    """Values tried on the validation split; λ is swept by scaling, the others need one merge each.

    λ starts on `lambdas`; while the best value sits on an edge the sweep goes on into `lower` / `upper`.
    """

    lambdas: tuple[float, ...] = (0.25, 0.375, 0.5, 0.75, 1.0, 1.5)
    lower: tuple[float, ...] = (0.125, 0.0625)
    upper: tuple[float, ...] = (2.0, 3.0)
    betas: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    merge_params: dict[str, tuple[float, ...]] = field(
        default_factory=lambda: {"density": (0.1, 0.25, 0.5), "robust_density": (0.1, 0.2, 0.5)}
    )


def next_lambdas(grid: Grid, scores: dict[float, float]) -> list[float]:
    """λ values still to try: the grid first, then one step further out while the best is on an edge."""
    todo = [lam for lam in grid.lambdas if lam not in scores]
    if todo:
        return todo
    best = max(sorted(scores), key=lambda lam: scores[lam] if math.isfinite(scores[lam]) else -math.inf)
    if best == min(scores):
        return [lam for lam in grid.lower if lam not in scores][:1]
    if best == max(scores):
        return [lam for lam in grid.upper if lam not in scores][:1]
    return []


@dataclass(frozen=True)
class MergeSpec:
    """One merge: `method`+`rule` at `rank` with rule parameters and β (engine `peft` for the baseline);
    `variant` names the fixed settings of a variant (see Variant), which make it a method+rule of its own."""

    method: str
    rule: str
    rank: int
    params: tuple[tuple[str, float], ...] = ()
    beta: float | None = None
    seed: int = 0
    variant: str = ""

    @property
    def combo(self) -> str:
        """The method+rule pair, with the variant's fixed settings in brackets."""
        return f"{self.method}+{self.rule}" + (f"[{self.variant}]" if self.variant else "")

    @property
    def label(self) -> str:
        """Human-readable name with every setting."""
        parts = [self.combo, f"r={self.rank}"]
        if self.beta is not None:
            parts.append(f"β={self.beta:g}")
        parts += [f"{'λ' if k == 'lambda' else k}={v:g}" for k, v in self.params]
        return " ".join(parts)

    @property
    def folder_name(self) -> str:
        """A file-system-safe unique name."""
        beta = "" if self.beta is None else f"-b{self.beta:g}"
        params = "".join(f"-{k}{v:g}" for k, v in self.params)
        variant = "".join(c if c.isalnum() else "-" for c in self.variant)
        return f"{self.method}-{self.rule}{'-' + variant if variant else ''}-r{self.rank}{beta}{params}-s{self.seed}"

    def with_param(self, name: str, value: float) -> MergeSpec:
        """The same merge with one rule parameter set."""
        params = dict(self.params)
        params[name] = value
        return replace(self, params=tuple(sorted(params.items())))

    def param(self, name: str, default: float | None = None) -> float | None:
        """A rule parameter's value, or `default`."""
        return dict(self.params).get(name, default)

    def cli_args(self) -> list[str]:
        """The `ctm merge` options that make this merge."""
        args = ["--method", self.method, "--rule", self.rule, "--rank", str(self.rank), "--seed", str(self.seed)]
        if self.beta is not None:
            args += ["--beta", repr(self.beta)]
        for name, value in self.params:
            args += ["--param", f"{name}={value!r}"]
        return args


@dataclass(frozen=True)
class Variant:
    """A method+rule with some settings fixed, benchmarked as a pair of its own: `ctm+tsv:frame_rank=2r`.

    A value written `<k>r` is k times the merge's rank (so one variant means the same at every rank); `beta`
    sets β, any other name a rule or method parameter."""

    method: str
    rule: str
    settings: tuple[tuple[str, float, bool], ...]  # (name, value, value is a multiple of the rank)
    text: str

    def spec(self, method: MethodInfo, rule: RuleInfo, rank: int, seed: int) -> MergeSpec:
        """The variant's merge at `rank`: its settings resolved, λ = 1 where the rule has one, β 1 unless set."""
        spec = MergeSpec(self.method, self.rule, rank, beta=1.0 if method.takes_beta else None, seed=seed)
        spec = replace(spec, variant=self.text.split(":", 1)[1])
        if "lambda" in rule.params:
            spec = spec.with_param("lambda", 1.0)
        for name, value, relative in self.settings:
            resolved = value * rank if relative else value
            spec = replace(spec, beta=resolved) if name == "beta" else spec.with_param(name, resolved)
        return spec


def parse_variant(text: str) -> Variant:
    """`METHOD+RULE:NAME=VALUE[,NAME=VALUE...]`, VALUE a number or `<k>r` (k times the rank); errors say why."""
    pair, sep, settings = text.partition(":")
    method, plus, rule = pair.partition("+")
    if not (sep and plus and method and rule and settings):
        raise ValueError(f"variant {text!r}: expected METHOD+RULE:NAME=VALUE[,NAME=VALUE...]")
    parsed = []
    for item in settings.split(","):
        name, equals, value = item.partition("=")
        relative = value.endswith("r")
        try:
            number = float(value[:-1] or 1) if relative else float(value)
        except ValueError:
            number = math.nan
        if not equals or not name or not math.isfinite(number):
            raise ValueError(f"variant {text!r}: {item!r} is not NAME=NUMBER or NAME=<k>r")
        parsed.append((name, number, relative))
    return Variant(method, rule, tuple(parsed), text)


def parse_catalog(payload: dict, source: str) -> Catalog:
    """The catalog from `ctm methods --json` output: each method's rule needs, β and rank behaviour as ctm states
    them, and every parameter's default."""

    def defaults(params: dict) -> dict[str, float]:
        return {name: float(spec["default"]) for name, spec in params.items()}

    methods = [
        MethodInfo(
            name=m["name"],
            linear_rules_only=m["needs_linear_rule"],
            takes_beta=m["uses_beta"],
            fixed_rank=m["fixed_rank"] is not None,
            params=defaults(m["params"]),
        )
        for m in payload["methods"]
    ]
    rules = [RuleInfo(r["name"], r["linear"], defaults(r["params"])) for r in payload["rules"]]
    return Catalog(methods=methods, rules=rules, source=source)


def select(catalog: Catalog, only: Iterable[str] | None) -> Catalog:
    """The catalog restricted to the named method+rule pairs (e.g. `ctm+ta`, `peft+svd`), or unchanged."""
    if not only:
        return catalog
    return replace(catalog, pairs=frozenset(tuple(pair.split("+", 1)) for pair in only))


def discover_catalog(env: dict[str, str]) -> Catalog:
    """Methods and rules from `python -m ctm_cli methods --json`, the installed ctm's own description."""
    done = subprocess.run(
        [sys.executable, "-m", "ctm_cli", "methods", "--json"], capture_output=True, text=True, env=env, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"`ctm methods --json` failed ({done.returncode}): {done.stderr.strip()}")
    return parse_catalog(json.loads(done.stdout), "`ctm methods --json`")


def combos(catalog: Catalog) -> Iterator[tuple[MethodInfo, RuleInfo]]:
    """Every method × rule pair the catalog allows (linear-only methods skip non-linear rules), then PEFT's."""
    pairs = [(m, r) for m in catalog.methods for r in catalog.rules if r.linear or not m.linear_rules_only]
    pairs += [(PEFT_METHOD, rule) for rule in PEFT_RULES]
    for method, rule in pairs:
        if catalog.pairs is None or (method.name, rule.name) in catalog.pairs:
            yield method, rule


def tuning_specs(
    method: MethodInfo, rule: RuleInfo, ranks: Iterable[int], grid: Grid, seed: int, variant: Variant | None = None
) -> list[MergeSpec]:
    """The merges that tune one method+rule (or a variant of it) on validation: every grid value of β and of
    the parameters (the rule's and the method's) that the grid names and the variant does not fix.

    λ stays 1 here: it is swept afterwards by scaling the merged update, which is exact for a rule whose λ
    multiplies its result (checked again on the final merge).
    """
    fixed = {name for name, _, _ in variant.settings} if variant else set()
    ranks = list(ranks)[:1] if method.fixed_rank else list(ranks)
    betas = grid.betas if method.takes_beta and "beta" not in fixed else (None,)
    tuned = [name for name in {**rule.params, **method.params} if name in grid.merge_params and name not in fixed]
    values = [grid.merge_params[name] for name in tuned]
    specs = []
    for rank, beta, chosen in itertools.product(ranks, betas, itertools.product(*values)):
        if variant is not None:
            spec = variant.spec(method, rule, rank, seed)
        else:
            spec = MergeSpec(method.name, rule.name, rank, seed=seed)
            if "lambda" in rule.params:
                spec = spec.with_param("lambda", 1.0)
        if beta is not None:
            spec = replace(spec, beta=beta)
        for name, value in zip(tuned, chosen, strict=True):
            spec = spec.with_param(name, value)
        specs.append(spec)
    return specs


def default_spec(method: MethodInfo, rule: RuleInfo, rank: int, seed: int) -> MergeSpec:
    """The merge as `ctm merge` makes it with no options beyond method, rule and rank (λ = 1, β = 1)."""
    spec = MergeSpec(method.name, rule.name, rank, beta=1.0 if method.takes_beta else None, seed=seed)
    params = {name: value for name, value in rule.params.items() if method.name == PEFT or name == "lambda"}
    for name, value in sorted(params.items()):
        spec = spec.with_param(name, value)
    return spec


def adapter_facts(folder: Path) -> dict:
    """Output rank (the largest, rank_pattern included) and LoRA parameter count of a PEFT folder."""
    config = json.loads((folder / "adapter_config.json").read_text())
    ranks = [int(config["r"]), *(int(r) for r in (config.get("rank_pattern") or {}).values())]
    count = 0
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as weights:
        for key in weights.keys():  # noqa: SIM118 (a safetensors handle is not a dict)
            if ".lora_" in key:
                shape = weights.get_slice(key).get_shape()
                count += shape[0] * shape[1]
    return {"rank": max(ranks), "parameters": count}


def merge_command(spec: MergeSpec, sources: list[Path], folder: Path, device: str) -> list[str]:
    """The `ctm merge` arguments that write `spec` to `folder`."""
    return ["merge", *map(str, sources), "-o", str(folder), *spec.cli_args(), "--device", device, "--force", "--quiet"]


def merge_env(threads: int) -> dict[str, str]:
    """Environment of the merge processes: offline, few threads each so several run at once."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def _start_merge_worker(env: dict[str, str]) -> None:
    """Set up a merge worker process once: the merge environment, its thread count, ctm importable."""
    os.environ.update(env)
    sys.path[:0] = [p for p in env["PYTHONPATH"].split(os.pathsep) if p not in sys.path]
    torch.set_num_threads(int(env["OMP_NUM_THREADS"]))


def _run_ctm_in_worker(arguments: list[str]) -> tuple[str | None, float, int]:
    """Run the `ctm` console script's entry point with `arguments` in this worker process: (None on success, else
    the last line it printed on stderr with its exit code; the seconds it took; the worker's process id). The
    command line is exactly the CLI's; only the process start (Python, torch) is paid once per worker instead of
    once per merge (a worker's first merge also pays ctm's imports and, on a GPU, the device's start)."""
    from ctm_cli.cli import main

    captured = io.StringIO()
    saved_argv = sys.argv
    sys.argv = ["ctm", *arguments]
    started = time.perf_counter()
    try:
        with contextlib.redirect_stderr(captured):
            main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = saved_argv
    seconds = time.perf_counter() - started
    if code == 0:
        return None, seconds, os.getpid()
    lines = [line for line in captured.getvalue().splitlines() if line.strip()] or [f"exit code {code}"]
    return f"exit {code}: {lines[-1].strip()}", seconds, os.getpid()


@dataclass(frozen=True)
class MergeOutcome:
    """One finished merge: its spec, the folder written (None when it failed), the error line, its own seconds and
    the process that made it (a worker's id; None: the benchmark's own process)."""

    spec: MergeSpec
    folder: Path | None
    error: str | None
    seconds: float
    worker: int | None = None


class PendingMerges:
    """`ctm merge` command lines submitted to a MergePool, taken back as they finish."""

    def __init__(self, futures: dict[Future, tuple[MergeSpec, Path]]):
        self._futures = futures

    def __len__(self) -> int:
        return len(self._futures)

    def _take(self, future: Future) -> MergeOutcome:
        spec, folder = self._futures.pop(future)
        error, seconds, worker = future.result()
        return MergeOutcome(spec, None if error else folder, error, seconds, worker)

    def finished(self) -> Iterator[MergeOutcome]:
        """The merges done by now, without waiting for the others."""
        for future in [f for f in self._futures if f.done()]:
            yield self._take(future)

    def rest(self) -> Iterator[MergeOutcome]:
        """Every merge not taken yet, as each one finishes."""
        for future in as_completed(list(self._futures)):
            yield self._take(future)


class MergePool:
    """Worker processes that run `ctm merge` command lines, `jobs` at a time (start once, merge many)."""

    def __init__(self, jobs: int):
        env = merge_env(max(1, (os.cpu_count() or 1) // max(1, jobs)))
        context = multiprocessing.get_context("spawn")
        self._pool = ProcessPoolExecutor(
            max_workers=jobs, mp_context=context, initializer=_start_merge_worker, initargs=(env,)
        )

    def submit(
        self, specs: list[MergeSpec], sources: list[Path], root: Path, devices: dict[MergeSpec, str]
    ) -> PendingMerges:
        """Start merging every spec into root/<its folder name> on its device, in the order given; take them back
        from the returned PendingMerges."""
        futures = {}
        for spec in specs:
            folder = root / spec.folder_name
            command = merge_command(spec, sources, folder, devices[spec])
            futures[self._pool.submit(_run_ctm_in_worker, command)] = (spec, folder)
        return PendingMerges(futures)

    def close(self) -> None:
        """Stop the workers."""
        self._pool.shutdown(wait=True, cancel_futures=True)


class PeftMerger:
    """PEFT's add_weighted_adapter over the task adapters, loaded once into one PeftModel."""

    def __init__(self, base_cpu, sources: list[Path], device: torch.device):
        from peft import PeftModel

        self.names = [f"task{i}" for i in range(len(sources))]
        base = copy.deepcopy(base_cpu).to(device)
        self.model = PeftModel.from_pretrained(base, str(sources[0]), adapter_name=self.names[0])
        for name, source in zip(self.names[1:], sources[1:], strict=True):
            self.model.load_adapter(str(source), adapter_name=name)
        self.model.to(device)

    def merge(self, spec: MergeSpec, folder: Path) -> str | None:
        """Write the merge `spec` (weights λ for every task) as a PEFT folder; None or an error line."""
        name = "merged"
        try:
            self.model.add_weighted_adapter(
                self.names,
                [spec.param("lambda", 1.0)] * len(self.names),
                name,
                combination_type=spec.rule,
                svd_rank=spec.rank,
                svd_full_matrices=False,  # the same truncated result, without the unused full bases
                density=spec.param("density"),
            )
            self.model.save_pretrained(str(folder), selected_adapters=[name])
        except (ValueError, RuntimeError) as exc:
            return f"{type(exc).__name__}: {exc}"
        finally:
            if name in self.model.peft_config:
                self.model.delete_adapter(name)
        saved = folder / name
        for path in saved.iterdir():
            path.replace(folder / path.name)
        saved.rmdir()
        return None
