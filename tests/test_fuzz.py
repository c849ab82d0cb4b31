"""Fuzzing the CLI with hypothesis over adapter configs, tensor shapes, dtypes, damaged files and options:
`ctm merge` either succeeds or fails with one clean `ctm: error:` line and a documented exit code, never a
traceback and never an internal error (exit 1)."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from helpers import WEIGHTS, listing, run_ctm
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

CLEAN_FAILURES = {2, 3, 4, 5}
MODULES = ["base_model.model.layers.0.q", "base_model.model.layers.0.k", "base_model.model.layers.1.q"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ODD_VALUES = st.sampled_from([None, "8", -1, 0, 2.5, True, [], {}, "(", "q", float("nan")])
DAMAGES = ["truncate", "garbage", "config-garbage", "no-weights"]


def faults(draw: st.DrawFn) -> Callable[[st.SearchStrategy, Any], Any]:
    """A drawer for one adapter or one command line: a quarter of them are faulty, and in a faulty one each
    field is, by a coin toss, drawn from its faulty values; everywhere else it keeps its good value."""
    faulty = draw(st.integers(0, 3)) == 0

    def value(bad: st.SearchStrategy, good: Any) -> Any:
        return draw(bad) if faulty and draw(st.booleans()) else good

    return value


@st.composite
def adapter_files(draw: st.DrawFn, shapes: dict[str, tuple[int, int]]) -> tuple[dict, dict[str, torch.Tensor], str]:
    """(config, tensors, damage) of one adapter; mostly valid and mergeable with its siblings."""
    fault = faults(draw)
    rank = draw(st.integers(1, 4))
    dtype = draw(st.sampled_from(DTYPES))
    tensors = {}
    for name in fault(st.lists(st.sampled_from(MODULES), min_size=1, max_size=3, unique=True), MODULES):
        out_features, in_features = fault(st.tuples(st.integers(1, 6), st.integers(1, 6)), shapes[name])
        generator = torch.Generator().manual_seed(draw(st.integers(0, 99)))
        a = torch.randn(fault(st.integers(1, 5), rank), in_features, generator=generator)
        b = torch.randn(out_features, rank, generator=generator)
        b[0, 0] = fault(st.sampled_from([float("nan"), float("inf"), 1e30]), b[0, 0])
        tensors[f"{name}.lora_A.weight"] = a.to(dtype)
        if fault(st.booleans(), True):
            tensors[f"{name}.lora_B.weight"] = fault(st.just(b.unsqueeze(-1)), b).to(dtype)
    extra = draw(st.sampled_from([None, None, None, "base_model.model.head.weight"]))
    extra = fault(st.sampled_from(["base_model.model.layers.0.q.lora_magnitude_vector", "x.lora_C"]), extra)
    if extra:
        tensors[extra] = torch.randn(draw(st.integers(1, 3)), 4)
    config = {
        "peft_type": fault(st.sampled_from(["IA3", None]), "LORA"),
        "r": fault(ODD_VALUES, rank),
        "lora_alpha": fault(ODD_VALUES, draw(st.sampled_from([1, 8, 16.0, 0, -4]))),
        "base_model_name_or_path": draw(st.sampled_from(["base", "base", "base", "other", None])),
        "use_rslora": fault(ODD_VALUES, draw(st.booleans())),
        "target_modules": fault(ODD_VALUES, draw(st.sampled_from([["q", "k"], ["q"], ".*\\.q", ["layers.0.q"]]))),
        "rank_pattern": fault(st.sampled_from([{"k": 9}, {"(": 2}, {"q": "x"}, []]), {"k": rank}),
        "alpha_pattern": fault(st.sampled_from([{"q": "x"}, {"[": 1}, {"q": float("inf")}]), {"q": 2}),
        "fan_in_fan_out": fault(ODD_VALUES, draw(st.booleans())),
        "layers_to_transform": fault(st.sampled_from([[0, "a"], 1, "x"]), draw(st.sampled_from([None, [0]]))),
        "modules_to_save": fault(ODD_VALUES, draw(st.sampled_from([None, ["head"]]))),
    }
    config = {key: value for key, value in config.items() if value is not None or draw(st.booleans())}
    return config, tensors, fault(st.sampled_from(DAMAGES), "none")


def write_adapter(folder: Path, config: dict, tensors: dict[str, torch.Tensor], damage: str) -> None:
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps(config))
    if damage == "config-garbage":
        (folder / "adapter_config.json").write_text('{"peft_type": "LORA", "r": ')
    if damage != "no-weights":
        save_file({key: value.contiguous() for key, value in tensors.items()}, str(folder / WEIGHTS))
    if damage == "truncate":
        (folder / WEIGHTS).write_bytes((folder / WEIGHTS).read_bytes()[:-7])
    if damage == "garbage":
        (folder / WEIGHTS).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{\x00\x00]")


@st.composite
def merges(draw: st.DrawFn) -> tuple[list, list[str]]:
    """Adapters of one shared set of module shapes, and the options of one `ctm merge`."""
    shapes = {name: (draw(st.integers(1, 6)), draw(st.integers(1, 6))) for name in MODULES}
    fault = faults(draw)
    adapters = draw(st.lists(adapter_files(shapes), min_size=fault(st.just(1), 2), max_size=3))
    options = ["--rank", str(fault(st.integers(-1, 30), draw(st.integers(1, 2))))]
    options += draw(st.sampled_from([[], [], ["--method", "cat"], ["--rule", "mean"]]))
    weights = draw(st.lists(st.sampled_from(["1", "-0.5", "2", "0.1"]), min_size=len(adapters), max_size=len(adapters)))
    weights = fault(st.sampled_from([["nan", *weights], ["1e308", *weights[1:]], ["0"] * len(weights)]), weights)
    options += draw(st.sampled_from([[], ["--weights", ",".join(weights)]]))
    options += draw(st.sampled_from([[], ["--allow-missing"]]))
    options += draw(st.sampled_from([[], ["--modules-to-save", "drop"], ["--modules-to-save", "mean"]]))
    options += draw(st.sampled_from([[], ["--dtype", "float16"], ["--dtype", "bfloat16"], ["--beta", "0.3"]]))
    options += fault(st.sampled_from([["--method", "nope"], ["--dtype", "int8"], ["--beta", "1.5"]]), [])
    return adapters, options


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(merges())
def test_cli_succeeds_or_fails_cleanly(merge):
    adapters, options = merge
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        folders = []
        for index, (config, tensors, damage) in enumerate(adapters):
            folders.append(root / f"adapter-{index}")
            write_adapter(folders[-1], config, tensors, damage)
        out_parent = root / "outputs"
        out_parent.mkdir()
        result = run_ctm("merge", *folders, "-o", out_parent / "out", "--quiet", *options)
        event(f"exit {result.exit_code}")  # the mix of outcomes, shown by --hypothesis-show-statistics
        if result.exit_code == 0:
            written = load_file(str(out_parent / "out" / WEIGHTS))
            assert written and all(bool(torch.isfinite(t.float()).all()) for t in written.values())
            assert listing(out_parent) == ["out"]
            return
        assert result.exit_code in CLEAN_FAILURES, result.stderr
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("ctm: error: "), result.stderr
        assert listing(out_parent) == []
