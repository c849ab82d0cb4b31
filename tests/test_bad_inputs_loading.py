"""Outputs that must load and do something: the model card's snippet, run as written, builds the base model with
the class of the adapter's task (PEFT then finds every LoRA key, and the loaded factors are the written, non-zero
ones), and a classification adapter merged without its head is written so that PEFT loads it."""

from __future__ import annotations

import copy
import json
import os
import re
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers import WEIGHTS, run_ctm
from safetensors.torch import load_file

from ctm_cli.model_card import TASK_CLASSES, LoadingClass, loading_class


def tiny_bert(cls_name: str):
    import transformers

    torch.manual_seed(0)
    config = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=64,
        max_position_embeddings=64, num_labels=3,
    )  # fmt: skip
    return getattr(transformers, cls_name)(config).eval()


def tiny_t5():
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    config = T5Config(d_model=32, d_ff=64, num_layers=2, num_heads=4, d_kv=8, vocab_size=64, decoder_start_token_id=0)
    return T5ForConditionalGeneration(config).eval()


def tiny_llama():
    from helpers import build_tiny_llama

    return build_tiny_llama()


# task type: (builder of the tiny base model, LoRA target modules, --modules-to-save policy the heads need)
TASKS: dict[str | None, tuple[Callable[[], torch.nn.Module], list[str], list[str]]] = {
    "CAUSAL_LM": (tiny_llama, ["q_proj", "v_proj"], []),
    "SEQ_CLS": (lambda: tiny_bert("BertForSequenceClassification"), ["query", "value"], ["--modules-to-save", "first"]),
    "TOKEN_CLS": (lambda: tiny_bert("BertForTokenClassification"), ["query", "value"], ["--modules-to-save", "mean"]),
    "SEQ_2_SEQ_LM": (tiny_t5, ["q", "v"], []),
    "QUESTION_ANS": (lambda: tiny_bert("BertForQuestionAnswering"), ["query", "value"], ["--modules-to-save", "first"]),
    "FEATURE_EXTRACTION": (lambda: tiny_bert("BertModel"), ["query", "value"], []),
    None: (lambda: tiny_bert("BertModel"), ["query", "value"], []),  # as the minilm-8 adapters: auto_mapping only
}


def peft_adapters(
    base: torch.nn.Module, base_dir: Path, folder: Path, task_type: str | None, targets: list[str], **options
) -> list[Path]:
    """Two real PEFT adapters (random non-zero factors) of `base` for `task_type`, naming `base_dir` as base;
    `options` go to peft.LoraConfig."""
    from peft import LoraConfig, get_peft_model

    folders = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        config = LoraConfig(
            task_type=task_type, r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, **options
        )
        with warnings.catch_warnings():  # transformers' deprecation notice inside PEFT, not ours to fix
            warnings.simplefilter("ignore", FutureWarning)
            model = get_peft_model(copy.deepcopy(base), config)
        for name, parameter in model.named_parameters():  # heads differ per adapter, as trained heads would
            if "modules_to_save" in name:
                torch.nn.init.normal_(parameter)
        model.save_pretrained(folder / f"adapter-{seed}")
        path = folder / f"adapter-{seed}" / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "base_model_name_or_path": str(base_dir)}))
        folders.append(folder / f"adapter-{seed}")
    return folders


def snippet_of(card: str) -> str:
    """The Python block of a model card."""
    return re.search(r"```python\n(.*?)```", card, re.DOTALL)[1]


def run_snippet(code: str, where: Path) -> dict:
    """Execute a card's snippet in `where` (its adapter path is relative to the output's parent), recording
    warnings; returns its variables and the warnings."""
    namespace: dict = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cwd = Path.cwd()
        try:
            os.chdir(where)
            exec(compile(code, "README.md", "exec"), namespace)
        finally:
            os.chdir(cwd)
    namespace["caught"] = [str(w.message) for w in caught]
    return namespace


def check_loaded(model, out: Path) -> None:
    """Every LoRA factor written to `out` is in the loaded PeftModel, equal to the file and not all zero."""
    from peft import get_peft_model_state_dict

    written = {key: tensor for key, tensor in load_file(str(out / WEIGHTS)).items() if ".lora_" in key}
    loaded = get_peft_model_state_dict(model)
    assert written and set(written) <= set(loaded)
    for key, tensor in written.items():
        torch.testing.assert_close(loaded[key], tensor, rtol=0, atol=0)
        assert bool(tensor.abs().sum() > 0), key


@pytest.mark.parametrize("task_type", list(TASKS), ids=lambda t: t or "none-with-auto-mapping")
def test_model_card_snippet_loads_every_task(task_type, tmp_path):
    build, targets, policy = TASKS[task_type]
    base = build()
    base_dir = tmp_path / "base"
    base.save_pretrained(base_dir)
    folders = peft_adapters(base, base_dir, tmp_path, task_type, targets)
    out = tmp_path / "merged"
    result = run_ctm("merge", *folders, "--rank", "4", "-o", out, *policy)
    assert result.exit_code == 0, result.stderr
    card = (out / "README.md").read_text()
    expected = TASK_CLASSES.get(task_type) or "BertModel"
    assert f"import {expected}\n" in card
    assert json.loads((out / "adapter_config.json").read_text())["task_type"] == task_type
    loaded = run_snippet(snippet_of(card), tmp_path)
    assert type(loaded["base"]).__name__ == type(base).__name__
    assert not [message for message in loaded["caught"] if "missing" in message.lower()], loaded["caught"]
    check_loaded(loaded["model"], out)


def test_wrong_class_loads_nothing(tmp_path):
    """Why the class matters: the snippet of old (AutoModelForCausalLM for everything) on a BertModel adapter
    makes PEFT warn that the LoRA keys are missing, and the adapter does nothing."""
    build, targets, _ = TASKS[None]
    base = build()
    base.save_pretrained(tmp_path / "base")
    folder = peft_adapters(base, tmp_path / "base", tmp_path, None, targets)[0]
    code = (
        "from peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n"
        f"base = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'base')!r})\n"
        f"model = PeftModel.from_pretrained(base, {folder.name!r})\n"
    )
    loaded = run_snippet(code, tmp_path)
    assert any("missing adapter keys" in message for message in loaded["caught"]), loaded["caught"]


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"task_type": "SEQ_CLS", "auto_mapping": {"base_model_class": "X", "parent_library": "y"}}, "transformers"),
        ({"auto_mapping": {"base_model_class": "MyNet", "parent_library": "mylib.models"}}, "mylib.models"),
        ({"auto_mapping": {"base_model_class": "os; import os", "parent_library": "transformers.x"}}, "AutoModel"),
        ({"auto_mapping": {"base_model_class": "Net", "parent_library": "a;b"}}, "AutoModel"),
        ({"task_type": "NOT_A_TASK"}, "AutoModel"),
        ({}, "AutoModel"),
    ],
)
def test_loading_class_takes_only_python_names(config, expected):
    """auto_mapping comes from a file and lands in code that people copy and run: only valid names get there."""
    found = loading_class(config)
    assert expected in (found.module, found.name)
    assert re.fullmatch(r"[A-Za-z_][\w.]*", found.module) and re.fullmatch(r"[A-Za-z_]\w*", found.name)
    assert found != LoadingClass("transformers", "os; import os")


# ---------------------------------------------------------------- a classification adapter without its head


@pytest.fixture(scope="module")
def gpt2_classifier(tmp_path_factory) -> tuple[Path, list[Path]]:
    """A tiny GPT-2 sequence classifier (saved) and two real SEQ_CLS LoRA adapters of it, heads (`score`) included."""
    from transformers import GPT2Config, GPT2ForSequenceClassification

    folder = tmp_path_factory.mktemp("gpt2-seq-cls")
    torch.manual_seed(0)
    config = GPT2Config(
        n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=64, bos_token_id=0, eos_token_id=0,
        pad_token_id=0, num_labels=3,
    )  # fmt: skip
    base = GPT2ForSequenceClassification(config).eval()
    base.save_pretrained(folder / "base")
    return folder / "base", peft_adapters(base, folder / "base", folder, "SEQ_CLS", ["c_attn"], fan_in_fan_out=True)


def test_seq_cls_without_head_loads_in_peft(gpt2_classifier, tmp_path):
    """`--modules-to-save drop` leaves the `score` head out; PEFT's SEQ_CLS model would then fail to load with a
    KeyError, so the config is written without a task type (a plain LoRA) and a warning says why."""
    from peft import PeftModel
    from transformers import GPT2ForSequenceClassification

    base_dir, folders = gpt2_classifier
    out = tmp_path / "merged"
    result = run_ctm("merge", *folders, "--rank", "4", "-o", out, "--modules-to-save", "drop")
    assert result.exit_code == 0, result.stderr
    warning = [line for line in result.stderr.splitlines() if line.startswith("ctm: warning:")]
    assert len(warning) == 1 and "task_type SEQ_CLS written as null" in warning[0]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["task_type"] is None and config["modules_to_save"] is None
    assert not [key for key in load_file(str(out / WEIGHTS)) if "score" in key]
    report = json.loads((out / "merge_report.json").read_text())
    assert report["warnings"] == [warning[0].removeprefix("ctm: warning: ")]
    assert "task_type SEQ_CLS written as null" in (out / "merge_report.md").read_text()

    base = GPT2ForSequenceClassification.from_pretrained(base_dir).eval()
    head = base.score.weight.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model = PeftModel.from_pretrained(base, out).eval()
    check_loaded(model, out)
    torch.testing.assert_close(model.base_model.model.score.weight, head)  # the model's own head, untouched
    card = (out / "README.md").read_text()
    assert "import AutoModelForSequenceClassification\n" in card  # the model class of the inputs' task
    loaded = run_snippet(snippet_of(card), tmp_path)
    check_loaded(loaded["model"], out)


def test_seq_cls_with_head_keeps_its_task(gpt2_classifier, tmp_path):
    _, folders = gpt2_classifier
    out = tmp_path / "merged"
    result = run_ctm("merge", *folders, "--rank", "4", "-o", out, "--modules-to-save", "first")
    assert result.exit_code == 0, result.stderr
    assert "warning" not in result.stderr
    assert json.loads((out / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"
