"""Every (method, rule) pair against the float64 references of tests/merge_reference.py, the equivalences
between methods, and the methods end to end through the CLI with real PEFT adapters."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import merge_reference as ref
import numpy as np
import pytest
import torch
from helpers import PREFIX, inputs_of, read_adapter, relative, run_ctm, written_deltas

from ctm_cli import core_space as cs
from ctm_cli import small_linalg
from ctm_cli.errors import UsageError
from ctm_cli.fixed_order import matmul, single_threaded
from ctm_cli.methods import METHODS, FactorGroup, MergeSettings, get_method, resolve_settings
from ctm_cli.rules import RULES, get_rule

RANDOM_RULES = {"dare", "dare_ties"}
RULE_PARAMS = {
    "ta": {"lambda": 0.7},
    "mean": {},
    "ties": {"density": 0.3, "lambda": 0.8},
    "dare": {"drop_rate": 0.5},
    "dare_ties": {"drop_rate": 0.5, "density": 0.5, "sign_count": 1},
    "tsv": {"lambda": 0.9},
    "iso_c": {},
    "magnitude_prune": {"density": 0.3},
}
SEED = 3
# CTM_TEST_DEVICE=cuda runs the methods on the GPU (results must match the float64 references there too).
DEVICE = torch.device(os.environ.get("CTM_TEST_DEVICE", "cpu"))


@dataclass(frozen=True)
class Case:
    """Random factors of one module: B_t (scaled) and A_t in float32-representable float64, weights, rank."""

    bs: list[np.ndarray]
    as_: list[np.ndarray]
    weights: list[float]
    rank: int

    @property
    def ranks(self) -> list[int]:
        return [a.shape[0] for a in self.as_]

    def permuted(self, order: list[int]) -> Case:
        return Case(
            [self.bs[i] for i in order], [self.as_[i] for i in order], [self.weights[i] for i in order], self.rank
        )


def make_case(ranks: tuple[int, ...], out: int, inp: int, rank: int, seed: int) -> Case:
    rng = np.random.default_rng(seed)
    scales = rng.uniform(0.3, 3.0, size=len(ranks))
    bs = [
        (rng.standard_normal((out, r)) * s).astype(np.float32).astype(np.float64)
        for r, s in zip(ranks, scales, strict=True)
    ]
    as_ = [rng.standard_normal((r, inp)).astype(np.float32).astype(np.float64) for r in ranks]
    weights = [1.0, 0.5, 2.0, 1.5][: len(ranks)]
    return Case(bs, as_, weights, rank)


CASES = {
    "T3": make_case((3, 5, 2), 24, 20, 6, seed=1),
    "T2": make_case((4, 1), 12, 16, 3, seed=2),
    "T4": make_case((2, 6, 3, 1), 18, 22, 8, seed=3),
}


def group_of(cases: list[Case]) -> FactorGroup:
    return FactorGroup(
        b_cat=torch.tensor(np.stack([np.hstack(c.bs) for c in cases]), dtype=torch.float32, device=DEVICE),
        a_cat=torch.tensor(np.stack([np.vstack(c.as_) for c in cases]), dtype=torch.float32, device=DEVICE),
        ranks=cases[0].ranks,
    )


def merge(method: str, rule: str, case: Case | list[Case], rank: int | None = None, params: dict | None = None):
    """Run a method directly on one module (or a batch of modules); returns (ΔW list, MergeResult)."""
    cases = case if isinstance(case, list) else [case]
    spec, rule_spec = get_method(method), get_rule(rule)
    method_params, rule_params = resolve_settings(spec, rule_spec, {**RULE_PARAMS[rule], **(params or {})})
    settings = MergeSettings(
        rank=spec.output_rank(cases[0].rank if rank is None else rank, cases[0].ranks),
        rule=rule_spec,
        rule_params=rule_params,
        weights=torch.tensor(cases[0].weights, dtype=torch.float64, device=DEVICE),
        beta=0.5 if method == "ctm" else 1.0,
        generator=torch.Generator().manual_seed(SEED),
        method_params=method_params,
    )
    result = spec.function(group_of(cases), settings)
    deltas = [(b.double() @ a.double()).cpu().numpy() for b, a in zip(result.lora_b, result.lora_a, strict=True)]
    return deltas, result


def reference_rule(rule: str, case: Case, shape: tuple[int, ...]):
    """The reference rule as a function of the task matrices, with the product's draws for dare."""
    uniform = ref.draws(shape, SEED) if rule in RANDOM_RULES else None
    return lambda xs: ref.apply_rule(rule, xs, case.weights, RULE_PARAMS[rule], uniform)


def expected(method: str, rule: str, case: Case) -> tuple[np.ndarray, float | None]:
    """The reference ΔW of a pair and, for mtc/core/knots, its truncation loss."""
    tasks, total = len(case.bs), sum(case.ranks)
    out, inp = case.bs[0].shape[0], case.as_[0].shape[1]
    lam = RULE_PARAMS[rule].get("lambda", 1.0)
    if method == "ctm":  # the default frame is the whole core space in its own bases: Core Space merging
        cut = ref.cut_rule(reference_rule(rule, case, (tasks, total, total)), case.rank, rule, case.weights, lam)
        return ref.core(case.bs, case.as_, cut)[0], None
    if method == "mtc":
        cut = ref.cut_rule(reference_rule(rule, case, (tasks, out, inp)), case.rank, rule, case.weights, lam)
        return ref.mtc(case.bs, case.as_, cut)
    if method == "core":
        cut = ref.cut_rule(reference_rule(rule, case, (tasks, total, total)), case.rank, rule, case.weights, lam)
        return ref.core(case.bs, case.as_, cut)
    if method == "knots":
        cut = ref.cut_rule(reference_rule(rule, case, (tasks, total, inp)), case.rank, rule, case.weights, lam)
        return ref.knots(case.bs, case.as_, cut)
    coefficients = ref.linear_coefficients(rule, case.weights, RULE_PARAMS[rule])
    if method == "cat":
        return ref.cat(case.bs, case.as_, coefficients), None
    if method == "lego":
        return ref.lego(case.bs, case.as_, case.rank, coefficients, SEED), None
    if method == "robustmerge":
        return ref.robustmerge(case.bs, case.as_, coefficients), None
    if method == "iso_cts":
        return ref.iso_cts(case.bs, case.as_, case.rank, coefficients), None
    raise KeyError(method)


PAIRS = [
    (method, rule)
    for method in sorted(METHODS)
    for rule in sorted(RULES)
    if RULES[rule].linear or not METHODS[method].needs_linear_rule
]


def test_every_registered_pair_is_covered() -> None:
    assert set(RULE_PARAMS) == set(RULES)
    assert len(PAIRS) == 4 * len(RULES) + 4 * 2


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize(("method", "rule"), PAIRS)
def test_pair_matches_reference(method: str, rule: str, case: str) -> None:
    data = CASES[case]
    [delta], result = merge(method, rule, data)
    want, lost = expected(method, rule, data)
    assert relative(delta, want) < 1e-5
    if lost is not None:
        assert float(result.truncation_loss[0]) == pytest.approx(lost, abs=1e-6)
    written_rank = METHODS[method].output_rank(data.rank, data.ranks)
    assert result.lora_b.shape[-1] == result.lora_a.shape[-2] == written_rank
    assert ((result.kept_energy >= -1e-9) & (result.kept_energy <= 1 + 1e-9)).all()


@pytest.mark.parametrize(("method", "rule"), [p for p in PAIRS if p[1] not in RANDOM_RULES and p[0] != "lego"])
def test_batched_modules_equal_one_by_one(method: str, rule: str) -> None:
    cases = [CASES["T3"], make_case((3, 5, 2), 24, 20, 6, seed=9)]
    batched, _ = merge(method, rule, cases)
    for case, delta in zip(cases, batched, strict=True):
        [single], _ = merge(method, rule, case)
        assert relative(delta, single) < 1e-5


@pytest.mark.parametrize(("method", "rule"), [p for p in PAIRS if p[1] not in RANDOM_RULES])
@pytest.mark.parametrize("order", [[2, 0, 1], [1, 2, 0]])
def test_invariant_to_input_order(method: str, rule: str, order: list[int]) -> None:
    case = CASES["T3"]
    [first], _ = merge(method, rule, case)
    [shuffled], _ = merge(method, rule, case.permuted(order))
    assert relative(shuffled, first) < 1e-5


@pytest.mark.parametrize("rule", ["ta", "mean"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_full_rank_core_equals_cat_equals_exact_merge(rule: str, case: str) -> None:
    data = CASES[case]
    exact = ref.cat(data.bs, data.as_, ref.linear_coefficients(rule, data.weights, RULE_PARAMS[rule]))
    [core], result = merge("core", rule, data, rank=0)
    [concatenated], _ = merge("cat", rule, data)
    assert result.lora_a.shape[-2] == sum(data.ranks)
    assert relative(core, exact) < 1e-5 and relative(concatenated, exact) < 1e-5
    assert float(result.truncation_loss[0]) < 1e-12
    assert float(result.relative_error[0]) < 1e-5


@pytest.mark.parametrize("rule", ["ta", "ties", "tsv", "iso_c"])
@pytest.mark.parametrize("extra", [1, 3])
@pytest.mark.parametrize("case", ["T3", "T4"])
def test_ctm_wider_frame_matches_reference(rule: str, extra: int, case: str) -> None:
    """r < frame_rank r' < R: HOOI frame of rank r', the rule on r' × r' coordinates, one cut to r."""
    data = CASES[case]
    tasks, wide = len(data.bs), data.rank + extra
    [delta], result = merge("ctm", rule, data, params={"frame_rank": wide})
    cut = ref.cut_rule(reference_rule(rule, data, (tasks, wide, wide)), data.rank, rule, data.weights)
    want = ref.ctm(data.bs, data.as_, wide, reference_rule(rule, data, (tasks, wide, wide)), 0.5, cut)
    assert relative(delta, want) < 1e-5
    assert result.lora_b.shape[-1] == result.lora_a.shape[-2] == data.rank


@pytest.mark.parametrize("rule", sorted(RULES))
@pytest.mark.parametrize("case", sorted(CASES))
def test_ctm_whole_frame_is_core_space_merge(rule: str, case: str) -> None:
    """With frame_rank 0 (or any r' ≥ R) the frame is the whole core space in its own bases, with no HOOI: the
    merge is Core Space merging cut to rank r for every rule (β only shapes a frame search), and for a rule that
    commutes with orthonormal changes of basis also merge-then-compress."""
    data = CASES[case]
    [whole], result = merge("ctm", rule, data, params={"frame_rank": 0})
    [beyond], _ = merge("ctm", rule, data, params={"frame_rank": 10 * sum(data.ranks)})
    [core], _ = merge("core", rule, data)
    assert relative(whole, core) < 1e-5 and np.array_equal(whole, beyond)
    assert (result.sweeps == 0).all()


@pytest.mark.parametrize("params", [{}, {"frame_rank": 6}], ids=["R", "wider"])
@pytest.mark.parametrize("rule", sorted(RULES))
@pytest.mark.parametrize("case", ["T3", "T4", "equal"])
def test_ctm_in_the_accelerators_bases_gives_the_same_merge(rule: str, case: str, params: dict, monkeypatch) -> None:
    """The Newton–Schulz core-space frames and polar factors an accelerator takes (forced here on the test
    device): a rule that does not see the basis gives the same merge and report as in the singular bases, from
    frames that all settle (mixed ranks pad the tasks' factors with zero columns); a rule acting entry by entry
    keeps the singular bases, bit for bit."""
    data = LARGER["T8"] if case == "equal" else CASES[case]
    [want], expected_result = merge("ctm", rule, data, params=params)
    settled: list[bool] = []
    square_roots = small_linalg.square_roots

    def watched(gram: torch.Tensor, limit: float) -> tuple[torch.Tensor, ...]:
        roots = square_roots(gram, limit)
        settled.extend(roots[2].flatten().tolist())
        return roots

    monkeypatch.setattr(small_linalg, "iterates_on", lambda device: True)
    monkeypatch.setattr(small_linalg, "square_roots", watched)
    [got], result = merge("ctm", rule, data, params=params)
    if not RULES[rule].basis_free:
        assert np.array_equal(got, want) and not settled
        return
    assert settled and all(settled)  # every frame came from the iteration, the tasks' zero-padded ones too
    assert relative(got, want) < 1e-5
    assert torch.allclose(result.kept_energy, expected_result.kept_energy, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("rule", ["tsv", "ties", "ta"])
@pytest.mark.parametrize("frame", [0, 1])
def test_ctm_isotropic_flattens_the_kept_spectrum(rule: str, frame: int) -> None:
    """isotropic=1: the rule's result cut to r, its r singular values then set to their mean."""
    data = CASES["T4"]
    tasks, total = len(data.bs), sum(data.ranks)
    wide = total if frame == 0 else data.rank
    [delta], _ = merge("ctm", rule, data, params={"frame_rank": frame, "isotropic": 1})
    rule_ref = reference_rule(rule, data, (tasks, wide, wide))
    cut = ref.cut_rule(rule_ref, data.rank)
    flat_cut = lambda xs: (ref.flattened(cut(xs)[0]), None)  # noqa: E731
    if frame == 0:
        want = ref.core(data.bs, data.as_, flat_cut)[0]
    else:
        want = ref.ctm(data.bs, data.as_, wide, rule_ref, 0.5, flat_cut)
    assert relative(delta, want) < 1e-5


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("rule", sorted(RULES))
def test_papers_ctm_matches_reference(rule: str, case: str) -> None:
    """frame_rank = r: the paper's CtM, a HOOI frame of the output rank and the rule on its r × r coordinates."""
    data = CASES[case]
    tasks = len(data.bs)
    [delta], result = merge("ctm", rule, data, params={"frame_rank": data.rank})
    want = ref.ctm(data.bs, data.as_, data.rank, reference_rule(rule, data, (tasks, data.rank, data.rank)), 0.5)
    assert relative(delta, want) < 1e-5
    assert (result.sweeps >= 1).all()


@pytest.mark.parametrize("params", [{}, {"frame_rank": 6}, {"frame_rank": 3}], ids=["R", "wider", "paper"])
@pytest.mark.parametrize("rule", ["tsv", "ta", "iso_c"])
def test_ctm_kept_energy_is_inside_the_output_spaces(rule: str, params: dict) -> None:
    """ctm reads each task's kept energy in its frame's coordinates; it equals the energy of ΔW_t inside the
    column and row spaces of the written factors, computed from them in full."""
    data = CASES["T3"]
    _, result = merge("ctm", rule, data, rank=3, params=params)
    group = group_of([data])
    full = cs.energy_in_output_spaces(result.lora_b, result.lora_a, group.b_cat, group.a_cat, group.ranks)
    assert torch.allclose(result.kept_energy, full, atol=1e-5)


@pytest.mark.parametrize("frame", [1, 2])
def test_ctm_frame_at_most_rank_is_the_papers_ctm(frame: int) -> None:
    data = CASES["T4"]
    [paper], _ = merge("ctm", "ties", data, params={"frame_rank": data.rank})
    [same], _ = merge("ctm", "ties", data, params={"frame_rank": frame})
    assert np.array_equal(paper, same)


@pytest.mark.parametrize("case", sorted(CASES))
def test_ctm_at_total_rank_is_exact(case: str) -> None:
    data = CASES[case]
    [delta], result = merge("ctm", "ta", data, rank=sum(data.ranks))
    exact = ref.cat(data.bs, data.as_, ref.linear_coefficients("ta", data.weights, RULE_PARAMS["ta"]))
    assert relative(delta, exact) < 1e-5
    assert float(result.relative_error[0]) < 1e-5


@pytest.mark.parametrize("method", ["ctm", "mtc", "core", "knots"])
@pytest.mark.parametrize("rule", sorted(RANDOM_RULES))
def test_seeded_dare_is_reproducible_bit_for_bit(method: str, rule: str) -> None:
    (first, *_), _ = merge(method, rule, CASES["T3"])
    (again, *_), _ = merge(method, rule, CASES["T3"])
    assert np.array_equal(first, again)


def test_linear_methods_report_the_error_against_the_exact_merge() -> None:
    data = CASES["T3"]
    exact = ref.cat(data.bs, data.as_, ref.linear_coefficients("ta", data.weights, RULE_PARAMS["ta"]))
    for method in METHODS:
        [delta], result = merge(method, "ta", data)
        assert float(result.relative_error[0]) == pytest.approx(relative(delta, exact), abs=1e-6), method


def test_nonlinear_rules_report_an_error_only_for_mtc() -> None:
    data = CASES["T3"]
    for method in ("ctm", "core", "knots"):
        assert merge(method, "ties", data)[1].relative_error is None
    [delta], result = merge("mtc", "ties", data)
    full = reference_rule("ties", data, ())(ref.updates(data.bs, data.as_))
    assert float(result.relative_error[0]) == pytest.approx(relative(delta, full), abs=1e-6)


def test_lego_output_is_scaled_by_root_of_units_per_cluster() -> None:
    data = CASES["T2"]
    [with_one_cluster], _ = merge("lego", "ta", data, rank=1)
    units = np.array(
        [
            np.concatenate([0.7 * c * b[:, i], a[i]])
            for c, b, a in zip(data.weights, data.bs, data.as_, strict=True)
            for i in range(a.shape[0])
        ]
    )
    centroid = units.mean(axis=0)
    centroid *= np.abs(units).max(axis=1).mean() / np.abs(centroid).max()
    out = data.bs[0].shape[0]
    assert relative(with_one_cluster, np.sqrt(len(units)) * np.outer(centroid[:out], centroid[out:])) < 1e-5


# ------------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("method", "rule", "params", "message"),
    [
        ("cat", "ties", {}, "needs a linear rule (mean, ta); ties is not"),
        ("lego", "dare", {}, "needs a linear rule"),
        (
            "ctm",
            "ties",
            {"drop_rate": 0.5},
            "they take: density, frame_rank, hooi_tolerance, isotropic, lambda, max_sweeps, sign_count",
        ),
        ("robustmerge", "ta", {"robust_density": 0.0}, "robust_density=0 is out of range; allowed: (0, 1]"),
        ("iso_cts", "ta", {"iso_common": 2.0}, "allowed: [0, 1]"),
    ],
)
def test_nonsense_settings_are_refused(method: str, rule: str, params: dict, message: str) -> None:
    with pytest.raises(UsageError) as error:
        resolve_settings(get_method(method), get_rule(rule), params)
    assert message in str(error.value)


# ------------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def two(make_adapter) -> list[Path]:
    """Two real PEFT adapters of different ranks and scales (r=8, α=16) and (r=4, α=8)."""
    return [make_adapter(r=8, alpha=16, seed=31), make_adapter(r=4, alpha=8, seed=32)]


def cli_merge(folders: list[Path], out: Path, *args: str) -> dict:
    result = run_ctm("merge", *folders, "-o", out, "--quiet", *args)
    assert result.exit_code == 0, result.stderr
    return json.loads((out / "merge_report.json").read_text())


def test_mtc_ta_equals_peft_svd_merge(two, tmp_path, load_base) -> None:
    """PEFT's add_weighted_adapter(combination_type="svd") sums w_t · get_delta_weight(t) (the LoRA scale
    already applied), takes torch.linalg.svd of the full out × in matrix in float32 and keeps rank r
    (B = U_r S_r, A = V_rᵀ, scale 1). Its svd_clamp is None by default, so nothing is clipped and the two
    agree up to float32 rounding of two different SVD routes (full SVD vs ours in core space)."""
    from peft import PeftModel

    weights, rank = [1.0, 0.5], 6
    model = PeftModel.from_pretrained(load_base(), two[0], adapter_name="a")
    model.load_adapter(two[1], adapter_name="b")
    model.add_weighted_adapter(["a", "b"], weights, "merged", combination_type="svd", svd_rank=rank)
    cli_merge(two, tmp_path / "out", "--method", "mtc", "--rule", "ta", "--weights", "1,0.5", "--rank", str(rank))
    written = written_deltas(tmp_path / "out")
    worst = 0.0
    for name, delta in written.items():
        layer = model.get_submodule(name)
        peft_delta = (layer.lora_B["merged"].weight @ layer.lora_A["merged"].weight * layer.scaling["merged"]).detach()
        worst = max(worst, relative(delta, peft_delta.double().numpy()))
    assert worst < 1e-5


@pytest.mark.parametrize(
    ("args", "rank"),
    [
        (["--method", "ctm", "--rule", "ties", "--param", "density=0.25", "--lambda", "0.75", "--beta", "0.25"], 6),
        (["--method", "mtc", "--rule", "ties"], 6),
        (["--method", "core", "--rank", "0"], 12),
        (["--method", "knots", "--rule", "ties"], 6),
        (["--method", "lego"], 6),
    ],
    ids=["ctm-ties", "mtc-ties", "core-full", "knots-ties", "lego"],
)
def test_cli_output_loads_in_peft(two, tmp_path, load_base, args: list[str], rank: int) -> None:
    from peft import PeftModel

    out = tmp_path / "out"
    report = cli_merge(two, out, "--rank", "6", *args)
    config, modules = read_adapter(out)
    assert config["r"] == rank and report["settings"]["written_rank"] == rank
    assert all(a.shape[0] == rank for a, _ in modules.values())
    base = load_base()
    merged = PeftModel.from_pretrained(load_base(), out).merge_and_unload()
    written = written_deltas(out)
    for name, delta in written.items():
        key = name.removeprefix(PREFIX) + ".weight"
        change = merged.state_dict()[key].double().numpy() - base.state_dict()[key].double().numpy()
        assert relative(change, delta) < 1e-5, name
    losses = [m["truncation_loss"] for m in report["modules"]]
    method = report["settings"]["method"]
    assert all((loss is not None) == (method in {"ctm", "mtc", "core", "knots"}) for loss in losses)
    if method == "core":
        exact = {
            name: ref.cat(scaled_bs(Bs, scales), As, [1.0, 1.0]) for name, (As, Bs, scales) in inputs_of(two).items()
        }
        assert max(relative(written[n], exact[n]) for n in exact) < 1e-5
    if "--lambda" in args:
        expected_params = {"density": 0.25, "lambda": 0.75, "sign_count": 0.0, "trim_count": 0.0}
        assert report["settings"]["rule_params"] == expected_params
    markdown = (out / "merge_report.md").read_text()
    assert ("energy lost by the final truncation" in markdown) == (method in {"ctm", "mtc", "core", "knots"})


def scaled_bs(bs: list[np.ndarray], scales: list[float]) -> list[np.ndarray]:
    """s_t B_t."""
    return [s * b for s, b in zip(scales, bs, strict=True)]


def test_cli_mtc_ties_matches_reference(two, tmp_path) -> None:
    report = cli_merge(two, tmp_path / "out", "--method", "mtc", "--rule", "ties", "--rank", "14")
    written = written_deltas(tmp_path / "out")
    for name, (As, Bs, scales) in inputs_of(two).items():
        want, lost = ref.mtc(scaled_bs(Bs, scales), As, ref.cut_rule(lambda xs: ref.ties(xs, [1.0, 1.0]), 14))
        assert relative(written[name], want) < 1e-5, name
        stats = next(m for m in report["modules"] if m["name"] == name)
        assert stats["truncation_loss"] == pytest.approx(lost, abs=1e-6)
        assert stats["relative_error"] == pytest.approx(np.sqrt(lost), abs=1e-6)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--method", "ctm", "--rank", "0"], "for method ctm, got 0"),
        (["--method", "core", "--rank", "13"], "choose 1..12 (or 0 for the full rank R)"),
        (["--method", "mtc", "--rule", "ties", "--rank", "17"], "choose 1..16"),
        (["--method", "mtc", "--rule", "ta", "--rank", "13"], "choose 1..12"),
        (["--method", "cat", "--rule", "ties"], "needs a linear rule"),
        (["--rule", "ties", "--param", "density=2"], "density=2 is out of range; allowed: (0, 1]"),
        (["--rule", "dare", "--param", "drop_rate=1"], "allowed: [0, 1)"),
    ],
)
def test_cli_refuses_nonsense(two, tmp_path, args: list[str], message: str) -> None:
    result = run_ctm("merge", *two, "-o", tmp_path / "out", *args)
    assert result.exit_code == 2, result.stderr
    assert message in " ".join(result.stderr.split())
    assert not (tmp_path / "out").exists()


def test_methods_command_lists_the_registries() -> None:
    result = run_ctm("methods", "--json")
    assert result.exit_code == 0, result.stderr
    listing = json.loads(result.stdout)
    assert [m["name"] for m in listing["methods"]] == sorted(METHODS)
    assert [r["name"] for r in listing["rules"]] == sorted(RULES)
    ties = next(r for r in listing["rules"] if r["name"] == "ties")
    assert ties["params"]["density"] == {"default": 0.2, "range": "(0, 1]", "doc": RULES["ties"].params["density"].doc}
    assert next(m for m in listing["methods"] if m["name"] == "cat")["needs_linear_rule"] is True
    assert {m["name"]: m["default_rule"] for m in listing["methods"]}["ctm"] == "tsv"
    table = run_ctm("methods")
    assert table.exit_code == 0
    for name in [*METHODS, *RULES]:
        assert name in table.stdout


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(30, 16, 5), (26, 16, 5), (33, 17, 7)])
def test_a_cpu_product_does_not_depend_on_where_its_matrix_lies_in_a_batch(
    shape: tuple[int, int, int], dtype: torch.dtype
) -> None:
    """Every matrix of a batch of products equals its product alone, at every place in the batch (MKL rounds by
    the output's alignment unless its strict reproducibility mode is on, as ctm_cli sets it on import)."""
    rows, inner, columns = shape
    generator = torch.Generator().manual_seed(sum(shape))
    left = torch.randn(9, rows, inner, dtype=dtype, generator=generator)
    right = torch.randn(9, inner, columns, dtype=dtype, generator=generator)
    with single_threaded(torch.device("cpu")):
        alone = [matmul(left[index].clone(), right[index].clone()) for index in range(9)]
        batched = matmul(left, right)
    for index in range(9):
        assert torch.equal(batched[index], alone[index]), f"matrix {index} of the batch"


def _with_weights(case: Case, weights: list[float]) -> Case:
    return Case(case.bs, case.as_, weights, case.rank)


LARGER = {
    "T8": _with_weights(make_case((4,) * 8, 48, 40, 6, seed=11), [1.0, 0.5, 2.0, 1.5, 0.8, 1.2, 0.6, 1.1]),
    "mixed": make_case((6, 2, 5, 3), 30, 26, 5, seed=12),
}


@pytest.mark.parametrize("case", sorted(LARGER))
@pytest.mark.parametrize("rule", ["tsv", "ta", "iso_c", "ties"])
def test_default_ctm_on_larger_core_spaces_matches_the_reference(rule: str, case: str) -> None:
    """ctm's default (the whole core space, no HOOI) on core spaces of R = 32 and mixed ranks (TSV keeping fewer
    triplets than some tasks have), two modules in one batch: each module within 1e-5 of the float64 reference,
    and on the CPU bit for bit what it gets alone (the factored rules run on one thread per matrix)."""
    data = LARGER[case]
    other = make_case(tuple(data.ranks), data.bs[0].shape[0], data.as_[0].shape[1], data.rank, seed=21)
    other = _with_weights(other, data.weights)
    deltas, result = merge("ctm", rule, [data, other])
    for delta, module in zip(deltas, (data, other), strict=True):
        assert relative(delta, expected("ctm", rule, module)[0]) < 1e-5
    assert (result.sweeps == 0).all()
    if DEVICE.type == "cpu":
        [alone], _ = merge("ctm", rule, other)
        assert np.array_equal(alone, deltas[1])
