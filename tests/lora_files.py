"""Synthetic single-file LoRAs for the tests (kohya, diffusers and LyCORIS key sets of SD 1.5, SDXL and Flux; linear
and convolution modules) and their float64 dense updates, computed here from the stored tensors with the formulas
of kohya-ss, diffusers and LyCORIS (written again in NumPy, independently of ctm_cli/formats)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

# Module name -> weight shape (out, in) or (out, in, k, k), per key set.
SD15_KOHYA = {
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": (40, 40),
    "lora_unet_down_blocks_0_attentions_0_proj_in": (40, 40, 1, 1),
    "lora_unet_down_blocks_0_resnets_0_conv1": (40, 24, 3, 3),
    "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_v": (40, 32),
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj": (32, 32),
}
SDXL_KOHYA = {
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_k": (48, 48),
    "lora_unet_output_blocks_0_0_in_layers_2": (48, 32, 3, 3),
    "lora_te1_text_model_encoder_layers_0_mlp_fc1": (64, 32),
    "lora_te2_text_model_encoder_layers_0_self_attn_out_proj": (40, 40),
}
FLUX_KOHYA = {
    "lora_unet_double_blocks_0_img_attn_qkv": (96, 32),
    "lora_unet_double_blocks_0_txt_mlp_0": (64, 32),
    "lora_unet_single_blocks_0_linear1": (80, 32),
}
SD15_DIFFUSERS = {
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": (40, 40),
    "unet.down_blocks.0.attentions.0.proj_in": (40, 40, 1, 1),
    "unet.down_blocks.0.resnets.0.conv1": (40, 24, 3, 3),
    "unet.up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v": (40, 32),
    "text_encoder.text_model.encoder.layers.0.self_attn.q_proj": (32, 32),
}
SDXL_DIFFUSERS = {
    "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k": (48, 48),
    "text_encoder.text_model.encoder.layers.0.mlp.fc1": (64, 32),
    "text_encoder_2.text_model.encoder.layers.0.self_attn.out_proj": (40, 40),
}
FLUX_DIFFUSERS = {
    "transformer.transformer_blocks.0.attn.to_q": (48, 48),
    "transformer.single_transformer_blocks.0.proj_mlp": (96, 48),
}
KOHYA_ROLES = {"down": "lora_down.weight", "up": "lora_up.weight", "mid": "lora_mid.weight", "alpha": "alpha"}
DIFFUSERS_ROLES = {"down": "lora_A.weight", "up": "lora_B.weight", "alpha": "alpha"}


def _random(generator: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=generator) / shape[-1] ** 0.5


def lora_tensors(shape: tuple[int, ...], rank: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A plain LoRA's factors by role: down (r × in, or r × in × k × k) and up (out × r, or out × r × 1 × 1)."""
    out, inputs, *kernel = shape
    ones = [1] * len(kernel)
    return {
        "down": _random(generator, rank, inputs, *kernel),
        "up": _random(generator, out, rank, *ones),
    }


def lycoris_tensors(
    kind: str, shape: tuple[int, ...], rank: int, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """A LyCORIS module's tensors by their names in the file: tucker (LoCon with lora_mid), loha, loha_tucker, lokr
    (w1 full, w2 = w2_a·w2_b), lokr_full (both full), lokr_both (both decomposed), lokr_tucker (conv, t2)."""
    out, inputs, *kernel = shape
    k = int(np.prod(kernel)) if kernel else 1
    if kind == "tucker":
        return {"down": _random(generator, rank, inputs, 1, 1), "mid": _random(generator, rank, rank, *kernel),
                "up": _random(generator, out, rank, 1, 1)}
    if kind == "loha":
        return {name: _random(generator, *dims) for name, dims in (
            ("hada_w1_a", (out, rank)), ("hada_w1_b", (rank, inputs * k)),
            ("hada_w2_a", (out, rank)), ("hada_w2_b", (rank, inputs * k)))}
    if kind == "loha_tucker":
        return {name: _random(generator, *dims) for name, dims in (
            ("hada_t1", (rank, rank, *kernel)), ("hada_w1_a", (rank, out)), ("hada_w1_b", (rank, inputs)),
            ("hada_t2", (rank, rank, *kernel)), ("hada_w2_a", (rank, out)), ("hada_w2_b", (rank, inputs)))}
    o1, i1 = 4, 4
    o2, i2 = out // o1, inputs // i1
    tensors = {"lokr_w1": _random(generator, o1, i1)}
    if kind == "lokr":
        tensors.update(lokr_w2_a=_random(generator, o2, rank), lokr_w2_b=_random(generator, rank, i2, *kernel))
    elif kind == "lokr_full":
        tensors["lokr_w2"] = _random(generator, o2, i2, *kernel)
    elif kind == "lokr_both":
        del tensors["lokr_w1"]
        tensors.update(lokr_w1_a=_random(generator, o1, 2), lokr_w1_b=_random(generator, 2, i1),
                       lokr_w2_a=_random(generator, o2, 2), lokr_w2_b=_random(generator, 2, i2))
    elif kind == "lokr_tucker":
        tensors.update(lokr_t2=_random(generator, rank, rank, *kernel), lokr_w2_a=_random(generator, rank, o2),
                       lokr_w2_b=_random(generator, rank, i2))
    return tensors


def write_lora_file(
    path: Path,
    modules: dict[str, tuple[int, ...]],
    rank: int,
    seed: int,
    alpha: float | None = None,
    style: str = "kohya",
    kinds: dict[str, str] | None = None,
    dtype: torch.dtype = torch.float32,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write a single-file LoRA of `modules` (name -> weight shape) in `style` keys; `kinds` names LyCORIS kinds of
    some modules (kohya keys), `alpha` is stored per module when given."""
    generator = torch.Generator().manual_seed(seed)
    roles = KOHYA_ROLES if style == "kohya" else DIFFUSERS_ROLES
    tensors = {}
    for name, shape in modules.items():
        kind = (kinds or {}).get(name, "lora")
        if kind == "lora":
            stored = lora_tensors(shape, rank, generator)
        else:
            stored = lycoris_tensors(kind, shape, rank, generator)
        if alpha is not None:
            stored["alpha"] = torch.tensor(alpha)
        for role, tensor in stored.items():
            tensors[f"{name}.{roles.get(role, role)}"] = tensor.to(dtype) if role != "alpha" else tensor
    save_file(tensors, str(path), metadata=metadata)
    return path


def read_tensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Every tensor of a safetensors file in float64, and its metadata."""
    with safe_open(str(path), "pt") as handle:
        tensors = {key: handle.get_tensor(key).to(torch.float64).numpy() for key in handle.keys()}  # noqa: SIM118
        return tensors, handle.metadata() or {}


def _module_tensors(path: Path) -> dict[str, dict[str, np.ndarray]]:
    """The file's tensors grouped by module, by role (kohya and diffusers suffixes both understood)."""
    tensors, _ = read_tensors(path)
    suffixes = {f".{suffix}": role for roles in (KOHYA_ROLES, DIFFUSERS_ROLES) for role, suffix in roles.items()}
    grouped: dict[str, dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        suffix = next((s for s in suffixes if key.endswith(s)), None)
        if suffix is not None:
            grouped.setdefault(key[: -len(suffix)], {})[suffixes[suffix]] = value
        else:
            module, _, name = key.partition(".")
            grouped.setdefault(module, {})[name] = value
    return grouped


def _tucker(core: np.ndarray, wa: np.ndarray, wb: np.ndarray) -> np.ndarray:
    """LyCORIS' rebuild_tucker: W[p, r, ...] = Σ_ij t[i, j, ...] wa[i, p] wb[j, r]."""
    return np.einsum("ij...,ip,jr->pr...", core, wa, wb)


def dense_update(parts: dict[str, np.ndarray]) -> np.ndarray:
    """A module's ΔW (flattened to out × in·k·k), float64, with its scale (alpha / rank; 1 without alpha)."""
    alpha = float(parts["alpha"]) if "alpha" in parts and float(parts["alpha"]) != 0 else None  # 0: none (kohya)
    if "hada_w1_a" in parts:
        if "hada_t1" in parts:
            w1 = _tucker(parts["hada_t1"], parts["hada_w1_a"], parts["hada_w1_b"])
            w2 = _tucker(parts["hada_t2"], parts["hada_w2_a"], parts["hada_w2_b"])
        else:
            w1 = parts["hada_w1_a"] @ parts["hada_w1_b"]
            w2 = parts["hada_w2_a"] @ parts["hada_w2_b"]
        delta, rank = w1 * w2, parts["hada_w1_b"].shape[0]
    elif any(name.startswith("lokr_") for name in parts):
        rank = None
        w1 = parts.get("lokr_w1")
        if w1 is None:
            w1, rank = parts["lokr_w1_a"] @ parts["lokr_w1_b"], parts["lokr_w1_b"].shape[0]
        w2 = parts.get("lokr_w2")
        if w2 is None and "lokr_t2" in parts:
            w2, rank = _tucker(parts["lokr_t2"], parts["lokr_w2_a"], parts["lokr_w2_b"]), parts["lokr_w2_b"].shape[0]
        elif w2 is None:
            w2b = parts["lokr_w2_b"]
            w2 = (parts["lokr_w2_a"] @ w2b.reshape(w2b.shape[0], -1)).reshape(-1, *w2b.shape[1:])
            rank = w2b.shape[0]
        w1 = w1.reshape(*w1.shape, *[1] * (w2.ndim - w1.ndim))
        delta = np.kron(w1, w2)  # LyCORIS' make_kron: w1 padded to w2's dimensions
        alpha = alpha if rank is not None else None
    elif "mid" in parts:
        up, down = parts["up"].reshape(parts["up"].shape[0], -1), parts["down"].reshape(parts["down"].shape[0], -1)
        delta, rank = np.einsum("oa,ab...,bn->on...", up, parts["mid"], down), down.shape[0]
    else:
        up, down = parts["up"], parts["down"]
        delta, rank = up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1), down.shape[0]
    scale = 1.0 if alpha is None else alpha / rank
    return scale * delta.reshape(delta.shape[0], -1)


def dense_updates(path: Path) -> dict[str, np.ndarray]:
    """Every module's scaled ΔW of a single-file LoRA (or of the one .safetensors file in a folder)."""
    if path.is_dir():
        path = next(path.glob("*.safetensors"))
    return {name: dense_update(parts) for name, parts in _module_tensors(path).items()}
