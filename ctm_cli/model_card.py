"""The model card `README.md` of a merged adapter: Hub front matter, then tables of the inputs and settings."""

from __future__ import annotations

import re
from typing import Any

import yaml

TAGS = ["lora", "merge", "ctm"]
# What the Hub accepts as `base_model`: a model id (`gpt2`, `org/name`); a local path is left out of the metadata.
_MODEL_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _front_matter(report: dict[str, Any]) -> str:
    bases = {item["base_model"] for item in report["inputs"] if item["base_model"]}
    base = bases.pop() if len(bases) == 1 else None
    data: dict[str, Any] = {"base_model": base} if base and _MODEL_ID.match(base) else {}
    data.update(library_name="peft", tags=TAGS)
    return "---\n" + yaml.safe_dump(data, sort_keys=False, allow_unicode=True) + "---\n"


def render_model_card(report: dict[str, Any], model_id: str) -> str:
    """Model card text for the merge `report`; `model_id` is where users load it from (Hub repo or folder)."""
    settings = report["settings"]
    base = next((item["base_model"] for item in report["inputs"] if item["base_model"]), "BASE_MODEL")
    params = ", ".join(f"{name}={value}" for name, value in settings["rule_params"].items()) or "none"
    lines = [
        _front_matter(report),
        f"# {model_id}",
        "",
        f"A rank-{settings['rank']} PEFT LoRA adapter of `{base}`, merged from {len(report['inputs'])} adapters "
        f"by ctm {report['ctm_version']} (method `{settings['method']}`, rule `{settings['rule']}`).",
        "",
        "## Inputs",
        "",
        "| # | source | revision | r | lora_alpha | weight | sha256 |",
        "|---|---|---|---|---|---|---|",
    ]
    for index, item in enumerate(report["inputs"], start=1):
        cells = [index, item["source"], item.get("revision") or "local", item["r"], item["lora_alpha"], item["weight"]]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + f" | `{item['sha256'][:12]}` |")
    rows = [
        ("method", settings["method"]),
        ("rule", settings["rule"]),
        ("rule parameters", params),
        ("rank", settings["rank"]),
        ("beta", settings["beta"]),
        ("seed", settings["seed"]),
        ("dtype", settings["dtype"]),
        ("device", settings["device"]),
    ]
    lines += ["", "## Settings", "", "| setting | value |", "|---|---|"]
    lines += [f"| {name} | {_cell(value)} |" for name, value in rows]
    lines += [
        "",
        "## Usage",
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM  # or the model class of the adapter's task",
        "",
        f"base = AutoModelForCausalLM.from_pretrained({base!r})",
        f"model = PeftModel.from_pretrained(base, {model_id!r})",
        "```",
        "",
        "## Reproduce",
        "",
        "`recipe.yaml` (in this folder) pins every input; `ctm merge --config recipe.yaml -o OUTPUT` repeats the",
        "merge. Per-module figures (energy kept, error against the full-rank merge) are in `merge_report.md`",
        "and `merge_report.json`.",
        "",
    ]
    return "\n".join(lines)
