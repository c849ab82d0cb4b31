"""The model card `README.md` of a merged adapter: Hub front matter, then tables of the inputs and settings."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import yaml

from ctm_cli import human
from ctm_cli.methods import METHODS
from ctm_cli.untrusted import printable

TAGS = ["lora", "merge", "ctm"]
# What the Hub accepts as `base_model`: a model id (`gpt2`, `org/name`); a local path is left out of the metadata.
_MODEL_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")
# The transformers class that builds the model a PEFT task type adapts (PeftModel then finds every LoRA key).
TASK_CLASSES = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoModel",
}
_IDENTIFIER = re.compile(r"^[A-Za-z_]\w*$")
_MODULE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


@dataclass(frozen=True)
class LoadingClass:
    """The class the card's snippet builds the base model with, and the module it is imported from."""

    module: str
    name: str


def loading_class(config: dict[str, Any]) -> LoadingClass:
    """The model class of an adapter: its `task_type`'s Auto class; without one, the class PEFT recorded in
    `auto_mapping` (the exact model the adapter was trained on); else AutoModel. Only valid Python names
    from the config reach the snippet."""
    task_class = TASK_CLASSES.get(config.get("task_type"))  # type: ignore[arg-type]
    if task_class:
        return LoadingClass("transformers", task_class)
    mapping = config.get("auto_mapping")
    if isinstance(mapping, dict):
        name, library = mapping.get("base_model_class"), mapping.get("parent_library")
        if isinstance(name, str) and isinstance(library, str) and _IDENTIFIER.match(name) and _MODULE.match(library):
            return LoadingClass("transformers" if library.startswith("transformers.") else library, name)
    return LoadingClass("transformers", "AutoModel")


# What the card calls the merged adapter, by output style (--format).
_STYLE_NAMES = {"peft": "PEFT LoRA adapter", "kohya": "kohya-style LoRA file", "diffusers": "diffusers-style LoRA file"}


def _cell(value: Any) -> str:
    return printable(str(value)).replace("|", "\\|")


def _front_matter(report: dict[str, Any]) -> str:
    base = report["settings"].get("base_model")
    data: dict[str, Any] = {"base_model": base} if base and _MODEL_ID.match(base) else {}
    if report["settings"].get("format", "peft") == "peft":
        data.update(library_name="peft", tags=TAGS)
    else:  # a kohya or diffusers file: no PEFT library to load it with
        data["tags"] = [*TAGS, "lora"]
    return "---\n" + yaml.safe_dump(data, sort_keys=False, allow_unicode=True) + "---\n"


def render_model_card(report: dict[str, Any], model_id: str, model_class: LoadingClass | None = None) -> str:
    """Model card text for the merge `report`; `model_id` is where users load it from (Hub repo or folder),
    `model_class` what builds the base model (see `loading_class`). Text from the inputs is escaped."""
    settings = report["settings"]
    base = settings.get("base_model") or "BASE_MODEL"
    model_class = model_class or LoadingClass("transformers", "AutoModel")
    params = human.value(settings["rule_params"])
    overridden = " (set with --base-model)" if settings.get("base_model_overridden") else ""
    lines = [
        f"# {model_id}",
        "",
        f"A rank-{settings['written_rank']} {_STYLE_NAMES[settings.get('format', 'peft')]} of `{base}`, merged from "
        f"{len(report['inputs'])} "
        f"adapters by ctm {report['ctm_version']} (method `{settings['method']}`, rule `{settings['rule']}`).",
        "",
        "## Inputs",
        "",
        "| # | source | revision | r | lora_alpha | weight | sha256 |",
        "|---|---|---|---|---|---|---|",
    ]
    for index, item in enumerate(report["inputs"], start=1):
        cells = [index, item["source"], item.get("revision") or "local", item["r"], item["lora_alpha"]]
        cells.append(human.number(item["weight"]))
        lines.append("| " + " | ".join(_cell(c) for c in cells) + f" | `{item['sha256'][:12]}` |")
    rows = [
        ("method", settings["method"]),
        ("rule", settings["rule"]),
        ("rule parameters", params),
        ("rank", settings["written_rank"]),
        ("requested rank", settings["requested_rank"]),
        *([("beta", human.number(settings["beta"]))] if METHODS[settings["method"]].uses_beta else []),
        ("seed", settings["seed"]),
        ("dtype", settings["dtype"]),
        ("device", settings["device"]),
        ("base model", f"{settings.get('base_model')}{overridden}"),
    ]
    lines += ["", "## Settings", "", "| setting | value |", "|---|---|"]
    lines += [f"| {name} | {_cell(value)} |" for name, value in rows]
    usage = [
        "```python",
        "from peft import PeftModel",
        f"from {model_class.module} import {model_class.name}",
        "",
        f"base = {model_class.name}.from_pretrained({base!r})",
        f"model = PeftModel.from_pretrained(base, {model_id!r})",
        "```",
    ]
    if settings.get("format", "peft") != "peft":
        usage = [f"The `.safetensors` file here loads like any {settings['format']}-style LoRA (alpha = r: scale 1)."]
    lines += [
        "",
        "## Usage",
        "",
        *usage,
        "",
        "## Reproduce",
        "",
        "`recipe.yaml` (in this folder) pins every input; `ctm merge --config recipe.yaml -o OUTPUT` repeats the",
        "merge. Per-module figures (energy kept, error against the full-rank merge) are in `merge_report.md`",
        "and `merge_report.json`.",
        "",
    ]
    return _front_matter(report) + "\n" + "\n".join(printable(line) for line in lines)
