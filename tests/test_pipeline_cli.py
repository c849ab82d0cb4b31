"""`ctm` in shell pipelines and CI: JSON-only stdout, --quiet, --dry-run plans, stable exit codes, the model
card, --push-to-hub (with a fake HfApi), --help examples and shell completion."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import ClassVar

import pytest
import yaml
from helpers import listing, run_ctm
from typer.testing import CliRunner

import ctm_cli.engine
import ctm_cli.pipeline
from ctm_cli.adapter import Adapter
from ctm_cli.cli import app
from ctm_cli.errors import EXIT_CODES
from ctm_cli.methods import get_method
from ctm_cli.model_card import loading_class, render_model_card
from ctm_cli.plan import bytes_per_module, method_core_numbers, stored_itemsize, wave_bytes
from ctm_cli.rules import get_rule
from ctm_cli.validate import ModuleSpec

FLOAT32 = 4
FAST = ["--method", "cat"]  # exact concatenation: no frame search, for tests about the command line itself


@pytest.fixture(scope="module")
def pair(make_adapter) -> list[Path]:
    return [make_adapter(r=8, alpha=16, seed=61), make_adapter(r=4, alpha=8, seed=62)]


@pytest.fixture(scope="module")
def merged(pair, tmp_path_factory) -> tuple[Path, dict, str]:
    """One default merge at rank 4 with --json: (output folder, report from stdout, stderr)."""
    out = tmp_path_factory.mktemp("merged") / "out"
    result = run_ctm("merge", *pair, "--rank", "4", "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    return out, json.loads(result.stdout), result.stderr


@pytest.fixture
def out_parent(tmp_path) -> Path:
    parent = tmp_path / "outputs"
    parent.mkdir()
    return parent


def test_json_stdout_is_only_the_report(merged):
    out, report, stderr = merged
    assert report == json.loads((out / "merge_report.json").read_text())
    assert report["summary"]["modules"] == 14
    assert "{" not in stderr


def test_inspect_json_stdout_only(pair):
    result = run_ctm("inspect", pair[0], "--json")
    assert result.exit_code == 0
    assert json.loads(result.stdout)["r"] == 8
    assert result.stderr == ""


def test_quiet_prints_nothing(pair, out_parent):
    result = run_ctm("merge", *pair, *FAST, "-o", out_parent / "out", "--quiet")
    assert result.exit_code == 0, result.stderr
    assert (result.stdout, result.stderr) == ("", "")
    assert (out_parent / "out" / "adapter_model.safetensors").is_file()


def test_default_output_goes_to_stderr(pair, out_parent):
    result = run_ctm("merge", *pair, *FAST, "-o", out_parent / "out")
    assert result.exit_code == 0, result.stderr
    assert result.stdout == ""
    assert "merged 2 adapters" in result.stderr


def test_dry_run_plan_json(pair, merged, out_parent):
    out = out_parent / "out"
    result = run_ctm("merge", *pair, "--rank", "4", "-o", out, "--dry-run", "--json")
    assert result.exit_code == 0, result.stderr
    assert listing(out_parent) == []
    plan = json.loads(result.stdout)
    assert plan["dry_run"] is True
    assert plan["settings"]["requested_rank"] == 4 and plan["settings"]["method"] == "ctm"
    assert [i["r"] for i in plan["inputs"]] == [8, 4]
    shapes = {m["name"].removeprefix("base_model.model.model.layers."): m["shape"] for m in plan["modules"]}
    assert shapes["0.self_attn.q_proj"] == [32, 32] and shapes["1.mlp.down_proj"] == [32, 64]
    assert shapes["0.self_attn.k_proj"] == [16, 32] and shapes["0.mlp.up_proj"] == [64, 32]
    assert all(m["ranks"] == [8, 4] and m["written_rank"] == 4 for m in plan["modules"])
    # Groups: one per distinct shape, every module in exactly one; device bytes from the engine's formula.
    assert sum(g["modules"] for g in plan["groups"]) == 14
    assert sorted(tuple(g["shape"]) for g in plan["groups"]) == sorted({tuple(s) for s in shapes.values()})
    ctm = get_method("ctm")
    stored = stored_itemsize([Adapter(path) for path in pair])
    method_params = ctm.resolve(plan["settings"]["method_params"])
    numbers = method_core_numbers(ctm, get_rule(plan["settings"]["rule"]), 4, method_params, stored)
    groups = []
    for group in plan["groups"]:
        spec = ModuleSpec("m", *group["shape"], ranks=tuple(group["ranks"]), embedding=False)
        assert group["device_bytes"] == group["modules"] * bytes_per_module(spec, numbers)
        groups.append([spec] * group["modules"])
    # Waves: groups merged together within the budget; the estimate is the largest wave's: what every group keeps,
    # plus the working memory of the largest group (merged one after another).
    assert plan["waves"] == 1 and {g["wave"] for g in plan["groups"]} == {0}
    estimate = plan["estimated_device_bytes"]
    assert estimate == wave_bytes(groups, numbers) < sum(g["device_bytes"] for g in plan["groups"])
    # Output size: exact tensor bytes plus the header, against the file a real merge wrote.
    written = (merged[0] / "adapter_model.safetensors").stat().st_size
    tensor_bytes = sum((o + i) * 4 * FLOAT32 for o, i in shapes.values())
    assert tensor_bytes < written <= plan["estimated_output_bytes"] <= written + 2048
    assert plan["recipe"]["adapters"] == [{"source": str(p), "weight": 1.0} for p in pair]


def test_requested_and_written_ranks_are_named_apart(pair, out_parent):
    """`--method cat --rank 4` writes rank R = 12 (cat sets its own rank): the plan, the report, the model card and
    the recipe each say which rank they mean."""
    args = ["merge", *pair, "--method", "cat", "--rank", "4", "-o", out_parent / "out", "--json"]
    plan = json.loads(run_ctm(*args, "--dry-run").stdout)
    result = run_ctm(*args)
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    for settings in (plan["settings"], report["settings"]):
        assert (settings["requested_rank"], settings["written_rank"]) == (4, 12) and "rank" not in settings
    assert report["summary"]["written_rank"] == 12
    assert {m["written_rank"] for m in plan["modules"]} == {m["written_rank"] for m in report["modules"]} == {12}
    assert plan["recipe"]["rank"] == report["recipe"]["rank"] == 4  # the recipe holds what was asked, to repeat it
    assert yaml.safe_load((out_parent / "out" / "recipe.yaml").read_text())["rank"] == 4
    card = (out_parent / "out" / "README.md").read_text()
    assert "A rank-12 PEFT LoRA adapter" in card and "| rank | 12 |" in card and "| requested rank | 4 |" in card
    assert "rank **12** (requested 4)" in (out_parent / "out" / "merge_report.md").read_text()


@pytest.mark.parametrize("method", ["core", "cat"])
def test_beta_is_refused_for_methods_that_do_not_use_it(pair, out_parent, method):
    result = run_ctm("merge", *pair, "--method", method, "--beta", "0.5", "-o", out_parent / "out")
    assert result.exit_code == 2
    assert f"--beta 0.5 has no effect with method {method} (β acts on: ctm)" in result.stderr
    assert listing(out_parent) == []
    args = ["merge", *pair, "--method", method, "--beta", "1", "--rank", "4", "-o", out_parent / "out", "--dry-run"]
    default = run_ctm(*args)
    assert default.exit_code == 0, default.stderr  # β = 1 is "off": a recipe.yaml of any method says so


def test_dry_run_table_writes_nothing(pair, out_parent):
    result = run_ctm("merge", *pair, "--rank", "4", "-o", out_parent / "out", "--dry-run", env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.stderr
    assert listing(out_parent) == []
    assert "dry run: 2 adapters" in result.stdout and "nothing written" in result.stdout
    assert "32×64" in result.stdout and "estimated device memory" in result.stdout


def test_dry_run_still_validates(pair, out_parent, tmp_path):
    result = run_ctm("merge", pair[0], tmp_path / "missing", "-o", out_parent / "out", "--dry-run", "--json")
    assert result.exit_code == 3
    assert result.stdout == ""


def _raise(exception: BaseException):
    def fail(*args, **kwargs):
        raise exception

    return fail


@pytest.mark.parametrize(
    ("case", "code"),
    [
        ("success", 0),
        ("usage", 2),
        ("bad-input", 3),
        ("incompatible", 4),
        ("output-exists", 5),
        ("internal", 1),
        ("interrupted", 130),
    ],
)
def test_exit_codes(case, code, pair, make_adapter, out_parent, tmp_path, monkeypatch):
    out = out_parent / "out"
    args = [*pair, *FAST, "-o", out]
    if case == "usage":
        args += ["--beta", "2"]
    elif case == "bad-input":
        args = [pair[0], tmp_path / "missing", "-o", out]
    elif case == "incompatible":
        args = [pair[0], make_adapter(r=8, alpha=16, seed=63, base_model="other-llama"), "--rank", "4", "-o", out]
    elif case == "output-exists":
        out.mkdir()
        (out / "keep.txt").write_text("keep")
    elif case == "internal":
        monkeypatch.setattr(ctm_cli.pipeline, "check_compatible", _raise(RuntimeError("boom")))
    elif case == "interrupted":
        monkeypatch.setattr(ctm_cli.engine, "merge_modules", _raise(KeyboardInterrupt()))  # run_merge imports it
    monkeypatch.delenv("CTM_DEBUG", raising=False)
    result = run_ctm("merge", *args, "--quiet")
    assert result.exit_code == code, result.stderr
    assert code in EXIT_CODES
    if code:
        assert len(result.stderr.strip().splitlines()) == 1
        assert listing(out_parent) == ([] if case != "output-exists" else ["out"])
    if case == "internal":
        assert result.stderr.startswith("ctm: internal error: RuntimeError: boom")


def test_model_card(merged, pair):
    out = merged[0]
    text = (out / "README.md").read_text()
    assert text.startswith("---\n")
    front = yaml.safe_load(text.split("---\n")[1])
    assert front["base_model"] == "tiny-llama"
    assert front["library_name"] == "peft"
    assert {"lora", "merge", "ctm"} <= set(front["tags"])
    body = text.split("---\n", 2)[2]
    for path in pair:
        assert f"| {path} | local |" in body
    for row in ("| method | ctm |", "| rule | tsv |", "| rank | 4 |"):
        assert row in body
    assert "PeftModel.from_pretrained(base, 'out')" in body
    assert {"README.md", "recipe.yaml", "merge_report.json", "merge_report.md"} <= set(listing(out))


def test_model_card_leaves_local_base_paths_out_of_the_metadata(merged):
    report = json.loads((merged[0] / "merge_report.json").read_text())
    for item in report["inputs"]:
        item["base_model"] = "/models/llama|base"
    report["settings"]["base_model"] = "/models/llama|base"
    text = render_model_card(report, "merged", loading_class({"task_type": "CAUSAL_LM"}))
    front = yaml.safe_load(text.split("---\n")[1])
    assert "base_model" not in front and front["library_name"] == "peft"
    assert "AutoModelForCausalLM.from_pretrained('/models/llama|base')" in text
    assert "`/models/llama|base`" in text


class FakeHfApi:
    """Records what would be pushed; `fail` makes the upload raise like a network error would."""

    calls: ClassVar[list[tuple]] = []
    fail = False

    def create_repo(self, repo_id, private=False, exist_ok=False):
        self.calls.append(("create_repo", repo_id, private, exist_ok))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, repo_id, folder_path, commit_message=None):
        if self.fail:
            raise ConnectionError("network is unreachable")
        self.calls.append(("upload_folder", repo_id, sorted(p.name for p in Path(folder_path).iterdir())))


@pytest.fixture
def fake_api(monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    monkeypatch.setattr(FakeHfApi, "calls", [])
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_fake_token_for_tests")
    return FakeHfApi


def test_push_to_hub(pair, out_parent, fake_api):
    out = out_parent / "out"
    result = run_ctm("merge", *pair, *FAST, "-o", out, "--push-to-hub", "me/merged", "--private", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["pushed_to"] == "https://huggingface.co/me/merged"
    files = sorted(p.name for p in out.iterdir())
    assert fake_api.calls == [("create_repo", "me/merged", True, True), ("upload_folder", "me/merged", files)]
    assert "README.md" in files and "recipe.yaml" in files
    assert "PeftModel.from_pretrained(base, 'me/merged')" in (out / "README.md").read_text()


def test_push_failure_keeps_the_output(pair, out_parent, fake_api, monkeypatch):
    monkeypatch.setattr(fake_api, "fail", True)
    result = run_ctm("merge", *pair, *FAST, "-o", out_parent / "out", "--push-to-hub", "me/merged")
    assert result.exit_code == 5
    assert "pushing to the Hub failed (ConnectionError: network is unreachable)" in result.stderr
    assert (out_parent / "out" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--push-to-hub", "not a repo"], "--push-to-hub expects a Hub repo id org/name"),
        (["--push-to-hub", "me/merged", "no-token"], "--push-to-hub needs a Hub token"),
        (["--push-to-hub", "me/merged", "offline"], "--push-to-hub needs the network, but HF_HUB_OFFLINE=1"),
        (["--private"], "--private only applies with --push-to-hub"),
    ],
)
def test_push_refused_before_any_work(pair, out_parent, fake_api, monkeypatch, tmp_path, extra, message):
    from huggingface_hub import constants

    if "no-token" in extra:
        monkeypatch.delenv("HF_TOKEN")
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token-file"))
    if "offline" in extra:
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    extra = [arg for arg in extra if arg not in ("no-token", "offline")]
    result = run_ctm("merge", *pair, "--rank", "4", "-o", out_parent / "out", *extra)
    assert result.exit_code == 2
    assert message in result.stderr
    assert listing(out_parent) == [] and fake_api.calls == []


def test_help_has_examples_and_exit_codes():
    merge_help = run_ctm("merge", "--help", env={"COLUMNS": "200"})
    assert merge_help.exit_code == 0
    for text in ("Examples", "--config", "--dry-run", "--push-to-hub", "ctm merge math/ code/"):
        assert text in merge_help.stdout
    root_help = run_ctm("--help", env={"COLUMNS": "200"})
    assert "Exit codes" in root_help.stdout and "usage error" in root_help.stdout


def test_shell_completion():
    runner = CliRunner()
    script = runner.invoke(app, ["--show-completion", "bash"], prog_name="ctm")
    assert script.exit_code == 0
    assert (
        "_CTM_COMPLETE=complete_bash" in script.stdout and "complete -o default -F _ctm_completion ctm" in script.stdout
    )
    env = {"_CTM_COMPLETE": "complete_bash", "COMP_WORDS": "ctm merge --dry", "COMP_CWORD": "2"}
    completed = runner.invoke(app, [], prog_name="ctm", env=env)
    assert completed.stdout.split() == ["--dry-run"]


def test_compare_merges_measures_how_far_two_merges_are(pair, tmp_path):
    """scripts/compare_merges.py: zero against itself; a merge with HOOI cut to one sweep against the converged
    one (the paper's CtM: a frame of the output rank, found by HOOI)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    from compare_merges import module_differences, report_figures

    exact, rough = tmp_path / "exact", tmp_path / "rough"
    paper = ["merge", *pair, "--rank", "4", "--param", "frame_rank=4", "--quiet"]
    assert run_ctm(*paper, "-o", exact).exit_code == 0
    assert run_ctm(*paper, "--param", "max_sweeps=1", "-o", rough).exit_code == 0
    same = module_differences(Adapter(exact), Adapter(exact))
    assert len(same) == 14 and max(same.values()) == 0.0
    apart = module_differences(Adapter(rough), Adapter(exact))
    assert apart.keys() == same.keys() and all(0.0 <= value < 10.0 for value in apart.values())
    assert max(apart.values()) > 1e-3  # one sweep from the HOSVD start is not HOOI's fixed point here
    assert report_figures(rough)["median_sweeps"] == 1 and report_figures(exact)["median_sweeps"] >= 1


def test_the_same_adapter_twice_is_merged_with_a_warning(pair, tmp_path):
    """Given twice (by the same path, or another path to the same files), an input is merged as one more task:
    ctm says so, and how to weigh it instead."""
    alias = tmp_path / "alias"
    alias.symlink_to(pair[0], target_is_directory=True)
    result = run_ctm("merge", pair[0], pair[1], alias, "--rank", "4", "-o", tmp_path / "out", "--dry-run", "--json")
    assert result.exit_code == 0, result.stderr
    (warning,) = [w for w in json.loads(result.stdout)["warnings"] if "merged twice" in w]
    assert f"{alias} is the same adapter as {pair[0]}" in warning and "--weights" in warning
    twice = run_ctm("merge", pair[0], pair[0], "--rank", "4", "-o", tmp_path / "out", "--dry-run")
    assert twice.exit_code == 0 and f"ctm: warning: {pair[0]} is given twice" in twice.stderr


def test_plan_header_says_the_output_rank_and_human_values(pair, tmp_path):
    """--dry-run's text: the rank written, the rule's parameters as typed (no Python reprs), β only for a method it
    acts on, sizes in binary units."""
    wide = {"COLUMNS": "200"}
    ctm = run_ctm("merge", *pair, "--rank", "4", "--rule", "ties", "-o", tmp_path / "o", "--dry-run", env=wide)
    assert ctm.exit_code == 0, ctm.stderr
    assert "at rank 4;" in ctm.stdout
    assert "rule ties (density=0.2, trim_count=0, sign_count=0, lambda=1), β=1" in ctm.stdout
    cat = run_ctm("merge", *pair, "--method", "cat", "-o", tmp_path / "o", "--dry-run", env=wide)
    assert cat.exit_code == 0, cat.stderr
    assert "at rank 12 (requested 16)" in cat.stdout and "β" not in cat.stdout
    for text in (ctm.stdout, cat.stdout):
        assert "{" not in text and "'" not in text and " bytes" not in text and "iB" in text
