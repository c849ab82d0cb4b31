"""Bundled example: merge three real PEFT LoRA adapters of a tiny Llama with `ctm merge`.

Run with `python scripts/demo.py [--out demo]`. Everything is built locally (no download):
a 2-layer Llama, three LoRA adapters of ranks 8, 4 (rsLoRA) and 16, then the real CLI merges them
into one rank-8 adapter, which is loaded back with PEFT and compared with the exact sum of the three.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import warnings
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTERS = {  # name: (r, lora_alpha, use_rslora)
    "adapter-a": (8, 16, False),
    "adapter-b": (4, 8, True),
    "adapter-c": (16, 32, False),
}
PREFIX = "base_model.model."


def build_base(folder: Path) -> None:
    """Save a tiny randomly initialised Llama to `folder`."""
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
    )
    LlamaForCausalLM(config).save_pretrained(folder)


def load_base(folder: Path) -> LlamaForCausalLM:
    """The saved base model, in eval mode (its name_or_path is `folder`, so PEFT records it)."""
    return LlamaForCausalLM.from_pretrained(folder).eval()


def make_adapter(base: Path, folder: Path, r: int, alpha: int, rslora: bool) -> dict[str, torch.Tensor]:
    """Save a random LoRA adapter shaped like a trained one to `folder`; return its updates by module name.

    Trained adapters are small next to the base weights and have a few dominant directions, so the
    columns of each lora_B are shrunk by a geometric decay (a random adapter would use all r equally).
    """
    config = LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora, target_modules=TARGETS, init_lora_weights=False)
    model = get_peft_model(load_base(base), config)
    decay = 0.02 * 0.5 ** torch.arange(r, dtype=torch.float32)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoraLayer):
                module.lora_B["default"].weight *= decay
    model.peft_config["default"].base_model_name_or_path = str(base)
    model.save_pretrained(folder)
    with torch.no_grad():
        return {
            name.removeprefix(PREFIX): module.get_delta_weight("default")
            for name, module in model.named_modules()
            if isinstance(module, LoraLayer)
        }


def logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Logits of `model` on `tokens`, without gradients."""
    with torch.no_grad():
        return model(input_ids=tokens).logits


def main() -> int:
    """Build the example, merge it with the CLI, load the result and compare; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("demo"), help="working folder (default: demo)")
    out = parser.parse_args().out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.manual_seed(0)

    base = out / "base"
    build_base(base)
    total: dict[str, torch.Tensor] = {}
    for name, (r, alpha, rslora) in ADAPTERS.items():
        for module, delta in make_adapter(base, out / name, r, alpha, rslora).items():
            total[module] = total.get(module, 0) + delta
        print(f"wrote {out / name} (r={r}, lora_alpha={alpha}, use_rslora={rslora})")

    merged = out / "merged"
    command = [sys.executable, "-m", "ctm_cli", "merge", *(str(out / n) for n in ADAPTERS)]
    command += ["--rank", "8", "--rule", "ta", "-o", str(merged), "--force"]
    print("$", " ".join(command), flush=True)
    if (code := subprocess.run(command, check=False).returncode) != 0:
        print(f"demo: ctm merge failed with exit code {code}", file=sys.stderr)
        return 1
    print((merged / "merge_report.md").read_text(encoding="utf-8"))

    try:
        model = PeftModel.from_pretrained(load_base(base), str(merged)).eval()
        saved = load_file(str(merged / "adapter_model.safetensors"))
        loaded = get_peft_model_state_dict(model)
        if set(saved) != set(loaded) or any(not torch.equal(saved[k], loaded[k]) for k in saved):
            raise RuntimeError("the loaded weights differ from the saved ones")
    except Exception as exc:
        print(f"demo: loading the merged adapter failed: {exc}", file=sys.stderr)
        return 1

    exact = load_base(base)
    with torch.no_grad():
        for module, delta in total.items():
            exact.get_submodule(module).weight += delta
    tokens = torch.arange(0, 128, 7).unsqueeze(0)
    base_logits, exact_logits = logits(load_base(base), tokens), logits(exact, tokens)
    change = torch.linalg.norm(exact_logits - base_logits)
    difference = torch.linalg.norm(logits(model, tokens) - exact_logits)
    print(f"the three adapters change the logits by {change / torch.linalg.norm(base_logits):.2%} of their norm;")
    print(f"the rank-8 merge reproduces that change to within {difference / change:.2%} (rank 28 would be exact)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
