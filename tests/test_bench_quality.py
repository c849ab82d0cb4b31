"""Unit tests of the merge-quality benchmark's pure parts: label words, NA/GR, ranking, grid, catalog, report."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

from helpers import run_ctm
from quality_data import DataLimits, carve_rows
from quality_merges import (
    Catalog,
    Grid,
    MergeSpec,
    MethodInfo,
    RuleInfo,
    combos,
    default_spec,
    next_lambdas,
    parse_catalog,
    parse_variant,
    select,
    tuning_specs,
)
from quality_metrics import (
    best_config,
    check_label_words,
    gain_retention,
    label_words,
    leave_one_task_out,
    mean_and_spread,
    normalized_accuracy,
    rank_by_gr,
    score_row,
)
from quality_report import aggregate, combine_runs, render_markdown

from ctm_cli.methods import METHODS


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("ABBR", "abbreviation"),
        ("HUM", "human"),
        ("ENTY", "entity"),
        ("Sci/Tech", "science technology"),
        ("not-offensive", "not offensive"),
        ("Refund_not_showing_up", "refund not showing up"),
        ("reverted_card_payment?", "reverted card payment"),
        ("joy", "joy"),
    ],
)
def test_label_words_expand_codes_and_separators(name, words):
    assert label_words(name) == words


def test_normalized_accuracy_and_gain_retention():
    assert normalized_accuracy(0.45, 0.9) == pytest.approx(0.5)
    assert gain_retention(0.7, 0.9, 0.5) == pytest.approx(0.5)
    assert gain_retention(0.9, 0.9, 0.5) == pytest.approx(1.0)
    assert gain_retention(0.5, 0.9, 0.5) == pytest.approx(0.0)
    assert gain_retention(0.4, 0.9, 0.5) == pytest.approx(-0.25)
    assert math.isnan(gain_retention(0.6, 0.5, 0.5))  # the adapter gained nothing: GR means nothing


def test_score_row_means_per_task_values_and_skips_undefined_gr():
    row = score_row({"a": 0.8, "b": 0.6}, {"a": 1.0, "b": 0.6}, {"a": 0.6, "b": 0.6})
    assert row["tasks"]["a"] == pytest.approx({"accuracy": 0.8, "na": 0.8, "gr": 0.5, "floor_na": 0.6})
    assert math.isnan(row["tasks"]["b"]["gr"])
    assert row["mean"]["gr"] == pytest.approx(0.5)  # b's undefined GR is left out, not counted as 0
    assert row["mean"]["na"] == pytest.approx(0.9)
    assert row["mean"]["floor_na"] == pytest.approx(0.8)


def test_rank_by_gr_orders_best_first_nan_last_ties_by_label():
    rows = [
        {"label": "b", "mean": {"gr": 0.5}},
        {"label": "nan", "mean": {"gr": math.nan}},
        {"label": "a", "mean": {"gr": 0.5}},
        {"label": "c", "mean": {"gr": 0.9}},
    ]
    assert [r["label"] for r in rank_by_gr(rows)] == ["c", "a", "b", "nan"]


def test_mean_and_spread():
    assert mean_and_spread([0.2, 0.4]) == pytest.approx((0.3, math.sqrt(0.02)))
    assert mean_and_spread([0.2]) == (0.2, 0.0)


def test_leave_one_task_out_picks_on_the_others_and_scores_the_held_out_task():
    per_task = {
        "x": {"t1": 0.9, "t2": 0.9, "t3": 0.0},
        "y": {"t1": 0.5, "t2": 0.5, "t3": 0.8},
    }
    assert best_config(per_task, ["t1", "t2", "t3"]) == "x"
    result = leave_one_task_out(per_task)
    folds = {f["held_out"]: f for f in result["folds"]}
    assert result["overall_best"] == "x"
    assert folds["t3"]["chosen"] == "x" and folds["t3"]["held_out_gr"] == 0.0
    assert folds["t1"]["chosen"] == "y" and folds["t1"]["held_out_gr"] == 0.5  # y wins on t2 + t3
    assert result["agreement"] == pytest.approx(1 / 3)
    assert result["held_out_mean_gr"] == pytest.approx((0.5 + 0.5 + 0.0) / 3)


def test_val_carve_is_fixed_disjoint_and_independent_of_caps_on_test():
    train, test = list(range(100)), list(range(100, 150))
    first = carve_rows("sst2", train, test, DataLimits(val_size=10))
    again = carve_rows("sst2", train, test, DataLimits(val_size=10, max_test=20))
    assert first["val"] == again["val"] and len(first["val"]) == 10
    assert not set(first["val"]) & set(first["train"]) and set(first["val"]) | set(first["train"]) == set(train)
    assert first["test"] == test and len(again["test"]) == 20 and set(again["test"]) <= set(test)
    assert carve_rows("trec", train, test, DataLimits(val_size=10))["val"] != first["val"]


def test_parse_catalog_reads_what_ctm_methods_prints():
    """The benchmark learns each method's rule needs, β and rank behaviour from `ctm methods --json` itself."""
    printed = run_ctm("methods", "--json")
    assert printed.exit_code == 0, printed.stderr
    catalog = parse_catalog(json.loads(printed.stdout), "json")
    methods = {m.name: m for m in catalog.methods}
    assert sorted(methods) == sorted(METHODS)
    ctm, cat = methods["ctm"], methods["cat"]
    assert (ctm.linear_rules_only, ctm.takes_beta, ctm.fixed_rank) == (False, True, False)
    assert ctm.params["frame_rank"] == 0.0  # the whole core space, ctm's default frame
    assert (cat.linear_rules_only, cat.takes_beta, cat.fixed_rank) == (True, False, True)
    assert methods["robustmerge"] == MethodInfo("robustmerge", True, False, True, {"robust_density": 0.2})
    assert methods["mtc"] == MethodInfo("mtc")
    assert {m.name for m in catalog.methods if m.takes_beta} == {n for n, m in METHODS.items() if m.uses_beta}
    assert {m.name for m in catalog.methods if m.fixed_rank} == {n for n, m in METHODS.items() if m.fixed_rank}
    rules = {r.name: r for r in catalog.rules}
    assert rules["ta"] == RuleInfo("ta", True, {"lambda": 1.0})
    ties_defaults = {"density": 0.2, "trim_count": 0.0, "sign_count": 0.0, "lambda": 1.0}
    assert rules["ties"] == RuleInfo("ties", False, ties_defaults)


def test_combos_skip_nonlinear_rules_for_linear_only_methods():
    catalog = Catalog(
        methods=[MethodInfo("ctm"), MethodInfo("cat", linear_rules_only=True)],
        rules=[RuleInfo("ta"), RuleInfo("ties", linear=False)],
        source="test",
    )
    pairs = [(m.name, r.name) for m, r in combos(catalog)]
    assert pairs == [("ctm", "ta"), ("ctm", "ties"), ("cat", "ta"), ("peft", "svd"), ("peft", "ties_svd")]
    chosen = select(catalog, ["ctm+ties", "peft+svd"])
    assert [(m.name, r.name) for m, r in combos(chosen)] == [("ctm", "ties"), ("peft", "svd")]


def test_tuning_specs_cover_the_grid_with_lambda_one():
    grid = Grid(lambdas=(0.5, 1.0), betas=(0.0, 1.0), merge_params={"density": (0.1, 0.5)})
    ties = RuleInfo("ties", False, {"lambda": 1.0, "density": 0.2})
    specs = tuning_specs(MethodInfo("ctm", takes_beta=True), ties, [8, 16], grid, seed=3)
    assert len(specs) == 2 * 2 * 2  # ranks × β × density
    assert all(s.param("lambda") == 1.0 and s.seed == 3 for s in specs)
    assert {(s.rank, s.beta, s.param("density")) for s in specs} == {
        (r, b, d) for r in (8, 16) for b in (0.0, 1.0) for d in (0.1, 0.5)
    }
    cat = tuning_specs(MethodInfo("cat", fixed_rank=True), RuleInfo("mean"), [8, 16], grid, seed=0)
    assert [(s.rank, s.beta, s.params) for s in cat] == [(8, None, ())]  # rank R whatever --rank: merged once
    robust = tuning_specs(MethodInfo("robustmerge", params={"robust_density": 0.2}), RuleInfo("ta"), [16], grid, 0)
    assert robust == [MergeSpec("robustmerge", "ta", 16)]  # robust_density is not in this grid: left at its default
    grid = Grid(merge_params={"robust_density": (0.1, 0.5)})
    robust = tuning_specs(MethodInfo("robustmerge", params={"robust_density": 0.2}), RuleInfo("ta"), [16], grid, 0)
    assert [s.param("robust_density") for s in robust] == [0.1, 0.5]  # a method parameter is tuned like a rule's


def test_default_spec_is_the_cli_default_with_explicit_lambda():
    ta = RuleInfo("ta", True, {"lambda": 1.0})
    ties = RuleInfo("ties", False, {"lambda": 1.0, "density": 0.2})
    assert default_spec(MethodInfo("ctm", takes_beta=True), ta, 16, 0).label == "ctm+ta r=16 β=1 λ=1"
    assert default_spec(MethodInfo("mtc"), ties, 16, 0).cli_args()[-2:] == ["--param", "lambda=1.0"]


def test_next_lambdas_sweeps_the_grid_then_walks_off_an_edge():
    grid = Grid(lambdas=(0.5, 1.0), lower=(0.25, 0.125), upper=(2.0,))
    assert next_lambdas(grid, {}) == [0.5, 1.0]
    assert next_lambdas(grid, {0.5: 0.3, 1.0: 0.2}) == [0.25]
    assert next_lambdas(grid, {0.25: 0.4, 0.5: 0.3, 1.0: 0.2}) == [0.125]
    assert next_lambdas(grid, {0.125: 0.3, 0.25: 0.4, 0.5: 0.3, 1.0: 0.2}) == []  # interior best: done
    assert next_lambdas(grid, {0.5: 0.2, 1.0: 0.3}) == [2.0]
    assert next_lambdas(grid, {0.5: 0.2, 1.0: 0.3, 2.0: 0.4}) == []  # the grid's edge: stop


def test_merge_spec_cli_args_and_names():
    spec = MergeSpec("ctm", "ties", 16, beta=0.25, seed=1).with_param("lambda", 0.5).with_param("density", 0.25)
    assert spec.cli_args() == [
        "--method", "ctm", "--rule", "ties", "--rank", "16", "--seed", "1", "--beta", "0.25",
        "--param", "density=0.25", "--param", "lambda=0.5",
    ]  # fmt: skip
    assert spec.label == "ctm+ties r=16 β=0.25 density=0.25 λ=0.5"
    assert spec.folder_name == "ctm-ties-r16-b0.25-density0.25-lambda0.5-s1"


def test_variants_fix_settings_in_multiples_of_the_rank():
    tsv = RuleInfo("tsv", False, {"lambda": 1.0})
    ctm = MethodInfo("ctm", takes_beta=True)
    variant = parse_variant("ctm+tsv:frame_rank=2r,beta=0.25")
    spec = variant.spec(ctm, tsv, 16, seed=2)
    assert spec.combo == "ctm+tsv[frame_rank=2r,beta=0.25]"
    assert spec.label == "ctm+tsv[frame_rank=2r,beta=0.25] r=16 β=0.25 frame_rank=32 λ=1"
    assert spec.cli_args()[-6:] == ["--beta", "0.25", "--param", "frame_rank=32.0", "--param", "lambda=1.0"]
    assert variant.spec(ctm, tsv, 8, seed=2).param("frame_rank") == 16
    assert "[" not in spec.folder_name and "," not in spec.folder_name
    grid = Grid(betas=(0.0, 1.0), merge_params={"density": (0.1,)})
    tuned = tuning_specs(ctm, tsv, [16], grid, 0, variant)
    assert [(s.beta, s.param("frame_rank")) for s in tuned] == [(0.25, 32)]  # β fixed by the variant: not tuned
    whole = parse_variant("ctm+ties:frame_rank=0")
    ties = RuleInfo("ties", False, {"density": 0.2})
    tuned = tuning_specs(ctm, ties, [8], grid, 0, whole)
    assert [(s.beta, s.param("frame_rank"), s.param("density")) for s in tuned] == [(0.0, 0, 0.1), (1.0, 0, 0.1)]


@pytest.mark.parametrize(
    "text", ["ctm+tsv", "ctm:frame_rank=2", "ctm+tsv:frame_rank", "ctm+tsv:frame_rank=xr", "+ta:a=1"]
)
def test_bad_variants_are_refused(text):
    with pytest.raises(ValueError, match="variant"):
        parse_variant(text)


def test_label_words_must_be_present_and_distinct():
    check_label_words("trec", ["DESC", "ENTY", "ABBR"])
    with pytest.raises(ValueError, match=r"task 'emoji': class '😀' has no label words"):
        check_label_words("emoji", ["happy", "😀"])
    with pytest.raises(ValueError, match=r"classes 'not-offensive' and 'not offensive' both read 'not offensive'"):
        check_label_words("tweets", ["not-offensive", "not offensive"])


def _final(kind, combo, gr_a, gr_b, beta=None):
    test = score_row({"a": 0.6 + 0.4 * gr_a, "b": 0.5 + 0.5 * gr_b}, {"a": 1.0, "b": 1.0}, {"a": 0.6, "b": 0.5})
    return {
        "kind": kind,
        "label": f"{combo} r=16 λ=0.5",
        "combo": combo,
        "rank": 16,
        "beta": beta,
        "params": {"lambda": 0.5},
        "val_gr_estimate": test["mean"]["gr"],
        "val": test,
        "test": test,
        "output_rank": 16,
        "relative_size": 0.25,
    }


def _seed(number, rows):
    return {
        "seed": number,
        "adapter_source": "test",
        "floor": {"test": {"a": 0.6, "b": 0.5}},
        "individual": {"test": {"a": 1.0, "b": 1.0}},
        "final": rows,
        "skipped": [{"label": "knots+ta r=16", "error": "exit 2: unknown method"}],
        "tuning": [],
        "leave_one_task_out": leave_one_task_out({"x": {"a": 0.5, "b": 0.4}, "y": {"a": 0.3, "b": 0.2}}),
    }


def _settings(seeds: list[int], command: str = "bench") -> dict:
    return {
        "command": command,
        "device_name": "cpu",
        "seeds": seeds,
        "ranks": [16],
        "quick": True,
        "catalog": {"source": "test", "methods": [{"name": "ctm"}], "rules": [{"name": "ta"}]},
        "grid": {},
        "split_sizes": {"a": {"test": 2}},
        "seconds": {"setup": 1.0},
        "study_rank": 16,
    }


SEEDS = [
    _seed(0, [_final("tuned", "ctm+ta", 0.5, 0.5), _final("tuned", "peft+svd", 0.25, 0.25)]),
    _seed(1, [_final("tuned", "ctm+ta", 0.7, 0.7), _final("tuned", "peft+svd", 0.25, 0.25)]),
]


def test_aggregate_averages_seeds_and_ranks_rows_by_gr_and_renders():
    summary = aggregate(SEEDS)
    tuned = summary["rows"]["tuned"]
    assert [r["combo"] for r in tuned] == ["ctm+ta", "peft+svd"]
    assert tuned[0]["mean"]["gr"] == pytest.approx(0.6)
    assert tuned[0]["gr_spread"] == pytest.approx(math.sqrt(0.02))
    assert tuned[0]["tasks"]["a"]["gr"] == pytest.approx(0.6)
    assert summary["floor_na"] == pytest.approx(0.55)
    text = render_markdown({"settings": _settings([0, 1]), "summary": summary, "seeds": SEEDS})
    assert "| 1 | ctm+ta | 16 | 16 | 0.250 | λ=0.5; λ=0.5 | " in text
    assert "skipped `knots+ta r=16`: exit 2: unknown method" in text


def test_runs_of_separate_seeds_combine_into_one_summary():
    runs = [
        {"settings": _settings([0], "run A"), "seeds": SEEDS[:1]},
        {"settings": _settings([1], "run B"), "seeds": SEEDS[1:]},
    ]
    combined = combine_runs(runs)
    assert combined["summary"] == aggregate(SEEDS)
    assert combined["settings"]["seeds"] == [0, 1] and combined["settings"]["command"] == "run A + run B"
    assert "seeds [0, 1]" in render_markdown(combined)
    with pytest.raises(ValueError, match="more than one run"):
        combine_runs([runs[0], runs[0]])
    other = {"settings": {**_settings([1]), "ranks": [8]}, "seeds": SEEDS[1:]}
    with pytest.raises(ValueError, match="differ in ranks"):
        combine_runs([runs[0], other])


def test_pending_merges_give_back_the_finished_ones_first_then_the_rest_as_they_finish(tmp_path):
    from concurrent.futures import Future

    from quality_merges import PendingMerges

    specs = [MergeSpec("ctm", "tsv", rank) for rank in (8, 16, 32)]
    futures = [Future() for _ in specs]
    pending = PendingMerges({f: (s, tmp_path / s.folder_name) for f, s in zip(futures, specs, strict=True)})
    futures[1].set_result((None, 2.5, 101))
    assert [(o.spec.rank, o.folder, o.seconds, o.worker) for o in pending.finished()] == [
        (16, tmp_path / specs[1].folder_name, 2.5, 101)
    ]
    assert list(pending.finished()) == [] and len(pending) == 2
    futures[0].set_result(("exit 2: bad", 0.5, 102))
    futures[2].set_result((None, 1.0, 101))
    rest = sorted(pending.rest(), key=lambda o: o.spec.rank)
    assert [(o.spec.rank, o.folder, o.error) for o in rest] == [
        (8, None, "exit 2: bad"),  # a failed merge names no folder
        (32, tmp_path / specs[2].folder_name, None),
    ]
    assert len(pending) == 0


def test_merge_device_for_reads_method_device_pairs_and_refuses_others(tmp_path, capsys):
    from bench_quality import parse_args

    base = ["--tasks", str(tmp_path), "--model", str(tmp_path), "--merge-device", "cuda"]
    args = parse_args([*base, "--merge-device-for", "mtc=cpu", "iso_cts=cuda:1"])
    assert args.merge_device_for == {"mtc": "cpu", "iso_cts": "cuda:1"} and args.merge_device == "cuda"
    assert parse_args(base).merge_device_for == {}
    for bad in ("mtc", "=cpu", "mtc="):
        with pytest.raises(SystemExit):
            parse_args([*base, "--merge-device-for", bad])
        assert "--merge-device-for: expected METHOD=DEVICE" in capsys.readouterr().err


def test_finals_record_each_merge_as_it_finishes_and_end_in_the_order_chosen(tmp_path, monkeypatch):
    import bench_quality
    from quality_merges import MergeOutcome

    specs = [MergeSpec("ctm", "tsv", rank) for rank in (8, 16, 32)]
    chosen = [("default", specs[0]), ("default", specs[1]), ("tuned", specs[0]), ("default", specs[2])]
    finish_order = [
        MergeOutcome(specs[2], tmp_path / "c", None, 3.0, 7),
        MergeOutcome(specs[1], None, "exit 2: bad", 1.0, 7),
        MergeOutcome(specs[0], tmp_path / "a", None, 2.0, None),
    ]
    bench = bench_quality.Bench.__new__(bench_quality.Bench)  # the merging and scoring parts only
    bench.args = SimpleNamespace(merge_device="cpu", merge_device_for={})
    bench.device, bench.started, bench.workdir = "cpu", 0.0, tmp_path
    bench.merge_all = lambda specs, sources, folder: iter(finish_order)
    bench.reader = SimpleNamespace(delta=lambda folder: {"w": folder.name})
    bench.score_delta = lambda delta, scale, split: {"a": 0.9 if delta["w"] == "a" else 0.7}
    monkeypatch.setattr(bench_quality, "adapter_facts", lambda folder: {"rank": 16, "parameters": 4})
    seen = []
    bench.on_progress = lambda record: seen.append([(row["kind"], row["rank"]) for row in record["final"]])
    record = {"seed": 0, "final": [], "skipped": []}
    refs = {"floor": {s: {"a": 0.5} for s in ("val", "test")}, "individual": {s: {"a": 1.0} for s in ("val", "test")}}
    bench.finals(record, chosen, [], refs, {}, {"parameters": 8})
    assert seen == [[("default", 32)], [("default", 32), ("default", 8), ("tuned", 8)]]  # after each scored merge
    assert [(row["kind"], row["rank"], row["merge_seconds"]) for row in record["final"]] == [
        ("default", 8, 2.0),
        ("tuned", 8, 2.0),
        ("default", 32, 3.0),
    ]
    assert record["final"][0]["test"]["mean"]["gr"] == pytest.approx(0.8)
    assert record["final"][0]["relative_size"] == 0.5
    assert record["skipped"] == [{"label": specs[1].label, "error": "exit 2: bad"}]
