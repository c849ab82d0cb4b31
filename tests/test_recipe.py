"""Recipes: every example in configs/ parses, errors name the file, line and key, dump → parse round-trips,
command-line flags override a recipe only where given, and a merge's own recipe.yaml repeats it exactly."""

from __future__ import annotations

import json
import math
import string
from pathlib import Path

import pytest
import torch
from helpers import listing, run_ctm
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from ctm_cli.errors import UsageError
from ctm_cli.recipe import AdapterEntry, Recipe, build_recipe, dump_recipe, load_recipe, parse_recipe

CONFIGS = Path(__file__).parents[1] / "configs"
EXAMPLES = ("ta", "ties", "dare", "tsv", "core", "hub")
GOOD = """\
adapters:
  - source: a/
    weight: 2
  - source: org/b
    revision: 2024
method: ctm
rule: ties
rank: 8
params: {density: 0.25, lambda: .75}
beta: 0.25
seed: 3
dtype: null
device: cpu
output: merged/
"""


def test_every_example_parses():
    found = sorted(path.stem for path in CONFIGS.glob("*.yaml"))
    assert set(EXAMPLES) <= set(found)
    for path in CONFIGS.glob("*.yaml"):
        assert len(load_recipe(path).adapters) >= 2, path
    for name in EXAMPLES:
        assert (CONFIGS / f"{name}.yaml").read_text().startswith("#"), f"{name}.yaml: explain it in a comment first"


def test_parse_full_recipe():
    recipe = parse_recipe(GOOD, "good.yaml")
    assert recipe == Recipe(
        adapters=(AdapterEntry("a/", 2.0), AdapterEntry("org/b", 1.0, "2024")),
        method="ctm",
        rule="ties",
        rank=8,
        params={"density": 0.25, "lambda": 0.75},
        beta=0.25,
        seed=3,
        dtype=None,
        device="cpu",
        output="merged/",
    )


def test_defaults():
    recipe = parse_recipe("adapters:\n  - source: a\n  - source: b\n", "min.yaml")
    assert recipe == Recipe(adapters=(AdapterEntry("a"), AdapterEntry("b")))
    assert (recipe.method, recipe.rule, recipe.rank, recipe.beta, recipe.seed, recipe.device) == (
        "ctm",
        None,  # the method's default rule: tsv for ctm (methods.Method.default_rule)
        16,
        1.0,
        0,
        "auto",
    )


def replace_line(text: str, old: str, new: str) -> str:
    assert old in text
    return text.replace(old, new, 1)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (replace_line(GOOD, "rank: 8", "rnak: 8"), "bad.yaml:8: rnak: unknown key (did you mean 'rank'?"),
        (replace_line(GOOD, "rank: 8", "rank: eight"), "bad.yaml:8: rank: expected an integer, got 'eight'"),
        (replace_line(GOOD, "rank: 8", "rank: 8.5"), "bad.yaml:8: rank: expected an integer, got '8.5'"),
        (replace_line(GOOD, "rank: 8", "rank: true"), "bad.yaml:8: rank: expected an integer, got 'true'"),
        (
            replace_line(GOOD, "rank: 8", "rank: -1"),
            "bad.yaml:8: rank: must be 0 (full rank: core, knots) or positive",
        ),
        (replace_line(GOOD, "beta: 0.25", "beta: 1.5"), "bad.yaml:10: beta: must be in [0, 1], got 1.5"),
        (replace_line(GOOD, "weight: 2", "weight: heavy"), "bad.yaml:3: adapters[0].weight: expected a finite number"),
        (replace_line(GOOD, "weight: 2", "weight: .nan"), "bad.yaml:3: adapters[0].weight: expected a finite number"),
        (replace_line(GOOD, "weight: 2", "wieght: 2"), "bad.yaml:3: adapters[0].wieght: unknown key (did you mean"),
        (replace_line(GOOD, "  - source: org/b\n", "  - weight: 1\n"), "bad.yaml:4: adapters[1]: missing key 'source'"),
        (
            replace_line(GOOD, "  - source: a/\n", "  - source: [a, b]\n"),
            "bad.yaml:2: adapters[0].source: expected text",
        ),
        (
            replace_line(GOOD, "  - source: a/\n    weight: 2\n", "  - a/\n"),
            "bad.yaml:2: adapters[0]: expected a mapping",
        ),
        (replace_line(GOOD, "lambda: .75}", "lambda: high}"), "bad.yaml:9: params.lambda: expected a finite number"),
        (replace_line(GOOD, "params: {", "params: [").replace(".75}", ".75]"), "bad.yaml:9: params: expected a"),
        (replace_line(GOOD, "seed: 3", "seed: 3\nrank: 4"), "bad.yaml:12: rank: given twice"),
        (replace_line(GOOD, "device: cpu", "device: null"), "bad.yaml:13: device: expected text, got null"),
        (replace_line(GOOD, "dtype: null", "dtype: [float32]"), "bad.yaml:12: dtype: expected text, got a list"),
        ("adapters:\n  - source: only-one\nrank: 4\n", "bad.yaml:2: adapters: a merge needs at least two adapters"),
        ("adapters: a, b\n", "bad.yaml:1: adapters: expected a list of adapters, got 'a, b'"),
        ("rank: 4\nrule: ta\n", "bad.yaml:1: adapters: missing"),
        ("- source: a\n- source: b\n", "bad.yaml:1: : expected a mapping, got a list"),
        ("adapters:\n  - source: a\n   - source: b\n", "bad.yaml:3: not valid YAML"),
        ("# only a comment\n", "bad.yaml: empty recipe"),
    ],
)
def test_errors_name_line_and_key(text, expected):
    with pytest.raises(UsageError) as caught:
        parse_recipe(text, "bad.yaml")
    assert str(caught.value).startswith(expected), str(caught.value)


def test_cli_reports_recipe_error_with_exit_2(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(replace_line(GOOD, "rank: 8", "rank: eight"))
    result = run_ctm("merge", "--config", recipe, "-o", tmp_path / "out")
    assert result.exit_code == 2
    assert result.stderr.strip() == f"ctm: error: {recipe}:8: rank: expected an integer, got 'eight'"
    missing = run_ctm("merge", "--config", tmp_path / "none.yaml", "-o", tmp_path / "out")
    assert missing.exit_code == 2 and "cannot read the recipe" in missing.stderr
    assert listing(tmp_path) == ["bad.yaml"]


_names = st.text(string.ascii_letters + string.digits + "_./-@: é", min_size=1, max_size=30)
_finite = st.floats(allow_nan=False, allow_infinity=False)
recipes = st.builds(
    Recipe,
    adapters=st.lists(
        st.builds(AdapterEntry, source=_names, weight=_finite, revision=st.none() | _names), min_size=2, max_size=4
    ).map(tuple),
    method=_names,
    rule=_names,
    rank=st.integers(1, 4096) | st.just("auto"),
    keep=st.none() | st.floats(0.01, 1.0),
    rank_per_module=st.booleans(),
    params=st.dictionaries(_names, _finite, max_size=3),
    beta=st.floats(0.0, 1.0),
    seed=st.integers(-(2**63), 2**63 - 1),
    dtype=st.none() | st.sampled_from(["float32", "float16", "bfloat16"]),
    device=_names,
    output=st.none() | _names,
)


@settings(max_examples=150, deadline=None)
@given(recipes)
def test_dump_parse_round_trip(recipe):
    back = parse_recipe(dump_recipe(recipe), "dumped.yaml")
    assert back == recipe
    assert all(
        math.copysign(1, a.weight) == math.copysign(1, b.weight)
        for a, b in zip(back.adapters, recipe.adapters, strict=True)
    )


def test_build_recipe_overrides(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(GOOD)
    assert build_recipe(path, {}) == load_recipe(path)
    merged = build_recipe(path, {"rank": 16, "params": {"lambda": 2.0}, "weights": [0.5, 0.25]})
    assert merged.rank == 16
    assert merged.params == {"density": 0.25, "lambda": 2.0}
    assert [a.weight for a in merged.adapters] == [0.5, 0.25]
    assert merged.adapters[1].revision == "2024"
    replaced = build_recipe(path, {"sources": ["x", "y", "z"]})
    assert replaced.adapters == (AdapterEntry("x"), AdapterEntry("y"), AdapterEntry("z"))
    with pytest.raises(UsageError, match="--weights has 3 values but there are 2 adapters"):
        build_recipe(path, {"weights": [1.0, 2.0, 3.0]})
    with pytest.raises(UsageError, match="no adapters"):
        build_recipe(None, {"rank": 4})


@pytest.fixture
def pair(make_adapter) -> list[Path]:
    """Two adapters on q_proj and v_proj only: two module groups keep the CtM merges here quick."""
    targets = ("q_proj", "v_proj")
    return [make_adapter(r=8, alpha=16, seed=51, targets=targets), make_adapter(r=4, alpha=8, seed=52, targets=targets)]


def write_recipe(folder: Path, adapters: list[Path], **fields) -> Path:
    lines = ["adapters:"] + [f"  - source: '{a}'" for a in adapters]
    lines += [f"{key}: {json.dumps(value)}" for key, value in fields.items()]
    path = folder / "recipe-in.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def plan_settings(*args) -> dict:
    result = run_ctm("merge", *args, "--dry-run", "--json")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)["settings"]


def test_only_given_flags_override(pair, tmp_path):
    recipe = write_recipe(
        tmp_path, pair, rule="ta", rank=4, beta=0.5, seed=7, params={"lambda": 0.5}, output=str(tmp_path / "o")
    )
    from_file = plan_settings("--config", recipe)
    assert (from_file["requested_rank"], from_file["beta"], from_file["seed"], from_file["rule_params"]) == (
        4,
        0.5,
        7,
        {"lambda": 0.5},
    )
    # Typing a default value still overrides the file: --beta 1.0 and --seed 0 are the defaults of `ctm merge`.
    flags = plan_settings(
        "--config", recipe, "--rank", "10", "--beta", "1.0", "--seed", "0", "--lambda", "0.7", "-w", "1,3"
    )
    assert (flags["requested_rank"], flags["beta"], flags["seed"]) == (10, 1.0, 0)
    assert flags["rule_params"] == {"lambda": 0.7}
    assert flags["weights"] == [1.0, 3.0]


def test_recipe_yaml_repeats_the_merge(pair, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    args = ["--rank", "6", "--weights", "1,-0.5", "--lambda", "0.8", "--beta", "0.3", "--seed", "5"]
    result = run_ctm("merge", *pair, *args, "-o", first, "--quiet")
    assert result.exit_code == 0, result.stderr
    written = first / "recipe.yaml"
    assert load_recipe(written) == Recipe(
        adapters=(AdapterEntry(str(pair[0]), 1.0), AdapterEntry(str(pair[1]), -0.5)),
        rule="tsv",  # ctm's default rule, written out resolved
        rank=6,
        params={"lambda": 0.8, "hooi_tolerance": 1e-10, "max_sweeps": 500, "frame_rank": 0, "isotropic": 0},
        beta=0.3,
        seed=5,
        dtype="float32",
        device="auto",
        output=str(first),
    )
    again = run_ctm("merge", "--config", written, "-o", second, "--quiet")
    assert again.exit_code == 0, again.stderr
    a = load_file(str(first / "adapter_model.safetensors"))
    b = load_file(str(second / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (second / "recipe.yaml").read_text() == written.read_text().replace(str(first), str(second))
    report = json.loads((first / "merge_report.json").read_text())
    assert report["recipe"]["adapters"] == [
        {"source": str(pair[0]), "weight": 1.0},
        {"source": str(pair[1]), "weight": -0.5},
    ]
